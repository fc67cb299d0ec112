//! Typed audit events and their canonical encoding.
//!
//! An audit event is data, not a log line. Every event carries the id the
//! producer chose for it (the control plane de-duplicates on it), the producing
//! agent's sequence number, and the policy version the decision was made under.
//!
//! **Canonical encoding**: compact JSON of [`AuditEvent`] with fields in
//! declaration order, no maps, no floats, and `None` fields omitted. Encoding
//! the same event twice yields the same bytes, so the SHA-256 of the encoding
//! ([`AuditEvent::digest`]) is a stable leaf for the tamper-evident log.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A client session reached the target (or was refused on the way).
    SessionStart,
    /// One simple-protocol query message and what it returned.
    Statement,
    /// The session ended.
    SessionEnd,
    /// A held statement became an access request.
    ApprovalRequested,
    /// A reviewer approved (decision allow) or denied (deny) a request.
    ApprovalReviewed,
    /// An approved grant let a held statement run.
    ApprovalUsed,
    /// A request expired undecided; its statement did not run.
    ApprovalExpired,
    /// A recording's objects were deleted by retention.
    RecordingDeleted,
    /// A recording was put under legal hold (allow) or released (deny).
    LegalHold,
    /// A new session was refused because its recording could not be made
    /// durable (spool full or below its free-space threshold).
    RecordingRefused,
    /// The configuration changed (service accounts, keys, targets, rules,
    /// the policy document, agents, enrollment and join tokens, cluster
    /// membership, legal holds): the actor, what changed, and the policy
    /// version before and after.
    ConfigChange,
    /// A login: an OIDC code or device flow, a token exchange, or a
    /// credential on the API (allow: a token was issued; deny: refused,
    /// with the check that failed).
    Login,
    /// An API call that was refused for the caller's roles (deny), made
    /// with the break-glass admin token, or an auditor's read (allow).
    ApiCall,
    /// Logins refused because their source or subject failed too often;
    /// one event per source and interval, with the count.
    LoginThrottled,
    /// A running session was ended from outside: killed by an operator,
    /// its identity revoked, or the rule that admitted it removed; the
    /// detail names who and why.
    SessionKilled,
    /// An SSH command line: an exec request, or a line detected in an
    /// interactive shell; allowed, refused or held, with the rule; its
    /// exit status in the outcome once it ended.
    Command,
    /// A file operation over SFTP or scp: the operation, the path, the
    /// bytes moved and, for whole files, their SHA-256.
    FileTransfer,
    /// A forwarded connection or a forwarding request (a local or remote
    /// port, an agent, X11): opened or refused, with its bytes when it
    /// closed.
    Forward,
}

/// The outcome of the policy decision for the action.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Allow,
    Deny,
}

/// What the target returned for a statement.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// Command tags in order (`SELECT 3`, `INSERT 0 1`, ...).
    pub command_tags: Vec<String>,
    /// Rows returned or affected, summed over the command tags.
    pub rows: u64,
    /// SQLSTATE of the error the target returned, if any.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error_code: Option<String>,
}

/// One audit event. See the module docs for the canonical encoding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Unique id chosen by the producer (32 lowercase hex digits).
    pub id: String,
    /// The agent that produced the event.
    pub agent: String,
    /// Per-agent sequence number, strictly increasing across restarts.
    pub seq: u64,
    /// Unix time in milliseconds when the event happened.
    pub time_ms: i64,
    pub kind: EventKind,
    pub session_id: String,
    /// The caller, as verified by the control plane (`sa:<name>` for service accounts).
    pub identity: String,
    /// Who vouched for the identity: the provider's issuer URL for a
    /// person, `gatehouse` for a service account.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub issuer: Option<String>,
    /// The identity's groups when the decision was made.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub groups: Option<Vec<String>>,
    pub target: String,
    /// Hash of the policy the decision was made under.
    pub policy_version: String,
    pub decision: Decision,
    /// Statement text for [`EventKind::Statement`].
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub statement: Option<String>,
    /// Bound parameters of an extended-protocol statement, rendered as
    /// text (`null` for SQL NULL).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub parameters: Option<Vec<Option<String>>>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub outcome: Option<Outcome>,
    /// Free text for session start/end (reason, upstream error).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub detail: Option<String>,
    /// Values masked in the statement's results, per detector, in the
    /// order first seen (counts only, never the values).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub masked: Option<Vec<MaskCount>>,
}

/// How many values one detector masked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaskCount {
    pub detector: String,
    pub count: u64,
}

/// An encoded event did not decode.
#[derive(Debug, thiserror::Error)]
#[error("malformed audit event: {0}")]
pub struct DecodeError(#[from] serde_json::Error);

// === impl AuditEvent ===

impl AuditEvent {
    /// The canonical encoding (see module docs).
    pub fn encode(&self) -> Vec<u8> {
        // Serializing a struct of strings, integers and enums cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes and re-checks that the input was canonical.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        Ok(serde_json::from_slice(bytes)?)
    }

    /// SHA-256 of the canonical encoding, lowercase hex.
    pub fn digest(&self) -> String {
        hex::encode(Sha256::digest(self.encode()))
    }
}

/// Rows counted by a PostgreSQL command tag (`SELECT 3` → 3, `INSERT 0 5` → 5,
/// `CREATE TABLE` → 0).
pub fn rows_of_command_tag(tag: &str) -> u64 {
    tag.rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> AuditEvent {
        AuditEvent {
            id: "00".repeat(16),
            agent: "edge-1".into(),
            seq: 7,
            time_ms: 1_700_000_000_000,
            kind: EventKind::Statement,
            session_id: "s1".into(),
            identity: "sa:ci".into(),
            issuer: None,
            groups: None,
            target: "orders".into(),
            policy_version: "abc".into(),
            decision: Decision::Allow,
            statement: Some("select 1".into()),
            parameters: None,
            outcome: Some(Outcome {
                command_tags: vec!["SELECT 1".into()],
                rows: 1,
                error_code: None,
            }),
            detail: None,
            masked: None,
        }
    }

    #[test]
    fn encoding_is_stable_and_round_trips() {
        let e = sample();
        let bytes = e.encode();
        assert_eq!(bytes, sample().encode());
        assert_eq!(AuditEvent::decode(&bytes).unwrap(), e);
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            r#"{"id":"00000000000000000000000000000000","agent":"edge-1","seq":7,"time_ms":1700000000000,"kind":"statement","session_id":"s1","identity":"sa:ci","target":"orders","policy_version":"abc","decision":"allow","statement":"select 1","outcome":{"command_tags":["SELECT 1"],"rows":1}}"#
        );
    }

    #[test]
    fn digest_changes_with_content() {
        let mut e = sample();
        let d = e.digest();
        e.statement = Some("select 2".into());
        assert_ne!(d, e.digest());
    }

    #[test]
    fn command_tag_rows() {
        assert_eq!(rows_of_command_tag("SELECT 3"), 3);
        assert_eq!(rows_of_command_tag("INSERT 0 5"), 5);
        assert_eq!(rows_of_command_tag("CREATE TABLE"), 0);
        assert_eq!(rows_of_command_tag(""), 0);
    }
}
