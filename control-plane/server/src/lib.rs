//! `gatehouse-server`: one control-plane node.
//!
//! Wires together the Raft member ([`gatehouse_cp_raft`]), the admin API
//! ([`api`]), the QUIC endpoint agents dial ([`tunnel`]) and the client
//! ingress core ([`ingress`]) the protocols' ingress crates build on.

pub mod api;
pub mod approvals;
pub mod cluster;
pub mod identity;
pub mod ingress;
mod join;
pub mod limits;
pub mod peer;
mod recordings;
pub mod sessions;
mod tls_listener;
pub mod tunnel;
mod webhook;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use gatehouse_cp_raft::{Bootstrap, Command, NodeInfo, PeerTls};
use gatehouse_pki::sealed::Kek;
use gatehouse_pki::{CertifiedKey, ClusterCa};

use crate::cluster::{Cluster, now_ms};

/// Command-line configuration of a node.
#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "gatehouse-server",
    version,
    about = "Gatehouse control-plane node"
)]
pub struct Config {
    /// Directory for the Raft log, state and keys.
    #[arg(long, env = "GATEHOUSE_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Raft node id.
    #[arg(long, default_value_t = 1)]
    pub node_id: u64,
    /// Admin/auditor gRPC API (TLS).
    #[arg(long, default_value = "127.0.0.1:7443")]
    pub api_listen: SocketAddr,
    /// QUIC endpoint (UDP) that agents dial.
    #[arg(long, default_value = "127.0.0.1:7444")]
    pub tunnel_listen: SocketAddr,
    /// Node-to-node Raft port (gRPC, mutual TLS).
    #[arg(long, default_value = "127.0.0.1:7445")]
    pub raft_listen: SocketAddr,
    /// Join the cluster whose API is at this address (https://host:port)
    /// on first start.
    #[arg(long)]
    pub join: Option<String>,
    /// File holding the single-use join token from `gatehouse cluster
    /// join` (or set GATEHOUSE_JOIN_TOKEN); never on the command line, where
    /// every local user could read it.
    #[arg(long)]
    pub join_token_file: Option<PathBuf>,
    /// File holding the key-encryption key (64 hex digits) that seals the
    /// cluster's private keys in the Raft state. It must live outside the
    /// data directory and be the same on every node. Alternatives:
    /// --kek-command, or GATEHOUSE_KEK in the environment.
    #[arg(long, env = "GATEHOUSE_KEK_FILE")]
    pub kek_file: Option<PathBuf>,
    /// A command that prints the key-encryption key (a KMS or secret
    /// manager's client), run with `sh -c`.
    #[arg(long)]
    pub kek_command: Option<String>,
    /// Deadline of each stage before a caller is authenticated (SSL
    /// negotiation, TLS handshake, startup, password), in seconds.
    #[arg(long, default_value_t = 10)]
    pub handshake_timeout_secs: u64,
    /// The API's address as browsers and identity providers reach it (the
    /// SAML entity id and ACS derive from it); default https://<API address>.
    #[arg(long, env = "GATEHOUSE_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Lifetime of the Gatehouse access tokens logins issue, in seconds.
    #[arg(long, default_value_t = 3600)]
    pub token_ttl_secs: i64,
    /// Unauthenticated connections one address may hold open at once, per
    /// listener.
    #[arg(long, default_value_t = 256)]
    pub max_unauthenticated_per_source: usize,
    /// Unauthenticated connections in all, per listener (also cut to fit
    /// the open-file limit).
    #[arg(long, default_value_t = 1024)]
    pub max_unauthenticated: usize,
    /// Build a snapshot (and compact the log) after this many entries.
    #[arg(long, default_value_t = 20_000)]
    pub snapshot_every: u64,
    /// PostgreSQL client ingress.
    #[arg(long, default_value = "127.0.0.1:6432")]
    pub pg_listen: SocketAddr,
    /// SSH client ingress (`ssh -p PORT <login>@<target>@<node>`).
    #[arg(long, default_value = "127.0.0.1:2222")]
    pub ssh_listen: SocketAddr,
    /// Names and addresses put into the node's TLS certificate.
    #[arg(long = "hostname", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
    pub hostnames: Vec<String>,
    /// Where session recordings are stored: a local directory, or a URL
    /// (`s3://bucket/prefix`, `gs://…`, `az://…`, `file:///dir`).
    #[arg(
        long = "recordings",
        alias = "recordings-dir",
        env = "GATEHOUSE_RECORDINGS"
    )]
    pub recordings: String,
    /// An option of the recordings store, `KEY=VALUE` as object_store names
    /// them (`aws_endpoint`, `aws_region`, `aws_allow_http`, …); repeatable.
    /// Credentials are better given in the environment
    /// (`GATEHOUSE_RECORDINGS_OPTIONS`, comma-separated).
    #[arg(
        long = "recordings-option",
        env = "GATEHOUSE_RECORDINGS_OPTIONS",
        value_delimiter = ',',
        hide_env_values = true,
        value_parser = parse_option
    )]
    pub recordings_options: Vec<(String, String)>,
    /// How often retention looks for recordings to delete.
    #[arg(long, default_value_t = 60)]
    pub retention_interval_secs: u64,
    /// File holding the bootstrap admin token; created with a random token
    /// when missing.
    #[arg(long)]
    pub admin_token_file: Option<PathBuf>,
    /// Dial a peer at another address than the Raft address it advertises:
    /// `ADVERTISED=DIAL` (host:port each), repeatable. For peers reached
    /// through a relay, a tunnel or address translation between sites.
    #[arg(long = "peer-route", value_parser = parse_route)]
    pub peer_routes: Vec<(String, String)>,
}

