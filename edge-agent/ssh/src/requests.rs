//! A client's channel requests (pty, env, shell, exec, subsystem, window
//! changes, signals), each judged before the target sees it.

use gatehouse_audit::{Decision, EventKind};
use gatehouse_policy::Action;
use gatehouse_proto::tunnel::{SessionOpen, SshRequest, ssh_frame, ssh_request};
use gatehouse_recording::RecordEvent;

use super::{
    Internal, Mode, Session, action_name, audit_lost, files, flush, msg_frame, record,
    record_request, refusal_frames, reply_frame,
};
use gatehouse_agent_core::session::base_event;
use gatehouse_agent_core::{AgentCtx, now_ms};

impl Session {
    pub(super) async fn request(&mut self, id: u32, r: SshRequest) -> Result<(), String> {
        let Some(c) = self.channels.get_mut(&id) else {
            return Ok(());
        };
        if c.refused {
            return Ok(());
        }
        let shared = c.shared.clone();
        let want = r.want_reply;
        // What the agent answers itself, in request order.
        let answer = |ok: bool| {
            if want {
                vec![reply_frame(id, ok, String::new())]
            } else {
                Vec::new()
            }
        };
        let rec_request = |request: &str, detail: String, decision: &str, rule: &str| {
            record_request(&self.rec, id, request, detail, decision, rule)
        };
        let failed = || Err::<(), String>("session recording failed".into());
        let target_err = |e: russh::Error| format!("the target connection failed: {e}");
        match r.req {
            Some(ssh_request::Req::Pty(p)) => {
                if !rec_request("pty", p.term.clone(), "allow", "")
                    || !record(
                        &self.rec,
                        RecordEvent::WindowSize {
                            channel: id,
                            cols: u16::try_from(p.cols).unwrap_or(u16::MAX),
                            rows: u16::try_from(p.rows).unwrap_or(u16::MAX),
                        },
                    )
                {
                    return failed();
                }
                shared.set_mode(Mode::Terminal);
                if let Ok(mut d) = shared.terminal.lock() {
                    *d = Some(gatehouse_shell::detector::Detector::new());
                }
                let modes: Vec<(russh::Pty, u32)> = p
                    .modes
                    .chunks_exact(2)
                    .filter_map(|m| {
                        let op = u8::try_from(*m.first()?).ok()?;
                        Some((russh::Pty::from_u8(op)?, *m.get(1)?))
                    })
                    .collect();
                if want {
                    shared.expect_reply().await;
                }
                c.write
                    .request_pty(
                        want,
                        &p.term,
                        p.cols,
                        p.rows,
                        p.pix_width,
                        p.pix_height,
                        &modes,
                    )
                    .await
                    .map_err(target_err)?;
            }
            Some(ssh_request::Req::WindowChange(w)) => {
                if !record(
                    &self.rec,
                    RecordEvent::WindowSize {
                        channel: id,
                        cols: u16::try_from(w.cols).unwrap_or(u16::MAX),
                        rows: u16::try_from(w.rows).unwrap_or(u16::MAX),
                    },
                ) {
                    return failed();
                }
                c.write
                    .window_change(w.cols, w.rows, w.pix_width, w.pix_height)
                    .await
                    .map_err(target_err)?;
            }
            Some(ssh_request::Req::Env(e)) => {
                let allowed = self.policy.env_allowed(&e.name);
                if !rec_request(
                    "env",
                    e.name.clone(),
                    if allowed { "allow" } else { "deny" },
                    if allowed { "" } else { "ssh.env" },
                ) {
                    return failed();
                }
                if allowed {
                    if want {
                        shared.expect_reply().await;
                    }
                    c.write
                        .set_env(want, e.name, e.value)
                        .await
                        .map_err(target_err)?;
                } else {
                    shared.after_replies(&self.out, answer(false)).await;
                }
            }
            Some(ssh_request::Req::Signal(s)) => {
                if !rec_request("signal", s.clone(), "allow", "") {
                    return failed();
                }
                c.write
                    .signal(gatehouse_proto::ssh::sig_from(&s))
                    .await
                    .map_err(target_err)?;
            }
            Some(ssh_request::Req::Subsystem(name)) => {
                let allowed = name == "sftp";
                if !rec_request(
                    "subsystem",
                    name.clone(),
                    if allowed { "allow" } else { "deny" },
                    "",
                ) {
                    return failed();
                }
                if !allowed {
                    shared.after_replies(&self.out, answer(false)).await;
                    return Ok(());
                }
                shared.set_mode(Mode::Files);
                if let Ok(mut d) = shared.files.lock() {
                    *d = Some(files::Decoder::sftp(self.policy.record_file_contents));
                }
                if want {
                    shared.expect_reply().await;
                }
                c.write
                    .request_subsystem(want, name)
                    .await
                    .map_err(target_err)?;
            }
            Some(ssh_request::Req::Shell(_)) => {
                let action = self.policy.shell;
                let rule = if action == Action::Allow {
                    ""
                } else {
                    "ssh.shell"
                };
                let decision = action_name(action);
                if !rec_request("shell", String::new(), decision, rule) {
                    return failed();
                }
                Self::audit_command(
                    &self.ctx,
                    &self.open,
                    id,
                    "interactive shell",
                    action,
                    rule,
                    "",
                )
                .await?;
                if shared.mode() == Mode::Idle {
                    shared.set_mode(Mode::Command("shell".into()));
                }
                match action {
                    Action::Allow => {
                        if want {
                            shared.expect_reply().await;
                        }
                        c.write.request_shell(want).await.map_err(target_err)?;
                    }
                    Action::Deny => {
                        c.refused = true;
                        let mut frames = answer(true);
                        frames.extend(refusal_frames(
                            id,
                            "gatehouse: interactive shells are not allowed on this target by policy (ssh.shell)",
                        ));
                        shared.after_replies(&self.out, frames).await;
                    }
                    Action::Approve => {
                        shared.after_replies(&self.out, answer(true)).await;
                        c.held = Some(Vec::new());
                        self.hold(
                            id,
                            String::new(),
                            "interactive shell".into(),
                            "ssh.shell",
                            "interactive shells need a reviewer's approval",
                        );
                    }
                }
            }
            Some(ssh_request::Req::Exec(command)) => {
                let line = String::from_utf8_lossy(&command).into_owned();
                let who = gatehouse_policy::Subject {
                    identity: self.open.identity.clone(),
                    groups: self.open.groups.clone(),
                    target: self.open.target.clone(),
                };
                let verdict = match &self.doc {
                    Some(d) => gatehouse_policy::judge_command(d, &who, now_ms(), &line),
                    None => gatehouse_policy::Verdict {
                        action: Action::Allow,
                        rule: "default".into(),
                        message: String::new(),
                    },
                };
                if shared.mode() == Mode::Idle {
                    if files::is_scp(&line) {
                        shared.set_mode(Mode::Files);
                    } else {
                        shared.set_mode(Mode::Command(line.clone()));
                    }
                }
                if !rec_request(
                    "exec",
                    line.clone(),
                    action_name(verdict.action),
                    if verdict.action == Action::Allow {
                        ""
                    } else {
                        &verdict.rule
                    },
                ) {
                    return failed();
                }
                Self::audit_command(
                    &self.ctx,
                    &self.open,
                    id,
                    &line,
                    verdict.action,
                    &verdict.rule,
                    &verdict.message,
                )
                .await?;
                match verdict.action {
                    Action::Allow => {
                        if let Some(d) =
                            files::Decoder::scp(&line, self.policy.record_file_contents)
                            && let Ok(mut g) = shared.files.lock()
                        {
                            *g = Some(d);
                        }
                        // What ran is on disk before it runs.
                        if !flush(&self.rec) {
                            return failed();
                        }
                        if want {
                            shared.expect_reply().await;
                        }
                        c.write.exec(want, command).await.map_err(target_err)?;
                    }
                    Action::Deny => {
                        c.refused = true;
                        let _ = c.write.close().await;
                        let mut frames = answer(true);
                        frames.extend(refusal_frames(
                            id,
                            &format!(
                                "gatehouse: command refused by rule \"{}\": {}",
                                verdict.rule, verdict.message
                            ),
                        ));
                        shared.after_replies(&self.out, frames).await;
                    }
                    Action::Approve => {
                        shared.after_replies(&self.out, answer(true)).await;
                        c.held = Some(Vec::new());
                        let rule = verdict.rule.clone();
                        self.hold(id, line, String::new(), &rule, &verdict.message);
                        let _ = command;
                    }
                }
            }
            // Global requests never name a channel.
            Some(ssh_request::Req::TcpipForward(_) | ssh_request::Req::CancelTcpipForward(_)) => {
                shared.after_replies(&self.out, answer(false)).await;
            }
            None => {
                // A request the gateway does not pass on (X11).
                if !rec_request("x11", String::new(), "deny", "") {
                    return failed();
                }
                let mut ev = base_event(&self.ctx, &self.open, EventKind::Forward, Decision::Deny);
                ev.detail = Some("X11 forwarding refused".into());
                self.ctx.audit(ev).await.map_err(|_| audit_lost())?;
                shared.after_replies(&self.out, answer(false)).await;
            }
        }
        Ok(())
    }

