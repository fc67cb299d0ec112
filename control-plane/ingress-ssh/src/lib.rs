//! SSH client ingress.
//!
//! Callers use OpenSSH's own clients: `ssh -p 2222 <login>@<target>@<node>`
//! (OpenSSH splits user and host at the last `@`, so the user name the
//! gateway sees is `<login>@<target>`, or `<target>` for the target's
//! default login). The credential is a Gatehouse access token or API key,
//! as the password or the answer to the keyboard-interactive prompt. Once
//! it and the access rule are verified and the session is committed to the
//! index, the session's channels are carried to the agent as `SshFrame`s
//! on one stream; the agent holds the target connection, its credential,
//! the guardrails and the recording.
//!
//! Flow control: each channel's data waits for the client's SSH window
//! before it is written, and the stream to the agent is QUIC's, so a slow
//! client or target slows its sender instead of filling memory. Frames for
//! all channels of a session share the one stream: a channel whose client
//! does not read holds the others back, never the node's event loop.

mod deadline;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use gatehouse_proto::ssh::{GLOBAL_CHANNEL, TARGET_OPENED};
use gatehouse_proto::tunnel::{
    SshEnv, SshFrame, SshListen, SshOpen, SshPty, SshReply, SshRequest, SshWindow, ssh_frame,
    ssh_request,
};
use russh::server::{Auth, Msg, Session};
use russh::{Channel, ChannelMsg, MethodKind, MethodSet};
use tokio::io::{AsyncWriteExt, DuplexStream};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use deadline::{Cut, Cuttable, Stage, stage_deadlines};
use gatehouse_cp_server::cluster::Cluster;
use gatehouse_cp_server::ingress::{
    Ask, Credential, Gate, Refusal, Route, accept, admit, close_unreached, index, relay,
    relay_via_peer,
};
use gatehouse_cp_server::ingress::{Ingress, IngressCtx};
use gatehouse_cp_server::tunnel::AgentRegistry;

/// The SSH channel window and packet size the ingress offers: bulk copies
/// need a window far above russh's default to fill a fast link.
pub const WINDOW: u32 = 8 << 20;
pub const PACKET: u32 = 65535;
/// Frames waiting for one channel's client before the session's reader
/// waits too.
const CHANNEL_QUEUE: usize = 32;
/// How long a channel waits for the agent to open it on the target.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a global request (`ssh -R`) waits for the target's answer; the
/// client's connection waits with it.
const GLOBAL_TIMEOUT: Duration = Duration::from_secs(10);

/// The SSH ingress.
pub struct Ssh;

// === impl Ssh ===

impl Ingress for Ssh {
    /// The host key made or read, its certificate signed when the CA can
    /// (and renewed), then clients accepted.
    fn start(&self, listener: TcpListener, ctx: &IngressCtx) -> anyhow::Result<()> {
        let key = host_key(&ctx.data_dir)?;
        let (first, signed) = match certified_config(&key, &ctx.hostnames, &ctx.ids.ssh_ca) {
            Ok(c) => (c, true),
            Err(e) => {
                tracing::warn!(error = %e, "the SSH host certificate could not be signed yet");
                (config(key.clone(), vec![]), false)
            }
        };
        let (tx, rx) = watch::channel(Arc::new(first));
        tokio::spawn(renew_host_certificate(
            key,
            ctx.hostnames.clone(),
            ctx.ids.clone(),
            signed,
            tx,
        ));
        tokio::spawn(serve(
            listener,
            rx,
            ctx.cluster.clone(),
            ctx.agents.clone(),
            ctx.gate("ssh"),
        ));
        Ok(())
    }
}

