//! `gatehouse targets`.

use clap::Subcommand;
use gatehouse_proto::v1::{CreateTargetRequest, ListRequest};
use serde_json::json;

use super::Ctx;
use crate::outln;
use crate::output;

#[derive(Subcommand)]
pub enum TargetsCmd {
    /// Every target, the agent serving it and whether that agent is online.
    List,
    /// Register a target served by an agent (its credentials stay in the
    /// agent's configuration).
    Create {
        name: String,
        /// The agent that serves it.
        #[arg(long)]
        agent: String,
        /// The protocol: postgres.
        #[arg(long, default_value = "postgres")]
        kind: String,
        /// Role the agent uses when the client names none.
        #[arg(long, default_value = "")]
        db_user: String,
    },
}

pub async fn exec(cmd: &TargetsCmd, ctx: &Ctx) -> anyhow::Result<()> {
    let mut c = ctx.admin().await?;
    match cmd {
        TargetsCmd::List => {
            let ts = c.list_targets(ListRequest {}).await?.into_inner().targets;
            if ctx.json {
                output::json(&json!(
                    ts.iter()
                        .map(|t| json!({"name": t.name, "kind": t.kind, "agent": t.agent,
                            "default_db_user": t.default_db_user, "online": t.online,
                            "created_ms": t.created_ms}))
                        .collect::<Vec<_>>()
                ))?;
            } else {
                output::table(
                    &["NAME", "KIND", "AGENT", "ONLINE", "DEFAULT DB USER"],
                    ts.into_iter()
                        .map(|t| {
                            vec![
                                t.name,
                                t.kind,
                                t.agent,
                                t.online.to_string(),
                                t.default_db_user,
                            ]
                        })
                        .collect(),
                )?;
            }
        }
        TargetsCmd::Create {
            name,
            agent,
            kind,
            db_user,
        } => {
            let t = c
                .create_target(CreateTargetRequest {
                    name: name.clone(),
                    kind: kind.clone(),
                    agent: agent.clone(),
                    default_db_user: db_user.clone(),
                })
                .await?
                .into_inner();
            outln!("target {} created (served by agent {})", t.name, t.agent)?;
        }
    }
    Ok(())
}
