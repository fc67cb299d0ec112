//! Trusted OpenID Providers: discovery and JWKS, cached per issuer with
//! key rotation, and complete validation of the tokens they sign.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gatehouse_cp_raft::identity::Issuer;
use openidconnect::core::{
    CoreAuthDisplay, CoreClaimName, CoreClaimType, CoreClientAuthMethod, CoreGenderClaim,
    CoreGrantType, CoreJsonWebKey, CoreJsonWebKeySet, CoreJweContentEncryptionAlgorithm,
    CoreJweKeyManagementAlgorithm, CoreJwsSigningAlgorithm, CoreResponseMode, CoreResponseType,
    CoreSubjectIdentifierType,
};
use openidconnect::{
    AdditionalClaims, AdditionalProviderMetadata, Audience, ClaimsVerificationError, ClientId,
    DeviceAuthorizationUrl, IdTokenVerifier, IssuerUrl, Nonce, ProviderMetadata,
    SignatureVerificationError,
};
use serde::{Deserialize, Serialize};

use super::tokens::SKEW_SECS;

/// Claims beyond the standard ones (groups, client_id, a CI provider's
/// repository and ref, …).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct Extra {
    #[serde(flatten)]
    pub claims: serde_json::Map<String, serde_json::Value>,
}
impl AdditionalClaims for Extra {}

pub type Token = openidconnect::IdToken<
    Extra,
    CoreGenderClaim,
    CoreJweContentEncryptionAlgorithm,
    CoreJwsSigningAlgorithm,
>;
pub type Claims = openidconnect::IdTokenClaims<Extra, CoreGenderClaim>;

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct DeviceEndpoint {
    #[serde(default)]
    pub device_authorization_endpoint: Option<DeviceAuthorizationUrl>,
}
impl AdditionalProviderMetadata for DeviceEndpoint {}

pub type Metadata = ProviderMetadata<
    DeviceEndpoint,
    CoreAuthDisplay,
    CoreClientAuthMethod,
    CoreClaimName,
    CoreClaimType,
    CoreGrantType,
    CoreJweContentEncryptionAlgorithm,
    CoreJweKeyManagementAlgorithm,
    CoreJsonWebKey,
    CoreResponseMode,
    CoreResponseType,
    CoreSubjectIdentifierType,
>;

/// Discovery and keys are fetched again after this long.
const METADATA_TTL: Duration = Duration::from_secs(300);
/// An unknown key id refetches the keys at most this often per issuer.
const REFETCH_MIN: Duration = Duration::from_secs(1);
/// Largest discovery, JWKS or token response read.
const MAX_BODY: usize = 1 << 20;
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a provider's token was refused; the text names the check.
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("the identity provider {0} could not be reached: {1}")]
    Unreachable(String, String),
    #[error("token refused: {0}")]
    Refused(String),
}

struct Entry {
    metadata: Metadata,
    jwks: CoreJsonWebKeySet,
    fetched: Instant,
}

/// The providers' cached metadata and keys, and the HTTP client that
/// fetches them (redirects are not followed).
pub struct Providers {
    pub http: Http,
    cache: Mutex<HashMap<String, Arc<Entry>>>,
}

/// The HTTP client openidconnect calls.
#[derive(Clone)]
pub struct Http(reqwest::Client);

type HttpFuture<'c> = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = Result<openidconnect::HttpResponse, HttpError>>
            + Send
            + 'c,
    >,
>;

impl<'c> openidconnect::AsyncHttpClient<'c> for Http {
    type Error = HttpError;
    type Future = HttpFuture<'c>;

    fn call(&'c self, req: openidconnect::HttpRequest) -> Self::Future {
        Box::pin(fetch(self.0.clone(), req))
    }
}

/// One HTTP exchange for openidconnect, with a timeout and a size cap.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HttpError(String);

// === impl Providers ===