fn parse_option(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| "expected KEY=VALUE".to_string())?;
    Ok((k.trim().to_string(), v.to_string()))
}

fn parse_route(s: &str) -> Result<(String, String), String> {
    let (from, to) = s
        .split_once('=')
        .ok_or_else(|| format!("expected ADVERTISED=DIAL, got {s:?}"))?;
    for a in [from, to] {
        a.parse::<SocketAddr>()
            .map_err(|e| format!("{a:?} is not host:port ({e})"))?;
    }
    Ok((from.to_string(), to.to_string()))
}

/// Where a started node listens; written to `<data dir>/ready.json`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Ready {
    pub api: String,
    pub tunnel: String,
    pub pg: String,
    pub ssh: String,
    pub raft: String,
    pub ca_file: String,
    pub admin_token_file: String,
}

/// Runs a node until SIGINT/SIGTERM.
pub async fn run(config: Config, ingresses: ingress::Ingresses) -> anyhow::Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    // Everything this process creates is owner-only.
    gatehouse_secure_fs::owner_only_umask();
    anyhow::ensure!(config.node_id != 0, "node id 0 is reserved");
    gatehouse_secure_fs::private_dir(&config.data_dir)?;
    let kek = Arc::new(load_kek(&config)?);
    let fds = limits::raise_fd_limit();
    let per_listener = fds.saturating_sub(limits::FD_RESERVE) / limits::TCP_LISTENERS;
    let total = config
        .max_unauthenticated
        .min(usize::try_from(per_listener).unwrap_or(usize::MAX))
        .max(1);
    let listener_limits = limits::ListenerLimits {
        per_source: config.max_unauthenticated_per_source.max(1),
        total,
        stage: Duration::from_secs(config.handshake_timeout_secs.max(1)),
    };
    tracing::info!(
        open_files = fds,
        unauthenticated_per_listener = total,
        per_source = listener_limits.per_source,
        "connection limits"
    );

    // Bind first, so addresses given as port 0 are known before joining.
    let raft_listener = tokio::net::TcpListener::bind(config.raft_listen)
        .await
        .with_context(|| format!("binding Raft port {}", config.raft_listen))?;
    let raft_addr = raft_listener.local_addr()?;
    let api_listener = tokio::net::TcpListener::bind(config.api_listen)
        .await
        .with_context(|| format!("binding API {}", config.api_listen))?;
    let api_addr = api_listener.local_addr()?;
    let me = NodeInfo {
        raft_addr: raft_addr.to_string(),
        api_addr: format!("https://{api_addr}"),
    };

    let files = NodeFiles::new(&config.data_dir);
    if let Some(join_url) = &config.join
        && !files.exist()
    {
        let token = match &config.join_token_file {
            Some(f) => std::fs::read_to_string(f)
                .with_context(|| format!("reading the join token from {}", f.display()))?,
            None => std::env::var("GATEHOUSE_JOIN_TOKEN")
                .context("--join needs --join-token-file or GATEHOUSE_JOIN_TOKEN")?,
        };
        join::join(join_url, token.trim(), config.node_id, &me, &files)
            .await
            .context("joining the cluster")?;
    }
    let peers = PeerTls::with_routes(config.peer_routes.iter().cloned().collect());
    let bootstrap = if config.join.is_some() {
        Bootstrap::Join
    } else {
        Bootstrap::NewCluster
    };
    let member = gatehouse_cp_raft::start(
        &config.data_dir.join("raft"),
        config.node_id,
        me.clone(),
        peers.clone(),
        bootstrap,
        config.snapshot_every,
    )
    .await
    .context("starting raft")?;
    let cluster = Arc::new(Cluster::new(config.node_id, member, peers.clone()));
    let raft_limits = limits::ConnLimits::new("raft", listener_limits);
    let agents = tunnel::AgentRegistry::default();
    let mut raft_listener = Some(raft_listener);
    if files.exist() {
        let id = files.load()?;
        peers.set(&id.cert_pem, &id.key_pem, &id.ca_pem);
        if let Some(l) = raft_listener.take() {
            tokio::spawn(peer_serve(
                l,
                cluster.clone(),
                agents.clone(),
                id,
                raft_limits.clone(),
            ));
        }
    }
    tracing::info!(node_id = config.node_id, raft = %raft_addr, "waiting for a leader");
    cluster
        .raft
        .wait(None)
        .metrics(|m| m.current_leader.is_some(), "a leader is known")
        .await
        .context("waiting for a leader")?;

    let ca = bootstrap_ca(&cluster, &kek).await?;
    if let Some(l) = raft_listener.take() {
        // The founding node's first start: issue its own node certificate.
        let id = issue_node_identity(&ca, &cluster, &files)?;
        peers.set(&id.cert_pem, &id.key_pem, &id.ca_pem);
        tokio::spawn(peer_serve(
            l,
            cluster.clone(),
            agents.clone(),
            id,
            raft_limits,
        ));
    }
    let server_cert = ca
        .issue_server(&config.hostnames, now_ms() / 1000, 365)
        .context("issuing the node's TLS certificate")?;
    let ca_file = config.data_dir.join("ca.pem");
    std::fs::write(&ca_file, ca.cert_pem()).context("writing ca.pem")?;
    let token_file = config
        .admin_token_file
        .clone()
        .unwrap_or_else(|| config.data_dir.join("admin.token"));
    let admin_token = load_or_create_token(&token_file, &cluster)?;

    let store = gatehouse_recording::store::open(&gatehouse_recording::store::StoreConfig {
        url: config.recordings.clone(),
        options: config.recordings_options.iter().cloned().collect(),
    })?;
    let recordings = Arc::new(recordings::Recordings {
        store,
        cluster: cluster.clone(),
    });
    tokio::spawn(recordings::retention_loop(
        recordings.clone(),
        std::time::Duration::from_secs(config.retention_interval_secs.max(1)),
    ));

    let chain = tls_chain(&server_cert, ca.cert_pem())?;

    let tunnel_ep = tunnel::bind(config.tunnel_listen, &chain, ca.cert_pem())
        .context("binding the agent tunnel endpoint")?;
    let tunnel_addr = tunnel_ep.local_addr().context("tunnel address")?;
    let pg_listener = tokio::net::TcpListener::bind(config.pg_listen)
        .await
        .with_context(|| format!("binding PostgreSQL ingress {}", config.pg_listen))?;
    let pg_addr = pg_listener.local_addr()?;
    let ssh_listener = tokio::net::TcpListener::bind(config.ssh_listen)
        .await
        .with_context(|| format!("binding SSH ingress {}", config.ssh_listen))?;
    let ssh_addr = ssh_listener.local_addr()?;

    let ca = Arc::new(ca);
    tokio::spawn(tunnel::serve(
        tunnel_ep.clone(),
        cluster.clone(),
        agents.clone(),
        ca.clone(),
        limits::ConnLimits::new("tunnel", listener_limits),
    ));
    let throttle = Arc::new(limits::LoginThrottle::default());
    let ids = Arc::new(identity::Identities {
        cluster: cluster.clone(),
        kek: kek.clone(),
        tokens: identity::tokens::Tokens::new(
            cluster.clone(),
            kek.clone(),
            config.token_ttl_secs.max(60),
        ),
        ssh_ca: identity::ssh_ca::SshCa::new(cluster.clone(), kek.clone()),
        providers: identity::oidc::Providers::new()?,
        throttle: throttle.clone(),
    });
    ids.tokens
        .ensure_key()
        .await
        .context("creating the token-signing key")?;
    ids.ssh_ca
        .ensure_key()
        .await
        .context("creating the SSH CA key")?;
    let ingress_ctx = ingress::IngressCtx {
        cluster: cluster.clone(),
        agents: agents.clone(),
        ids: ids.clone(),
        throttle,
        listener_limits,
        chain: chain.clone(),
        hostnames: config.hostnames.clone(),
        data_dir: config.data_dir.clone(),
    };
    ingresses
        .postgres
        .start(pg_listener, &ingress_ctx)
        .context("starting the PostgreSQL ingress")?;
    ingresses
        .ssh
        .start(ssh_listener, &ingress_ctx)
        .context("starting the SSH ingress")?;
    let api = api::AdminService::new(
        cluster.clone(),
        agents.clone(),
        recordings,
        ca.cert_pem(),
        ids.clone(),
        identity::ssh_admin::SshIngress {
            port: ssh_addr.port(),
            host_names: config.hostnames.clone(),
        },
    );
    let join_svc = peer::JoinService {
        cluster: cluster.clone(),
        ca: ca.clone(),
    };
    tokio::spawn(api::serve(
        api_listener,
        api::Services {
            admin: api,
            join: join_svc,
            reviews: approvals::ReviewsService {
                cluster: cluster.clone(),
                ids: ids.clone(),
            },
            identity: identity::service::IdentityService { ids: ids.clone() },
            saml: Arc::new(identity::saml::Saml {
                ids: ids.clone(),
                public_url: config
                    .public_url
                    .clone()
                    .unwrap_or_else(|| format!("https://{api_addr}"))
                    .trim_end_matches('/')
                    .to_string(),
            }),
        },
        admin_token,
        chain.clone(),
        limits::ConnLimits::new("api", listener_limits),
    ));

    let ready = Ready {
        api: format!("https://{api_addr}"),
        tunnel: tunnel_addr.to_string(),
        pg: pg_addr.to_string(),
        ssh: ssh_addr.to_string(),
        raft: raft_addr.to_string(),
        ca_file: ca_file.display().to_string(),
        admin_token_file: token_file.display().to_string(),
    };
    std::fs::write(
        config.data_dir.join("ready.json"),
        serde_json::to_vec_pretty(&ready)?,
    )
    .context("writing ready.json")?;
    tracing::info!(api = %api_addr, tunnel = %tunnel_addr, pg = %pg_addr, ssh = %ssh_addr, raft = %raft_addr, "gatehouse-server ready");

    shutdown_signal().await;
    tracing::info!("shutting down");
    tunnel_ep.close(0u32.into(), b"server shutting down");
    let _ = cluster.raft.shutdown().await;
    Ok(())
}