/// The node's SSH host key: made on first start, kept owner-only.
pub fn host_key(data_dir: &std::path::Path) -> anyhow::Result<russh::keys::PrivateKey> {
    use anyhow::Context;
    let path = data_dir.join("ssh_host_ed25519_key");
    if let Ok(text) = std::fs::read_to_string(&path) {
        return russh::keys::PrivateKey::from_openssh(&text)
            .with_context(|| format!("reading {}", path.display()));
    }
    let seed: [u8; 32] = rand::random();
    let key = russh::keys::PrivateKey::from(
        russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&seed),
    );
    let text = key
        .to_openssh(russh::keys::ssh_key::LineEnding::LF)
        .context("encoding the SSH host key")?;
    gatehouse_secure_fs::write_private(&path, text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(key)
}

/// How a caller may authenticate: a certificate from `gatehouse ssh login`
/// (public key), or a token or API key as the password or the answer to the
/// keyboard-interactive prompt.
const METHODS: &[MethodKind] = &[
    MethodKind::PublicKey,
    MethodKind::Password,
    MethodKind::KeyboardInteractive,
];

/// The server configuration: the host key, the methods a caller may use,
/// and the windows bulk transfers need.
pub fn config(
    key: russh::keys::PrivateKey,
    certificates: Vec<russh::keys::Certificate>,
) -> russh::server::Config {
    russh::server::Config {
        server_id: russh::SshId::Standard("SSH-2.0-Gatehouse".into()),
        methods: MethodSet::from(METHODS),
        // A refused credential answers after the same time whatever the
        // reason; OpenSSH's probe with "none" is answered at once.
        auth_rejection_time: Duration::from_millis(500),
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![key],
        certificates,
        window_size: WINDOW,
        maximum_packet_size: PACKET,
        channel_buffer_size: 64,
        event_buffer_size: 64,
        max_auth_attempts: 6,
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 4,
        nodelay: true,
        preferred: russh::Preferred {
            cipher: std::borrow::Cow::Borrowed(CIPHERS),
            ..russh::Preferred::DEFAULT
        },
        ..Default::default()
    }
}

/// AES-GCM only (OpenSSH has had it since 6.2): with AES instructions it
/// costs a fraction of ChaCha20-Poly1305 per byte. The client's order
/// decides, and OpenSSH lists ChaCha20 and the CTR modes before GCM, so
/// offering CTR as well had every OpenSSH client pick AES-CTR with
/// HMAC-SHA-256 (the MAC alone was 12% of the gateway's CPU on a bulk copy).
pub const CIPHERS: &[russh::cipher::Name] =
    &[russh::cipher::AES_128_GCM, russh::cipher::AES_256_GCM];

/// The node's configuration with its host key certified by the cluster's
/// SSH CA for `names` (the names in its TLS certificate), so clients that
/// trust the CA connect with no prompt; without a certificate when the CA
/// cannot sign yet.
pub fn certified_config(
    key: &russh::keys::PrivateKey,
    names: &[String],
    ca: &gatehouse_cp_server::identity::ssh_ca::SshCa,
) -> Result<russh::server::Config, gatehouse_cp_server::identity::ssh_ca::SshCaError> {
    let cert = ca.sign_host(key.public_key(), names)?;
    Ok(config(key.clone(), vec![cert]))
}

/// Re-signs the host certificate at half its validity (and every few
/// seconds while the CA cannot sign) and hands each new configuration to
/// the listener; running connections keep theirs.
pub async fn renew_host_certificate(
    key: russh::keys::PrivateKey,
    names: Vec<String>,
    ids: Arc<gatehouse_cp_server::identity::Identities>,
    mut signed: bool,
    tx: watch::Sender<Arc<russh::server::Config>>,
) {
    let half = Duration::from_secs(gatehouse_cp_server::identity::ssh_ca::HOST_CERT_SECS / 2);
    loop {
        tokio::time::sleep(if signed { half } else { Duration::from_secs(5) }).await;
        match certified_config(&key, &names, &ids.ssh_ca) {
            Ok(c) => {
                signed = true;
                let _ = tx.send(Arc::new(c));
            }
            Err(e) => {
                signed = false;
                tracing::warn!(error = %e, "the SSH host certificate could not be signed; retrying");
            }
        }
    }
}

