//! One SSH session: the control plane has authenticated the caller and
//! opened this stream; the agent logs in to the target with its own
//! credential ([`target`]) and carries the client's channels to it, each
//! request decided by policy first: exec lines by the command guardrails
//! on a real shell parse, shells, environment variables, subsystems and
//! forwards by the document's `ssh` section. Everything is recorded:
//! terminal bytes and window sizes, command output up to the policy's cap,
//! exit statuses, file operations ([`files`]), and forwards with their
//! bytes.
//!
//! Replies keep the order of the requests on a channel: those passed to the
//! target are answered when the target answers, those the agent decides
//! itself wait behind them.

mod files;
mod forward;
mod pump;
mod requests;
pub mod target;
mod typed;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gatehouse_audit::{Decision, EventKind};
use gatehouse_policy::Action;
use gatehouse_proto::ssh::GLOBAL_CHANNEL;
use gatehouse_proto::tunnel::{SessionOpen, SshFrame, SshOpen, SshReply, ssh_frame};
use gatehouse_proto::{frame, read_frame};
use gatehouse_recording::RecordEvent;
use gatehouse_recording::chunked::SessionMeta;
use russh::ChannelWriteHalf;
use russh::client::Msg;
use tokio::sync::mpsc;

use gatehouse_agent_core::protocol::{BoxFuture, Protocol};
use gatehouse_agent_core::recorder::Recorder;
use gatehouse_agent_core::session::{ClientError, base_event, refused_unrecorded};
use gatehouse_agent_core::{AgentCtx, now_ms};

/// The exit status of a command the gateway refused (as a shell's "cannot
/// execute").
pub const REFUSED_STATUS: u32 = 126;
/// Input held for a command that waits for approval, at most.
const HELD_INPUT_MAX: usize = 1 << 20;

type Target = russh::client::Handle<target::TargetHost>;
type Rec = Arc<Mutex<Option<Recorder>>>;

/// The SSH protocol.
pub struct Ssh;

// === impl Ssh ===

impl Protocol for Ssh {
    fn serve(
        self: Arc<Self>,
        ctx: Arc<AgentCtx>,
        open: SessionOpen,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) -> BoxFuture<'static, ()> {
        Box::pin(serve(ctx, open, send, recv))
    }
}

/// Runs one SSH session stream until the client or the target ends it.
async fn serve(
    ctx: Arc<AgentCtx>,
    open: SessionOpen,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
) {
    let (out, mut outbox) = mpsc::channel::<SshFrame>(64);
    let writer = async move {
        while let Some(f) = outbox.recv().await {
            if send.write_all(&frame(&f)).await.is_err() {
                break;
            }
        }
        let _ = send.finish();
    };
    let session = async {
        // Registered from the start, so a kill reaches a session that is
        // still connecting.
        let (_running, ended, live) = ctx.running.register(&open.session_id);
        let reason = match start(&ctx, &open, &out, ended, live).await {
            Ok(s) => s.run(recv).await,
            Err(ClientError(_, message)) => {
                let _ = out
                    .send(reply_frame(0, false, format!("gatehouse: {message}")))
                    .await;
                message
            }
        };
        tracing::info!(session_id = %open.session_id, %reason, "SSH session ended");
        drop(out);
    };
    tokio::join!(writer, session);
}

fn reply_frame(channel: u32, ok: bool, message: String) -> SshFrame {
    SshFrame {
        channel,
        msg: Some(ssh_frame::Msg::Reply(SshReply {
            ok,
            message,
            port: 0,
        })),
    }
}

fn msg_frame(channel: u32, m: ssh_frame::Msg) -> SshFrame {
    SshFrame {
        channel,
        msg: Some(m),
    }
}

/// The frames that refuse a command on a session channel: the reason on
/// stderr, exit status 126, end of the channel.
fn refusal_frames(channel: u32, line: &str) -> Vec<SshFrame> {
    vec![
        msg_frame(
            channel,
            ssh_frame::Msg::Stderr(format!("{line}\r\n").into_bytes()),
        ),
        msg_frame(channel, ssh_frame::Msg::ExitStatus(REFUSED_STATUS)),
        msg_frame(channel, ssh_frame::Msg::Eof(true)),
        msg_frame(channel, ssh_frame::Msg::Close(true)),
    ]
}

