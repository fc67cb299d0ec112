//! A stream the control plane opens: a session of one protocol, or a
//! request about a running session (cancel, end, watch, policy, check).

use std::sync::Arc;

use gatehouse_proto::read_frame;
use gatehouse_proto::tunnel::SessionOpen;

use crate::AgentCtx;
use crate::upstream::CONNECT_TIMEOUT;

/// Handles one session stream until either side ends.
pub async fn session(ctx: Arc<AgentCtx>, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let open = match tokio::time::timeout(CONNECT_TIMEOUT, read_frame::<SessionOpen, _>(&mut recv))
        .await
    {
        Ok(Ok(Some(o))) => o,
        _ => return,
    };
    if open.cancel {
        crate::pg::cancel(&ctx, &open).await;
        let _ = send.finish();
        return;
    }
    if open.watch {
        crate::session::watch(&ctx, &open, &mut send).await;
        let _ = send.finish();
        return;
    }
    if open.check {
        let reply = gatehouse_proto::frame(&crate::pg::check_target(&ctx, &open).await);
        let _ = send.write_all(&reply).await;
        let _ = send.finish();
        return;
    }
    if open.adopt_policy {
        let reply = gatehouse_proto::frame(&crate::pg::adopt_policy(&ctx, &open).await);
        let _ = send.write_all(&reply).await;
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
    match open.protocol.as_str() {
        "" | "postgres" => crate::pg::serve(&ctx, open, &mut send, &mut recv).await,
        "ssh" => crate::ssh::serve(ctx.clone(), open, send, recv).await,
        other => {
            tracing::warn!(session_id = %open.session_id, protocol = other, "session stream of an unknown protocol refused");
            let _ = send.reset(0u32.into());
        }
    }
}
