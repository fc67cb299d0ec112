//! The agent's connection to the control plane.
//!
//! The agent only dials out. It keeps one QUIC connection with keep-alives,
//! reconnects with jittered exponential backoff, and on each connection:
//! sends hello, learns the committed audit high water, re-sends every audit
//! event not yet acknowledged (kept in the fsync'd [`AuditSpool`] across
//! restarts), and accepts session streams.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use gatehouse_audit::AuditEvent;
use gatehouse_proto::tunnel::{
    AgentMessage, AuditBatch, Heartbeat, Hello, ServerMessage, SessionRecorded, agent_message,
    server_message,
};
use gatehouse_proto::{frame, read_frame};
use rand::Rng;
use tokio::sync::mpsc;

use crate::PendingAudit;
use crate::identity::{IdentityFiles, client_endpoint, client_tls};
use crate::spool::{AuditSpool, SpoolError};
use crate::{AgentCtx, AgentQueues, now_ms};

const HEARTBEAT: Duration = Duration::from_secs(5);
const MAX_BATCH: usize = 2048;
const MAX_INFLIGHT_BATCHES: usize = 8;
/// A batch smaller than [`MAX_BATCH`] waits for the next linger tick, so a
/// steady trickle of statements costs the control plane one Raft entry per
/// tick instead of one per statement. Sessions never wait for shipping
/// (only for their spool fsync), so this delays evidence reaching the
/// control plane by at most this much, not the clients. Each Raft entry
/// costs the control plane two fsync'd redb commits (log and state
/// machine), so fewer, larger entries are what keep its CPU down.
const LINGER: Duration = Duration::from_millis(50);

/// Audit events and session reports not yet acknowledged by the control
/// plane. Survives reconnects; everything in it is re-sent on a new connection.
#[derive(Default)]
struct Outbox {
    events: VecDeque<AuditEvent>,
    /// How many of `events` (from the front) are sent on this connection.
    sent: usize,
    /// Sizes of the batches awaiting acknowledgement, oldest first.
    inflight: VecDeque<usize>,
    reports: VecDeque<SessionRecorded>,
}

