//! Gatehouse access tokens: short-lived JWTs (ES256) signed by the cluster's
//! key, which lives in Raft sealed with the key-encryption key. Every node
//! signs and verifies with the same key; agents learn the public half.

use std::sync::{Arc, Mutex};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use gatehouse_cp_raft::Command;
use gatehouse_cp_raft::identity::SigningKey;
use gatehouse_pki::sealed::Kek;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::Principal;
use crate::cluster::{Cluster, now_ms};

/// `iss` and `aud` of every Gatehouse token.
pub const TOKEN_ISSUER: &str = "gatehouse";
/// Purpose bound into the sealed private key.
const KEY_PURPOSE: &str = "token-signing-key";
/// Clock skew tolerated on `exp`, `nbf` and `iat`.
pub const SKEW_SECS: u64 = 30;

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    iss: String,
    aud: String,
    /// The identity (`user:<issuer>/<subject>` or `sa:<name>`).
    sub: String,
    /// Who vouched for it.
    idp: String,
    groups: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    email: String,
    iat: i64,
    nbf: i64,
    exp: i64,
    jti: String,
}

/// Why a token was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the access token has expired; run `gatehouse login` again")]
    Expired,
    #[error("the access token is not valid: {0}")]
    Invalid(String),
    #[error("no token-signing key is available: {0}")]
    NoKey(String),
    #[error("the access token was revoked; run `gatehouse login` again")]
    Revoked,
}

/// Signs and verifies Gatehouse tokens.
pub struct Tokens {
    cluster: Arc<Cluster>,
    kek: Arc<Kek>,
    /// The signing key, once opened.
    signer: Mutex<Option<(String, Arc<EncodingKey>)>>,
    pub ttl_secs: i64,
}

// === impl Tokens ===

impl Tokens {
    pub fn new(cluster: Arc<Cluster>, kek: Arc<Kek>, ttl_secs: i64) -> Self {
        Self {
            cluster,
            kek,
            signer: Mutex::new(None),
            ttl_secs,
        }
    }

