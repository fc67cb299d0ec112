//! Node-to-node services: Raft RPCs and forwarding on the Raft port (mutual
//! TLS), and joining on the API port (authorized by a single-use join token).

use std::collections::BTreeSet;
use std::sync::Arc;

use gatehouse_cp_raft::{Command, CommandResult, NodeInfo, Rejection};
use gatehouse_pki::{ClusterCa, NodeCertRequest};
use gatehouse_proto::cluster::join_server::Join;
use gatehouse_proto::cluster::raft_peer_server::RaftPeer;
use gatehouse_proto::cluster::{JoinRequest, JoinResponse, RaftPayload};
use tonic::{Request, Response, Status};

use gatehouse_proto::cluster::RelayChunk;
use tokio::sync::mpsc;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;

use crate::cluster::{Cluster, ProposeError, now_ms};
use crate::tunnel::AgentRegistry;

/// Metadata key naming the leader's API when a follower cannot serve a call.
pub const LEADER_API: &str = "x-gatehouse-leader-api";

/// Metadata key naming the agent of a relayed session.
pub const RELAY_AGENT: &str = "x-gatehouse-agent";

/// Admits a call on the Raft port only from a current member: the client
/// certificate must be a node certificate ([`gatehouse_pki::node_id_of`]:
/// an agent's or the API's never is) naming a node in the membership.
/// Everything else is refused and logged (at most once per ten seconds,
/// with the count).
#[derive(Clone)]
pub struct NodeGate {
    pub cluster: Arc<Cluster>,
    pub refusals: Arc<crate::limits::LogEvery>,
}

/// The node id a Raft-port call was admitted for, in its extensions.
#[derive(Clone, Copy, Debug)]
pub struct CallerNode(pub u64);

// === impl NodeGate ===

impl NodeGate {
    fn check(&self, req: &Request<()>) -> Result<u64, String> {
        let certs = req.peer_certs().ok_or("no client certificate")?;
        let leaf = certs.first().ok_or("no client certificate")?;
        let id = gatehouse_pki::node_id_of(leaf).ok_or("not a node certificate")?;
        let m = self.cluster.raft.metrics().borrow().clone();
        let members = m.membership_config.membership();
        // A node that is joining knows no membership with itself in it
        // until the leader's first entries arrive: it must hear the
        // leader (whose node certificate the CA issued) to learn it.
        let joining = members.get_node(&self.cluster.node_id).is_none();
        if members.get_node(&id).is_none() && !joining {
            return Err(format!("node {id} is not a member"));
        }
        Ok(id)
    }
}

impl tonic::service::Interceptor for NodeGate {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        match self.check(&req) {
            Ok(id) => {
                req.extensions_mut().insert(CallerNode(id));
                Ok(req)
            }
            Err(why) => {
                let peer = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
                if let Some(n) = self.refusals.tick() {
                    tracing::warn!(%peer, reason = %why, refused = n, "Raft port call refused");
                }
                Err(Status::permission_denied(format!(
                    "the Raft port admits cluster members only ({why})"
                )))
            }
        }
    }
}

/// Commands a member may forward: what followers propose on behalf of the
/// calls they serve. Creating the cluster's CA is only ever proposed by the
/// founding node itself.
fn forwardable(cmd: &Command) -> bool {
    !matches!(cmd, Command::InitCluster { .. })
}

/// The Raft port's service.
pub struct PeerService {
    pub cluster: Arc<Cluster>,
    pub agents: AgentRegistry,
    /// Sessions already opened through a relay: each opens once.
    pub relayed: std::sync::Mutex<std::collections::HashSet<String>>,
}

fn json<T: serde::Serialize>(v: &T) -> Result<Response<RaftPayload>, Status> {
    serde_json::to_vec(v)
        .map(|json| Response::new(RaftPayload { json }))
        .map_err(|e| Status::internal(e.to_string()))
}

fn parse<T: serde::de::DeserializeOwned>(req: Request<RaftPayload>) -> Result<T, Status> {
    serde_json::from_slice(&req.into_inner().json)
        .map_err(|e| Status::invalid_argument(format!("malformed raft payload: {e}")))
}

#[tonic::async_trait]
impl RaftPeer for PeerService {
    type RelaySessionStream = ReceiverStream<Result<RelayChunk, Status>>;

    async fn has_agent(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let name: String = parse(req)?;
        json(&self.agents.get(&name).is_some())
    }

