//! The QUIC endpoint that agents dial: enrollment and the control stream.
//!
//! One UDP port, two ALPNs. `gatehouse-enroll/1` connections carry exactly
//! one request (a single-use token and a CSR) and need no client
//! certificate. `gatehouse/1` connections must present a certificate issued
//! by the cluster CA whose serial matches the agent's registration; the agent
//! then opens the control stream, and the node opens one stream per client
//! session on the same connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use gatehouse_audit::AuditEvent;
use gatehouse_cp_raft::{Command, CommandResult, RawEvent, Rejection};
use gatehouse_pki::{AgentCertRequest, ClusterCa};
use gatehouse_proto::tunnel::{
    AgentMessage, AuditAck, EnrollRequest, EnrollResponse, HeartbeatAck, HelloAck, RecordedAck,
    ServerMessage, agent_message, server_message,
};
use gatehouse_proto::{ALPN_AGENT, ALPN_ENROLL, frame, read_frame};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use crate::TlsChain;
use crate::cluster::{Cluster, ProposeError, now_ms};

/// Agents connected to this node.
#[derive(Clone, Default)]
pub struct AgentRegistry {
    inner: Arc<Mutex<HashMap<String, AgentConn>>>,
}

/// A connected agent.
#[derive(Clone)]
pub struct AgentConn {
    pub conn: quinn::Connection,
    pub version: String,
    pub targets: Vec<String>,
    pub connected_ms: i64,
    pub last_seen_ms: Arc<std::sync::atomic::AtomicI64>,
}

/// Opening a session stream to an agent failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenSessionError {
    #[error("agent {0} is not connected")]
    NotConnected(String),
    #[error("agent {agent} connection failed: {source}")]
    Connection {
        agent: String,
        source: quinn::ConnectionError,
    },
}

// === impl AgentRegistry ===

impl AgentRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, AgentConn>> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    pub fn get(&self, agent: &str) -> Option<AgentConn> {
        self.lock().get(agent).cloned()
    }

    fn insert(&self, agent: &str, conn: AgentConn) {
        if let Some(old) = self.lock().insert(agent.to_string(), conn) {
            old.conn
                .close(0u32.into(), b"replaced by a newer connection");
        }
    }

    fn remove_if(&self, agent: &str, stable_id: usize) {
        let mut g = self.lock();
        if g.get(agent)
            .is_some_and(|c| c.conn.stable_id() == stable_id)
        {
            g.remove(agent);
        }
    }

    /// Opens a session stream on the agent's connection.
    pub async fn open_session(
        &self,
        agent: &str,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), OpenSessionError> {
        let conn = self
            .get(agent)
            .ok_or_else(|| OpenSessionError::NotConnected(agent.to_string()))?;
        conn.conn
            .open_bi()
            .await
            .map_err(|source| OpenSessionError::Connection {
                agent: agent.to_string(),
                source,
            })
    }
}

/// Binds the endpoint. Client certificates are optional at the TLS layer
/// (enrollment has none) but, when presented, must chain to the cluster CA;
/// agent connections without one are refused after the handshake.
pub fn bind(addr: SocketAddr, chain: &TlsChain, ca_pem: &str) -> anyhow::Result<quinn::Endpoint> {
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(chain.cert_pem.as_bytes()).collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(chain.key_pem.as_bytes())?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c?)?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
        .allow_unauthenticated()
        .build()?;
    let mut tls = rustls::ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    tls.alpn_protocols = vec![ALPN_AGENT.to_vec(), ALPN_ENROLL.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(quinn::IdleTimeout::try_from(Duration::from_secs(15))?));
    transport.max_concurrent_bidi_streams(10_000u32.into());
    // Path MTU discovery up to the largest UDP payload (the agent does the
    // same): a bulk copy on a path that allows more than Ethernet's 1452
    // bytes takes a fraction of the packets; elsewhere the probes are lost
    // and nothing changes.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(u16::MAX);
    transport.mtu_discovery_config(Some(mtu));
    server.transport_config(Arc::new(transport));
    Ok(quinn::Endpoint::server(server, addr)?)
}

