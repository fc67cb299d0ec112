//! Node-to-node transport: openraft RPCs over gRPC with mutual TLS.
//!
//! Both ends present node certificates issued by the cluster CA (SAN
//! `gatehouse-node`). Requests and responses are openraft's own types,
//! JSON-encoded in a bytes field. Until the node has its certificate (the
//! first node creates the CA through Raft after it starts), every peer is
//! unreachable; a single node does not need its peers to elect itself.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use gatehouse_proto::cluster::RaftPayload;
use gatehouse_proto::cluster::raft_peer_client::RaftPeerClient;
use openraft::AnyError;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::types::{Command, CommandResult, NodeInfo, TypeConfig};

type NodeId = u64;

/// Longest a forwarded write or read-index call waits for the leader. The
/// caller also gives up as soon as it follows another leader, and a leader
/// cut off from the majority answers within the election timeout (see the
/// server's quorum watch); this bounds what is left: a peer that is silent
/// while still leading.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);

/// A read index costs the leader one heartbeat round: a leader that cannot
/// answer within this is as good as gone for a decision that needs it.
const READ_INDEX_TIMEOUT: Duration = Duration::from_secs(3);

/// The node's client TLS identity for peers, set once it has a certificate,
/// and the addresses it dials them at.
#[derive(Clone, Default)]
pub struct PeerTls {
    inner: Arc<RwLock<Option<ClientTlsConfig>>>,
    /// Advertised Raft address → address to dial instead.
    routes: Arc<HashMap<String, String>>,
    /// One connection per peer for forwarded writes and read indexes, kept
    /// between calls (Raft's own traffic has its own connections).
    shared: Arc<std::sync::Mutex<HashMap<String, Channel>>>,
}

/// A peer call failed before an answer came back.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("no node certificate yet")]
    NoIdentity,
    #[error("peer {addr}: {reason}")]
    Transport { addr: String, reason: String },
    #[error("peer {addr} answered malformed data: {reason}")]
    Malformed { addr: String, reason: String },
}

// === impl PeerTls ===

impl PeerTls {
    /// Dials the peers advertising a key of `routes` at its value instead.
    pub fn with_routes(routes: HashMap<String, String>) -> Self {
        Self {
            inner: Arc::default(),
            routes: Arc::new(routes),
            shared: Arc::default(),
        }
    }

    /// Sets the identity: the node's certificate chain and key, and the CA
    /// peers must chain to.
    pub fn set(&self, cert_pem: &str, key_pem: &str, ca_pem: &str) {
        let cfg = ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca_pem))
            .identity(tonic::transport::Identity::from_pem(cert_pem, key_pem))
            .domain_name(gatehouse_pki::NODE_SAN);
        match self.inner.write() {
            Ok(mut g) => *g = Some(cfg),
            Err(p) => *p.into_inner() = Some(cfg),
        }
    }

    fn get(&self) -> Option<ClientTlsConfig> {
        match self.inner.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// A lazily connecting client for the peer at `addr`.
    pub fn client(&self, addr: &str) -> Result<RaftPeerClient<Channel>, PeerError> {
        Ok(RaftPeerClient::new(self.channel(addr)?).max_decoding_message_size(256 << 20))
    }

    fn channel(&self, addr: &str) -> Result<Channel, PeerError> {
        let tls = self.get().ok_or(PeerError::NoIdentity)?;
        let transport = |e: tonic::transport::Error| PeerError::Transport {
            addr: addr.to_string(),
            reason: e.to_string(),
        };
        let dial = self.routes.get(addr).map_or(addr, String::as_str);
        let ch = Endpoint::from_shared(format!("https://{dial}"))
            .map_err(transport)?
            .tls_config(tls)
            .map_err(transport)?
            .connect_timeout(Duration::from_millis(500))
            // A peer cut off without a reset (a partition, a dead host) is
            // noticed by keep-alive, not by the kernel's retransmit timeout.
            .http2_keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(1))
            .keep_alive_while_idle(true)
            .tcp_nodelay(true)
            .connect_lazy();
        Ok(ch)
    }

    /// The kept client for `addr`, created on first use.
    fn shared_client(&self, addr: &str) -> Result<RaftPeerClient<Channel>, PeerError> {
        let mut shared = match self.shared.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let ch = match shared.get(addr) {
            Some(ch) => ch.clone(),
            None => {
                let ch = self.channel(addr)?;
                shared.insert(addr.to_string(), ch.clone());
                ch
            }
        };
        Ok(RaftPeerClient::new(ch).max_decoding_message_size(256 << 20))
    }

    /// Drops the kept connection to `addr` after it failed.
    fn forget(&self, addr: &str) {
        match self.shared.lock() {
            Ok(mut g) => g.remove(addr),
            Err(p) => p.into_inner().remove(addr),
        };
    }

    /// Proposes `cmd` on the leader at `addr` and returns its result.
    pub async fn forward(
        &self,
        addr: &str,
        cmd: &Command,
    ) -> Result<Result<CommandResult, String>, PeerError> {
        let mut c = self.shared_client(addr)?;
        let mut req = tonic::Request::new(payload(addr, cmd)?);
        req.set_timeout(FORWARD_TIMEOUT);
        let resp = within(addr, FORWARD_TIMEOUT, c.forward(req))
            .await
            .inspect_err(|_| self.forget(addr))?;
        decode(addr, &resp.json)
    }

    /// Asks the leader at `addr` to confirm its leadership and returns the
    /// log index a linearizable read must wait for.
    pub async fn read_index(&self, addr: &str) -> Result<Result<u64, String>, PeerError> {
        let mut c = self.shared_client(addr)?;
        let mut req = tonic::Request::new(RaftPayload {
            json: b"null".to_vec(),
        });
        req.set_timeout(READ_INDEX_TIMEOUT);
        let resp = within(addr, READ_INDEX_TIMEOUT, c.read_index(req))
            .await
            .inspect_err(|_| self.forget(addr))?;
        decode(addr, &resp.json)
    }
}