    async fn relay_session(
        &self,
        req: Request<tonic::Streaming<RelayChunk>>,
    ) -> Result<Response<Self::RelaySessionStream>, Status> {
        let agent = req
            .metadata()
            .get(RELAY_AGENT)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Status::invalid_argument("relay names no agent"))?
            .to_string();
        let mut inbound = req.into_inner();
        // The first chunk carries the SessionOpen; it must be a session the
        // index holds, live, served by this agent, exactly as committed.
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("relay carried no session"))?;
        let open = first_open(&first.data)?;
        self.admit_relay(&open, &agent).await?;
        let (mut send, mut recv) = self
            .agents
            .open_session(&agent)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        tokio::spawn(async move {
            if send.write_all(&first.data).await.is_err() {
                return;
            }
            while let Ok(Some(chunk)) = inbound.message().await {
                if send.write_all(&chunk.data).await.is_err() {
                    break;
                }
            }
            let _ = send.finish();
        });
        let (tx, rx) = mpsc::channel(32);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 << 10];
            while let Ok(Some(n)) = recv.read(&mut buf).await {
                let data = buf.get(..n).unwrap_or_default().to_vec();
                if tx.send(Ok(RelayChunk { data })).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn append_entries(
        &self,
        req: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let r = self.cluster.raft.append_entries(parse(req)?).await;
        // Any answer but "seen a higher vote" means a current leader spoke.
        if let Ok(a) = &r
            && !matches!(a, openraft::raft::AppendEntriesResponse::HigherVote(_))
        {
            self.cluster.elections.contact();
        }
        json(&r)
    }

    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let r = self.cluster.raft.vote(parse(req)?).await;
        if let Ok(v) = &r
            && v.vote_granted
        {
            self.cluster.elections.contact();
        }
        json(&r)
    }

    async fn install_snapshot(
        &self,
        req: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let req: openraft::raft::InstallSnapshotRequest<gatehouse_cp_raft::TypeConfig> =
            parse(req)?;
        let vote = req.vote;
        let r = self.cluster.raft.install_snapshot(req).await;
        // Accepted from the leader whose vote this member holds.
        if let Ok(a) = &r
            && a.vote == vote
        {
            self.cluster.elections.contact();
        }
        json(&r)
    }

    async fn forward(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let cmd: Command = parse(req)?;
        if !forwardable(&cmd) {
            return Err(Status::permission_denied(
                "this command cannot be forwarded",
            ));
        }
        // A rejection is an answer, not a failure: the caller must not retry.
        let r = match self.cluster.propose_local(cmd).await {
            Ok(r) => Ok(r),
            Err(ProposeError::Rejected(r)) => Ok(CommandResult::Rejected(r)),
            Err(e) => Err(e.to_string()),
        };
        json(&r)
    }

    async fn read_index(
        &self,
        _req: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let r = self.cluster.read_index().await.map_err(|e| e.to_string());
        json(&r)
    }
}

/// The SessionOpen at the start of a relayed stream.
fn first_open(data: &[u8]) -> Result<gatehouse_proto::tunnel::SessionOpen, Status> {
    use prost::Message;
    let bad = || Status::invalid_argument("relay does not start with a session");
    let len = data
        .get(..4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_be_bytes)
        .ok_or_else(bad)? as usize;
    let body = data.get(4..4 + len).ok_or_else(bad)?;
    gatehouse_proto::tunnel::SessionOpen::decode(body).map_err(|_| bad())
}

// === impl PeerService ===

impl PeerService {
    /// A relayed SessionOpen is admitted only when it is a live session of
    /// the index, for `agent`, with every field the ingress committed.
    async fn admit_relay(
        &self,
        open: &gatehouse_proto::tunnel::SessionOpen,
        agent: &str,
    ) -> Result<(), Status> {
        let refuse = |why: &str| {
            tracing::warn!(session_id = %open.session_id, agent, reason = why, "relayed session refused");
            Err(Status::permission_denied(format!(
                "relayed session refused: {why}"
            )))
        };
        // A target check carries no session: the agent must serve the target.
        if open.check {
            return match self.cluster.reader.target(&open.target) {
                Ok(Some(t)) if t.agent == agent => Ok(()),
                _ => refuse("the target is not served by this agent"),
            };
        }
        let mut record = self.cluster.reader.session(&open.session_id).ok().flatten();
        if record.is_none() {
            // Committed on another node and not yet applied here.
            let _ = self.cluster.linearizable().await;
            record = self.cluster.reader.session(&open.session_id).ok().flatten();
        }
        let Some(s) = record else {
            return refuse("no such session in the index");
        };
        if s.ended_ms.is_some() {
            return refuse("the session has ended");
        }
        if s.agent != agent || s.target != open.target {
            return refuse("the session is not served by this agent");
        }
        // A cancel, end, watch or adoption acts on this live session.
        if open.carries_no_session() {
            return Ok(());
        }
        let same = s.identity == open.identity
            && s.database == open.database
            && s.db_user == open.db_user
            && s.client_addr == open.client_addr
            && s.policy_version == open.policy_version
            && s.started_ms == open.started_ms
            && s.cancel_secret == Some(open.cancel_secret);
        if !same {
            return refuse("it does not match the sessions index");
        }
        if !self
            .relayed
            .lock()
            .map(|mut r| r.insert(open.session_id.clone()))
            .unwrap_or(false)
        {
            return refuse("the session was already opened");
        }
        Ok(())
    }
}

