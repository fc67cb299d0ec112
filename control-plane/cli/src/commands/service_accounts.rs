//! `gatehouse service-accounts`.

use clap::Subcommand;
use gatehouse_proto::v1::{
    AddWorkloadBindingRequest, CreateServiceAccountRequest, ListRequest, WorkloadBinding,
};
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
    /// Let tokens of a trusted issuer act as the account (token exchange).
    Bind {
        name: String,
        /// The trusted issuer's name.
        #[arg(long)]
        issuer: String,
        /// Pattern on the token's `sub`; `*` matches any run of characters.
        #[arg(long)]
        subject: String,
        /// The audience the token must carry.
        #[arg(long)]
        audience: String,
        /// A claim the token must carry, as name=value (repeatable).
        #[arg(long = "claim", value_parser = parse_claim)]
        claims: Vec<(String, String)>,
    },
}

fn parse_claim(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not name=value"))
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
        SaCmd::Bind {
            name,
            issuer,
            subject,
            audience,
            claims,
        } => {
            c.add_workload_binding(AddWorkloadBindingRequest {
                service_account: name.clone(),
                binding: Some(WorkloadBinding {
                    issuer: issuer.clone(),
                    subject: subject.clone(),
                    audience: audience.clone(),
                    claims: claims.iter().cloned().collect(),
                }),
            })
            .await?;
            outln!(
                "tokens of {issuer} with subject {subject:?} and audience {audience:?} now act as sa:{name}"
            )?;
        }
    }
    Ok(())
}