    /// Makes sure the cluster has a signing key (the first node to propose
    /// one wins; the others read it).
    pub async fn ensure_key(&self) -> Result<(), TokenError> {
        let have = self
            .cluster
            .reader
            .signing_keys()
            .map_err(|e| TokenError::NoKey(e.to_string()))?;
        if !have.is_empty() {
            return Ok(());
        }
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| TokenError::NoKey(e.to_string()))?;
        let kid = self.cluster.new_secret(8);
        let nonce = self.cluster.random_nonce();
        let key = SigningKey {
            kid,
            public_pem: pair.public_key_pem(),
            private_sealed: self.kek.seal(KEY_PURPOSE, nonce, &pair.serialize_der()),
            created_ms: now_ms(),
        };
        super::propose_first(&self.cluster, Command::PutSigningKey { key: Box::new(key) })
            .await
            .map_err(|e| TokenError::NoKey(e.to_string()))
    }

    fn signer(&self) -> Result<(String, Arc<EncodingKey>), TokenError> {
        if let Ok(g) = self.signer.lock()
            && let Some(s) = g.as_ref()
        {
            return Ok(s.clone());
        }
        let keys = self
            .cluster
            .reader
            .signing_keys()
            .map_err(|e| TokenError::NoKey(e.to_string()))?;
        let Some(k) = keys.last() else {
            return Err(TokenError::NoKey("the cluster has none yet".into()));
        };
        let der = self
            .kek
            .open(KEY_PURPOSE, &k.private_sealed)
            .map_err(|e| TokenError::NoKey(e.to_string()))?;
        let s = (k.kid.clone(), Arc::new(EncodingKey::from_ec_der(&der)));
        if let Ok(mut g) = self.signer.lock() {
            *g = Some(s.clone());
        }
        Ok(s)
    }

    /// A new token for `who`, valid for the configured lifetime.
    pub fn issue(&self, who: &Principal) -> Result<(String, i64), TokenError> {
        let (kid, key) = self.signer()?;
        let now = now_ms() / 1000;
        let exp = now + self.ttl_secs;
        let claims = Claims {
            iss: TOKEN_ISSUER.into(),
            aud: TOKEN_ISSUER.into(),
            sub: who.identity.clone(),
            idp: who.issuer.clone(),
            groups: who.groups.clone(),
            email: who.email.clone(),
            iat: now,
            nbf: now,
            exp,
            jti: self.cluster.new_id(),
        };
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(kid);
        let token = jsonwebtoken::encode(&header, &claims, &key)
            .map_err(|e| TokenError::NoKey(e.to_string()))?;
        Ok((token, exp * 1000))
    }

    /// Verifies a token against the cluster's keys: signature, `iss`,
    /// `aud`, `exp`, `nbf` and `iat` (with a small skew).
    pub fn verify(&self, token: &str) -> Result<Principal, TokenError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| TokenError::Invalid(e.to_string()))?;
        if header.alg != Algorithm::ES256 {
            return Err(TokenError::Invalid(format!(
                "algorithm {:?} is not ES256",
                header.alg
            )));
        }
        let kid = header.kid.unwrap_or_default();
        let keys = self
            .cluster
            .reader
            .signing_keys()
            .map_err(|e| TokenError::NoKey(e.to_string()))?;
        let Some(k) = keys.iter().find(|k| k.kid == kid) else {
            return Err(TokenError::Invalid(format!("unknown key id {kid:?}")));
        };
        let key = decoding_key(k)?;
        let mut v = Validation::new(Algorithm::ES256);
        v.leeway = SKEW_SECS;
        v.validate_nbf = true;
        v.set_audience(&[TOKEN_ISSUER]);
        v.set_issuer(&[TOKEN_ISSUER]);
        v.set_required_spec_claims(&["exp", "nbf", "iat", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<Claims>(token, &key, &v).map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
            _ => TokenError::Invalid(e.to_string()),
        })?;
        let c = data.claims;
        if c.iat > now_ms() / 1000 + SKEW_SECS as i64 {
            return Err(TokenError::Invalid("issued in the future".into()));
        }
        match super::revoked(&self.cluster.reader, &c.sub, c.iat) {
            Ok(true) => return Err(TokenError::Revoked),
            Ok(false) => {}
            Err(e) => return Err(TokenError::NoKey(format!("revocations unreadable: {e}"))),
        }
        Ok(Principal {
            identity: c.sub,
            issuer: c.idp,
            groups: c.groups,
            email: c.email,
            expires_ms: c.exp.saturating_mul(1000),
        })
    }

    /// The public keys as a JWKS document.
    pub fn jwks(&self) -> String {
        jwks_of(&self.cluster.reader)
    }
}

/// The cluster's token-signing public keys as a JWKS document.
pub fn jwks_of(reader: &gatehouse_cp_raft::StateReader) -> String {
    let keys: Vec<serde_json::Value> = reader
        .signing_keys()
        .unwrap_or_default()
        .iter()
        .filter_map(|k| {
            let (x, y) = coordinates(k)?;
            Some(serde_json::json!({
                "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig",
                "kid": k.kid, "x": x, "y": y,
            }))
        })
        .collect();
    serde_json::json!({ "keys": keys }).to_string()
}

/// The public point's coordinates, base64url, from the key's SPKI PEM.
fn coordinates(k: &SigningKey) -> Option<(String, String)> {
    use rustls::pki_types::SubjectPublicKeyInfoDer;
    use rustls::pki_types::pem::PemObject;
    let der = SubjectPublicKeyInfoDer::from_pem_slice(k.public_pem.as_bytes()).ok()?;
    // A P-256 SPKI ends with the 65-byte uncompressed point.
    let point = der.get(der.len().checked_sub(65)?..)?;
    if point.first() != Some(&4) {
        return None;
    }
    Some((B64.encode(&point[1..33]), B64.encode(&point[33..65])))
}

fn decoding_key(k: &SigningKey) -> Result<DecodingKey, TokenError> {
    let (x, y) = coordinates(k).ok_or_else(|| TokenError::NoKey("malformed public key".into()))?;
    DecodingKey::from_ec_components(&x, &y).map_err(|e| TokenError::NoKey(e.to_string()))
}

/// Whether a password or bearer looks like a JWT (three base64url parts).
pub fn looks_like_jwt(s: &str) -> bool {
    s.starts_with("eyJ") && s.split('.').count() == 3
}
