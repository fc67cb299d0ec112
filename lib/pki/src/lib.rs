//! The cluster's certificate authority and the certificates it issues.
//!
//! Pure functions over PEM text: no files, no sockets, no clock reads (the
//! caller passes validity times). The control plane holds the [`ClusterCa`];
//! an agent only ever generates a key pair and a CSR ([`AgentKey::generate`]),
//! so its private key never leaves the agent.

pub mod sealed;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

/// A PKI operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("invalid certificate signing request: {0}")]
    BadCsr(String),
    #[error("invalid validity time: {0}")]
    Time(String),
}

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct CertifiedKey {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The cluster CA: issues server certificates and signs agent CSRs.
pub struct ClusterCa {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// What the CA puts into an agent certificate.
pub struct AgentCertRequest<'a> {
    pub csr_pem: &'a str,
    pub agent_name: &'a str,
    pub serial: u64,
    pub not_before_unix: i64,
    pub not_after_unix: i64,
}

// === impl ClusterCa ===

impl ClusterCa {
    /// Creates a new self-signed CA valid from `now_unix` for ten years.
    pub fn generate(cluster_name: &str, now_unix: i64) -> Result<CertifiedKey, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            format!("gatehouse cluster CA {cluster_name}"),
        );
        dn.push(DnType::OrganizationName, "gatehouse");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = at(now_unix - 3600)?;
        params.not_after = at(now_unix + 10 * 365 * 86_400)?;
        let cert = params.self_signed(&key)?;
        Ok(CertifiedKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Loads a CA from its certificate and key.
    pub fn from_pem(ca: &CertifiedKey) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(&ca.key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, key)?;
        Ok(Self {
            cert_pem: ca.cert_pem.clone(),
            issuer,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a TLS server certificate for the given DNS names / IP addresses.
    pub fn issue_server(
        &self,
        names: &[String],
        now_unix: i64,
        days: i64,
    ) -> Result<CertifiedKey, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.to_vec())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "gatehouse-server");
        params.distinguished_name = dn;
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = at(now_unix - 3600)?;
        params.not_after = at(now_unix + days * 86_400)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertifiedKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs an agent's CSR. The CSR's proof of possession is verified; its
    /// subject and extensions are ignored: the certificate names exactly the
    /// agent the enrollment token was bound to.
    pub fn sign_agent(&self, req: &AgentCertRequest<'_>) -> Result<String, PkiError> {
        self.sign_csr(&CsrGrant {
            csr_pem: req.csr_pem,
            common_name: req.agent_name.to_string(),
            san: agent_san(req.agent_name),
            extended_key_usages: vec![ExtendedKeyUsagePurpose::ClientAuth],
            serial: req.serial,
            not_before_unix: req.not_before_unix,
            not_after_unix: req.not_after_unix,
        })
    }

    /// Signs a CSR after checking its proof of possession. Only the public
    /// key is taken from the CSR; name, SAN, usages and validity are ours.
    fn sign_csr(&self, g: &CsrGrant<'_>) -> Result<String, PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(g.csr_pem)
            .map_err(|e| PkiError::BadCsr(e.to_string()))?;
        let mut params = CertificateParams::new(vec![g.san.clone()])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, g.common_name.as_str());
        params.distinguished_name = dn;
        params.extended_key_usages = g.extended_key_usages.clone();
        params.serial_number = Some(SerialNumber::from_slice(&g.serial.to_be_bytes()));
        params.not_before = at(g.not_before_unix)?;
        params.not_after = at(g.not_after_unix)?;
        let signed = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        }
        .signed_by(&self.issuer)?;
        Ok(signed.pem())
    }
}

/// What a signed CSR is granted.
struct CsrGrant<'a> {
    csr_pem: &'a str,
    common_name: String,
    san: String,
    extended_key_usages: Vec<ExtendedKeyUsagePurpose>,
    serial: u64,
    not_before_unix: i64,
    not_after_unix: i64,
}

