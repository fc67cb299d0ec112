//! Recordings as evidence: reading them back from the object store and
//! verifying them against the sessions index and the agent's key, and
//! deleting them when their retention ends (never under legal hold).

use std::sync::Arc;
use std::time::Duration;

use gatehouse_audit::{Decision, EventKind};
use gatehouse_cp_raft::state::SessionRecord;
use gatehouse_cp_raft::types::Command;
use gatehouse_recording::chunked::{ChainCheck, Manifest};
use gatehouse_recording::sha256_hex;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use tokio::sync::mpsc::Sender;

use crate::cluster::{Cluster, now_ms};

/// Bytes of JSON lines per part a reader is sent.
pub const PART_BYTES: usize = 1 << 20;

/// What reading one session's recording found.
#[derive(Debug, Default)]
pub struct Checked {
    pub manifest: Option<Manifest>,
    pub chunks: u32,
    /// Records in the chunks that verified.
    pub events: u64,
    /// Each names the manifest or a chunk (index and key).
    pub problems: Vec<String>,
}

/// The recordings store and the cluster whose index describes it.
pub struct Recordings {
    pub store: Arc<dyn ObjectStore>,
    pub cluster: Arc<Cluster>,
}

// === impl Recordings ===

impl Recordings {
    async fn fetch(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
        let path = Path::parse(key).map_err(|e| format!("key {key}: {e}"))?;
        match self.store.get(&path).await {
            Ok(r) => r
                .bytes()
                .await
                .map(|b| Some(b.to_vec()))
                .map_err(|e| format!("reading {key}: {e}")),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(format!("reading {key}: {e}")),
        }
    }

    /// Reads a session's recording and checks the manifest against the
    /// index's hash, its signature against the serving agent's key, and
    /// every chunk's hash and place in the chain.
    /// With a `sink`, the session header and then the records of every
    /// chunk that verified are sent to it as JSON lines, in parts of about
    /// [`PART_BYTES`]. One chunk is held in memory at a time.
    pub async fn check(&self, s: &SessionRecord, sink: Option<&Sender<Vec<u8>>>) -> Checked {
        let mut out = Checked::default();
        let Some(key) = s.recording_key.as_deref() else {
            out.problems
                .push("no recording yet (session open, or its upload is pending)".into());
            return out;
        };
        if let Some(ms) = s.recording_deleted_ms {
            out.problems
                .push(format!("deleted by retention at {ms} (Unix ms)"));
            return out;
        }
        let manifest_bytes = match self.fetch(key).await {
            Ok(Some(b)) => b,
            Ok(None) => {
                out.problems.push(format!("manifest {key}: missing"));
                return out;
            }
            Err(e) => {
                out.problems.push(format!("manifest: {e}"));
                return out;
            }
        };
        let sha = sha256_hex(&manifest_bytes);
        if Some(sha.as_str()) != s.recording_sha256.as_deref() {
            out.problems.push(format!(
                "manifest {key}: SHA-256 {sha} does not match the sessions index's {}",
                s.recording_sha256.as_deref().unwrap_or("")
            ));
        }
        let manifest = match Manifest::from_bytes(&manifest_bytes) {
            Ok(m) => m,
            Err(e) => {
                out.problems.push(format!("manifest {key}: {e}"));
                return out;
            }
        };
        if manifest.session.session_id != s.id || manifest.session.agent != s.agent {
            out.problems.push(format!(
                "manifest {key}: names session {} of agent {}",
                manifest.session.session_id, manifest.session.agent
            ));
        }
        let public_key = match self.cluster.reader.agent(&s.agent) {
            Ok(Some(a)) => hex::decode(&a.public_key).unwrap_or_default(),
            _ => Vec::new(),
        };
        if public_key.is_empty() {
            out.problems
                .push(format!("agent {} has no registered public key", s.agent));
        }
        if manifest.chunks.len() != s.chunk_keys.len() {
            out.problems.push(format!(
                "manifest {key}: lists {} chunks, the sessions index {}",
                manifest.chunks.len(),
                s.chunk_keys.len()
            ));
        }
        let mut part = Vec::new();
        if sink.is_some() {
            let m = &manifest.session;
            part = gatehouse_recording::line(&gatehouse_recording::Header {
                format: "gatehouse-recording".into(),
                version: manifest.version,
                session_id: m.session_id.clone(),
                identity: m.identity.clone(),
                target: m.target.clone(),
                agent: m.agent.clone(),
                database: m.database.clone(),
                db_user: m.db_user.clone(),
                policy_version: m.policy_version.clone(),
                started_ms: m.started_ms,
            });
        }
        let mut check = ChainCheck::new(&manifest, &public_key);
        for (i, k) in s.chunk_keys.iter().enumerate() {
            let bytes = match self.fetch(k).await {
                Ok(b) => b,
                Err(e) => {
                    out.problems.push(e);
                    None
                }
            };
            let records = check.chunk(i as u32, bytes.as_deref());
            out.events += records.len() as u64;
            let Some(sink) = sink else { continue };
            for r in &records {
                part.extend(gatehouse_recording::line(r));
                if part.len() >= PART_BYTES {
                    // A reader that went away ends the reading.
                    if sink.send(std::mem::take(&mut part)).await.is_err() {
                        return out;
                    }
                }
            }
        }
        if let Some(sink) = sink
            && !part.is_empty()
        {
            let _ = sink.send(part).await;
        }
        for p in check.problems {
            let named = match &p {
                gatehouse_recording::chunked::FormatError::Chunk { index, .. } => s
                    .chunk_keys
                    .get(*index as usize)
                    .map(|k| format!("{p} (object {k})")),
                _ => None,
            };
            out.problems.push(named.unwrap_or_else(|| p.to_string()));
        }
        out.chunks = manifest.chunks.len() as u32;
        out.manifest = Some(manifest);
        out
    }

