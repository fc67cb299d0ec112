//! `gatehouse-server`: one control-plane node.
//!
//! Wires together the Raft member ([`gatehouse_cp_raft`]), the admin API
//! ([`api`]), the QUIC endpoint agents dial ([`tunnel`]) and the PostgreSQL
//! client ingress ([`ingress`]).

pub mod api;
pub mod cluster;
pub mod ingress;
pub mod tunnel;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use gatehouse_cp_raft::Command;
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
    /// PostgreSQL client ingress.
    #[arg(long, default_value = "127.0.0.1:6432")]
    pub pg_listen: SocketAddr,
    /// Names and addresses put into the node's TLS certificate.
    #[arg(long = "hostname", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
    pub hostnames: Vec<String>,
    /// Root of the filesystem object store that holds session recordings.
    #[arg(long, env = "GATEHOUSE_RECORDINGS_DIR")]
    pub recordings_dir: PathBuf,
    /// File holding the bootstrap admin token; created with a random token
    /// when missing.
    #[arg(long)]
    pub admin_token_file: Option<PathBuf>,
}

/// Where a started node listens; written to `<data dir>/ready.json`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Ready {
    pub api: String,
    pub tunnel: String,
    pub pg: String,
    pub ca_file: String,
    pub admin_token_file: String,
}

/// Runs a node until SIGINT/SIGTERM.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    std::fs::create_dir_all(&config.recordings_dir).with_context(|| {
        format!(
            "creating recordings dir {}",
            config.recordings_dir.display()
        )
    })?;

    let member = gatehouse_cp_raft::start_single(
        &config.data_dir.join("raft"),
        config.node_id,
        &config.api_listen.to_string(),
    )
    .await
    .context("starting raft")?;
    let cluster = Arc::new(Cluster::new(config.node_id, member));
    cluster
        .raft
        .wait(Some(Duration::from_secs(30)))
        .current_leader(config.node_id, "single node elects itself")
        .await
        .context("waiting for leadership")?;

    let ca = bootstrap_ca(&cluster).await?;
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

    let recordings: Arc<dyn object_store::ObjectStore> = Arc::new(
        object_store::local::LocalFileSystem::new_with_prefix(&config.recordings_dir)
            .context("opening the recordings store")?,
    );

    let agents = tunnel::AgentRegistry::default();
    let chain = tls_chain(&server_cert, ca.cert_pem())?;

    let tunnel_ep = tunnel::bind(config.tunnel_listen, &chain, ca.cert_pem())
        .context("binding the agent tunnel endpoint")?;
    let tunnel_addr = tunnel_ep.local_addr().context("tunnel address")?;
    let pg_listener = tokio::net::TcpListener::bind(config.pg_listen)
        .await
        .with_context(|| format!("binding PostgreSQL ingress {}", config.pg_listen))?;
    let pg_addr = pg_listener.local_addr()?;
    let api_listener = tokio::net::TcpListener::bind(config.api_listen)
        .await
        .with_context(|| format!("binding API {}", config.api_listen))?;
    let api_addr = api_listener.local_addr()?;

    let ca = Arc::new(ca);
    tokio::spawn(tunnel::serve(
        tunnel_ep.clone(),
        cluster.clone(),
        agents.clone(),
        ca.clone(),
    ));
    tokio::spawn(ingress::serve(
        pg_listener,
        ingress::tls_acceptor(&chain)?,
        cluster.clone(),
        agents.clone(),
    ));
    let api = api::AdminService::new(cluster.clone(), agents.clone(), recordings, ca.cert_pem());
    tokio::spawn(api::serve(api_listener, api, admin_token, chain.clone()));

    let ready = Ready {
        api: format!("https://{api_addr}"),
        tunnel: tunnel_addr.to_string(),
        pg: pg_addr.to_string(),
        ca_file: ca_file.display().to_string(),
        admin_token_file: token_file.display().to_string(),
    };
    std::fs::write(
        config.data_dir.join("ready.json"),
        serde_json::to_vec_pretty(&ready)?,
    )
    .context("writing ready.json")?;
    tracing::info!(api = %api_addr, tunnel = %tunnel_addr, pg = %pg_addr, "gatehouse-server ready");

    shutdown_signal().await;
    tracing::info!("shutting down");
    tunnel_ep.close(0u32.into(), b"server shutting down");
    let _ = cluster.raft.shutdown().await;
    Ok(())
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

/// Creates the cluster CA through Raft on first start; loads it afterwards.
async fn bootstrap_ca(cluster: &Cluster) -> anyhow::Result<ClusterCa> {
    if cluster.reader.cluster_keys()?.is_none() {
        let ca = ClusterCa::generate("gatehouse", now_ms() / 1000).context("generating the CA")?;
        cluster
            .propose(Command::InitCluster {
                ca_cert_pem: ca.cert_pem,
                ca_key_pem: ca.key_pem,
                now_ms: now_ms(),
            })
            .await
            .context("committing the cluster CA")?;
    }
    let keys = cluster
        .reader
        .cluster_keys()?
        .context("cluster keys missing after bootstrap")?;
    Ok(ClusterCa::from_pem(&CertifiedKey {
        cert_pem: keys.ca_cert_pem,
        key_pem: keys.ca_key_pem,
    })?)
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
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data.as_bytes())?;
    f.sync_all()
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
