//! `gatehouse agents`.

use clap::Subcommand;
use gatehouse_proto::v1::{CreateEnrollmentTokenRequest, ListRequest};
use serde_json::json;

use super::Ctx;
use crate::outln;
use crate::output::{self, fmt_ms};

#[derive(Subcommand)]
pub enum AgentsCmd {
    /// Enrolled agents and their connections to this node.
    List,
    /// Create a single-use enrollment token for an agent.
    EnrollToken {
        #[arg(long)]
        agent: String,
        #[arg(long, default_value_t = 3600)]
        ttl_seconds: u64,
    },
}

pub async fn exec(cmd: &AgentsCmd, ctx: &Ctx) -> anyhow::Result<()> {
    let mut c = ctx.admin().await?;
    match cmd {
        AgentsCmd::List => {
            let a = c.list_agents(ListRequest {}).await?.into_inner().agents;
            if ctx.json {
                output::json(&json!(
                    a.iter()
                        .map(|x| json!({"name": x.name, "connected": x.connected,
                            "cert_serial": x.cert_serial, "enrolled_ms": x.enrolled_ms,
                            "last_seen_ms": x.last_seen_ms, "version": x.version,
                            "targets": x.targets}))
                        .collect::<Vec<_>>()
                ))?;
            } else {
                output::table(
                    &["NAME", "CONNECTED", "VERSION", "TARGETS", "LAST SEEN"],
                    a.into_iter()
                        .map(|x| {
                            vec![
                                x.name,
                                x.connected.to_string(),
                                x.version,
                                x.targets.join(","),
                                fmt_ms(x.last_seen_ms),
                            ]
                        })
                        .collect(),
                )?;
            }
        }
        AgentsCmd::EnrollToken { agent, ttl_seconds } => {
            let t = c
                .create_enrollment_token(CreateEnrollmentTokenRequest {
                    agent: agent.clone(),
                    ttl_seconds: *ttl_seconds,
                })
                .await?
                .into_inner();
            if ctx.json {
                output::json(
                    &json!({"agent": agent, "token": t.token, "expires_ms": t.expires_ms}),
                )?;
            } else {
                outln!("{}", t.token)?;
            }
        }
    }
    Ok(())
}
