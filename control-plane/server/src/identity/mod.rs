//! Who a caller is: people from trusted OpenID Providers, service accounts
//! with API keys or workload tokens, and the Gatehouse access tokens both
//! are given.

pub mod admin;
pub mod oidc;
pub mod roles;
pub mod saml;
pub mod service;
pub mod ssh_admin;
pub mod ssh_ca;
pub mod tokens;

use std::sync::Arc;

use gatehouse_pki::sealed::Kek;

use crate::cluster::Cluster;
use crate::limits::LoginThrottle;

/// Whether a credential of `identity` issued at `issued_secs` is revoked: a
/// revoked service account stays revoked; a person's credentials issued up
/// to a revocation (second resolution) are refused, and a later login gets
/// a new one. Tokens and SSH certificates share this rule.
pub fn revoked(
    reader: &gatehouse_cp_raft::StateReader,
    identity: &str,
    issued_secs: i64,
) -> Result<bool, gatehouse_cp_raft::read::ReadError> {
    Ok(match reader.revoked_at(identity)? {
        Some(_) if identity.starts_with("sa:") => true,
        Some(at) => issued_secs <= at.div_euclid(1000),
        None => false,
    })
}

/// Proposes a cluster key; a key another node's proposal put first is as
/// good (every node then reads the same one).
pub(crate) async fn propose_first(
    cluster: &Cluster,
    cmd: gatehouse_cp_raft::Command,
) -> Result<(), crate::cluster::ProposeError> {
    match cluster.propose(cmd).await {
        Ok(_) | Err(crate::cluster::ProposeError::Rejected(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

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
    /// When the credential presented stops being valid (ms since the
    /// epoch; 0: an API key, which does not expire).
    pub expires_ms: i64,
}

impl Principal {
    /// A service account authenticated by API key.
    pub fn service_account(name: &str, groups: Vec<String>) -> Self {
        Self {
            identity: format!("sa:{name}"),
            issuer: LOCAL_ISSUER.into(),
            groups,
            email: String::new(),
            expires_ms: 0,
        }
    }

    /// Puts the identity's issuer and groups on an audit event.
    pub fn stamp(&self, ev: &mut gatehouse_audit::AuditEvent) {
        ev.issuer = Some(self.issuer.clone());
        ev.groups = Some(self.groups.clone());
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
    pub ssh_ca: ssh_ca::SshCa,
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

/// Where a call came from: its address, and the address as text.
pub fn source<T>(req: &tonic::Request<T>) -> (std::net::IpAddr, String) {
    match req.remote_addr() {
        Some(a) => (a.ip(), a.to_string()),
        None => (std::net::IpAddr::from([0, 0, 0, 0]), "unknown".into()),
    }
}

/// A login that succeeded: who, and the access token issued.
pub struct LoggedIn {
    pub who: Principal,
    pub token: String,
    pub expires_ms: i64,
}

impl Identities {
    /// Seals a value (login state, relay state) so only this cluster can
    /// read it back.
    pub fn seal_json<T: serde::Serialize>(
        &self,
        purpose: &str,
        v: &T,
    ) -> Result<String, serde_json::Error> {
        let json = serde_json::to_vec(v)?;
        Ok(self.kek.seal(purpose, self.cluster.random_nonce(), &json))
    }

    /// What [`Self::seal_json`] sealed; `None` for anything else.
    pub fn open_json<T: serde::de::DeserializeOwned>(
        &self,
        purpose: &str,
        sealed: &str,
    ) -> Option<T> {
        let plain = self.kek.open(purpose, sealed).ok()?;
        serde_json::from_slice(&plain).ok()
    }

    /// A refused login: audited (`identity` or "anonymous", with `detail`),
    /// counted against the source and `throttle_key`, and answered only
    /// after the delay the throttle asks. `Err` when the refusal could not
    /// be made durable.
    pub async fn refused(
        &self,
        ip: std::net::IpAddr,
        identity: &str,
        throttle_key: &str,
        detail: String,
    ) -> Result<(), ()> {
        let mut ev = self.cluster.event(
            gatehouse_audit::EventKind::Login,
            gatehouse_audit::Decision::Deny,
            if identity.is_empty() {
                "anonymous"
            } else {
                identity
            },
            "",
            "",
        );
        ev.detail = Some(detail);
        self.cluster.audit(ev).await.map_err(|_| ())?;
        let delay = self
            .throttle
            .failed(ip, throttle_key, std::time::Instant::now());
        tokio::time::sleep(delay).await;
        Ok(())
    }

    /// A login that held: records the person (when one logged in), adds
    /// static groups, issues the access token, and audits the login (`how`
    /// says which flow and from where). Fails closed: no token without its
    /// audit event.
    pub async fn logged_in(
        &self,
        ip: std::net::IpAddr,
        how: &str,
        who: Principal,
        user: Option<gatehouse_cp_raft::identity::User>,
    ) -> Result<LoggedIn, String> {
        if let Some(u) = user {
            self.cluster
                .propose(gatehouse_cp_raft::Command::UserLoggedIn { user: Box::new(u) })
                .await
                .map_err(|e| e.to_string())?;
        }
        let who = who.with_static_groups(&self.cluster);
        let (token, expires_ms) = self.tokens.issue(&who).map_err(|e| e.to_string())?;
        self.audit_issued(&who, format!("{how}; token valid until {expires_ms} ms"))
            .await
            .map_err(|()| "the login could not be audited; try again".to_string())?;
        self.throttle.succeeded(ip);
        Ok(LoggedIn {
            who,
            token,
            expires_ms,
        })
    }

    /// A credential issued to `who` (a token, an SSH certificate): a `login`
    /// allow event saying what, durable before the credential is handed out.
    pub async fn audit_issued(&self, who: &Principal, detail: String) -> Result<(), ()> {
        let mut ev = self.cluster.event(
            gatehouse_audit::EventKind::Login,
            gatehouse_audit::Decision::Allow,
            &who.identity,
            "",
            "",
        );
        who.stamp(&mut ev);
        ev.detail = Some(detail);
        self.cluster.audit(ev).await.map(|_| ()).map_err(|_| ())
    }

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
