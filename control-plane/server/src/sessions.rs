//! Running sessions ended from outside: a kill, a revoked identity, a
//! removed rule. The decision is evidence before it is carried out (fail
//! closed: no durable event, no end), and the session's agent ends it
//! wherever its connection is, telling the client why.

use gatehouse_audit::{Decision, EventKind};
use gatehouse_cp_raft::state::SessionRecord;

use crate::api::ApiError;
use crate::cluster::Cluster;
use crate::tunnel::AgentRegistry;

/// Sessions that have not ended, as this node's state has them.
pub fn running(cluster: &Cluster) -> Result<Vec<SessionRecord>, ApiError> {
    Ok(cluster
        .reader
        .sessions()
        .map_err(ApiError::from)?
        .into_iter()
        .filter(|s| s.ended_ms.is_none())
        .collect())
}

/// Ends `sessions` at once; returns how many ended. One that cannot be
/// ended is logged (its agent ends it when it next reconnects and reports).
pub async fn end_all(
    cluster: &Cluster,
    agents: &AgentRegistry,
    sessions: &[SessionRecord],
    why: &str,
    whence: &str,
) -> u32 {
    let ends = sessions
        .iter()
        .map(|s| end(cluster, agents, s, why, whence));
    let mut n = 0;
    for (s, r) in sessions.iter().zip(futures::future::join_all(ends).await) {
        match r {
            Ok(()) => n += 1,
            Err(e) => tracing::warn!(session_id = %s.id, error = %e, "session not ended"),
        }
    }
    n
}

/// `enforce: immediate`: every running session is judged by the new
/// version from its next statement; the ones it cannot govern as they are
/// are closed by their agent, and each closing is an audit event.
pub async fn enforce_immediately(
    cluster: &Cluster,
    agents: &AgentRegistry,
    document: &str,
    version: &str,
    whence: &str,
) -> Result<(), ApiError> {
    let sessions = running(cluster)?;
    let adopts = sessions
        .iter()
        .map(|s| crate::ingress::adopt_policy(cluster, agents, s, document, version));
    for (s, r) in sessions.iter().zip(futures::future::join_all(adopts).await) {
        match r {
            Ok(a) if !a.closed_because.is_empty() => {
                killed(cluster, s, &a.closed_because, whence).await?;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(session_id = %s.id, error = %e, "policy not put in force"),
        }
    }
    Ok(())
}

/// Ends one running session: `why` goes to its client, its recording and
/// the audit event; `whence` (the actor's address) only to the event.
pub async fn end(
    cluster: &Cluster,
    agents: &AgentRegistry,
    s: &SessionRecord,
    why: &str,
    whence: &str,
) -> Result<(), ApiError> {
    killed(cluster, s, why, whence).await?;
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

/// The durable `session_killed` event of a session ended from outside.
async fn killed(
    cluster: &Cluster,
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
    cluster.audit(ev).await.map_err(ApiError::from)
}