/// Accepts SSH clients forever.
pub async fn serve(
    listener: TcpListener,
    config: watch::Receiver<Arc<russh::server::Config>>,
    cluster: Arc<Cluster>,
    agents: AgentRegistry,
    gate: Gate,
) {
    let accept_errors = gatehouse_cp_server::limits::LogEvery::new(Duration::from_secs(10));
    loop {
        let (sock, peer) = accept(&listener, &accept_errors).await;
        let Some(slot) = gate.limits.admit(peer.ip()) else {
            let _ = sock.try_write(
                b"SSH-2.0-Gatehouse\r\ntoo many connections from your address are still authenticating; retry shortly\r\n",
            );
            continue;
        };
        let _ = sock.set_nodelay(true);
        let (stage_tx, stage_rx) = watch::channel(Stage::KeyExchange);
        let conn = Conn {
            peer,
            cluster: cluster.clone(),
            agents: agents.clone(),
            gate: gate.clone(),
            slot: Some(slot),
            link: None,
            stage: stage_tx,
        };
        let config = config.borrow().clone();
        let deadline = gate.limits.stage();
        let cut = Cut::default();
        let sock = Cuttable {
            inner: sock,
            cut: cut.clone(),
        };
        tokio::spawn(async move {
            // The client's version line is the first stage.
            let running =
                match tokio::time::timeout(deadline, russh::server::run_stream(config, sock, conn))
                    .await
                {
                    Ok(Ok(r)) => r,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "SSH connection ended before a session");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "SSH version exchange did not finish in time");
                        return;
                    }
                };
            let handle = running.handle();
            tokio::spawn(stage_deadlines(stage_rx, deadline, handle, cut, peer));
            if let Err(e) = running.await {
                tracing::debug!(%peer, error = %e, "SSH connection ended");
            }
        });
    }
}

/// One client connection.
struct Conn {
    peer: SocketAddr,
    cluster: Arc<Cluster>,
    agents: AgentRegistry,
    gate: Gate,
    /// Counted against the unauthenticated caps until authentication.
    slot: Option<gatehouse_cp_server::limits::ConnSlot>,
    /// The session at the agent, once authenticated.
    link: Option<Arc<Link>>,
    /// Where the connection stands, for [`stage_deadlines`].
    stage: watch::Sender<Stage>,
}

/// The session stream to the agent and the channels on it.
struct Link {
    to_agent: mpsc::Sender<SshFrame>,
    /// Each channel's frames from the agent.
    channels: Mutex<HashMap<u32, mpsc::Sender<SshFrame>>>,
    /// The agent's answer to the session: `Some(Ok)` once it holds the
    /// target connection, `Some(Err(reason))` when it does not.
    ready: watch::Receiver<Option<Result<(), String>>>,
    session_id: String,
    /// The agent's answers to global requests, one request at a time.
    globals: tokio::sync::Mutex<mpsc::Receiver<SshFrame>>,
    /// The client's connection, for the channels the target opens (known
    /// once the client asks for a remote forward).
    client: std::sync::OnceLock<russh::server::Handle>,
}

impl Conn {
    /// [`Self::verify`], outside the client's deadline; a refusal gives the
    /// client a fresh one for its next attempt.
    async fn login(&mut self, user: &str, credential: Credential<'_>) -> Auth {
        self.stage.send_replace(Stage::Verifying);
        let auth = self.verify(user, credential).await;
        self.stage.send_replace(if matches!(auth, Auth::Accept) {
            Stage::Authenticated
        } else {
            Stage::Authentication
        });
        auth
    }