    /// A `command` audit event, durable before the command runs.
    async fn audit_command(
        ctx: &AgentCtx,
        open: &SessionOpen,
        id: u32,
        line: &str,
        action: Action,
        rule: &str,
        message: &str,
    ) -> Result<(), String> {
        let mut ev = base_event(
            ctx,
            open,
            EventKind::Command,
            if action == Action::Allow {
                Decision::Allow
            } else {
                Decision::Deny
            },
        );
        ev.statement = Some(line.to_string());
        ev.detail = Some(match action {
            Action::Allow => format!("channel {id}: exec"),
            Action::Deny => format!("channel {id}: refused by rule \"{rule}\": {message}"),
            Action::Approve => {
                format!("channel {id}: held by rule \"{rule}\" for approval: {message}")
            }
        });
        ctx.audit(ev).await.map_err(|_| audit_lost())
    }

    /// Holds a command (or, with an empty `line`, a shell) until a reviewer
    /// decides; the client is told the request's id as soon as it exists.
    fn hold(&self, id: u32, line: String, what: String, rule: &str, message: &str) {
        let ctx = self.ctx.clone();
        let open = self.open.clone();
        let out = self.out.clone();
        let internal = self.internal_tx.clone();
        let rec = self.rec.clone();
        let settings = self
            .doc
            .as_ref()
            .and_then(|d| d.approvals.clone())
            .unwrap_or_default();
        let held = gatehouse_agent_core::guard::Held {
            rule: rule.to_string(),
            message: if message.is_empty() {
                format!(
                    "{} needs a reviewer's approval",
                    if line.is_empty() {
                        &what
                    } else {
                        "the command"
                    }
                )
            } else {
                message.to_string()
            },
        };
        // What a grant covers: the command line, or a shell on the target.
        let statement = if line.is_empty() {
            format!("ssh shell {}", open.target)
        } else {
            line.clone()
        };
        tokio::spawn(async move {
            let (tx, rx) = tokio::sync::oneshot::channel::<String>();
            let tell = async {
                if let Ok(request) = rx.await {
                    let l = format!(
                        "gatehouse: waiting for approval {request} (rule \"{}\")\r\n",
                        held.rule
                    );
                    let _ = out
                        .send(msg_frame(id, ssh_frame::Msg::Stderr(l.into_bytes())))
                        .await;
                }
            };
            let ask = gatehouse_agent_core::guard::approve(
                &ctx,
                &open,
                &settings,
                &statement,
                &held,
                String::new(),
                Some(tx),
            );
            let (resolution, ()) = tokio::join!(ask, tell);
            let (msg, decision) = match resolution {
                Ok(()) => {
                    let _ = internal
                        .send(Internal::Run {
                            channel: id,
                            command: (!line.is_empty()).then(|| line.clone().into_bytes()),
                        })
                        .await;
                    (None, "approved")
                }
                Err(message) => (Some(message), "refused"),
            };
            let ok = record(
                &rec,
                RecordEvent::ChannelRequest {
                    channel: id,
                    request: if line.is_empty() {
                        "shell".into()
                    } else {
                        "exec".into()
                    },
                    detail: line.clone(),
                    decision: decision.into(),
                    rule: held.rule.clone(),
                },
            );
            if !ok {
                let _ = internal
                    .send(Internal::RecordingFailed("recording a decision".into()))
                    .await;
            }
            if let Some(m) = msg {
                let _ = internal
                    .send(Internal::Refuse {
                        channel: id,
                        line: format!("gatehouse: {m}"),
                    })
                    .await;
            }
        });
    }
}
