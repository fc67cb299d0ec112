//! A stream the control plane opens: a session of one protocol, or a
//! request about a running session (cancel, end, watch, policy, check),
//! each handed to the protocol it concerns.

use std::sync::Arc;
use std::time::Duration;

use gatehouse_proto::read_frame;
use gatehouse_proto::tunnel::SessionOpen;

use crate::AgentCtx;

/// How long the control plane has to send the stream's `SessionOpen`.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Handles one session stream until either side ends.
pub async fn session(ctx: Arc<AgentCtx>, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let open =
        match tokio::time::timeout(OPEN_TIMEOUT, read_frame::<SessionOpen, _>(&mut recv)).await {
            Ok(Ok(Some(o))) => o,
            _ => return,
        };
    // Only requests about a session go by its target's kind.
    let of_target = |open: &SessionOpen| ctx.protocols.of_target(&ctx, &open.target);
    if open.cancel {
        if let Some(p) = of_target(&open) {
            p.cancel(ctx.clone(), open).await;
        }
        let _ = send.finish();
        return;
    }
    if open.watch {
        crate::session::watch(&ctx, &open, &mut send).await;
        let _ = send.finish();
        return;
    }
    if open.check {
        let reply = match of_target(&open) {
            Some(p) => p.check(ctx.clone(), open).await,
            None => gatehouse_proto::tunnel::TargetCheck {
                error: format!(
                    "agent {} does not serve target \"{}\"",
                    ctx.config.name, open.target
                ),
                ..Default::default()
            },
        };
        let _ = send.write_all(&gatehouse_proto::frame(&reply)).await;
        let _ = send.finish();
        return;
    }
    if open.adopt_policy {
        let reply = match of_target(&open) {
            Some(p) => p.adopt_policy(ctx.clone(), open).await,
            None => gatehouse_proto::tunnel::SessionEnded::default(),
        };
        let _ = send.write_all(&gatehouse_proto::frame(&reply)).await;
        let _ = send.finish();
        return;
    }
    if !open.end_reason.is_empty() {
        let found =
            crate::session::end_from_outside(&ctx, &open.session_id, &open.end_reason).await;
        let reply = gatehouse_proto::frame(&gatehouse_proto::tunnel::SessionEnded {
            found,
            ..Default::default()
        });
        let _ = send.write_all(&reply).await;
        let _ = send.finish();
        return;
    }
    match ctx.protocols.get(&open.protocol) {
        Some(p) => p.serve(ctx.clone(), open, send, recv).await,
        None => {
            tracing::warn!(session_id = %open.session_id, protocol = %open.protocol, "session stream of an unknown protocol refused");
            let _ = send.reset(0u32.into());
        }
    }
}
