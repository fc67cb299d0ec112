//! Durable Raft log and state machine on one redb database.
//!
//! Every write is a redb transaction committed with immediate durability
//! (fsync) before openraft is told it happened.

// openraft's trait signatures fix the error type; its size is not ours to choose.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::state::{self, AGENT_SEQ, AUDIT, AUDIT_IDS, KV};
use crate::types::{CommandResult, TypeConfig};

const LOG: TableDefinition<u64, &str> = TableDefinition::new("raft_log");
const LOG_META: TableDefinition<&str, &str> = TableDefinition::new("raft_meta");
const SM_META: TableDefinition<&str, &str> = TableDefinition::new("sm_meta");
const SNAPSHOT: TableDefinition<&str, &str> = TableDefinition::new("snapshot");

type NodeId = u64;
type Membership = StoredMembership<NodeId, crate::types::NodeInfo>;
type Meta = SnapshotMeta<NodeId, crate::types::NodeInfo>;

/// The state database could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct OpenError(#[from] pub redb::Error);

/// Opens or creates the database and makes sure every table exists.
pub fn open_database(path: &Path) -> Result<Database, OpenError> {
    let db = Database::create(path).map_err(redb::Error::from)?;
    let txn = db.begin_write().map_err(redb::Error::from)?;
    {
        txn.open_table(LOG).map_err(redb::Error::from)?;
        txn.open_table(LOG_META).map_err(redb::Error::from)?;
        txn.open_table(SM_META).map_err(redb::Error::from)?;
        txn.open_table(SNAPSHOT).map_err(redb::Error::from)?;
        txn.open_table(KV).map_err(redb::Error::from)?;
        txn.open_table(AUDIT).map_err(redb::Error::from)?;
        txn.open_table(AUDIT_IDS).map_err(redb::Error::from)?;
        txn.open_table(AGENT_SEQ).map_err(redb::Error::from)?;
    }
    txn.commit().map_err(redb::Error::from)?;
    Ok(db)
}

fn read_err(e: impl Into<redb::Error>) -> StorageError<NodeId> {
    let e: redb::Error = e.into();
    StorageIOError::read(&e).into()
}

fn write_err(e: impl Into<redb::Error>) -> StorageError<NodeId> {
    let e: redb::Error = e.into();
    StorageIOError::write(&e).into()
}

fn json_err(e: serde_json::Error) -> StorageError<NodeId> {
    StorageIOError::read(&e).into()
}

fn to_json<T: Serialize>(v: &T) -> Result<String, StorageError<NodeId>> {
    serde_json::to_string(v).map_err(|e| StorageIOError::write(&e).into())
}

fn meta_get<T: serde::de::DeserializeOwned>(
    db: &Database,
    table: TableDefinition<&str, &str>,
    key: &str,
) -> Result<Option<T>, StorageError<NodeId>> {
    let txn = db.begin_read().map_err(read_err)?;
    let t = txn.open_table(table).map_err(read_err)?;
    match t.get(key).map_err(read_err)? {
        None => Ok(None),
        Some(v) => serde_json::from_str(v.value()).map(Some).map_err(json_err),
    }
}

fn meta_put<T: Serialize>(
    db: &Database,
    table: TableDefinition<&str, &str>,
    key: &str,
    value: &T,
    durability: Durability,
) -> Result<(), StorageError<NodeId>> {
    let s = to_json(value)?;
    let mut txn = db.begin_write().map_err(write_err)?;
    txn.set_durability(durability).map_err(write_err)?;
    txn.open_table(table)
        .map_err(write_err)?
        .insert(key, s.as_str())
        .map_err(write_err)?;
    txn.commit().map_err(write_err)
}

/// The Raft log.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

// === impl LogStore ===

