//! The edge agent's core, shared by its protocols: it dials home over
//! QUIC, accepts the session streams the control plane routes to it and
//! hands each to its protocol's crate, records every session and ships
//! audit events.
//!
//! - [`identity`]: enrollment and TLS.
//! - [`tunnel`]: the connection to the control plane (reconnects, control
//!   stream, audit shipping, accepting session streams).
//! - [`stream`]: a stream from the control plane, dispatched by protocol.
//! - [`protocol`]: what a protocol crate implements.
//! - [`session`]: what every protocol's session shares.
//! - [`guard`]: the policy a session opened under, and approvals.
//! - [`recorder`]: the session recording, spooled and uploaded.

pub mod config;
pub mod guard;
pub mod identity;
pub mod protocol;
pub mod recorder;
pub mod session;
pub mod spool;
pub mod stream;
pub mod tunnel;

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use gatehouse_audit::AuditEvent;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use tokio::sync::mpsc;

use crate::config::AgentConfig;

/// Capacity of the audit queue; a full queue makes sessions wait.
pub const AUDIT_QUEUE: usize = 8192;

/// An audit event on its way to the spool, and who waits for it to be durable.
pub struct PendingAudit {
    pub event: AuditEvent,
    pub durable: tokio::sync::oneshot::Sender<bool>,
}

/// State shared by every task of the agent.
pub struct AgentCtx {
    pub config: AgentConfig,
    pub recordings: std::sync::Arc<dyn object_store::ObjectStore>,
    /// The agent's private key (PKCS#8): it signs recording manifests.
    pub signing_key: Vec<u8>,
    /// Wakes the uploader when a chunk or a manifest lands in the spool.
    pub uploads: tokio::sync::Notify,
    /// Sessions whose recording report the control plane committed.
    pub recorded: Mutex<std::collections::HashSet<String>>,
    audit_tx: mpsc::Sender<PendingAudit>,
    pub report_tx: mpsc::UnboundedSender<gatehouse_proto::tunnel::SessionRecorded>,
    seq: AtomicU64,
    rng: Mutex<StdRng>,
    /// Every running session, to end one from outside.
    pub running: Running,
    /// The protocols sessions are handed to.
    pub protocols: protocol::Protocols,
    /// The live connection to the control plane (for approval requests).
    pub server_conn: Mutex<Option<quinn::Connection>>,
    /// The control plane's token-signing public keys (JWKS JSON), as its
    /// last hello acknowledgement gave them.
    pub token_keys: Mutex<String>,
}

/// Running sessions by id, each with the sender that ends it from outside
/// (a kill, a revocation, a removed rule): the reason goes to its client.
#[derive(Default)]
pub struct Running(Mutex<HashMap<String, RunningSession>>);

/// What the agent can do to a running session from outside.
struct RunningSession {
    end: tokio::sync::watch::Sender<Option<String>>,
    /// Every recorded event, as its recording line, for live viewers.
    live: tokio::sync::broadcast::Sender<bytes::Bytes>,
    policy: Option<SessionPolicy>,
}

/// A running session's policy, for a new version to be put in force.
#[derive(Clone)]
pub struct SessionPolicy {
    /// The session's guard (none when it opened without a document).
    pub guard: Option<std::sync::Arc<Mutex<gatehouse_policy::Guard>>>,
    /// The version its statements' events cite.
    pub version: std::sync::Arc<Mutex<String>>,
    pub open: gatehouse_proto::tunnel::SessionOpen,
}

/// Removes a session from [`Running`] when it ends.
pub struct RunningGuard<'a> {
    running: &'a Running,
    session_id: String,
}

impl Running {
    /// The running sessions' ids.
    pub fn ids(&self) -> Vec<String> {
        self.0
            .lock()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Registers a session; the receiver changes when it must end, and
    /// what is sent on the broadcast sender reaches live viewers.
    pub fn register(
        &self,
        session_id: &str,
    ) -> (
        RunningGuard<'_>,
        tokio::sync::watch::Receiver<Option<String>>,
        tokio::sync::broadcast::Sender<bytes::Bytes>,
    ) {
        let (end, rx) = tokio::sync::watch::channel(None);
        // A viewer more than this many events behind misses some (and is
        // told so); the session never waits for a viewer.
        let (live, _) = tokio::sync::broadcast::channel(1024);
        if let Ok(mut m) = self.0.lock() {
            m.insert(
                session_id.to_string(),
                RunningSession {
                    end,
                    live: live.clone(),
                    policy: None,
                },
            );
        }
        (
            RunningGuard {
                running: self,
                session_id: session_id.to_string(),
            },
            rx,
            live,
        )
    }

    /// Keeps what a new policy version needs to take over the session.
    pub fn set_policy(&self, session_id: &str, p: SessionPolicy) {
        if let Ok(mut m) = self.0.lock()
            && let Some(s) = m.get_mut(session_id)
        {
            s.policy = Some(p);
        }
    }

    /// A running session's policy handles.
    pub fn policy(&self, session_id: &str) -> Option<SessionPolicy> {
        self.0.lock().ok()?.get(session_id)?.policy.clone()
    }

    /// A live view of a running session's recorded events.
    pub fn watch(
        &self,
        session_id: &str,
    ) -> Option<tokio::sync::broadcast::Receiver<bytes::Bytes>> {
        self.0
            .lock()
            .ok()?
            .get(session_id)
            .map(|s| s.live.subscribe())
    }

    /// Tells a running session to end; false when it is not running here.
    pub fn end(&self, session_id: &str, reason: &str) -> bool {
        self.0
            .lock()
            .ok()
            .and_then(|m| {
                m.get(session_id)
                    .map(|s| s.end.send(Some(reason.to_string())))
            })
            .is_some()
    }

    pub fn is_running(&self, session_id: &str) -> bool {
        self.0.lock().is_ok_and(|m| m.contains_key(session_id))
    }
}

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.running.0.lock() {
            m.remove(&self.session_id);
        }
    }
}

