//! The agent's identity: enrollment and the TLS configuration it dials with.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use gatehouse_pki::AgentKey;
use gatehouse_proto::tunnel::{EnrollRequest, EnrollResponse};
use gatehouse_proto::{ALPN_AGENT, ALPN_ENROLL, frame, read_frame};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use crate::config::AgentConfig;

/// Files under the data dir.
pub struct IdentityFiles {
    pub key: PathBuf,
    pub cert: PathBuf,
    pub ca: PathBuf,
}

impl IdentityFiles {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            key: data_dir.join("agent.key"),
            cert: data_dir.join("agent.crt"),
            ca: data_dir.join("ca.pem"),
        }
    }

    pub fn exist(&self) -> bool {
        self.key.exists() && self.cert.exists() && self.ca.exists()
    }
}

/// Enrolls with a single-use token of the form `<secret>.<CA SHA-256>`: the
/// key pair is generated here, only the CSR leaves, and the server is
/// trusted only if it presents the pinned CA.
pub async fn enroll(cfg: &AgentConfig, token: &str, files: &IdentityFiles) -> anyhow::Result<()> {
    let (secret, ca_fp) = token
        .trim()
        .rsplit_once('.')
        .context("malformed enrollment token (expected <secret>.<ca fingerprint>)")?;
    let key = AgentKey::generate(&cfg.name).context("generating the agent key")?;
    let mut tls = rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(
            gatehouse_pki::PinnedCa::new(ca_fp)
                .context("malformed CA fingerprint in enrollment token")?,
        ))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN_ENROLL.to_vec()];
    let mut last_err = None;
    for server in &cfg.servers {
        match enroll_at(
            *server,
            &cfg.server_name,
            tls.clone(),
            secret,
            &cfg.name,
            &key.csr_pem,
        )
        .await
        {
            Ok(resp) if resp.error.is_empty() => {
                std::fs::create_dir_all(&cfg.data_dir)?;
                gatehouse_secure_fs::write_private(&files.key, key.key_pem.as_bytes())?;
                std::fs::write(&files.cert, &resp.cert_pem)?;
                std::fs::write(&files.ca, &resp.ca_pem)?;
                return Ok(());
            }
            Ok(resp) => anyhow::bail!("enrollment refused: {}", resp.error),
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.unwrap_or_else(|| anyhow::anyhow!("no server to enroll with")))
}

async fn enroll_at(
    server: std::net::SocketAddr,
    server_name: &str,
    tls: rustls::ClientConfig,
    secret: &str,
    agent: &str,
    csr_pem: &str,
) -> anyhow::Result<EnrollResponse> {
    let endpoint = client_endpoint(server)?;
    let qcfg = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls)?,
    ));
    let conn = endpoint
        .connect_with(qcfg, server, server_name)?
        .await
        .with_context(|| format!("connecting to {server}"))?;
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&frame(&EnrollRequest {
        token: secret.to_string(),
        agent: agent.to_string(),
        csr_pem: csr_pem.to_string(),
    }))
    .await?;
    send.finish()?;
    let resp = read_frame::<EnrollResponse, _>(&mut recv)
        .await?
        .context("server closed the enrollment stream")?;
    conn.close(0u32.into(), b"enrolled");
    endpoint.wait_idle().await;
    Ok(resp)
}

/// A QUIC client endpoint on an ephemeral port of the right family.
pub fn client_endpoint(server: std::net::SocketAddr) -> anyhow::Result<quinn::Endpoint> {
    let bind: std::net::SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    Ok(quinn::Endpoint::client(bind)?)
}

/// TLS for the agent's connections: trust only the cluster CA, present the
/// agent certificate.
pub fn client_tls(files: &IdentityFiles) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(&files.ca).context("reading ca.pem")?;
    for c in CertificateDer::pem_slice_iter(&ca) {
        roots.add(c?)?;
    }
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(&files.cert)?.collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&files.key).context("reading agent.key")?;
    let mut tls = rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)?;
    tls.alpn_protocols = vec![ALPN_AGENT.to_vec()];
    Ok(tls)
}