/// The API port's join service.
pub struct JoinService {
    pub cluster: Arc<Cluster>,
    pub ca: Arc<ClusterCa>,
}

#[tonic::async_trait]
impl Join for JoinService {
    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let remote = req
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "unknown".into());
        let req = req.into_inner();
        let m = self.cluster.raft.metrics().borrow().clone();
        if m.current_leader != Some(self.cluster.node_id) {
            let mut st = Status::unavailable("this node is not the leader; retry at the leader");
            if let Some(api) = m.current_leader.and_then(|l| {
                m.membership_config
                    .membership()
                    .get_node(&l)
                    .map(|n| n.api_addr.clone())
            }) && let Ok(v) = api.parse()
            {
                st.metadata_mut().insert(LEADER_API, v);
            }
            return Err(st);
        }
        if req.node_id == 0 {
            return Err(Status::invalid_argument("node id 0 is reserved"));
        }
        if m.membership_config
            .membership()
            .get_node(&req.node_id)
            .is_some()
        {
            return Err(Status::already_exists(format!(
                "node {} is already a member",
                req.node_id
            )));
        }
        let now = now_ms();
        let token_sha256 = gatehouse_cp_raft::state::sha256_hex(req.token.trim().as_bytes());
        // An invalid token is refused before anything reaches the log.
        match self.cluster.reader.join_token(&token_sha256) {
            Ok(Some(t))
                if t.used_ms.is_none() && now < t.expires_ms && t.node_id == req.node_id => {}
            Ok(Some(_)) => {
                return Err(Status::permission_denied(
                    "join token is used, expired or bound to another node",
                ));
            }
            Ok(None) => return Err(Status::permission_denied("unknown join token")),
            Err(e) => return Err(Status::unavailable(e.to_string())),
        }
        match self
            .cluster
            .propose_audited(
                &crate::identity::Actor {
                    principal: crate::identity::Principal {
                        identity: format!("node-{}", req.node_id),
                        issuer: crate::identity::LOCAL_ISSUER.into(),
                        ..Default::default()
                    },
                    addr: remote.clone(),
                },
                Command::ConsumeJoinToken {
                    token_sha256,
                    node_id: req.node_id,
                    now_ms: now,
                },
            )
            .await
        {
            Ok(_) => {}
            Err(ProposeError::Rejected(Rejection::NotFound(_))) => {
                return Err(Status::permission_denied("unknown join token"));
            }
            Err(ProposeError::Rejected(r)) => return Err(Status::permission_denied(r.to_string())),
            Err(e) => return Err(Status::unavailable(e.to_string())),
        }
        let cert_pem = self
            .ca
            .sign_node(&NodeCertRequest {
                csr_pem: &req.csr_pem,
                node_id: req.node_id,
                serial: self.cluster.random_u64(),
                not_before_unix: now / 1000 - 300,
                not_after_unix: now / 1000 + 365 * 86_400,
            })
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let node = NodeInfo {
            raft_addr: req.raft_addr.clone(),
            api_addr: req.api_addr.clone(),
        };
        let raft = self.cluster.raft.clone();
        let id = req.node_id;
        tokio::spawn(async move {
            if let Err(e) = raft.add_learner(id, node, true).await {
                tracing::error!(node_id = id, error = %e, "adding learner failed");
                return;
            }
            let add = openraft::ChangeMembers::AddVoterIds(BTreeSet::from([id]));
            match raft.change_membership(add, false).await {
                Ok(_) => tracing::info!(node_id = id, "node joined as voter"),
                Err(e) => tracing::error!(node_id = id, error = %e, "promoting to voter failed"),
            }
        });
        Ok(Response::new(JoinResponse {
            cert_pem,
            ca_pem: self.ca.cert_pem().to_string(),
            leader_id: self.cluster.node_id,
        }))
    }
}
