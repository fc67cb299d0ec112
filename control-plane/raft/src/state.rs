//! Entities of the control-plane state and the deterministic apply.
//!
//! All state lives in redb tables so that a restart does not replay the log:
//! `kv` holds the entities as JSON under typed key prefixes, `audit` the
//! canonical audit events in log order, `audit_ids` the de-duplication index,
//! and `agent_seq` the highest committed sequence number per agent.

use redb::{ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::identity::key as ikey;
use crate::types::{Command, CommandResult, RawEvent, Rejection};

pub(crate) const KV: TableDefinition<&str, &str> = TableDefinition::new("kv");
pub(crate) const AUDIT: TableDefinition<u64, &str> = TableDefinition::new("audit");
pub(crate) const AUDIT_IDS: TableDefinition<&str, u64> = TableDefinition::new("audit_ids");
pub(crate) const AGENT_SEQ: TableDefinition<&str, u64> = TableDefinition::new("agent_seq");

/// A caller that is not a person: CI jobs, scripts, AI agents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceAccount {
    pub name: String,
    pub groups: Vec<String>,
    pub created_ms: i64,
    pub keys: Vec<ApiKeyHash>,
}

/// An API key is `ghk_<key id>_<secret>`; only the secret's SHA-256 is kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyHash {
    pub key_id: String,
    pub sha256: String,
}

/// Something callers reach through an agent. Never holds credentials.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub name: String,
    pub kind: String,
    pub agent: String,
    pub default_db_user: String,
    pub created_ms: i64,
}

/// Access rule: `subject` (`sa:<name>` or `group:<name>`) may use `target`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub id: String,
    pub subject: String,
    pub target: String,
    pub created_ms: i64,
    /// The longest a session it admits may last (none when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_session_secs: Option<u64>,
    /// How long a session it admits may sit idle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_secs: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Agent {
    pub name: String,
    pub cert_serial: String,
    pub enrolled_ms: i64,
    pub revoked: bool,
    /// SEC1 public key (hex) recordings' manifests are signed with.
    #[serde(default)]
    pub public_key: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentToken {
    pub agent: String,
    pub created_ms: i64,
    pub expires_ms: i64,
    pub used_ms: Option<i64>,
}

/// Single-use token for a node to join.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    pub node_id: u64,
    pub created_ms: i64,
    pub expires_ms: i64,
    pub used_ms: Option<i64>,
}

/// One entry of the sessions index.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub id: String,
    pub identity: String,
    pub target: String,
    pub agent: String,
    pub database: String,
    pub db_user: String,
    pub client_addr: String,
    pub policy_version: String,
    pub started_ms: i64,
    pub ended_ms: Option<i64>,
    pub end_reason: Option<String>,
    pub recording_key: Option<String>,
    pub recording_sha256: Option<String>,
    pub recording_size: Option<u64>,
    /// The secret of the BackendKeyData the client was given, chosen by the
    /// gateway; the process id next to it is the target's own. A client's
    /// CancelRequest is routed by it.
    #[serde(default)]
    pub cancel_secret: Option<i32>,
    /// Object keys of the recording's chunks.
    #[serde(default)]
    pub chunk_keys: Vec<String>,
    /// The node whose ingress the client is connected to.
    #[serde(default)]
    pub node: u64,
    /// The identity's groups when the session opened (for re-judging it
    /// against changed rules).
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub recording_events: u64,
    /// Legal hold: retention never deletes the recording.
    #[serde(default)]
    pub legal_hold: Option<String>,
    #[serde(default)]
    pub recording_deleted_ms: Option<i64>,
    /// Retention deleted every object (until then the sweep retries).
    #[serde(default)]
    pub recording_purged: bool,
}

