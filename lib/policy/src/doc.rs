//! The policy document: what `gatehouse policy apply -f policy.yaml` writes.
//!
//! The YAML is parsed and validated once, on the control plane; what Raft
//! stores and agents receive is the canonical JSON of the parsed document,
//! whose SHA-256 is the document's version.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What a guardrail decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Allow,
    /// The statement waits for a human approval.
    Approve,
    Deny,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Approve => "approve",
            Action::Deny => "deny",
        }
    }
}

/// What a statement does, decided on its parse tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Reads data: SELECT, TABLE, VALUES, SHOW, FETCH, COPY … TO STDOUT,
    /// EXPLAIN without ANALYZE.
    Read,
    /// Changes rows: INSERT, UPDATE, DELETE, MERGE, TRUNCATE, COPY … FROM.
    Write,
    /// Changes the schema: CREATE, ALTER, DROP, COMMENT, SELECT … INTO,
    /// CREATE TABLE AS, REFRESH MATERIALIZED VIEW.
    Ddl,
    /// Changes who may do what: GRANT, REVOKE, roles, default privileges,
    /// row-level security policies.
    Privilege,
    /// Changes who the session acts as or how names resolve: SET ROLE,
    /// SET SESSION AUTHORIZATION, search_path, RESET ALL.
    Session,
    /// Other session settings: SET, RESET, DEALLOCATE, DISCARD.
    Config,
    /// BEGIN, COMMIT, ROLLBACK, SAVEPOINT, SET TRANSACTION, SET CONSTRAINTS.
    Transaction,
    /// VACUUM, ANALYZE, CLUSTER, REINDEX, CHECKPOINT, LOCK, LISTEN, NOTIFY.
    Utility,
    /// Runs code the gateway cannot see into: DO blocks and CALL.
    Procedural,
    /// Reaches outside the database: COPY to or from a server file or
    /// PROGRAM, LOAD, ALTER SYSTEM, and built-in functions that signal
    /// backends, administer the server, read server files, manage
    /// replication or connect elsewhere (dblink).
    Server,
    /// Takes locks beyond a read's: SELECT … FOR UPDATE/SHARE and advisory
    /// locks.
    Lock,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Read => "read",
            Kind::Write => "write",
            Kind::Ddl => "ddl",
            Kind::Privilege => "privilege",
            Kind::Session => "session",
            Kind::Config => "config",
            Kind::Transaction => "transaction",
            Kind::Utility => "utility",
            Kind::Procedural => "procedural",
            Kind::Server => "server",
            Kind::Lock => "lock",
        }
    }
}

/// The whole document.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDoc {
    #[serde(default)]
    pub guardrails: Guardrails,
    /// How held statements are approved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approvals: Option<Approvals>,
    /// Inline masking of result values; off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masking: Option<Masking>,
    /// How long session recordings are kept; forever when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recordings: Option<Recordings>,
    /// Which sessions a new version governs: those opened from now on (the
    /// default), or running ones too.
    #[serde(default, skip_serializing_if = "Enforce::is_new_sessions")]
    pub enforce: Enforce,
    /// SSH command guardrails; every command that parses is allowed when
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh: Option<crate::commands::Ssh>,
}

/// When a new policy version takes effect.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Enforce {
    /// Running sessions keep the version they opened under.
    #[default]
    NewSessions,
    /// Running sessions are judged by the new version from their next
    /// statement; those it no longer admits as they are are closed.
    Immediate,
}

impl Enforce {
    fn is_new_sessions(&self) -> bool {
        *self == Enforce::NewSessions
    }
}

/// Recording retention: a duration (`90d`, `12h`, `30m`, `45s`) for every
/// target, and per target. Recordings under legal hold are never deleted.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recordings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<String>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub targets: std::collections::BTreeMap<String, String>,
}

