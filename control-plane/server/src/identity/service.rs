//! The `Identity` service: OIDC login (code + PKCE, device flow) and
//! token exchange, each ending in a Gatehouse access token. Every outcome
//! is an audit event; failures are throttled per source and subject.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use gatehouse_cp_raft::identity::{Issuer, User, glob_match};
use gatehouse_proto::v1::identity_server::Identity;
use gatehouse_proto::v1::*;
use openidconnect::core::{CoreAuthenticationFlow, CoreClient, CoreDeviceAuthorizationResponse};
use openidconnect::{
    AuthorizationCode, ClientId, ClientSecret, CsrfToken, DeviceAuthorizationUrl, EndpointMaybeSet,
    EndpointNotSet, EndpointSet, Nonce, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, Scope,
    TokenResponse,
};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use super::oidc::{self, Claims, OidcError, chain, groups_of};
use super::{Identities, Principal, source};
use crate::cluster::now_ms;

const TOKEN_TYPE_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
const TOKEN_TYPE_ID: &str = "urn:ietf:params:oauth:token-type:id_token";
/// Purposes bound into sealed login states.
const LOGIN_PURPOSE: &str = "oidc-login-state";
const DEVICE_PURPOSE: &str = "oidc-device-state";
/// How long a started login may take.
const LOGIN_TTL_MS: i64 = 600_000;
/// Longest one PollDeviceLogin waits at the provider.
const DEVICE_POLL_WAIT: Duration = Duration::from_secs(20);
/// Largest token accepted for exchange.
const MAX_TOKEN: usize = 16 << 10;

/// An issuer's client as discovery configures it: authorization and token
/// endpoints (and userinfo) known, the device endpoint set when used.
type OidcClient = CoreClient<
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointMaybeSet,
    EndpointMaybeSet,
>;

pub struct IdentityService {
    pub ids: Arc<Identities>,
}

/// What BeginLogin seals for CompleteLogin (never in the browser's URL).
#[derive(Serialize, Deserialize)]
struct LoginState {
    issuer: String,
    verifier: String,
    nonce: String,
    csrf: String,
    redirect_uri: String,
    expires_ms: i64,
}

#[derive(Serialize, Deserialize)]
struct DeviceState {
    issuer: String,
    details: CoreDeviceAuthorizationResponse,
    expires_ms: i64,
}

/// A refused login: the caller's status, and what the audit says.
struct Refused {
    status: Status,
    subject: String,
    detail: String,
}

fn refused(subject: &str, detail: impl Into<String>) -> Refused {
    let detail = detail.into();
    Refused {
        status: Status::unauthenticated(detail.clone()),
        subject: subject.to_string(),
        detail,
    }
}

impl From<Status> for Refused {
    fn from(status: Status) -> Self {
        Refused {
            detail: status.message().to_string(),
            status,
            subject: String::new(),
        }
    }
}

impl From<OidcError> for Refused {
    fn from(e: OidcError) -> Self {
        match e {
            OidcError::Unreachable(..) => Refused {
                status: Status::unavailable(e.to_string()),
                subject: String::new(),
                detail: e.to_string(),
            },
            OidcError::Refused(_) => refused("", e.to_string()),
        }
    }
}

fn bad(m: impl Into<String>) -> Status {
    Status::invalid_argument(m.into())
}

// === impl IdentityService ===

