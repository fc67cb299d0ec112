//! PostgreSQL client ingress.
//!
//! Clients connect with their own tools: `user=<target>` or
//! `<db_user>@<target>`, `dbname=<database on the target>`, password = an
//! API key. The ingress requires TLS, asks for the password in clear (inside
//! TLS), verifies the caller and the access rule, records the session in the
//! index, and opens a stream to the agent serving the target. From then on
//! it is a byte pipe: the agent speaks to the client.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::BytesMut;
use gatehouse_cp_raft::Command;
use gatehouse_cp_raft::state::SessionRecord;
use gatehouse_pgwire_inspect::build::{self, Severity};
use gatehouse_proto::frame;
use gatehouse_proto::tunnel::SessionOpen;
use pgwire::messages::cancel::CancelRequest;
use pgwire::messages::startup::SecretKey;
use pgwire::messages::{DecodeContext, PgWireFrontendMessage, SslNegotiationMetaMessage};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::TlsChain;
use crate::cluster::{Cluster, now_ms};
use crate::limits::{ConnLimits, LoginThrottle};
use crate::tunnel::AgentRegistry;

/// What the ingress needs beyond the cluster: its limits before
/// authentication and the failed-login throttle.
#[derive(Clone)]
pub struct Gate {
    pub limits: Arc<ConnLimits>,
    pub throttle: Arc<LoginThrottle>,
    pub ids: Arc<crate::identity::Identities>,
}

/// Why a connection was refused before reaching a target. Each maps to the
/// SQLSTATE the client sees.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("Gatehouse requires TLS: connect with sslmode=require or stronger")]
    TlsRequired,
    #[error("password authentication failed for user \"{0}\": {1}")]
    BadToken(String, String),
    #[error("password authentication failed for user \"{0}\"")]
    BadCredentials(String),
    /// A missing target and one the caller may not use look the same to
    /// the caller: names are not disclosed to someone without a rule.
    #[error("{identity} may not use a target named \"{target}\"")]
    NotAllowed { identity: String, target: String },
    #[error("too many failed logins from {addr}; retry in {secs} s")]
    Throttled { addr: std::net::IpAddr, secs: u64 },
    #[error("target \"{target}\" is unavailable: {reason}")]
    Unavailable { target: String, reason: String },
    #[error("the session could not be recorded in the index; refusing to proceed")]
    NotDurable,
    #[error("the control plane cannot confirm the current access state; retry shortly")]
    StateUnconfirmed,
    #[error("protocol violation during startup: {0}")]
    Protocol(String),
}

impl Refusal {
    fn sqlstate(&self) -> &'static str {
        match self {
            Refusal::TlsRequired | Refusal::NotAllowed { .. } | Refusal::Throttled { .. } => {
                "28000"
            }
            Refusal::BadCredentials(_) | Refusal::BadToken(..) => "28P01",
            Refusal::Unavailable { .. } | Refusal::StateUnconfirmed => "57P03",
            Refusal::NotDurable => "58000",
            Refusal::Protocol(_) => "08P01",
        }
    }
}

/// TLS for the ingress, with the node's certificate.
pub fn tls_acceptor(chain: &TlsChain) -> anyhow::Result<TlsAcceptor> {
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(chain.cert_pem.as_bytes()).collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(chain.key_pem.as_bytes())?;
    let cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("ingress TLS configuration")?;
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// Accepts PostgreSQL clients forever.
pub async fn serve(
    listener: TcpListener,
    tls: TlsAcceptor,
    cluster: Arc<Cluster>,
    agents: AgentRegistry,
    gate: Gate,
) {
    let accept_errors = crate::limits::LogEvery::new(Duration::from_secs(10));
    let startup_errors = Arc::new(crate::limits::LogEvery::new(Duration::from_secs(10)));
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                if let Some(n) = accept_errors.tick() {
                    tracing::warn!(error = %e, count = n, "accept failed");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Over the cap for its address or in total: closed at once, before
        // a byte is read.
        let Some(slot) = gate.limits.admit(peer.ip()) else {
            // One non-blocking write of the reason, then close.
            let _ = sock.try_write(&build::error_response(
                Severity::Fatal,
                "53300",
                "too many connections from your address are still authenticating; retry shortly",
            ));
            drop(sock);
            continue;
        };
        let _ = sock.set_nodelay(true);
        let (tls, cluster, agents, gate) =
            (tls.clone(), cluster.clone(), agents.clone(), gate.clone());
        let startup_errors = startup_errors.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(sock, peer, tls, cluster, agents, gate, slot).await
                && let Some(n) = startup_errors.tick()
            {
                tracing::info!(%peer, error = %e, count = n, "client connection ended before a session");
            }
        });
    }
}