impl Recordings {
    /// How long a target's recordings are kept, as written and parsed
    /// (`None`: forever).
    pub fn retention_for(&self, target: &str) -> Option<(&str, std::time::Duration)> {
        let d = self.targets.get(target).or(self.retention.as_ref())?;
        parse_duration(d).ok().map(|p| (d.as_str(), p))
    }
}

/// Parses `<number><d|h|m|s>`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (n, unit) = s.split_at(s.len().saturating_sub(1));
    let secs_per = match unit {
        "d" => 86_400,
        "h" => 3_600,
        "m" => 60,
        "s" => 1,
        _ => return Err(format!("duration \"{s}\" must end in d, h, m or s")),
    };
    let n: u64 = n
        .parse()
        .map_err(|_| format!("duration \"{s}\" must be a whole number and a unit, like 90d"))?;
    if n == 0 {
        return Err(format!("duration \"{s}\" must be more than zero"));
    }
    Ok(std::time::Duration::from_secs(n.saturating_mul(secs_per)))
}

/// How a statement a guardrail holds (`action: approve`) is approved.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Approvals {
    /// How long the statement waits for a decision; 0 returns at once with
    /// the request id (run it again once approved).
    #[serde(default = "default_wait")]
    pub wait_seconds: u64,
    /// Approvals needed (from distinct reviewers, never the requester).
    #[serde(default = "default_required")]
    pub required: u32,
    /// Reviewers must be in one of these groups; anyone else when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approver_groups: Vec<String>,
    /// 0: the grant is for that exact statement, once. N: for any statement
    /// on that target for N minutes after approval.
    #[serde(default)]
    pub grant_minutes: u32,
    /// Notified (HTTP POST, JSON) of new requests and decisions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
}

fn default_wait() -> u64 {
    300
}

fn default_required() -> u32 {
    1
}

impl Default for Approvals {
    fn default() -> Self {
        Self {
            wait_seconds: default_wait(),
            required: default_required(),
            approver_groups: Vec::new(),
            grant_minutes: 0,
            webhook: None,
        }
    }
}

/// Which values are masked before they leave the agent, and who sees them
/// in clear.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Masking {
    /// Built-in detectors by name (`email`, `card`, `iban`, `us_ssn`,
    /// `phone`, `ipv4`, `ipv6`, `jwt`, `secret`); all when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub detectors: Vec<String>,
    /// Custom expressions; every match is masked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub custom: Vec<CustomDetector>,
    /// Columns whose whole value is masked: `*.column` (any table),
    /// `table.column` or `schema.table.column`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<String>,
    /// Targets masking applies to; all when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<String>,
    /// Identities and groups that see clear values (audited at session start).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exempt_identities: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exempt_groups: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomDetector {
    pub name: String,
    pub regex: String,
}

impl Masking {
    /// The masking engine's configuration; fails on an unknown detector.
    pub fn engine_config(&self) -> Result<gatehouse_masking::Config, String> {
        use gatehouse_masking::Detector as D;
        let mut detectors = Vec::new();
        for name in &self.detectors {
            detectors.push(match name.as_str() {
                "email" => D::Email,
                "card" => D::Card,
                "iban" => D::Iban,
                "us_ssn" => D::UsSsn,
                "phone" => D::Phone,
                "ipv4" => D::Ipv4,
                "ipv6" => D::Ipv6,
                "jwt" => D::Jwt,
                "secret" => D::Secret,
                other => return Err(format!("unknown masking detector \"{other}\"")),
            });
        }
        Ok(gatehouse_masking::Config {
            detectors,
            custom: self
                .custom
                .iter()
                .map(|c| (c.name.clone(), c.regex.clone()))
                .collect(),
        })
    }

    /// Whether a session of `identity` (in `groups`) on `target` has its
    /// values masked.
    pub fn applies(&self, identity: &str, groups: &[String], target: &str) -> bool {
        self.covers(target) && !self.exempt(identity, groups)
    }

    /// Whether masking is on for `target`.
    pub fn covers(&self, target: &str) -> bool {
        self.targets.is_empty() || self.targets.iter().any(|t| t == target)
    }

