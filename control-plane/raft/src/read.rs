//! Queries over the applied state.
//!
//! These read the local member's applied state. On a single node that is the
//! committed state; reads that decide access across a cluster will go through
//! a linearizable read first.

use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata};
use subtle::ConstantTimeEq;

use crate::identity::key as ikey;
use crate::identity::{Issuer, RoleGrant, SigningKey, User, WorkloadBinding};
use crate::state::{
    self, AGENT_SEQ, AUDIT, AccessRequest, Agent, ClusterKeys, KV, PolicyRecord, Rule,
    ServiceAccount, SessionRecord, Target, key,
};

/// Reading the state failed (the database is unreadable or corrupt).
#[derive(Debug, thiserror::Error)]
#[error("reading control-plane state: {0}")]
pub struct ReadError(#[from] redb::Error);

/// Filter for [`StateReader::audit_events`].
#[derive(Clone, Debug, Default)]
pub struct AuditFilter {
    pub identity: Option<String>,
    pub target: Option<String>,
    pub session_id: Option<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    pub limit: Option<usize>,
}

/// Read access to the applied state.
#[derive(Clone)]
pub struct StateReader {
    db: Arc<Database>,
}

fn err(e: impl Into<redb::Error>) -> ReadError {
    ReadError(e.into())
}

// === impl StateReader ===

impl StateReader {
    pub fn new(db: Arc<Database>) -> Self {
        Self { db }
    }

    fn get<T: serde::de::DeserializeOwned>(&self, k: &str) -> Result<Option<T>, ReadError> {
        let txn = self.db.begin_read().map_err(err)?;
        let kv = txn.open_table(KV).map_err(err)?;
        Ok(state::get(&kv, k)?)
    }

    fn list<T: serde::de::DeserializeOwned>(&self, prefix: &str) -> Result<Vec<T>, ReadError> {
        let txn = self.db.begin_read().map_err(err)?;
        let kv = txn.open_table(KV).map_err(err)?;
        let end = format!("{}\u{10FFFF}", prefix);
        let mut out = Vec::new();
        for item in kv.range(prefix..end.as_str()).map_err(err)? {
            let (_, v) = item.map_err(err)?;
            out.push(serde_json::from_str(v.value()).map_err(state::corrupt)?);
        }
        Ok(out)
    }

    pub fn cluster_keys(&self) -> Result<Option<ClusterKeys>, ReadError> {
        self.get(key::CLUSTER)
    }

    pub fn policy_version(&self) -> Result<String, ReadError> {
        let txn = self.db.begin_read().map_err(err)?;
        let kv = txn.open_table(KV).map_err(err)?;
        Ok(kv
            .get(key::POLICY_VERSION)
            .map_err(err)?
            .map(|v| v.value().to_string())
            .unwrap_or_default())
    }

    pub fn service_account(&self, name: &str) -> Result<Option<ServiceAccount>, ReadError> {
        self.get(&key::sa(name))
    }

    pub fn service_accounts(&self) -> Result<Vec<ServiceAccount>, ReadError> {
        self.list("sa/")
    }

    /// Verifies an API key (`ghk_<key id>_<secret>`); returns the account.
    pub fn verify_api_key(&self, api_key: &str) -> Result<Option<ServiceAccount>, ReadError> {
        let Some((key_id, secret)) = api_key
            .strip_prefix("ghk_")
            .and_then(|rest| rest.split_once('_'))
        else {
            return Ok(None);
        };
        let digest = crate::state::sha256_hex(secret.as_bytes());
        for sa in self.service_accounts()? {
            for k in &sa.keys {
                if k.key_id == key_id && bool::from(k.sha256.as_bytes().ct_eq(digest.as_bytes())) {
                    return Ok(Some(sa));
                }
            }
        }
        Ok(None)
    }

    pub fn issuer(&self, name: &str) -> Result<Option<Issuer>, ReadError> {
        self.get(&ikey::issuer(name))
    }

    pub fn issuers(&self) -> Result<Vec<Issuer>, ReadError> {
        self.list("issuer/")
    }

    /// The token-signing keys, oldest first.
    pub fn signing_keys(&self) -> Result<Vec<SigningKey>, ReadError> {
        let mut keys: Vec<SigningKey> = self.list("signing_key/")?;
        keys.sort_by_key(|k| k.created_ms);
        Ok(keys)
    }

    /// The SSH CA keys, oldest first.
    pub fn ssh_ca_keys(&self) -> Result<Vec<SigningKey>, ReadError> {
        let mut keys: Vec<SigningKey> = self.list("ssh_ca/")?;
        keys.sort_by_key(|k| k.created_ms);
        Ok(keys)
    }

    pub fn users(&self) -> Result<Vec<User>, ReadError> {
        self.list("user/")
    }

    /// Groups an admin added to an identity, beside its provider's.
    pub fn static_groups(&self, identity: &str) -> Result<Vec<String>, ReadError> {
        Ok(self
            .get::<Vec<String>>(&ikey::static_groups(identity))?
            .unwrap_or_default())
    }

    pub fn workload_bindings(&self, sa: &str) -> Result<Vec<WorkloadBinding>, ReadError> {
        self.list(&format!("binding/{sa}/"))
    }

    pub fn role_grants(&self) -> Result<Vec<RoleGrant>, ReadError> {
        self.list("grant/")
    }

    /// Roles held by an identity directly or through one of its groups.
    pub fn roles_of(&self, identity: &str, groups: &[String]) -> Result<Vec<String>, ReadError> {
        let mut roles: Vec<String> = self
            .role_grants()?
            .into_iter()
            .filter(|g| {
                g.principal == identity
                    || g.principal
                        .strip_prefix("group:")
                        .is_some_and(|n| groups.iter().any(|x| x == n))
            })
            .map(|g| g.role)
            .collect();
        roles.sort();
        roles.dedup();
        Ok(roles)
    }

    pub fn target(&self, name: &str) -> Result<Option<Target>, ReadError> {
        self.get(&key::target(name))
    }

    pub fn targets(&self) -> Result<Vec<Target>, ReadError> {
        self.list("target/")
    }

    /// The policy document in force, if one was ever applied.
    pub fn current_policy(&self) -> Result<Option<PolicyRecord>, ReadError> {
        self.get(key::POLICY_CURRENT)
    }

    /// The version decisions cite and the document in force, read together.
    pub fn policy_in_force(&self) -> Result<(String, Option<PolicyRecord>), ReadError> {
        let txn = self.db.begin_read().map_err(err)?;
        let kv = txn.open_table(KV).map_err(err)?;
        let version = kv
            .get(key::POLICY_VERSION)
            .map_err(err)?
            .map(|v| v.value().to_string())
            .unwrap_or_default();
        Ok((version, state::get(&kv, key::POLICY_CURRENT)?))
    }

    pub fn access_request(&self, id: &str) -> Result<Option<AccessRequest>, ReadError> {
        self.get(&key::request(id))
    }

    pub fn access_requests(&self) -> Result<Vec<AccessRequest>, ReadError> {
        self.list("request/")
    }

    /// An approved grant `identity` may use now for `statement_sha256` on
    /// `target`: a time-bound grant for the target, or a one-time grant for
    /// that exact statement not used yet.
    pub fn usable_grant(
        &self,
        identity: &str,
        target: &str,
        statement_sha256: &str,
        now_ms: i64,
    ) -> Result<Option<AccessRequest>, ReadError> {
        Ok(self.access_requests()?.into_iter().find(|r| {
            r.requester == identity
                && r.target == target
                && r.state(now_ms) == state::RequestState::Approved
                && (r.grant_minutes > 0 || r.statement_sha256 == statement_sha256)
        }))
    }

    /// Every applied policy document, oldest first.
    pub fn policy_history(&self) -> Result<Vec<PolicyRecord>, ReadError> {
        self.list("policy/h/")
    }

    pub fn rules(&self) -> Result<Vec<Rule>, ReadError> {
        self.list("rule/")
    }

    /// Whether `identity` (or one of its `groups`) has a rule for `target`.
    /// When an identity was revoked (tokens issued up to then are refused).
    pub fn revoked_at(&self, identity: &str) -> Result<Option<i64>, ReadError> {
        self.get(&crate::state::key::revoked(identity))
    }

    pub fn is_allowed(
        &self,
        identity: &str,
        groups: &[String],
        target: &str,
    ) -> Result<bool, ReadError> {
        Ok(!self.admitting(identity, groups, target)?.is_empty())
    }

    /// The rules that admit `identity` (with `groups`) to `target`.
    pub fn admitting(
        &self,
        identity: &str,
        groups: &[String],
        target: &str,
    ) -> Result<Vec<Rule>, ReadError> {
        Ok(self
            .rules()?
            .into_iter()
            .filter(|r| {
                r.target == target
                    && (r.subject == identity
                        || r.subject
                            .strip_prefix("group:")
                            .is_some_and(|g| groups.iter().any(|x| x == g)))
            })
            .collect())
    }

    /// An enrollment token by the SHA-256 of its secret (checked before
    /// any Raft write, so an invalid token costs no log entry).
    pub fn enrollment_token(
        &self,
        token_sha256: &str,
    ) -> Result<Option<crate::state::EnrollmentToken>, ReadError> {
        self.get(&key::enroll(token_sha256))
    }

    /// A join token by the SHA-256 of its secret.
    pub fn join_token(
        &self,
        token_sha256: &str,
    ) -> Result<Option<crate::state::JoinToken>, ReadError> {
        self.get(&key::join(token_sha256))
    }

    pub fn agent(&self, name: &str) -> Result<Option<Agent>, ReadError> {
        self.get(&key::agent(name))
    }

    pub fn agents(&self) -> Result<Vec<Agent>, ReadError> {
        self.list("agent/")
    }

    pub fn session(&self, id: &str) -> Result<Option<SessionRecord>, ReadError> {
        self.get(&key::session(id))
    }

    /// The live sessions whose client cancel key has this secret (the
    /// agent running each checks the process id against its target's).
    pub fn sessions_by_cancel_secret(&self, secret: i32) -> Result<Vec<SessionRecord>, ReadError> {
        let mut out = Vec::new();
        for id in self.list::<String>(&key::cancel_prefix(secret))? {
            if let Some(s) = self.session(&id)?
                && s.ended_ms.is_none()
                && s.cancel_secret == Some(secret)
            {
                out.push(s);
            }
        }
        Ok(out)
    }

    /// Sessions, newest first.
    pub fn sessions(&self) -> Result<Vec<SessionRecord>, ReadError> {
        let mut s: Vec<SessionRecord> = self.list("session/")?;
        s.sort_by(|a, b| b.started_ms.cmp(&a.started_ms).then(a.id.cmp(&b.id)));
        Ok(s)
    }

    /// Highest audit sequence number of `agent` committed so far.
    pub fn agent_high_water(&self, agent: &str) -> Result<u64, ReadError> {
        let txn = self.db.begin_read().map_err(err)?;
        let t = txn.open_table(AGENT_SEQ).map_err(err)?;
        Ok(t.get(agent).map_err(err)?.map(|v| v.value()).unwrap_or(0))
    }

    pub fn audit_count(&self) -> Result<u64, ReadError> {
        let txn = self.db.begin_read().map_err(err)?;
        let t = txn.open_table(AUDIT).map_err(err)?;
        t.len().map_err(err)
    }

    /// SHA-256 over every entity and every audit event, in key order: equal
    /// on two members exactly when their applied state is equal.
    pub fn digest(&self) -> Result<String, ReadError> {
        use sha2::{Digest, Sha256};
        let txn = self.db.begin_read().map_err(err)?;
        let mut h = Sha256::new();
        for item in txn.open_table(KV).map_err(err)?.iter().map_err(err)? {
            let (k, v) = item.map_err(err)?;
            h.update(k.value().as_bytes());
            h.update([0]);
            h.update(v.value().as_bytes());
            h.update([0]);
        }
        for item in txn.open_table(AUDIT).map_err(err)?.iter().map_err(err)? {
            let (k, v) = item.map_err(err)?;
            h.update(k.value().to_be_bytes());
            h.update(v.value().as_bytes());
            h.update([0]);
        }
        Ok(hex::encode(h.finalize()))
    }

    /// Canonical audit events in log order, filtered.
    pub fn audit_events(&self, f: &AuditFilter) -> Result<Vec<String>, ReadError> {
        let txn = self.db.begin_read().map_err(err)?;
        let t = txn.open_table(AUDIT).map_err(err)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(err)? {
            let (_, v) = item.map_err(err)?;
            let raw = v.value();
            let Ok(ev) = gatehouse_audit::AuditEvent::decode(raw.as_bytes()) else {
                continue;
            };
            let keep = f.identity.as_ref().is_none_or(|x| *x == ev.identity)
                && f.target.as_ref().is_none_or(|x| *x == ev.target)
                && f.session_id.as_ref().is_none_or(|x| *x == ev.session_id)
                && f.since_ms.is_none_or(|x| ev.time_ms >= x)
                && f.until_ms.is_none_or(|x| ev.time_ms < x);
            if keep {
                out.push(raw.to_string());
                if f.limit.is_some_and(|l| out.len() >= l) {
                    break;
                }
            }
        }
        Ok(out)
    }
}