/// One stage before authentication, under its deadline.
async fn stage<T>(
    what: &'static str,
    limit: Duration,
    f: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::time::timeout(limit, f)
        .await
        .map_err(|_| anyhow::anyhow!("{what} did not finish within {} s", limit.as_secs()))?
}

/// What the client asked for in its StartupMessage.
struct Startup {
    params: BTreeMap<String, String>,
}

async fn handle(
    mut sock: TcpStream,
    peer: SocketAddr,
    tls: TlsAcceptor,
    cluster: Arc<Cluster>,
    agents: AgentRegistry,
    gate: Gate,
    slot: crate::limits::ConnSlot,
) -> anyhow::Result<()> {
    let limit = gate.limits.stage();
    let mut ctx = DecodeContext::default();
    let mut buf = BytesMut::with_capacity(1024);
    // SSL negotiation on the plain socket.
    loop {
        let msg = match stage(
            "SSL negotiation",
            limit,
            next_frontend(&mut sock, &mut buf, &ctx),
        )
        .await
        {
            Ok(m) => m,
            Err(e) => {
                refuse(&mut sock, &Refusal::Protocol(e.to_string())).await;
                return Err(e);
            }
        };
        match msg {
            PgWireFrontendMessage::SslNegotiation(SslNegotiationMetaMessage::PostgresSsl(_)) => {
                sock.write_all(b"S").await?;
                break;
            }
            PgWireFrontendMessage::SslNegotiation(SslNegotiationMetaMessage::PostgresGss(_)) => {
                sock.write_all(b"N").await?;
            }
            PgWireFrontendMessage::SslNegotiation(SslNegotiationMetaMessage::None) => {
                // Startup or cancel without TLS. libpq sends its
                // CancelRequest in clear on a new connection; the secret it
                // carries is all the authentication a cancel has, as with
                // PostgreSQL itself.
                ctx.awaiting_frontend_ssl = false;
                let msg =
                    match stage("startup", limit, next_frontend(&mut sock, &mut buf, &ctx)).await {
                        Ok(m) => m,
                        Err(e) => {
                            refuse(&mut sock, &Refusal::Protocol(e.to_string())).await;
                            return Err(e);
                        }
                    };
                match msg {
                    PgWireFrontendMessage::Startup(_) => {
                        refuse(&mut sock, &Refusal::TlsRequired).await;
                    }
                    PgWireFrontendMessage::CancelRequest(c) => {
                        cancel(c, peer, &cluster, &agents).await;
                    }
                    _ => {}
                }
                return Ok(());
            }
            _ => return Ok(()),
        }
    }
    anyhow::ensure!(buf.is_empty(), "client sent data before the TLS handshake");
    let mut stream = stage("TLS handshake", limit, async {
        tls.accept(sock).await.context("TLS handshake")
    })
    .await?;
    ctx.awaiting_frontend_ssl = false;
    let msg = match stage("startup", limit, next_frontend(&mut stream, &mut buf, &ctx)).await {
        Ok(m) => m,
        Err(e) => {
            refuse(&mut stream, &Refusal::Protocol(e.to_string())).await;
            return Err(e);
        }
    };
    let startup = match msg {
        PgWireFrontendMessage::Startup(s) => Startup {
            params: s.parameters,
        },
        PgWireFrontendMessage::CancelRequest(c) => {
            cancel(c, peer, &cluster, &agents).await;
            return Ok(());
        }
        _ => return Ok(()),
    };
    ctx.awaiting_frontend_startup = false;
    stream.write_all(&build::authentication_cleartext()).await?;
    let msg = match stage(
        "password",
        limit,
        next_frontend(&mut stream, &mut buf, &ctx),
    )
    .await
    {
        Ok(m) => m,
        Err(e) => {
            refuse(&mut stream, &Refusal::Protocol(e.to_string())).await;
            return Err(e);
        }
    };
    let password = match msg {
        PgWireFrontendMessage::PasswordMessageFamily(p) => p
            .into_password()
            .map(|p| p.password)
            .map_err(|e| anyhow::anyhow!("bad password message: {e}"))?,
        _ => {
            refuse(
                &mut stream,
                &Refusal::Protocol("expected a password message".into()),
            )
            .await;
            return Ok(());
        }
    };
    let admitted = admit(&startup, &password, peer, &cluster, &agents, &gate).await;
    // Authenticated (or refused): no longer counted against the caps.
    drop(slot);
    match admitted {
        Ok((open, agent, Route::Local, record)) => {
            // The index commit runs while the agent starts the recording and
            // connects to the target; no client byte is sent before it.
            let id = open.session_id.clone();
            let indexed = index(&cluster, record);
            let r = relay(stream, buf, open, &agent, &agents, indexed).await;
            close_unreached(&cluster, &id, r).await
        }
        Ok((open, agent, Route::Peer(addr), record)) => {
            // The peer admits only a session its index holds.
            if !index(&cluster, record).await {
                refuse(&mut stream, &Refusal::NotDurable).await;
                return Ok(());
            }
            let id = open.session_id.clone();
            let r = relay_via_peer(stream, buf, open, &agent, &addr, &cluster).await;
            close_unreached(&cluster, &id, r).await
        }
        Err(r) => {
            tracing::info!(%peer, refusal = %r, "client refused");
            refuse(&mut stream, &r).await;
            Ok(())
        }
    }
}