    /// Verifies the credential and the rule, commits the session and opens
    /// its stream at the agent.
    async fn verify(&mut self, user: &str, credential: Credential<'_>) -> Auth {
        let (login, target) = match user.rsplit_once('@') {
            Some((l, t)) => (l.to_string(), t.to_string()),
            None => (String::new(), user.to_string()),
        };
        let ask = Ask {
            user,
            target: &target,
            login,
            credential,
            peer: self.peer,
            kind: "ssh",
        };
        let (open, agent, route, record) =
            match admit(ask, &self.cluster, &self.agents, &self.gate).await {
                Ok(a) => a,
                Err(r) => {
                    tracing::info!(peer = %self.peer, refusal = %r, "SSH client refused");
                    return match r {
                        // A caller with a valid credential learns why.
                        Refusal::NotAllowed { .. }
                        | Refusal::WrongKind { .. }
                        | Refusal::Unavailable { .. }
                        | Refusal::NotDurable
                        | Refusal::StateUnconfirmed => self.refused_after_auth(&r),
                        _ => Auth::reject(),
                    };
                }
            };
        self.slot = None;
        let session_id = open.session_id.clone();
        let (mine, theirs) = tokio::io::duplex(256 << 10);
        let cluster = self.cluster.clone();
        let agents = self.agents.clone();
        tokio::spawn(async move {
            let id = open.session_id.clone();
            let r = match route {
                Route::Local => {
                    let indexed = index(&cluster, record);
                    relay(
                        theirs,
                        BytesMut::new(),
                        open,
                        &agent,
                        &agents,
                        indexed,
                        refusal_bytes,
                    )
                    .await
                }
                Route::Peer(addr) => {
                    if !index(&cluster, record).await {
                        let mut theirs = theirs;
                        let _ = theirs.write_all(&refusal_bytes(&Refusal::NotDurable)).await;
                        return;
                    }
                    relay_via_peer(
                        theirs,
                        BytesMut::new(),
                        open,
                        &agent,
                        &addr,
                        &cluster,
                        refusal_bytes,
                    )
                    .await
                }
            };
            let _ = close_unreached(&cluster, &id, r).await;
        });
        self.link = Some(Link::start(mine, session_id));
        Auth::Accept
    }

    /// A caller whose credential was good but who may not have the session
    /// is let in to be told why: each channel's first request gets the
    /// reason on stderr and exit status 255.
    fn refused_after_auth(&mut self, r: &Refusal) -> Auth {
        let (tx, _) = mpsc::channel(1);
        let (_, ready) = watch::channel(Some(Err(r.to_string())));
        self.slot = None;
        self.link = Some(Arc::new(Link {
            to_agent: tx,
            channels: Mutex::new(HashMap::new()),
            ready,
            session_id: String::new(),
            globals: tokio::sync::Mutex::new(mpsc::channel(1).1),
            client: std::sync::OnceLock::new(),
        }));
        Auth::Accept
    }
}

/// A refusal as the SSH side reads it from the agent stream.
fn refusal_bytes(r: &Refusal) -> Vec<u8> {
    gatehouse_proto::frame(&SshFrame {
        channel: 0,
        msg: Some(ssh_frame::Msg::Reply(SshReply {
            ok: false,
            message: r.to_string(),
            port: 0,
        })),
    })
}