/// Serves the Raft port with mutual TLS: peers must present a certificate
/// issued by the cluster CA.
async fn peer_serve(
    listener: tokio::net::TcpListener,
    cluster: Arc<Cluster>,
    agents: tunnel::AgentRegistry,
    id: NodeIdentity,
    limits: Arc<limits::ConnLimits>,
) {
    let acceptor = match tls_listener::acceptor(&id.cert_pem, &id.key_pem, Some(&id.ca_pem)) {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "Raft port TLS configuration failed");
            return;
        }
    };
    let gate = peer::NodeGate {
        cluster: cluster.clone(),
        refusals: Arc::new(limits::LogEvery::new(Duration::from_secs(10))),
    };
    let svc = gatehouse_proto::cluster::raft_peer_server::RaftPeerServer::new(peer::PeerService {
        cluster,
        agents,
        relayed: Default::default(),
    })
    .max_decoding_message_size(256 << 20)
    .max_encoding_message_size(256 << 20);
    let svc = tonic::service::interceptor::InterceptedService::new(svc, gate);
    let incoming = tls_listener::incoming("raft", listener, acceptor, limits);
    if let Err(e) = tonic::transport::Server::builder()
        .add_service(svc)
        .serve_with_incoming(incoming)
        .await
    {
        tracing::error!(error = %e, "Raft port failed");
    }
}

