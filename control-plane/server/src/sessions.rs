//! Running sessions ended from outside: a kill, a revoked identity, a
//! removed rule. The decision is evidence before it is carried out (fail
//! closed: no durable event, no end), and the session's agent ends it
//! wherever its connection is, telling the client why.

use gatehouse_audit::{Decision, EventKind};
use gatehouse_cp_raft::state::SessionRecord;

use crate::api::ApiError;
use crate::cluster::Cluster;
use crate::tunnel::AgentRegistry;

/// Ends one running session: `why` goes to its client, its recording and
/// the audit event; `whence` (the actor's address) only to the event.
pub async fn end(
    cluster: &Cluster,
    agents: &AgentRegistry,
    s: &SessionRecord,
    why: &str,
    whence: &str,
) -> Result<(), ApiError> {
    let mut ev = cluster.event(
        EventKind::SessionKilled,
        Decision::Deny,
        &s.identity,
        &s.target,
        &s.id,
    );
    ev.detail = Some(format!("{why} ({whence})"));
    cluster.audit(ev).await.map_err(ApiError::from)?;
    match crate::ingress::end_session(cluster, agents, s, why).await {
        Ok(true) => {
            tracing::warn!(session_id = %s.id, reason = why, "session ended from outside");
            Ok(())
        }
        Ok(false) => Err(ApiError::NotFound(format!(
            "session {} is not running on agent {}",
            s.id, s.agent
        ))),
        Err(e) => Err(ApiError::Unavailable(format!(
            "session {} could not be ended: {e}",
            s.id
        ))),
    }
}