/// Accepts agent connections until the endpoint closes.
pub async fn serve(
    endpoint: quinn::Endpoint,
    cluster: Arc<Cluster>,
    agents: AgentRegistry,
    ca: Arc<ClusterCa>,
    limits: Arc<crate::limits::ConnLimits>,
) {
    let handshake_errors = Arc::new(crate::limits::LogEvery::new(Duration::from_secs(10)));
    while let Some(incoming) = endpoint.accept().await {
        let remote = incoming.remote_address();
        // Over the caps: refused before any handshake work.
        let Some(slot) = limits.admit(remote.ip()) else {
            incoming.refuse();
            continue;
        };
        let stage = limits.stage();
        let (cluster, agents, ca) = (cluster.clone(), agents.clone(), ca.clone());
        let handshake_errors = handshake_errors.clone();
        tokio::spawn(async move {
            let conn = match tokio::time::timeout(stage, incoming).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    if let Some(n) = handshake_errors.tick() {
                        tracing::warn!(%remote, error = %e, count = n, "agent handshake failed");
                    }
                    return;
                }
                Err(_) => {
                    if let Some(n) = handshake_errors.tick() {
                        tracing::warn!(%remote, count = n, "agent handshake did not finish in time");
                    }
                    return;
                }
            };
            let alpn = conn
                .handshake_data()
                .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
                .and_then(|h| h.protocol);
            match alpn.as_deref() {
                Some(ALPN_ENROLL) => {
                    // One exchange, under the stage deadline.
                    if tokio::time::timeout(stage, enroll(conn.clone(), &cluster, &ca))
                        .await
                        .is_err()
                    {
                        conn.close(4u32.into(), b"enrollment did not finish in time");
                    }
                    drop(slot);
                }
                Some(ALPN_AGENT) => {
                    // Authenticated by its certificate in the handshake.
                    drop(slot);
                    agent_connection(conn, cluster, agents).await
                }
                _ => conn.close(1u32.into(), b"unknown protocol"),
            }
        });
    }
}

async fn enroll(conn: quinn::Connection, cluster: &Cluster, ca: &ClusterCa) {
    let Ok((mut send, mut recv)) = conn.accept_bi().await else {
        return;
    };
    let resp = match read_frame::<EnrollRequest, _>(&mut recv).await {
        Ok(Some(req)) => match enroll_agent(conn.remote_address(), &req, cluster, ca).await {
            Ok(cert_pem) => {
                tracing::info!(agent = %req.agent, "agent enrolled");
                EnrollResponse {
                    cert_pem,
                    ca_pem: ca.cert_pem().to_string(),
                    error: String::new(),
                }
            }
            Err(error) => {
                tracing::warn!(agent = %req.agent, %error, "enrollment refused");
                EnrollResponse {
                    error,
                    ..Default::default()
                }
            }
        },
        _ => EnrollResponse {
            error: "malformed enrollment request".into(),
            ..Default::default()
        },
    };
    let _ = send.write_all(&frame(&resp)).await;
    let _ = send.finish();
    let _ = send.stopped().await;
    conn.close(0u32.into(), b"done");
}