/// A node's certificate for the Raft port, its key and the cluster CA.
pub struct NodeIdentity {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

/// Where a node keeps its identity.
pub struct NodeFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl NodeFiles {
    fn new(dir: &std::path::Path) -> Self {
        Self {
            cert: dir.join("node.crt"),
            key: dir.join("node.key"),
            ca: dir.join("node-ca.pem"),
        }
    }

    fn exist(&self) -> bool {
        self.cert.exists() && self.key.exists() && self.ca.exists()
    }

    fn load(&self) -> anyhow::Result<NodeIdentity> {
        Ok(NodeIdentity {
            cert_pem: std::fs::read_to_string(&self.cert).context("reading node.crt")?,
            key_pem: std::fs::read_to_string(&self.key).context("reading node.key")?,
            ca_pem: std::fs::read_to_string(&self.ca).context("reading node-ca.pem")?,
        })
    }

    fn store(&self, id: &NodeIdentity) -> anyhow::Result<()> {
        write_private(&self.key, &id.key_pem).context("writing node.key")?;
        std::fs::write(&self.cert, &id.cert_pem).context("writing node.crt")?;
        std::fs::write(&self.ca, &id.ca_pem).context("writing node-ca.pem")?;
        Ok(())
    }
}

fn issue_node_identity(
    ca: &ClusterCa,
    cluster: &Cluster,
    files: &NodeFiles,
) -> anyhow::Result<NodeIdentity> {
    let key = gatehouse_pki::AgentKey::generate(&format!("node-{}", cluster.node_id))?;
    let now = now_ms() / 1000;
    let cert_pem = ca.sign_node(&gatehouse_pki::NodeCertRequest {
        csr_pem: &key.csr_pem,
        node_id: cluster.node_id,
        serial: cluster.random_u64(),
        not_before_unix: now - 300,
        not_after_unix: now + 365 * 86_400,
    })?;
    let id = NodeIdentity {
        cert_pem,
        key_pem: key.key_pem,
        ca_pem: ca.cert_pem().to_string(),
    };
    files.store(&id)?;
    Ok(id)
}

/// TLS material for every listener: the node certificate followed by the CA
/// (agents pin the CA from the chain during enrollment).
#[derive(Clone)]
pub struct TlsChain {
    pub cert_pem: String,
    pub key_pem: String,
}

fn tls_chain(leaf: &CertifiedKey, ca_pem: &str) -> anyhow::Result<TlsChain> {
    Ok(TlsChain {
        cert_pem: format!("{}{}", leaf.cert_pem, ca_pem),
        key_pem: leaf.key_pem.clone(),
    })
}

/// Creates the cluster CA through Raft on the founding node's first start;
/// every other start waits until the CA has been applied here.
async fn bootstrap_ca(cluster: &Cluster, kek: &Kek) -> anyhow::Result<ClusterCa> {
    let leads = cluster.raft.metrics().borrow().current_leader == Some(cluster.node_id);
    if leads && cluster.reader.cluster_keys()?.is_none() {
        let ca = ClusterCa::generate("gatehouse", now_ms() / 1000).context("generating the CA")?;
        let sealed = kek.seal(
            CA_KEY_PURPOSE,
            cluster.random_nonce(),
            ca.key_pem.as_bytes(),
        );
        cluster
            .propose(Command::InitCluster {
                ca_cert_pem: ca.cert_pem,
                ca_key_sealed: sealed,
                now_ms: now_ms(),
            })
            .await
            .context("committing the cluster CA")?;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let keys = loop {
        if let Some(k) = cluster.reader.cluster_keys()? {
            break k;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the cluster CA never arrived"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let key_pem = kek
        .open(CA_KEY_PURPOSE, &keys.ca_key_sealed)
        .context("unsealing the cluster CA key (is this the cluster's key-encryption key?)")?;
    let key_pem = String::from_utf8(key_pem).context("the unsealed CA key is not PEM")?;
    Ok(ClusterCa::from_pem(&CertifiedKey {
        cert_pem: keys.ca_cert_pem,
        key_pem,
    })?)
}

/// Associated data of the sealed CA key.
const CA_KEY_PURPOSE: &str = "gatehouse cluster CA private key";

/// The key-encryption key, from a file outside the data directory, a
/// command, or the environment.
fn load_kek(config: &Config) -> anyhow::Result<Kek> {
    let text = if let Some(f) = &config.kek_file {
        let data = std::path::absolute(&config.data_dir)?;
        let file = std::path::absolute(f)?;
        anyhow::ensure!(
            !file.starts_with(&data),
            "the key-encryption key file {} is inside the data directory {}; keep it elsewhere, or a copy of the data directory yields every cluster key",
            file.display(),
            data.display()
        );
        std::fs::read_to_string(f)
            .with_context(|| format!("reading the key-encryption key from {}", f.display()))?
    } else if let Some(cmd) = &config.kek_command {
        let out = std::process::Command::new("sh")
            .args(["-c", cmd])
            .stderr(std::process::Stdio::inherit())
            .output()
            .context("running --kek-command")?;
        anyhow::ensure!(
            out.status.success(),
            "--kek-command failed ({})",
            out.status
        );
        String::from_utf8(out.stdout).context("--kek-command printed no text")?
    } else if let Ok(v) = std::env::var("GATEHOUSE_KEK") {
        v
    } else {
        anyhow::bail!(
            "no key-encryption key: pass --kek-file (or GATEHOUSE_KEK_FILE), --kek-command, or set GATEHOUSE_KEK to 64 hex digits; keep it outside the data directory, the same on every node"
        );
    };
    Kek::from_text(&text).context("invalid key-encryption key")
}

fn load_or_create_token(path: &std::path::Path, cluster: &Cluster) -> anyhow::Result<String> {
    if let Ok(t) = std::fs::read_to_string(path) {
        let t = t.trim().to_string();
        anyhow::ensure!(
            t.len() >= 16,
            "admin token in {} is too short",
            path.display()
        );
        return Ok(t);
    }
    let token = format!("gha_{}", cluster.new_secret(24));
    write_private(path, &token).with_context(|| format!("writing {}", path.display()))?;
    Ok(token)
}

/// Writes a file readable only by its owner.
pub fn write_private(path: &std::path::Path, data: &str) -> std::io::Result<()> {
    gatehouse_secure_fs::write_private(path, data.as_bytes())
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
