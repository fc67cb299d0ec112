//! The agent's audit spool: every audit event is appended and fsync'd here
//! before it is sent, and stays until the control plane acknowledges its
//! commit. After a crash or restart, unacknowledged events are read back and
//! re-sent; the control plane de-duplicates by id, so delivery is
//! exactly-once in effect.
//!
//! Layout: `events.log` holds records `[u32 big-endian length][canonical
//! event]`; `acked` holds how many records from the start are acknowledged.
//! `acked` may lag behind the truth (it is rewritten at most every
//! [`ACK_PERSIST_INTERVAL`]): a lagging count only causes re-sends. When
//! every record is acknowledged and the log has grown past
//! [`TRUNCATE_AT_BYTES`], the log is truncated and `acked` reset at once (a
//! stale count after a truncation would skip new events).

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

/// Longest the persisted acknowledgement count may lag.
pub const ACK_PERSIST_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

/// Log size past which a fully acknowledged log is truncated.
pub const TRUNCATE_AT_BYTES: u64 = 4 << 20;

/// The log file is allocated (zero-filled) this much at a time, so an
/// fdatasync after an append flushes the data alone, not a new file size
/// (about 30% less time per fsync on ext4). A zero length marks the end.
const PREALLOCATE: u64 = 8 << 20;

pub struct AuditSpool {
    dir: PathBuf,
    file: File,
    acked: u64,
    total: u64,
    /// Bytes of records in the log, and the file's allocated size.
    len: u64,
    capacity: u64,
    dirty: bool,
    /// The acknowledgement count last written to `acked`, and when.
    persisted: (u64, std::time::Instant),
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
        // The records end at a zero length (the preallocated tail) or at a
        // torn final record (crash mid-append, never fsync'd, never sent),
        // which is dropped.
        while let Some(head) = data.get(pos..pos + 4) {
            let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
            if len == 0 {
                break;
            }
            let Some(body) = data.get(pos + 4..pos + 4 + len) else {
                break;
            };
            if total >= acked {
                // An unacknowledged record that does not decode is a torn
                // append (its length written, its body not): the end.
                let Ok(ev) = AuditEvent::decode(body) else {
                    break;
                };
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
        // Cut a torn tail so new records start on a boundary with zeros
        // after them, then allocate ahead again.
        let capacity = (pos as u64).next_multiple_of(PREALLOCATE) + PREALLOCATE;
        file.set_len(pos as u64).map_err(err)?;
        file.set_len(capacity).map_err(err)?;
        let mut file = file;
        use std::io::Seek;
        file.seek(std::io::SeekFrom::Start(pos as u64))
            .map_err(err)?;
        Ok((
            Self {
                dir: dir.to_path_buf(),
                file,
                acked: acked.min(total),
                total,
                len: pos as u64,
                capacity,
                dirty: false,
                persisted: (acked.min(total), std::time::Instant::now()),
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

    /// Appends events with one write (durable after [`Self::sync`]).
    pub fn append(&mut self, events: &[AuditEvent]) -> Result<(), SpoolError> {
        let mut buf = Vec::with_capacity(events.len() * 512);
        for ev in events {
            let body = ev.encode();
            buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
            buf.extend_from_slice(&body);
        }
        let end = self.len + buf.len() as u64;
        if end > self.capacity {
            self.capacity = end.next_multiple_of(PREALLOCATE) + PREALLOCATE;
            self.file.set_len(self.capacity).map_err(|e| self.err(e))?;
        }
        self.file.write_all(&buf).map_err(|e| self.err(e))?;
        self.total += events.len() as u64;
        self.len += buf.len() as u64;
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
        if self.acked == self.total && self.len >= TRUNCATE_AT_BYTES {
            // Everything is committed: start over with an empty log, and
            // say so before any new event lands in it.
            self.file.set_len(0).map_err(|e| self.err(e))?;
            self.capacity = PREALLOCATE;
            self.file.set_len(self.capacity).map_err(|e| self.err(e))?;
            use std::io::Seek;
            self.file
                .seek(std::io::SeekFrom::Start(0))
                .map_err(|e| self.err(e))?;
            self.acked = 0;
            self.total = 0;
            self.len = 0;
            return self.persist_ack();
        }
        if self.persisted.1.elapsed() >= ACK_PERSIST_INTERVAL {
            self.persist_ack()?;
        }
        Ok(())
    }

    /// Writes the acknowledgement count. Not fsync'd: losing it only causes
    /// re-sends, which the server de-duplicates.
    fn persist_ack(&mut self) -> Result<(), SpoolError> {
        if self.persisted.0 == self.acked && self.acked != 0 {
            self.persisted.1 = std::time::Instant::now();
            return Ok(());
        }
        let tmp = self.dir.join("acked.tmp");
        std::fs::write(&tmp, self.acked.to_string()).map_err(|e| self.err(e))?;
        std::fs::rename(&tmp, self.dir.join("acked")).map_err(|e| self.err(e))?;
        self.persisted = (self.acked, std::time::Instant::now());
        Ok(())
    }

    /// Events appended and not yet acknowledged.
    pub fn pending(&self) -> u64 {
        self.total - self.acked
    }
}

impl Drop for AuditSpool {
    /// A clean stop leaves an exact count (best effort: a lag is harmless).
    fn drop(&mut self) {
        if self.persisted.0 != self.acked {
            let _ = self.persist_ack();
        }
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
            issuer: None,
            groups: None,
            target: "t".into(),
            policy_version: "p".into(),
            decision: Decision::Allow,
            statement: Some(format!("select {seq}")),
            parameters: None,
            outcome: None,
            detail: None,
            masked: None,
        }
    }

    #[test]
    fn unacknowledged_events_survive_reopen_and_torn_tails_are_cut() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, pending) = AuditSpool::open(dir.path()).unwrap();
        assert!(pending.is_empty());
        s.append(&(1..=5).map(ev).collect::<Vec<_>>()).unwrap();
        s.sync().unwrap();
        s.ack(2).unwrap();
        let end = s.len;
        drop(s);
        // A torn record after the last one.
        let f = OpenOptions::new()
            .write(true)
            .open(dir.path().join("events.log"))
            .unwrap();
        std::os::unix::fs::FileExt::write_at(&f, &[0, 0, 0, 50, b'{'], end).unwrap();
        drop(f);
        let (mut s, pending) = AuditSpool::open(dir.path()).unwrap();
        assert_eq!(
            pending.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        s.append(&[ev(6)]).unwrap();
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
    }

    #[test]
    fn a_large_acknowledged_log_is_truncated_and_new_events_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (mut s, _) = AuditSpool::open(dir.path()).unwrap();
        let n = 40_000u64;
        s.append(&(1..=n).map(ev).collect::<Vec<_>>()).unwrap();
        s.sync().unwrap();
        assert!(s.len >= TRUNCATE_AT_BYTES);
        s.ack(n).unwrap();
        assert_eq!(s.len, 0);
        s.append(&[ev(n + 1), ev(n + 2)]).unwrap();
        s.sync().unwrap();
        // A crash now (no clean drop): the reset count was written at the
        // truncation, so the new events are still pending.
        std::mem::forget(s);
        let (_, pending) = AuditSpool::open(dir.path()).unwrap();
        assert_eq!(
            pending.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![n + 1, n + 2]
        );
    }
}