    /// Whether the identity or one of its groups sees clear values.
    pub fn exempt(&self, identity: &str, groups: &[String]) -> bool {
        self.exempt_identities.iter().any(|i| i == identity)
            || self.exempt_groups.iter().any(|g| groups.contains(g))
    }

    /// The column rules, lower case.
    pub fn column_rules(&self) -> Vec<ColumnRule> {
        self.columns
            .iter()
            .filter_map(|c| ColumnRule::parse(c))
            .collect()
    }
}

/// A column whose whole value is masked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColumnRule {
    pub schema: Option<String>,
    /// `None` for `*` (any table).
    pub table: Option<String>,
    pub column: String,
}

impl ColumnRule {
    /// `*.column`, `table.column` or `schema.table.column`.
    pub fn parse(s: &str) -> Option<Self> {
        let parts: Vec<String> = s.split('.').map(str::to_lowercase).collect();
        let ok = |p: &String| !p.is_empty() && p != "*";
        match parts.as_slice() {
            [t, c] if t == "*" && ok(c) => Some(Self {
                schema: None,
                table: None,
                column: c.clone(),
            }),
            [t, c] if ok(t) && ok(c) => Some(Self {
                schema: None,
                table: Some(t.clone()),
                column: c.clone(),
            }),
            [sch, t, c] if ok(sch) && ok(t) && ok(c) => Some(Self {
                schema: Some(sch.clone()),
                table: Some(t.clone()),
                column: c.clone(),
            }),
            _ => None,
        }
    }
}

/// PostgreSQL guardrails: rules in order, and what happens to statements no
/// rule covers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Guardrails {
    #[serde(default = "default_action")]
    pub default: Action,
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// User functions that count as reads although the target says they are
    /// VOLATILE (`name`, or `schema.name` for that schema only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub safe_functions: Vec<String>,
}

impl Default for Guardrails {
    fn default() -> Self {
        Self {
            default: Action::Allow,
            rules: Vec::new(),
            safe_functions: Vec::new(),
        }
    }
}

fn default_action() -> Action {
    Action::Allow
}

/// One guardrail. Every condition that is set must hold; an unset one
/// matches everything.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub name: String,
    pub action: Action,
    /// Shown to the client with the rule's name when it denies or holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kinds: Vec<Kind>,
    /// `table`, `schema.table`, `schema.*` or `*`; an unqualified name in SQL
    /// is taken to be in `public`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tables: Vec<String>,
    /// Functions by name (any schema), case-insensitive. A rule with
    /// functions judges calls of those functions only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub functions: Vec<String>,
    /// Judges UPDATE and DELETE without WHERE (and TRUNCATE) only.
    #[serde(default, skip_serializing_if = "is_false")]
    pub without_where: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<String>,
    /// A time window in UTC; the rule applies only inside it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hours: Option<Hours>,
}

pub(crate) fn is_false(b: &bool) -> bool {
    !*b
}