impl Providers {
    pub fn new() -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(HTTP_TIMEOUT)
            .build()?;
        Ok(Self {
            http: Http(http),
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// A GET with the same timeout, size cap and no redirects.
    pub async fn get(&self, url: &str) -> Result<Vec<u8>, HttpError> {
        let req = http::Request::get(url)
            .body(Vec::new())
            .map_err(|e| HttpError(e.to_string()))?;
        let resp = fetch(self.http.0.clone(), req).await?;
        if !resp.status().is_success() {
            return Err(HttpError(format!("{url} answered {}", resp.status())));
        }
        Ok(resp.into_body())
    }

    async fn entry(&self, issuer: &Issuer, refetch_keys: bool) -> Result<Arc<Entry>, OidcError> {
        let cached = self
            .cache
            .lock()
            .ok()
            .and_then(|c| c.get(&issuer.issuer_url).cloned());
        if let Some(e) = &cached {
            let fresh = e.fetched.elapsed() < METADATA_TTL;
            if fresh && (!refetch_keys || e.fetched.elapsed() < REFETCH_MIN) {
                return Ok(e.clone());
            }
        }
        let unreachable = |e: String| OidcError::Unreachable(issuer.issuer_url.clone(), e);
        let url =
            IssuerUrl::new(issuer.issuer_url.clone()).map_err(|e| unreachable(e.to_string()))?;
        let metadata = Metadata::discover_async(url, &self.http)
            .await
            .map_err(|e| unreachable(chain(&e)))?;
        let jwks = metadata.jwks().clone();
        let e = Arc::new(Entry {
            metadata,
            jwks,
            fetched: Instant::now(),
        });
        if let Ok(mut c) = self.cache.lock() {
            c.insert(issuer.issuer_url.clone(), e.clone());
        }
        Ok(e)
    }

    pub async fn metadata(&self, issuer: &Issuer) -> Result<Metadata, OidcError> {
        Ok(self.entry(issuer, false).await?.metadata.clone())
    }

    /// Verifies a token `issuer` signed: signature with a key from its
    /// JWKS (fetched again once when the key id is unknown, so rotation
    /// is picked up), the algorithm allow-list, `iss` exactly, `aud`
    /// containing `audience` and no untrusted other audience, `exp`,
    /// `iat` and `nbf` with a small skew, and the nonce when given.
    pub async fn verify(
        &self,
        issuer: &Issuer,
        token: &str,
        audience: &str,
        nonce: Option<&Nonce>,
        workload: bool,
    ) -> Result<Claims, OidcError> {
        let parsed: Token = token
            .parse()
            .map_err(|e: serde_json::Error| OidcError::Refused(format!("malformed token: {e}")))?;
        let mut entry = self.entry(issuer, false).await?;
        let mut refetched = false;
        loop {
            let verifier = verifier(issuer, audience, entry.jwks.clone(), workload)?;
            let res = match nonce {
                Some(n) => parsed.claims(&verifier, n).cloned(),
                None => parsed
                    .claims(&verifier, |_: Option<&Nonce>| Ok(()))
                    .cloned(),
            };
            match res {
                Ok(c) => {
                    check_nbf(&c)?;
                    return Ok(c);
                }
                Err(ClaimsVerificationError::SignatureVerification(
                    SignatureVerificationError::NoMatchingKey,
                )) if !refetched => {
                    refetched = true;
                    entry = self.entry(issuer, true).await?;
                }
                Err(e) => return Err(OidcError::Refused(describe(e))),
            }
        }
    }
}

async fn fetch(
    client: reqwest::Client,
    req: openidconnect::HttpRequest,
) -> Result<openidconnect::HttpResponse, HttpError> {
    let (parts, body) = req.into_parts();
    let mut r = client
        .request(parts.method, parts.uri.to_string())
        .headers(parts.headers)
        .body(body)
        .send()
        .await
        .map_err(|e| HttpError(e.to_string()))?;
    let status = r.status();
    let headers = r.headers().clone();
    let mut out = Vec::new();
    while let Some(chunk) = r.chunk().await.map_err(|e| HttpError(e.to_string()))? {
        if out.len() + chunk.len() > MAX_BODY {
            return Err(HttpError(format!("response larger than {MAX_BODY} bytes")));
        }
        out.extend_from_slice(&chunk);
    }
    let mut resp = http::Response::new(out);
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    Ok(resp)
}

fn verifier(
    issuer: &Issuer,
    audience: &str,
    jwks: CoreJsonWebKeySet,
    workload: bool,
) -> Result<IdTokenVerifier<'static, CoreJsonWebKey>, OidcError> {
    let url = IssuerUrl::new(issuer.issuer_url.clone())
        .map_err(|e| OidcError::Refused(format!("issuer URL: {e}")))?;
    let algs = algorithms(&issuer.algorithms).map_err(OidcError::Refused)?;
    let trusted: Vec<String> = issuer.audiences.clone();
    let skew = chrono::Duration::seconds(SKEW_SECS as i64);
    let mut v = IdTokenVerifier::new_public_client(ClientId::new(audience.to_string()), url, jwks)
        .set_allowed_algs(algs)
        .set_other_audience_verifier_fn(move |aud: &Audience| trusted.iter().any(|t| **t == **aud))
        // `exp` is compared with a clock held back by the skew.
        .set_time_fn(move || chrono::Utc::now() - skew)
        .set_issue_time_verifier_fn(move |iat| {
            if iat > chrono::Utc::now() + skew {
                Err("issued in the future".into())
            } else {
                Ok(())
            }
        });
    if workload {
        let types = ["JWT", "at+jwt"].into_iter().filter_map(|t| {
            openidconnect::JsonWebTokenType::new(t.into())
                .normalize()
                .ok()
        });
        v = v.set_allowed_jose_types(types);
    }
    Ok(v)
}

/// `nbf`, which ID-token validation does not look at.
fn check_nbf(c: &Claims) -> Result<(), OidcError> {
    if let Some(nbf) = c
        .additional_claims()
        .claims
        .get("nbf")
        .and_then(|v| v.as_i64())
        && nbf > chrono::Utc::now().timestamp() + SKEW_SECS as i64
    {
        return Err(OidcError::Refused(format!(
            "token is not valid before {nbf}"
        )));
    }
    Ok(())
}

/// The allow-list; asymmetric algorithms only.
pub fn algorithms(names: &[String]) -> Result<Vec<CoreJwsSigningAlgorithm>, String> {
    let names: Vec<String> = if names.is_empty() {
        vec!["RS256".into(), "ES256".into()]
    } else {
        names.to_vec()
    };
    names
        .iter()
        .map(|n| {
            if n.eq_ignore_ascii_case("none") || n.to_ascii_uppercase().starts_with("HS") {
                return Err(format!(
                    "algorithm {n} is not allowed: only asymmetric signatures are accepted"
                ));
            }
            serde_json::from_value::<CoreJwsSigningAlgorithm>(serde_json::Value::String(n.clone()))
                .map_err(|_| format!("unknown signature algorithm {n:?}"))
        })
        .collect()
}

fn describe(e: ClaimsVerificationError) -> String {
    match e {
        ClaimsVerificationError::Expired(m) => format!("expired: {m}"),
        ClaimsVerificationError::InvalidIssuer(m) => format!("wrong issuer: {m}"),
        ClaimsVerificationError::InvalidAudience(m) => format!("wrong audience: {m}"),
        ClaimsVerificationError::InvalidNonce(m) => format!("nonce mismatch: {m}"),
        ClaimsVerificationError::InvalidAuthTime(m)
        | ClaimsVerificationError::InvalidAuthContext(m) => m,
        ClaimsVerificationError::InvalidSubject(m) => format!("subject: {m}"),
        ClaimsVerificationError::SignatureVerification(s) => match s {
            SignatureVerificationError::NoMatchingKey => {
                "no key of the provider matches the token's key id (unknown or rotated-out key)"
                    .into()
            }
            SignatureVerificationError::DisallowedAlg(m) => format!("algorithm not allowed: {m}"),
            SignatureVerificationError::UnsupportedAlg(m) => {
                format!("algorithm not supported: {m}")
            }
            other => format!("bad signature: {other}"),
        },
        ClaimsVerificationError::Unsupported(m) => format!("unsupported token: {m}"),
        other => other.to_string(),
    }
}

/// An error and its causes on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The `groups` claim (or the issuer's configured one): an array of
/// strings, or one string.
pub fn groups_of(c: &Claims, claim: &str) -> Vec<String> {
    let claim = if claim.is_empty() { "groups" } else { claim };
    match c.additional_claims().claims.get(claim) {
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        Some(serde_json::Value::String(s)) => vec![s.clone()],
        _ => Vec::new(),
    }
}

/// The issuer a token claims, before it is verified (to pick the issuer's
/// configuration; verification then checks it exactly). The header is not
/// looked at here (jsonwebtoken's insecure decode would refuse `alg: none`
/// before the verifier can name why).
pub fn unverified_issuer(token: &str) -> Option<String> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v.get("iss")?.as_str().map(str::to_string)
}