/// Everything decided before the session runs: the target and login, the
/// policy, the recording started, the target logged in to, the start
/// audited.
async fn start(
    ctx: &Arc<AgentCtx>,
    open: &SessionOpen,
    out: &mpsc::Sender<SshFrame>,
    ended: tokio::sync::watch::Receiver<Option<String>>,
    live: tokio::sync::broadcast::Sender<bytes::Bytes>,
) -> Result<Session, ClientError> {
    let refuse = |m: String| ClientError(String::new(), m);
    let Some(target) = ctx.config.target(&open.target).filter(|t| t.kind == "ssh") else {
        return Err(refused_unrecorded(
            ctx,
            open,
            refuse(format!(
                "agent {} does not serve an SSH target \"{}\"",
                ctx.config.name, open.target
            )),
        ));
    };
    let login = if open.db_user.is_empty() {
        target.user.clone()
    } else {
        open.db_user.clone()
    };
    let permitted = if target.logins.is_empty() {
        login == target.user
    } else {
        target.logins.contains(&login)
    };
    if !permitted {
        let mut ev = base_event(ctx, open, EventKind::SessionStart, Decision::Deny);
        ev.detail = Some(format!(
            "login \"{login}\" is not one the agent may use on this target"
        ));
        ctx.audit(ev).await.map_err(|_| audit_down())?;
        return Err(refused_unrecorded(
            ctx,
            open,
            refuse(format!(
                "the agent may not log in to target \"{}\" as \"{login}\"",
                open.target
            )),
        ));
    }
    let doc = gatehouse_agent_core::guard::policy_of(open).map_err(refuse)?;
    let policy = doc.as_ref().and_then(|d| d.ssh.clone()).unwrap_or_default();
    if let Err(why) = gatehouse_agent_core::recorder::admit(ctx) {
        let mut ev = base_event(ctx, open, EventKind::RecordingRefused, Decision::Deny);
        ev.detail = Some(why.clone());
        ctx.audit(ev).await.map_err(|_| audit_down())?;
        return Err(refused_unrecorded(ctx, open, refuse(why)));
    }
    let meta = SessionMeta {
        session_id: open.session_id.clone(),
        identity: open.identity.clone(),
        target: open.target.clone(),
        agent: ctx.config.name.clone(),
        policy_version: open.policy_version.clone(),
        started_ms: open.started_ms,
        database: String::new(),
        db_user: login.clone(),
    };
    let forwarding = policy.forwarding.local || policy.forwarding.remote;
    let (forwarded_tx, forwarded) = mpsc::channel(16);
    let (started, connected) = tokio::join!(
        Recorder::start(ctx, meta),
        target::connect(target, &login, open, forwarding, forwarded_tx)
    );
    let mut recorder = started.map_err(|e| {
        refused_unrecorded(
            ctx,
            open,
            refuse(format!("session recording unavailable: {e}")),
        )
    })?;
    let conn = match connected {
        Ok(c) => c,
        Err(why) => {
            let mut ev = base_event(ctx, open, EventKind::SessionStart, Decision::Deny);
            ev.detail = Some(format!("target unreachable: {why}"));
            let _ = ctx.audit(ev).await;
            let _ = recorder.finish(ctx, "target refused");
            return Err(refuse(format!("target \"{}\": {why}", open.target)));
        }
    };
    let mut ev = base_event(ctx, open, EventKind::SessionStart, Decision::Allow);
    ev.detail = Some(format!(
        "SSH as \"{login}\" on {}:{} ({})",
        target.host,
        target.port,
        if target.ssh_user_ca_file.is_some() {
            "session certificate"
        } else {
            "agent key"
        }
    ));
    ctx.audit(ev).await.map_err(|_| audit_down())?;
    recorder.set_live(live);
    if out.send(reply_frame(0, true, String::new())).await.is_err() {
        let _ = recorder.finish(ctx, "client gone");
        return Err(refuse("the client went away".into()));
    }
    let (internal_tx, internal) = mpsc::channel(16);
    Ok(Session {
        ctx: ctx.clone(),
        open: Arc::new(open.clone()),
        doc,
        policy: Arc::new(policy),
        conn,
        out: out.clone(),
        rec: Arc::new(Mutex::new(Some(recorder))),
        channels: HashMap::new(),
        tasks: tokio::task::JoinSet::new(),
        internal_tx,
        internal,
        forwarded,
        next_target_channel: 0,
        ended,
        activity: Arc::new(AtomicI64::new(now_ms())),
        exits: Arc::new(Mutex::new(Vec::new())),
    })
}