/// The receiving ends the tunnel task drains.
pub struct AgentQueues {
    pub audit_rx: mpsc::Receiver<PendingAudit>,
    pub report_rx: mpsc::UnboundedReceiver<gatehouse_proto::tunnel::SessionRecorded>,
}

// === impl AgentCtx ===

impl AgentCtx {
    pub fn new(
        config: AgentConfig,
        recordings: std::sync::Arc<dyn object_store::ObjectStore>,
        signing_key: Vec<u8>,
        protocols: protocol::Protocols,
    ) -> (Self, AgentQueues) {
        let (audit_tx, audit_rx) = mpsc::channel(AUDIT_QUEUE);
        let (report_tx, report_rx) = mpsc::unbounded_channel();
        (
            Self {
                config,
                recordings,
                signing_key,
                uploads: tokio::sync::Notify::new(),
                recorded: Mutex::new(Default::default()),
                audit_tx,
                report_tx,
                seq: AtomicU64::new(0),
                rng: Mutex::new(StdRng::from_os_rng()),
                running: Running::default(),
                protocols,
                server_conn: Mutex::new(None),
                token_keys: Mutex::new(String::new()),
            },
            AgentQueues {
                audit_rx,
                report_rx,
            },
        )
    }

    /// 128 random bits as hex, from a generator seeded once.
    pub fn new_id(&self) -> String {
        let mut b = [0u8; 16];
        match self.rng.lock() {
            Ok(mut r) => r.fill_bytes(&mut b),
            Err(p) => p.into_inner().fill_bytes(&mut b),
        }
        hex::encode(b)
    }

    /// Raises the sequence counter to at least `floor` (the committed high
    /// water the control plane reports on every connect).
    pub fn raise_seq(&self, floor: u64) {
        self.seq.fetch_max(floor, Ordering::SeqCst);
    }

    /// Stamps the event with this agent's name and next sequence number,
    /// queues it (waiting while the queue is full: back-pressure, never
    /// drop), and returns once it is fsync'd in the agent's spool.
    pub async fn audit(&self, ev: AuditEvent) -> Result<(), AuditClosed> {
        self.queue_audit(ev).await?.wait().await
    }

    /// Stamps and queues the event like [`Self::audit`] without waiting for
    /// its fsync: the caller waits on the returned [`Durable`] before it
    /// lets anything out that depends on the event. Events queued together
    /// share one fsync group.
    pub async fn queue_audit(&self, mut ev: AuditEvent) -> Result<Durable, AuditClosed> {
        ev.agent = self.config.name.clone();
        ev.seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        let (durable, done) = tokio::sync::oneshot::channel();
        self.audit_tx
            .send(PendingAudit { event: ev, durable })
            .await
            .map_err(|_| AuditClosed)?;
        Ok(Durable(done))
    }
}

/// A queued audit event's fsync, still to come.
pub struct Durable(tokio::sync::oneshot::Receiver<bool>);

impl Durable {
    /// Returns once the event is fsync'd in the spool; an error when the
    /// spool failed (the action must not proceed).
    pub async fn wait(self) -> Result<(), AuditClosed> {
        match self.0.await {
            Ok(true) => Ok(()),
            _ => Err(AuditClosed),
        }
    }
}

/// The audit pipeline has stopped; sessions must not proceed.
#[derive(Debug, thiserror::Error)]
#[error("the audit pipeline is closed")]
pub struct AuditClosed;

/// Wall-clock time in Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Runs blocking work on a multi-threaded runtime's worker without stalling
/// the tasks queued on it (directly anywhere else): the session relay for a
/// large message, the recorder for sealing a chunk.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}
