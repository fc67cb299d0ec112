//! Guardrails in a session: the policy document the session opened under,
//! judged on PostgreSQL's own parse of every statement.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use gatehouse_masking::{Counts, Masker};
use gatehouse_pgwire_inspect::{Judge, Mask, Refusal};
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
    open: &SessionOpen,
) -> Result<SessionMasking, String> {
    if open.policy_document.is_empty() {
        return Ok(SessionMasking::Off);
    }
    let doc = PolicyDoc::from_canonical(&open.policy_document)
        .map_err(|e| format!("policy document unreadable: {e}"))?;
    let Some(m) = doc.masking.as_ref() else {
        return Ok(SessionMasking::Off);
    };
    if !m.targets.is_empty() && !m.targets.contains(&open.target) {
        return Ok(SessionMasking::Off);
    }
    if m.exempt(&open.identity, &open.groups) {
        return Ok(SessionMasking::Exempt);
    }
    let version = doc.version();
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
        columns: m.column_names(),
        counts: Counts::new(),
    }))
}

/// The inspector's masker for one session.
pub struct SessionMask {
    masker: Arc<Masker>,
    columns: Vec<String>,
    counts: Counts,
}

impl SessionMask {
    /// A second handle on the same engine, for the audit side (parameters).
    pub fn sibling(&self) -> Self {
        Self {
            masker: self.masker.clone(),
            columns: Vec::new(),
            counts: Counts::new(),
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
    fn mask_row(&mut self, values: &[&[u8]]) -> Option<Vec<Vec<u8>>> {
        self.masker.mask_row(values, &mut self.counts)
    }

    fn mask_copy(&mut self, data: &[u8]) -> Option<Vec<u8>> {
        // One COPY text row per message; tabs and newlines separate
        // values, and no detector matches across them.
        self.masker.mask(data, &mut self.counts)
    }

    fn whole_column(&self, name: &str) -> bool {
        self.columns.iter().any(|c| c.eq_ignore_ascii_case(name))
    }

    fn mask_whole(&mut self, value: &[u8]) -> Vec<u8> {
        *self.counts.entry(COLUMN_RULE.to_string()).or_default() += 1;
        value
            .iter()
            .map(|b| if b.is_ascii_alphanumeric() { b'*' } else { *b })
            .collect()
    }

    fn take_counts(&mut self) -> Vec<(String, u64)> {
        std::mem::take(&mut self.counts).into_iter().collect()
    }
}