impl Link {
    /// Starts the tasks that write frames to the agent and route its frames
    /// to their channels.
    fn start(stream: DuplexStream, session_id: String) -> Arc<Link> {
        let (mut rd, mut wr) = tokio::io::split(stream);
        let (to_agent, mut outbox) = mpsc::channel::<SshFrame>(64);
        let (ready_tx, ready) = watch::channel(None);
        let (global_tx, globals) = mpsc::channel(4);
        let link = Arc::new(Link {
            to_agent,
            channels: Mutex::new(HashMap::new()),
            ready,
            session_id,
            globals: tokio::sync::Mutex::new(globals),
            client: std::sync::OnceLock::new(),
        });
        tokio::spawn(async move {
            while let Some(f) = outbox.recv().await {
                if wr.write_all(&gatehouse_proto::frame(&f)).await.is_err() {
                    break;
                }
            }
            let _ = wr.shutdown().await;
        });
        // The reader holds the link weakly: when the client's connection
        // and its channels are gone, the sender to the agent goes with
        // them, and the agent's stream ends.
        let l = Arc::downgrade(&link);
        tokio::spawn(async move {
            loop {
                let f = match gatehouse_proto::read_frame::<SshFrame, _>(&mut rd).await {
                    Ok(Some(f)) => f,
                    _ => break,
                };
                if f.channel == 0 {
                    if let Some(ssh_frame::Msg::Reply(r)) = f.msg {
                        let _ = ready_tx.send(Some(if r.ok { Ok(()) } else { Err(r.message) }));
                    }
                    continue;
                }
                if f.channel == GLOBAL_CHANNEL {
                    // Nobody waits for an answer that came too late.
                    let _ = global_tx.try_send(f);
                    continue;
                }
                let Some(link) = l.upgrade() else { break };
                if f.channel & TARGET_OPENED != 0
                    && let Some(ssh_frame::Msg::Open(open)) = f.msg
                {
                    // Its frames queue from now on, while the client is
                    // asked to take it.
                    let from_agent = link.register(f.channel);
                    tokio::spawn(run_forwarded(link, f.channel, open, from_agent));
                    continue;
                }
                let tx = link
                    .channels
                    .lock()
                    .ok()
                    .and_then(|m| m.get(&f.channel).cloned());
                drop(link);
                if let Some(tx) = tx {
                    // A channel's frames wait for its client; the others
                    // wait behind it (bounded).
                    let _ = tx.send(f).await;
                }
            }
            // The agent is gone: every channel ends.
            if ready_tx.borrow().is_none() {
                let _ = ready_tx.send(Some(Err("the target's agent ended the session".into())));
            }
            if let Some(link) = l.upgrade()
                && let Ok(mut m) = link.channels.lock()
            {
                m.clear();
            }
        });
        link
    }

    async fn ready(&self) -> Result<(), String> {
        let mut rx = self.ready.clone();
        match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone().unwrap_or(Ok(())),
            Err(_) => Err("the target's agent ended the session".into()),
        }
    }

    /// Sends a global request to the agent and waits (bounded) for its
    /// answer.
    async fn global(&self, req: ssh_request::Req) -> Option<SshReply> {
        self.ready().await.ok()?;
        let mut answers = self.globals.lock().await;
        while answers.try_recv().is_ok() {}
        self.to_agent
            .send(SshFrame {
                channel: GLOBAL_CHANNEL,
                msg: Some(ssh_frame::Msg::Request(SshRequest {
                    req: Some(req),
                    want_reply: true,
                })),
            })
            .await
            .ok()?;
        match tokio::time::timeout(GLOBAL_TIMEOUT, answers.recv()).await {
            Ok(Some(SshFrame {
                msg: Some(ssh_frame::Msg::Reply(r)),
                ..
            })) => Some(r),
            _ => None,
        }
    }

    fn register(&self, id: u32) -> mpsc::Receiver<SshFrame> {
        let (tx, rx) = mpsc::channel(CHANNEL_QUEUE);
        if let Ok(mut m) = self.channels.lock() {
            m.insert(id, tx);
        }
        rx
    }

    fn unregister(&self, id: u32) {
        if let Ok(mut m) = self.channels.lock() {
            m.remove(&id);
        }
    }
}

impl russh::server::Handler for Conn {
    type Error = russh::Error;

    /// The key exchange is done: the authentication stage begins.
    async fn authentication_banner(&mut self) -> Result<Option<String>, Self::Error> {
        self.stage.send_replace(Stage::Authentication);
        Ok(None)
    }

    async fn auth_none(&mut self, _user: &str) -> Result<Auth, Self::Error> {
        self.stage.send_replace(Stage::Authentication);
        Ok(Auth::Reject {
            proceed_with_methods: Some(MethodSet::from(METHODS)),
            partial_success: false,
        })
    }

    async fn auth_password(&mut self, user: &str, password: &str) -> Result<Auth, Self::Error> {
        Ok(self.login(user, Credential::Secret(password)).await)
    }

