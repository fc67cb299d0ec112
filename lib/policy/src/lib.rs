//! Policy: the versioned document and the PostgreSQL guardrails.
//!
//! Pure: no I/O and no clock (the time is passed in). The control plane uses
//! [`PolicyDoc`] to validate and version what an admin applies; the agent
//! uses a [`Guard`] per session to decide every statement on PostgreSQL's own
//! parse tree.

mod classify;
mod commands;
pub mod corpus;
mod doc;
mod functions;

use std::collections::HashMap;
use std::sync::Arc;

pub use classify::{ParseError, StatementEffects, classify};
pub use commands::{CommandGuardrails, CommandRule, Ssh, TypedCommands, judge_command};
pub use doc::{
    Action, Approvals, ColumnRule, CustomDetector, DocError, Enforce, Guardrails, Hours, Kind,
    Masking, PolicyDoc, Recordings, Rule, Weekday, parse_duration,
};
pub use functions::{Class, builtin};

/// Who is asking, and where.
#[derive(Clone, Debug, Default)]
pub struct Subject {
    pub identity: String,
    pub groups: Vec<String>,
    pub target: String,
}

/// A decision on one query string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub action: Action,
    /// The deciding rule's name; `default` when no rule covered it and
    /// `unparseable` when PostgreSQL's parser refused the text.
    pub rule: String,
    /// What the client is told (with the rule's name) when denied or held.
    pub message: String,
}

impl Verdict {
    fn allow() -> Self {
        Self {
            action: Action::Allow,
            rule: "default".into(),
            message: String::new(),
        }
    }
}

/// Names of the built-in rules a verdict can cite.
pub const RULE_DEFAULT: &str = "default";
pub const RULE_UNPARSEABLE: &str = "unparseable";
pub const RULE_MASKING: &str = "masking";
pub const RULE_READ_ONLY: &str = "read-only";
/// Not a rule: the statement calls user functions whose volatility the
/// target must tell (see [`Guard::learn_volatility`]) before it is decided.
pub const RULE_CONSULT: &str = "function-volatility";

/// A user function's volatility, from the target's `pg_proc`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserFunction {
    pub schema: String,
    pub name: String,
    /// `provolatile`: `v`, `s` or `i`.
    pub volatility: char,
}

/// Kinds PostgreSQL refuses in a read-only transaction (or that could run
/// something it refuses): a session whose policy admits none of them is
/// opened read-only on the target.
pub const WRITING_KINDS: [Kind; 7] = [
    Kind::Write,
    Kind::Ddl,
    Kind::Privilege,
    Kind::Procedural,
    Kind::Utility,
    Kind::Server,
    Kind::Lock,
];

/// The guardrails of one session: the policy version it started with, and
/// the statements it has prepared by name (so `EXECUTE name` is judged for
/// what it runs).
pub struct Guard {
    doc: Arc<PolicyDoc>,
    /// Values of this session are masked (so binary COPY output, which
    /// cannot be, is refused).
    masking: bool,
    subject: Subject,
    prepared: HashMap<String, StatementEffects>,
    cache: HashMap<String, Result<Vec<StatementEffects>, ParseError>>,
    /// The policy admits no writing kind: the session is read-only on the
    /// target, and statements that would turn that off are refused.
    read_only: bool,
    /// Built-in functions are judged by class and row locks count (off
    /// only in tests of the second wall).
    function_classes: bool,
    /// What the target said of the user functions of the statement text
    /// it was asked for; used once, by the next judgement of that text.
    learned: Option<(String, Vec<UserFunction>)>,
}

/// Query strings whose classification a session keeps.
const CACHE_ENTRIES: usize = 256;

impl Guard {
    pub fn new(doc: Arc<PolicyDoc>, subject: Subject) -> Self {
        let masking = doc
            .masking
            .as_ref()
            .is_some_and(|m| m.applies(&subject.identity, &subject.groups, &subject.target));
        let read_only = !admits_any(&doc, &subject, &WRITING_KINDS);
        Self {
            masking,
            doc,
            subject,
            prepared: HashMap::new(),
            cache: HashMap::new(),
            read_only,
            function_classes: true,
            learned: None,
        }
    }

