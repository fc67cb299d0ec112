//! Session recordings: the spool, the uploader and crash recovery.
//!
//! A session's events become record lines (format version 2, see
//! `gatehouse_recording::chunked`). Each session has a directory in the
//! spool (`<data dir>/recordings/<session id>/`):
//!
//! - `meta.json`: the session's metadata, fsync'd before the session starts;
//! - `tail-N.jsonl`: the lines of chunk `N` not yet sealed, written through
//!   to the OS as they happen (a killed agent loses none of them);
//! - `chunk-N.zst`: a sealed chunk, fsync'd and renamed into place before
//!   it counts; then its reference is appended (fsync'd) to `chunks.jsonl`
//!   and the tail removed;
//! - `manifest.json`: written, signed and fsync'd when the session ends.
//!
//! The uploader sends each chunk with object_store, reads it back and
//! compares its SHA-256, and only then removes the local file; once every
//! chunk is up it does the same with the manifest, reports the session to
//! the control plane (manifest hash and object keys for the sessions index)
//! and removes the directory when the report is committed. It retries with
//! backoff for as long as it takes. On start, [`recover`] seals what a crash
//! left open with end reason "agent restarted".

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use gatehouse_proto::tunnel::SessionRecorded;
use gatehouse_recording::chunked::{
    Chunk, ChunkRef, ChunkWriter, Manifest, SessionMeta, chunk_key, manifest_key, read_chunk,
};
use gatehouse_recording::{Record, RecordEvent, sha256_hex};
use object_store::{ObjectStoreExt, PutPayload};

use crate::{AgentCtx, now_ms};

/// Chunk objects in flight at once.
const PARALLEL_UPLOADS: usize = 4;

/// End reason of a session a crash interrupted.
pub const AGENT_RESTARTED: &str = "agent restarted";

/// Recording failed; the session must end (fail closed).
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("recording spool {0}: {1}")]
    Spool(String, std::io::Error),
    #[error("recording format: {0}")]
    Format(#[from] gatehouse_recording::chunked::FormatError),
    #[error("{0}")]
    Full(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RecordError + '_ {
    move |e| RecordError::Spool(path.display().to_string(), e)
}

/// The spool's root (`[spool] dir`, by default `<data dir>/recordings`).
pub fn spool_dir(ctx: &AgentCtx) -> PathBuf {
    match &ctx.config.spool.dir {
        Some(d) => d.clone(),
        None => ctx.config.data_dir.join("recordings"),
    }
}

fn chunk_file(dir: &Path, index: u32) -> PathBuf {
    dir.join(format!("chunk-{index:06}.zst"))
}

fn tail_file(dir: &Path, index: u32) -> PathBuf {
    dir.join(format!("tail-{index:06}.jsonl"))
}

/// fsyncs a directory, so a rename or a new file in it survives a crash.
fn sync_dir(dir: &Path) -> Result<(), RecordError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// Writes a file whole: temporary name, fsync, rename, fsync of the directory.
fn write_durable(path: &Path, bytes: &[u8]) -> Result<(), RecordError> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    match path.parent() {
        Some(d) => sync_dir(d),
        None => Ok(()),
    }
}

// === admission ===

