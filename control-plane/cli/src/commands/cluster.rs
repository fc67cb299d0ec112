//! `gatehouse cluster`.

use clap::Subcommand;
use gatehouse_proto::v1::{
    ClusterStatusResponse, CreateJoinTokenRequest, ListRequest, RemoveNodeRequest,
};
use serde_json::json;

use super::Ctx;
use crate::outln;
use crate::output;

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// Members, leader, term and replication progress.
    Status,
    /// Create a single-use token for a new node and print how to start it.
    Join {
        #[arg(long)]
        node_id: u64,
        #[arg(long, default_value_t = 3600)]
        ttl_seconds: u64,
    },
    /// Remove a node from the cluster (run against the leader).
    Remove { node_id: u64 },
    /// SHA-256 over this node's applied state.
    Digest,
}

pub async fn exec(cmd: &ClusterCmd, ctx: &Ctx) -> anyhow::Result<()> {
    let mut c = ctx.admin().await?;
    match cmd {
        ClusterCmd::Status => {
            let s = c.cluster_status(ListRequest {}).await?.into_inner();
            print_cluster(&s, ctx.json)?;
        }
        ClusterCmd::Remove { node_id } => {
            let s = c
                .remove_node(RemoveNodeRequest { node_id: *node_id })
                .await?
                .into_inner();
            print_cluster(&s, ctx.json)?;
        }
        ClusterCmd::Join {
            node_id,
            ttl_seconds,
        } => {
            let t = c
                .create_join_token(CreateJoinTokenRequest {
                    node_id: *node_id,
                    ttl_seconds: *ttl_seconds,
                })
                .await?
                .into_inner();
            if ctx.json {
                output::json(
                    &json!({"node_id": node_id, "token": t.token, "expires_ms": t.expires_ms}),
                )?;
            } else {
                outln!("{}", t.token)?;
                eprintln!(
                    "start the new node with: gatehouse-server --node-id {node_id} --join {} --join-token <token above> ...",
                    ctx.api
                );
            }
        }
        ClusterCmd::Digest => {
            let d = c.state_digest(ListRequest {}).await?.into_inner();
            if ctx.json {
                output::json(&json!({"digest": d.digest, "last_applied": d.last_applied,
                    "audit_events": d.audit_events}))?;
            } else {
                outln!(
                    "{}  applied={} audit_events={}",
                    d.digest,
                    d.last_applied,
                    d.audit_events
                )?;
            }
        }
    }
    Ok(())
}

fn print_cluster(s: &ClusterStatusResponse, json_out: bool) -> std::io::Result<()> {
    if json_out {
        return output::json(&json!({
            "node_id": s.node_id, "leader_id": s.leader_id, "term": s.term,
            "last_applied": s.last_applied,
            "nodes": s.nodes.iter().map(|n| json!({"id": n.id, "raft_addr": n.raft_addr,
                "api_addr": n.api_addr, "voter": n.voter, "matched_index": n.matched_index}))
                .collect::<Vec<_>>(),
        }));
    }
    outln!(
        "leader {} · term {} · this node {} applied {}",
        s.leader_id,
        s.term,
        s.node_id,
        s.last_applied
    )?;
    output::table(
        &["ID", "ROLE", "RAFT", "API", "MATCHED"],
        s.nodes
            .iter()
            .map(|n| {
                let role = if n.id == s.leader_id {
                    "leader"
                } else if n.voter {
                    "voter"
                } else {
                    "learner"
                };
                vec![
                    n.id.to_string(),
                    role.into(),
                    n.raft_addr.clone(),
                    n.api_addr.clone(),
                    n.matched_index.to_string(),
                ]
            })
            .collect(),
    )
}
