//! Session recording: events are appended to a spool file as they happen,
//! the file is fsync'd when the session ends, uploaded through object_store,
//! and its key and SHA-256 are reported for the sessions index.

use std::io::{BufWriter, Write};
use std::path::PathBuf;

use gatehouse_proto::tunnel::SessionRecorded;
use gatehouse_recording::{FORMAT_VERSION, Header, Record, RecordEvent, line};
use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use crate::{AgentCtx, now_ms};

/// Recording failed; the session must end (fail closed).
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("recording spool: {0}")]
    Spool(#[from] std::io::Error),
    #[error("recording upload: {0}")]
    Upload(#[from] object_store::Error),
}

/// One session's recording in progress.
pub struct Recorder {
    path: PathBuf,
    key: String,
    file: BufWriter<std::fs::File>,
    hash: Sha256,
    size: u64,
    started_ms: i64,
    session_id: String,
}

// === impl Recorder ===

impl Recorder {
    /// Creates the spool file and writes the header.
    pub fn start(ctx: &AgentCtx, header: Header) -> Result<Self, RecordError> {
        let dir = ctx.config.data_dir.join("spool");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{}.jsonl", header.session_id));
        let file = BufWriter::with_capacity(64 << 10, std::fs::File::create(&path)?);
        let mut r = Self {
            key: format!("recordings/{}/{}.jsonl", header.target, header.session_id),
            path,
            file,
            hash: Sha256::new(),
            size: 0,
            started_ms: header.started_ms,
            session_id: header.session_id.clone(),
        };
        r.write(&line(&Header {
            format: "gatehouse-recording".into(),
            version: FORMAT_VERSION,
            ..header
        }))?;
        Ok(r)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), RecordError> {
        self.file.write_all(bytes)?;
        self.hash.update(bytes);
        self.size += bytes.len() as u64;
        Ok(())
    }

    /// Appends one event stamped `at_ms`.
    pub fn record(&mut self, at_ms: i64, event: RecordEvent) -> Result<(), RecordError> {
        let rec = Record {
            t: at_ms - self.started_ms,
            event,
        };
        self.write(&line(&rec))
    }

    /// Ends the recording: fsync, upload, verify, report for the index.
    pub async fn finish(mut self, ctx: &AgentCtx, reason: &str) -> Result<(), RecordError> {
        let now = now_ms();
        self.record(
            now,
            RecordEvent::End {
                reason: reason.to_string(),
            },
        )?;
        self.file.flush()?;
        self.file.get_ref().sync_all()?;
        let sha256 = hex::encode(self.hash.finalize_reset());
        let path = object_store::path::Path::from(self.key.as_str());
        upload(ctx.recordings.as_ref(), &self.path, &path).await?;
        let meta = ctx.recordings.head(&path).await?;
        if meta.size != self.size {
            return Err(RecordError::Upload(object_store::Error::Generic {
                store: "recordings",
                source: format!("uploaded size {} != spooled size {}", meta.size, self.size).into(),
            }));
        }
        // The store confirmed the object: the spool copy can go.
        let _ = std::fs::remove_file(&self.path);
        let _ = ctx.report_tx.send(SessionRecorded {
            session_id: self.session_id.clone(),
            recording_key: self.key.clone(),
            recording_sha256: sha256,
            recording_size: self.size,
            ended_ms: now,
            end_reason: reason.to_string(),
        });
        Ok(())
    }
}

/// Streams the spool file to the store in parts of a few MiB.
async fn upload(
    store: &dyn ObjectStore,
    file: &std::path::Path,
    path: &object_store::path::Path,
) -> Result<(), RecordError> {
    let mut f = tokio::fs::File::open(file).await?;
    let mut w = WriteMultipart::new_with_chunk_size(store.put_multipart(path).await?, 5 << 20);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        w.wait_for_capacity(4).await?;
        w.write(buf.get(..n).unwrap_or_default());
    }
    w.finish().await?;
    Ok(())
}
