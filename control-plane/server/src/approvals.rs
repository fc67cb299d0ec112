//! Just-in-time approval: held statements become access requests in Raft,
//! reviewers approve or deny them through the `Reviews` service, and the
//! agent's statement runs once a grant is used (a Raft write, so a one-time
//! grant cannot be used twice, whichever nodes are asked).

use std::sync::Arc;
use std::time::Duration;

use gatehouse_audit::{AuditEvent, Decision, EventKind};
use gatehouse_cp_raft::Command;
use gatehouse_cp_raft::state::{AccessRequest, RequestState};
use gatehouse_proto::tunnel::{ApprovalAnswer, ApprovalAsk, approval_answer::Outcome};
use gatehouse_proto::v1::reviews_server::Reviews;
use gatehouse_proto::v1::{
    AccessRequest as ApiRequest, ListAccessRequestsRequest, ListAccessRequestsResponse,
    ReviewAccessRequestRequest,
};
use gatehouse_proto::{frame, read_frame};
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};

use crate::cluster::{Cluster, ProposeError, now_ms};

/// How often a waiting statement looks at its request.
const POLL: Duration = Duration::from_millis(100);
/// Lifetime of a request whose statement does not wait (no-wait mode).
const NO_WAIT_LIFETIME_MS: i64 = 3_600_000;

/// Serves the approval streams an agent opens after its control stream.
pub async fn serve_agent(conn: quinn::Connection, cluster: Arc<Cluster>, agent: String) {
    while let Ok((send, recv)) = conn.accept_bi().await {
        let cluster = cluster.clone();
        let agent = agent.clone();
        tokio::spawn(async move {
            if let Err(e) = ask(&cluster, &agent, send, recv).await {
                tracing::warn!(agent_id = %agent, error = %e, "approval stream failed");
            }
        });
    }
}

/// Notifies the webhook of the policy document in force, if it names one.
fn notify(cluster: &Cluster, what: &str, r: &AccessRequest, now: i64) {
    let url = cluster
        .policy_doc()
        .ok()
        .flatten()
        .and_then(|d| d.approvals)
        .and_then(|a| a.webhook);
    let Some(url) = url else { return };
    let denial = r.denial.clone().unwrap_or_default();
    crate::webhook::notify(
        url,
        serde_json::json!({
            "event": what,
            "request_id": r.id,
            "state": r.state(now).as_str(),
            "requester": r.requester,
            "target": r.target,
            "statement": r.statement,
            "rule": r.rule,
            "reason": r.reason,
            "approvals_required": r.approvals_required,
            "approved_by": r.approvals.iter().map(|a| a.identity.clone()).collect::<Vec<_>>(),
            "denied_by": denial.identity,
            "denial_reason": denial.reason,
            "expires_ms": r.expires_ms,
            "policy_version": r.policy_version,
        }),
    );
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

fn event(cluster: &Cluster, kind: EventKind, r: &AccessRequest, decision: Decision) -> AuditEvent {
    let mut ev = cluster.event(kind, decision, &r.requester, &r.target, &r.session_id);
    if !r.requester_issuer.is_empty() {
        ev.issuer = Some(r.requester_issuer.clone());
        ev.groups = Some(r.requester_groups.clone());
    }
    ev.statement = Some(r.statement.clone());
    ev.policy_version = r.policy_version.clone();
    ev
}

/// One held statement: use a grant if there is one, otherwise create a
/// request and (unless the statement does not wait) answer when it is
/// decided or expires.
async fn ask(
    cluster: &Cluster,
    agent: &str,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<(), String> {
    let Some(a) = tokio::time::timeout(
        Duration::from_secs(10),
        read_frame::<ApprovalAsk, _>(&mut recv),
    )
    .await
    .map_err(|_| "no request".to_string())?
    .map_err(|e| e.to_string())?
    else {
        return Ok(());
    };
    let answer = |outcome: Outcome, id: &str, reviewer: &str, reason: &str| ApprovalAnswer {
        outcome: outcome as i32,
        request_id: id.to_string(),
        reviewer: reviewer.to_string(),
        reason: reason.to_string(),
    };
    let reply = match decide(cluster, agent, &a, &mut send, &mut recv).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(agent_id = %agent, error = %e, "approval failed");
            answer(Outcome::Unspecified, "", "", &e)
        }
    };
    send.write_all(&frame(&reply))
        .await
        .map_err(|e| e.to_string())?;
    let _ = send.finish();
    Ok(())
}