    async fn auth_keyboard_interactive<'a>(
        &'a mut self,
        user: &str,
        _submethods: &str,
        response: Option<russh::server::Response<'a>>,
    ) -> Result<Auth, Self::Error> {
        let Some(mut response) = response else {
            // The prompt is out: the answer has a deadline of its own.
            self.stage.send_replace(Stage::Authentication);
            return Ok(Auth::Partial {
                name: "Gatehouse".into(),
                instructions: "".into(),
                prompts: vec![("Gatehouse token: ".into(), false)].into(),
            });
        };
        let answer = response.next().unwrap_or_default();
        let Ok(credential) = std::str::from_utf8(&answer) else {
            return Ok(Auth::reject());
        };
        let credential = credential.trim().to_string();
        Ok(self.login(user, Credential::Secret(&credential)).await)
    }

    /// A certificate from `gatehouse ssh login`; russh has checked that the
    /// caller holds its key, its validity period and its signature.
    async fn auth_openssh_certificate(
        &mut self,
        user: &str,
        certificate: &russh::keys::Certificate,
    ) -> Result<Auth, Self::Error> {
        Ok(self
            .login(user, Credential::SshCertificate(certificate))
            .await)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(link) = self.link.clone() else {
            return Ok(());
        };
        let open = SshOpen {
            kind: "session".into(),
            ..Default::default()
        };
        tokio::spawn(run_channel(link, channel, reply, open, session.handle()));
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        originator_address: &str,
        originator_port: u32,
        reply: russh::server::ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(link) = self.link.clone() else {
            return Ok(());
        };
        let open = SshOpen {
            kind: "direct-tcpip".into(),
            host: host_to_connect.to_string(),
            port: port_to_connect,
            originator: originator_address.to_string(),
            originator_port,
        };
        tokio::spawn(run_channel(link, channel, reply, open, session.handle()));
        Ok(())
    }

    /// `ssh -R`: the agent asks the target to listen, when the policy
    /// allows it; for port 0 the client learns the port the target chose.
    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Some(link) = self.link.clone() else {
            return Ok(false);
        };
        let _ = link.client.set(session.handle());
        let req = ssh_request::Req::TcpipForward(SshListen {
            address: address.to_string(),
            port: *port,
        });
        Ok(match link.global(req).await {
            Some(r) if r.ok => {
                if *port == 0 {
                    *port = r.port;
                }
                true
            }
            Some(r) => {
                tracing::info!(session_id = %link.session_id, address, port = *port, reason = %r.message, "remote forward refused");
                false
            }
            None => false,
        })
    }

    async fn cancel_tcpip_forward(
        &mut self,
        address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Some(link) = self.link.clone() else {
            return Ok(false);
        };
        let req = ssh_request::Req::CancelTcpipForward(SshListen {
            address: address.to_string(),
            port,
        });
        Ok(link.global(req).await.is_some_and(|r| r.ok))
    }

    // X11 channels and agent forwarding are refused (the defaults answer
    // no).
}

/// A connection the target accepted on a remote forward: opened towards
/// the client, then relayed like any channel; a refusal closes it at the
/// target.
async fn run_forwarded(
    link: Arc<Link>,
    n: u32,
    open: SshOpen,
    from_agent: mpsc::Receiver<SshFrame>,
) {
    let opened = match link.client.get() {
        Some(handle) => handle
            .channel_open_forwarded_tcpip(
                open.host.clone(),
                open.port,
                open.originator.clone(),
                open.originator_port,
            )
            .await
            .map(|c| (c, handle.clone()))
            .map_err(|e| e.to_string()),
        None => Err("no remote forward was asked for on this connection".into()),
    };
    let (channel, handle) = match opened {
        Ok(x) => x,
        Err(why) => {
            tracing::info!(session_id = %link.session_id, channel = n, reason = %why, "the client refused a forwarded connection");
            link.unregister(n);
            let _ = link
                .to_agent
                .send(SshFrame {
                    channel: n,
                    msg: Some(ssh_frame::Msg::Close(true)),
                })
                .await;
            return;
        }
    };
    relay_channel(link, channel, n, from_agent, handle).await;
}

