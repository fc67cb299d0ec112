//! The policy a session opened under, and approvals: a held action waits
//! for the control plane's decision (every protocol's guardrails hold
//! actions the same way).

use std::sync::Arc;

use gatehouse_policy::{Approvals, PolicyDoc};
use gatehouse_proto::tunnel::SessionOpen;

/// The policy document the session opened under; `None` when none was
/// ever applied (every statement runs, as before guardrails existed).
pub fn policy_of(open: &SessionOpen) -> Result<Option<Arc<PolicyDoc>>, String> {
    if open.policy_document.is_empty() {
        return Ok(None);
    }
    PolicyDoc::from_canonical(&open.policy_document)
        .map(|d| Some(Arc::new(d)))
        .map_err(|e| format!("policy document unreadable: {e}"))
}

/// What held an action: the rule and its message.
pub struct Held {
    pub rule: String,
    pub message: String,
}

/// Asks the control plane to approve a held statement and waits for the
/// answer (fail closed: no connection, no answer, or an error refuses it).
pub async fn approve(
    ctx: &crate::AgentCtx,
    open: &SessionOpen,
    settings: &Approvals,
    text: &str,
    held: &Held,
    reason: String,
    progress: Option<tokio::sync::oneshot::Sender<String>>,
) -> Result<(), String> {
    use gatehouse_proto::tunnel::{ApprovalAnswer, ApprovalAsk, approval_answer::Outcome};
    let refuse = |message: String| Err(message);
    let Some(conn) = ctx.server_conn.lock().ok().and_then(|c| c.clone()) else {
        return refuse(format!(
            "{}; it needs an approval, and the control plane is unreachable",
            held.message
        ));
    };
    let wait_ms = i64::try_from(settings.wait_seconds.saturating_mul(1000)).unwrap_or(i64::MAX);
    let ask = ApprovalAsk {
        session_id: open.session_id.clone(),
        identity: open.identity.clone(),
        issuer: open.issuer.clone(),
        groups: open.groups.clone(),
        target: open.target.clone(),
        statement: text.to_string(),
        rule: held.rule.clone(),
        message: held.message.clone(),
        policy_version: open.policy_version.clone(),
        reason: if reason.is_empty() {
            open.startup_params
                .get("application_name")
                .cloned()
                .unwrap_or_default()
        } else {
            reason
        },
        wait_ms,
        approvals_required: settings.required,
        approver_groups: settings.approver_groups.clone(),
        grant_minutes: settings.grant_minutes,
        progress: progress.is_some() && wait_ms > 0,
    };
    let exchange = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(&gatehouse_proto::frame(&ask))
            .await
            .map_err(|e| e.to_string())?;
        // Without a wait, the first answer is the last.
        let mut progress = progress.filter(|_| wait_ms > 0);
        loop {
            let a = gatehouse_proto::read_frame::<ApprovalAnswer, _>(&mut recv)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| "no answer".to_string())?;
            // The request exists and is waited for: say which it is.
            if a.outcome == Outcome::Pending as i32
                && let Some(p) = progress.take()
            {
                let _ = p.send(a.request_id);
                continue;
            }
            return Ok::<_, String>(a);
        }
    };
    let deadline = std::time::Duration::from_millis(u64::try_from(wait_ms).unwrap_or(0))
        + std::time::Duration::from_secs(15);
    let answer = match tokio::time::timeout(deadline, exchange).await {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => return refuse(format!("{}; approval failed: {e}", held.message)),
        Err(_) => return refuse(format!("{}; no approval decision arrived", held.message)),
    };
    match Outcome::try_from(answer.outcome).unwrap_or(Outcome::Unspecified) {
        Outcome::Approved => Ok(()),
        Outcome::Denied => refuse(format!(
            "access request {} was denied by {}: {}",
            answer.request_id, answer.reviewer, answer.reason
        )),
        Outcome::Expired => refuse(format!(
            "access request {} expired without an approval{}",
            answer.request_id,
            if answer.reason.is_empty() {
                String::new()
            } else {
                format!(" ({})", answer.reason)
            }
        )),
        Outcome::Pending => refuse(format!(
            "{}; approval requested as request {} — run the statement again once it is approved",
            held.message, answer.request_id
        )),
        Outcome::Unspecified => refuse(format!(
            "{}; approval failed: {}",
            held.message, answer.reason
        )),
    }
}
