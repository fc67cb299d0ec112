//! Client ingress: callers connect with their own tools (psql and every
//! PostgreSQL driver: `gatehouse-cp-ingress-pg`; OpenSSH's ssh, scp and
//! sftp: `gatehouse-cp-ingress-ssh`). Each protocol's crate speaks to the
//! client until it is authenticated; what they share is here: the caller
//! and the access rule verified on linearizable state ([`admit`]), the
//! session committed to the index, and the stream to the agent serving the
//! target, on this node or relayed through the node that holds the agent's
//! connection. The node starts each protocol's [`Ingress`] on the listener
//! it bound for it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use gatehouse_cp_raft::Command;
use gatehouse_cp_raft::state::SessionRecord;
use gatehouse_proto::frame;
use gatehouse_proto::tunnel::SessionOpen;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

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

/// What a protocol's ingress is handed when the node starts it.
pub struct IngressCtx {
    pub cluster: Arc<Cluster>,
    pub agents: AgentRegistry,
    pub ids: Arc<crate::identity::Identities>,
    pub throttle: Arc<LoginThrottle>,
    pub listener_limits: crate::limits::ListenerLimits,
    /// The node's TLS certificate chain (its names in `hostnames`).
    pub chain: crate::TlsChain,
    pub hostnames: Vec<String>,
    pub data_dir: std::path::PathBuf,
}

impl IngressCtx {
    /// The gate of one protocol's listener (its limits named `name`).
    pub fn gate(&self, name: &'static str) -> Gate {
        Gate {
            limits: ConnLimits::new(name, self.listener_limits),
            throttle: self.throttle.clone(),
            ids: self.ids.clone(),
        }
    }
}

/// A protocol's client ingress, as the node starts it.
pub trait Ingress: Send + Sync {
    /// Starts accepting clients on `listener` (bound by the node from its
    /// `--*-listen` option) in tasks of its own.
    fn start(&self, listener: tokio::net::TcpListener, ctx: &IngressCtx) -> anyhow::Result<()>;
}

/// The client ingresses a node runs, one per protocol.
pub struct Ingresses {
    pub postgres: Box<dyn Ingress>,
    pub ssh: Box<dyn Ingress>,
}

