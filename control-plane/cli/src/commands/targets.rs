//! `gatehouse targets`.

use clap::Subcommand;
use gatehouse_proto::v1::{CheckTargetRequest, CreateTargetRequest, ListRequest};
use serde_json::json;

use super::Ctx;
use crate::outln;
use crate::output;

#[derive(Subcommand)]
pub enum TargetsCmd {
    /// Every target, the agent serving it and whether that agent is online.
    List,
    /// What the agent's role may do on the target beyond reading, from the
    /// target's own catalog (a role with read privileges only is the third
    /// wall of read-only access). Exits 3 when it may do more than read.
    Check {
        name: String,
        /// The database to check in.
        #[arg(long, default_value = "postgres")]
        database: String,
    },
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
        TargetsCmd::Check { name, database } => {
            let r = c
                .check_target(CheckTargetRequest {
                    target: name.clone(),
                    database: database.clone(),
                })
                .await?
                .into_inner();
            if ctx.json {
                output::json(&json!({"target": r.target, "role": r.role,
                    "read_only": r.beyond_reads.is_empty(), "beyond_reads": r.beyond_reads}))?;
            } else if r.beyond_reads.is_empty() {
                outln!("role {} on target {} may only read", r.role, r.target)?;
            } else {
                outln!(
                    "role {} on target {} may do more than read:",
                    r.role,
                    r.target
                )?;
                for what in &r.beyond_reads {
                    outln!("  - {what}")?;
                }
            }
            if !r.beyond_reads.is_empty() {
                std::process::exit(3);
            }
        }
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
