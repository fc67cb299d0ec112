//! `gatehouse policy`.

use anyhow::Context;
use clap::Subcommand;
use gatehouse_proto::v1::{ApplyPolicyRequest, GetPolicyRequest, ListRequest, PolicyDocument};
use serde_json::json;

use super::Ctx;
use crate::outln;
use crate::output;

#[derive(Subcommand)]
pub enum PolicyCmd {
    /// Validate a policy document (YAML) and put it in force.
    Apply {
        #[arg(long, short = 'f')]
        file: std::path::PathBuf,
    },
    /// Print the document in force, or an earlier one (by history number or
    /// version).
    Show {
        /// A history number (`#3` or `3`) or a document version.
        which: Option<String>,
    },
    /// Every applied document, oldest first.
    History,
    /// Line differences between two documents (default: the one before the
    /// document in force, and the document in force).
    Diff {
        from: Option<String>,
        to: Option<String>,
    },
}

/// A policy named on the command line: `#3`/`3` or a document version.
fn policy_request(which: Option<&str>) -> GetPolicyRequest {
    match which.map(|w| w.trim_start_matches('#')) {
        None => GetPolicyRequest::default(),
        Some(w) => match w.parse::<u64>() {
            Ok(seq) if w.len() < 16 => GetPolicyRequest {
                seq,
                ..Default::default()
            },
            _ => GetPolicyRequest {
                doc_version: w.to_string(),
                ..Default::default()
            },
        },
    }
}

fn policy_json(p: &PolicyDocument) -> serde_json::Value {
    json!({"seq": p.seq, "doc_version": p.doc_version, "policy_version": p.policy_version,
        "author": p.author, "applied_ms": p.applied_ms, "yaml": p.yaml,
        "document": serde_json::from_str::<serde_json::Value>(&p.canonical).unwrap_or_default()})
}

pub async fn exec(cmd: &PolicyCmd, ctx: &Ctx) -> anyhow::Result<()> {
    let mut c = ctx.admin().await?;
    match cmd {
        PolicyCmd::Apply { file } => {
            let yaml = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let p = c
                .apply_policy(ApplyPolicyRequest { yaml })
                .await?
                .into_inner();
            if ctx.json {
                let mut v = policy_json(&p);
                v["unchanged"] = json!(p.unchanged);
                output::json(&v)?;
            } else if p.unchanged {
                outln!(
                    "policy #{} ({}) is already in force; nothing changed",
                    p.seq,
                    p.doc_version
                )?;
            } else {
                outln!(
                    "policy #{} ({}) is in force; decisions now cite version {}",
                    p.seq,
                    p.doc_version,
                    p.policy_version
                )?;
            }
        }
        PolicyCmd::Show { which } => {
            let p = c
                .get_policy(policy_request(which.as_deref()))
                .await?
                .into_inner();
            if ctx.json {
                output::json(&policy_json(&p))?;
            } else {
                outln!(
                    "# policy #{} ({}), applied by {} at {} ms",
                    p.seq,
                    p.doc_version,
                    p.author,
                    p.applied_ms
                )?;
                outln!("{}", p.yaml.strip_suffix('\n').unwrap_or(&p.yaml))?;
            }
        }
        PolicyCmd::History => {
            let r = c.list_policies(ListRequest {}).await?.into_inner();
            if ctx.json {
                output::json(&json!(
                    r.policies.iter().map(policy_json).collect::<Vec<_>>()
                ))?;
            } else {
                output::table(
                    &["#", "VERSION", "AUTHOR", "APPLIED_MS"],
                    r.policies
                        .into_iter()
                        .map(|p| {
                            vec![
                                p.seq.to_string(),
                                p.doc_version,
                                p.author,
                                p.applied_ms.to_string(),
                            ]
                        })
                        .collect(),
                )?;
            }
        }
        PolicyCmd::Diff { from, to } => {
            let to = c
                .get_policy(policy_request(to.as_deref()))
                .await?
                .into_inner();
            let from = match from {
                Some(f) => c.get_policy(policy_request(Some(f))).await?.into_inner(),
                None if to.seq > 1 => c
                    .get_policy(GetPolicyRequest {
                        seq: to.seq - 1,
                        ..Default::default()
                    })
                    .await?
                    .into_inner(),
                None => PolicyDocument::default(),
            };
            let diff = similar::TextDiff::from_lines(&from.yaml, &to.yaml);
            let a = format!("policy #{} ({})", from.seq, from.doc_version);
            let b = format!("policy #{} ({})", to.seq, to.doc_version);
            let text = diff
                .unified_diff()
                .context_radius(3)
                .header(&a, &b)
                .to_string();
            if !text.is_empty() {
                outln!("{}", text.strip_suffix('\n').unwrap_or(&text))?;
            }
        }
    }
    Ok(())
}