/// One channel: opened at the agent, then its client's messages go to the
/// agent and the agent's frames to the client, until either closes it.
async fn run_channel(
    link: Arc<Link>,
    channel: Channel<Msg>,
    reply: russh::server::ChannelOpenHandle,
    open: SshOpen,
    handle: russh::server::Handle,
) {
    let id = channel.id();
    let n = u32::from(id);
    let kind = open.kind.clone();
    if let Err(reason) = link.ready().await {
        if kind != "session" {
            reply
                .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return;
        }
        reply.accept().await;
        refuse_channel(channel, &handle, &reason).await;
        return;
    }
    let mut from_agent = link.register(n);
    let sent = link
        .to_agent
        .send(SshFrame {
            channel: n,
            msg: Some(ssh_frame::Msg::Open(open)),
        })
        .await;
    let answer = match (
        sent,
        tokio::time::timeout(OPEN_TIMEOUT, from_agent.recv()).await,
    ) {
        (Ok(()), Ok(Some(f))) => f,
        _ => {
            link.unregister(n);
            reply.reject(russh::ChannelOpenFailure::ConnectFailed).await;
            return;
        }
    };
    match answer.msg {
        Some(ssh_frame::Msg::Reply(r)) if r.ok => reply.accept().await,
        Some(ssh_frame::Msg::Reply(r)) if kind == "session" => {
            link.unregister(n);
            reply.accept().await;
            refuse_channel(channel, &handle, &r.message).await;
            return;
        }
        _ => {
            link.unregister(n);
            reply
                .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return;
        }
    }
    relay_channel(link, channel, n, from_agent, handle).await;
}

/// Relays an open channel (`n` on the agent stream) both ways until either
/// side closes it.
async fn relay_channel(
    link: Arc<Link>,
    channel: Channel<Msg>,
    n: u32,
    mut from_agent: mpsc::Receiver<SshFrame>,
    handle: russh::server::Handle,
) {
    let id = channel.id();
    let (mut rd, wr) = channel.split();
    let to_agent = link.to_agent.clone();
    // Client → agent.
    let up = async move {
        while let Some(msg) = rd.wait().await {
            let Some(m) = client_frame(msg) else { continue };
            let closing = matches!(m, ssh_frame::Msg::Close(_));
            if to_agent
                .send(SshFrame {
                    channel: n,
                    msg: Some(m),
                })
                .await
                .is_err()
                || closing
            {
                break;
            }
        }
    };
    // Agent → client.
    let h = handle.clone();
    let down = async move {
        let handle = h;
        while let Some(f) = from_agent.recv().await {
            let Some(m) = f.msg else { continue };
            let ok = match m {
                ssh_frame::Msg::Data(d) => wr.data_bytes(bytes::Bytes::from(d)).await.is_ok(),
                ssh_frame::Msg::Stderr(d) => wr
                    .extended_data_bytes(1, bytes::Bytes::from(d))
                    .await
                    .is_ok(),
                ssh_frame::Msg::Eof(_) => wr.eof().await.is_ok(),
                ssh_frame::Msg::Reply(r) => if r.ok {
                    handle.channel_success(id).await
                } else {
                    handle.channel_failure(id).await
                }
                .is_ok(),
                ssh_frame::Msg::ExitStatus(s) => wr.exit_status(s).await.is_ok(),
                ssh_frame::Msg::ExitSignal(s) => handle
                    .exit_signal_request(
                        id,
                        gatehouse_proto::ssh::sig_from(&s.signal),
                        s.core_dumped,
                        s.message,
                        String::new(),
                    )
                    .await
                    .is_ok(),
                ssh_frame::Msg::Close(_) => {
                    let _ = wr.close().await;
                    false
                }
                ssh_frame::Msg::Open(_) | ssh_frame::Msg::Request(_) => true,
            };
            if !ok {
                break;
            }
        }
    };
    tokio::select! {
        () = up => {
            // The client closed the channel: the agent closes it at the
            // target; the agent's last frames still reach nobody.
        }
        () = down => {}
    }
    link.unregister(n);
    let _ = link.to_agent.try_send(SshFrame {
        channel: n,
        msg: Some(ssh_frame::Msg::Close(true)),
    });
    let _ = handle.close(id).await;
    tracing::debug!(session_id = %link.session_id, channel = n, "SSH channel closed");
}