/// A daily window `from`–`to` ("HH:MM", UTC; `to` may be past midnight),
/// on the given weekdays (all when empty).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hours {
    pub from: String,
    pub to: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub days: Vec<Weekday>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Weekday {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

/// Why a document was refused.
#[derive(Debug, thiserror::Error)]
pub enum DocError {
    #[error("policy is not valid YAML for this schema: {0}")]
    Yaml(String),
    #[error("policy is not valid JSON for this schema: {0}")]
    Json(String),
    #[error("approvals: {0}")]
    Approvals(String),
    #[error("masking: {0}")]
    Masking(String),
    #[error("recordings: {0}")]
    Recordings(String),
    #[error("guardrail {index}: {message}")]
    Rule { index: usize, message: String },
    #[error("ssh command guardrail {index}: {message}")]
    CommandRule { index: usize, message: String },
    #[error("ssh: {0}")]
    Ssh(String),
}

impl PolicyDoc {
    /// Parses and validates a YAML (or JSON, which is YAML) document.
    pub fn from_yaml(text: &str) -> Result<Self, DocError> {
        let doc: PolicyDoc =
            serde_yaml_ng::from_str(text).map_err(|e| DocError::Yaml(e.to_string()))?;
        doc.validate()?;
        Ok(doc)
    }

    /// Parses the canonical JSON form (what agents receive).
    pub fn from_canonical(text: &str) -> Result<Self, DocError> {
        let doc: PolicyDoc =
            serde_json::from_str(text).map_err(|e| DocError::Json(e.to_string()))?;
        doc.validate()?;
        Ok(doc)
    }

    /// Compact JSON, fields in declaration order, empty fields left out.
    pub fn canonical(&self) -> String {
        // Serializing plain structs of strings, enums and vectors cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The document's version: SHA-256 of the canonical form, 16 hex digits.
    pub fn version(&self) -> String {
        let h = Sha256::digest(self.canonical().as_bytes());
        hex::encode(h).chars().take(16).collect()
    }

    fn validate(&self) -> Result<(), DocError> {
        if let Some(r) = &self.recordings {
            for d in r.retention.iter().chain(r.targets.values()) {
                parse_duration(d).map_err(DocError::Recordings)?;
            }
        }
        if let Some(a) = &self.approvals {
            if a.required == 0 || a.required > 10 {
                return Err(DocError::Approvals("`required` must be 1 to 10".into()));
            }
            if a.wait_seconds > 24 * 3600 {
                return Err(DocError::Approvals(
                    "`wait_seconds` is at most a day".into(),
                ));
            }
            if let Some(w) = &a.webhook
                && !w.starts_with("http://")
                && !w.starts_with("https://")
            {
                return Err(DocError::Approvals(format!(
                    "webhook \"{w}\" is not an http(s) URL"
                )));
            }
        }
        if let Some(m) = &self.masking {
            let cfg = m.engine_config().map_err(DocError::Masking)?;
            gatehouse_masking::Masker::new(&cfg).map_err(|e| DocError::Masking(e.to_string()))?;
            for c in &m.columns {
                if ColumnRule::parse(c).is_none() {
                    return Err(DocError::Masking(format!(
                        "column rule \"{c}\" must be `*.column`, `table.column` or `schema.table.column`"
                    )));
                }
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, r) in self.guardrails.rules.iter().enumerate() {
            let err = |m: String| DocError::Rule {
                index: i + 1,
                message: m,
            };
            if r.name.trim().is_empty() {
                return Err(err("a rule needs a name".into()));
            }
            if !names.insert(r.name.as_str()) {
                return Err(err(format!("rule name \"{}\" is used twice", r.name)));
            }
            if !r.functions.is_empty() && (r.without_where || !r.kinds.is_empty()) {
                return Err(err(format!(
                    "rule \"{}\": `functions` cannot be combined with `kinds` or `without_where`",
                    r.name
                )));
            }
            for t in &r.tables {
                if t.is_empty() || t.split('.').count() > 2 {
                    return Err(err(format!(
                        "rule \"{}\": table pattern \"{t}\" is not `table`, `schema.table` or `schema.*`",
                        r.name
                    )));
                }
            }
            if let Some(h) = &r.hours {
                check_hours(h).map_err(|m| err(format!("rule \"{}\": {m}", r.name)))?;
            }
        }
        if let Some(ssh) = &self.ssh {
            crate::commands::validate(ssh)?;
        }
        Ok(())
    }
}

pub(crate) fn check_hours(h: &Hours) -> Result<(), String> {
    for v in [&h.from, &h.to] {
        if parse_hhmm(v).is_none() {
            return Err(format!("hour \"{v}\" is not HH:MM"));
        }
    }
    Ok(())
}

/// Minutes after midnight for "HH:MM".
pub(crate) fn parse_hhmm(s: &str) -> Option<u32> {
    let (h, m) = s.split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some(h * 60 + m)
}