/// Signs the CSR, then consumes the token in Raft; the certificate is only
/// returned when the single-use consumption committed.
async fn enroll_agent(
    remote: std::net::SocketAddr,
    req: &EnrollRequest,
    cluster: &Cluster,
    ca: &ClusterCa,
) -> Result<String, String> {
    if req.agent.is_empty()
        || !req
            .agent
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err("agent name must be letters, digits, '-' or '_'".into());
    }
    let secret = req.token.trim();
    let token_sha256 = gatehouse_cp_raft::state::sha256_hex(secret.as_bytes());
    let now = now_ms();
    // An invalid token is refused here, before anything is signed or
    // written to the log; the Raft write below re-checks it atomically.
    match cluster.reader.enrollment_token(&token_sha256) {
        Ok(Some(t)) if t.used_ms.is_none() && now < t.expires_ms && t.agent == req.agent => {}
        Ok(Some(t)) if t.used_ms.is_some() => {
            return Err("enrollment token was already used".into());
        }
        Ok(Some(t)) if now >= t.expires_ms => return Err("enrollment token has expired".into()),
        Ok(Some(_)) => return Err("enrollment token is bound to another agent".into()),
        Ok(None) => return Err("unknown enrollment token".into()),
        Err(e) => return Err(e.to_string()),
    }
    let serial = cluster.random_u64();
    let cert = ca
        .sign_agent(&AgentCertRequest {
            csr_pem: &req.csr_pem,
            agent_name: &req.agent,
            serial,
            not_before_unix: now / 1000 - 300,
            not_after_unix: now / 1000 + 365 * 86_400,
        })
        .map_err(|e| e.to_string())?;
    let der = gatehouse_pki::first_der(&cert).ok_or("issued certificate did not parse")?;
    let serial_hex = gatehouse_pki::serial_of(&der).ok_or("issued certificate did not parse")?;
    let public_key = gatehouse_pki::public_key_of(&der)
        .map(hex::encode)
        .ok_or("issued certificate has no public key")?;
    match cluster
        .propose_audited(
            &crate::identity::Actor {
                principal: crate::identity::Principal {
                    identity: format!("agent:{}", req.agent),
                    issuer: crate::identity::LOCAL_ISSUER.into(),
                    ..Default::default()
                },
                addr: remote.to_string(),
            },
            Command::ConsumeEnrollmentToken {
                token_sha256,
                agent: req.agent.clone(),
                cert_serial: serial_hex,
                public_key,
                now_ms: now,
            },
        )
        .await
    {
        Ok(_) => Ok(cert),
        Err(ProposeError::Rejected(Rejection::NotFound(_))) => {
            Err("unknown enrollment token".into())
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Checks the agent's certificate against its registration.
fn authenticate(conn: &quinn::Connection, cluster: &Cluster) -> Result<String, String> {
    let certs = conn
        .peer_identity()
        .and_then(|i| i.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or("no client certificate")?;
    let leaf = certs.first().ok_or("no client certificate")?;
    let name = gatehouse_pki::agent_name_of(leaf).ok_or("certificate names no agent")?;
    let serial = gatehouse_pki::serial_of(leaf).ok_or("certificate has no serial")?;
    let agent = cluster
        .reader
        .agent(&name)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("agent {name} is not enrolled"))?;
    if agent.revoked {
        return Err(format!("agent {name} is revoked"));
    }
    if agent.cert_serial != serial {
        return Err(format!("certificate of agent {name} was superseded"));
    }
    Ok(name)
}

/// How old an open session must be before an agent's hello that does not
/// name it closes it: younger ones may still be on their way to it.
const SWEEP_GRACE_MS: i64 = 60_000;

/// Closes the index's open sessions of `agent` that the agent does not
/// hold: they never reached it (the ingress stopped in between) or were
/// lost with an earlier agent process. Without this they would stay open
/// in the index for good.
async fn sweep_unheld(cluster: Arc<Cluster>, agent: String, held: Vec<String>) {
    let held: std::collections::HashSet<String> = held.into_iter().collect();
    let now = now_ms();
    let Ok(sessions) = cluster.reader.sessions() else {
        return;
    };
    for s in sessions {
        if s.agent != agent
            || s.ended_ms.is_some()
            || held.contains(&s.id)
            || s.started_ms > now - SWEEP_GRACE_MS
        {
            continue;
        }
        let closed = cluster
            .close_unrecorded(
                &s.id,
                format!("lost: agent {agent} did not hold the session when it reconnected"),
            )
            .await;
        match closed {
            Ok(_) => {
                tracing::info!(session_id = %s.id, agent_id = %agent, "stale session closed in the index")
            }
            Err(e) => {
                tracing::warn!(session_id = %s.id, error = %e, "closing a stale session failed")
            }
        }
    }
}

async fn agent_connection(conn: quinn::Connection, cluster: Arc<Cluster>, agents: AgentRegistry) {
    if let Err(e) = cluster.linearizable().await {
        tracing::warn!(remote = %conn.remote_address(), error = %e, "cannot confirm agent registration");
        conn.close(4u32.into(), b"control plane unavailable");
        return;
    }
    let name = match authenticate(&conn, &cluster) {
        Ok(n) => n,
        Err(reason) => {
            tracing::warn!(remote = %conn.remote_address(), %reason, "agent refused");
            conn.close(2u32.into(), reason.as_bytes());
            return;
        }
    };
    let Ok(Ok((mut send, mut recv))) =
        tokio::time::timeout(Duration::from_secs(10), conn.accept_bi()).await
    else {
        conn.close(3u32.into(), b"no control stream");
        return;
    };
    let hello = match read_frame::<AgentMessage, _>(&mut recv).await {
        Ok(Some(AgentMessage {
            msg: Some(agent_message::Msg::Hello(h)),
        })) if h.agent == name => h,
        _ => {
            conn.close(
                3u32.into(),
                b"expected hello naming the certificate's agent",
            );
            return;
        }
    };
    let last_seen = Arc::new(std::sync::atomic::AtomicI64::new(now_ms()));
    agents.insert(
        &name,
        AgentConn {
            conn: conn.clone(),
            version: hello.version.clone(),
            targets: hello.targets.clone(),
            connected_ms: now_ms(),
            last_seen_ms: last_seen.clone(),
        },
    );
    tracing::info!(agent_id = %name, version = %hello.version, targets = ?hello.targets, remote = %conn.remote_address(), "agent connected");
    let approvals = tokio::spawn(crate::approvals::serve_agent(
        conn.clone(),
        cluster.clone(),
        name.clone(),
    ));
    let ack = ServerMessage {
        msg: Some(server_message::Msg::HelloAck(HelloAck {
            policy_version: cluster.reader.policy_version().unwrap_or_default(),
            audit_high_water: cluster.reader.agent_high_water(&name).unwrap_or(0),
            token_keys: crate::identity::tokens::jwks_of(&cluster.reader),
        })),
    };
    tokio::spawn(sweep_unheld(
        cluster.clone(),
        name.clone(),
        hello.sessions.clone(),
    ));
    let result = async {
        send.write_all(&frame(&ack))
            .await
            .map_err(|e| e.to_string())?;
        control_loop(&name, &cluster, &mut send, &mut recv, &last_seen).await
    }
    .await;
    agents.remove_if(&name, conn.stable_id());
    approvals.abort();
    match result {
        Ok(()) => tracing::info!(agent_id = %name, "agent disconnected"),
        Err(e) => tracing::warn!(agent_id = %name, error = %e, "agent control stream ended"),
    }
}

/// Most events one Raft entry carries when batches queue up: small batches
/// are merged, full ones (2,048 events) are not, so an entry stays well
/// under a megabyte (see `gatehouse_cp_raft::MAX_PAYLOAD_ENTRIES`).
const MAX_EVENTS_PER_ENTRY: usize = 2_048;

async fn control_loop(
    name: &str,
    cluster: &Cluster,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    last_seen: &std::sync::atomic::AtomicI64,
) -> Result<(), String> {
    // Frames are read while the previous message is being committed, so
    // audit batches that arrive meanwhile join the next Raft entry.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<AgentMessage>(16);
    let reader = async move {
        loop {
            match read_frame::<AgentMessage, _>(recv).await {
                Ok(Some(m)) => {
                    last_seen.store(now_ms(), std::sync::atomic::Ordering::Relaxed);
                    if tx.send(m).await.is_err() {
                        return Ok(());
                    }
                }
                Ok(None) => return Ok(()),
                Err(e) => return Err(e.to_string()),
            }
        }
    };
    let process = async move {
        // Up to PIPELINE messages are being committed at once; their replies
        // go out in the order the messages came, so the agent's count of
        // acknowledged batches stays right whatever order they commit in.
        let mut pipeline = futures::stream::FuturesOrdered::new();
        let mut held: Option<AgentMessage> = None;
        let mut closed = false;
        loop {
            if pipeline.len() < PIPELINE
                && let Some(msg) = held.take()
            {
                pipeline.push_back(handle(name, cluster, msg, &mut rx, &mut held)?);
                continue;
            }
            tokio::select! {
                Some(done) = pipeline.next(), if !pipeline.is_empty() => {
                    let replies: Vec<server_message::Msg> = done?;
                    let mut out = Vec::new();
                    for reply in replies {
                        out.extend_from_slice(&frame(&ServerMessage { msg: Some(reply) }));
                    }
                    send.write_all(&out).await.map_err(|e| e.to_string())?;
                }
                m = rx.recv(), if !closed && pipeline.len() < PIPELINE => match m {
                    Some(msg) => pipeline.push_back(handle(name, cluster, msg, &mut rx, &mut held)?),
                    None => closed = true,
                },
                else => return Ok(()),
            }
        }
    };
    tokio::pin!(reader, process);
    tokio::select! {
        r = &mut process => r,
        r = &mut reader => {
            // The agent closed its side: commit and answer what it sent.
            r?;
            process.await
        }
    }
}

/// Messages from one agent being committed at the same time.
const PIPELINE: usize = 8;

type Pending<'a> =
    std::pin::Pin<Box<dyn Future<Output = Result<Vec<server_message::Msg>, String>> + Send + 'a>>;

/// Turns one control-stream message into the work that answers it. Audit
/// batches already queued behind it join the same Raft entry; a message of
/// another kind found there is left in `held`.
fn handle<'a>(
    name: &'a str,
    cluster: &'a Cluster,
    msg: AgentMessage,
    rx: &mut tokio::sync::mpsc::Receiver<AgentMessage>,
    held: &mut Option<AgentMessage>,
) -> Result<Pending<'a>, String> {
    Ok(match msg.msg {
        Some(agent_message::Msg::Heartbeat(h)) => {
            let reply = server_message::Msg::HeartbeatAck(HeartbeatAck { sent_ms: h.sent_ms });
            Box::pin(std::future::ready(Ok(vec![reply])))
        }
        Some(agent_message::Msg::Audit(batch)) => {
            let mut events = validate_batch(name, batch.events)?;
            let mut batches = 1;
            while events.len() < MAX_EVENTS_PER_ENTRY {
                match rx.try_recv() {
                    Ok(AgentMessage {
                        msg: Some(agent_message::Msg::Audit(b)),
                    }) if events.len() + b.events.len() <= MAX_EVENTS_PER_ENTRY => {
                        events.extend(validate_batch(name, b.events)?);
                        batches += 1;
                    }
                    Ok(other) => {
                        *held = Some(other);
                        break;
                    }
                    Err(_) => break,
                }
            }
            Box::pin(async move {
                let high = match cluster
                    .propose(Command::AppendAudit {
                        agent: name.to_string(),
                        events,
                    })
                    .await
                {
                    Ok(CommandResult::AuditAppended { high_water, .. }) => high_water,
                    Ok(_) => return Err("unexpected result for an audit append".into()),
                    // Not committed: no ack; the agent re-sends after reconnecting.
                    Err(e) => return Err(format!("committing audit events: {e}")),
                };
                // One acknowledgement per batch, as the agent counts them.
                Ok((0..batches)
                    .map(|_| server_message::Msg::AuditAck(AuditAck { up_to: high }))
                    .collect())
            })
        }
        Some(agent_message::Msg::Recorded(r)) => Box::pin(async move {
            let session_id = r.session_id.clone();
            // Only the agent that served a session may close its index entry.
            match cluster.reader.session(&session_id) {
                Ok(Some(s)) if s.agent != name => {
                    return Err(format!(
                        "agent {name} reported session {session_id}, served by {}",
                        s.agent
                    ));
                }
                _ => {}
            }
            match cluster
                .propose(Command::SessionClosed {
                    session_id: r.session_id,
                    ended_ms: r.ended_ms,
                    end_reason: r.end_reason,
                    recording_key: r.recording_key,
                    recording_sha256: r.recording_sha256,
                    recording_size: r.recording_size,
                    chunk_keys: r.chunk_keys,
                    events: r.events,
                })
                .await
            {
                Ok(_) | Err(ProposeError::Rejected(_)) => {}
                Err(e) => return Err(format!("committing session index: {e}")),
            }
            Ok(vec![server_message::Msg::RecordedAck(RecordedAck {
                session_id,
            })])
        }),
        Some(agent_message::Msg::Hello(_)) | None => {
            return Err("unexpected message on the control stream".into());
        }
    })
}

/// Every event must decode and name the connection's agent: an agent cannot
/// write evidence in another's name.
fn validate_batch(agent: &str, events: Vec<Vec<u8>>) -> Result<Vec<RawEvent>, String> {
    let mut out = Vec::with_capacity(events.len());
    for raw in events {
        let ev = AuditEvent::decode(&raw).map_err(|e| e.to_string())?;
        if ev.agent != agent {
            return Err(format!("audit event {} claims agent {}", ev.id, ev.agent));
        }
        let json = String::from_utf8(raw).map_err(|e| e.to_string())?;
        out.push(RawEvent::new(json).map_err(|e| e.to_string())?);
    }
    Ok(out)
}
