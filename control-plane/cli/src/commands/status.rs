//! `gatehouse status`.

use gatehouse_proto::v1::ListRequest;
use serde_json::json;

use super::Ctx;
use crate::output;

pub async fn exec(ctx: &Ctx) -> anyhow::Result<()> {
    let mut c = ctx.admin().await?;
    let s = c.status(ListRequest {}).await?.into_inner();
    if ctx.json {
        output::json(&json!({"node_id": s.node_id, "leader_id": s.leader_id,
            "last_applied": s.last_applied, "audit_events": s.audit_events,
            "policy_version": s.policy_version}))?;
    } else {
        output::table(
            &["NODE", "LEADER", "APPLIED", "AUDIT EVENTS", "POLICY"],
            vec![vec![
                s.node_id.to_string(),
                s.leader_id.to_string(),
                s.last_applied.to_string(),
                s.audit_events.to_string(),
                s.policy_version,
            ]],
        )?;
    }
    Ok(())
}