/// Commits a session to the index; false when that is not durable.
async fn index(cluster: &Cluster, record: SessionRecord) -> bool {
    cluster
        .propose(Command::SessionOpened {
            session: Box::new(record),
        })
        .await
        .is_ok()
}

/// Verifies the caller and the rule, and gives the session to open with the
/// record the index must hold before its first byte reaches the target.
async fn admit(
    startup: &Startup,
    password: &str,
    peer: SocketAddr,
    cluster: &Cluster,
    agents: &AgentRegistry,
    gate: &Gate,
) -> Result<(SessionOpen, String, Route, SessionRecord), Refusal> {
    let throttle = &gate.throttle;
    let user = startup.params.get("user").cloned().unwrap_or_default();
    let (db_user, target_name) = match user.rsplit_once('@') {
        Some((u, t)) => (u.to_string(), t.to_string()),
        None => (String::new(), user.clone()),
    };
    // Evidence fields the caller chose are bounded and escaped.
    let target_name = bounded(&target_name);
    let session_id = cluster.new_id();
    let now = std::time::Instant::now();
    if let Err(wait) = throttle.check(peer.ip(), now) {
        if let Some(count) = throttle.note_throttled(peer.ip(), now) {
            let mut ev = cluster.event(
                gatehouse_audit::EventKind::LoginThrottled,
                gatehouse_audit::Decision::Deny,
                "anonymous",
                &target_name,
                &session_id,
            );
            ev.detail = Some(format!(
                "{count} login attempts from {} refused unchecked while it backs off after failed logins",
                peer.ip()
            ));
            let _ = cluster.audit(ev).await;
        }
        return Err(Refusal::Throttled {
            addr: peer.ip(),
            secs: wait.as_secs().max(1),
        });
    }
    // Decide on state that includes every earlier write (revocations too).
    cluster
        .linearizable()
        .await
        .map_err(|_| Refusal::StateUnconfirmed)?;
    let who = match gate.ids.authenticate(password) {
        Ok(p) => p,
        Err(crate::identity::AuthError::Unavailable(_)) => return Err(Refusal::NotDurable),
        Err(e) => {
            let what = if crate::identity::tokens::looks_like_jwt(password) {
                format!("access token refused ({e})")
            } else {
                "invalid API key".to_string()
            };
            let ev = cluster.denial(
                "anonymous",
                &target_name,
                &session_id,
                format!("{what} from {peer}"),
            );
            let _ = cluster.audit(ev).await;
            let delay = throttle.failed(peer.ip(), &target_name, now);
            tokio::time::sleep(delay).await;
            return Err(match e {
                crate::identity::AuthError::Token(t) => {
                    Refusal::BadToken(bounded(&user), t.to_string())
                }
                _ => Refusal::BadCredentials(bounded(&user)),
            });
        }
    };
    throttle.succeeded(peer.ip());
    let identity = who.identity.clone();
    let deny = |detail: String| {
        let mut ev = cluster.denial(&identity, &target_name, &session_id, detail);
        who.stamp(&mut ev);
        ev
    };
    let Some(target) = cluster
        .reader
        .target(&target_name)
        .map_err(|_| Refusal::NotDurable)?
    else {
        cluster
            .audit(deny(format!("no target named \"{target_name}\"")))
            .await
            .map_err(|_| Refusal::NotDurable)?;
        return Err(Refusal::NotAllowed {
            identity: identity.clone(),
            target: target_name.clone(),
        });
    };
    let admitting = cluster
        .reader
        .admitting(&identity, &who.groups, &target.name)
        .map_err(|_| Refusal::NotDurable)?;
    // Any one admitting rule suffices, so the loosest limit holds (none, if
    // one of them sets none).
    let loosest = |f: fn(&gatehouse_cp_raft::state::Rule) -> Option<u64>| {
        admitting
            .iter()
            .map(f)
            .try_fold(0u64, |acc, l| l.map(|l| acc.max(l)))
            .unwrap_or(0)
    };
    let max_session_ms = loosest(|r| r.max_session_secs).saturating_mul(1000);
    let idle_timeout_ms = loosest(|r| r.idle_timeout_secs).saturating_mul(1000);
    if admitting.is_empty() {
        let r = Refusal::NotAllowed {
            identity: identity.clone(),
            target: target.name.clone(),
        };
        cluster
            .audit(deny(format!(
                "{identity} has no rule for target \"{}\"",
                target.name
            )))
            .await
            .map_err(|_| Refusal::NotDurable)?;
        return Err(r);
    }
    let Some(route) = locate(cluster, agents, &target.agent).await else {
        return Err(Refusal::Unavailable {
            target: target.name.clone(),
            reason: format!("its agent {} is not connected", target.agent),
        });
    };
    let db_user = if db_user.is_empty() {
        target.default_db_user.clone()
    } else {
        db_user
    };
    let database = startup
        .params
        .get("database")
        .cloned()
        .unwrap_or_else(|| db_user.clone());
    let (policy_version, policy) = cluster
        .reader
        .policy_in_force()
        .map_err(|_| Refusal::NotDurable)?;
    let started_ms = now_ms();
    // The secret of the client's cancel key, unrelated to the upstream's,
    // which stays in the agent; the process id the client sees is the
    // target's own (drivers compare it with pg_backend_pid() and with the
    // sender of a notification).
    let cancel_secret = cluster.random_u64() as i32;
    let record = SessionRecord {
        id: session_id.clone(),
        identity: identity.clone(),
        target: target.name.clone(),
        agent: target.agent.clone(),
        database: database.clone(),
        db_user: db_user.clone(),
        client_addr: peer.to_string(),
        policy_version: policy_version.clone(),
        started_ms,
        cancel_secret: Some(cancel_secret),
        node: cluster.node_id,
        groups: who.groups.clone(),
        ..Default::default()
    };
    let startup_params = startup
        .params
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "user" | "database"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Ok((
        SessionOpen {
            session_id,
            identity,
            groups: who.groups.clone(),
            issuer: who.issuer.clone(),
            target: target.name.clone(),
            database,
            db_user,
            startup_params,
            policy_version,
            client_addr: peer.to_string(),
            started_ms,
            cancel_pid: 0,
            cancel_secret,
            cancel: false,
            policy_document: policy.map(|p| p.canonical).unwrap_or_default(),
            end_reason: String::new(),
            watch: false,
            max_session_ms,
            idle_timeout_ms,
            adopt_policy: false,
            check: false,
        },
        target.agent,
        route,
        record,
    ))
}

