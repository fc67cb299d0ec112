//! Who a caller is: people from trusted OpenID Providers, service accounts
//! with API keys or workload tokens, and the Gatehouse access tokens both
//! are given.

pub mod admin;
pub mod oidc;
pub mod roles;
pub mod saml;
pub mod service;
pub mod tokens;

use std::sync::Arc;

use gatehouse_pki::sealed::Kek;

use crate::cluster::Cluster;
use crate::limits::LoginThrottle;

/// Issuer recorded for service accounts authenticated by API key.
pub const LOCAL_ISSUER: &str = "gatehouse";

/// An authenticated identity and what it carries into decisions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Principal {
    /// `user:<issuer name>/<subject>` or `sa:<name>`.
    pub identity: String,
    /// Who vouched for it: a provider's issuer URL, or `gatehouse`.
    pub issuer: String,
    /// Groups at authentication, then static groups.
    pub groups: Vec<String>,
    pub email: String,
}

impl Principal {
    /// A service account authenticated by API key.
    pub fn service_account(name: &str, groups: Vec<String>) -> Self {
        Self {
            identity: format!("sa:{name}"),
            issuer: LOCAL_ISSUER.into(),
            groups,
            email: String::new(),
        }
    }

    /// Adds the identity's static groups (kept in Raft) to its own.
    pub fn with_static_groups(mut self, cluster: &Cluster) -> Self {
        if let Ok(extra) = cluster.reader.static_groups(&self.identity) {
            for g in extra {
                if !self.groups.contains(&g) {
                    self.groups.push(g);
                }
            }
        }
        self
    }
}

/// The caller of an API call: who, and from where.
#[derive(Clone, Debug, Default)]
pub struct Actor {
    pub principal: Principal,
    pub addr: String,
}

/// What login, token exchange and token checks share.
pub struct Identities {
    pub cluster: Arc<Cluster>,
    pub kek: Arc<Kek>,
    pub tokens: tokens::Tokens,
    pub providers: oidc::Providers,
    pub throttle: Arc<LoginThrottle>,
}

/// Why a credential was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(transparent)]
    Token(#[from] tokens::TokenError),
    #[error("invalid API key")]
    BadKey,
    #[error("{0}")]
    Unavailable(String),
}

impl Identities {
    /// Refuses, unchecked, a source backing off after failed logins; one
    /// `login_throttled` event per source and interval. `what` names the
    /// attempts in that event ("login attempts", "API calls").
    pub async fn gate(&self, ip: std::net::IpAddr, what: &str) -> Result<(), tonic::Status> {
        let now = std::time::Instant::now();
        let Err(wait) = self.throttle.check(ip, now) else {
            return Ok(());
        };
        if let Some(count) = self.throttle.note_throttled(ip, now) {
            let mut ev = self.cluster.event(
                gatehouse_audit::EventKind::LoginThrottled,
                gatehouse_audit::Decision::Deny,
                "anonymous",
                "",
                "",
            );
            ev.detail = Some(format!(
                "{count} {what} from {ip} refused unchecked while it backs off after failed logins"
            ));
            let _ = self.cluster.audit(ev).await;
        }
        Err(tonic::Status::resource_exhausted(format!(
            "too many failed logins from {ip}; retry in {} s",
            wait.as_secs().max(1)
        )))
    }

    /// Authenticates an API key or a Gatehouse access token; groups include
    /// static ones.
    pub fn authenticate(&self, credential: &str) -> Result<Principal, AuthError> {
        let p = if tokens::looks_like_jwt(credential) {
            self.tokens.verify(credential)?
        } else {
            match self.cluster.reader.verify_api_key(credential) {
                Ok(Some(sa)) => Principal::service_account(&sa.name, sa.groups),
                Ok(None) => return Err(AuthError::BadKey),
                Err(e) => return Err(AuthError::Unavailable(e.to_string())),
            }
        };
        Ok(p.with_static_groups(&self.cluster))
    }
}
