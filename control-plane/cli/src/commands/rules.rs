//! `gatehouse rules`.

use clap::Subcommand;
use gatehouse_proto::v1::{CreateRuleRequest, DeleteRuleRequest, ListRequest};
use serde_json::json;

use super::Ctx;
use crate::outln;
use crate::output;

#[derive(Subcommand)]
pub enum RulesCmd {
    /// Every access rule and the rules version.
    List,
    /// Allow a subject (sa:<name> or group:<name>) to use a target.
    Create {
        #[arg(long)]
        subject: String,
        #[arg(long)]
        target: String,
        /// The longest a session it admits may last (`90s`, `15m`, `8h`,
        /// `1d`); the session then ends with a FATAL error.
        #[arg(long, value_parser = duration_secs)]
        max_session: Option<u64>,
        /// How long a session it admits may sit idle (no bytes either way).
        #[arg(long, value_parser = duration_secs)]
        idle_timeout: Option<u64>,
    },
    /// Remove an access rule; running sessions no remaining rule admits end.
    Delete { id: String },
}

/// `90s`, `15m`, `8h`, `1d` or plain seconds, in seconds (at least 1).
pub(crate) fn duration_secs(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (n, per) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3_600),
        Some((i, 'd')) => (&s[..i], 86_400),
        _ => (s, 1),
    };
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90s, 15m, 8h or 1d"))?;
    match n.checked_mul(per) {
        Some(0) => Err("a limit must be at least 1s".into()),
        Some(v) => Ok(v),
        None => Err(format!("{s:?} is too long")),
    }
}

pub async fn exec(cmd: &RulesCmd, ctx: &Ctx) -> anyhow::Result<()> {
    let mut c = ctx.admin().await?;
    match cmd {
        RulesCmd::List => {
            let r = c.list_rules(ListRequest {}).await?.into_inner();
            if ctx.json {
                output::json(&json!({"policy_version": r.policy_version,
                    "rules": r.rules.iter()
                        .map(|x| json!({"id": x.id, "subject": x.subject, "target": x.target,
                            "max_session_secs": x.max_session_secs,
                            "idle_timeout_secs": x.idle_timeout_secs}))
                        .collect::<Vec<_>>()}))?;
            } else {
                outln!("policy version {}", r.policy_version)?;
                output::table(
                    &["ID", "SUBJECT", "TARGET", "MAX SESSION", "IDLE TIMEOUT"],
                    r.rules
                        .into_iter()
                        .map(|x| {
                            let limit = |s: u64| {
                                if s == 0 {
                                    "-".to_string()
                                } else {
                                    format!("{s}s")
                                }
                            };
                            vec![
                                x.id,
                                x.subject,
                                x.target,
                                limit(x.max_session_secs),
                                limit(x.idle_timeout_secs),
                            ]
                        })
                        .collect(),
                )?;
            }
        }
        RulesCmd::Create {
            subject,
            target,
            max_session,
            idle_timeout,
        } => {
            let r = c
                .create_rule(CreateRuleRequest {
                    subject: subject.clone(),
                    target: target.clone(),
                    max_session_secs: max_session.unwrap_or(0),
                    idle_timeout_secs: idle_timeout.unwrap_or(0),
                })
                .await?
                .into_inner();
            outln!("rule {} created: {} may use {}", r.id, r.subject, r.target)?;
        }
        RulesCmd::Delete { id } => {
            let r = c
                .delete_rule(DeleteRuleRequest { id: id.clone() })
                .await?
                .into_inner();
            if ctx.json {
                output::json(&json!({"id": id, "sessions_ended": r.sessions_ended}))?;
            } else {
                outln!(
                    "rule {id} deleted; {} running session(s) ended",
                    r.sessions_ended
                )?;
            }
        }
    }
    Ok(())
}
