//! The agent's SSH connection to a target: the target's host key verified
//! (pinned, or certified by a host CA), then a login with the agent's own
//! credential: a key from its configuration, or a fresh key with a
//! certificate for this session only, signed by a user CA the target
//! trusts. The caller never sees either.

use std::sync::Arc;
use std::time::Duration;

use gatehouse_proto::tunnel::SessionOpen;
use russh::client;
use russh::keys::ssh_key::certificate::{Builder, CertType};
use russh::keys::{Certificate, HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey};

use gatehouse_agent_core::config::TargetConfig;

/// How long connecting and logging in to a target may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// A session certificate's validity (it is used once, at login).
const CERT_VALIDITY_SECS: u64 = 300;

/// The SSH client configuration towards targets: windows sized for bulk
/// copies, no Nagle, keep-alives instead of an inactivity timeout.
pub fn client_config() -> client::Config {
    client::Config {
        window_size: 8 << 20,
        maximum_packet_size: 65535,
        channel_buffer_size: 64,
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 4,
        nodelay: true,
        // AES-GCM first: far cheaper per byte than ChaCha20-Poly1305 with
        // AES instructions (the client's order decides).
        preferred: russh::Preferred {
            cipher: std::borrow::Cow::Borrowed(&[
                russh::cipher::AES_128_GCM,
                russh::cipher::AES_256_GCM,
                russh::cipher::CHACHA20_POLY1305,
                russh::cipher::AES_128_CTR,
                russh::cipher::AES_256_CTR,
            ]),
            ..russh::Preferred::DEFAULT
        },
        ..Default::default()
    }
}

/// Checks the target's host key.
pub struct TargetHost {
    host: String,
    pinned: Option<PublicKey>,
    ca: Option<PublicKey>,
    /// Why the key was refused, for the caller's error.
    refused: Arc<std::sync::Mutex<Option<String>>>,
    /// Where connections to the session's remote forwards go.
    forwarded: tokio::sync::mpsc::Sender<Forwarded>,
}

/// A connection the target accepted on a port it listens on for the
/// session (`ssh -R`).
pub struct Forwarded {
    pub channel: russh::Channel<client::Msg>,
    /// Where the target accepted it.
    pub connected: (String, u32),
    /// Who connected.
    pub originator: (String, u32),
}

impl client::Handler for TargetHost {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        offered: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        use russh::keys::PublicKeyOrCertificate as K;
        let verdict = match (offered, &self.pinned, &self.ca) {
            (K::PublicKey { key, .. }, Some(pin), _) => {
                if key.key_data() == pin.key_data() {
                    Ok(())
                } else {
                    Err(format!(
                        "the target's host key {} is not the pinned one {}",
                        key.fingerprint(HashAlg::Sha256),
                        pin.fingerprint(HashAlg::Sha256)
                    ))
                }
            }
            (K::Certificate(c), _, Some(ca)) => host_cert_ok(c, ca, &self.host),
            (K::Certificate(c), Some(pin), None) => {
                if c.public_key() == pin.key_data() {
                    Ok(())
                } else {
                    Err(
                        "the target's host certificate is for another key than the pinned one"
                            .into(),
                    )
                }
            }
            (K::PublicKey { .. }, None, _) => Err(
                "the target offered a plain host key where a host certificate is required".into(),
            ),
            (K::Certificate(_), None, None) => Err("no host key is configured".into()),
        };
        match verdict {
            Ok(()) => Ok(true),
            Err(why) => {
                if let Ok(mut r) = self.refused.lock() {
                    *r = Some(why);
                }
                Ok(false)
            }
        }
    }

    /// The target only opens these for a forward the session asked for
    /// (and the policy allowed); the session decides what becomes of it.
    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: russh::Channel<client::Msg>,
        connected_address: &str,
        connected_port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: russh::client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        let f = Forwarded {
            channel,
            connected: (connected_address.to_string(), connected_port),
            originator: (originator_address.to_string(), originator_port),
        };
        if self.forwarded.is_closed() {
            reply
                .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        }
        reply.accept().await;
        // A session too busy to take it now closes it.
        if let Err(e) = self.forwarded.try_send(f) {
            let _ = e.into_inner().channel.close().await;
        }
        Ok(())
    }
}

fn host_cert_ok(c: &Certificate, ca: &PublicKey, host: &str) -> Result<(), String> {
    if c.cert_type() != CertType::Host {
        return Err("the target's certificate is not a host certificate".into());
    }
    let now = gatehouse_agent_core::now_ms().max(0) as u64 / 1000;
    c.validate_at(now, [&ca.fingerprint(HashAlg::Sha256)])
        .map_err(|e| format!("the target's host certificate is not valid: {e}"))?;
    if !c.valid_principals().is_empty() && !c.valid_principals().iter().any(|p| p == host) {
        return Err(format!(
            "the target's host certificate does not name {host}"
        ));
    }
    Ok(())
}