impl LogStore {
    pub fn new(db: Arc<Database>) -> Self {
        Self { db }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let txn = self.db.begin_read().map_err(read_err)?;
        let t = txn.open_table(LOG).map_err(read_err)?;
        let mut out = Vec::new();
        for item in t.range(range).map_err(read_err)? {
            let (_, v) = item.map_err(read_err)?;
            out.push(serde_json::from_str(v.value()).map_err(json_err)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let last_purged: Option<LogId<NodeId>> = meta_get(&self.db, LOG_META, "last_purged")?;
        let txn = self.db.begin_read().map_err(read_err)?;
        let t = txn.open_table(LOG).map_err(read_err)?;
        let last = match t.last().map_err(read_err)? {
            Some((_, v)) => {
                let e: Entry<TypeConfig> = serde_json::from_str(v.value()).map_err(json_err)?;
                Some(e.log_id)
            }
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        meta_put(&self.db, LOG_META, "vote", vote, Durability::Immediate)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        meta_get(&self.db, LOG_META, "vote")
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        // Optional in Raft (it only speeds up a restart), so not fsync'd:
        // the next durable commit (a log append, a vote) persists it.
        meta_put(
            &self.db,
            LOG_META,
            "committed",
            &committed,
            Durability::None,
        )
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(meta_get::<Option<LogId<NodeId>>>(&self.db, LOG_META, "committed")?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // The commit fsyncs: keep it off the async workers so timers and
        // heartbeats are not delayed behind the disk.
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_write().map_err(write_err)?;
            {
                let mut t = txn.open_table(LOG).map_err(write_err)?;
                for e in &entries {
                    let s = to_json(e)?;
                    t.insert(e.log_id.index, s.as_str()).map_err(write_err)?;
                }
            }
            txn.commit().map_err(write_err)
        })
        .await
        .map_err(|e| StorageError::from(StorageIOError::write(&e)))??;
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let txn = self.db.begin_write().map_err(write_err)?;
        txn.open_table(LOG)
            .map_err(write_err)?
            .retain_in(log_id.index.., |_, _| false)
            .map_err(write_err)?;
        txn.commit().map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let s = to_json(&Some(log_id))?;
        let txn = self.db.begin_write().map_err(write_err)?;
        txn.open_table(LOG_META)
            .map_err(write_err)?
            .insert("last_purged", s.as_str())
            .map_err(write_err)?;
        txn.open_table(LOG)
            .map_err(write_err)?
            .retain_in(..=log_id.index, |_, _| false)
            .map_err(write_err)?;
        txn.commit().map_err(write_err)
    }
}

/// Last applied log id, membership and the serialized state tables.
type Dump = (Option<LogId<NodeId>>, Membership, String);

/// Everything a snapshot carries: the applied state tables.
#[derive(Default, Serialize, Deserialize)]
struct SnapshotDoc {
    kv: Vec<(String, String)>,
    audit: Vec<(u64, String)>,
    audit_ids: Vec<(String, u64)>,
    agent_seq: Vec<(String, u64)>,
}

/// The state machine: applies commands to the state tables.
#[derive(Clone)]
pub struct StateMachineStore {
    db: Arc<Database>,
    snapshot_seq: Arc<AtomicU64>,
}

// === impl StateMachineStore ===

impl StateMachineStore {
    pub fn new(db: Arc<Database>) -> Result<Self, OpenError> {
        Ok(Self {
            db,
            snapshot_seq: Arc::new(AtomicU64::new(0)),
        })
    }

    fn dump(&self) -> Result<Dump, StorageError<NodeId>> {
        let txn = self.db.begin_read().map_err(read_err)?;
        let meta = txn.open_table(SM_META).map_err(read_err)?;
        let last_applied = match meta.get("last_applied").map_err(read_err)? {
            Some(v) => serde_json::from_str(v.value()).map_err(json_err)?,
            None => None,
        };
        let membership = match meta.get("membership").map_err(read_err)? {
            Some(v) => serde_json::from_str(v.value()).map_err(json_err)?,
            None => Membership::default(),
        };
        let mut doc = SnapshotDoc::default();
        for item in txn
            .open_table(KV)
            .map_err(read_err)?
            .iter()
            .map_err(read_err)?
        {
            let (k, v) = item.map_err(read_err)?;
            doc.kv.push((k.value().to_string(), v.value().to_string()));
        }
        for item in txn
            .open_table(AUDIT)
            .map_err(read_err)?
            .iter()
            .map_err(read_err)?
        {
            let (k, v) = item.map_err(read_err)?;
            doc.audit.push((k.value(), v.value().to_string()));
        }
        for item in txn
            .open_table(AUDIT_IDS)
            .map_err(read_err)?
            .iter()
            .map_err(read_err)?
        {
            let (k, v) = item.map_err(read_err)?;
            doc.audit_ids.push((k.value().to_string(), v.value()));
        }
        for item in txn
            .open_table(AGENT_SEQ)
            .map_err(read_err)?
            .iter()
            .map_err(read_err)?
        {
            let (k, v) = item.map_err(read_err)?;
            doc.agent_seq.push((k.value().to_string(), v.value()));
        }
        Ok((last_applied, membership, to_json(&doc)?))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        // Serializing the whole state is slow for a large audit log: keep it
        // off the async workers.
        let me = self.clone();
        let (last_applied, membership, data) = tokio::task::spawn_blocking(move || me.dump())
            .await
            .map_err(|e| StorageError::from(StorageIOError::read(&e)))??;
        let n = self.snapshot_seq.fetch_add(1, Ordering::Relaxed) + 1;
        let snapshot_id = match last_applied {
            Some(l) => format!("{}-{}-{n}", l.leader_id, l.index),
            None => format!("none-{n}"),
        };
        let meta = Meta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id,
        };
        let db = self.db.clone();
        let (meta, data) = tokio::task::spawn_blocking(move || {
            save_snapshot(&db, &meta, &data).map(|()| (meta, data))
        })
        .await
        .map_err(|e| StorageError::from(StorageIOError::write(&e)))??;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data.into_bytes())),
        })
    }
}

