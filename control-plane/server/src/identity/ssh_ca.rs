//! The cluster's SSH certificate authority: one Ed25519 key in Raft, sealed
//! with the key-encryption key, that every node opens.
//!
//! - **User certificates** (`gatehouse ssh login`): the caller's own public
//!   key, certified for its identity (key id and only principal), its groups
//!   and who vouched for it (extensions [`EXT_GROUPS`], [`EXT_ISSUER`]), for
//!   at most the policy's `ssh.certificate_ttl` and never past the caller's
//!   access token. The SSH ingress accepts one in place of a token; the
//!   access rules still decide every target and login.
//! - **Host certificates**: each node's SSH host key, for the names in its
//!   TLS certificate, so a client that trusts the CA (`@cert-authority`)
//!   connects without a prompt.
//!
//! This CA is not the one targets trust: the agent holds its own target
//! user CA, so a caller's certificate opens the gateway and nothing else.

use std::sync::{Arc, Mutex};

use gatehouse_cp_raft::Command;
use gatehouse_cp_raft::identity::SigningKey;
use gatehouse_pki::sealed::Kek;
use russh::keys::ssh_key::certificate::{Builder, CertType};
use russh::keys::ssh_key::{Certificate, HashAlg, LineEnding, PrivateKey, PublicKey};

use super::Principal;
use crate::cluster::{Cluster, now_ms};

/// Purpose bound into the sealed private key.
const KEY_PURPOSE: &str = "ssh-ca-key";
/// Extension carrying the identity's groups at issue, comma-separated.
pub const EXT_GROUPS: &str = "groups@gatehouse";
/// Extension carrying who vouched for the identity.
pub const EXT_ISSUER: &str = "issuer@gatehouse";
/// A certificate is valid from this long before it was issued, for clocks
/// that lag.
pub const BACKDATE_SECS: u64 = 60;
/// How long a node's host certificate is valid; nodes re-sign at half.
pub const HOST_CERT_SECS: u64 = 7 * 86_400;
/// The shortest user certificate issued.
pub const MIN_USER_SECS: u64 = 1;

/// Why the CA could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum SshCaError {
    #[error("no SSH CA key is available: {0}")]
    NoKey(String),
    #[error("the public key is not an OpenSSH public key line: {0}")]
    BadPublicKey(String),
    #[error("signing failed: {0}")]
    Sign(String),
}

/// Why a presented user certificate was refused.
#[derive(Debug, thiserror::Error)]
pub enum CertRefusal {
    #[error("the certificate is not a user certificate")]
    NotUser,
    #[error("the certificate is not signed by this cluster's SSH CA")]
    UnknownCa,
    #[error("the certificate has expired or is not valid yet")]
    Expired,
    #[error("the certificate names no Gatehouse identity")]
    NoIdentity,
    #[error("the certificate's identity was revoked; run `gatehouse ssh login` again")]
    Revoked,
    #[error("{0}")]
    Unavailable(String),
}

/// The cluster's SSH CA.
pub struct SshCa {
    cluster: Arc<Cluster>,
    kek: Arc<Kek>,
    signer: Mutex<Option<Arc<PrivateKey>>>,
}

// === impl SshCa ===

impl SshCa {
    pub fn new(cluster: Arc<Cluster>, kek: Arc<Kek>) -> Self {
        Self {
            cluster,
            kek,
            signer: Mutex::new(None),
        }
    }

    /// Makes sure the cluster has an SSH CA key (the first node to propose
    /// one wins; the others read it).
    pub async fn ensure_key(&self) -> Result<(), SshCaError> {
        let have = self
            .cluster
            .reader
            .ssh_ca_keys()
            .map_err(|e| SshCaError::NoKey(e.to_string()))?;
        if !have.is_empty() {
            return Ok(());
        }
        let mut seed = [0u8; 32];
        seed.copy_from_slice(&self.cluster.random_bytes::<32>());
        let key = PrivateKey::from(russh::keys::ssh_key::private::Ed25519Keypair::from_seed(
            &seed,
        ));
        let private = key
            .to_openssh(LineEnding::LF)
            .map_err(|e| SshCaError::NoKey(e.to_string()))?;
        let public = key
            .public_key()
            .to_openssh()
            .map_err(|e| SshCaError::NoKey(e.to_string()))?;
        let record = SigningKey {
            kid: self.cluster.new_secret(8),
            public_pem: format!("{public} gatehouse-ssh-ca"),
            private_sealed: self.kek.seal(
                KEY_PURPOSE,
                self.cluster.random_nonce(),
                private.as_bytes(),
            ),
            created_ms: now_ms(),
        };
        super::propose_first(
            &self.cluster,
            Command::PutSshCaKey {
                key: Box::new(record),
            },
        )
        .await
        .map_err(|e| SshCaError::NoKey(e.to_string()))
    }

    fn signer(&self) -> Result<Arc<PrivateKey>, SshCaError> {
        if let Ok(g) = self.signer.lock()
            && let Some(s) = g.as_ref()
        {
            return Ok(s.clone());
        }
        let keys = self
            .cluster
            .reader
            .ssh_ca_keys()
            .map_err(|e| SshCaError::NoKey(e.to_string()))?;
        let Some(k) = keys.first() else {
            return Err(SshCaError::NoKey("the cluster has none yet".into()));
        };
        let plain = self
            .kek
            .open(KEY_PURPOSE, &k.private_sealed)
            .map_err(|e| SshCaError::NoKey(e.to_string()))?;
        let text = String::from_utf8(plain).map_err(|e| SshCaError::NoKey(e.to_string()))?;
        let key = Arc::new(
            PrivateKey::from_openssh(&text).map_err(|e| SshCaError::NoKey(e.to_string()))?,
        );
        if let Ok(mut g) = self.signer.lock() {
            *g = Some(key.clone());
        }
        Ok(key)
    }

