//! The node's handle on the replicated state: proposals, reads, ids and time.

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use gatehouse_audit::{AuditEvent, Decision, EventKind};
use std::time::Duration;

use gatehouse_cp_raft::{
    Command, CommandResult, Member, PeerTls, Raft, RawEvent, Rejection, StateReader,
};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

/// Why a proposal did not take effect.
#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    /// Not the leader; `leader` is the leader's Raft address, if known.
    #[error("not the leader; leader is {leader:?}")]
    ForwardToLeader { leader: Option<String> },
    /// This node is the leader of its term but has not heard from a majority
    /// within the election timeout (it may be cut off; a new leader may
    /// exist elsewhere). Nothing was proposed.
    #[error("this node cannot reach a majority of the cluster; try another node")]
    NoQuorum,
    /// The proposal was appended but not known to be committed: the node lost
    /// the majority or the deadline passed. It may still commit.
    #[error("the write was not confirmed by a majority ({0}); its outcome is unknown")]
    OutcomeUnknown(&'static str),
    #[error("raft: {0}")]
    Raft(String),
    #[error(transparent)]
    Rejected(#[from] Rejection),
}

/// Longest a leader that keeps its majority takes to confirm a read index
/// (under the 3 s a follower waits for a forwarded one).
const READ_INDEX_WAIT: Duration = Duration::from_millis(2500);

/// Shared by every part of the node.
pub struct Cluster {
    pub node_id: u64,
    pub raft: Raft,
    pub reader: StateReader,
    /// Told of every sign of a live leader, so this member campaigns only
    /// when there is none.
    pub elections: Arc<gatehouse_cp_raft::election::Elections>,
    pub peers: PeerTls,
    rng: Mutex<StdRng>,
    /// Sequence numbers of audit events this node produces itself.
    audit_seq: Mutex<u64>,
}

// === impl Cluster ===

impl Cluster {
    pub fn new(node_id: u64, member: Member, peers: PeerTls) -> Self {
        let producer = Self::producer_name(node_id);
        let high = member.reader.agent_high_water(&producer).unwrap_or(0);
        Self {
            node_id,
            raft: member.raft,
            reader: member.reader,
            elections: member.elections,
            peers,
            rng: Mutex::new(StdRng::from_os_rng()),
            audit_seq: Mutex::new(high),
        }
    }

    /// The producer name of audit events emitted by this control-plane node.
    pub fn producer_name(node_id: u64) -> String {
        format!("control-plane-{node_id}")
    }

    /// Proposes a command and waits until it is committed and applied. On a
    /// follower the command is forwarded to the leader; while no leader is
    /// known (an election), it retries for up to ten seconds.
    pub async fn propose(&self, cmd: Command) -> Result<CommandResult, ProposeError> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let err = match self.propose_local(cmd.clone()).await {
                Err(ProposeError::ForwardToLeader { leader: Some(addr) }) => {
                    // A slow commit is waited for as long as the leader stays
                    // the leader; once this node follows another one (the old
                    // leader died or was cut off), the write goes there.
                    tokio::select! {
                        r = self.peers.forward(&addr, &cmd) => match r {
                            Ok(Ok(CommandResult::Rejected(r))) => {
                                return Err(ProposeError::Rejected(r));
                            }
                            Ok(Ok(r)) => return Ok(r),
                            Ok(Err(msg)) => ProposeError::Raft(msg),
                            Err(e) => ProposeError::Raft(e.to_string()),
                        },
                        () = self.leader_moves_from(&addr) => {
                            ProposeError::Raft(format!("the leader at {addr} was replaced"))
                        }
                    }
                }
                other => match other {
                    Err(e @ ProposeError::ForwardToLeader { leader: None }) => e,
                    done => return done,
                },
            };
            if std::time::Instant::now() >= deadline {
                return Err(err);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Returns once this node no longer follows the leader at `addr`.
    async fn leader_moves_from(&self, addr: &str) {
        loop {
            tokio::time::sleep(Duration::from_millis(gatehouse_cp_raft::HEARTBEAT_MS)).await;
            let m = self.raft.metrics().borrow().clone();
            let current = m
                .current_leader
                .and_then(|l| m.membership_config.membership().get_node(&l).cloned());
            if current.is_none_or(|n| n.raft_addr != addr) {
                return;
            }
        }
    }

    /// True when this node leads its term but no majority has acknowledged
    /// it for longer than the leader lease: the other voters may already
    /// have elected someone else, so it must not pretend to serve.
    pub fn lost_quorum(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.state == openraft::ServerState::Leader
            && m.millis_since_quorum_ack
                .is_some_and(|ms| ms > gatehouse_cp_raft::ELECTION_TIMEOUT_MAX_MS)
    }

    /// Waits until this node has applied everything committed before the
    /// call (a read index confirmed by the leader), so a read that decides
    /// access sees every earlier write, whichever node took it.
    pub async fn linearizable(&self) -> Result<(), ProposeError> {
        let m = self.raft.metrics().borrow().clone();
        if m.current_leader == Some(self.node_id) {
            return self.read_index().await.map(|_| ());
        }
        let leader = m
            .current_leader
            .and_then(|l| m.membership_config.membership().get_node(&l).cloned())
            .ok_or(ProposeError::ForwardToLeader { leader: None })?;
        let index = self
            .peers
            .read_index(&leader.raft_addr)
            .await
            .map_err(|e| ProposeError::Raft(e.to_string()))?
            .map_err(ProposeError::Raft)?;
        self.raft
            .wait(Some(Duration::from_secs(5)))
            .applied_index_at_least(Some(index), "linearizable read")
            .await
            .map(|_| ())
            .map_err(|e| ProposeError::Raft(e.to_string()))
    }

    /// On the leader: confirms leadership with a majority and returns the
    /// log index a linearizable read must wait for.
    pub async fn read_index(&self) -> Result<u64, ProposeError> {
        if self.lost_quorum() {
            return Err(ProposeError::NoQuorum);
        }
        let confirm = self.raft.ensure_linearizable();
        // A leader that keeps its majority may be slow to confirm under a
        // burst (hundreds of logins at once): wait for it as long as the
        // majority keeps acknowledging, up to a bound; one that loses the
        // majority is answered at once.
        let watch = async {
            let started = std::time::Instant::now();
            loop {
                tokio::time::sleep(Duration::from_millis(gatehouse_cp_raft::HEARTBEAT_MS)).await;
                if self.lost_quorum() || started.elapsed() > READ_INDEX_WAIT {
                    return;
                }
            }
        };
        let confirmed = tokio::select! {
            r = confirm => r,
            () = watch => return Err(ProposeError::NoQuorum),
        };
        match confirmed {
            Ok(log_id) => Ok(log_id.map(|l| l.index).unwrap_or(0)),
            Err(e) => {
                if let Some(f) = e.forward_to_leader() {
                    return Err(ProposeError::ForwardToLeader {
                        leader: f.leader_node.as_ref().map(|n| n.raft_addr.clone()),
                    });
                }
                Err(ProposeError::Raft(e.to_string()))
            }
        }
    }

    /// Proposes on this node only. A leader that has lost its majority
    /// refuses at once; one that loses it while the write is pending answers
    /// within the election timeout that the outcome is unknown, instead of
    /// waiting for a commit that may never come.
    pub async fn propose_local(&self, cmd: Command) -> Result<CommandResult, ProposeError> {
        if self.lost_quorum() {
            return Err(ProposeError::NoQuorum);
        }
        let write = self.raft.client_write(cmd);
        let watch = async {
            let started = std::time::Instant::now();
            loop {
                tokio::time::sleep(Duration::from_millis(gatehouse_cp_raft::HEARTBEAT_MS)).await;
                if self.lost_quorum() {
                    return "this node lost the majority";
                }
                if started.elapsed() > Duration::from_secs(30) {
                    return "not committed within 30 s";
                }
            }
        };
        let written = tokio::select! {
            r = write => r,
            why = watch => return Err(ProposeError::OutcomeUnknown(why)),
        };
        match written {
            Ok(resp) => match resp.data {
                CommandResult::Rejected(r) => Err(ProposeError::Rejected(r)),
                other => Ok(other),
            },
            Err(e) => {
                if let Some(f) = e.forward_to_leader() {
                    return Err(ProposeError::ForwardToLeader {
                        leader: f.leader_node.as_ref().map(|n| n.raft_addr.clone()),
                    });
                }
                Err(ProposeError::Raft(e.to_string()))
            }
        }
    }

    /// 128 random bits as 32 hex digits, from a generator seeded once.
    pub fn new_id(&self) -> String {
        let mut b = [0u8; 16];
        self.fill(&mut b);
        hex::encode(b)
    }

    /// A secret of `n` random bytes, hex.
    pub fn new_secret(&self, n: usize) -> String {
        let mut b = vec![0u8; n];
        self.fill(&mut b);
        hex::encode(b)
    }

    /// A fresh 96-bit nonce for sealing.
    pub fn random_nonce(&self) -> [u8; 12] {
        let mut n = [0u8; 12];
        self.fill(&mut n);
        n
    }

    pub fn random_u64(&self) -> u64 {
        let mut b = [0u8; 8];
        self.fill(&mut b);
        u64::from_be_bytes(b) >> 1
    }

    /// The policy document in force, if one was applied (and parses).
    pub fn policy_doc(
        &self,
    ) -> Result<Option<gatehouse_policy::PolicyDoc>, gatehouse_cp_raft::read::ReadError> {
        Ok(self
            .reader
            .current_policy()?
            .and_then(|p| gatehouse_policy::PolicyDoc::from_canonical(&p.canonical).ok()))
    }

    /// `N` random bytes from the node's generator.
    pub fn random_bytes<const N: usize>(&self) -> [u8; N] {
        let mut b = [0u8; N];
        self.fill(&mut b);
        b
    }

    fn fill(&self, b: &mut [u8]) {
        match self.rng.lock() {
            Ok(mut r) => r.fill_bytes(b),
            Err(poisoned) => poisoned.into_inner().fill_bytes(b),
        }
    }

    /// Closes a session in the index that has no recording (refused, never
    /// reached its agent, or lost), with the reason.
    pub async fn close_unrecorded(
        &self,
        session_id: &str,
        reason: String,
    ) -> Result<CommandResult, ProposeError> {
        self.propose(Command::SessionClosed {
            session_id: session_id.to_string(),
            ended_ms: now_ms(),
            end_reason: reason,
            recording_key: String::new(),
            recording_sha256: String::new(),
            recording_size: 0,
            chunk_keys: Vec::new(),
            events: 0,
        })
        .await
    }

    /// The next sequence number of this node's own audit events.
    fn next_seq(&self) -> u64 {
        let mut s = match self.audit_seq.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        *s += 1;
        *s
    }

    /// Proposes a configuration change made by `actor` (calling from
    /// `client_addr`); the change and its `config_change` audit event commit
    /// together or not at all.
    pub async fn propose_audited(
        &self,
        actor: &crate::identity::Actor,
        change: Command,
    ) -> Result<CommandResult, ProposeError> {
        let audit = gatehouse_cp_raft::ChangeAudit {
            actor: actor.principal.identity.clone(),
            client_addr: actor.addr.clone(),
            issuer: actor.principal.issuer.clone(),
            groups: actor.principal.groups.clone(),
            event_id: self.new_id(),
            producer: Self::producer_name(self.node_id),
            seq: self.next_seq(),
            now_ms: now_ms(),
        };
        self.propose(Command::Audited {
            audit: Box::new(audit),
            change: Box::new(change),
        })
        .await
    }

    /// Commits an audit event produced by this node (e.g. a refused
    /// connection). Returns once it is durable in the log.
    pub async fn audit(&self, mut ev: AuditEvent) -> Result<(), ProposeError> {
        let producer = Self::producer_name(self.node_id);
        ev.agent = producer.clone();
        ev.seq = self.next_seq();
        let raw = RawEvent::new(String::from_utf8_lossy(&ev.encode()).into_owned())
            .map_err(|e| ProposeError::Raft(format!("encoding an audit event: {e}")))?;
        self.propose(Command::AppendAudit {
            agent: producer,
            events: vec![raw],
        })
        .await
        .map(|_| ())
    }

    /// A refused-access event for the audit log.
    pub fn denial(
        &self,
        identity: &str,
        target: &str,
        session_id: &str,
        detail: String,
    ) -> AuditEvent {
        let mut ev = self.event(
            EventKind::SessionStart,
            Decision::Deny,
            identity,
            target,
            session_id,
        );
        ev.detail = Some(detail);
        ev
    }

    /// An audit event this node produces, under the policy version in force.
    pub fn event(
        &self,
        kind: EventKind,
        decision: Decision,
        identity: &str,
        target: &str,
        session_id: &str,
    ) -> AuditEvent {
        AuditEvent {
            id: self.new_id(),
            agent: String::new(),
            seq: 0,
            time_ms: now_ms(),
            kind,
            session_id: session_id.to_string(),
            identity: identity.to_string(),
            issuer: None,
            groups: None,
            target: target.to_string(),
            policy_version: self.reader.policy_version().unwrap_or_default(),
            decision,
            statement: None,
            parameters: None,
            outcome: None,
            detail: None,
            masked: None,
        }
    }
}

/// Wall-clock time in Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