fn save_snapshot(db: &Database, meta: &Meta, data: &str) -> Result<(), StorageError<NodeId>> {
    let m = to_json(meta)?;
    let txn = db.begin_write().map_err(write_err)?;
    {
        let mut t = txn.open_table(SNAPSHOT).map_err(write_err)?;
        t.insert("meta", m.as_str()).map_err(write_err)?;
        t.insert("data", data).map_err(write_err)?;
    }
    txn.commit().map_err(write_err)
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, Membership), StorageError<NodeId>> {
        let last: Option<Option<LogId<NodeId>>> = meta_get(&self.db, SM_META, "last_applied")?;
        let membership: Option<Membership> = meta_get(&self.db, SM_META, "membership")?;
        Ok((last.flatten(), membership.unwrap_or_default()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || apply_entries(&db, entries))
            .await
            .map_err(|e| StorageError::from(StorageIOError::write(&e)))?
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let bytes = snapshot.into_inner();
        let doc: SnapshotDoc = serde_json::from_slice(&bytes).map_err(json_err)?;
        let txn = self.db.begin_write().map_err(write_err)?;
        {
            txn.delete_table(KV).map_err(write_err)?;
            txn.delete_table(AUDIT).map_err(write_err)?;
            txn.delete_table(AUDIT_IDS).map_err(write_err)?;
            txn.delete_table(AGENT_SEQ).map_err(write_err)?;
            let mut kv = txn.open_table(KV).map_err(write_err)?;
            for (k, v) in &doc.kv {
                kv.insert(k.as_str(), v.as_str()).map_err(write_err)?;
            }
            let mut audit = txn.open_table(AUDIT).map_err(write_err)?;
            for (k, v) in &doc.audit {
                audit.insert(*k, v.as_str()).map_err(write_err)?;
            }
            let mut ids = txn.open_table(AUDIT_IDS).map_err(write_err)?;
            for (k, v) in &doc.audit_ids {
                ids.insert(k.as_str(), *v).map_err(write_err)?;
            }
            let mut seqs = txn.open_table(AGENT_SEQ).map_err(write_err)?;
            for (k, v) in &doc.agent_seq {
                seqs.insert(k.as_str(), *v).map_err(write_err)?;
            }
            let mut sm = txn.open_table(SM_META).map_err(write_err)?;
            let last = to_json(&meta.last_log_id)?;
            sm.insert("last_applied", last.as_str())
                .map_err(write_err)?;
            let m = to_json(&meta.last_membership)?;
            sm.insert("membership", m.as_str()).map_err(write_err)?;
            let mut snap = txn.open_table(SNAPSHOT).map_err(write_err)?;
            let mj = to_json(meta)?;
            snap.insert("meta", mj.as_str()).map_err(write_err)?;
            let data = String::from_utf8_lossy(&bytes);
            snap.insert("data", data.as_ref()).map_err(write_err)?;
        }
        txn.commit().map_err(write_err)
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let txn = self.db.begin_read().map_err(read_err)?;
        let t = txn.open_table(SNAPSHOT).map_err(read_err)?;
        let (Some(m), Some(d)) = (
            t.get("meta").map_err(read_err)?,
            t.get("data").map_err(read_err)?,
        ) else {
            return Ok(None);
        };
        let meta: Meta = serde_json::from_str(m.value()).map_err(json_err)?;
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(d.value().as_bytes().to_vec())),
        }))
    }
}