/// Forwards a client's CancelRequest to the agent running its session. Like
/// PostgreSQL, the client is told nothing either way; a key that names no
/// live session is logged and dropped.
async fn cancel(c: CancelRequest, peer: SocketAddr, cluster: &Cluster, agents: &AgentRegistry) {
    // Keys the gateway hands out are protocol 3.0 keys: four bytes.
    let secret = match c.secret_key {
        SecretKey::I32(s) => s,
        SecretKey::Bytes(b) => match <[u8; 4]>::try_from(b.as_ref()) {
            Ok(b) => i32::from_be_bytes(b),
            Err(_) => {
                tracing::info!(%peer, "cancel request with a key of another length ignored");
                return;
            }
        },
    };
    let sessions = match cluster.reader.sessions_by_cancel_secret(secret) {
        Ok(s) if !s.is_empty() => s,
        _ => {
            tracing::info!(%peer, "cancel request for no live session ignored");
            return;
        }
    };
    // Secrets may collide across sessions: each candidate's agent cancels
    // only if the process id is its target's.
    for session in sessions {
        forward_cancel(&session, c.pid, peer, cluster, agents).await;
    }
}

async fn forward_cancel(
    session: &SessionRecord,
    pid: i32,
    peer: SocketAddr,
    cluster: &Cluster,
    agents: &AgentRegistry,
) {
    let open = SessionOpen {
        session_id: session.id.clone(),
        target: session.target.clone(),
        cancel: true,
        cancel_pid: pid,
        ..Default::default()
    };
    match to_session_agent(cluster, agents, &session.agent, &open).await {
        Ok(_) => tracing::info!(%peer, session_id = %session.id, "cancel request forwarded"),
        Err(e) => {
            tracing::warn!(%peer, session_id = %session.id, error = %e, "cancel request lost")
        }
    }
}