fn audit_down() -> ClientError {
    ClientError(
        String::new(),
        "audit pipeline unavailable; refusing to proceed".into(),
    )
}

/// A running session.
struct Session {
    ctx: Arc<AgentCtx>,
    open: Arc<SessionOpen>,
    doc: Option<Arc<gatehouse_policy::PolicyDoc>>,
    policy: Arc<gatehouse_policy::Ssh>,
    conn: Target,
    out: mpsc::Sender<SshFrame>,
    rec: Rec,
    channels: HashMap<u32, Chan>,
    tasks: tokio::task::JoinSet<()>,
    internal_tx: mpsc::Sender<Internal>,
    internal: mpsc::Receiver<Internal>,
    /// Connections to the session's remote forwards, as the target opens
    /// them.
    forwarded: mpsc::Receiver<target::Forwarded>,
    /// The number of the last channel the target opened (below the high
    /// bit).
    next_target_channel: u32,
    ended: tokio::sync::watch::Receiver<Option<String>>,
    activity: Arc<AtomicI64>,
    /// How each command ended, for the session's end event.
    exits: Arc<Mutex<Vec<String>>>,
}

/// What a channel's helpers hand back to the session loop.
enum Internal {
    /// A held command (or, without one, a shell) was approved: run it now.
    Run {
        channel: u32,
        command: Option<Vec<u8>>,
    },
    /// A held command or shell was refused.
    Refuse { channel: u32, line: String },
    /// The recording failed: the session ends.
    RecordingFailed(String),
}

/// One channel at the target.
struct Chan {
    write: ChannelWriteHalf<Msg>,
    shared: Arc<ChanShared>,
    /// Input that waits with a held command.
    held: Option<Vec<bytes::Bytes>>,
    /// Refused: nothing more goes to the target.
    refused: bool,
}

/// A channel's state both directions see.
struct ChanShared {
    id: u32,
    replies: tokio::sync::Mutex<VecDeque<Pending>>,
    mode: Mutex<Mode>,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    /// Command output recorded so far (against the cap).
    recorded: AtomicU64,
    files: Mutex<Option<files::Decoder>>,
    /// With a terminal: the lines typed into it.
    terminal: Mutex<Option<gatehouse_shell::detector::Detector>>,
}

/// What a channel runs.
#[derive(Clone, Debug, Default, PartialEq)]
enum Mode {
    #[default]
    Idle,
    /// A terminal: recorded whole.
    Terminal,
    /// A command without a terminal.
    Command(String),
    /// A file-transfer subsystem or command, decoded.
    Files,
    /// A forwarded connection.
    Forward,
}

/// A reply owed to the client, in request order.
enum Pending {
    /// The target will answer.
    Forwarded,
    /// Frames the agent decided, sent once the replies before them are.
    Frames(Vec<SshFrame>),
}

impl ChanShared {
    fn new(id: u32) -> Arc<Self> {
        Arc::new(Self {
            id,
            replies: tokio::sync::Mutex::new(VecDeque::new()),
            mode: Mutex::new(Mode::Idle),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            recorded: AtomicU64::new(0),
            files: Mutex::new(None),
            terminal: Mutex::new(None),
        })
    }

    /// The lines the caller entered in `data`, when a terminal is open.
    fn typed_lines(&self, data: &[u8]) -> Vec<gatehouse_shell::detector::Detected> {
        match self.terminal.lock() {
            Ok(mut d) => d
                .as_mut()
                .map(|d| d.input(data, now_ms()))
                .unwrap_or_default(),
            Err(_) => Vec::new(),
        }
    }

    /// Whether the caller is answering a secret's prompt in the terminal.
    fn at_secret_prompt(&self) -> bool {
        self.terminal
            .lock()
            .ok()
            .is_some_and(|d| d.as_ref().is_some_and(|d| d.at_secret_prompt()))
    }

    /// `f` of the channel's mode, without copying it.
    fn with_mode<R>(&self, f: impl FnOnce(&Mode) -> R) -> R {
        match self.mode.lock() {
            Ok(m) => f(&m),
            Err(_) => f(&Mode::default()),
        }
    }

    fn mode(&self) -> Mode {
        self.mode.lock().map(|m| m.clone()).unwrap_or_default()
    }

