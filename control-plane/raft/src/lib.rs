//! The control plane's replicated state: openraft over a redb file.
//!
//! - [`types`]: the Raft type configuration, the [`Command`]s proposed to the
//!   log and their [`CommandResult`]s.
//! - [`state`]: the entities and the deterministic `apply` (no clock, no
//!   randomness: times and ids travel inside the command).
//! - [`store`]: durable log storage and state machine on one redb database,
//!   passing openraft's storage test suite.
//! - [`read`]: queries over the applied state for the API and ingress.
//! - [`network`]: the peer transport (gRPC with mutual TLS).
//! - [`election`]: when a voter campaigns (a fresh random timeout per attempt).

pub mod election;
pub mod identity;
pub mod network;
pub mod read;
pub mod state;
pub mod store;
pub mod types;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

pub use network::PeerTls;
pub use read::StateReader;
pub use store::{LogStore, StateMachineStore, open_database};
pub use types::{ChangeAudit, Command, CommandResult, NodeInfo, RawEvent, Rejection, TypeConfig};

/// The handle to the local Raft member.
pub type Raft = openraft::Raft<TypeConfig>;

/// Starting the local Raft member failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("opening the state database: {0}")]
    Storage(#[from] store::OpenError),
    #[error("raft configuration: {0}")]
    Config(String),
    #[error("raft start: {0}")]
    Raft(String),
}

/// A started Raft member and a reader over its state.
pub struct Member {
    pub raft: Raft,
    pub reader: StateReader,
    /// Told of every sign of a live leader (see [`election`]).
    pub elections: Arc<election::Elections>,
}

/// Leader heartbeat interval (ms). openraft 0.9 also uses it as the time
/// limit of every AppendEntries call, so it must leave room for replicating
/// a full payload ([`MAX_PAYLOAD_ENTRIES`] audit entries) and its fsync.
pub const HEARTBEAT_MS: u64 = 100;
/// Randomized election timeout bounds (ms).
pub const ELECTION_TIMEOUT_MIN_MS: u64 = 300;
pub const ELECTION_TIMEOUT_MAX_MS: u64 = 600;
/// Entries per AppendEntries call. An audit entry carries up to a few
/// thousand events (under a megabyte); openraft's default of 300 could make
/// a call that never completes within [`HEARTBEAT_MS`], and replication
/// would retry it forever.
pub const MAX_PAYLOAD_ENTRIES: u64 = 4;
/// The longest a follower of a known leader waits after the last heartbeat
/// before it campaigns (ms): the leader's lease of `election_timeout_max`
/// first, then a randomized election timeout (see [`election`]).
pub const EFFECTIVE_ELECTION_TIMEOUT_MS: u64 = 2 * ELECTION_TIMEOUT_MAX_MS;

/// How a member starts.
pub enum Bootstrap {
    /// A fresh store initializes a new cluster with this node as its only voter.
    NewCluster,
    /// A fresh store waits to be added by the cluster's leader.
    Join,
}

/// Opens (or creates) the member's storage under `dir` and starts Raft.
pub async fn start(
    dir: &Path,
    node_id: u64,
    me: NodeInfo,
    tls: PeerTls,
    bootstrap: Bootstrap,
    snapshot_every: u64,
) -> Result<Member, StartError> {
    std::fs::create_dir_all(dir).map_err(|e| store::OpenError(redb::Error::Io(e)))?;
    let db = Arc::new(open_database(&dir.join("state.redb"))?);
    let log = LogStore::new(db.clone());
    let sm = StateMachineStore::new(db.clone())?;
    let config = openraft::Config {
        cluster_name: "gatehouse".into(),
        heartbeat_interval: HEARTBEAT_MS,
        election_timeout_min: ELECTION_TIMEOUT_MIN_MS,
        election_timeout_max: ELECTION_TIMEOUT_MAX_MS,
        max_payload_entries: MAX_PAYLOAD_ENTRIES,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(snapshot_every),
        max_in_snapshot_log_to_keep: snapshot_every.min(1_000),
        // Campaigns are started by [`election::Elections`] instead.
        enable_elect: false,
        ..Default::default()
    }
    .validate()
    .map_err(|e| StartError::Config(e.to_string()))?;
    let elections = election::Elections::new(ELECTION_TIMEOUT_MIN_MS, ELECTION_TIMEOUT_MAX_MS);
    let network = network::Network {
        tls,
        elections: elections.clone(),
    };
    let raft = openraft::Raft::new(node_id, Arc::new(config), network, log, sm)
        .await
        .map_err(|e| StartError::Raft(e.to_string()))?;
    let initialized = raft
        .is_initialized()
        .await
        .map_err(|e| StartError::Raft(e.to_string()))?;
    if !initialized && matches!(bootstrap, Bootstrap::NewCluster) {
        let mut members = BTreeMap::new();
        members.insert(node_id, me);
        raft.initialize(members)
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
    }
    tokio::spawn(elections.clone().drive(raft.clone(), node_id));
    Ok(Member {
        raft,
        reader: StateReader::new(db),
        elections,
    })
}
