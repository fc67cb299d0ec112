//! The agent's audit spool: every audit event is appended and fsync'd here
//! before it is sent, and stays until the control plane acknowledges its
//! commit. After a crash or restart, unacknowledged events are read back and
//! re-sent; the control plane de-duplicates by id, so delivery is
//! exactly-once in effect.
//!
//! Layout: `events.log` holds records `[u32 big-endian length][canonical
//! event]`; `acked` holds how many records from the start are acknowledged.
//! When every record is acknowledged the log is truncated.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use gatehouse_audit::AuditEvent;

/// The spool could not be read or written; the agent must stop (fail closed).
#[derive(Debug, thiserror::Error)]
#[error("audit spool {path}: {source}")]
pub struct SpoolError {
    path: PathBuf,
    source: std::io::Error,
}

pub struct AuditSpool {
    dir: PathBuf,
    file: File,
    acked: u64,
    total: u64,
    dirty: bool,
}

// === impl AuditSpool ===

impl AuditSpool {
    /// Opens the spool and returns the events not yet acknowledged, in order.
    pub fn open(dir: &Path) -> Result<(Self, Vec<AuditEvent>), SpoolError> {
        let err = |source| SpoolError {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(err)?;
        let log = dir.join("events.log");
        let acked: u64 = std::fs::read_to_string(dir.join("acked"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let mut data = Vec::new();
        if log.exists() {
            File::open(&log)
                .and_then(|mut f| f.read_to_end(&mut data))
                .map_err(err)?;
        }
        let mut events = Vec::new();
        let mut total = 0u64;
        let mut pos = 0usize;
        // A torn final record (crash mid-append, never fsync'd, never sent)
        // is dropped.
        while let Some(head) = data.get(pos..pos + 4) {
            let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
            let Some(body) = data.get(pos + 4..pos + 4 + len) else {
                break;
            };
            if total >= acked
                && let Ok(ev) = AuditEvent::decode(body)
            {
                events.push(ev);
            }
            total += 1;
            pos += 4 + len;
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&log)
            .map_err(err)?;
        // Cut a torn tail so new records start on a boundary.
        file.set_len(pos as u64).map_err(err)?;
        let mut file = file;
        use std::io::Seek;
        file.seek(std::io::SeekFrom::End(0)).map_err(err)?;
        Ok((
            Self {
                dir: dir.to_path_buf(),
                file,
                acked: acked.min(total),
                total,
                dirty: false,
            },
            events,
        ))
    }

    fn err(&self, source: std::io::Error) -> SpoolError {
        SpoolError {
            path: self.dir.clone(),
            source,
        }
    }

    /// Appends an event (durable after [`Self::sync`]).
    pub fn append(&mut self, ev: &AuditEvent) -> Result<(), SpoolError> {
        let body = ev.encode();
        let mut rec = Vec::with_capacity(4 + body.len());
        rec.extend_from_slice(&(body.len() as u32).to_be_bytes());
        rec.extend_from_slice(&body);
        self.file.write_all(&rec).map_err(|e| self.err(e))?;
        self.total += 1;
        self.dirty = true;
        Ok(())
    }

    /// fsyncs everything appended since the last call.
    pub fn sync(&mut self) -> Result<(), SpoolError> {
        if self.dirty {
            self.file.sync_data().map_err(|e| self.err(e))?;
            self.dirty = false;
        }
        Ok(())
    }

    /// Marks the oldest `n` unacknowledged events as committed.
    pub fn ack(&mut self, n: u64) -> Result<(), SpoolError> {
        self.acked = (self.acked + n).min(self.total);
        if self.acked == self.total {
            // Everything is committed: start over with an empty log.
            self.file.set_len(0).map_err(|e| self.err(e))?;
            use std::io::Seek;
            self.file
                .seek(std::io::SeekFrom::Start(0))
                .map_err(|e| self.err(e))?;
            self.acked = 0;
            self.total = 0;
        }
        // Losing this file only causes re-sends, which the server de-duplicates.
        let tmp = self.dir.join("acked.tmp");
        std::fs::write(&tmp, self.acked.to_string()).map_err(|e| self.err(e))?;
        std::fs::rename(&tmp, self.dir.join("acked")).map_err(|e| self.err(e))
    }

    /// Events appended and not yet acknowledged.
    pub fn pending(&self) -> u64 {
        self.total - self.acked
    }
}

#[cfg(test)]
mod tests {
    use gatehouse_audit::{Decision, EventKind};

    use super::*;

    fn ev(seq: u64) -> AuditEvent {
        AuditEvent {
            id: format!("{seq:032x}"),
            agent: "a".into(),
            seq,
            time_ms: 0,
            kind: EventKind::Statement,
            session_id: "s".into(),
            identity: "sa:x".into(),
            target: "t".into(),
            policy_version: "p".into(),
            decision: Decision::Allow,
            statement: Some(format!("select {seq}")),
            parameters: None,
            outcome: None,
            detail: None,
        }
    }

    #[test]
    fn unacknowledged_events_survive_reopen_and_torn_tails_are_cut() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, pending) = AuditSpool::open(dir.path()).unwrap();
        assert!(pending.is_empty());
        for i in 1..=5 {
            s.append(&ev(i)).unwrap();
        }
        s.sync().unwrap();
        s.ack(2).unwrap();
        drop(s);
        // A torn record at the end.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join("events.log"))
            .unwrap();
        f.write_all(&[0, 0, 0, 50, b'{']).unwrap();
        drop(f);
        let (mut s, pending) = AuditSpool::open(dir.path()).unwrap();
        assert_eq!(
            pending.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        s.append(&ev(6)).unwrap();
        s.sync().unwrap();
        drop(s);
        let (mut s, pending) = AuditSpool::open(dir.path()).unwrap();
        assert_eq!(
            pending.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![3, 4, 5, 6]
        );
        s.ack(4).unwrap();
        assert_eq!(s.pending(), 0);
        drop(s);
        let (_, pending) = AuditSpool::open(dir.path()).unwrap();
        assert!(pending.is_empty());
        assert_eq!(
            std::fs::metadata(dir.path().join("events.log"))
                .unwrap()
                .len(),
            0
        );
    }
}