impl IdentityService {
    fn issuer(&self, name: &str) -> Result<Issuer, Status> {
        let reader = &self.ids.cluster.reader;
        if name.is_empty() {
            let all: Vec<Issuer> = reader
                .issuers()
                .map_err(|e| Status::unavailable(e.to_string()))?
                .into_iter()
                .filter(|i| i.kind == "oidc")
                .collect();
            return match all.len() {
                1 => Ok(all.into_iter().next().unwrap_or_default()),
                0 => Err(Status::failed_precondition(
                    "no OIDC issuer is trusted; an admin adds one with `gatehouse issuers add-oidc`",
                )),
                _ => Err(bad(format!(
                    "more than one issuer is trusted; name one of: {}",
                    all.iter()
                        .map(|i| i.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))),
            };
        }
        reader
            .issuer(name)
            .map_err(|e| Status::unavailable(e.to_string()))?
            .ok_or_else(|| Status::not_found(format!("no trusted issuer named {name:?}")))
    }

    fn secret(&self, issuer: &Issuer) -> Result<Option<ClientSecret>, Status> {
        if issuer.client_secret_sealed.is_empty() {
            return Ok(None);
        }
        let s = self
            .ids
            .kek
            .open(&secret_purpose(&issuer.name), &issuer.client_secret_sealed)
            .map_err(|e| Status::internal(format!("opening the client secret: {e}")))?;
        Ok(Some(ClientSecret::new(
            String::from_utf8_lossy(&s).into_owned(),
        )))
    }

    fn seal<T: Serialize>(&self, purpose: &str, v: &T) -> Result<String, Status> {
        self.ids
            .seal_json(purpose, v)
            .map_err(|e| Status::internal(e.to_string()))
    }

    fn open<T: for<'de> Deserialize<'de>>(&self, purpose: &str, s: &str) -> Result<T, Status> {
        self.ids.open_json(purpose, s).ok_or_else(|| {
            Status::invalid_argument("the login state is not one this cluster issued")
        })
    }

    /// Checks the throttle before any work for a source.
    async fn gate(&self, ip: IpAddr) -> Result<(), Status> {
        self.ids.gate(ip, "login attempts").await
    }

    /// Audits a refusal, slows its answer, and returns the status.
    async fn fail(&self, ip: IpAddr, addr: &str, how: &str, r: Refused) -> Status {
        let detail = format!("{how} from {addr} refused: {}", r.detail);
        match self.ids.refused(ip, &r.subject, &r.subject, detail).await {
            Ok(()) => r.status,
            Err(()) => Status::unavailable("the refusal could not be audited; try again"),
        }
    }

    /// Records the login, audits it, and issues the token.
    async fn succeed(
        &self,
        ip: IpAddr,
        addr: &str,
        how: &str,
        who: Principal,
        user: Option<User>,
    ) -> Result<LoginResponse, Status> {
        let done = self
            .ids
            .logged_in(ip, &format!("{how} from {addr}"), who, user)
            .await
            .map_err(Status::unavailable)?;
        Ok(LoginResponse {
            access_token: done.token,
            expires_ms: done.expires_ms,
            identity: done.who.identity,
            issuer: done.who.issuer,
            groups: done.who.groups,
            email: done.who.email,
        })
    }

    /// A verified ID token's person, and their record.
    fn person(issuer: &Issuer, c: &Claims) -> (Principal, User) {
        let subject = c.subject().to_string();
        let identity = format!("user:{}/{subject}", issuer.name);
        let email = c.email().map(|e| e.to_string()).unwrap_or_default();
        let groups = groups_of(c, &issuer.groups_claim);
        let user = User {
            identity: identity.clone(),
            issuer: issuer.issuer_url.clone(),
            subject,
            email: email.clone(),
            groups: groups.clone(),
            last_login_ms: now_ms(),
        };
        (
            Principal {
                identity,
                issuer: issuer.issuer_url.clone(),
                groups,
                email,
                expires_ms: 0,
            },
            user,
        )
    }

    /// The issuer's OAuth client from its discovery document, and its
    /// device authorization endpoint if it has one.
    async fn client(
        &self,
        issuer: &Issuer,
    ) -> Result<(OidcClient, Option<DeviceAuthorizationUrl>), Refused> {
        let md = self.ids.providers.metadata(issuer).await?;
        let device = md
            .additional_metadata()
            .device_authorization_endpoint
            .clone();
        let client = CoreClient::from_provider_metadata(
            md,
            ClientId::new(issuer.client_id.clone()),
            self.secret(issuer)?,
        );
        Ok((client, device))
    }

    async fn complete(&self, req: CompleteLoginRequest) -> Result<(Principal, User), Refused> {
        let st: LoginState = self.open(LOGIN_PURPOSE, &req.state)?;
        if now_ms() > st.expires_ms {
            return Err(refused("", "the login took too long; start again"));
        }
        if !bool::from(subtle::ConstantTimeEq::ct_eq(
            st.csrf.as_bytes(),
            req.returned_state.as_bytes(),
        )) {
            return Err(refused(
                "",
                "the provider's redirect carried another login's state (possible cross-site request)",
            ));
        }
        let issuer = self.issuer(&st.issuer)?;
        let redirect = RedirectUrl::new(st.redirect_uri.clone())
            .map_err(|e| refused("", format!("redirect URI: {e}")))?;
        let client = self.client(&issuer).await?.0.set_redirect_uri(redirect);
        let http = &self.ids.providers.http;
        let resp = client
            .exchange_code(AuthorizationCode::new(req.code))
            .map_err(|e| refused("", e.to_string()))?
            .set_pkce_verifier(PkceCodeVerifier::new(st.verifier))
            .request_async(http)
            .await
            .map_err(|e| refused("", format!("the provider refused the code: {}", chain(&e))))?;
        let nonce = Nonce::new(st.nonce);
        self.id_token_person(&issuer, resp.id_token(), Some(&nonce))
            .await
    }

    /// The person a token response's ID token names, once it verifies.
    async fn id_token_person(
        &self,
        issuer: &Issuer,
        id_token: Option<&openidconnect::core::CoreIdToken>,
        nonce: Option<&Nonce>,
    ) -> Result<(Principal, User), Refused> {
        let Some(id_token) = id_token else {
            return Err(refused("", "the provider returned no ID token"));
        };
        let claims = self
            .ids
            .providers
            .verify(
                issuer,
                &id_token.to_string(),
                &issuer.client_id,
                nonce,
                false,
            )
            .await?;
        Ok(Self::person(issuer, &claims))
    }

    async fn poll(
        &self,
        req: PollDeviceLoginRequest,
    ) -> Result<Option<(Principal, User)>, Refused> {
        let st: DeviceState = self.open(DEVICE_PURPOSE, &req.device_state)?;
        let left = st.expires_ms - now_ms();
        if left <= 0 {
            return Err(refused("", "the device code has expired; start again"));
        }
        let issuer = self.issuer(&st.issuer)?;
        let (client, _) = self.client(&issuer).await?;
        let http = &self.ids.providers.http;
        let wait = DEVICE_POLL_WAIT.min(Duration::from_millis(left as u64));
        let res = client
            .exchange_device_access_token(&st.details)
            .map_err(|e| refused("", e.to_string()))?
            .request_async(http, tokio::time::sleep, Some(wait))
            .await;
        let resp = match res {
            Ok(r) => r,
            Err(openidconnect::RequestTokenError::ServerResponse(e)) => {
                use openidconnect::DeviceCodeErrorResponseType as T;
                return match e.error() {
                    T::AuthorizationPending | T::SlowDown => Ok(None),
                    // Our own wait ended before the code did.
                    T::ExpiredToken if now_ms() < st.expires_ms => Ok(None),
                    T::AccessDenied => {
                        Err(refused("", "the person denied the login at the provider"))
                    }
                    other => Err(refused(
                        "",
                        format!("the provider refused the device code: {other}"),
                    )),
                };
            }
            Err(e) => {
                return Err(refused(
                    "",
                    format!("the provider refused the device code: {}", chain(&e)),
                ));
            }
        };
        self.id_token_person(&issuer, resp.id_token(), None)
            .await
            .map(Some)
    }

    async fn exchange(
        &self,
        req: &ExchangeTokenRequest,
    ) -> Result<(Principal, Option<User>), Refused> {
        if req.subject_token.len() > MAX_TOKEN {
            return Err(refused(
                "",
                format!("subject token is longer than {MAX_TOKEN} bytes"),
            ));
        }
        let Some(iss) = oidc::unverified_issuer(&req.subject_token) else {
            return Err(refused("", "the subject token is not a JWT with an issuer"));
        };
        let issuers = self.ids.cluster.reader.issuers().map_err(|e| Refused {
            status: Status::unavailable(e.to_string()),
            subject: String::new(),
            detail: e.to_string(),
        })?;
        let Some(issuer) = issuers.into_iter().find(|i| i.issuer_url == iss) else {
            return Err(refused(
                "",
                format!("wrong issuer: {iss:?} is not a trusted issuer"),
            ));
        };
        match req.subject_token_type.as_str() {
            TOKEN_TYPE_ID => {
                let c = self
                    .ids
                    .providers
                    .verify(&issuer, &req.subject_token, &issuer.client_id, None, false)
                    .await?;
                let (p, u) = Self::person(&issuer, &c);
                Ok((p, Some(u)))
            }
            TOKEN_TYPE_JWT | "" => {
                let sa_name = &req.service_account;
                let subject = format!("sa:{sa_name}");
                let sa = self
                    .ids
                    .cluster
                    .reader
                    .service_account(sa_name)
                    .ok()
                    .flatten()
                    .ok_or_else(|| {
                        refused(&subject, format!("no service account named {sa_name:?}"))
                    })?;
                let bindings = self
                    .ids
                    .cluster
                    .reader
                    .workload_bindings(sa_name)
                    .unwrap_or_default();
                let mut why = format!(
                    "{subject} has no workload binding for issuer {}",
                    issuer.name
                );
                for b in bindings.iter().filter(|b| b.issuer == issuer.name) {
                    let c = match self
                        .ids
                        .providers
                        .verify(&issuer, &req.subject_token, &b.audience, None, true)
                        .await
                    {
                        Ok(c) => c,
                        Err(e) => {
                            why = e.to_string();
                            continue;
                        }
                    };
                    let sub = c.subject().to_string();
                    if !glob_match(&b.subject, &sub) {
                        why = format!(
                            "subject {sub:?} does not match the binding's {:?}",
                            b.subject
                        );
                        continue;
                    }
                    if let Some((k, v)) = b.claims.iter().find(|(k, v)| !claim_matches(&c, k, v)) {
                        why = format!("claim {k:?} is not {v:?}");
                        continue;
                    }
                    let mut p = Principal::service_account(sa_name, sa.groups.clone());
                    p.issuer = issuer.issuer_url.clone();
                    return Ok((p, None));
                }
                Err(refused(&subject, why))
            }
            other => Err(refused(
                "",
                format!(
                    "subject_token_type {other:?} is not supported (use {TOKEN_TYPE_JWT} or {TOKEN_TYPE_ID})"
                ),
            )),
        }
    }
}

fn claim_matches(c: &Claims, k: &str, want: &str) -> bool {
    match c.additional_claims().claims.get(k) {
        Some(serde_json::Value::String(s)) => s == want,
        Some(serde_json::Value::Array(a)) => a.iter().any(|v| v.as_str() == Some(want)),
        Some(serde_json::Value::Bool(b)) => b.to_string() == want,
        Some(serde_json::Value::Number(n)) => n.to_string() == want,
        _ => false,
    }
}

/// Purpose bound into an issuer's sealed client secret.
pub fn secret_purpose(issuer: &str) -> String {
    format!("oidc-client-secret/{issuer}")
}

/// Only loopback redirects (the CLI's listener) are accepted.
fn loopback_redirect(uri: &str) -> Result<RedirectUrl, Status> {
    let url = RedirectUrl::new(uri.to_string()).map_err(|e| bad(format!("redirect_uri: {e}")))?;
    let u = url.url();
    let loopback = u.scheme() == "http"
        && matches!(
            u.host_str(),
            Some("127.0.0.1") | Some("[::1]") | Some("localhost")
        );
    if !loopback {
        return Err(bad(
            "redirect_uri must be a loopback http:// address (the CLI's listener)",
        ));
    }
    Ok(url)
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn begin_login(
        &self,
        req: Request<BeginLoginRequest>,
    ) -> Result<Response<BeginLoginResponse>, Status> {
        let (ip, _) = source(&req);
        self.gate(ip).await?;
        let req = req.into_inner();
        let issuer = self.issuer(&req.issuer)?;
        let redirect = loopback_redirect(&req.redirect_uri)?;
        let client = self
            .client(&issuer)
            .await
            .map_err(|r| r.status)?
            .0
            .set_redirect_uri(redirect);
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let scopes = if issuer.scopes.is_empty() {
            vec!["email".to_string(), "profile".into(), "groups".into()]
        } else {
            issuer.scopes.clone()
        };
        let mut ask = client
            .authorize_url(
                CoreAuthenticationFlow::AuthorizationCode,
                CsrfToken::new_random,
                Nonce::new_random,
            )
            .set_pkce_challenge(challenge);
        for s in scopes.into_iter().filter(|s| s != "openid") {
            ask = ask.add_scope(Scope::new(s));
        }
        let (url, csrf, nonce) = ask.url();
        let state = self.seal(
            LOGIN_PURPOSE,
            &LoginState {
                issuer: issuer.name.clone(),
                verifier: verifier.secret().clone(),
                nonce: nonce.secret().clone(),
                csrf: csrf.secret().clone(),
                redirect_uri: req.redirect_uri,
                expires_ms: now_ms() + LOGIN_TTL_MS,
            },
        )?;
        Ok(Response::new(BeginLoginResponse {
            authorization_url: url.to_string(),
            state,
            issuer: issuer.name,
        }))
    }

    async fn complete_login(
        &self,
        req: Request<CompleteLoginRequest>,
    ) -> Result<Response<LoginResponse>, Status> {
        let (ip, addr) = source(&req);
        self.gate(ip).await?;
        match self.complete(req.into_inner()).await {
            Ok((p, u)) => Ok(Response::new(
                self.succeed(ip, &addr, "OIDC authorization code login", p, Some(u))
                    .await?,
            )),
            Err(r) => Err(self
                .fail(ip, &addr, "OIDC authorization code login", r)
                .await),
        }
    }

    async fn begin_device_login(
        &self,
        req: Request<BeginDeviceLoginRequest>,
    ) -> Result<Response<BeginDeviceLoginResponse>, Status> {
        let (ip, _) = source(&req);
        self.gate(ip).await?;
        let issuer = self.issuer(&req.into_inner().issuer)?;
        let (client, device_url) = self.client(&issuer).await.map_err(|r| r.status)?;
        let Some(device_url) = device_url else {
            return Err(Status::failed_precondition(format!(
                "issuer {} does not offer the device authorization flow",
                issuer.name
            )));
        };
        let client = client.set_device_authorization_url(device_url);
        let http = &self.ids.providers.http;
        let mut ask = client.exchange_device_code();
        for s in ["email", "profile", "groups"] {
            ask = ask.add_scope(Scope::new(s.into()));
        }
        let details: CoreDeviceAuthorizationResponse =
            ask.request_async(http).await.map_err(|e| {
                Status::unavailable(format!(
                    "the provider refused the device authorization: {}",
                    chain(&e)
                ))
            })?;
        let expires_ms = now_ms() + details.expires_in().as_millis() as i64;
        let resp = BeginDeviceLoginResponse {
            verification_uri: details.verification_uri().to_string(),
            verification_uri_complete: details
                .verification_uri_complete()
                .map(|u| u.secret().clone())
                .unwrap_or_default(),
            user_code: details.user_code().secret().clone(),
            interval_seconds: details.interval().as_secs() as u32,
            expires_ms,
            device_state: String::new(),
        };
        let device_state = self.seal(
            DEVICE_PURPOSE,
            &DeviceState {
                issuer: issuer.name,
                details,
                expires_ms,
            },
        )?;
        Ok(Response::new(BeginDeviceLoginResponse {
            device_state,
            ..resp
        }))
    }

    async fn poll_device_login(
        &self,
        req: Request<PollDeviceLoginRequest>,
    ) -> Result<Response<PollDeviceLoginResponse>, Status> {
        let (ip, addr) = source(&req);
        self.gate(ip).await?;
        match self.poll(req.into_inner()).await {
            Ok(None) => Ok(Response::new(PollDeviceLoginResponse {
                login: None,
                pending: true,
                interval_seconds: 5,
            })),
            Ok(Some((p, u))) => {
                let login = self
                    .succeed(ip, &addr, "OIDC device login", p, Some(u))
                    .await?;
                Ok(Response::new(PollDeviceLoginResponse {
                    login: Some(login),
                    pending: false,
                    interval_seconds: 0,
                }))
            }
            Err(r) => Err(self.fail(ip, &addr, "OIDC device login", r).await),
        }
    }

    async fn exchange_token(
        &self,
        req: Request<ExchangeTokenRequest>,
    ) -> Result<Response<LoginResponse>, Status> {
        let (ip, addr) = source(&req);
        self.gate(ip).await?;
        let req = req.into_inner();
        let how = format!(
            "token exchange ({})",
            if req.service_account.is_empty() {
                "id_token".to_string()
            } else {
                format!("for sa:{}", req.service_account)
            }
        );
        match self.exchange(&req).await {
            Ok((p, u)) => Ok(Response::new(self.succeed(ip, &addr, &how, p, u).await?)),
            Err(r) => Err(self.fail(ip, &addr, &how, r).await),
        }
    }

    async fn signing_keys(
        &self,
        _req: Request<SigningKeysRequest>,
    ) -> Result<Response<SigningKeysResponse>, Status> {
        Ok(Response::new(SigningKeysResponse {
            jwks: self.ids.tokens.jwks(),
        }))
    }
}
