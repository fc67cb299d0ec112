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
    },
    /// Remove an access rule; running sessions no remaining rule admits end.
    Delete { id: String },
}

pub async fn exec(cmd: &RulesCmd, ctx: &Ctx) -> anyhow::Result<()> {
    let mut c = ctx.admin().await?;
    match cmd {
        RulesCmd::List => {
            let r = c.list_rules(ListRequest {}).await?.into_inner();
            if ctx.json {
                output::json(&json!({"policy_version": r.policy_version,
                    "rules": r.rules.iter()
                        .map(|x| json!({"id": x.id, "subject": x.subject, "target": x.target}))
                        .collect::<Vec<_>>()}))?;
            } else {
                outln!("policy version {}", r.policy_version)?;
                output::table(
                    &["ID", "SUBJECT", "TARGET"],
                    r.rules
                        .into_iter()
                        .map(|x| vec![x.id, x.subject, x.target])
                        .collect(),
                )?;
            }
        }
        RulesCmd::Create { subject, target } => {
            let r = c
                .create_rule(CreateRuleRequest {
                    subject: subject.clone(),
                    target: target.clone(),
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
