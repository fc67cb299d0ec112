//! Remote forwarding (`ssh -R`): the client's global requests to have the
//! target listen, judged by the policy's `ssh.forwarding.remote`, and the
//! connections the target then accepts, relayed to the client as channels
//! the target opened. Each is audited before it takes effect and recorded
//! with its bytes when it closes.

use gatehouse_audit::{Decision, EventKind};
use gatehouse_proto::ssh::{GLOBAL_CHANNEL, TARGET_OPENED};
use gatehouse_proto::tunnel::{
    SshFrame, SshListen, SshOpen, SshReply, SshRequest, ssh_frame, ssh_request,
};
use gatehouse_recording::RecordEvent;

use super::{Mode, Session, audit_lost, msg_frame, record, record_request, target};
use gatehouse_agent_core::session::base_event;

impl Session {
    /// A global request: `tcpip-forward` or `cancel-tcpip-forward`; any
    /// other is answered no.
    pub(super) async fn global(&mut self, r: SshRequest) -> Result<(), String> {
        let (listen, cancel) = match r.req {
            Some(ssh_request::Req::TcpipForward(l)) => (l, false),
            Some(ssh_request::Req::CancelTcpipForward(l)) => (l, true),
            _ => {
                if r.want_reply {
                    self.global_reply(false, "request not supported".into(), 0)
                        .await;
                }
                return Ok(());
            }
        };
        let (ok, message, port) = if cancel {
            match self
                .conn
                .cancel_tcpip_forward(listen.address.clone(), listen.port)
                .await
            {
                Ok(()) => {
                    self.note_listen(&listen, "cancel-tcpip-forward", "allow", "")?;
                    (true, String::new(), 0)
                }
                Err(e) => (false, format!("the target refused: {e}"), 0),
            }
        } else {
            self.listen(&listen).await?
        };
        if r.want_reply {
            self.global_reply(ok, message, port).await;
        }
        Ok(())
    }

    /// Asks the target to listen for the client, when the policy allows it.
    async fn listen(&mut self, l: &SshListen) -> Result<(bool, String, u32), String> {
        let allowed = self.policy.forwarding.remote;
        self.audit_forward(
            allowed,
            format!(
                "remote forward: the target listens on {}:{}",
                l.address, l.port
            ),
        )
        .await?;
        if !allowed {
            self.note_listen(l, "tcpip-forward", "deny", "ssh.forwarding.remote")?;
            return Ok((
                false,
                "remote port forwarding is not allowed by policy".into(),
                0,
            ));
        }
        match self.conn.tcpip_forward(l.address.clone(), l.port).await {
            Ok(bound) => {
                let port = if l.port == 0 { bound } else { l.port };
                let l = SshListen {
                    address: l.address.clone(),
                    port,
                };
                self.note_listen(&l, "tcpip-forward", "allow", "")?;
                Ok((true, String::new(), port))
            }
            Err(e) => {
                let mut ev = base_event(&self.ctx, &self.open, EventKind::Forward, Decision::Deny);
                ev.detail = Some(format!(
                    "remote forward on {}:{}: the target refused it: {e}",
                    l.address, l.port
                ));
                self.ctx.audit(ev).await.map_err(|_| audit_lost())?;
                self.note_listen(l, "tcpip-forward", "deny", "")?;
                Ok((false, format!("the target refused the forward: {e}"), 0))
            }
        }
    }

    fn note_listen(
        &self,
        l: &SshListen,
        request: &str,
        decision: &str,
        rule: &str,
    ) -> Result<(), String> {
        let detail = format!("{}:{}", l.address, l.port);
        if record_request(&self.rec, GLOBAL_CHANNEL, request, detail, decision, rule) {
            Ok(())
        } else {
            Err("session recording failed".into())
        }
    }

    async fn global_reply(&self, ok: bool, message: String, port: u32) {
        let _ = self
            .out
            .send(SshFrame {
                channel: GLOBAL_CHANNEL,
                msg: Some(ssh_frame::Msg::Reply(SshReply { ok, message, port })),
            })
            .await;
    }

    /// A connection the target accepted on a remote forward: audited and
    /// recorded, then opened towards the client and relayed like any
    /// channel (the client's refusal closes it).
    pub(super) async fn on_forwarded(&mut self, f: target::Forwarded) -> Result<(), String> {
        if !self.policy.forwarding.remote {
            let _ = f.channel.close().await;
            return Ok(());
        }
        let id = loop {
            self.next_target_channel = (self.next_target_channel + 1) & !TARGET_OPENED;
            let id = TARGET_OPENED | self.next_target_channel;
            if id != GLOBAL_CHANNEL && !self.channels.contains_key(&id) {
                break id;
            }
        };
        let detail = format!(
            "remote forward connection on {}:{} from {}:{}",
            f.connected.0, f.connected.1, f.originator.0, f.originator.1
        );
        let mut ev = base_event(&self.ctx, &self.open, EventKind::Forward, Decision::Allow);
        ev.detail = Some(format!("{detail} (channel {id})"));
        self.ctx.audit(ev).await.map_err(|_| audit_lost())?;
        if !record(
            &self.rec,
            RecordEvent::ChannelOpen {
                channel: id,
                kind: "forwarded-tcpip".into(),
                detail,
            },
        ) {
            return Err("session recording failed".into());
        }
        let open = SshOpen {
            kind: "forwarded-tcpip".into(),
            host: f.connected.0,
            port: f.connected.1,
            originator: f.originator.0,
            originator_port: f.originator.1,
        };
        // The open goes first, so the ingress knows the channel before any
        // of its bytes.
        if self
            .out
            .send(msg_frame(id, ssh_frame::Msg::Open(open)))
            .await
            .is_err()
        {
            let _ = f.channel.close().await;
            return Ok(());
        }
        self.relay_target_channel(id, f.channel, Mode::Forward);
        Ok(())
    }
}
