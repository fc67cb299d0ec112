//! The guardrail corpus format (`testdata/guardrails.sql`): each case starts
//! with a `--@ name readonly=<decision> writes=<decision>` line, followed by
//! its SQL. Shared by the unit tests and the end-to-end test.

use crate::Action;

/// One corpus case.
#[derive(Clone, Debug)]
pub struct Case {
    pub name: String,
    /// Expected under `testdata/readonly.yaml`.
    pub readonly: Action,
    /// Expected under `testdata/writes-need-approval.yaml`.
    pub writes: Action,
    pub sql: String,
}

/// Reads a corpus; an unreadable header is an error naming it.
pub fn parse(text: &str) -> Result<Vec<Case>, String> {
    let mut cases: Vec<Case> = Vec::new();
    for line in text.lines() {
        if let Some(head) = line.strip_prefix("--@ ") {
            let mut parts = head.split_whitespace();
            let name = parts.next().unwrap_or_default().to_string();
            let (mut readonly, mut writes) = (None, None);
            for p in parts {
                let action = |v: &str| match v {
                    "allow" => Ok(Action::Allow),
                    "deny" => Ok(Action::Deny),
                    "approve" => Ok(Action::Approve),
                    other => Err(format!("case {name}: unknown decision {other}")),
                };
                match p.split_once('=') {
                    Some(("readonly", v)) => readonly = Some(action(v)?),
                    Some(("writes", v)) => writes = Some(action(v)?),
                    _ => return Err(format!("case {name}: bad header field {p}")),
                }
            }
            let (Some(readonly), Some(writes)) = (readonly, writes) else {
                return Err(format!("case {name} lacks a decision"));
            };
            cases.push(Case {
                name,
                readonly,
                writes,
                sql: String::new(),
            });
        } else if let Some(c) = cases.last_mut() {
            c.sql.push_str(line);
            c.sql.push('\n');
        }
    }
    for c in &mut cases {
        c.sql = c.sql.trim_end().to_string();
    }
    Ok(cases)
}

/// One case of the side-effect corpus (`testdata/side-effects.sql`): each
/// starts with `--@ name read` or `--@ name <kind> [pg]`.
#[derive(Clone, Debug)]
pub struct EffectCase {
    pub name: String,
    /// The kind the statement must be judged as; `None` for a read.
    pub effect: Option<crate::Kind>,
    /// PostgreSQL itself refuses it in a read-only session.
    pub refused_by_postgres: bool,
    pub sql: String,
}

/// Reads the side-effect corpus; an unreadable header is an error naming it.
pub fn parse_effects(text: &str) -> Result<Vec<EffectCase>, String> {
    let mut cases: Vec<EffectCase> = Vec::new();
    for line in text.lines() {
        if let Some(head) = line.strip_prefix("--@ ") {
            let mut parts = head.split_whitespace();
            let name = parts.next().unwrap_or_default().to_string();
            let effect = match parts.next() {
                Some("read") => None,
                Some(k) => Some(
                    serde_yaml_ng::from_str::<crate::Kind>(k)
                        .map_err(|_| format!("case {name}: unknown kind {k}"))?,
                ),
                None => return Err(format!("case {name} lacks its kind")),
            };
            let refused_by_postgres = match parts.next() {
                None => false,
                Some("pg") => true,
                Some(other) => return Err(format!("case {name}: bad header field {other}")),
            };
            cases.push(EffectCase {
                name,
                effect,
                refused_by_postgres,
                sql: String::new(),
            });
        } else if let Some(c) = cases.last_mut()
            && !(c.sql.is_empty() && line.trim().is_empty())
        {
            c.sql.push_str(line);
            c.sql.push('\n');
        }
    }
    for c in &mut cases {
        c.sql = c.sql.trim_end().to_string();
    }
    Ok(cases)
}
