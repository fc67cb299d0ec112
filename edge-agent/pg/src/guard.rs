//! Guardrails in a PostgreSQL session: the policy document the session
//! opened under, judged on PostgreSQL's own parse of every statement, and
//! result masking.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use gatehouse_agent_core::guard::Held;
use gatehouse_agent_core::now_ms;
use gatehouse_masking::{Counts, Masker};
use gatehouse_pgwire_inspect::{Judge, Mask, Refusal, Resolution, Ruling};
use gatehouse_policy::{Action, Approvals, Guard, Kind, PolicyDoc, Subject, Verdict};
use gatehouse_proto::tunnel::SessionOpen;

pub use gatehouse_agent_core::guard::policy_of;

/// Asks the control plane to approve a held statement (see
/// [`gatehouse_agent_core::guard::approve`]).
pub async fn approve(
    ctx: &gatehouse_agent_core::AgentCtx,
    open: &SessionOpen,
    settings: &Approvals,
    text: &str,
    held: &Refusal,
    reason: String,
) -> Resolution {
    let h = Held {
        rule: held.rule.clone(),
        message: held.message.clone(),
    };
    match gatehouse_agent_core::guard::approve(ctx, open, settings, text, &h, reason, None).await {
        Ok(()) => Resolution::Approved,
        Err(message) => Resolution::Refused(Refusal {
            rule: held.rule.clone(),
            message,
        }),
    }
}

/// The session's guard.
pub fn guard(doc: &Arc<PolicyDoc>, open: &SessionOpen) -> Guard {
    let g = Guard::new(
        doc.clone(),
        Subject {
            identity: open.identity.clone(),
            groups: open.groups.clone(),
            target: open.target.clone(),
        },
    );
    without_function_classes_in_tests(g)
}

/// Debug builds only: `GATEHOUSE_AGENT_TEST_NO_FUNCTION_CLASSES` stops
/// judging built-in functions by class, so a test can show what the
/// read-only session refuses by itself. Release builds have no hook.
#[cfg(debug_assertions)]
fn without_function_classes_in_tests(g: Guard) -> Guard {
    if std::env::var_os("GATEHOUSE_AGENT_TEST_NO_FUNCTION_CLASSES").is_some() {
        tracing::warn!("test hook: built-in functions are not judged by class");
        return g.without_function_classes();
    }
    g
}

#[cfg(not(debug_assertions))]
fn without_function_classes_in_tests(g: Guard) -> Guard {
    g
}

/// Startup parameters that change who the session acts as or how names
/// resolve, set directly or through `options` (`-c role=…`, `--search_path=…`),
/// judged as a `session` statement. Returns the refusing verdict.
pub fn judge_startup(guard: &Guard, open: &SessionOpen) -> Option<Verdict> {
    const SENSITIVE: [&str; 3] = ["role", "search_path", "session_authorization"];
    // A read-only session is opened with default_transaction_read_only on;
    // the client may not set it (or transaction_read_only) itself.
    if guard.read_only() {
        let names: Vec<String> = open
            .startup_params
            .iter()
            .filter(|(k, v)| {
                // `-c name=…` and `--name=…` (dashes for underscores) alike.
                let norm = |t: &str| t.to_lowercase().replace('-', "_");
                norm(k).contains("read_only")
                    || (k.eq_ignore_ascii_case("options") && norm(v).contains("read_only"))
            })
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if !names.is_empty() {
            return Some(Verdict {
                action: Action::Deny,
                rule: gatehouse_policy::RULE_READ_ONLY.into(),
                message: format!(
                    "startup parameters {} are refused: this session is read-only, because the policy admits no write for it",
                    names.join(" ")
                ),
            });
        }
    }
    let mut found = Vec::new();
    for (k, v) in &open.startup_params {
        let k = k.to_lowercase();
        if SENSITIVE.contains(&k.as_str()) {
            found.push(format!("{k}={v}"));
        } else if k == "options" {
            let lower = v.to_lowercase().replace('-', "_");
            if SENSITIVE.iter().any(|s| lower.contains(s)) {
                found.push(format!("options={v}"));
            }
        }
    }
    if found.is_empty() {
        return None;
    }
    let text = format!("startup parameters {}", found.join(" "));
    let v = guard.judge_kind(Kind::Session, &text, now_ms());
    (v.action != Action::Allow).then_some(v)
}

/// What the client is told about a verdict that stops a statement.
pub fn refusal(v: Verdict) -> Refusal {
    Refusal {
        rule: v.rule,
        message: v.message,
    }
}

/// The inspector's judge for one session. It also keeps the reason the
/// caller gave with `SET gatehouse.reason = '…'` for approval requests.
pub struct PolicyJudge {
    /// Shared with the relay, which asks the target about user functions
    /// and decides again.
    pub guard: Arc<Mutex<Guard>>,
    pub reason: Arc<Mutex<String>>,
}

