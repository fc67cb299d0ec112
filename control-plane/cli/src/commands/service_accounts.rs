//! `gatehouse service-accounts`.

use clap::Subcommand;
use gatehouse_proto::v1::{CreateServiceAccountRequest, ListRequest};
use serde_json::json;

use super::Ctx;
use crate::outln;
use crate::output;

#[derive(Subcommand)]
pub enum SaCmd {
    /// Every service account, its groups and key ids.
    List,
    /// Create a service account; prints its API key once.
    Create {
        name: String,
        /// A group it belongs to (repeatable).
        #[arg(long = "group")]
        groups: Vec<String>,
    },
}

pub async fn exec(cmd: &SaCmd, ctx: &Ctx) -> anyhow::Result<()> {
    let mut c = ctx.admin().await?;
    match cmd {
        SaCmd::List => {
            let a = c
                .list_service_accounts(ListRequest {})
                .await?
                .into_inner()
                .accounts;
            if ctx.json {
                output::json(&json!(
                    a.iter()
                        .map(|s| json!({"name": s.name, "groups": s.groups,
                            "key_ids": s.key_ids, "created_ms": s.created_ms}))
                        .collect::<Vec<_>>()
                ))?;
            } else {
                output::table(
                    &["NAME", "GROUPS", "KEYS"],
                    a.into_iter()
                        .map(|s| vec![s.name, s.groups.join(","), s.key_ids.join(",")])
                        .collect(),
                )?;
            }
        }
        SaCmd::Create { name, groups } => {
            let r = c
                .create_service_account(CreateServiceAccountRequest {
                    name: name.clone(),
                    groups: groups.clone(),
                })
                .await?
                .into_inner();
            if ctx.json {
                output::json(
                    &json!({"name": name, "identity": format!("sa:{name}"), "api_key": r.api_key}),
                )?;
            } else {
                outln!(
                    "service account sa:{name} created; its API key (shown once):\n{}",
                    r.api_key
                )?;
            }
        }
    }
    Ok(())
}
