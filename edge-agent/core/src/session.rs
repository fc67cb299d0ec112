//! What every protocol's session shares: the error a refused client sees,
//! the audit event a session's events start from, the idle timer, and the
//! requests about a running session that are the same for every protocol
//! (watch, end from outside).

use gatehouse_audit::{AuditEvent, Decision, EventKind};
use gatehouse_proto::tunnel::SessionOpen;

use crate::{AgentCtx, now_ms};

/// An error for the client: SQLSTATE and message.
pub struct ClientError(pub String, pub String);

pub fn base_event(
    ctx: &AgentCtx,
    open: &SessionOpen,
    kind: EventKind,
    decision: Decision,
) -> AuditEvent {
    AuditEvent {
        id: ctx.new_id(),
        agent: String::new(),
        seq: 0,
        time_ms: now_ms(),
        kind,
        session_id: open.session_id.clone(),
        identity: open.identity.clone(),
        issuer: (!open.issuer.is_empty()).then(|| open.issuer.clone()),
        groups: Some(open.groups.clone()),
        target: open.target.clone(),
        policy_version: open.policy_version.clone(),
        decision,
        statement: None,
        parameters: None,
        outcome: None,
        detail: None,
        masked: None,
    }
}

/// A session refused before its recording started: the sessions index still
/// learns that (and why) it ended.
pub fn refused_unrecorded(ctx: &AgentCtx, open: &SessionOpen, refused: ClientError) -> ClientError {
    let _ = ctx
        .report_tx
        .send(gatehouse_proto::tunnel::SessionRecorded {
            session_id: open.session_id.clone(),
            ended_ms: now_ms(),
            end_reason: format!("refused: {}", refused.1),
            ..Default::default()
        });
    refused
}

/// Resolves once no byte has moved either way for `limit` (`activity` is
/// the time of the last read, in Unix milliseconds).
pub async fn idle(activity: &std::sync::atomic::AtomicI64, limit: std::time::Duration) {
    let limit_ms = i64::try_from(limit.as_millis()).unwrap_or(i64::MAX);
    loop {
        let quiet = now_ms() - activity.load(std::sync::atomic::Ordering::Relaxed);
        if quiet >= limit_ms {
            return;
        }
        let left = u64::try_from(limit_ms - quiet).unwrap_or(0);
        tokio::time::sleep(std::time::Duration::from_millis(left.max(10))).await;
    }
}

/// Streams a running session's recorded events, a JSON line each, until it
/// ends or the viewer goes away. A viewer that falls behind is told how many
/// events it missed.
pub async fn watch(ctx: &AgentCtx, open: &SessionOpen, send: &mut quinn::SendStream) {
    let Some(mut live) = ctx.running.watch(&open.session_id) else {
        tracing::info!(session_id = %open.session_id, "watch of a session not running here");
        return;
    };
    tracing::info!(session_id = %open.session_id, "session watched");
    loop {
        let line = match live.recv().await {
            Ok(line) => line,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                bytes::Bytes::from(format!("{{\"missed\":{n}}}"))
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
        let mut out = Vec::with_capacity(line.len() + 1);
        out.extend_from_slice(&line);
        out.push(b'\n');
        if send.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// Ends a running session for the control plane and waits (bounded) until
/// it has: its client told, its recording sealed. False when it does not
/// run here.
pub async fn end_from_outside(ctx: &AgentCtx, session_id: &str, reason: &str) -> bool {
    if !ctx.running.end(session_id, reason) {
        tracing::info!(session_id, "end of a session not running here");
        return false;
    }
    tracing::warn!(session_id, reason, "session ended from outside");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
    while ctx.running.is_running(session_id) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    true
}
