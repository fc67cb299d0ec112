//! Guardrails in a session: the policy document the session opened under,
//! judged on PostgreSQL's own parse of every statement.

use std::sync::Arc;

use gatehouse_pgwire_inspect::{Judge, Refusal};
use gatehouse_policy::{Action, Guard, Kind, PolicyDoc, Subject, Verdict};
use gatehouse_proto::tunnel::SessionOpen;

use crate::now_ms;

/// The session's guard; `Ok(None)` when no policy document was ever
/// applied (every statement runs, as before guardrails existed).
pub fn for_session(open: &SessionOpen) -> Result<Option<Guard>, String> {
    if open.policy_document.is_empty() {
        return Ok(None);
    }
    let doc = PolicyDoc::from_canonical(&open.policy_document)
        .map_err(|e| format!("policy document unreadable: {e}"))?;
    Ok(Some(Guard::new(
        Arc::new(doc),
        Subject {
            identity: open.identity.clone(),
            groups: open.groups.clone(),
            target: open.target.clone(),
        },
    )))
}

/// Startup parameters that change who the session acts as or how names
/// resolve, set directly or through `options` (`-c role=…`, `--search_path=…`),
/// judged as a `session` statement. Returns the refusing verdict.
pub fn judge_startup(guard: &Guard, open: &SessionOpen) -> Option<Verdict> {
    const SENSITIVE: [&str; 3] = ["role", "search_path", "session_authorization"];
    let mut found = Vec::new();
    for (k, v) in &open.startup_params {
        let k = k.to_lowercase();
        if SENSITIVE.contains(&k.as_str()) {
            found.push(format!("{k}={v}"));
        } else if k == "options" {
            let lower = v.to_lowercase();
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
    let message = match v.action {
        Action::Approve => format!(
            "{} (it needs an approval; this gateway does not take approval requests yet, so it was not run)",
            v.message
        ),
        _ => v.message,
    };
    Refusal {
        rule: v.rule,
        message,
    }
}

/// The inspector's judge for one session.
pub struct PolicyJudge(pub Guard);

impl Judge for PolicyJudge {
    fn judge(&mut self, text: &str, at_ms: i64) -> Option<Refusal> {
        let v = self.0.judge(text, at_ms);
        (v.action != Action::Allow).then(|| refusal(v))
    }
}