/// A held statement waiting for (or granted) human approval.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessRequest {
    pub id: String,
    pub requester: String,
    /// The requester's issuer and groups when it asked.
    #[serde(default)]
    pub requester_issuer: String,
    #[serde(default)]
    pub requester_groups: Vec<String>,
    pub target: String,
    pub session_id: String,
    pub statement: String,
    pub statement_sha256: String,
    pub rule: String,
    pub policy_version: String,
    pub reason: String,
    pub created_ms: i64,
    /// Undecided after this, it has expired.
    pub expires_ms: i64,
    pub approvals_required: u32,
    /// Reviewers must be in one of these (anyone but the requester when empty).
    pub approver_groups: Vec<String>,
    /// 0: this exact statement, once; N: any statement on the target for N
    /// minutes after approval.
    pub grant_minutes: u32,
    pub approvals: Vec<Review>,
    pub denial: Option<Review>,
    /// When a one-time grant was used.
    pub used_ms: Option<i64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Review {
    pub identity: String,
    pub reason: String,
    pub at_ms: i64,
}

impl AccessRequest {
    /// When the last needed approval came, if it has.
    pub fn approved_ms(&self) -> Option<i64> {
        let need = self.approvals_required.max(1) as usize;
        (self.denial.is_none() && self.approvals.len() >= need)
            .then(|| self.approvals.get(need - 1).map_or(0, |r| r.at_ms))
    }

    /// Where the request stands at `now_ms`.
    pub fn state(&self, now_ms: i64) -> RequestState {
        if self.denial.is_some() {
            return RequestState::Denied;
        }
        if self.used_ms.is_some() {
            return RequestState::Used;
        }
        match self.approved_ms() {
            Some(at) if self.grant_minutes > 0 => {
                if now_ms < at + i64::from(self.grant_minutes) * 60_000 {
                    RequestState::Approved
                } else {
                    RequestState::Expired
                }
            }
            Some(_) => RequestState::Approved,
            None if now_ms >= self.expires_ms => RequestState::Expired,
            None => RequestState::Pending,
        }
    }
}

/// Where an access request stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestState {
    Pending,
    /// A grant that may be used (now, for a time-bound one).
    Approved,
    Denied,
    /// Undecided past its expiry, or a time-bound grant past its minutes.
    Expired,
    /// A one-time grant already used.
    Used,
}

impl RequestState {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestState::Pending => "pending",
            RequestState::Approved => "approved",
            RequestState::Denied => "denied",
            RequestState::Expired => "expired",
            RequestState::Used => "used",
        }
    }
}

impl std::fmt::Display for RequestState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One applied policy document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRecord {
    /// Position in the history, from 1.
    pub seq: u64,
    /// SHA-256 of `canonical` (16 hex digits).
    pub doc_version: String,
    /// The document as the admin wrote it (for show and diff).
    pub yaml: String,
    /// The parsed document's canonical JSON (what agents enforce).
    pub canonical: String,
    pub author: String,
    pub applied_ms: i64,
}

/// The cluster's key material.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterKeys {
    pub ca_cert_pem: String,
    pub ca_key_sealed: String,
    pub created_ms: i64,
}

pub(crate) mod key {
    pub const CLUSTER: &str = "cluster";
    pub const POLICY_VERSION: &str = "policy_version";
    pub fn request(id: &str) -> String {
        format!("request/{id}")
    }
    /// The policy document in force.
    pub const POLICY_CURRENT: &str = "policy/current";
    /// Every applied document, by sequence number.
    pub fn policy(seq: u64) -> String {
        format!("policy/h/{seq:020}")
    }
    pub fn sa(name: &str) -> String {
        format!("sa/{name}")
    }
    pub fn target(name: &str) -> String {
        format!("target/{name}")
    }
    pub fn revoked(identity: &str) -> String {
        format!("revoked/{identity}")
    }
    pub fn rule(id: &str) -> String {
        format!("rule/{id}")
    }
    pub fn agent(name: &str) -> String {
        format!("agent/{name}")
    }
    pub fn enroll(hash: &str) -> String {
        format!("enroll/{hash}")
    }
    pub fn join(hash: &str) -> String {
        format!("join/{hash}")
    }
    pub fn session(id: &str) -> String {
        format!("session/{id}")
    }
    /// Live sessions by the secret of the client's cancel key (several
    /// sessions may share a secret; the agent checks the process id).
    pub fn cancel(secret: i32, session: &str) -> String {
        format!("{}{session}", cancel_prefix(secret))
    }
    pub fn cancel_prefix(secret: i32) -> String {
        format!("cancel/{secret}/")
    }
}