async fn decide(
    cluster: &Cluster,
    agent: &str,
    a: &ApprovalAsk,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
) -> Result<ApprovalAnswer, String> {
    let hash = sha256_hex(&a.statement);
    let now = now_ms();
    cluster.linearizable().await.map_err(|e| e.to_string())?;
    if let Some(g) = cluster
        .reader
        .usable_grant(&a.identity, &a.target, &hash, now)
        .map_err(|e| e.to_string())?
    {
        return use_grant(cluster, &g).await;
    }
    let lifetime = if a.wait_ms > 0 {
        a.wait_ms
    } else {
        NO_WAIT_LIFETIME_MS
    };
    let request = AccessRequest {
        id: cluster.new_secret(8),
        requester: a.identity.clone(),
        requester_issuer: a.issuer.clone(),
        requester_groups: a.groups.clone(),
        target: a.target.clone(),
        session_id: a.session_id.clone(),
        statement: a.statement.clone(),
        statement_sha256: hash,
        rule: a.rule.clone(),
        policy_version: a.policy_version.clone(),
        reason: a.reason.clone(),
        created_ms: now,
        expires_ms: now + lifetime,
        approvals_required: a.approvals_required.max(1),
        approver_groups: a.approver_groups.clone(),
        grant_minutes: a.grant_minutes,
        ..Default::default()
    };
    cluster
        .propose(Command::CreateAccessRequest {
            request: Box::new(request.clone()),
        })
        .await
        .map_err(|e| e.to_string())?;
    let mut ev = event(
        cluster,
        EventKind::ApprovalRequested,
        &request,
        Decision::Deny,
    );
    ev.detail = Some(format!(
        "request {} by rule \"{}\" from agent {agent}; needs {} approval(s){}{}",
        request.id,
        request.rule,
        request.approvals_required,
        if request.approver_groups.is_empty() {
            String::new()
        } else {
            format!(" from {}", request.approver_groups.join(", "))
        },
        if request.reason.is_empty() {
            String::new()
        } else {
            format!("; reason: {}", request.reason)
        }
    ));
    cluster.audit(ev).await.map_err(|e| e.to_string())?;
    tracing::info!(request_id = %request.id, identity = %request.requester, target = %request.target, "approval requested");
    notify(cluster, "requested", &request, now);
    if a.wait_ms <= 0 {
        return Ok(ApprovalAnswer {
            outcome: Outcome::Pending as i32,
            request_id: request.id,
            ..Default::default()
        });
    }
    if a.progress {
        let pending = ApprovalAnswer {
            outcome: Outcome::Pending as i32,
            request_id: request.id.clone(),
            ..Default::default()
        };
        send.write_all(&frame(&pending))
            .await
            .map_err(|e| e.to_string())?;
    }
    // Wait for the decision; give up when the agent's stream closes (the
    // client went away).
    let mut probe = [0u8; 1];
    loop {
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            r = recv.read(&mut probe) => {
                if !matches!(r, Ok(Some(_))) {
                    return Err("the session stopped waiting".into());
                }
            }
        }
        let Some(r) = cluster
            .reader
            .access_request(&request.id)
            .map_err(|e| e.to_string())?
        else {
            continue;
        };
        match r.state(now_ms()) {
            RequestState::Pending => {}
            RequestState::Approved => return use_grant(cluster, &r).await,
            RequestState::Denied => {
                let d = r.denial.clone().unwrap_or_default();
                return Ok(ApprovalAnswer {
                    outcome: Outcome::Denied as i32,
                    request_id: r.id,
                    reviewer: d.identity,
                    reason: d.reason,
                });
            }
            RequestState::Expired | RequestState::Used => {
                let mut ev = event(cluster, EventKind::ApprovalExpired, &r, Decision::Deny);
                ev.detail = Some(format!(
                    "request {} expired after {} s without a decision",
                    r.id,
                    (r.expires_ms - r.created_ms) / 1000
                ));
                cluster.audit(ev).await.map_err(|e| e.to_string())?;
                notify(cluster, "expired", &r, now_ms());
                return Ok(ApprovalAnswer {
                    outcome: Outcome::Expired as i32,
                    request_id: r.id,
                    ..Default::default()
                });
            }
        }
    }
}