/// Runs until the process is stopped.
pub async fn run(ctx: Arc<AgentCtx>, mut queues: AgentQueues) -> anyhow::Result<()> {
    let files = IdentityFiles::new(&ctx.config.data_dir);
    let (spool, pending) = AuditSpool::open(&ctx.config.data_dir.join("audit"))?;
    if !pending.is_empty() {
        tracing::info!(
            events = pending.len(),
            "re-sending audit events not acknowledged before the restart"
        );
    }
    // New events must sort after the ones still waiting.
    ctx.raise_seq(pending.iter().map(|e| e.seq).max().unwrap_or(0));
    let mut outbox = Outbox {
        events: pending.into(),
        ..Default::default()
    };
    let spool = Arc::new(SharedSpool {
        spool: std::sync::Mutex::new(spool),
        acks: std::sync::atomic::AtomicU64::new(0),
    });
    let shipping = Arc::new(Shipping::default());
    let (dead_tx, mut spool_dead) = tokio::sync::oneshot::channel::<SpoolError>();
    let audit_rx = std::mem::replace(&mut queues.audit_rx, mpsc::channel(1).1);
    {
        let spool = spool.clone();
        std::thread::Builder::new()
            .name("audit-spool".into())
            .spawn({
                let shipping = shipping.clone();
                move || spool_writer(spool, audit_rx, &shipping, dead_tx)
            })?;
    }
    let mut backoff = Duration::from_millis(200);
    loop {
        match connect_fastest(&ctx, &files).await {
            Ok((server, endpoint, conn)) => {
                backoff = Duration::from_millis(200);
                tracing::info!(%server, "connected to control plane");
                let (result, fatal) = tokio::select! {
                    r = serve_connection(&ctx, &conn, &shipping, &mut queues, &mut outbox, &spool) => {
                        let fatal = r.as_ref().err().is_some_and(|e| e.downcast_ref::<SpoolError>().is_some());
                        (r, fatal)
                    }
                    e = &mut spool_dead => {
                        let e = e.map(anyhow::Error::from).unwrap_or_else(|_| anyhow::anyhow!("audit spool writer stopped"));
                        (Err(e), true)
                    }
                };
                if fatal {
                    // Evidence cannot be made durable: stop rather than relay unrecorded actions.
                    conn.close(1u32.into(), b"audit spool failed");
                    return result;
                }
                match result {
                    Ok(()) => tracing::info!(%server, "control plane connection closed"),
                    Err(e) => tracing::warn!(%server, error = %e, "control plane connection lost"),
                }
                conn.close(0u32.into(), b"reconnecting");
                endpoint.close(0u32.into(), b"reconnecting");
                // Nothing in flight survives the connection.
                outbox.sent = 0;
                outbox.inflight.clear();
                // Another node is likely up: race them again at once.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(e) => tracing::warn!(error = %e, "cannot reach the control plane"),
        }
        outbox.sent = 0;
        outbox.inflight.clear();
        let jitter = rand::rng().random_range(0..=backoff.as_millis() as u64 / 2);
        tokio::time::sleep(backoff + Duration::from_millis(jitter)).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// Dials every configured node at once and keeps the first connection to
/// complete its handshake: the agent prefers the node it reaches fastest,
/// and a dead node simply loses the race. The other attempts are dropped.
async fn connect_fastest(
    ctx: &AgentCtx,
    files: &IdentityFiles,
) -> anyhow::Result<(std::net::SocketAddr, quinn::Endpoint, quinn::Connection)> {
    let attempts = ctx.config.servers.iter().map(|server| {
        Box::pin(async move {
            connect(ctx, files, *server)
                .await
                .map(|(endpoint, conn)| (*server, endpoint, conn))
                .map_err(|e| format!("{server}: {e:#}"))
        })
    });
    futures::future::select_ok(attempts)
        .await
        .map(|(won, _losers)| won)
        .map_err(|last| anyhow::anyhow!("no node answered (last: {last})"))
}

async fn connect(
    ctx: &AgentCtx,
    files: &IdentityFiles,
    server: std::net::SocketAddr,
) -> anyhow::Result<(quinn::Endpoint, quinn::Connection)> {
    let tls = client_tls(files)?;
    let mut qcfg = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls)?,
    ));
    // Keep-alives every 500 ms keep NAT mappings fresh (UDP mappings can
    // expire in 30 s) and let a dead node be noticed after 3 s of silence
    // (six missed keep-alives); the agent then races the other nodes.
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_millis(500)));
    transport.max_idle_timeout(Some(quinn::IdleTimeout::try_from(Duration::from_secs(3))?));
    // Otherwise quinn's defaults, measured for request/response traffic:
    // about one packet each way per statement already carries the ACKs; the
    // ACK-frequency extension (thresholds of 10 and 20 packets) cut packets
    // per transaction from 1.23 to 0.98 at 8 clients without changing CPU
    // per transaction or throughput, so it is not asked for.
    transport.mtu_discovery_config(Some(bulk_mtu()));
    qcfg.transport_config(Arc::new(transport));
    let endpoint = client_endpoint(server)?;
    let conn = tokio::time::timeout(
        Duration::from_secs(3),
        endpoint.connect_with(qcfg, server, &ctx.config.server_name)?,
    )
    .await
    .map_err(|_| anyhow::anyhow!("connect timed out"))??;
    Ok((endpoint, conn))
}

/// Path MTU discovery up to the largest UDP payload instead of Ethernet's
/// 1452 bytes: where the path allows more (one host, a jumbo-frame network)
/// a bulk copy takes a fraction of the packets, and with them of the CPU;
/// on an ordinary path the larger probes are lost and the packet size stays
/// as it was.
fn bulk_mtu() -> quinn::MtuDiscoveryConfig {
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(u16::MAX);
    mtu
}

/// Sessions this agent holds: running ones, and those whose recording is
/// still in the spool (not yet reported to the index).
fn held_sessions(ctx: &AgentCtx) -> Vec<String> {
    let mut ids = ctx.running.ids();
    if let Ok(dirs) = std::fs::read_dir(crate::recorder::spool_dir(ctx)) {
        ids.extend(
            dirs.flatten()
                .filter(|d| d.path().is_dir())
                .filter_map(|d| d.file_name().into_string().ok()),
        );
    }
    ids.sort();
    ids.dedup();
    ids
}