/// Sends a stream that carries no session (a cancel, an end, a check) to
/// `agent` and returns what the agent answered before closing it (at most
/// 64 KiB).
pub(crate) async fn to_session_agent(
    cluster: &Cluster,
    agents: &AgentRegistry,
    agent: &str,
    open: &SessionOpen,
) -> Result<Vec<u8>, String> {
    let mut chunks = control_stream(cluster, agents, agent, open).await?;
    let mut answer = Vec::new();
    while let Some(chunk) = chunks.recv().await {
        if answer.len() < 1 << 16 {
            answer.extend_from_slice(&chunk);
        }
    }
    Ok(answer)
}

/// Opens a watch of a running session at its agent: what the agent sends
/// (JSON lines) arrives in chunks until the session ends. Dropping the
/// receiver ends the watch.
pub(crate) async fn watch_session(
    cluster: &Cluster,
    agents: &AgentRegistry,
    session: &SessionRecord,
) -> Result<tokio::sync::mpsc::Receiver<Vec<u8>>, String> {
    let open = SessionOpen {
        session_id: session.id.clone(),
        target: session.target.clone(),
        watch: true,
        ..Default::default()
    };
    control_stream(cluster, agents, &session.agent, &open).await
}

/// Opens a stream that carries no session on `agent`'s connection, on this
/// node or through the node that holds it, sends `open`, and hands on what
/// the agent sends back, in chunks, until it closes the stream. Dropping
/// the receiver stops the stream.
async fn control_stream(
    cluster: &Cluster,
    agents: &AgentRegistry,
    agent: &str,
    open: &SessionOpen,
) -> Result<tokio::sync::mpsc::Receiver<Vec<u8>>, String> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    match locate(cluster, agents, agent).await {
        Some(Route::Local) => {
            let (mut send, mut recv) = agents
                .open_session(agent)
                .await
                .map_err(|e| e.to_string())?;
            send.write_all(&frame(open))
                .await
                .map_err(|e| e.to_string())?;
            let _ = send.finish();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 << 10];
                while let Ok(Some(n)) = recv.read(&mut buf).await {
                    let chunk = buf.get(..n).unwrap_or_default().to_vec();
                    if tx.send(chunk).await.is_err() {
                        let _ = recv.stop(0u32.into());
                        break;
                    }
                }
            });
        }
        Some(Route::Peer(addr)) => {
            use gatehouse_proto::cluster::RelayChunk;
            let chunks = futures::stream::iter([RelayChunk { data: frame(open) }]);
            let mut req = tonic::Request::new(chunks);
            req.metadata_mut().insert(
                crate::peer::RELAY_AGENT,
                agent.parse().map_err(|_| "bad agent name".to_string())?,
            );
            let mut c = cluster.peers.client(&addr).map_err(|e| e.to_string())?;
            let mut inbound = c
                .relay_session(req)
                .await
                .map_err(|s| s.message().to_string())?
                .into_inner();
            tokio::spawn(async move {
                while let Ok(Some(chunk)) = inbound.message().await {
                    if tx.send(chunk.data).await.is_err() {
                        break;
                    }
                }
            });
        }
        None => return Err(format!("agent {agent} is not connected")),
    }
    Ok(rx)
}

