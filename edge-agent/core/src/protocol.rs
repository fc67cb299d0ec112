//! A protocol's agent side, as the core sees it: the sessions of one kind
//! of target and the requests about them that differ by protocol. The
//! binary registers each protocol crate's implementation; the core knows
//! none of them.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use gatehouse_proto::tunnel::{SessionEnded, SessionOpen, TargetCheck};

use crate::AgentCtx;

/// A boxed future, as a protocol's entry points return it.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One protocol's sessions.
pub trait Protocol: Send + Sync + 'static {
    /// Runs one session stream (its `SessionOpen` read) until either side
    /// ends.
    fn serve(
        self: Arc<Self>,
        ctx: Arc<AgentCtx>,
        open: SessionOpen,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) -> BoxFuture<'static, ()>;

    /// A verified client's request to cancel what a running session does
    /// (PostgreSQL's CancelRequest); ignored where the protocol has none.
    fn cancel(self: Arc<Self>, ctx: Arc<AgentCtx>, open: SessionOpen) -> BoxFuture<'static, ()> {
        let _ = (ctx, open);
        Box::pin(async {})
    }

    /// What the agent's credential may do on the target beyond reading.
    fn check(
        self: Arc<Self>,
        ctx: Arc<AgentCtx>,
        open: SessionOpen,
    ) -> BoxFuture<'static, TargetCheck> {
        let _ = ctx;
        Box::pin(async move {
            TargetCheck {
                error: format!(
                    "target \"{}\": the check is made for PostgreSQL targets only",
                    open.target
                ),
                ..Default::default()
            }
        })
    }

    /// Puts a new policy version in force for a running session
    /// (`enforce: immediate`); where the protocol cannot, the session goes
    /// on under the version it started with (not found).
    fn adopt_policy(
        self: Arc<Self>,
        ctx: Arc<AgentCtx>,
        open: SessionOpen,
    ) -> BoxFuture<'static, SessionEnded> {
        let _ = (ctx, open);
        Box::pin(async { SessionEnded::default() })
    }
}

/// The protocols this agent serves, by name (`postgres`, `ssh`: a target's
/// `kind` and a session's `SessionOpen.protocol`).
#[derive(Clone, Default)]
pub struct Protocols(HashMap<&'static str, Arc<dyn Protocol>>);

impl Protocols {
    pub fn with(mut self, name: &'static str, p: Arc<dyn Protocol>) -> Self {
        self.0.insert(name, p);
        self
    }

    /// The protocol of a session stream (an empty name is PostgreSQL, as
    /// control planes before SSH sent it).
    pub fn get(&self, name: &str) -> Option<Arc<dyn Protocol>> {
        let name = if name.is_empty() { "postgres" } else { name };
        self.0.get(name).cloned()
    }

    /// The protocol of one of this agent's targets.
    pub fn of_target(&self, ctx: &AgentCtx, target: &str) -> Option<Arc<dyn Protocol>> {
        self.get(&ctx.config.target(target)?.kind)
    }
}