    /// Deletes the recordings whose retention has passed (leader only, so
    /// one node does it), then removes the objects of every deleted
    /// recording not yet purged (retried on every sweep until the store
    /// has none left).
    pub async fn sweep(&self) {
        let m = self.cluster.raft.metrics().borrow().clone();
        if m.current_leader != Some(self.cluster.node_id) {
            return;
        }
        self.expire().await;
        self.purge().await;
    }

    async fn expire(&self) {
        let Ok(Some(policy)) = self.cluster.reader.current_policy() else {
            return;
        };
        let Some(retention) = gatehouse_policy::PolicyDoc::from_canonical(&policy.canonical)
            .ok()
            .and_then(|d| d.recordings)
        else {
            return;
        };
        let Ok(sessions) = self.cluster.reader.sessions() else {
            return;
        };
        let now = now_ms();
        for s in sessions {
            let (Some(ended), Some(manifest)) = (s.ended_ms, s.recording_key.as_deref()) else {
                continue;
            };
            if s.legal_hold.is_some() || s.recording_deleted_ms.is_some() {
                continue;
            }
            let Some((written, keep)) = retention.retention_for(&s.target) else {
                continue;
            };
            if ended.saturating_add(keep.as_millis() as i64) > now {
                continue;
            }
            // The index says "deleted" first (a hold placed meanwhile wins),
            // and the deletion is evidence before any object goes.
            match self
                .cluster
                .propose(Command::RecordingDeleted {
                    session_id: s.id.clone(),
                    now_ms: now,
                })
                .await
            {
                Ok(gatehouse_cp_raft::types::CommandResult::Ok) => {}
                _ => continue,
            }
            let mut ev = self.cluster.event(
                EventKind::RecordingDeleted,
                Decision::Allow,
                &s.identity,
                &s.target,
                &s.id,
            );
            ev.detail = Some(format!(
                "retention {} passed; deleting {} chunk objects and manifest {manifest}",
                written.trim(),
                s.chunk_keys.len()
            ));
            if let Err(e) = self.cluster.audit(ev).await {
                tracing::error!(session_id = %s.id, error = %e, "recording deletion audit failed");
            }
        }
    }

    async fn purge(&self) {
        let Ok(sessions) = self.cluster.reader.sessions() else {
            return;
        };
        for s in sessions {
            let (Some(_), Some(manifest)) = (s.recording_deleted_ms, s.recording_key.as_ref())
            else {
                continue;
            };
            if s.recording_purged {
                continue;
            }
            let mut all = true;
            for k in s.chunk_keys.iter().chain(std::iter::once(manifest)) {
                if let Ok(p) = Path::parse(k)
                    && let Err(e) = self.store.delete(&p).await
                    && !matches!(e, object_store::Error::NotFound { .. })
                {
                    tracing::warn!(key = %k, error = %e, "deleting a recording object failed; will retry");
                    all = false;
                }
            }
            if all {
                let _ = self
                    .cluster
                    .propose(Command::RecordingPurged {
                        session_id: s.id.clone(),
                    })
                    .await;
            }
        }
    }
}

/// Sweeps retention every `every` until the process exits.
pub async fn retention_loop(rec: Arc<Recordings>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        rec.sweep().await;
    }
}