/// Asks a target's agent what its role may do there beyond reading.
pub(crate) async fn check_target(
    cluster: &Cluster,
    agents: &AgentRegistry,
    agent: &str,
    target: &str,
    database: &str,
) -> Result<gatehouse_proto::tunnel::TargetCheck, String> {
    let open = SessionOpen {
        target: target.to_string(),
        database: database.to_string(),
        check: true,
        ..Default::default()
    };
    ask_agent(cluster, agents, agent, &open).await
}

/// Sends a stream that carries no session and decodes the agent's one
/// framed answer.
async fn ask_agent<M: prost::Message + Default>(
    cluster: &Cluster,
    agents: &AgentRegistry,
    agent: &str,
    open: &SessionOpen,
) -> Result<M, String> {
    let answer = to_session_agent(cluster, agents, agent, open).await?;
    let mut buf = answer.as_slice();
    match gatehouse_proto::read_frame(&mut buf).await {
        Ok(Some(m)) => Ok(m),
        _ => Err("the agent gave no answer".into()),
    }
}

/// Puts a policy version in force for a running session at its agent;
/// returns the agent's answer (closed, and why, when it could not go on).
pub(crate) async fn adopt_policy(
    cluster: &Cluster,
    agents: &AgentRegistry,
    session: &SessionRecord,
    document: &str,
    version: &str,
) -> Result<gatehouse_proto::tunnel::SessionEnded, String> {
    let open = SessionOpen {
        session_id: session.id.clone(),
        target: session.target.clone(),
        adopt_policy: true,
        policy_document: document.to_string(),
        policy_version: version.to_string(),
        ..Default::default()
    };
    ask_agent(cluster, agents, &session.agent, &open).await
}

