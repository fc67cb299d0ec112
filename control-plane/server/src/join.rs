//! Joining an existing cluster on a node's first start.
//!
//! The join token is `<secret>.<CA SHA-256>`. The node first learns the
//! cluster CA from the API's TLS chain, trusting it only if it matches the
//! pinned fingerprint; then it sends the secret and a CSR to the leader's
//! join service and stores the node certificate it gets back. The leader
//! adds the node as a learner, then promotes it to voter once it caught up.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use gatehouse_cp_raft::NodeInfo;
use gatehouse_proto::cluster::JoinRequest;
use gatehouse_proto::cluster::join_client::JoinClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Uri};

use crate::peer::LEADER_API;
use crate::{NodeFiles, NodeIdentity};

/// Joins through the API at `url`, following redirects to the leader.
pub async fn join(
    url: &str,
    token: &str,
    node_id: u64,
    me: &NodeInfo,
    files: &NodeFiles,
) -> anyhow::Result<()> {
    let (secret, fingerprint) = token
        .trim()
        .rsplit_once('.')
        .context("malformed join token (expected <secret>.<ca fingerprint>)")?;
    let key = gatehouse_pki::AgentKey::generate(&format!("node-{node_id}"))?;
    let mut url = url.to_string();
    let mut last = String::new();
    for _ in 0..20 {
        let uri: Uri = url
            .parse()
            .with_context(|| format!("invalid join address {url}"))?;
        let host = uri
            .host()
            .unwrap_or("localhost")
            .trim_matches(['[', ']'])
            .to_string();
        let port = uri.port_u16().unwrap_or(443);
        let ca_pem = match pinned_ca(&host, port, fingerprint).await {
            Ok(c) => c,
            Err(e) => {
                last = format!("{e:#}");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&ca_pem))
            .domain_name(host.clone());
        let channel = Channel::builder(uri).tls_config(tls)?.connect().await;
        let mut client = match channel {
            Ok(ch) => JoinClient::new(ch),
            Err(e) => {
                last = e.to_string();
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let req = JoinRequest {
            token: secret.to_string(),
            node_id,
            raft_addr: me.raft_addr.clone(),
            api_addr: me.api_addr.clone(),
            csr_pem: key.csr_pem.clone(),
        };
        match client.join(req).await {
            Ok(resp) => {
                let resp = resp.into_inner();
                files.store(&NodeIdentity {
                    cert_pem: resp.cert_pem,
                    key_pem: key.key_pem.clone(),
                    ca_pem: resp.ca_pem,
                })?;
                tracing::info!(node_id, leader = resp.leader_id, "joined the cluster");
                return Ok(());
            }
            Err(st) if st.code() == tonic::Code::Unavailable => {
                last = st.message().to_string();
                if let Some(leader) = st.metadata().get(LEADER_API).and_then(|v| v.to_str().ok()) {
                    url = leader.to_string();
                } else {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            Err(st) => anyhow::bail!("join refused: {}", st.message()),
        }
    }
    anyhow::bail!("could not join: {last}")
}

/// The cluster CA as presented in the API's TLS chain, if it matches the pin.
async fn pinned_ca(host: &str, port: u16, fingerprint: &str) -> anyhow::Result<String> {
    use rustls::pki_types::ServerName;
    let verifier = gatehouse_pki::PinnedCa::new(fingerprint)
        .context("malformed CA fingerprint in join token")?;
    let cfg = rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    let sock = tokio::net::TcpStream::connect((host, port))
        .await
        .with_context(|| format!("connecting to {host}:{port}"))?;
    let name = ServerName::try_from(host.to_string()).context("invalid host name")?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, sock)
        .await
        .context("the server did not present the pinned cluster CA")?;
    let chain = tls.get_ref().1.peer_certificates().unwrap_or_default();
    let ca = chain
        .iter()
        .find(|c| gatehouse_pki::fingerprint_der(c) == fingerprint.to_ascii_lowercase())
        .context("pinned CA missing from the chain")?;
    Ok(gatehouse_pki::der_to_pem(ca))
}