/// What the CA puts into a control-plane node certificate.
pub struct NodeCertRequest<'a> {
    pub csr_pem: &'a str,
    pub node_id: u64,
    pub serial: u64,
    pub not_before_unix: i64,
    pub not_after_unix: i64,
}

/// The DNS name every node certificate carries; peers verify each other by it.
pub const NODE_SAN: &str = "gatehouse-node";

impl ClusterCa {
    /// Signs a joining node's CSR: a certificate for both ends of node-to-node
    /// mutual TLS, named `node-<id>` with the SAN [`NODE_SAN`].
    pub fn sign_node(&self, req: &NodeCertRequest<'_>) -> Result<String, PkiError> {
        self.sign_csr(&CsrGrant {
            csr_pem: req.csr_pem,
            common_name: format!("node-{}", req.node_id),
            san: NODE_SAN.to_string(),
            extended_key_usages: vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            serial: req.serial,
            not_before_unix: req.not_before_unix,
            not_after_unix: req.not_after_unix,
        })
    }
}

/// An agent's freshly generated key pair and the CSR that carries its public key.
pub struct AgentKey {
    pub key_pem: String,
    pub csr_pem: String,
}

// === impl AgentKey ===

impl AgentKey {
    pub fn generate(agent_name: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![agent_san(agent_name)])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, agent_name);
        params.distinguished_name = dn;
        let csr = params.serialize_request(&key)?;
        Ok(Self {
            key_pem: key.serialize_pem(),
            csr_pem: csr.pem()?,
        })
    }
}

/// The DNS name an agent certificate carries: `<name>.agent.gatehouse`.
pub fn agent_san(agent_name: &str) -> String {
    format!("{agent_name}.agent.gatehouse")
}

/// The agent name in a certificate issued by [`ClusterCa::sign_agent`].
pub fn agent_name_of(cert_der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    Some(cn.to_string())
}

/// The node id in a node certificate ([`ClusterCa::sign_node`]): its only
/// DNS name is [`NODE_SAN`] and its common name `node-<id>`. An agent
/// certificate never qualifies: its DNS name always ends in
/// `.agent.gatehouse`, whatever the agent is called.
pub fn node_id_of(cert_der: &[u8]) -> Option<u64> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let names = &san.value.general_names;
    let only_node = names.len() == 1
        && matches!(names.first(), Some(GeneralName::DNSName(n)) if *n == NODE_SAN);
    if !only_node {
        return None;
    }
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    let id: u64 = cn.strip_prefix("node-")?.parse().ok()?;
    (id != 0).then_some(id)
}

/// Serial number of a DER certificate, as lowercase hex.
pub fn serial_of(cert_der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    Some(hex::encode(cert.raw_serial()))
}

/// The subject public key of a DER certificate (for an EC key, the SEC1
/// point).
pub fn public_key_of(cert_der: &[u8]) -> Option<Vec<u8>> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    Some(cert.public_key().subject_public_key.data.to_vec())
}

/// The PKCS#8 DER of a private key in PEM.
pub fn pkcs8_der(key_pem: &str) -> Option<Vec<u8>> {
    use rustls::pki_types::PrivatePkcs8KeyDer;
    use rustls::pki_types::pem::PemObject;
    PrivatePkcs8KeyDer::from_pem_slice(key_pem.as_bytes())
        .ok()
        .map(|k| k.secret_pkcs8_der().to_vec())
}

/// SHA-256 of the first certificate in a PEM text, lowercase hex. Used to pin
/// the cluster CA in enrollment tokens.
pub fn fingerprint_pem(pem_text: &str) -> Option<String> {
    first_der(pem_text).map(|der| hex::encode(Sha256::digest(der)))
}

/// SHA-256 of a DER certificate, lowercase hex.
pub fn fingerprint_der(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// The DER bytes of the first certificate in a PEM text.
pub fn first_der(pem_text: &str) -> Option<Vec<u8>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem_text.as_bytes())
        .next()?
        .ok()
        .map(|c| c.to_vec())
}

pub use pinned::PinnedCa;