/// A storage failure while applying; aborts the apply (the entry is retried
/// after restart, never half-applied).
pub(crate) type ApplyResult<T> = Result<T, redb::Error>;

/// Applies one command inside the caller's write transaction.
pub(crate) fn apply(txn: &WriteTransaction, cmd: &Command) -> ApplyResult<CommandResult> {
    let mut kv = txn.open_table(KV)?;
    let res = match cmd {
        Command::InitCluster {
            ca_cert_pem,
            ca_key_sealed,
            now_ms,
        } => {
            if kv.get(key::CLUSTER)?.is_none() {
                put(
                    &mut kv,
                    key::CLUSTER,
                    &ClusterKeys {
                        ca_cert_pem: ca_cert_pem.clone(),
                        ca_key_sealed: ca_key_sealed.clone(),
                        created_ms: *now_ms,
                    },
                )?;
                let version = policy_version(&kv)?;
                kv.insert(key::POLICY_VERSION, version.as_str())?;
            }
            CommandResult::Ok
        }
        Command::CreateServiceAccount {
            name,
            groups,
            key_id,
            key_sha256,
            now_ms,
        } => {
            let k = key::sa(name);
            if kv.get(k.as_str())?.is_some() {
                return Ok(reject(Rejection::AlreadyExists(format!(
                    "service account {name}"
                ))));
            }
            let sa = ServiceAccount {
                name: name.clone(),
                groups: groups.clone(),
                created_ms: *now_ms,
                keys: vec![ApiKeyHash {
                    key_id: key_id.clone(),
                    sha256: key_sha256.clone(),
                }],
            };
            put(&mut kv, &k, &sa)?;
            CommandResult::Ok
        }
        Command::CreateTarget { target } => {
            let k = key::target(&target.name);
            if kv.get(k.as_str())?.is_some() {
                return Ok(reject(Rejection::AlreadyExists(format!(
                    "target {}",
                    target.name
                ))));
            }
            put(&mut kv, &k, target)?;
            CommandResult::Ok
        }
        Command::CreateRule { rule } => {
            if kv.get(key::target(&rule.target).as_str())?.is_none() {
                return Ok(reject(Rejection::NotFound(format!(
                    "target {}",
                    rule.target
                ))));
            }
            put(&mut kv, &key::rule(&rule.id), rule)?;
            let version = policy_version(&kv)?;
            kv.insert(key::POLICY_VERSION, version.as_str())?;
            CommandResult::Ok
        }
        Command::DeleteRule { id } => {
            if kv.remove(key::rule(id).as_str())?.is_none() {
                return Ok(reject(Rejection::NotFound(format!("access rule {id}"))));
            }
            let version = policy_version(&kv)?;
            kv.insert(key::POLICY_VERSION, version.as_str())?;
            CommandResult::Ok
        }
        Command::RevokeIdentity {
            identity,
            at_ms,
            key_id,
            ..
        } => {
            if let Some(name) = identity.strip_prefix("sa:") {
                let k = key::sa(name);
                let Some(mut sa) = get::<ServiceAccount>(&kv, &k)? else {
                    return Ok(reject(Rejection::NotFound(format!(
                        "service account {name}"
                    ))));
                };
                match key_id {
                    Some(id) => {
                        let before = sa.keys.len();
                        sa.keys.retain(|k| &k.key_id != id);
                        if sa.keys.len() == before {
                            return Ok(reject(Rejection::NotFound(format!(
                                "API key {id} of service account {name}"
                            ))));
                        }
                    }
                    None => sa.keys.clear(),
                }
                put(&mut kv, &k, &sa)?;
            } else if key_id.is_some() {
                return Ok(reject(Rejection::NotFound(format!(
                    "API keys of {identity} (only service accounts have them)"
                ))));
            }
            if key_id.is_none() {
                put(&mut kv, &key::revoked(identity), at_ms)?;
            }
            CommandResult::Ok
        }
        Command::ApplyPolicy { policy } => {
            let current: Option<PolicyRecord> = get(&kv, key::POLICY_CURRENT)?;
            if current.as_ref().map(|c| &c.doc_version) == Some(&policy.doc_version) {
                return Ok(reject(Rejection::Unchanged(format!(
                    "policy {} is already in force",
                    policy.doc_version
                ))));
            }
            let mut p = (**policy).clone();
            p.seq = current.map_or(1, |c| c.seq + 1);
            put(&mut kv, &key::policy(p.seq), &p)?;
            put(&mut kv, key::POLICY_CURRENT, &p)?;
            let version = policy_version(&kv)?;
            kv.insert(key::POLICY_VERSION, version.as_str())?;
            CommandResult::Ok
        }
        Command::CreateAccessRequest { request } => {
            let k = key::request(&request.id);
            if kv.get(k.as_str())?.is_some() {
                return Ok(reject(Rejection::AlreadyExists(format!(
                    "access request {}",
                    request.id
                ))));
            }
            put(&mut kv, &k, request)?;
            CommandResult::Ok
        }
        Command::ReviewAccessRequest {
            id,
            reviewer,
            reviewer_groups,
            approve,
            reason,
            now_ms,
        } => {
            let k = key::request(id);
            let Some(mut r) = get::<AccessRequest>(&kv, &k)? else {
                return Ok(reject(Rejection::NotFound(format!("access request {id}"))));
            };
            let refuse = |m: String| Ok(reject(Rejection::Invalid(m)));
            if *reviewer == r.requester {
                return refuse(format!("{reviewer} requested {id} and cannot review it"));
            }
            if !r.approver_groups.is_empty()
                && !r
                    .approver_groups
                    .iter()
                    .any(|g| reviewer_groups.contains(g))
            {
                return refuse(format!(
                    "{reviewer} is not in an approver group of {id} ({})",
                    r.approver_groups.join(", ")
                ));
            }
            let state = r.state(*now_ms);
            if state != RequestState::Pending {
                return refuse(format!("access request {id} is {state}"));
            }
            if r.approvals.iter().any(|a| a.identity == *reviewer) {
                return refuse(format!("{reviewer} has already approved {id}"));
            }
            let review = Review {
                identity: reviewer.clone(),
                reason: reason.clone(),
                at_ms: *now_ms,
            };
            if *approve {
                r.approvals.push(review);
            } else {
                r.denial = Some(review);
            }
            put(&mut kv, &k, &r)?;
            CommandResult::Ok
        }
        Command::UseAccessRequest { id, now_ms } => {
            let k = key::request(id);
            let Some(mut r) = get::<AccessRequest>(&kv, &k)? else {
                return Ok(reject(Rejection::NotFound(format!("access request {id}"))));
            };
            let state = r.state(*now_ms);
            if state != RequestState::Approved {
                return Ok(reject(Rejection::Invalid(format!(
                    "access request {id} is {state}"
                ))));
            }
            if r.grant_minutes == 0 {
                r.used_ms = Some(*now_ms);
                put(&mut kv, &k, &r)?;
            }
            CommandResult::Ok
        }
        Command::CreateEnrollmentToken {
            token_sha256,
            agent,
            expires_ms,
            now_ms,
        } => {
            let tok = EnrollmentToken {
                agent: agent.clone(),
                created_ms: *now_ms,
                expires_ms: *expires_ms,
                used_ms: None,
            };
            put(&mut kv, &key::enroll(token_sha256), &tok)?;
            CommandResult::Ok
        }
        Command::ConsumeEnrollmentToken {
            token_sha256,
            agent,
            cert_serial,
            public_key,
            now_ms,
        } => {
            let k = key::enroll(token_sha256);
            let Some(mut tok) = get::<EnrollmentToken>(&kv, &k)? else {
                return Ok(reject(Rejection::NotFound("enrollment token".into())));
            };
            if tok.used_ms.is_some() {
                return Ok(reject(Rejection::TokenUsed));
            }
            if *now_ms >= tok.expires_ms {
                return Ok(reject(Rejection::TokenExpired));
            }
            if tok.agent != *agent {
                return Ok(reject(Rejection::TokenWrongAgent));
            }
            tok.used_ms = Some(*now_ms);
            put(&mut kv, &k, &tok)?;
            put(
                &mut kv,
                &key::agent(agent),
                &Agent {
                    name: agent.clone(),
                    cert_serial: cert_serial.clone(),
                    enrolled_ms: *now_ms,
                    revoked: false,
                    public_key: public_key.clone(),
                },
            )?;
            CommandResult::Ok
        }
        Command::CreateJoinToken {
            token_sha256,
            node_id,
            expires_ms,
            now_ms,
        } => {
            let tok = JoinToken {
                node_id: *node_id,
                created_ms: *now_ms,
                expires_ms: *expires_ms,
                used_ms: None,
            };
            put(&mut kv, &key::join(token_sha256), &tok)?;
            CommandResult::Ok
        }
        Command::ConsumeJoinToken {
            token_sha256,
            node_id,
            now_ms,
        } => {
            let k = key::join(token_sha256);
            let Some(mut tok) = get::<JoinToken>(&kv, &k)? else {
                return Ok(reject(Rejection::NotFound("join token".into())));
            };
            if tok.used_ms.is_some() {
                return Ok(reject(Rejection::TokenUsed));
            }
            if *now_ms >= tok.expires_ms {
                return Ok(reject(Rejection::TokenExpired));
            }
            if tok.node_id != *node_id {
                return Ok(reject(Rejection::Invalid(format!(
                    "join token is bound to node {}",
                    tok.node_id
                ))));
            }
            tok.used_ms = Some(*now_ms);
            put(&mut kv, &k, &tok)?;
            CommandResult::Ok
        }
        Command::AppendAudit { agent, events } => {
            drop(kv);
            append_audit(txn, agent, events)?
        }
        Command::SessionOpened { session } => {
            put(&mut kv, &key::session(&session.id), session)?;
            if let Some(secret) = session.cancel_secret {
                put(&mut kv, &key::cancel(secret, &session.id), &session.id)?;
            }
            CommandResult::Ok
        }
        Command::SessionClosed {
            session_id,
            ended_ms,
            end_reason,
            recording_key,
            recording_sha256,
            recording_size,
            chunk_keys,
            events,
        } => {
            let mut cancel = None;
            let r = update_session(&mut kv, session_id, |s| {
                // An ended session, with or without a recording, can no
                // longer be cancelled.
                cancel = s.cancel_secret;
                if recording_key.is_empty() {
                    // Ended without a recording (refused before it started);
                    // a recording already committed is never replaced.
                    if s.recording_key.is_none() {
                        s.ended_ms = Some(*ended_ms);
                        s.end_reason = Some(end_reason.clone());
                    }
                    return Ok(());
                }
                s.ended_ms = Some(*ended_ms);
                s.end_reason = Some(end_reason.clone());
                s.recording_key = Some(recording_key.clone());
                s.recording_sha256 = Some(recording_sha256.clone());
                s.recording_size = Some(*recording_size);
                s.chunk_keys = chunk_keys.clone();
                s.recording_events = *events;
                Ok(())
            })?;
            if let Some(secret) = cancel {
                kv.remove(key::cancel(secret, session_id).as_str())?;
            }
            r
        }
        Command::SetLegalHold {
            session_id,
            hold,
            reason,
        } => update_session(&mut kv, session_id, |s| {
            s.legal_hold = hold.then(|| reason.clone());
            Ok(())
        })?,
        Command::RecordingDeleted { session_id, now_ms } => {
            update_session(&mut kv, session_id, |s| {
                if s.legal_hold.is_some() {
                    return Err(Rejection::Invalid(format!(
                        "session {session_id} is under legal hold"
                    )));
                }
                s.recording_deleted_ms = Some(*now_ms);
                Ok(())
            })?
        }
        Command::RecordingPurged { session_id } => update_session(&mut kv, session_id, |s| {
            s.recording_purged = true;
            Ok(())
        })?,
        Command::PutIssuer { issuer } => {
            put(&mut kv, &ikey::issuer(&issuer.name), issuer)?;
            CommandResult::Ok
        }
        Command::DeleteIssuer { name } => {
            if kv.remove(ikey::issuer(name).as_str())?.is_none() {
                return Ok(reject(Rejection::NotFound(format!("issuer {name}"))));
            }
            CommandResult::Ok
        }
        // The first proposal wins; every node then reads the same key.
        Command::PutSigningKey { key } | Command::PutSshCaKey { key } => {
            let (prefix, what, k) = match cmd {
                Command::PutSigningKey { .. } => (
                    "signing_key/",
                    "a token-signing key",
                    ikey::signing_key(&key.kid),
                ),
                _ => ("ssh_ca/", "an SSH CA key", ikey::ssh_ca(&key.kid)),
            };
            // Keys under `name/` sort before `name0`.
            let end = format!("{}0", prefix.trim_end_matches('/'));
            if kv
                .range(prefix..end.as_str())?
                .next()
                .transpose()?
                .is_some()
            {
                return Ok(reject(Rejection::AlreadyExists(what.into())));
            }
            put(&mut kv, &k, key)?;
            CommandResult::Ok
        }
        Command::UserLoggedIn { user } => {
            put(&mut kv, &ikey::user(&user.identity), user)?;
            CommandResult::Ok
        }
        Command::SetStaticGroups { identity, groups } => {
            let k = ikey::static_groups(identity);
            if groups.is_empty() {
                kv.remove(k.as_str())?;
            } else {
                put(&mut kv, &k, groups)?;
            }
            CommandResult::Ok
        }
        Command::AddWorkloadBinding {
            service_account,
            binding,
        } => {
            if kv.get(key::sa(service_account).as_str())?.is_none() {
                return Ok(reject(Rejection::NotFound(format!(
                    "service account {service_account}"
                ))));
            }
            if kv.get(ikey::issuer(&binding.issuer).as_str())?.is_none() {
                return Ok(reject(Rejection::NotFound(format!(
                    "issuer {}",
                    binding.issuer
                ))));
            }
            let prefix = format!("binding/{service_account}/");
            let end = format!("{prefix}\u{10FFFF}");
            let n = kv.range(prefix.as_str()..end.as_str())?.count();
            put(&mut kv, &ikey::binding(service_account, n), binding)?;
            CommandResult::Ok
        }
        Command::UseAssertion {
            issuer,
            assertion_id,
            expires_ms,
            ..
        } => {
            let id: String = assertion_id.chars().take(256).collect();
            let k = ikey::assertion(issuer, &id);
            if kv.get(k.as_str())?.is_some() {
                return Ok(reject(Rejection::AlreadyExists(format!("assertion {id}"))));
            }
            put(&mut kv, &k, expires_ms)?;
            CommandResult::Ok
        }
        Command::GrantRole { grant } => {
            put(&mut kv, &ikey::grant(&grant.role, &grant.principal), grant)?;
            CommandResult::Ok
        }
        Command::RevokeRole { role, principal } => {
            if kv.remove(ikey::grant(role, principal).as_str())?.is_none() {
                return Ok(reject(Rejection::NotFound(format!(
                    "role {role} for {principal}"
                ))));
            }
            CommandResult::Ok
        }
        Command::Audited { audit, change } => {
            let before = kv
                .get(key::POLICY_VERSION)?
                .map(|v| v.value().to_string())
                .unwrap_or_default();
            drop(kv);
            if matches!(**change, Command::Audited { .. }) {
                return Ok(reject(Rejection::Invalid("nested audited change".into())));
            }
            let res = apply(txn, change)?;
            if matches!(res, CommandResult::Rejected(_)) {
                return Ok(res);
            }
            let after = txn
                .open_table(KV)?
                .get(key::POLICY_VERSION)?
                .map(|v| v.value().to_string())
                .unwrap_or_default();
            let (target, what) = describe_change(change);
            let ev = gatehouse_audit::AuditEvent {
                id: audit.event_id.clone(),
                agent: audit.producer.clone(),
                seq: audit.seq,
                time_ms: audit.now_ms,
                kind: gatehouse_audit::EventKind::ConfigChange,
                session_id: String::new(),
                identity: audit.actor.clone(),
                issuer: (!audit.issuer.is_empty()).then(|| audit.issuer.clone()),
                groups: (!audit.issuer.is_empty()).then(|| audit.groups.clone()),
                target,
                policy_version: after.clone(),
                decision: gatehouse_audit::Decision::Allow,
                statement: None,
                parameters: None,
                outcome: None,
                detail: Some(format!(
                    "{what}; by {} from {}; policy version {} -> {}",
                    audit.actor,
                    audit.client_addr,
                    if before.is_empty() { "-" } else { &before },
                    if after.is_empty() { "-" } else { &after },
                )),
                masked: None,
            };
            let raw = RawEvent::new(String::from_utf8_lossy(&ev.encode()).into_owned())
                .map_err(corrupt)?;
            append_audit(txn, &audit.producer, &[raw])?;
            res
        }
    };
    Ok(res)
}