fn read_key(path: &std::path::Path) -> Result<PrivateKey, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("reading the target credential {}: {e}", path.display()))?;
    PrivateKey::from_openssh(&text).map_err(|e| {
        format!(
            "the target credential {} is not an OpenSSH private key: {e}",
            path.display()
        )
    })
}

fn parse_public(line: &str, what: &str) -> Result<PublicKey, String> {
    PublicKey::from_openssh(line.trim())
        .map_err(|e| format!("the configured {what} does not parse: {e}"))
}

/// The key id a session certificate carries: who asked, for which session
/// (the target's sshd logs it with the login).
pub fn key_id(open: &SessionOpen) -> String {
    let mut id = format!(
        "gatehouse session={} identity={}",
        open.session_id, open.identity
    );
    id.truncate(200);
    id
}

/// A fresh key and its certificate for `login`, signed by the user CA.
fn session_cert(
    ca: &PrivateKey,
    login: &str,
    open: &SessionOpen,
    port_forwarding: bool,
) -> Result<(PrivateKey, Certificate), String> {
    let seed: [u8; 32] = rand::random();
    let key = PrivateKey::from(russh::keys::ssh_key::private::Ed25519Keypair::from_seed(
        &seed,
    ));
    let now = gatehouse_agent_core::now_ms().max(0) as u64 / 1000;
    let nonce: [u8; 16] = rand::random();
    let build = || -> Result<Certificate, russh::keys::ssh_key::Error> {
        let mut b = Builder::new(
            nonce.to_vec(),
            key.public_key().key_data().clone(),
            now.saturating_sub(60),
            now + CERT_VALIDITY_SECS,
        )?;
        b.serial(rand::random())?
            .cert_type(CertType::User)?
            .key_id(key_id(open))?
            .valid_principal(login)?
            .extension("permit-pty", "")?;
        if port_forwarding {
            b.extension("permit-port-forwarding", "")?;
        }
        b.sign(ca)
    };
    let cert = build().map_err(|e| format!("signing the session certificate: {e}"))?;
    Ok((key, cert))
}

/// Connects and logs in to the target as `login`.
pub async fn connect(
    target: &TargetConfig,
    login: &str,
    open: &SessionOpen,
    port_forwarding: bool,
    forwarded: tokio::sync::mpsc::Sender<Forwarded>,
) -> Result<client::Handle<TargetHost>, String> {
    let pinned = target
        .ssh_host_key
        .as_deref()
        .map(|l| parse_public(l, "ssh_host_key"))
        .transpose()?;
    let ca = target
        .ssh_host_ca
        .as_deref()
        .map(|l| parse_public(l, "ssh_host_ca"))
        .transpose()?;
    let refused = Arc::new(std::sync::Mutex::new(None));
    let host = TargetHost {
        host: target.host.clone(),
        pinned,
        ca,
        refused: refused.clone(),
        forwarded,
    };
    let work = async {
        let mut h = client::connect(
            Arc::new(client_config()),
            (target.host.as_str(), target.port),
            host,
        )
        .await
        .map_err(|e| match refused.lock().ok().and_then(|mut r| r.take()) {
            Some(why) => why,
            None => format!("connecting to {}:{}: {e}", target.host, target.port),
        })?;
        let auth = match (&target.ssh_user_ca_file, &target.ssh_key_file) {
            (Some(ca_file), _) => {
                let ca = read_key(ca_file)?;
                let (key, cert) = session_cert(&ca, login, open, port_forwarding)?;
                h.authenticate_openssh_cert(login, Arc::new(key), cert)
                    .await
            }
            (None, Some(key_file)) => {
                let key = Arc::new(read_key(key_file)?);
                let hash = h.best_supported_rsa_hash().await.ok().flatten().flatten();
                h.authenticate_publickey(login, PrivateKeyWithHashAlg::new(key, hash))
                    .await
            }
            (None, None) => return Err("the agent holds no SSH credential for the target".into()),
        }
        .map_err(|e| format!("logging in to the target: {e}"))?;
        if !auth.success() {
            return Err(format!(
                "the target refused the agent's login as \"{login}\""
            ));
        }
        Ok(h)
    };
    tokio::time::timeout(CONNECT_TIMEOUT, work)
        .await
        .map_err(|_| {
            format!(
                "the target did not answer within {} s",
                CONNECT_TIMEOUT.as_secs()
            )
        })?
}