impl Judge for PolicyJudge {
    fn judge(&mut self, text: &str, at_ms: i64) -> Ruling {
        if let Some(r) = reason_of(text)
            && let Ok(mut cur) = self.reason.lock()
        {
            *cur = r;
        }
        let Ok(mut guard) = self.guard.lock() else {
            return Ruling::Refuse(Refusal {
                rule: gatehouse_policy::RULE_DEFAULT.into(),
                message: "internal error: the session's guard is unavailable".into(),
            });
        };
        let v = guard.judge(text, at_ms);
        match v.action {
            Action::Allow => Ruling::Allow,
            Action::Deny => Ruling::Refuse(refusal(v)),
            Action::Approve => Ruling::Hold(refusal(v)),
        }
    }
}

/// The value of `SET [SESSION] gatehouse.reason = '…'` (or `TO`).
fn reason_of(text: &str) -> Option<String> {
    let lower = text.trim().to_ascii_lowercase();
    let rest = lower
        .strip_prefix("set ")?
        .trim_start()
        .trim_start_matches("session ")
        .trim_start()
        .strip_prefix("gatehouse.reason")?
        .trim_start();
    if !(rest.starts_with('=') || rest.starts_with("to ")) {
        return None;
    }
    // The original text's quoted value (case kept).
    let start = text.find('\'')? + 1;
    let end = text.rfind('\'')?;
    (end > start).then(|| text.get(start..end).unwrap_or_default().replace("''", "'"))
}

/// The target's own connection for catalog questions about user functions,
/// opened on first need and kept for the session.
pub struct Catalog<'a> {
    pub target: &'a gatehouse_agent_core::config::TargetConfig,
    pub db_user: &'a str,
    pub read_only: bool,
    pub conn: tokio::sync::Mutex<Option<crate::upstream::Stream>>,
}

/// Asks the target for the volatility of the user functions `text` calls
/// (one catalog query, each time: a `CREATE OR REPLACE` elsewhere counts at
/// once), then decides `text` again. Fail closed: no answer, no run.
pub async fn consult(
    ctx: &gatehouse_agent_core::AgentCtx,
    open: &SessionOpen,
    catalog: &Catalog<'_>,
    guard: &Mutex<Guard>,
    text: &str,
    held: &Refusal,
    (settings, reason): (&Approvals, String),
) -> Resolution {
    let refuse = |message: String| {
        Resolution::Refused(Refusal {
            rule: held.rule.clone(),
            message,
        })
    };
    let Some(names) = guard.lock().ok().map(|g| g.user_functions(text)) else {
        return refuse("internal error: the session's guard is unavailable".into());
    };
    let bare: Vec<String> = names
        .iter()
        .map(|n| n.rsplit('.').next().unwrap_or(n))
        .map(|n| format!("'{}'", n.replace('\'', "''")))
        .collect();
    let sql = format!(
        "select n.nspname, p.proname, p.provolatile from pg_catalog.pg_proc p \
         join pg_catalog.pg_namespace n on n.oid = p.pronamespace \
         where lower(p.proname) in ({})",
        bare.join(", ")
    );
    let rows = {
        let mut conn = catalog.conn.lock().await;
        if conn.is_none() {
            match crate::upstream::connect(catalog.target, open, catalog.db_user, catalog.read_only)
                .await
            {
                Ok(c) => *conn = Some(c.stream),
                Err(e) => {
                    return refuse(format!(
                        "the volatility of {} could not be asked of the target: {e}",
                        names.join(", ")
                    ));
                }
            }
        }
        let Some(stream) = conn.as_mut() else {
            return refuse("internal error: no catalog connection".into());
        };
        match crate::upstream::agent_query(stream, &sql).await {
            Ok(rows) => rows,
            Err(e) => {
                *conn = None;
                return refuse(format!(
                    "the volatility of {} could not be asked of the target: {e}",
                    names.join(", ")
                ));
            }
        }
    };
    let functions = rows
        .into_iter()
        .filter_map(|r| match r.as_slice() {
            [Some(schema), Some(name), Some(v)] => Some(gatehouse_policy::UserFunction {
                schema: schema.clone(),
                name: name.clone(),
                volatility: v.chars().next().unwrap_or('v'),
            }),
            _ => None,
        })
        .collect();
    let v = {
        let Ok(mut g) = guard.lock() else {
            return refuse("internal error: the session's guard is unavailable".into());
        };
        g.learn_volatility(text, functions);
        g.judge(text, now_ms())
    };
    match v.action {
        Action::Allow => Resolution::Approved,
        Action::Deny => Resolution::Refused(refusal(v)),
        Action::Approve => approve(ctx, open, settings, text, &refusal(v), reason).await,
    }
}

/// Compiled maskers by policy document version.
#[derive(Default)]
pub struct MaskerCache(Mutex<HashMap<String, Arc<Masker>>>);