/// Uses an approved grant (a one-time grant only once) and says so in the
/// audit log.
async fn use_grant(cluster: &Cluster, r: &AccessRequest) -> Result<ApprovalAnswer, String> {
    match cluster
        .propose(Command::UseAccessRequest {
            id: r.id.clone(),
            now_ms: now_ms(),
        })
        .await
    {
        Ok(_) => {}
        Err(ProposeError::Rejected(rej)) => {
            return Ok(ApprovalAnswer {
                outcome: Outcome::Expired as i32,
                request_id: r.id.clone(),
                reason: rej.to_string(),
                ..Default::default()
            });
        }
        Err(e) => return Err(e.to_string()),
    }
    let mut ev = event(cluster, EventKind::ApprovalUsed, r, Decision::Allow);
    ev.detail = Some(format!(
        "request {} approved by {}",
        r.id,
        r.approvals
            .iter()
            .map(|a| a.identity.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    cluster.audit(ev).await.map_err(|e| e.to_string())?;
    Ok(ApprovalAnswer {
        outcome: Outcome::Approved as i32,
        request_id: r.id.clone(),
        ..Default::default()
    })
}

/// The Reviews service.
pub struct ReviewsService {
    pub cluster: Arc<Cluster>,
    pub ids: Arc<crate::identity::Identities>,
}

fn to_api(r: AccessRequest, now: i64) -> ApiRequest {
    let state = r.state(now).as_str().to_string();
    let denial = r.denial.clone().unwrap_or_default();
    ApiRequest {
        id: r.id,
        requester: r.requester,
        target: r.target,
        session_id: r.session_id,
        statement: r.statement,
        statement_sha256: r.statement_sha256,
        rule: r.rule,
        policy_version: r.policy_version,
        reason: r.reason,
        created_ms: r.created_ms,
        expires_ms: r.expires_ms,
        approvals_required: r.approvals_required,
        approver_groups: r.approver_groups,
        grant_minutes: r.grant_minutes,
        approved_by: r.approvals.into_iter().map(|a| a.identity).collect(),
        denied_by: denial.identity,
        denial_reason: denial.reason,
        state,
    }
}

#[tonic::async_trait]
impl Reviews for ReviewsService {
    async fn list_access_requests(
        &self,
        req: Request<ListAccessRequestsRequest>,
    ) -> Result<Response<ListAccessRequestsResponse>, Status> {
        let authz =
            crate::identity::roles::authorize(&self.ids, &req, "ListAccessRequests").await?;
        let want = req.into_inner().state;
        let now = now_ms();
        // Admins and auditors see all; a reviewer its own requests and those
        // it may review (as apply decides a review); a user its own.
        let me = &authz.actor.principal;
        let visible = |r: &AccessRequest| {
            !authz.own_only()
                || r.requester == me.identity
                || (authz.has("reviewer")
                    && (r.approver_groups.is_empty()
                        || r.approver_groups.iter().any(|g| me.groups.contains(g))))
        };
        let mut requests: Vec<ApiRequest> = self
            .cluster
            .reader
            .access_requests()
            .map_err(|e| Status::internal(e.to_string()))?
            .into_iter()
            .filter(|r| visible(r))
            .map(|r| to_api(r, now))
            .filter(|r| want.is_empty() || r.state == want)
            .collect();
        requests.sort_by_key(|r| r.created_ms);
        Ok(Response::new(ListAccessRequestsResponse { requests }))
    }

    async fn review_access_request(
        &self,
        req: Request<ReviewAccessRequestRequest>,
    ) -> Result<Response<ApiRequest>, Status> {
        let authz =
            crate::identity::roles::authorize(&self.ids, &req, "ReviewAccessRequest").await?;
        let identity = authz.actor.principal.identity.clone();
        let groups = authz.actor.principal.groups.clone();
        let r = req.into_inner();
        if !r.approve && r.reason.trim().is_empty() {
            return Err(Status::invalid_argument("a denial needs a reason"));
        }
        self.cluster
            .propose(Command::ReviewAccessRequest {
                id: r.id.clone(),
                reviewer: identity.clone(),
                reviewer_groups: groups,
                approve: r.approve,
                reason: r.reason.clone(),
                now_ms: now_ms(),
            })
            .await
            .map_err(|e| match e {
                ProposeError::Rejected(gatehouse_cp_raft::Rejection::NotFound(m)) => {
                    Status::not_found(format!("{m} not found"))
                }
                ProposeError::Rejected(rej) => Status::failed_precondition(rej.to_string()),
                other => Status::unavailable(other.to_string()),
            })?;
        let stored = self
            .cluster
            .reader
            .access_request(&r.id)
            .map_err(|e| Status::internal(e.to_string()))?
            .ok_or_else(|| Status::not_found(format!("access request {}", r.id)))?;
        let decision = if r.approve {
            Decision::Allow
        } else {
            Decision::Deny
        };
        let mut ev = event(
            &self.cluster,
            EventKind::ApprovalReviewed,
            &stored,
            decision,
        );
        ev.detail = Some(format!(
            "request {} {} by {identity}{}",
            stored.id,
            if r.approve { "approved" } else { "denied" },
            if r.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", r.reason)
            }
        ));
        self.cluster
            .audit(ev)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        notify(
            &self.cluster,
            if r.approve { "approved" } else { "denied" },
            &stored,
            now_ms(),
        );
        Ok(Response::new(to_api(stored, now_ms())))
    }
}
