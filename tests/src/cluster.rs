//! A multi-node control plane for tests: real `gatehouse-server` processes
//! sharing one admin token, joined with real join tokens.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use gatehouse_cli::client::{Client, connect};
use gatehouse_proto::v1::{ClusterStatusResponse, ListRequest};

use crate::proxy::LinkProxy;
use crate::{Proc, bin};

/// Every node-to-node Raft link through its own [`LinkProxy`], so a test can
/// partition any node from the others.
pub struct Links {
    /// Node id → its advertised Raft address (picked before it starts).
    raft: BTreeMap<u64, String>,
    /// (from, to) → the proxy `from` dials `to` through.
    proxies: BTreeMap<(u64, u64), LinkProxy>,
}

impl Links {
    fn new(n: u64) -> Self {
        // Reserve the Raft ports up front: every node must know every
        // peer's advertised address to route it through a proxy.
        let held: Vec<(u64, std::net::TcpListener)> = (1..=n)
            .map(|id| (id, std::net::TcpListener::bind("127.0.0.1:0").unwrap()))
            .collect();
        let raft: BTreeMap<u64, String> = held
            .iter()
            .map(|(id, l)| (*id, l.local_addr().unwrap().to_string()))
            .collect();
        drop(held);
        let mut proxies = BTreeMap::new();
        for from in 1..=n {
            for to in 1..=n {
                if from != to {
                    proxies.insert((from, to), LinkProxy::start(raft[&to].clone()));
                }
            }
        }
        Self { raft, proxies }
    }

    /// Cuts every link to and from `id`.
    pub fn isolate(&self, id: u64) {
        for ((from, to), p) in &self.proxies {
            if *from == id || *to == id {
                p.cut();
            }
        }
    }

    /// Heals every link.
    pub fn heal_all(&self) {
        for p in self.proxies.values() {
            p.heal();
        }
    }
}

/// One node's process and addresses.
pub struct Node {
    pub id: u64,
    pub dir: PathBuf,
    pub proc: Option<Proc>,
    pub api: String,
    pub raft: String,
    pub pg: String,
    pub tunnel: String,
    join: Option<(String, String)>,
}

/// A cluster of server processes in one temp dir.
pub struct TestCluster {
    pub token: String,
    pub token_file: PathBuf,
    pub ca_file: PathBuf,
    pub nodes: Vec<Node>,
    pub snapshot_every: u64,
    pub links: Option<Links>,
    /// Where nodes listen for agents (loopback unless a test says otherwise).
    pub tunnel_host: String,
    /// Last, so it is removed after the nodes' processes (see `Stack`).
    pub tmp: tempfile::TempDir,
}

impl TestCluster {
    /// Node 1 founds the cluster; nodes 2..=n join it.
    pub fn start(n: u64, snapshot_every: u64) -> Self {
        Self::start_inner(n, snapshot_every, None, "127.0.0.1")
    }

    /// Like [`TestCluster::start`], with the agent endpoints on `host`.
    pub fn start_with_tunnel_host(n: u64, snapshot_every: u64, host: &str) -> Self {
        Self::start_inner(n, snapshot_every, None, host)
    }

    /// Like [`TestCluster::start`], with every Raft link through a proxy.
    pub fn start_with_links(n: u64, snapshot_every: u64) -> Self {
        Self::start_inner(n, snapshot_every, Some(Links::new(n)), "127.0.0.1")
    }

    fn start_inner(n: u64, snapshot_every: u64, links: Option<Links>, tunnel_host: &str) -> Self {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        gatehouse_secure_fs::owner_only_umask();
        let tmp = tempfile::tempdir().unwrap();
        let token = "gha_test_cluster_admin_token_0123456789".to_string();
        let token_file = tmp.path().join("admin.token");
        std::fs::write(&token_file, &token).unwrap();
        let mut c = Self {
            ca_file: tmp.path().join("node1").join("ca.pem"),
            tmp,
            token,
            token_file,
            nodes: Vec::new(),
            snapshot_every,
            links,
            tunnel_host: tunnel_host.to_string(),
        };
        c.add_node(1, None);
        // Joining needs only what the break-glass token may do (join
        // tokens, membership), so the nodes start as soon as their reserved
        // ports were released.
        for id in 2..=n {
            c.join_node(id);
        }
        c.wait_voters(n as usize);
        // From here on the harness acts as an admin the bootstrap token
        // created (the token itself is break-glass only).
        c.token = crate::bootstrap_admin(&c.node(1).api, &c.ca_file, &c.token);
        c
    }