/// What masking does in a session.
pub enum SessionMasking {
    /// The document has no masking section (or not for this target).
    Off,
    /// The identity or one of its groups sees clear values.
    Exempt,
    On(SessionMask),
}

/// Masking for one session, from the document it opened under.
pub fn masking_for_session(
    cache: &MaskerCache,
    doc: &PolicyDoc,
    open: &SessionOpen,
) -> Result<SessionMasking, String> {
    let Some(m) = doc.masking.as_ref().filter(|m| m.covers(&open.target)) else {
        return Ok(SessionMasking::Off);
    };
    if m.exempt(&open.identity, &open.groups) {
        return Ok(SessionMasking::Exempt);
    }
    // The policy version names the document (with the access rules).
    let version = open.policy_version.clone();
    let masker = {
        let mut c = cache
            .0
            .lock()
            .map_err(|_| "masker cache poisoned".to_string())?;
        match c.get(&version) {
            Some(m) => m.clone(),
            None => {
                let cfg = m.engine_config()?;
                let built = Arc::new(Masker::new(&cfg).map_err(|e| e.to_string())?);
                if c.len() > 16 {
                    c.clear();
                }
                c.insert(version, built.clone());
                built
            }
        }
    };
    Ok(SessionMasking::On(SessionMask {
        masker,
        columns: m.column_rules(),
        tables: HashMap::new(),
        counts: Counts::new(),
    }))
}

/// The inspector's masker for one session.
pub struct SessionMask {
    masker: Arc<Masker>,
    columns: Vec<gatehouse_policy::ColumnRule>,
    /// Schema and name of the tables column rules name, by OID (resolved on
    /// the target when the session starts).
    tables: HashMap<u32, (String, String)>,
    counts: Counts,
}

impl SessionMask {
    /// A second handle on the same engine, for the audit side (parameters).
    pub fn sibling(&self) -> Self {
        Self {
            masker: self.masker.clone(),
            columns: Vec::new(),
            tables: HashMap::new(),
            counts: Counts::new(),
        }
    }

    /// The catalog query that finds the OIDs of the tables the column rules
    /// name, if any do.
    pub fn table_query(&self) -> Option<String> {
        let names: Vec<String> = self
            .columns
            .iter()
            .filter_map(|c| c.table.as_ref())
            .map(|t| format!("'{}'", t.replace('\'', "''")))
            .collect();
        (!names.is_empty()).then(|| {
            format!(
                "select c.oid::text, n.nspname, c.relname from pg_catalog.pg_class c \
                 join pg_catalog.pg_namespace n on n.oid = c.relnamespace \
                 where lower(c.relname) in ({})",
                names.join(", ")
            )
        })
    }

    /// Takes the rows of [`Self::table_query`].
    pub fn set_tables(&mut self, rows: Vec<Vec<Option<String>>>) {
        for r in rows {
            if let [Some(oid), Some(schema), Some(table)] = r.as_slice()
                && let Ok(oid) = oid.parse::<u32>()
            {
                self.tables
                    .insert(oid, (schema.to_lowercase(), table.to_lowercase()));
            }
        }
    }

    /// Masks a rendered parameter; counts what it masked.
    pub fn mask_text(&mut self, s: &str) -> Option<String> {
        self.masker
            .mask(s.as_bytes(), &mut self.counts)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    }
}

/// Name of the count for whole-column masks.
const COLUMN_RULE: &str = "column";

impl Mask for SessionMask {
    fn mask_values(&mut self, values: &[&[u8]]) -> Vec<(usize, Vec<u8>)> {
        self.masker.mask_values(values, &mut self.counts)
    }

    fn mask_copy(&mut self, data: &[u8]) -> Option<Vec<u8>> {
        // One COPY text row per message; tabs and newlines separate
        // values, and no detector matches across them.
        self.masker.mask(data, &mut self.counts)
    }

    fn whole_column(&self, table_oid: u32, name: &str) -> bool {
        let table = self.tables.get(&table_oid);
        self.columns.iter().any(|c| {
            c.column.eq_ignore_ascii_case(name)
                && match (&c.table, table) {
                    (None, _) => true,
                    (Some(_), None) => false,
                    (Some(t), Some((schema, name))) => {
                        t == name && c.schema.as_ref().is_none_or(|s| s == schema)
                    }
                }
        })
    }

    fn mask_whole(&mut self, value: &[u8]) -> Vec<u8> {
        match self.counts.get_mut(COLUMN_RULE) {
            Some(n) => *n += 1,
            None => {
                self.counts.insert(COLUMN_RULE.to_string(), 1);
            }
        }
        value
            .iter()
            .map(|b| if b.is_ascii_alphanumeric() { b'*' } else { *b })
            .collect()
    }

    fn take_counts(&mut self) -> Vec<(String, u64)> {
        std::mem::take(&mut self.counts).into_iter().collect()
    }
}