/// Applies entries in one write transaction, not fsync'd: the entries are
/// durable in the log (same database), so after a crash the state and its
/// `last_applied` roll back together to the last durable commit and openraft
/// applies the rest again. Any durable commit (the next log append, a vote,
/// a purge, a snapshot) persists every apply before it, so the log is never
/// purged past durable state.
fn apply_entries(
    db: &Database,
    entries: Vec<Entry<TypeConfig>>,
) -> Result<Vec<CommandResult>, StorageError<NodeId>> {
    let mut txn = db.begin_write().map_err(write_err)?;
    txn.set_durability(Durability::None).map_err(write_err)?;
    let mut results = Vec::new();
    let mut last = None;
    let mut membership = None;
    for e in entries {
        last = Some(e.log_id);
        match e.payload {
            EntryPayload::Blank => results.push(CommandResult::Ok),
            EntryPayload::Normal(cmd) => {
                results.push(state::apply(&txn, &cmd).map_err(write_err)?);
            }
            EntryPayload::Membership(m) => {
                membership = Some(Membership::new(Some(e.log_id), m));
                results.push(CommandResult::Ok);
            }
        }
    }
    {
        let mut meta = txn.open_table(SM_META).map_err(write_err)?;
        if let Some(l) = last {
            let s = to_json(&Some(l))?;
            meta.insert("last_applied", s.as_str()).map_err(write_err)?;
        }
        if let Some(m) = membership {
            let s = to_json(&m)?;
            meta.insert("membership", s.as_str()).map_err(write_err)?;
        }
    }
    txn.commit().map_err(write_err)?;
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Builder;

    impl openraft::testing::StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir>
        for Builder
    {
        async fn build(
            &self,
        ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError<NodeId>>
        {
            let dir = tempfile::tempdir().map_err(|e| StorageIOError::write(&e))?;
            let db = Arc::new(
                open_database(&dir.path().join("s.redb")).map_err(|e| StorageIOError::write(&e))?,
            );
            let sm = StateMachineStore::new(db.clone()).map_err(|e| StorageIOError::write(&e))?;
            Ok((dir, LogStore::new(db), sm))
        }
    }

    #[test]
    fn passes_openraft_storage_suite() {
        openraft::testing::Suite::test_all(Builder).unwrap();
    }
}