    fn set_mode(&self, m: Mode) {
        if let Ok(mut g) = self.mode.lock() {
            *g = m;
        }
    }

    /// Sends `frames` after the replies still owed before them.
    async fn after_replies(&self, out: &mpsc::Sender<SshFrame>, frames: Vec<SshFrame>) {
        let mut q = self.replies.lock().await;
        if q.is_empty() {
            for f in frames {
                let _ = out.send(f).await;
            }
        } else {
            q.push_back(Pending::Frames(frames));
        }
    }

    /// The target answered the oldest forwarded request.
    async fn target_replied(&self, out: &mpsc::Sender<SshFrame>, ok: bool) {
        let mut q = self.replies.lock().await;
        if matches!(q.front(), Some(Pending::Forwarded)) {
            q.pop_front();
            let _ = out.send(reply_frame(self.id, ok, String::new())).await;
        }
        while let Some(Pending::Frames(_)) = q.front() {
            if let Some(Pending::Frames(fs)) = q.pop_front() {
                for f in fs {
                    let _ = out.send(f).await;
                }
            }
        }
    }

    async fn expect_reply(&self) {
        self.replies.lock().await.push_back(Pending::Forwarded);
    }
}

/// Records an event; false when the recording failed (the session ends).
fn record(rec: &Rec, event: RecordEvent) -> bool {
    let Ok(mut g) = rec.lock() else { return false };
    match g.as_mut() {
        Some(r) => r.record(now_ms(), event).is_ok(),
        None => false,
    }
}

fn flush(rec: &Rec) -> bool {
    let Ok(mut g) = rec.lock() else { return false };
    match g.as_mut() {
        Some(r) => r.flush().is_ok(),
        None => false,
    }
}

/// A channel request and what was decided on it, recorded.
fn record_request(
    rec: &Rec,
    channel: u32,
    request: &str,
    detail: String,
    decision: &str,
    rule: &str,
) -> bool {
    record(
        rec,
        RecordEvent::ChannelRequest {
            channel,
            request: request.into(),
            detail,
            decision: decision.into(),
            rule: rule.into(),
        },
    )
}

/// How one direction of a channel's bytes is recorded.
fn record_bytes(
    rec: &Rec,
    shared: &ChanShared,
    input: bool,
    stderr: bool,
    data: &[u8],
    cap: u64,
) -> bool {
    let channel = shared.id;
    // Per chunk: the mode is looked at, not copied.
    let (terminal, command) =
        shared.with_mode(|m| (*m == Mode::Terminal, matches!(m, Mode::Command(_))));
    if terminal {
        // What answers a password prompt is kept as one `*` per byte
        // (line ends kept), never as typed.
        let withheld;
        let data = if input && shared.at_secret_prompt() {
            withheld = data
                .iter()
                .map(|b| if matches!(b, b'\r' | b'\n') { *b } else { b'*' })
                .collect::<Vec<u8>>();
            &withheld[..]
        } else {
            data
        };
        let (data, hex) = gatehouse_recording::bytes_fields(data);
        record(
            rec,
            if input {
                RecordEvent::TerminalInput { channel, data, hex }
            } else {
                RecordEvent::TerminalOutput { channel, data, hex }
            },
        )
    } else if command && !input {
        let before = shared
            .recorded
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        if before >= cap {
            return true;
        }
        let keep = usize::try_from(cap - before)
            .unwrap_or(usize::MAX)
            .min(data.len());
        let (text, hex) = gatehouse_recording::bytes_fields(data.get(..keep).unwrap_or_default());
        let ok = record(
            rec,
            RecordEvent::CommandOutput {
                channel,
                stderr,
                data: text,
                hex,
            },
        );
        if keep < data.len() {
            return ok
                && record(
                    rec,
                    RecordEvent::OutputCapped {
                        channel,
                        cap_bytes: cap,
                    },
                );
        }
        ok
    } else {
        true
    }
}