    /// The CA's public key, one OpenSSH line.
    pub fn public_line(&self) -> Result<String, SshCaError> {
        let keys = self
            .cluster
            .reader
            .ssh_ca_keys()
            .map_err(|e| SshCaError::NoKey(e.to_string()))?;
        keys.first()
            .map(|k| k.public_pem.clone())
            .ok_or_else(|| SshCaError::NoKey("the cluster has none yet".into()))
    }

    /// A user certificate for `who`'s `public_key` (an OpenSSH line), valid
    /// from now until `valid_before` (Unix seconds).
    pub fn sign_user(
        &self,
        who: &Principal,
        public_key: &str,
        valid_before: u64,
    ) -> Result<Certificate, SshCaError> {
        let key = PublicKey::from_openssh(public_key.trim())
            .map_err(|e| SshCaError::BadPublicKey(e.to_string()))?;
        let now = now_ms().max(0) as u64 / 1000;
        self.sign(&key, valid_before.max(now + MIN_USER_SECS), |b| {
            b.cert_type(CertType::User)?
                .key_id(who.identity.clone())?
                .valid_principal(who.identity.clone())?
                .extension("permit-pty", "")?
                .extension("permit-port-forwarding", "")?
                .extension(EXT_GROUPS, who.groups.join(","))?
                .extension(EXT_ISSUER, who.issuer.clone())?;
            Ok(())
        })
    }

    /// A host certificate for a node's host key, naming `names`.
    pub fn sign_host(&self, host: &PublicKey, names: &[String]) -> Result<Certificate, SshCaError> {
        let now = now_ms().max(0) as u64 / 1000;
        self.sign(host, now + HOST_CERT_SECS, |b| {
            b.cert_type(CertType::Host)?
                .key_id(format!("gatehouse node {}", self.cluster.node_id))?;
            for n in names {
                b.valid_principal(n.clone())?;
            }
            Ok(())
        })
    }

    /// Signs a certificate for `key`, valid from [`BACKDATE_SECS`] ago until
    /// `valid_before`, with a random nonce and serial; `fill` sets the rest.
    fn sign(
        &self,
        key: &PublicKey,
        valid_before: u64,
        fill: impl FnOnce(&mut Builder) -> Result<(), russh::keys::ssh_key::Error>,
    ) -> Result<Certificate, SshCaError> {
        let ca = self.signer()?;
        let now = now_ms().max(0) as u64 / 1000;
        let build = || -> Result<Certificate, russh::keys::ssh_key::Error> {
            let mut b = Builder::new(
                self.cluster.random_bytes::<16>().to_vec(),
                key.key_data().clone(),
                now.saturating_sub(BACKDATE_SECS),
                valid_before,
            )?;
            b.serial(u64::from_be_bytes(self.cluster.random_bytes::<8>()))?;
            fill(&mut b)?;
            b.sign(ca.as_ref())
        };
        build().map_err(|e| SshCaError::Sign(e.to_string()))
    }

    /// Verifies a user certificate a caller presented (its key ownership is
    /// already proven by the SSH handshake): this CA signed it, it is a user
    /// certificate valid now, and its identity is not revoked.
    pub fn verify_user(&self, cert: &Certificate) -> Result<Principal, CertRefusal> {
        if cert.cert_type() != CertType::User {
            return Err(CertRefusal::NotUser);
        }
        let keys = self
            .cluster
            .reader
            .ssh_ca_keys()
            .map_err(|e| CertRefusal::Unavailable(e.to_string()))?;
        let cas: Vec<_> = keys
            .iter()
            .filter_map(|k| PublicKey::from_openssh(&k.public_pem).ok())
            .map(|k| k.fingerprint(HashAlg::Sha256))
            .collect();
        let now = now_ms().max(0) as u64 / 1000;
        if !cas.contains(&cert.signature_key().fingerprint(HashAlg::Sha256)) {
            return Err(CertRefusal::UnknownCa);
        }
        // The CA is known here, so a validation failure is the period.
        cert.validate_at(now, cas.iter()).map_err(|e| match e {
            russh::keys::ssh_key::Error::CertificateValidation => CertRefusal::Expired,
            _ => CertRefusal::UnknownCa,
        })?;
        let identity = cert.key_id().to_string();
        if !(identity.starts_with("user:") || identity.starts_with("sa:"))
            || cert.valid_principals() != [identity.clone()]
        {
            return Err(CertRefusal::NoIdentity);
        }
        let issued = (cert.valid_after() + BACKDATE_SECS) as i64;
        match super::revoked(&self.cluster.reader, &identity, issued) {
            Ok(true) => return Err(CertRefusal::Revoked),
            Ok(false) => {}
            Err(e) => return Err(CertRefusal::Unavailable(e.to_string())),
        }
        let ext = |name: &str| cert.extensions().get(name).cloned().unwrap_or_default();
        let groups = ext(EXT_GROUPS)
            .split(',')
            .filter(|g| !g.is_empty())
            .map(str::to_string)
            .collect();
        Ok(Principal {
            identity,
            issuer: ext(EXT_ISSUER),
            groups,
            email: String::new(),
            expires_ms: cert.valid_before() as i64 * 1000,
        }
        .with_static_groups(&self.cluster))
    }
}