/// Bytes the spool holds now.
fn spool_usage(root: &Path) -> u64 {
    let Ok(dirs) = std::fs::read_dir(root) else {
        return 0;
    };
    dirs.flatten()
        .filter_map(|d| std::fs::read_dir(d.path()).ok())
        .flat_map(|files| files.flatten())
        .filter_map(|f| f.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// Whether a new recorded session may start: the spool is under its quota
/// and its filesystem keeps the configured free space. `Err` says why not.
pub fn admit(ctx: &AgentCtx) -> Result<(), String> {
    let root = spool_dir(ctx);
    std::fs::create_dir_all(&root).map_err(|e| format!("recording spool: {e}"))?;
    let limits = &ctx.config.spool;
    if limits.max_bytes > 0 {
        let used = spool_usage(&root);
        if used >= limits.max_bytes {
            return Err(format!(
                "recording spool is full ({used} bytes waiting for upload, quota {} bytes); new sessions are refused until recordings are uploaded",
                limits.max_bytes
            ));
        }
    }
    if limits.min_free_bytes > 0
        && let Ok(st) = nix::sys::statvfs::statvfs(&root)
    {
        let free = st.blocks_available().saturating_mul(st.fragment_size());
        if free < limits.min_free_bytes {
            return Err(format!(
                "recording spool's filesystem has {free} bytes free, below the {} bytes it must keep; new sessions are refused",
                limits.min_free_bytes
            ));
        }
    }
    Ok(())
}

// === the live recorder ===

/// One session's recording in progress.
pub struct Recorder {
    dir: PathBuf,
    meta: SessionMeta,
    writer: ChunkWriter,
    tail: BufWriter<File>,
    refs: Vec<ChunkRef>,
    refs_file: File,
    line: Vec<u8>,
    signing_key: Vec<u8>,
    /// Live viewers of the session get every line as recorded.
    live: Option<tokio::sync::broadcast::Sender<bytes::Bytes>>,
}

// === impl Recorder ===

impl Recorder {
    /// Creates the session's spool directory with its metadata, durable
    /// before the session goes on. Its fsyncs run on the blocking pool, not
    /// on the thread the sessions share.
    pub async fn start(ctx: &AgentCtx, meta: SessionMeta) -> Result<Self, RecordError> {
        let root = spool_dir(ctx);
        let signing_key = ctx.signing_key.clone();
        tokio::task::spawn_blocking(move || Self::start_in(&root, signing_key, meta))
            .await
            .map_err(|e| RecordError::Spool("starting a recording".into(), e.into()))?
    }

    fn start_in(root: &Path, signing_key: Vec<u8>, meta: SessionMeta) -> Result<Self, RecordError> {
        let dir = root.join(&meta.session_id);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let meta_bytes = serde_json::to_vec(&meta).unwrap_or_default();
        write_durable(&dir.join("meta.json"), &meta_bytes)?;
        sync_dir(root)?;
        let refs_path = dir.join("chunks.jsonl");
        let refs_file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&refs_path)
            .map_err(io(&refs_path))?;
        let tail_path = tail_file(&dir, 0);
        let tail = File::create(&tail_path).map_err(io(&tail_path))?;
        Ok(Self {
            writer: ChunkWriter::new(&meta.session_id),
            dir,
            meta,
            tail: BufWriter::with_capacity(64 << 10, tail),
            refs: Vec::new(),
            refs_file,
            line: Vec::with_capacity(256),
            signing_key,
            live: None,
        })
    }

    /// Appends one event stamped `at_ms`; seals a chunk when it filled.
    pub fn record(&mut self, at_ms: i64, event: RecordEvent) -> Result<(), RecordError> {
        let rec = Record {
            t: at_ms - self.meta.started_ms,
            event,
        };
        self.line.clear();
        serde_json::to_writer(&mut self.line, &rec)
            .map_err(|e| RecordError::Spool("encoding".into(), e.into()))?;
        self.tail
            .write_all(&self.line)
            .and_then(|_| self.tail.write_all(b"\n"))
            .map_err(io(&self.dir))?;
        if let Some(live) = &self.live
            && live.receiver_count() > 0
        {
            let _ = live.send(bytes::Bytes::copy_from_slice(&self.line));
        }
        if !self.writer.would_seal(self.line.len()) {
            self.writer.push_line(&self.line)?;
            return Ok(());
        }
        // Compressing and fsyncing a chunk takes milliseconds: let the
        // runtime move its other tasks off this thread meanwhile.
        crate::blocking(|| match self.writer.push_line(&self.line)? {
            Some(c) => self.seal(c),
            None => Ok(()),
        })
    }

    /// Sends every event recorded from now on to `live` as well.
    pub fn set_live(&mut self, live: tokio::sync::broadcast::Sender<bytes::Bytes>) {
        self.live = Some(live);
    }

    /// Hands what was recorded to the OS (survives the agent being killed).
    pub fn flush(&mut self) -> Result<(), RecordError> {
        self.tail.flush().map_err(io(&self.dir))
    }

    fn seal(&mut self, c: Chunk) -> Result<(), RecordError> {
        let r = store_chunk(&self.dir, &mut self.refs_file, &c)?;
        self.refs.push(r);
        // The sealed chunk holds the tail's lines now.
        let next = tail_file(&self.dir, self.writer.next_index());
        let f = File::create(&next).map_err(io(&next))?;
        let old = std::mem::replace(&mut self.tail, BufWriter::with_capacity(64 << 10, f));
        drop(old.into_parts());
        let _ = std::fs::remove_file(tail_file(&self.dir, c.index));
        Ok(())
    }

    /// Ends the recording: seals the last chunk and writes the signed
    /// manifest; the uploader takes it from there. After a spool write
    /// failed (a full disk), the tail's lines are still in memory: the tail
    /// is dropped to make room and the last chunk written from memory.
    pub fn finish(self, ctx: &AgentCtx, reason: &str) -> Result<(), RecordError> {
        let Self {
            dir,
            meta,
            mut writer,
            tail,
            mut refs,
            mut refs_file,
            signing_key,
            ..
        } = self;
        // Closed without a last flush: the lines are in the writer, and an
        // unlinked file still open would keep its space.
        drop(tail.into_parts());
        let now = now_ms();
        let end = Record {
            t: now - meta.started_ms,
            event: RecordEvent::End {
                reason: reason.to_string(),
            },
        };
        let tail = tail_file(&dir, writer.next_index());
        let mut last = writer.push(&end)?;
        if last.is_none() {
            last = writer.finish()?;
        }
        if let Some(c) = last {
            let r = match store_chunk(&dir, &mut refs_file, &c) {
                Ok(r) => r,
                Err(_) => {
                    let _ = std::fs::remove_file(&tail);
                    store_chunk(&dir, &mut refs_file, &c)?
                }
            };
            refs.push(r);
        }
        let _ = std::fs::remove_file(&tail);
        write_manifest(&dir, &meta, refs, now, reason, &signing_key)?;
        ctx.uploads.notify_one();
        Ok(())
    }
}

/// Writes a sealed chunk durably and appends its reference.
fn store_chunk(dir: &Path, refs_file: &mut File, c: &Chunk) -> Result<ChunkRef, RecordError> {
    write_durable(&chunk_file(dir, c.index), &c.bytes)?;
    let r = c.to_ref();
    let mut line = serde_json::to_vec(&r).unwrap_or_default();
    line.push(b'\n');
    let refs = dir.join("chunks.jsonl");
    refs_file.write_all(&line).map_err(io(&refs))?;
    refs_file.sync_data().map_err(io(&refs))?;
    Ok(r)
}

fn write_manifest(
    dir: &Path,
    meta: &SessionMeta,
    refs: Vec<ChunkRef>,
    ended_ms: i64,
    reason: &str,
    key: &[u8],
) -> Result<(), RecordError> {
    let mut m = Manifest::new(meta, refs, ended_ms, reason);
    m.sign(key)?;
    write_durable(&dir.join("manifest.json"), &m.to_bytes())
}

// === recovery ===

/// Closes every session a crash left open: the chunks it sealed stay, the
/// lines of its last tail become its last chunk, and its manifest says
/// "agent restarted". Runs before the agent takes sessions.
pub fn recover(ctx: &AgentCtx) -> Result<usize, RecordError> {
    let root = spool_dir(ctx);
    std::fs::create_dir_all(&root).map_err(io(&root))?;
    let mut closed = 0;
    for d in std::fs::read_dir(&root).map_err(io(&root))?.flatten() {
        let dir = d.path();
        if !dir.is_dir() || dir.join("manifest.json").exists() {
            continue;
        }
        let Some(meta) = std::fs::read(dir.join("meta.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<SessionMeta>(&b).ok())
        else {
            // Died before its metadata was durable: the session never started.
            let _ = std::fs::remove_dir_all(&dir);
            continue;
        };
        recover_session(&dir, &meta, &ctx.signing_key)?;
        tracing::warn!(session_id = %meta.session_id, "closed a recording the last run left open");
        closed += 1;
    }
    Ok(closed)
}

fn recover_session(dir: &Path, meta: &SessionMeta, key: &[u8]) -> Result<(), RecordError> {
    let refs_path = dir.join("chunks.jsonl");
    let text = std::fs::read(&refs_path).unwrap_or_default();
    // Whole reference lines, up to a torn last one (crash mid-append),
    // which is cut off.
    let mut refs: Vec<ChunkRef> = Vec::new();
    let mut good = 0;
    for l in text.split_inclusive(|b| *b == b'\n') {
        match l.strip_suffix(b"\n").map(serde_json::from_slice) {
            Some(Ok(r)) => refs.push(r),
            _ => break,
        }
        good += l.len();
    }
    let mut refs_file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&refs_path)
        .map_err(io(&refs_path))?;
    refs_file.set_len(good as u64).map_err(io(&refs_path))?;
    let mut prev = refs.last().map(|r| r.sha256.clone()).unwrap_or_default();
    let mut next = refs.len() as u32;
    // A chunk sealed and renamed into place whose reference was not yet
    // appended.
    let sealed = chunk_file(dir, next);
    if let Ok(bytes) = std::fs::read(&sealed) {
        match read_chunk(&bytes, &meta.session_id, next, &prev) {
            Ok(records) => {
                let r = ChunkRef {
                    index: next,
                    sha256: sha256_hex(&bytes),
                    size: bytes.len() as u64,
                    events: records.len() as u64,
                };
                let mut line = serde_json::to_vec(&r).unwrap_or_default();
                line.push(b'\n');
                refs_file.write_all(&line).map_err(io(&refs_path))?;
                refs_file.sync_data().map_err(io(&refs_path))?;
                prev = r.sha256.clone();
                refs.push(r);
                next += 1;
            }
            Err(_) => {
                let _ = std::fs::remove_file(&sealed);
            }
        }
    }
    // Tails of chunks that were sealed are leftovers.
    for i in 0..next {
        let _ = std::fs::remove_file(tail_file(dir, i));
    }
    let mut w = ChunkWriter::resume(&meta.session_id, next, &prev);
    let tail = std::fs::read(tail_file(dir, next)).unwrap_or_default();
    let mut last_t = 0;
    let mut chunks = Vec::new();
    // Only whole lines that decode: a torn last write is dropped.
    for l in tail.split(|b| *b == b'\n') {
        let Ok(r) = serde_json::from_slice::<Record>(l) else {
            break;
        };
        last_t = r.t;
        chunks.extend(w.push_line(l)?);
    }
    let end = Record {
        t: last_t,
        event: RecordEvent::End {
            reason: AGENT_RESTARTED.into(),
        },
    };
    chunks.extend(w.push(&end)?);
    chunks.extend(w.finish()?);
    for c in &chunks {
        refs.push(store_chunk(dir, &mut refs_file, c)?);
    }
    let ended_ms = meta.started_ms.saturating_add(last_t);
    write_manifest(dir, meta, refs, ended_ms, AGENT_RESTARTED, key)?;
    let _ = std::fs::remove_file(tail_file(dir, next));
    Ok(())
}

// === the uploader ===

/// Uploads spooled recordings for as long as the agent runs.
pub async fn uploader(ctx: Arc<AgentCtx>) {
    let mut reported: HashSet<String> = HashSet::new();
    let mut backoff = Duration::from_millis(100);
    loop {
        match upload_pass(&ctx, &mut reported).await {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "recording upload failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), ctx.uploads.notified()).await;
    }
}

/// Uploads everything in the spool once (for benchmarks and tools): sealed
/// chunks, and finished sessions with their reports.
pub async fn upload_all(ctx: &AgentCtx) -> Result<(), String> {
    upload_pass(ctx, &mut HashSet::new()).await
}

/// One pass over the spool: every chunk on disk, then finished sessions'
/// manifests and reports, then committed sessions' directories.
async fn upload_pass(ctx: &AgentCtx, reported: &mut HashSet<String>) -> Result<(), String> {
    let root = spool_dir(ctx);
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .map_err(|e| format!("{}: {e}", root.display()))?
        .flatten()
        .map(|d| d.path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    for dir in dirs {
        let Some(meta) = std::fs::read(dir.join("meta.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<SessionMeta>(&b).ok())
        else {
            continue;
        };
        let id = meta.session_id.clone();
        let committed = ctx
            .recorded
            .lock()
            .map(|s| s.contains(&id))
            .unwrap_or(false);
        if committed {
            std::fs::remove_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            reported.remove(&id);
            if let Ok(mut s) = ctx.recorded.lock() {
                s.remove(&id);
            }
            continue;
        }
        if reported.contains(&id) {
            continue;
        }
        // The manifest is read first: once it exists every chunk is sealed,
        // so the listing below holds all the chunks it names.
        let manifest_bytes = std::fs::read(dir.join("manifest.json")).ok();
        // A few chunks at a time; each file goes once its object verified.
        let uploads = chunk_files(&dir)?.into_iter().map(|(i, path)| {
            let key = chunk_key(&meta.target, &id, i);
            async move {
                let bytes = tokio::fs::read(&path)
                    .await
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                put_verified(ctx, &key, bytes).await?;
                tokio::fs::remove_file(&path)
                    .await
                    .map_err(|e| format!("{}: {e}", path.display()))
            }
        });
        futures::stream::iter(uploads)
            .buffer_unordered(PARALLEL_UPLOADS)
            .try_collect::<Vec<()>>()
            .await?;
        let Some(manifest_bytes) = manifest_bytes else {
            continue; // still recording
        };
        if !chunk_files(&dir)?.is_empty() {
            return Err(format!(
                "{}: chunks appeared after the manifest",
                dir.display()
            ));
        }
        let manifest = Manifest::from_bytes(&manifest_bytes).map_err(|e| e.to_string())?;
        let key = manifest_key(&meta.target, &id);
        put_verified(ctx, &key, manifest_bytes.clone()).await?;
        let report = SessionRecorded {
            session_id: id.clone(),
            recording_key: key,
            recording_sha256: sha256_hex(&manifest_bytes),
            recording_size: manifest.chunks.iter().map(|c| c.size).sum(),
            ended_ms: manifest.ended_ms,
            end_reason: manifest.end_reason.clone(),
            chunk_keys: manifest
                .chunks
                .iter()
                .map(|c| chunk_key(&meta.target, &id, c.index))
                .collect(),
            events: manifest.chunks.iter().map(|c| c.events).sum(),
        };
        ctx.report_tx
            .send(report)
            .map_err(|_| "the control stream is closed".to_string())?;
        reported.insert(id);
    }
    Ok(())
}

/// The sealed chunks in a session's spool directory, in order.
fn chunk_files(dir: &Path) -> Result<Vec<(u32, PathBuf)>, String> {
    let mut chunks: Vec<(u32, PathBuf)> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .flatten()
        .filter_map(|f| {
            let name = f.file_name().into_string().ok()?;
            let n = name.strip_prefix("chunk-")?.strip_suffix(".zst")?;
            Some((n.parse().ok()?, f.path()))
        })
        .collect();
    chunks.sort();
    Ok(chunks)
}

/// Puts an object, reads it back and compares its SHA-256.
async fn put_verified(ctx: &AgentCtx, key: &str, bytes: Vec<u8>) -> Result<(), String> {
    let path = object_store::path::Path::parse(key).map_err(|e| format!("{key}: {e}"))?;
    let sha = sha256_hex(&bytes);
    let len = bytes.len();
    ctx.recordings
        .put(&path, PutPayload::from(bytes))
        .await
        .map_err(|e| format!("uploading {key}: {e}"))?;
    let back = ctx
        .recordings
        .get(&path)
        .await
        .map_err(|e| format!("reading back {key}: {e}"))?
        .bytes()
        .await
        .map_err(|e| format!("reading back {key}: {e}"))?;
    if back.len() != len || sha256_hex(&back) != sha {
        return Err(format!(
            "{key}: the stored object ({} bytes) differs from the spooled one ({len} bytes)",
            back.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use gatehouse_recording::chunked::verify_recording;

    use super::*;

    fn ctx(dir: &Path) -> (AgentCtx, crate::AgentQueues) {
        let cfg = dir.join("agent.toml");
        std::fs::write(
            &cfg,
            format!(
                "name = \"a\"\nservers = [\"127.0.0.1:1\"]\ndata_dir = \"{}\"\nrecordings_dir = \"{}\"\n",
                dir.join("data").display(),
                dir.join("store").display()
            ),
        )
        .unwrap();
        let cfg = crate::config::AgentConfig::load(&cfg).unwrap();
        let store = gatehouse_recording::store::open(&cfg.store()).unwrap();
        let key = agent_key();
        crate::AgentCtx::new(cfg, store, key, crate::protocol::Protocols::default())
    }

    /// A fresh P-256 key (PKCS#8) from the PKI crate's generator.
    fn agent_key() -> Vec<u8> {
        let k = gatehouse_pki::AgentKey::generate("a").unwrap();
        gatehouse_pki::pkcs8_der(&k.key_pem).unwrap()
    }

    fn meta() -> SessionMeta {
        SessionMeta {
            session_id: "s1".into(),
            identity: "sa:x".into(),
            target: "db".into(),
            agent: "a".into(),
            started_ms: 1_000,
            ..SessionMeta::default()
        }
    }

    fn row(i: usize) -> RecordEvent {
        RecordEvent::Row {
            values: vec![Some(format!("{i:08} {}", "v".repeat(200)))],
        }
    }

    fn records_of(ctx: &AgentCtx, dir: &Path) -> Vec<Record> {
        let m = Manifest::from_bytes(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
        let pk = gatehouse_recording::chunked::public_key(&ctx.signing_key).unwrap();
        verify_recording(&m, &pk, |i| std::fs::read(chunk_file(dir, i)).ok()).unwrap()
    }

    #[test]
    fn a_crash_loses_no_written_line_and_closes_the_session_as_agent_restarted() {
        let tmp = tempfile::tempdir().unwrap();
        let (ctx, _q) = ctx(tmp.path());
        let mut r = Recorder::start_in(&spool_dir(&ctx), ctx.signing_key.clone(), meta()).unwrap();
        // Past one chunk (4 MiB of lines), then more in the tail.
        let n = 25_000;
        for i in 0..n {
            r.record(1_000 + i as i64, row(i)).unwrap();
        }
        r.flush().unwrap();
        let dir = spool_dir(&ctx).join("s1");
        assert!(chunk_file(&dir, 0).exists());
        // The crash: nothing more is written; a torn line ends the tail.
        std::mem::forget(r);
        let mut tail = OpenOptions::new()
            .append(true)
            .open(tail_file(&dir, 1))
            .unwrap();
        tail.write_all(b"{\"t\":99,\"type\":\"ro").unwrap();
        drop(tail);
        assert_eq!(recover(&ctx).unwrap(), 1);
        let m = Manifest::from_bytes(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
        assert_eq!(m.end_reason, AGENT_RESTARTED);
        let recs = records_of(&ctx, &dir);
        assert_eq!(recs.len(), n + 1);
        assert_eq!(recs[n - 1].event, row(n - 1));
        assert_eq!(
            recs[n].event,
            RecordEvent::End {
                reason: AGENT_RESTARTED.into()
            }
        );
        // Recovering again changes nothing.
        assert_eq!(recover(&ctx).unwrap(), 0);
    }

    #[test]
    fn a_chunk_sealed_but_not_yet_listed_is_kept_after_a_crash() {
        let tmp = tempfile::tempdir().unwrap();
        let (ctx, _q) = ctx(tmp.path());
        let mut r = Recorder::start_in(&spool_dir(&ctx), ctx.signing_key.clone(), meta()).unwrap();
        for i in 0..20_000 {
            r.record(1_000, row(i)).unwrap();
        }
        r.flush().unwrap();
        std::mem::forget(r);
        let dir = spool_dir(&ctx).join("s1");
        // The crash came after chunk 0 was renamed into place and before its
        // reference was appended (and its tail removed).
        let refs = std::fs::read_to_string(dir.join("chunks.jsonl")).unwrap();
        assert_eq!(refs.lines().count(), 1);
        std::fs::write(dir.join("chunks.jsonl"), "").unwrap();
        let chunk0 =
            zstd::decode_all(std::fs::read(chunk_file(&dir, 0)).unwrap().as_slice()).unwrap();
        let lines: Vec<&[u8]> = chunk0.split(|b| *b == b'\n').skip(1).collect();
        std::fs::write(tail_file(&dir, 0), lines.join(&b'\n')).unwrap();
        recover(&ctx).unwrap();
        let recs = records_of(&ctx, &dir);
        assert_eq!(recs.len(), 20_001, "no record lost or doubled");
        assert!(!tail_file(&dir, 0).exists());
    }

    #[test]
    fn a_spool_over_its_quota_refuses_new_sessions() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut ctx, _q) = ctx(tmp.path());
        ctx.config.spool.max_bytes = 10_000;
        assert!(admit(&ctx).is_ok());
        let mut r = Recorder::start_in(&spool_dir(&ctx), ctx.signing_key.clone(), meta()).unwrap();
        for i in 0..100 {
            r.record(1_000, row(i)).unwrap();
        }
        r.flush().unwrap();
        let why = admit(&ctx).unwrap_err();
        assert!(why.contains("quota 10000 bytes"), "{why}");
        ctx.config.spool.max_bytes = 0;
        ctx.config.spool.min_free_bytes = u64::MAX;
        let why = admit(&ctx).unwrap_err();
        assert!(why.contains("bytes free"), "{why}");
    }
}
