//! Lines typed into an interactive shell: found by `gatehouse-shell`'s
//! terminal detector, judged by the command rules, recorded and audited
//! before the Enter that runs them reaches the target. A refused (or held)
//! line closes the shell when the policy says `typed_commands: close`, and
//! is only flagged in its audit event with `flag`. A line that does not
//! parse (a loop's first line, a quote left open) is flagged, never closed:
//! the shell would read more lines for it.

use gatehouse_audit::{Decision, EventKind};
use gatehouse_policy::{Action, TypedCommands};
use gatehouse_proto::tunnel::SessionOpen;
use gatehouse_recording::RecordEvent;
use gatehouse_shell::detector::{Detected, How};

use super::{Rec, record};
use gatehouse_agent_core::AgentCtx;
use gatehouse_agent_core::session::base_event;

/// What the session does with a chunk of terminal input.
pub(super) enum Verdict {
    /// Send it all.
    Pass,
    /// Send the bytes before `before` (the refused line's Enter), then
    /// close the channel telling the client `message`.
    Close { before: usize, message: String },
}

/// Judges, records and audits every line `detected` in one input chunk.
pub(super) async fn judge(
    ctx: &AgentCtx,
    open: &SessionOpen,
    doc: Option<&gatehouse_policy::PolicyDoc>,
    mode: TypedCommands,
    rec: &Rec,
    channel: u32,
    detected: Vec<Detected>,
) -> Result<Verdict, String> {
    let who = gatehouse_policy::Subject {
        identity: open.identity.clone(),
        groups: open.groups.clone(),
        target: open.target.clone(),
    };
    for d in detected {
        let v = match doc {
            Some(doc) => gatehouse_policy::judge_command(doc, &who, d.at_ms, &d.line),
            None => gatehouse_policy::Verdict {
                action: Action::Allow,
                rule: gatehouse_policy::RULE_DEFAULT.into(),
                message: String::new(),
            },
        };
        let refused = v.action != Action::Allow;
        let unparsed = v.rule == gatehouse_policy::RULE_UNPARSEABLE;
        let close = refused && !unparsed && mode == TypedCommands::Close;
        let how = match d.how {
            How::Echo => "read from the echo",
            How::Typed => "read from the keystrokes",
        };
        let decision = if close {
            "deny"
        } else if refused {
            "flag"
        } else {
            "allow"
        };
        let rule = if refused {
            v.rule.clone()
        } else {
            String::new()
        };
        if !record(
            rec,
            RecordEvent::ChannelRequest {
                channel,
                request: "typed".into(),
                detail: d.line.clone(),
                decision: decision.into(),
                rule: rule.clone(),
            },
        ) {
            return Err("session recording failed".into());
        }
        let mut ev = base_event(
            ctx,
            open,
            EventKind::Command,
            if close {
                Decision::Deny
            } else {
                Decision::Allow
            },
        );
        ev.statement = Some(d.line.clone());
        ev.detail = Some(if close {
            format!(
                "channel {channel}: typed in an interactive shell ({how}); refused by rule \"{}\": {}; the shell was closed",
                v.rule, v.message
            )
        } else if refused {
            format!(
                "channel {channel}: typed in an interactive shell ({how}); flagged: rule \"{}\" would {}: {}",
                v.rule,
                if v.action == Action::Deny {
                    "refuse it"
                } else {
                    "hold it for approval"
                },
                v.message
            )
        } else {
            format!("channel {channel}: typed in an interactive shell ({how})")
        });
        ctx.audit(ev)
            .await
            .map_err(|_| "an audit event could not be made durable".to_string())?;
        if close {
            return Ok(Verdict::Close {
                before: d.end.saturating_sub(1),
                message: format!(
                    "gatehouse: {:?} is refused by rule \"{}\": {}; closing the shell",
                    d.line, v.rule, v.message
                ),
            });
        }
    }
    Ok(Verdict::Pass)
}
