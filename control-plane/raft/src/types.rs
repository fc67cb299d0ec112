//! Raft type configuration, commands and their results.

use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::state::{Rule, SessionRecord, Target};

openraft::declare_raft_types!(
    /// Gatehouse's Raft types.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A write proposed to the log. Everything non-deterministic (times, ids,
/// key material) is chosen by the proposer and carried here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Creates the cluster's CA once; ignored when one exists.
    InitCluster {
        ca_cert_pem: String,
        ca_key_pem: String,
        now_ms: i64,
    },
    CreateServiceAccount {
        name: String,
        groups: Vec<String>,
        key_id: String,
        key_sha256: String,
        now_ms: i64,
    },
    CreateTarget {
        target: Target,
    },
    CreateRule {
        rule: Rule,
    },
    CreateEnrollmentToken {
        token_sha256: String,
        agent: String,
        expires_ms: i64,
        now_ms: i64,
    },
    /// Marks the token used and registers the agent with its certificate.
    ConsumeEnrollmentToken {
        token_sha256: String,
        agent: String,
        cert_serial: String,
        now_ms: i64,
    },
    /// Appends canonical audit events, skipping ids already present.
    AppendAudit {
        agent: String,
        events: Vec<String>,
    },
    SessionOpened {
        session: SessionRecord,
    },
    SessionClosed {
        session_id: String,
        ended_ms: i64,
        end_reason: String,
        recording_key: String,
        recording_sha256: String,
        recording_size: u64,
    },
}

/// Why a command changed nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("enrollment token was already used")]
    TokenUsed,
    #[error("enrollment token has expired")]
    TokenExpired,
    #[error("enrollment token is bound to another agent")]
    TokenWrongAgent,
    #[error("invalid: {0}")]
    Invalid(String),
}

/// The outcome of applying a [`Command`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    #[default]
    Ok,
    Rejected(Rejection),
    AuditAppended {
        appended: u64,
        duplicates: u64,
        /// Highest sequence number of the agent now committed.
        high_water: u64,
    },
}
