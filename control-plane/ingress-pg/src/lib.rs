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
use gatehouse_cp_raft::state::SessionRecord;
use gatehouse_pgwire_inspect::build::{self, Severity};
use gatehouse_proto::tunnel::SessionOpen;
use pgwire::messages::cancel::CancelRequest;
use pgwire::messages::startup::SecretKey;
use pgwire::messages::{DecodeContext, PgWireFrontendMessage, SslNegotiationMetaMessage};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use gatehouse_cp_server::TlsChain;
use gatehouse_cp_server::cluster::Cluster;
use gatehouse_cp_server::ingress::{
    Ask, Gate, Refusal, Route, accept, admit, close_unreached, index, relay, relay_via_peer, stage,
    to_session_agent,
};
use gatehouse_cp_server::ingress::{Ingress, IngressCtx};
use gatehouse_cp_server::tunnel::AgentRegistry;

/// The PostgreSQL ingress.
pub struct Postgres;

// === impl Postgres ===

impl Ingress for Postgres {
    fn start(&self, listener: TcpListener, ctx: &IngressCtx) -> anyhow::Result<()> {
        let acceptor = tls_acceptor(&ctx.chain)?;
        tokio::spawn(serve(
            listener,
            acceptor,
            ctx.cluster.clone(),
            ctx.agents.clone(),
            ctx.gate("postgres"),
        ));
        Ok(())
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
    let accept_errors = gatehouse_cp_server::limits::LogEvery::new(Duration::from_secs(10));
    let startup_errors = Arc::new(gatehouse_cp_server::limits::LogEvery::new(
        Duration::from_secs(10),
    ));
    loop {
        let (sock, peer) = accept(&listener, &accept_errors).await;
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
    slot: gatehouse_cp_server::limits::ConnSlot,
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
    let admitted = admit_pg(&startup, &password, peer, &cluster, &agents, &gate).await;
    // Authenticated (or refused): no longer counted against the caps.
    drop(slot);
    match admitted {
        Ok((open, agent, Route::Local, record)) => {
            // The index commit runs while the agent starts the recording and
            // connects to the target; no client byte is sent before it.
            let id = open.session_id.clone();
            let indexed = index(&cluster, record);
            let r = relay(stream, buf, open, &agent, &agents, indexed, refusal_bytes).await;
            close_unreached(&cluster, &id, r).await
        }
        Ok((open, agent, Route::Peer(addr), record)) => {
            // The peer admits only a session its index holds.
            if !index(&cluster, record).await {
                refuse(&mut stream, &Refusal::NotDurable).await;
                return Ok(());
            }
            let id = open.session_id.clone();
            let r = relay_via_peer(stream, buf, open, &agent, &addr, &cluster, refusal_bytes).await;
            close_unreached(&cluster, &id, r).await
        }
        Err(r) => {
            tracing::info!(%peer, refusal = %r, "client refused");
            refuse(&mut stream, &r).await;
            Ok(())
        }
    }
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

/// The user name, target and database of a StartupMessage, admitted.
async fn admit_pg(
    startup: &Startup,
    password: &str,
    peer: SocketAddr,
    cluster: &Cluster,
    agents: &AgentRegistry,
    gate: &Gate,
) -> Result<(SessionOpen, String, Route, SessionRecord), Refusal> {
    let user = startup.params.get("user").cloned().unwrap_or_default();
    let (login, target) = match user.rsplit_once('@') {
        Some((u, t)) => (u.to_string(), t.to_string()),
        None => (String::new(), user.clone()),
    };
    let ask = Ask {
        user: &user,
        target: &target,
        login,
        credential: gatehouse_cp_server::ingress::Credential::Secret(password),
        peer,
        kind: "postgres",
    };
    let (mut open, agent, route, mut record) = admit(ask, cluster, agents, gate).await?;
    let database = startup
        .params
        .get("database")
        .cloned()
        .unwrap_or_else(|| open.db_user.clone());
    open.startup_params = startup
        .params
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "user" | "database"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    open.database.clone_from(&database);
    record.database = database;
    Ok((open, agent, route, record))
}

/// A refusal as the client reads it: a FATAL ErrorResponse.
fn refusal_bytes(r: &Refusal) -> Vec<u8> {
    build::error_response(Severity::Fatal, r.sqlstate(), &r.to_string()).to_vec()
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