    /// Creates a join token on a live node and starts node `id` with it.
    pub fn join_node(&mut self, id: u64) {
        let via = self.live().next().unwrap().api.clone();
        let out = self.cli(&via, &["cluster", "join", "--node-id", &id.to_string()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
        self.add_node(id, Some((via, token)));
    }

    fn add_node(&mut self, id: u64, join: Option<(String, String)>) {
        let dir = self.tmp.path().join(format!("node{id}"));
        let mut node = Node {
            id,
            dir,
            proc: None,
            api: String::new(),
            raft: self
                .links
                .as_ref()
                .and_then(|l| l.raft.get(&id).cloned())
                .unwrap_or_default(),
            pg: String::new(),
            tunnel: String::new(),
            join,
        };
        self.spawn(&mut node);
        self.nodes.push(node);
    }

    fn spawn(&self, node: &mut Node) {
        let _ = std::fs::remove_file(node.dir.join("ready.json"));
        let mut args: Vec<String> = vec![
            "--node-id".into(),
            node.id.to_string(),
            "--data-dir".into(),
            node.dir.display().to_string(),
            "--recordings-dir".into(),
            self.tmp.path().join("recordings").display().to_string(),
            "--admin-token-file".into(),
            self.token_file.display().to_string(),
            "--snapshot-every".into(),
            self.snapshot_every.to_string(),
        ];
        // Restarts keep their ports: peers know them by address.
        let port = |a: &str| {
            if a.is_empty() {
                "127.0.0.1:0".to_string()
            } else {
                a.to_string()
            }
        };
        for (flag, addr) in [
            (
                "--api-listen",
                port(node.api.trim_start_matches("https://")),
            ),
            ("--raft-listen", port(&node.raft)),
            ("--pg-listen", port(&node.pg)),
            ("--ssh-listen", "127.0.0.1:0".to_string()),
            (
                "--tunnel-listen",
                if node.tunnel.is_empty() {
                    format!("{}:0", self.tunnel_host)
                } else {
                    node.tunnel.clone()
                },
            ),
        ] {
            args.push(flag.into());
            args.push(addr);
        }
        if let Some(links) = &self.links {
            for ((from, to), p) in &links.proxies {
                if *from == node.id {
                    args.push("--peer-route".into());
                    args.push(format!("{}={}", links.raft[to], p.addr));
                }
            }
        }
        if let Some((via, token)) = &node.join {
            let f = crate::secret_file(
                self.tmp.path(),
                &format!("node{}.join-token", node.id),
                token,
            );
            args.extend([
                "--join".into(),
                via.clone(),
                "--join-token-file".into(),
                f.display().to_string(),
            ]);
        }
        std::fs::create_dir_all(&node.dir).unwrap();
        let log = self.tmp.path().join(format!("node{}.log", node.id));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = std::process::Command::new(bin("gatehouse-server"))
            .args(&args)
            .env("GATEHOUSE_KEK", crate::TEST_KEK)
            .env(
                "RUST_LOG",
                std::env::var("GATEHOUSE_TEST_NODE_LOG")
                    .unwrap_or_else(|_| "info,openraft=warn".into()),
            )
            .stdin(std::process::Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap();
        let mut proc = Proc { child, log };
        let deadline = Instant::now() + Duration::from_secs(60);
        let ready: serde_json::Value = loop {
            if let Some(v) = std::fs::read(node.dir.join("ready.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
            {
                break v;
            }
            let exited = proc.child.try_wait().unwrap();
            if exited.is_some() || Instant::now() > deadline {
                panic!(
                    "node {} did not start ({exited:?}):\n{}",
                    node.id,
                    proc.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        node.proc = Some(proc);
        node.api = ready["api"].as_str().unwrap().into();
        node.raft = ready["raft"].as_str().unwrap().into();
        node.pg = ready["pg"].as_str().unwrap().into();
        node.tunnel = ready["tunnel"].as_str().unwrap().into();
    }

    pub fn node(&self, id: u64) -> &Node {
        self.nodes.iter().find(|n| n.id == id).unwrap()
    }

    pub fn live(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|n| n.proc.is_some())
    }

    pub fn kill9(&mut self, id: u64) {
        let n = self.nodes.iter_mut().find(|n| n.id == id).unwrap();
        if let Some(mut p) = n.proc.take() {
            p.kill9();
        }
    }

    /// Restarts a killed node with its disk and its addresses.
    pub fn restart(&mut self, id: u64) {
        let idx = self.nodes.iter().position(|n| n.id == id).unwrap();
        let mut node = self.nodes.remove(idx);
        self.spawn(&mut node);
        self.nodes.insert(idx, node);
    }

    /// Forgets a node entirely (its process must be dead).
    pub fn forget(&mut self, id: u64) {
        self.nodes.retain(|n| n.id != id);
    }

    pub fn cli(&self, api: &str, args: &[&str]) -> std::process::Output {
        std::process::Command::new(bin("gatehouse"))
            .args(args)
            .env("GATEHOUSE_API", api)
            .env("GATEHOUSE_TOKEN", &self.token)
            .env("GATEHOUSE_CA_FILE", &self.ca_file)
            .output()
            .unwrap()
    }

    pub async fn client(&self, id: u64) -> anyhow::Result<Client> {
        let ca = std::fs::read_to_string(&self.ca_file)?;
        connect(&self.node(id).api, &self.token, &ca).await
    }

    /// Cluster status as seen by node `id`.
    pub async fn status(&self, id: u64) -> Option<ClusterStatusResponse> {
        let mut c = self.client(id).await.ok()?;
        let fut = c.cluster_status(ListRequest {});
        tokio::time::timeout(Duration::from_millis(500), fut)
            .await
            .ok()?
            .ok()
            .map(|r| r.into_inner())
    }

    pub fn wait_voters(&self, n: usize) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ok = rt.block_on(async {
                for node in self.live() {
                    let Some(s) = self.status(node.id).await else {
                        return false;
                    };
                    if s.leader_id == 0 || s.nodes.iter().filter(|x| x.voter).count() != n {
                        return false;
                    }
                }
                true
            });
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "cluster never reached {n} voters"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// State digests of every live node once they agree, or panics after the timeout.
    pub async fn converged_digest(&self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let mut digests = Vec::new();
            for n in self.live() {
                if let Ok(mut c) = self.client(n.id).await
                    && let Ok(d) = c.state_digest(ListRequest {}).await
                {
                    digests.push((n.id, d.into_inner().digest));
                }
            }
            let live = self.live().count();
            if digests.len() == live && digests.windows(2).all(|w| w[0].1 == w[1].1) {
                return digests[0].1.clone();
            }
            assert!(
                Instant::now() < deadline,
                "nodes did not converge: {digests:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