impl Session {
    /// Relays until the client, the target or the control plane ends the
    /// session; gives the end reason.
    async fn run(mut self, recv: quinn::RecvStream) -> String {
        let (frames_tx, mut frames) = mpsc::channel::<SshFrame>(16);
        // Reading a frame is not cancel-safe: its own task reads them.
        let reader = tokio::spawn(async move {
            let mut recv = recv;
            while let Ok(Some(f)) = read_frame::<SshFrame, _>(&mut recv).await {
                if frames_tx.send(f).await.is_err() {
                    break;
                }
            }
        });
        let max_session =
            (self.open.max_session_ms > 0).then(|| Duration::from_millis(self.open.max_session_ms));
        let idle_timeout = (self.open.idle_timeout_ms > 0)
            .then(|| Duration::from_millis(self.open.idle_timeout_ms));
        let opened = tokio::time::Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        let mut ended = self.ended.clone();
        let activity = self.activity.clone();
        let reason = loop {
            tokio::select! {
                f = frames.recv() => {
                    let Some(f) = f else { break "client ended the session".to_string() };
                    self.activity.store(now_ms(), Ordering::Relaxed);
                    if let Err(why) = self.on_frame(f).await {
                        break why;
                    }
                }
                Some(i) = self.internal.recv() => {
                    if let Err(why) = self.on_internal(i).await {
                        break why;
                    }
                }
                Some(f) = self.forwarded.recv() => {
                    if let Err(why) = self.on_forwarded(f).await {
                        break why;
                    }
                }
                _ = tick.tick() => {
                    if !flush(&self.rec) {
                        break "session recording failed".to_string();
                    }
                    if self.conn.is_closed() {
                        break "the target closed the connection".to_string();
                    }
                }
                Ok(()) = ended.changed() => {
                    let why = ended.borrow().clone().unwrap_or_default();
                    break format!("session ended: {why}");
                }
                () = tokio::time::sleep_until(opened + max_session.unwrap_or_default()), if max_session.is_some() => {
                    break format!(
                        "session ended: it reached the access rule's maximum session length of {}s",
                        max_session.unwrap_or_default().as_secs()
                    );
                }
                () = gatehouse_agent_core::session::idle(&activity, idle_timeout.unwrap_or_default()), if idle_timeout.is_some() => {
                    break format!(
                        "session ended: idle for {}s, the access rule's idle timeout",
                        idle_timeout.unwrap_or_default().as_secs()
                    );
                }
            }
        };
        reader.abort();
        // Channels still open learn why the session ends.
        if reason != "client ended the session" {
            let line = format!("gatehouse: {reason}\r\n");
            for id in self.channels.keys() {
                let _ = self
                    .out
                    .send(msg_frame(
                        *id,
                        ssh_frame::Msg::Stderr(line.clone().into_bytes()),
                    ))
                    .await;
                let _ = self
                    .out
                    .send(msg_frame(*id, ssh_frame::Msg::Close(true)))
                    .await;
            }
        }
        let _ = self
            .conn
            .disconnect(russh::Disconnect::ByApplication, "", "")
            .await;
        // Channel tasks end with the connection; their last records land.
        let wait = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(2), wait)
            .await
            .is_err()
        {
            self.tasks.abort_all();
        }
        let exits = self.exits.lock().map(|e| e.join(", ")).unwrap_or_default();
        let mut end = base_event(
            &self.ctx,
            &self.open,
            EventKind::SessionEnd,
            Decision::Allow,
        );
        end.detail = Some(if exits.is_empty() {
            reason.clone()
        } else {
            format!("{reason}; {exits}")
        });
        let _ = self.ctx.audit(end).await;
        let recorder = self.rec.lock().ok().and_then(|mut r| r.take());
        if let Some(r) = recorder
            && let Err(e) = r.finish(&self.ctx, &reason)
        {
            tracing::error!(session_id = %self.open.session_id, error = %e, "sealing the recording failed");
        }
        reason
    }

    async fn on_internal(&mut self, i: Internal) -> Result<(), String> {
        match i {
            Internal::Run { channel, command } => {
                let Some(c) = self.channels.get_mut(&channel) else {
                    return Ok(());
                };
                match command {
                    Some(command) => c.write.exec(false, command).await,
                    None => c.write.request_shell(false).await,
                }
                .map_err(|e| format!("the target connection failed: {e}"))?;
                for data in c.held.take().unwrap_or_default() {
                    c.write
                        .data_bytes(data)
                        .await
                        .map_err(|e| format!("the target connection failed: {e}"))?;
                }
            }
            Internal::Refuse { channel, line } => {
                if let Some(c) = self.channels.get_mut(&channel) {
                    c.refused = true;
                    c.held = None;
                    let _ = c.write.close().await;
                    c.shared
                        .after_replies(&self.out, refusal_frames(channel, &line))
                        .await;
                }
            }
            Internal::RecordingFailed(why) => {
                return Err(format!("session recording failed: {why}"));
            }
        }
        Ok(())
    }

    async fn on_frame(&mut self, f: SshFrame) -> Result<(), String> {
        let id = f.channel;
        let Some(msg) = f.msg else { return Ok(()) };
        match msg {
            ssh_frame::Msg::Open(o) => self.open_channel(id, o).await,
            ssh_frame::Msg::Request(r) if id == GLOBAL_CHANNEL => self.global(r).await,
            ssh_frame::Msg::Request(r) => self.request(id, r).await,
            ssh_frame::Msg::Data(d) | ssh_frame::Msg::Stderr(d) => self.input(id, d).await,
            ssh_frame::Msg::Eof(_) => {
                if let Some(c) = self.channels.get(&id)
                    && !c.refused
                {
                    let _ = c.write.eof().await;
                }
                Ok(())
            }
            ssh_frame::Msg::Close(_) => {
                if let Some(c) = self.channels.remove(&id) {
                    let _ = c.write.close().await;
                }
                Ok(())
            }
            ssh_frame::Msg::Reply(_)
            | ssh_frame::Msg::ExitStatus(_)
            | ssh_frame::Msg::ExitSignal(_) => Ok(()),
        }
    }

    async fn open_channel(&mut self, id: u32, o: SshOpen) -> Result<(), String> {
        let channel = match o.kind.as_str() {
            "session" => self.conn.channel_open_session().await,
            "direct-tcpip" => {
                let allowed = self.policy.local_forward_allowed(&o.host, o.port);
                self.audit_forward(
                    allowed,
                    format!(
                        "local forward to {}:{} from {}:{}",
                        o.host, o.port, o.originator, o.originator_port
                    ),
                )
                .await?;
                if !record(
                    &self.rec,
                    RecordEvent::ChannelOpen {
                        channel: id,
                        kind: "direct-tcpip".into(),
                        detail: format!(
                            "to {}:{}{}",
                            o.host,
                            o.port,
                            if allowed { "" } else { " refused by policy" }
                        ),
                    },
                ) {
                    return Err("session recording failed".into());
                }
                if !allowed {
                    let _ = self
                        .out
                        .send(reply_frame(
                            id,
                            false,
                            "port forwarding is not allowed by policy".into(),
                        ))
                        .await;
                    return Ok(());
                }
                self.conn
                    .channel_open_direct_tcpip(
                        o.host.clone(),
                        o.port,
                        o.originator.clone(),
                        o.originator_port,
                    )
                    .await
            }
            other => {
                let _ = self
                    .out
                    .send(reply_frame(
                        id,
                        false,
                        format!("channel type {other} is not supported"),
                    ))
                    .await;
                return Ok(());
            }
        };
        let ch = match channel {
            Ok(c) => c,
            Err(e) => {
                let _ = self
                    .out
                    .send(reply_frame(
                        id,
                        false,
                        format!("the target refused the channel: {e}"),
                    ))
                    .await;
                return Ok(());
            }
        };
        if o.kind == "session"
            && !record(
                &self.rec,
                RecordEvent::ChannelOpen {
                    channel: id,
                    kind: "session".into(),
                    detail: String::new(),
                },
            )
        {
            return Err("session recording failed".into());
        }
        let mode = if o.kind == "direct-tcpip" {
            Mode::Forward
        } else {
            Mode::Idle
        };
        self.relay_target_channel(id, ch, mode);
        let _ = self.out.send(reply_frame(id, true, String::new())).await;
        Ok(())
    }

    /// Relays a channel open at the target as `id`: a task reads the
    /// target's side, the session loop writes the client's.
    fn relay_target_channel(&mut self, id: u32, ch: russh::Channel<Msg>, mode: Mode) {
        let shared = ChanShared::new(id);
        shared.set_mode(mode);
        let (read, write) = ch.split();
        self.tasks.spawn(pump::pump_target(
            read,
            shared.clone(),
            self.out.clone(),
            self.rec.clone(),
            self.policy.output_cap_bytes,
            self.internal_tx.clone(),
            self.exits.clone(),
            self.ctx.clone(),
            self.open.clone(),
        ));
        self.channels.insert(
            id,
            Chan {
                write,
                shared,
                held: None,
                refused: false,
            },
        );
    }

    /// A `forward` audit event, durable before the forward takes effect; a
    /// refused one says the policy refused it.
    async fn audit_forward(&self, allowed: bool, what: String) -> Result<(), String> {
        let (decision, why) = if allowed {
            (Decision::Allow, "")
        } else {
            (
                Decision::Deny,
                "; the policy's ssh.forwarding does not allow it",
            )
        };
        let mut ev = base_event(&self.ctx, &self.open, EventKind::Forward, decision);
        ev.detail = Some(format!("{what}{why}"));
        self.ctx.audit(ev).await.map_err(|_| audit_lost())
    }

    async fn input(&mut self, id: u32, data: Vec<u8>) -> Result<(), String> {
        let Some(c) = self.channels.get_mut(&id) else {
            return Ok(());
        };
        if c.refused {
            return Ok(());
        }
        c.shared
            .bytes_in
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        if !record_bytes(&self.rec, &c.shared, true, false, &data, 0) {
            return Err("session recording failed".into());
        }
        for op in file_ops(&c.shared, &data, true) {
            if !file_op(&self.rec, &self.ctx, &self.open, id, op).await {
                return Err(audit_lost());
            }
        }
        let detected = c.shared.typed_lines(&data);
        let mut data = bytes::Bytes::from(data);
        let mut close = None;
        if !detected.is_empty() {
            let verdict = typed::judge(
                &self.ctx,
                &self.open,
                self.doc.as_deref(),
                self.policy.typed_commands,
                &self.rec,
                id,
                detected,
            )
            .await?;
            if let typed::Verdict::Close { before, message } = verdict {
                data.truncate(before);
                close = Some(message);
            }
        }
        if let Some(message) = close {
            // The refused line's Enter never reaches the shell.
            c.refused = true;
            if c.held.is_none() && !data.is_empty() {
                c.write
                    .data_bytes(data)
                    .await
                    .map_err(|e| format!("the target connection failed: {e}"))?;
            }
            let _ = self.internal_tx.try_send(Internal::Refuse {
                channel: id,
                line: message,
            });
            return Ok(());
        }
        if let Some(held) = c.held.as_mut() {
            if held.iter().map(bytes::Bytes::len).sum::<usize>() + data.len() > HELD_INPUT_MAX {
                let _ = self.internal_tx.try_send(Internal::Refuse {
                    channel: id,
                    line: "gatehouse: too much input while the command waits for approval".into(),
                });
            } else {
                held.push(data);
            }
            return Ok(());
        }
        c.write
            .data_bytes(data)
            .await
            .map_err(|e| format!("the target connection failed: {e}"))
    }
}

