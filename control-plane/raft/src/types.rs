//! Raft type configuration, commands and their results.

use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::identity::{Issuer, RoleGrant, SigningKey, User, WorkloadBinding};
use crate::state::{AccessRequest, PolicyRecord, Rule, SessionRecord, Target};

openraft::declare_raft_types!(
    /// Gatehouse's Raft types.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = u64,
        Node = NodeInfo,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// How to reach a member.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// host:port of the node-to-node (Raft) gRPC service.
    pub raft_addr: String,
    /// https://host:port of the admin API.
    pub api_addr: String,
}

impl std::fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "raft={} api={}", self.raft_addr, self.api_addr)
    }
}

/// A write proposed to the log. Everything non-deterministic (times, ids,
/// key material) is chosen by the proposer and carried here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Creates the cluster's CA once; ignored when one exists.
    InitCluster {
        ca_cert_pem: String,
        ca_key_sealed: String,
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
    /// Removes an access rule; sessions it alone admitted are then ended by
    /// the node that proposed it.
    DeleteRule {
        id: String,
    },
    /// Revokes an identity: tokens issued to it up to `at_ms` are refused,
    /// and a service account's API keys are removed.
    RevokeIdentity {
        identity: String,
        at_ms: i64,
        reason: String,
        /// Only this API key of a service account.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key_id: Option<String>,
    },
    CreateAccessRequest {
        request: Box<AccessRequest>,
    },
    /// An approval or a denial; refused for the requester, reviewers outside
    /// the approver groups, a second approval by the same reviewer, and
    /// requests no longer pending.
    ReviewAccessRequest {
        id: String,
        reviewer: String,
        reviewer_groups: Vec<String>,
        approve: bool,
        reason: String,
        now_ms: i64,
    },
    /// Uses an approved grant: a one-time grant only once, across nodes.
    UseAccessRequest {
        id: String,
        now_ms: i64,
    },
    /// Puts a validated policy document in force (its `seq` is assigned
    /// on apply).
    ApplyPolicy {
        policy: Box<PolicyRecord>,
    },
    CreateEnrollmentToken {
        token_sha256: String,
        agent: String,
        expires_ms: i64,
        now_ms: i64,
    },
    /// A single-use token for node `node_id` to join the cluster.
    CreateJoinToken {
        token_sha256: String,
        node_id: u64,
        expires_ms: i64,
        now_ms: i64,
    },
    ConsumeJoinToken {
        token_sha256: String,
        node_id: u64,
        now_ms: i64,
    },
    /// Marks the token used and registers the agent with its certificate.
    ConsumeEnrollmentToken {
        token_sha256: String,
        agent: String,
        cert_serial: String,
        /// The agent's public key (SEC1 point, hex): it signs recordings.
        #[serde(default)]
        public_key: String,
        now_ms: i64,
    },
    /// Appends canonical audit events, skipping ids already present.
    AppendAudit {
        agent: String,
        events: Vec<RawEvent>,
    },
    SessionOpened {
        session: Box<SessionRecord>,
    },
    SessionClosed {
        session_id: String,
        ended_ms: i64,
        end_reason: String,
        recording_key: String,
        recording_sha256: String,
        recording_size: u64,
        #[serde(default)]
        chunk_keys: Vec<String>,
        #[serde(default)]
        events: u64,
    },
    /// Puts a session's recording under legal hold, or releases it.
    SetLegalHold {
        session_id: String,
        hold: bool,
        reason: String,
    },
    /// Retention deleted a session's recording objects.
    RecordingDeleted {
        session_id: String,
        now_ms: i64,
    },
    /// Every object of a deleted recording is gone from the store.
    RecordingPurged {
        session_id: String,
    },
    /// Adds or replaces a trusted identity provider.
    PutIssuer {
        issuer: Box<Issuer>,
    },
    DeleteIssuer {
        name: String,
    },
    /// The cluster's token-signing key; refused when one exists (the first
    /// proposal wins, every node then reads the same key).
    PutSigningKey {
        key: Box<SigningKey>,
    },
    /// The cluster's SSH certificate authority (Ed25519): it signs callers'
    /// user certificates and the nodes' host certificates. Refused when one
    /// exists, like the token-signing key.
    PutSshCaKey {
        key: Box<SigningKey>,
    },
    /// A person logged in: their record as the provider described them.
    UserLoggedIn {
        user: Box<User>,
    },
    /// Replaces an identity's static groups (empty removes them).
    SetStaticGroups {
        identity: String,
        groups: Vec<String>,
    },
    AddWorkloadBinding {
        service_account: String,
        binding: Box<WorkloadBinding>,
    },
    GrantRole {
        grant: RoleGrant,
    },
    /// A SAML assertion id is used: refused if it was used before (the
    /// replay cache; entries past `expires_ms` could be pruned).
    UseAssertion {
        issuer: String,
        assertion_id: String,
        expires_ms: i64,
        now_ms: i64,
    },
    RevokeRole {
        role: String,
        principal: String,
    },
    /// A configuration change and its audit event, applied together: when
    /// `change` takes effect, apply appends a `config_change` event naming
    /// `actor`, what changed, and the policy version before and after. The
    /// event's id, producer, sequence number and time are chosen before
    /// proposing, so apply stays deterministic.
    Audited {
        audit: Box<ChangeAudit>,
        change: Box<Command>,
    },
}

/// Who made an audited configuration change, and the fields of its event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeAudit {
    /// The authenticated caller (`admin`, `sa:<name>`, `agent:<name>`, …).
    pub actor: String,
    /// Where the call came from.
    pub client_addr: String,
    /// The actor's issuer and groups when it acted.
    #[serde(default)]
    pub issuer: String,
    #[serde(default)]
    pub groups: Vec<String>,
    pub event_id: String,
    /// The producer (`control-plane-<node>`) and its sequence number.
    pub producer: String,
    pub seq: u64,
    pub now_ms: i64,
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
    #[error("{0}")]
    Unchanged(String),
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

/// One canonical audit event as the agent encoded it. It travels through
/// the log and the peer transport as embedded JSON, not as an escaped
/// string, so it is neither escaped nor unescaped on the way.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RawEvent(pub Box<serde_json::value::RawValue>);

impl RawEvent {
    /// Wraps an encoded event; fails when it is not JSON.
    pub fn new(json: String) -> Result<Self, serde_json::Error> {
        serde_json::value::RawValue::from_string(json).map(Self)
    }

    pub fn as_str(&self) -> &str {
        self.0.get()
    }
}

impl PartialEq for RawEvent {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for RawEvent {}