async fn serve_connection(
    ctx: &Arc<AgentCtx>,
    conn: &quinn::Connection,
    shipping: &Shipping,
    queues: &mut AgentQueues,
    outbox: &mut Outbox,
    spool: &SharedSpool,
) -> anyhow::Result<()> {
    let (mut send, mut recv) = conn.open_bi().await?;
    let hello = AgentMessage {
        msg: Some(agent_message::Msg::Hello(Hello {
            agent: ctx.config.name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            targets: ctx.config.targets.iter().map(|t| t.name.clone()).collect(),
            sessions: held_sessions(ctx),
        })),
    };
    send.write_all(&frame(&hello)).await?;
    let ack = match read_frame::<ServerMessage, _>(&mut recv).await? {
        Some(ServerMessage {
            msg: Some(server_message::Msg::HelloAck(a)),
        }) => a,
        _ => anyhow::bail!("control plane did not acknowledge hello"),
    };
    ctx.raise_seq(ack.audit_high_water);
    let keys = serde_json::from_str::<serde_json::Value>(&ack.token_keys)
        .ok()
        .and_then(|v| v.get("keys").and_then(|k| k.as_array()).map(Vec::len))
        .unwrap_or(0);
    if let Ok(mut k) = ctx.token_keys.lock() {
        *k = ack.token_keys.clone();
    }
    // The control plane has registered this connection: sessions come here.
    tracing::info!(
        high_water = ack.audit_high_water,
        token_keys = keys,
        "serving sessions"
    );
    // After the hello, approval streams may use this connection.
    if let Ok(mut c) = ctx.server_conn.lock() {
        *c = Some(conn.clone());
    }

    // Replies are read by their own task: reading a frame is not cancel-safe.
    let (reply_tx, mut reply_rx) = mpsc::channel::<ServerMessage>(64);
    let reader = tokio::spawn(async move {
        while let Ok(Some(m)) = read_frame::<ServerMessage, _>(&mut recv).await {
            if reply_tx.send(m).await.is_err() {
                break;
            }
        }
    });
    // Session reports not acknowledged on an earlier connection.
    for r in &outbox.reports {
        send.write_all(&frame(&AgentMessage {
            msg: Some(agent_message::Msg::Recorded(r.clone())),
        }))
        .await?;
    }
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    let mut linger = tokio::time::interval(LINGER);
    linger.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut partial = true;
    // Events durable in the spool, not yet taken into the outbox, from
    // before this connection.
    let mut waiting = shipping.len() > 0;
    let result = loop {
        flush(&mut send, outbox, partial).await?;
        partial = false;
        tokio::select! {
            incoming = conn.accept_bi() => {
                let (s, r) = incoming?;
                let ctx = ctx.clone();
                tokio::spawn(async move { crate::stream::session(ctx, s, r).await });
            }
            reply = reply_rx.recv() => {
                let Some(reply) = reply else { break Ok(()) };
                let acked = on_reply(ctx, reply, outbox);
                if acked > 0 {
                    spool.ack(acked as u64)?;
                }
            }
            () = shipping.ready.notified() => {
                // A full batch is shipped at once; a partial one waits for
                // the linger tick (armed now that something waits).
                waiting = true;
                if shipping.len() >= MAX_BATCH {
                    shipping.drain_into(&mut outbox.events);
                }
            }
            report = queues.report_rx.recv() => {
                let Some(report) = report else { break Ok(()) };
                send.write_all(&frame(&AgentMessage { msg: Some(agent_message::Msg::Recorded(report.clone())) })).await?;
                outbox.reports.push_back(report);
            }
            _ = linger.tick(), if waiting || outbox.sent < outbox.events.len() => {
                shipping.drain_into(&mut outbox.events);
                waiting = false;
                partial = true;
            }
            _ = heartbeat.tick() => {
                send.write_all(&frame(&AgentMessage {
                    msg: Some(agent_message::Msg::Heartbeat(Heartbeat { sent_ms: now_ms() })),
                })).await?;
            }
        }
    };
    reader.abort();
    result
}

/// The spool and acknowledgements not yet applied to it. Whoever holds the
/// lock next applies them, so the connection task never waits for an fsync.
struct SharedSpool {
    spool: std::sync::Mutex<AuditSpool>,
    acks: std::sync::atomic::AtomicU64,
}

impl SharedSpool {
    fn ack(&self, n: u64) -> Result<(), SpoolError> {
        self.acks.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
        match self.spool.try_lock() {
            Ok(mut s) => self.apply_acks(&mut s),
            Err(_) => Ok(()),
        }
    }