    /// The user functions a query string calls (`schema.name` or `name`,
    /// lower case), whose volatility the target must tell.
    pub fn user_functions(&self, sql: &str) -> Vec<String> {
        let stmts = match self.cache.get(sql) {
            Some(r) => r.clone().unwrap_or_default(),
            None => classify(sql).unwrap_or_default(),
        };
        let mut out: Vec<String> = stmts
            .iter()
            .flat_map(|x| {
                // `EXECUTE name` calls what the session prepared.
                let prepared = x.executes.as_ref().and_then(|n| self.prepared.get(n));
                x.user_functions
                    .iter()
                    .chain(prepared.into_iter().flat_map(|p| p.user_functions.iter()))
                    .cloned()
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Takes what the target says of the functions [`Self::user_functions`]
    /// named for `sql`; the next judgement of `sql` decides with it.
    pub fn learn_volatility(&mut self, sql: &str, functions: Vec<UserFunction>) {
        self.learned = Some((sql.to_string(), functions));
    }

    /// Whether a user function call (as written) is VOLATILE by what the
    /// target said: unqualified, any function of that name counts.
    fn volatile(&self, learned: &[UserFunction], call: &str) -> bool {
        let (schema, name) = match call.rsplit_once('.') {
            Some((s, n)) => (Some(s.rsplit('.').next().unwrap_or(s)), n),
            None => (None, call),
        };
        // Safe by name (any schema) or by `schema.name`.
        let safe = |f: &UserFunction| {
            self.doc
                .guardrails
                .safe_functions
                .iter()
                .any(|s| match s.rsplit_once('.') {
                    Some((sc, n)) => {
                        n.eq_ignore_ascii_case(&f.name) && sc.eq_ignore_ascii_case(&f.schema)
                    }
                    None => s.eq_ignore_ascii_case(&f.name),
                })
        };
        learned.iter().any(|f| {
            f.volatility == 'v'
                && f.name.eq_ignore_ascii_case(name)
                && schema.is_none_or(|s| f.schema.eq_ignore_ascii_case(s))
                && !safe(f)
        })
    }

    /// Whether the session is opened read-only on the target: the policy
    /// admits no statement of a [`WRITING_KINDS`] kind for this subject.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Takes a new policy version for the rest of the session. Returns why
    /// the session cannot go on as it is under it, if so: the new version
    /// would open it read-only and it is not, or it changes masking (the
    /// session's masking is fixed when it opens).
    pub fn adopt(&mut self, doc: Arc<PolicyDoc>) -> Result<(), String> {
        let read_only = !admits_any(&doc, &self.subject, &WRITING_KINDS);
        if read_only && !self.read_only {
            return Err("it admits no write, and the session was opened read-write".into());
        }
        if doc.masking != self.doc.masking {
            return Err("it changes masking".into());
        }
        // A session opened read-only stays so on the target.
        self.doc = doc;
        self.cache.clear();
        Ok(())
    }

    /// The policy document in force for the session.
    pub fn doc(&self) -> &Arc<PolicyDoc> {
        &self.doc
    }

    /// Stops judging built-in functions by class, so that what PostgreSQL
    /// refuses by itself in a read-only session can be tested.
    pub fn without_function_classes(mut self) -> Self {
        self.function_classes = false;
        self
    }

    /// Decides a query string (every statement in it); the strictest
    /// statement decides. `now_ms` is Unix time in milliseconds.
    pub fn judge(&mut self, sql: &str, now_ms: i64) -> Verdict {
        let fx = match self.cache.get(sql) {
            Some(r) => r.clone(),
            None => {
                let r = classify(sql);
                if self.cache.len() >= CACHE_ENTRIES {
                    self.cache.clear();
                }
                self.cache.insert(sql.to_string(), r.clone());
                r
            }
        };
        let stmts = match fx {
            Ok(s) => s,
            Err(e) => {
                return Verdict {
                    action: Action::Deny,
                    rule: RULE_UNPARSEABLE.into(),
                    message: format!("statement does not parse: {e}"),
                };
            }
        };
        let learned = match self.learned.take() {
            Some((text, fns)) if text == sql => Some(fns),
            _ => None,
        };
        let mut worst: Option<Verdict> = None;
        let mut consult = false;
        for s in &stmts {
            let effective = match &s.executes {
                Some(name) => match self.prepared.get(name) {
                    Some(p) => p.clone(),
                    // Not prepared in this session as far as the gateway
                    // saw (e.g. inside a DO block): judged as procedural.
                    None => StatementEffects {
                        kinds: [(Kind::Procedural, None)].into(),
                        ..s.clone()
                    },
                },
                None => s.clone(),
            };
            let mut effective = effective;
            if !self.function_classes {
                effective.function_kinds.clear();
                effective.kinds.retain(|(k, _)| *k != Kind::Lock);
                effective.user_functions.clear();
            }
            match &learned {
                Some(fns) => {
                    for call in &effective.user_functions {
                        if self.volatile(fns, call) {
                            effective
                                .function_kinds
                                .entry(Kind::Write)
                                .or_insert_with(|| format!("{call}() (a VOLATILE user function)"));
                        }
                    }
                }
                None => consult |= !effective.user_functions.is_empty(),
            }
            let v = if let (true, Some(what)) = (self.read_only, &effective.read_only_change) {
                Verdict {
                    action: Action::Deny,
                    rule: RULE_READ_ONLY.into(),
                    message: format!(
                        "{what} is refused: this session is read-only, because the policy admits no write for it"
                    ),
                }
            } else if self.masking && effective.copy_binary_out {
                Verdict {
                    action: Action::Deny,
                    rule: RULE_MASKING.into(),
                    message: "values of this session are masked, and binary COPY output cannot be; use FORMAT text or csv".into(),
                }
            } else {
                evaluate(&self.doc, &self.subject, now_ms, &effective)
            };
            if let Some(name) = &s.prepares
                && v.action != Action::Deny
            {
                self.prepared.insert(name.clone(), effective.clone());
            }
            if worst.as_ref().is_none_or(|w| v.action > w.action) {
                worst = Some(v);
            }
        }
        let worst = worst.unwrap_or_else(Verdict::allow);
        // What is refused anyway is not worth a question to the target.
        if consult && worst.action != Action::Deny {
            return Verdict {
                action: Action::Approve,
                rule: RULE_CONSULT.into(),
                message: "calls user functions whose volatility the target must tell".into(),
            };
        }
        worst
    }

    /// Decides a statement kind that is not SQL text (startup options that
    /// set a role or search_path).
    pub fn judge_kind(&self, kind: Kind, text: &str, now_ms: i64) -> Verdict {
        let fx = StatementEffects {
            text: text.to_string(),
            kinds: [(kind, None)].into(),
            ..Default::default()
        };
        evaluate(&self.doc, &self.subject, now_ms, &fx)
    }
}

/// The decision on one statement: each of its effects is decided by the
/// first rule that covers it (or the default, for kinds), and the strictest
/// of those decides.
pub fn evaluate(doc: &PolicyDoc, who: &Subject, now_ms: i64, fx: &StatementEffects) -> Verdict {
    let g = &doc.guardrails;
    let applies: Vec<&Rule> = g
        .rules
        .iter()
        .filter(|r| {
            subject_in(&r.identities, &r.groups, &r.targets, who) && hours_match(&r.hours, now_ms)
        })
        .collect();
    let mut worst: Option<Verdict> = None;
    let mut consider = |v: Verdict| keep_strictest(&mut worst, v);
    for (kind, table) in &fx.kinds {
        let rule = applies.iter().find(|r| {
            r.functions.is_empty()
                && !r.without_where
                && (r.kinds.is_empty() || r.kinds.contains(kind))
                && (r.tables.is_empty()
                    || table
                        .as_deref()
                        .is_some_and(|t| r.tables.iter().any(|p| table_matches(p, t))))
        });
        consider(match rule {
            Some(r) => verdict(r, &format!("{} {}", kind.as_str(), on(table))),
            None => Verdict {
                action: g.default,
                rule: RULE_DEFAULT.into(),
                message: format!("{} {} is not allowed by any rule", kind.as_str(), on(table)),
            },
        });
    }
    for (kind, what) in &fx.function_kinds {
        let rule = applies.iter().find(|r| {
            r.functions.is_empty()
                && !r.without_where
                && r.tables.is_empty()
                && (r.kinds.is_empty() || r.kinds.contains(kind))
        });
        consider(match rule {
            Some(r) => verdict(r, &format!("{} by {what}", kind.as_str())),
            None => Verdict {
                action: g.default,
                rule: RULE_DEFAULT.into(),
                message: format!(
                    "{what} is a {} statement, which no rule allows",
                    kind.as_str()
                ),
            },
        });
    }
    for f in &fx.functions {
        if let Some(r) = applies
            .iter()
            .find(|r| r.functions.iter().any(|n| n.eq_ignore_ascii_case(f)))
        {
            consider(verdict(r, &format!("call of {f}()")));
        }
    }
    for t in &fx.without_where {
        if let Some(r) = applies.iter().find(|r| {
            r.without_where && (r.tables.is_empty() || r.tables.iter().any(|p| table_matches(p, t)))
        }) {
            consider(verdict(r, &format!("UPDATE/DELETE of {t} without WHERE")));
        }
    }
    worst.unwrap_or_else(Verdict::allow)
}

/// Whether some rule (at any hour), or the default, could admit a statement
/// of one of `kinds` for `who`.
pub fn admits_any(doc: &PolicyDoc, who: &Subject, kinds: &[Kind]) -> bool {
    let g = &doc.guardrails;
    if g.default != Action::Deny {
        return true;
    }
    g.rules.iter().any(|r| {
        r.action != Action::Deny
            && subject_in(&r.identities, &r.groups, &r.targets, who)
            && r.functions.is_empty()
            && !r.without_where
            && (r.kinds.is_empty() || r.kinds.iter().any(|k| kinds.contains(k)))
    })
}

fn on(table: &Option<String>) -> String {
    match table {
        Some(t) => format!("on {t}"),
        None => "statement".into(),
    }
}

fn verdict(r: &Rule, what: &str) -> Verdict {
    Verdict {
        action: r.action,
        rule: r.name.clone(),
        message: r
            .message
            .clone()
            .unwrap_or_else(|| format!("{what} matched rule \"{}\"", r.name)),
    }
}

/// The strictest decides; of equally strict ones, a named rule is cited
/// before the default.
fn keep_strictest(worst: &mut Option<Verdict>, v: Verdict) {
    if worst.as_ref().is_none_or(|w| {
        v.action > w.action
            || (v.action == w.action && w.rule == RULE_DEFAULT && v.rule != RULE_DEFAULT)
    }) {
        *worst = Some(v);
    }
}

/// Whether a rule limited to these identities, groups and targets (each
/// unlimited when empty) covers `who`.
fn subject_in(identities: &[String], groups: &[String], targets: &[String], who: &Subject) -> bool {
    (identities.is_empty() || identities.contains(&who.identity))
        && (groups.is_empty() || groups.iter().any(|g| who.groups.contains(g)))
        && (targets.is_empty() || targets.contains(&who.target))
}

fn hours_match(hours: &Option<Hours>, now_ms: i64) -> bool {
    let Some(h) = hours else { return true };
    let (Some(from), Some(to)) = (doc::parse_hhmm(&h.from), doc::parse_hhmm(&h.to)) else {
        return false;
    };
    let secs = now_ms.div_euclid(1000);
    let minute = (secs.rem_euclid(86_400) / 60) as u32;
    // 1970-01-01 was a Thursday.
    let day = match (secs.div_euclid(86_400) + 3).rem_euclid(7) {
        0 => Weekday::Mon,
        1 => Weekday::Tue,
        2 => Weekday::Wed,
        3 => Weekday::Thu,
        4 => Weekday::Fri,
        5 => Weekday::Sat,
        _ => Weekday::Sun,
    };
    let in_window = if from <= to {
        (from..to).contains(&minute)
    } else {
        minute >= from || minute < to
    };
    in_window && (h.days.is_empty() || h.days.contains(&day))
}

/// `pattern` (`*`, `table`, `schema.*`, `schema.table`) against a table as
/// written in SQL (unqualified means `public`). Case-insensitive, as
/// unquoted identifiers are.
fn table_matches(pattern: &str, table: &str) -> bool {
    let (ts, tn) = table.split_once('.').unwrap_or(("public", table));
    match pattern.split_once('.') {
        None => pattern == "*" || pattern.eq_ignore_ascii_case(tn),
        Some((ps, pn)) => ps.eq_ignore_ascii_case(ts) && (pn == "*" || pn.eq_ignore_ascii_case(tn)),
    }
}

#[cfg(test)]
mod tests;