/// Answers a session channel that cannot reach the target: its first
/// request succeeds, so the client prints the reason and exits 255.
async fn refuse_channel(mut channel: Channel<Msg>, handle: &russh::server::Handle, reason: &str) {
    let id = channel.id();
    let wait = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(msg) = channel.wait().await {
            match msg {
                ChannelMsg::RequestShell { .. }
                | ChannelMsg::Exec { .. }
                | ChannelMsg::RequestSubsystem { .. } => return true,
                ChannelMsg::RequestPty { .. } | ChannelMsg::SetEnv { .. } => {
                    let _ = handle.channel_success(id).await;
                }
                ChannelMsg::Eof | ChannelMsg::Close => return false,
                _ => {}
            }
        }
        false
    });
    if matches!(wait.await, Ok(true)) {
        let _ = handle.channel_success(id).await;
    }
    let line = format!("gatehouse: {reason}\r\n");
    let _ = channel.extended_data_bytes(1, line.into_bytes()).await;
    let _ = channel.exit_status(255).await;
    let _ = channel.eof().await;
    let _ = channel.close().await;
}

/// A client's channel message as a frame for the agent.
fn client_frame(msg: ChannelMsg) -> Option<ssh_frame::Msg> {
    let req = |r: ssh_request::Req, want_reply: bool| {
        Some(ssh_frame::Msg::Request(SshRequest {
            req: Some(r),
            want_reply,
        }))
    };
    match msg {
        ChannelMsg::Data { data } => Some(ssh_frame::Msg::Data(data.to_vec())),
        ChannelMsg::ExtendedData { data, .. } => Some(ssh_frame::Msg::Stderr(data.to_vec())),
        ChannelMsg::Eof => Some(ssh_frame::Msg::Eof(true)),
        ChannelMsg::Close => Some(ssh_frame::Msg::Close(true)),
        ChannelMsg::RequestPty {
            want_reply,
            term,
            col_width,
            row_height,
            pix_width,
            pix_height,
            terminal_modes,
        } => req(
            ssh_request::Req::Pty(SshPty {
                term,
                cols: col_width,
                rows: row_height,
                pix_width,
                pix_height,
                modes: terminal_modes
                    .iter()
                    .flat_map(|(op, v)| [u32::from(*op as u8), *v])
                    .collect(),
            }),
            want_reply,
        ),
        ChannelMsg::RequestShell { want_reply } => req(ssh_request::Req::Shell(true), want_reply),
        ChannelMsg::Exec {
            want_reply,
            command,
        } => req(ssh_request::Req::Exec(command), want_reply),
        ChannelMsg::RequestSubsystem { want_reply, name } => {
            req(ssh_request::Req::Subsystem(name), want_reply)
        }
        // russh reports every channel request as wanting a reply; OpenSSH
        // sends `env` without wanting one (and a reply it does not expect
        // would answer its next request), so none is given.
        ChannelMsg::SetEnv {
            variable_name,
            variable_value,
            ..
        } => req(
            ssh_request::Req::Env(SshEnv {
                name: variable_name,
                value: variable_value,
            }),
            false,
        ),
        ChannelMsg::WindowChange {
            col_width,
            row_height,
            pix_width,
            pix_height,
        } => req(
            ssh_request::Req::WindowChange(SshWindow {
                cols: col_width,
                rows: row_height,
                pix_width,
                pix_height,
            }),
            false,
        ),
        ChannelMsg::Signal { signal } => req(
            ssh_request::Req::Signal(gatehouse_proto::ssh::sig_name(&signal)),
            false,
        ),
        // X11 requests get no channel at the target: refused by the
        // agent, which answers every request it does not pass on.
        ChannelMsg::RequestX11 { .. } => Some(ssh_frame::Msg::Request(SshRequest {
            req: None,
            want_reply: true,
        })),
        _ => None,
    }
}