/// What an audited change changed, in words, and the target it concerns.
/// Never includes a secret: keys and tokens appear as their ids or hashes'
/// first digits only.
fn describe_change(cmd: &Command) -> (String, String) {
    let short = |h: &str| h.chars().take(12).collect::<String>();
    match cmd {
        Command::CreateServiceAccount {
            name,
            groups,
            key_id,
            ..
        } => (
            String::new(),
            format!(
                "created service account sa:{name} (groups [{}], API key id {key_id})",
                groups.join(", ")
            ),
        ),
        Command::CreateTarget { target } => (
            target.name.clone(),
            format!(
                "created target {} ({}, served by agent {}, default role {:?})",
                target.name, target.kind, target.agent, target.default_db_user
            ),
        ),
        Command::CreateRule { rule } => (
            rule.target.clone(),
            format!(
                "created access rule {}: {} may use {}",
                rule.id, rule.subject, rule.target
            ),
        ),
        Command::ApplyPolicy { policy } => (
            String::new(),
            format!("applied policy document {}", policy.doc_version),
        ),
        Command::CreateEnrollmentToken {
            token_sha256,
            agent,
            expires_ms,
            ..
        } => (
            String::new(),
            format!(
                "created enrollment token {} for agent {agent}, expiring at {expires_ms} ms",
                short(token_sha256)
            ),
        ),
        Command::ConsumeEnrollmentToken {
            token_sha256,
            agent,
            cert_serial,
            ..
        } => (
            String::new(),
            format!(
                "enrolled agent {agent} with token {} (certificate serial {cert_serial})",
                short(token_sha256)
            ),
        ),
        Command::CreateJoinToken {
            token_sha256,
            node_id,
            expires_ms,
            ..
        } => (
            String::new(),
            format!(
                "created join token {} for node {node_id}, expiring at {expires_ms} ms",
                short(token_sha256)
            ),
        ),
        Command::ConsumeJoinToken {
            token_sha256,
            node_id,
            ..
        } => (
            String::new(),
            format!(
                "admitted node {node_id} with join token {}",
                short(token_sha256)
            ),
        ),
        Command::PutIssuer { issuer } => (
            String::new(),
            format!(
                "put trusted issuer {} ({}, {}, client {})",
                issuer.name, issuer.kind, issuer.issuer_url, issuer.client_id
            ),
        ),
        Command::DeleteIssuer { name } => (String::new(), format!("deleted issuer {name}")),
        Command::DeleteRule { id } => (String::new(), format!("deleted access rule {id}")),
        Command::RevokeIdentity {
            identity,
            reason,
            key_id,
            ..
        } => (
            String::new(),
            match key_id {
                Some(id) => format!("revoked API key {id} of {identity}: {reason}"),
                None => format!("revoked {identity} (its tokens and API keys): {reason}"),
            },
        ),
        Command::SetStaticGroups { identity, groups } => (
            String::new(),
            format!("set static groups of {identity} to [{}]", groups.join(", ")),
        ),
        Command::AddWorkloadBinding {
            service_account,
            binding,
        } => (
            String::new(),
            format!(
                "bound tokens of issuer {} with subject {:?} and audience {:?} to sa:{service_account}",
                binding.issuer, binding.subject, binding.audience
            ),
        ),
        Command::GrantRole { grant } => (
            String::new(),
            format!("granted role {} to {}", grant.role, grant.principal),
        ),
        Command::RevokeRole { role, principal } => (
            String::new(),
            format!("revoked role {role} from {principal}"),
        ),
        _ => (String::new(), "changed the configuration".into()),
    }
}