mod pinned {
    use std::sync::Arc;

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, SignatureScheme};

    /// Trusts a server whose chain contains the CA with a pinned SHA-256,
    /// verified with that CA as the only root. Used where a newcomer (an
    /// enrolling agent, a joining node) holds only a token naming the CA.
    #[derive(Debug)]
    pub struct PinnedCa {
        fingerprint: String,
        provider: Arc<rustls::crypto::CryptoProvider>,
    }

    impl PinnedCa {
        /// `None` if the fingerprint is not 64 hex digits.
        pub fn new(fingerprint: &str) -> Option<Self> {
            let ok = fingerprint.len() == 64 && fingerprint.chars().all(|c| c.is_ascii_hexdigit());
            ok.then(|| Self {
                fingerprint: fingerprint.to_ascii_lowercase(),
                provider: Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
            })
        }
    }

    impl ServerCertVerifier for PinnedCa {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            server_name: &ServerName<'_>,
            ocsp: &[u8],
            now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            let ca = intermediates
                .iter()
                .find(|c| super::fingerprint_der(c) == self.fingerprint)
                .ok_or_else(|| {
                    rustls::Error::General("server did not present the pinned cluster CA".into())
                })?;
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(ca.clone().into_owned())
                .map_err(|e| rustls::Error::General(e.to_string()))?;
            let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                self.provider.clone(),
            )
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
            inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
}

fn at(unix: i64) -> Result<OffsetDateTime, PkiError> {
    OffsetDateTime::from_unix_timestamp(unix).map_err(|e| PkiError::Time(e.to_string()))
}

/// PEM text of a DER certificate.
pub fn der_to_pem(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_790_000_000;

    #[test]
    fn agent_csr_is_signed_with_the_token_bound_name() {
        let ca_pair = ClusterCa::generate("t", NOW).unwrap();
        let ca = ClusterCa::from_pem(&ca_pair).unwrap();
        let agent = AgentKey::generate("someone-else").unwrap();
        let cert = ca
            .sign_agent(&AgentCertRequest {
                csr_pem: &agent.csr_pem,
                agent_name: "edge-1",
                serial: 42,
                not_before_unix: NOW,
                not_after_unix: NOW + 86_400,
            })
            .unwrap();
        let der = first_der(&cert).unwrap();
        assert_eq!(agent_name_of(&der).as_deref(), Some("edge-1"));
        assert_eq!(serial_of(&der).as_deref(), Some("2a"));
    }

    #[test]
    fn garbage_csr_is_refused() {
        let ca = ClusterCa::from_pem(&ClusterCa::generate("t", NOW).unwrap()).unwrap();
        let err = ca
            .sign_agent(&AgentCertRequest {
                csr_pem: "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                agent_name: "edge-1",
                serial: 1,
                not_before_unix: NOW,
                not_after_unix: NOW + 1,
            })
            .unwrap_err();
        assert!(matches!(err, PkiError::BadCsr(_)));
    }

    #[test]
    fn only_node_certificates_name_a_node() {
        let ca = ClusterCa::from_pem(&ClusterCa::generate("t", NOW).unwrap()).unwrap();
        let key = AgentKey::generate("x").unwrap();
        let node = ca
            .sign_node(&NodeCertRequest {
                csr_pem: &key.csr_pem,
                node_id: 3,
                serial: 7,
                not_before_unix: NOW,
                not_after_unix: NOW + 86_400,
            })
            .unwrap();
        assert_eq!(node_id_of(&first_der(&node).unwrap()), Some(3));
        // An agent called like a node is still an agent.
        let agent = ca
            .sign_agent(&AgentCertRequest {
                csr_pem: &key.csr_pem,
                agent_name: "node-1",
                serial: 8,
                not_before_unix: NOW,
                not_after_unix: NOW + 86_400,
            })
            .unwrap();
        assert_eq!(node_id_of(&first_der(&agent).unwrap()), None);
        // The API/ingress certificate is not a node certificate either.
        let server = ca
            .issue_server(&["localhost".into(), NODE_SAN.into()], NOW, 1)
            .unwrap();
        assert_eq!(node_id_of(&first_der(&server.cert_pem).unwrap()), None);
    }
}