/// Ends a running session wherever its agent is connected, telling its
/// client `reason`. Ok(false) when the agent does not run it.
pub(crate) async fn end_session(
    cluster: &Cluster,
    agents: &AgentRegistry,
    session: &SessionRecord,
    reason: &str,
) -> Result<bool, String> {
    let open = SessionOpen {
        session_id: session.id.clone(),
        target: session.target.clone(),
        end_reason: reason.to_string(),
        ..Default::default()
    };
    let ended: gatehouse_proto::tunnel::SessionEnded =
        ask_agent(cluster, agents, &session.agent, &open).await?;
    Ok(ended.found)
}

/// Where the agent serving a target is connected.
enum Route {
    Local,
    /// The Raft address of the node holding the agent's connection.
    Peer(String),
}

async fn locate(cluster: &Cluster, agents: &AgentRegistry, agent: &str) -> Option<Route> {
    if agents.get(agent).is_some() {
        return Some(Route::Local);
    }
    let m = cluster.raft.metrics().borrow().clone();
    let peers: Vec<String> = m
        .membership_config
        .membership()
        .nodes()
        .filter(|(id, _)| **id != cluster.node_id)
        .map(|(_, n)| n.raft_addr.clone())
        .collect();
    for addr in peers {
        let Ok(mut c) = cluster.peers.client(&addr) else {
            continue;
        };
        let Ok(json) = serde_json::to_vec(agent) else {
            continue;
        };
        let ask = c.has_agent(gatehouse_proto::cluster::RaftPayload { json });
        if let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_millis(500), ask).await
            && serde_json::from_slice::<bool>(&resp.into_inner().json).unwrap_or(false)
        {
            return Some(Route::Peer(addr));
        }
    }
    None
}

/// Opens the agent stream and, once `indexed` says the session is in the
/// index, pipes bytes both ways until either side ends.
async fn relay<S>(
    mut client: S,
    leftover: BytesMut,
    open: SessionOpen,
    agent: &str,
    agents: &AgentRegistry,
    indexed: impl std::future::Future<Output = bool>,
) -> anyhow::Result<Relayed>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let opening = async {
        let (mut send, recv) = agents.open_session(agent).await?;
        send.write_all(&frame(&open)).await?;
        anyhow::Ok((send, recv))
    };
    let (opened, indexed) = tokio::join!(opening, indexed);
    if !indexed {
        // The agent's side ends with the stream; nothing reached the target.
        if let Ok((mut send, _)) = opened {
            let _ = send.reset(0u8.into());
        }
        refuse(&mut client, &Refusal::NotDurable).await;
        return Ok(Relayed::NotIndexed);
    }
    let (mut send, recv) = match opened {
        Ok(s) => s,
        Err(e) => {
            let r = Refusal::Unavailable {
                target: open.target.clone(),
                reason: e.to_string(),
            };
            refuse(&mut client, &r).await;
            return Ok(Relayed::Unreached(r.to_string()));
        }
    };
    if !leftover.is_empty() {
        send.write_all(&leftover).await?;
    }
    let mut agent_io = tokio::io::join(recv, send);
    let _ =
        tokio::io::copy_bidirectional_with_sizes(&mut client, &mut agent_io, 64 << 10, 64 << 10)
            .await;
    Ok(Relayed::Reached)
}