/// Awaits a peer call for at most `limit`: the deadline sent along is the
/// server's to enforce, and a silent peer never reads it.
async fn within<T>(
    addr: &str,
    limit: Duration,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, PeerError> {
    let transport = |reason: String| PeerError::Transport {
        addr: addr.to_string(),
        reason,
    };
    match tokio::time::timeout(limit, call).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(transport(s.message().to_string())),
        Err(_) => Err(transport(format!("no answer within {} s", limit.as_secs()))),
    }
}

fn payload<T: serde::Serialize>(addr: &str, v: &T) -> Result<RaftPayload, PeerError> {
    serde_json::to_vec(v)
        .map(|json| RaftPayload { json })
        .map_err(|e| PeerError::Malformed {
            addr: addr.to_string(),
            reason: e.to_string(),
        })
}

fn decode<T: DeserializeOwned>(addr: &str, json: &[u8]) -> Result<T, PeerError> {
    serde_json::from_slice(json).map_err(|e| PeerError::Malformed {
        addr: addr.to_string(),
        reason: e.to_string(),
    })
}

/// Creates one [`PeerLink`] per replication target.
#[derive(Clone)]
pub struct Network {
    pub tls: PeerTls,
    /// Told when a voter has a longer log than this member's.
    pub elections: std::sync::Arc<crate::election::Elections>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerLink;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> PeerLink {
        PeerLink {
            target,
            addr: node.raft_addr.clone(),
            tls: self.tls.clone(),
            client: None,
            elections: self.elections.clone(),
        }
    }
}

/// The connection to one peer.
pub struct PeerLink {
    target: NodeId,
    addr: String,
    tls: PeerTls,
    client: Option<RaftPeerClient<Channel>>,
    elections: std::sync::Arc<crate::election::Elections>,
}

// === impl PeerLink ===

impl PeerLink {
    async fn call<Req, Resp, E>(
        &mut self,
        which: Rpc,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, NodeInfo, E>>
    where
        Req: serde::Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let unreachable = |e: &dyn std::fmt::Display| {
            RPCError::Unreachable(Unreachable::new(&AnyError::error(e.to_string())))
        };
        if self.client.is_none() {
            self.client = Some(self.tls.client(&self.addr).map_err(|e| unreachable(&e))?);
        }
        let Some(client) = self.client.as_mut() else {
            return Err(unreachable(&"no client"));
        };
        let body =
            payload(&self.addr, req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let fut = async {
            match which {
                Rpc::Append => client.append_entries(body).await,
                Rpc::Vote => client.vote(body).await,
                Rpc::Snapshot => client.install_snapshot(body).await,
            }
        };
        let resp = match tokio::time::timeout(option.hard_ttl(), fut).await {
            Err(_) => return Err(unreachable(&format!("peer {} timed out", self.addr))),
            Ok(Err(status)) => {
                // Drop the channel so the next call reconnects.
                self.client = None;
                return Err(unreachable(&format!(
                    "peer {}: {}",
                    self.addr,
                    status.message()
                )));
            }
            Ok(Ok(r)) => r.into_inner(),
        };
        let result: Result<Resp, E> =
            decode(&self.addr, &resp.json).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

#[derive(Clone, Copy)]
enum Rpc {
    Append,
    Vote,
    Snapshot,
}

impl RaftNetwork<TypeConfig> for PeerLink {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>> {
        self.call(Rpc::Append, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, NodeInfo, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(Rpc::Snapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>> {
        let r: VoteResponse<NodeId> = self.call(Rpc::Vote, &rpc, &option).await?;
        // A voter whose log is longer should win: this member waits longer
        // before its next campaign.
        if !r.vote_granted && r.last_log_id > rpc.last_log_id {
            self.elections.greater_log_seen();
        }
        Ok(r)
    }
}