fn append_audit(
    txn: &WriteTransaction,
    agent: &str,
    events: &[RawEvent],
) -> ApplyResult<CommandResult> {
    /// What apply needs of an event; the rest is stored as it came.
    #[derive(serde::Deserialize)]
    struct Key<'a> {
        #[serde(borrow)]
        id: std::borrow::Cow<'a, str>,
        seq: u64,
    }
    let mut audit = txn.open_table(AUDIT)?;
    let mut ids = txn.open_table(AUDIT_IDS)?;
    let mut seqs = txn.open_table(AGENT_SEQ)?;
    let mut next = audit.last()?.map(|(k, _)| k.value() + 1).unwrap_or(0);
    let mut high = seqs.get(agent)?.map(|v| v.value()).unwrap_or(0);
    let (mut appended, mut duplicates) = (0, 0);
    for raw in events {
        // The agent's connection is authenticated; an event that does not
        // decode or names another agent is dropped by the ingest path before
        // it gets here, so decoding here cannot diverge between members.
        let Ok(ev) = serde_json::from_str::<Key>(raw.as_str()) else {
            continue;
        };
        if ids.get(ev.id.as_ref())?.is_some() {
            duplicates += 1;
        } else {
            audit.insert(next, raw.as_str())?;
            ids.insert(ev.id.as_ref(), next)?;
            next += 1;
            appended += 1;
        }
        high = high.max(ev.seq);
    }
    seqs.insert(agent, high)?;
    Ok(CommandResult::AuditAppended {
        appended,
        duplicates,
        high_water: high,
    })
}

