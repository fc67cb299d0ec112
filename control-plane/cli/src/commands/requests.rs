//! `gatehouse requests`: reviewing held statements with your own key.

use clap::Subcommand;
use gatehouse_proto::v1::{AccessRequest, ListAccessRequestsRequest, ReviewAccessRequestRequest};
use serde_json::json;

use super::Ctx;
use crate::outln;
use crate::output;

#[derive(Subcommand)]
pub enum RequestsCmd {
    /// Requests you made or may review, oldest first.
    List {
        /// pending | approved | denied | expired | used
        #[arg(long)]
        state: Option<String>,
    },
    /// Approve a request (never your own).
    Approve {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Deny a request; the requester is told your reason.
    Deny {
        id: String,
        #[arg(long)]
        reason: String,
    },
}

fn request_json(r: &AccessRequest) -> serde_json::Value {
    json!({"id": r.id, "state": r.state, "requester": r.requester, "target": r.target,
        "statement": r.statement, "rule": r.rule, "reason": r.reason,
        "session_id": r.session_id, "policy_version": r.policy_version,
        "created_ms": r.created_ms, "expires_ms": r.expires_ms,
        "approvals_required": r.approvals_required, "approved_by": r.approved_by,
        "denied_by": r.denied_by, "denial_reason": r.denial_reason,
        "grant_minutes": r.grant_minutes})
}

pub async fn exec(cmd: &RequestsCmd, ctx: &Ctx) -> anyhow::Result<()> {
    let mut c = ctx.reviews().await?;
    match cmd {
        RequestsCmd::List { state } => {
            let r = c
                .list_access_requests(ListAccessRequestsRequest {
                    state: state.clone().unwrap_or_default(),
                })
                .await?
                .into_inner();
            if ctx.json {
                output::json(&json!(
                    r.requests.iter().map(request_json).collect::<Vec<_>>()
                ))?;
            } else {
                output::table(
                    &[
                        "ID",
                        "STATE",
                        "REQUESTER",
                        "TARGET",
                        "APPROVALS",
                        "STATEMENT",
                    ],
                    r.requests
                        .into_iter()
                        .map(|x| {
                            vec![
                                x.id,
                                x.state,
                                x.requester,
                                x.target,
                                format!("{}/{}", x.approved_by.len(), x.approvals_required),
                                x.statement.chars().take(60).collect(),
                            ]
                        })
                        .collect(),
                )?;
            }
        }
        RequestsCmd::Approve { id, reason } | RequestsCmd::Deny { id, reason } => {
            let approve = matches!(cmd, RequestsCmd::Approve { .. });
            let r = c
                .review_access_request(ReviewAccessRequestRequest {
                    id: id.clone(),
                    approve,
                    reason: reason.clone(),
                })
                .await?
                .into_inner();
            if ctx.json {
                output::json(&request_json(&r))?;
            } else {
                outln!(
                    "request {} is {} ({}/{} approvals)",
                    r.id,
                    r.state,
                    r.approved_by.len(),
                    r.approvals_required
                )?;
            }
        }
    }
    Ok(())
}