/// Relays the session through the node that holds the agent's connection.
async fn relay_via_peer<S>(
    mut client: S,
    leftover: BytesMut,
    open: SessionOpen,
    agent: &str,
    peer: &str,
    cluster: &Cluster,
) -> anyhow::Result<Relayed>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    use gatehouse_proto::cluster::RelayChunk;
    use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
    let (tx, rx) = tokio::sync::mpsc::channel::<RelayChunk>(32);
    tx.send(RelayChunk { data: frame(&open) }).await?;
    if !leftover.is_empty() {
        tx.send(RelayChunk {
            data: leftover.to_vec(),
        })
        .await?;
    }
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    req.metadata_mut()
        .insert(crate::peer::RELAY_AGENT, agent.parse()?);
    let opened = match cluster.peers.client(peer) {
        Ok(mut c) => c
            .relay_session(req)
            .await
            .map_err(|s| s.message().to_string()),
        Err(e) => Err(e.to_string()),
    };
    let mut inbound = match opened {
        Ok(r) => r.into_inner(),
        Err(reason) => {
            let r = Refusal::Unavailable {
                target: open.target.clone(),
                reason,
            };
            refuse(&mut client, &r).await;
            return Ok(Relayed::Unreached(r.to_string()));
        }
    };
    let (mut cr, mut cw) = tokio::io::split(client);
    let up = async {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match cr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let data = buf.get(..n).unwrap_or_default().to_vec();
                    if tx.send(RelayChunk { data }).await.is_err() {
                        break;
                    }
                }
            }
        }
    };
    let down = async {
        while let Ok(Some(chunk)) = inbound.message().await {
            if cw.write_all(&chunk.data).await.is_err() {
                break;
            }
        }
        let _ = cw.shutdown().await;
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
    Ok(Relayed::Reached)
}

/// A caller-chosen string as it may appear in evidence and errors: control
/// characters escaped, at most 64 characters.
fn bounded(s: &str) -> String {
    let mut out: String = s.chars().flat_map(char::escape_default).take(64).collect();
    if s.chars().flat_map(char::escape_default).nth(64).is_some() {
        out.push('…');
    }
    out
}

/// A relay that ended before the agent took the session (no agent stream,
/// or the peer refused it) leaves nobody to close the index entry: close
/// it here with the reason.
async fn close_unreached(
    cluster: &Cluster,
    session_id: &str,
    r: Result<Relayed, anyhow::Error>,
) -> anyhow::Result<()> {
    let reason = match r {
        Ok(Relayed::Reached | Relayed::NotIndexed) => return Ok(()),
        Ok(Relayed::Unreached(reason)) => reason,
        Err(e) => format!("the session never reached its agent: {e}"),
    };
    let closed = cluster.close_unrecorded(session_id, reason).await;
    if let Err(e) = closed {
        tracing::warn!(session_id, error = %e, "closing an unreached session in the index failed");
    }
    Ok(())
}

/// Whether a relay handed the session to its agent.
enum Relayed {
    Reached,
    /// The index never held the session.
    NotIndexed,
    Unreached(String),
}

async fn refuse<W: AsyncWrite + Unpin>(w: &mut W, r: &Refusal) {
    let _ = w
        .write_all(&build::error_response(
            Severity::Fatal,
            r.sqlstate(),
            &r.to_string(),
        ))
        .await;
    let _ = w.flush().await;
    let _ = w.shutdown().await;
}

/// Reads until one whole frontend message decodes.
async fn next_frontend<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    ctx: &DecodeContext,
) -> anyhow::Result<PgWireFrontendMessage> {
    loop {
        anyhow::ensure!(
            gatehouse_pgwire_inspect::frontend_length_ok(buf, ctx.awaiting_frontend_startup),
            "client sent a message with an invalid length"
        );
        // After startup the only message the ingress reads is the password;
        // pgwire would decode (and can panic on) any other type.
        anyhow::ensure!(
            ctx.awaiting_frontend_startup || buf.first().is_none_or(|t| *t == b'p'),
            "client sent a message other than a password before authenticating"
        );
        if let Some(m) = PgWireFrontendMessage::decode(buf, ctx)? {
            return Ok(m);
        }
        if buf.len() > 64 << 10 {
            anyhow::bail!("startup message too large");
        }
        if r.read_buf(buf).await? == 0 {
            anyhow::bail!("client closed the connection during startup");
        }
    }
}