/// The next connection on `listener`. A failure (out of descriptors, say)
/// is logged at most once per `errors` period and retried after 50 ms.
pub async fn accept(
    listener: &tokio::net::TcpListener,
    errors: &crate::limits::LogEvery,
) -> (tokio::net::TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(x) => return x,
            Err(e) => {
                if let Some(n) = errors.tick() {
                    tracing::warn!(error = %e, count = n, "accept failed");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Why a connection was refused before reaching a target. Each maps to the
/// SQLSTATE the client sees.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
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
    #[error("target \"{target}\" is a {kind} target: connect to it with its own protocol")]
    WrongKind { target: String, kind: String },
    #[error("protocol violation during startup: {0}")]
    Protocol(String),
}

impl Refusal {
    pub fn sqlstate(&self) -> &'static str {
        match self {
            Refusal::TlsRequired
            | Refusal::NotAllowed { .. }
            | Refusal::Throttled { .. }
            | Refusal::WrongKind { .. } => "28000",
            Refusal::BadCredentials(_) | Refusal::BadToken(..) => "28P01",
            Refusal::Unavailable { .. } | Refusal::StateUnconfirmed => "57P03",
            Refusal::NotDurable => "58000",
            Refusal::Protocol(_) => "08P01",
        }
    }
}

/// One stage before authentication, under its deadline.
pub async fn stage<T>(
    what: &'static str,
    limit: Duration,
    f: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::time::timeout(limit, f)
        .await
        .map_err(|_| anyhow::anyhow!("{what} did not finish within {} s", limit.as_secs()))?
}

/// Commits a session to the index; false when that is not durable.
pub async fn index(cluster: &Cluster, record: SessionRecord) -> bool {
    cluster
        .propose(Command::SessionOpened {
            session: Box::new(record),
        })
        .await
        .is_ok()
}

/// Sends a stream that carries no session (a cancel, an end, a check) to
/// `agent` and returns what the agent answered before closing it (at most
/// 64 KiB).
pub async fn to_session_agent(
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
pub async fn watch_session(
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
pub async fn check_target(
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
pub async fn adopt_policy(
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
pub async fn end_session(
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
pub enum Route {
    Local,
    /// The Raft address of the node holding the agent's connection.
    Peer(String),
}

pub async fn locate(cluster: &Cluster, agents: &AgentRegistry, agent: &str) -> Option<Route> {
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
pub async fn relay<S>(
    mut client: S,
    leftover: BytesMut,
    open: SessionOpen,
    agent: &str,
    agents: &AgentRegistry,
    indexed: impl std::future::Future<Output = bool>,
    refusal: fn(&Refusal) -> Vec<u8>,
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
        refuse_with(&mut client, refusal, &Refusal::NotDurable).await;
        return Ok(Relayed::NotIndexed);
    }
    let (mut send, recv) = match opened {
        Ok(s) => s,
        Err(e) => {
            let r = Refusal::Unavailable {
                target: open.target.clone(),
                reason: e.to_string(),
            };
            refuse_with(&mut client, refusal, &r).await;
            return Ok(Relayed::Unreached(r.to_string()));
        }
    };
    if !leftover.is_empty() {
        send.write_all(&leftover).await?;
    }
    let mut agent_io = tokio::io::join(recv, send);
    if let Err(e) =
        tokio::io::copy_bidirectional_with_sizes(&mut client, &mut agent_io, 64 << 10, 64 << 10)
            .await
    {
        tracing::info!(session_id = %open.session_id, error = %e, "session relay ended with an error");
    }
    Ok(Relayed::Reached)
}

/// Relays the session through the node that holds the agent's connection.
pub async fn relay_via_peer<S>(
    mut client: S,
    leftover: BytesMut,
    open: SessionOpen,
    agent: &str,
    peer: &str,
    cluster: &Cluster,
    refusal: fn(&Refusal) -> Vec<u8>,
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
            refuse_with(&mut client, refusal, &r).await;
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
pub fn bounded(s: &str) -> String {
    let mut out: String = s.chars().flat_map(char::escape_default).take(64).collect();
    if s.chars().flat_map(char::escape_default).nth(64).is_some() {
        out.push('…');
    }
    out
}

/// A relay that ended before the agent took the session (no agent stream,
/// or the peer refused it) leaves nobody to close the index entry: close
/// it here with the reason.
pub async fn close_unreached(
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
pub enum Relayed {
    Reached,
    /// The index never held the session.
    NotIndexed,
    Unreached(String),
}

/// Tells the client why its session was refused (in its protocol's bytes)
/// and closes its side.
async fn refuse_with<S: AsyncWrite + Unpin>(
    client: &mut S,
    refusal: fn(&Refusal) -> Vec<u8>,
    r: &Refusal,
) {
    let _ = client.write_all(&refusal(r)).await;
    let _ = client.flush().await;
    let _ = client.shutdown().await;
}

/// What a client asked to be admitted with, in any protocol.
pub struct Ask<'a> {
    /// The user name as the client gave it (for errors).
    pub user: &'a str,
    /// The target's name as the client gave it.
    pub target: &'a str,
    /// The role or login on the target ("": the target's default).
    pub login: String,
    pub credential: Credential<'a>,
    pub peer: SocketAddr,
    /// The target kind this ingress serves ("postgres", "ssh").
    pub kind: &'static str,
}

/// How a caller proves who it is.
pub enum Credential<'a> {
    /// An API key or access token.
    Secret(&'a str),
    /// An OpenSSH user certificate whose key the caller proved it holds.
    SshCertificate(&'a russh::keys::Certificate),
}

/// Why a credential did not yield an identity.
enum Unverified {
    /// The state it is checked against could not be read.
    Unavailable,
    /// Refused: what the audit event says, and what the client is told.
    Refused { what: String, refusal: Refusal },
}

/// Who `credential` proves the caller is (`user` as the client gave it).
fn verify(
    credential: &Credential<'_>,
    gate: &Gate,
    user: &str,
) -> Result<crate::identity::Principal, Unverified> {
    match *credential {
        Credential::Secret(password) => gate.ids.authenticate(password).map_err(|e| match e {
            crate::identity::AuthError::Unavailable(_) => Unverified::Unavailable,
            e => Unverified::Refused {
                what: if crate::identity::tokens::looks_like_jwt(password) {
                    format!("access token refused ({e})")
                } else {
                    "invalid API key".to_string()
                },
                refusal: match e {
                    crate::identity::AuthError::Token(t) => {
                        Refusal::BadToken(bounded(user), t.to_string())
                    }
                    _ => Refusal::BadCredentials(bounded(user)),
                },
            },
        }),
        Credential::SshCertificate(cert) => {
            gate.ids.ssh_ca.verify_user(cert).map_err(|e| match e {
                crate::identity::ssh_ca::CertRefusal::Unavailable(_) => Unverified::Unavailable,
                e => Unverified::Refused {
                    what: format!(
                        "SSH certificate serial {} ({}) refused: {e}",
                        cert.serial(),
                        bounded(cert.key_id())
                    ),
                    refusal: Refusal::BadCredentials(bounded(user)),
                },
            })
        }
    }
}

/// Verifies the caller and the rule, and gives the session to open with the
/// record the index must hold before its first byte reaches the target.
pub async fn admit(
    ask: Ask<'_>,
    cluster: &Cluster,
    agents: &AgentRegistry,
    gate: &Gate,
) -> Result<(SessionOpen, String, Route, SessionRecord), Refusal> {
    let peer = ask.peer;
    let user = ask.user.to_string();
    let throttle = &gate.throttle;
    let db_user = ask.login;
    // Evidence fields the caller chose are bounded and escaped.
    let target_name = bounded(ask.target);
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
    let who = match verify(&ask.credential, gate, &user) {
        Ok(p) => p,
        Err(Unverified::Unavailable) => return Err(Refusal::NotDurable),
        Err(Unverified::Refused { what, refusal }) => {
            let ev = cluster.denial(
                "anonymous",
                &target_name,
                &session_id,
                format!("{what} from {peer}"),
            );
            let _ = cluster.audit(ev).await;
            let delay = throttle.failed(peer.ip(), &target_name, now);
            tokio::time::sleep(delay).await;
            return Err(refusal);
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
    if target.kind != ask.kind {
        cluster
            .audit(deny(format!(
                "target \"{}\" is a {} target, asked for over {}",
                target.name, target.kind, ask.kind
            )))
            .await
            .map_err(|_| Refusal::NotDurable)?;
        return Err(Refusal::WrongKind {
            target: target.name.clone(),
            kind: target.kind.clone(),
        });
    }
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
        database: String::new(),
        db_user: db_user.clone(),
        client_addr: peer.to_string(),
        policy_version: policy_version.clone(),
        started_ms,
        cancel_secret: Some(cancel_secret),
        node: cluster.node_id,
        groups: who.groups.clone(),
        ..Default::default()
    };
    Ok((
        SessionOpen {
            session_id,
            identity,
            groups: who.groups.clone(),
            issuer: who.issuer.clone(),
            target: target.name.clone(),
            database: String::new(),
            db_user,
            startup_params: Default::default(),
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
            protocol: ask.kind.to_string(),
        },
        target.agent,
        route,
        record,
    ))
}