fn audit_lost() -> String {
    "audit pipeline unavailable; refusing to proceed".into()
}

fn action_name(a: Action) -> &'static str {
    match a {
        Action::Allow => "allow",
        Action::Deny => "deny",
        Action::Approve => "approve",
    }
}

/// Records and audits one decoded file operation; false when either
/// failed. The bytes that completed the operation wait for its event to be
/// durable (the caller relays them after).
async fn file_op(
    rec: &Rec,
    ctx: &AgentCtx,
    open: &SessionOpen,
    channel: u32,
    op: files::FileOp,
) -> bool {
    let recorded = record(
        rec,
        RecordEvent::FileOp {
            channel,
            op: op.op.to_string(),
            path: op.path.clone(),
            to: op.to.clone(),
            bytes: op.bytes,
            sha256: op.sha256.clone(),
        },
    );
    let mut ev = base_event(ctx, open, EventKind::FileTransfer, Decision::Allow);
    ev.statement = Some(format!("{} {}", op.op, op.path));
    ev.detail = Some(
        [
            op.to.as_ref().map(|t| format!("to {t}")),
            op.bytes.map(|b| format!("{b} bytes")),
            op.sha256.as_ref().map(|h| format!("sha256 {h}")),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(", "),
    );
    ctx.audit(ev).await.is_ok() && recorded
}

/// The file operations a decoder found in `data` (`client`: sent by the
/// client), taken out of the lock.
fn file_ops(shared: &ChanShared, data: &[u8], client: bool) -> Vec<files::FileOp> {
    match shared.files.lock() {
        Ok(mut d) => match d.as_mut() {
            Some(d) if client => d.client_sent(data),
            Some(d) => d.server_sent(data),
            None => Vec::new(),
        },
        Err(_) => Vec::new(),
    }
}