    fn apply_acks(&self, s: &mut AuditSpool) -> Result<(), SpoolError> {
        match self.acks.swap(0, std::sync::atomic::Ordering::SeqCst) {
            0 => Ok(()),
            n => s.ack(n),
        }
    }
}

/// Events durable in the spool on their way to the shipper. The connection
/// task is woken only when the queue stops being empty or fills a batch,
/// not for every group: it takes partial batches on its linger tick.
#[derive(Default)]
struct Shipping {
    events: std::sync::Mutex<Vec<AuditEvent>>,
    ready: tokio::sync::Notify,
}

impl Shipping {
    /// The queue (a panic while it was held loses no event: take it anyway).
    fn queue(&self) -> std::sync::MutexGuard<'_, Vec<AuditEvent>> {
        match self.events.lock() {
            Ok(q) => q,
            Err(p) => p.into_inner(),
        }
    }

    fn push(&self, group: &mut Vec<AuditEvent>) {
        let mut q = self.queue();
        let was_empty = q.is_empty();
        q.append(group);
        let full = q.len() >= MAX_BATCH;
        drop(q);
        if was_empty || full {
            self.ready.notify_one();
        }
    }

    fn len(&self) -> usize {
        self.queue().len()
    }

    fn drain_into(&self, out: &mut VecDeque<AuditEvent>) {
        out.extend(self.queue().drain(..));
    }
}

/// Appends queued events to the spool and fsyncs them, a group at a time,
/// whether or not the control plane is reachable; then releases the sessions
/// waiting for them and hands the events, in spool order, to the shipper.
/// On a spool failure every waiting session is refused and the writer stops.
/// Runs on its own thread: every group ends in an fsync.
fn spool_writer(
    spool: Arc<SharedSpool>,
    mut rx: mpsc::Receiver<PendingAudit>,
    out: &Shipping,
    dead: tokio::sync::oneshot::Sender<SpoolError>,
) {
    let mut events = Vec::new();
    let mut waiting = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        let mut next = Some(first);
        while let Some(p) = next {
            events.push(p.event);
            waiting.push(p.durable);
            next = if events.len() < 4096 {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        let written = {
            let mut s = match spool.spool.lock() {
                Ok(s) => s,
                Err(p) => p.into_inner(),
            };
            spool
                .apply_acks(&mut s)
                .and_then(|()| s.append(&events))
                .and_then(|()| s.sync())
        };
        match written {
            Ok(()) => {
                out.push(&mut events);
                for durable in waiting.drain(..) {
                    let _ = durable.send(true);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "audit spool failed: refusing every further action");
                for durable in waiting.drain(..) {
                    let _ = durable.send(false);
                }
                let _ = dead.send(e);
                return;
            }
        }
    }
}

/// Sends unsent audit events: full batches always, a partial one only when
/// `partial`.
async fn flush(
    send: &mut quinn::SendStream,
    outbox: &mut Outbox,
    partial: bool,
) -> anyhow::Result<()> {
    while outbox.sent < outbox.events.len() && outbox.inflight.len() < MAX_INFLIGHT_BATCHES {
        let end = outbox.events.len().min(outbox.sent + MAX_BATCH);
        if end - outbox.sent < MAX_BATCH && !partial {
            break;
        }
        let events = outbox
            .events
            .range(outbox.sent..end)
            .map(AuditEvent::encode)
            .collect();
        send.write_all(&frame(&AgentMessage {
            msg: Some(agent_message::Msg::Audit(AuditBatch { events })),
        }))
        .await?;
        outbox.inflight.push_back(end - outbox.sent);
        outbox.sent = end;
    }
    Ok(())
}

/// Applies a reply; returns how many audit events it acknowledged.
fn on_reply(ctx: &AgentCtx, reply: ServerMessage, outbox: &mut Outbox) -> usize {
    match reply.msg {
        Some(server_message::Msg::AuditAck(_)) => {
            // Batches are committed in the order they were sent.
            if let Some(n) = outbox.inflight.pop_front() {
                outbox.events.drain(..n);
                outbox.sent -= n;
                return n;
            }
            0
        }
        Some(server_message::Msg::RecordedAck(a)) => {
            outbox.reports.retain(|r| r.session_id != a.session_id);
            if let Ok(mut s) = ctx.recorded.lock() {
                s.insert(a.session_id);
            }
            ctx.uploads.notify_one();
            0
        }
        _ => 0,
    }
}