/// SHA-256 over the sorted access rules and the policy document's version:
/// the version every decision cites.
fn policy_version(kv: &redb::Table<&str, &str>) -> ApplyResult<String> {
    let mut h = Sha256::new();
    if let Some(p) = get::<PolicyRecord>(kv, key::POLICY_CURRENT)? {
        h.update(p.doc_version.as_bytes());
        h.update([1]);
    }
    for item in kv.range("rule/".."rule0")? {
        let (_, v) = item?;
        let r: Rule = serde_json::from_str(v.value()).map_err(corrupt)?;
        h.update(r.subject.as_bytes());
        h.update([0]);
        h.update(r.target.as_bytes());
        h.update([0]);
    }
    Ok(hex::encode(h.finalize()).chars().take(16).collect())
}

/// Applies `change` to a session's index entry; a rejection writes nothing.
fn update_session(
    kv: &mut redb::Table<&str, &str>,
    session_id: &str,
    change: impl FnOnce(&mut SessionRecord) -> Result<(), Rejection>,
) -> ApplyResult<CommandResult> {
    let k = key::session(session_id);
    let Some(mut s) = get::<SessionRecord>(kv, &k)? else {
        return Ok(reject(Rejection::NotFound(format!("session {session_id}"))));
    };
    if let Err(r) = change(&mut s) {
        return Ok(reject(r));
    }
    put(kv, &k, &s)?;
    Ok(CommandResult::Ok)
}

fn reject(r: Rejection) -> CommandResult {
    CommandResult::Rejected(r)
}

fn put<T: Serialize>(kv: &mut redb::Table<&str, &str>, k: &str, v: &T) -> ApplyResult<()> {
    let s = serde_json::to_string(v).map_err(corrupt)?;
    kv.insert(k, s.as_str())?;
    Ok(())
}

pub(crate) fn get<T: serde::de::DeserializeOwned>(
    kv: &impl ReadableTable<&'static str, &'static str>,
    k: &str,
) -> ApplyResult<Option<T>> {
    match kv.get(k)? {
        None => Ok(None),
        Some(v) => serde_json::from_str(v.value()).map(Some).map_err(corrupt),
    }
}

pub(crate) fn corrupt(e: serde_json::Error) -> redb::Error {
    redb::Error::Corrupted(format!("undecodable state value: {e}"))
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}
