//! Roles on the API: every call is authorized by the caller's roles, and
//! anything not granted is denied (and audited).
//!
//! - `admin`: configuration, and reads of the configuration;
//! - `auditor`: reads everything (sessions, recordings, audit events,
//!   policy versions, configuration) and changes nothing; each read is an
//!   audit event;
//! - `reviewer`: lists and decides access requests within its approver
//!   groups;
//! - `user`: its own sessions, recordings and requests.
//!
//! The bootstrap admin token is break-glass: it may only set up who
//! administers (roles, service accounts, issuers) and keep the cluster
//! running (membership, status); each use is an audit event.

use gatehouse_audit::{Decision, EventKind};
use subtle::ConstantTimeEq;
use tonic::{Request, Status};

use super::{Identities, Principal};
use crate::cluster::Cluster;

/// Identity recorded for calls with the bootstrap admin token.
pub const BREAK_GLASS: &str = "break-glass";

/// An authenticated API caller (put in the request's extensions by the
/// interceptor).
#[derive(Clone, Debug)]
pub struct Caller {
    pub principal: Principal,
    pub break_glass: bool,
}

/// What an authorized call may do.
#[derive(Clone, Debug)]
pub struct Authz {
    pub actor: super::Actor,
    pub roles: Vec<String>,
}

impl Authz {
    pub fn has(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }

    /// Whether the caller sees only its own sessions and requests.
    pub fn own_only(&self) -> bool {
        !self.has("admin") && !self.has("auditor")
    }
}

/// Whether a call changes state or only reads.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Access {
    /// Reads data or configuration (an auditor's is an audit event).
    Read,
    /// Reads only health: status, membership, the state digest (a hash).
    /// Not audited, or comparing nodes' digests would change them.
    Health,
    Write,
}

/// The roles that may make each call (any one of them suffices), and
/// whether break-glass may.
pub fn policy(rpc: &str) -> Option<(&'static [&'static str], Access, bool)> {
    use Access::*;
    const ADMIN: &[&str] = &["admin"];
    const CONFIG_READ: &[&str] = &["admin", "auditor"];
    const EVIDENCE: &[&str] = &["auditor"];
    const OWN: &[&str] = &["admin", "auditor", "user"];
    const OWN_EVIDENCE: &[&str] = &["auditor", "user"];
    const REVIEW_LIST: &[&str] = &["admin", "auditor", "reviewer", "user"];
    const REVIEW: &[&str] = &["reviewer"];
    const KILL: &[&str] = &["admin", "reviewer"];
    const WATCH: &[&str] = &["admin", "auditor", "reviewer"];
    // Any authenticated caller.
    const ANYONE: &[&str] = &[];
    Some(match rpc {
        "CreateServiceAccount" => (ADMIN, Write, true),
        "GrantRole" | "RevokeRole" => (ADMIN, Write, true),
        "PutIssuer" => (ADMIN, Write, true),
        "CreateJoinToken" | "RemoveNode" => (ADMIN, Write, true),
        "CreateTarget"
        | "CreateRule"
        | "ApplyPolicy"
        | "CreateEnrollmentToken"
        | "SetLegalHold"
        | "DeleteIssuer"
        | "AddWorkloadBinding"
        | "SetStaticGroups" => (ADMIN, Write, false),
        "ListRoleGrants" | "ListIssuers" => (CONFIG_READ, Read, true),
        "Status" | "ClusterStatus" => (CONFIG_READ, Health, true),
        "StateDigest" => (CONFIG_READ, Health, false),
        "ListServiceAccounts"
        | "ListTargets"
        | "ListRules"
        | "GetPolicy"
        | "ListPolicies"
        | "ListAgents"
        | "ListUsers" => (CONFIG_READ, Read, false),
        "VerifyRecordings" | "CheckTarget" => (CONFIG_READ, Read, false),
        "ListAuditEvents" => (EVIDENCE, Read, false),
        "ListSessions" => (OWN, Read, false),
        "GetRecording" => (OWN_EVIDENCE, Read, false),
        "ListAccessRequests" => (REVIEW_LIST, Read, false),
        "ReviewAccessRequest" => (REVIEW, Write, false),
        "KillSession" => (KILL, Write, false),
        "WatchSession" => (WATCH, Read, false),
        "DeleteRule" | "RevokeIdentity" => (ADMIN, Write, false),
        "WhoAmI" => (ANYONE, Health, true),
        // A certificate is a credential like the token it is issued for;
        // the access rules still decide every target.
        "IssueSshCertificate" => (ANYONE, Write, false),
        "GetSshSetup" => (ANYONE, Health, false),
        _ => return None,
    })
}

/// A credential the interceptor refused; [`authorize`] audits and
/// throttles it (the interceptor cannot wait for a Raft write).
#[derive(Clone, Debug)]
pub struct Refused(pub String);

/// The interceptor of the Admin and Reviews services: authenticates the
/// bearer (the bootstrap token, an API key or an access token) and keeps
/// the caller, or why it was refused, for [`authorize`].
pub fn authenticate(
    ids: &Identities,
    bootstrap_bearer: &str,
    mut req: Request<()>,
) -> Result<Request<()>, Status> {
    let Some(v) = req
        .metadata()
        .get("authorization")
        .map(|v| v.as_bytes().to_vec())
    else {
        req.extensions_mut()
            .insert(Refused("missing bearer token".into()));
        return Ok(req);
    };
    let caller = if bool::from(v.ct_eq(bootstrap_bearer.as_bytes())) {
        Caller {
            principal: Principal {
                identity: BREAK_GLASS.into(),
                issuer: super::LOCAL_ISSUER.into(),
                ..Default::default()
            },
            break_glass: true,
        }
    } else {
        let cred = std::str::from_utf8(&v)
            .ok()
            .and_then(|s| s.strip_prefix("Bearer "))
            .unwrap_or_default();
        match ids.authenticate(cred) {
            Ok(p) => Caller {
                principal: p,
                break_glass: false,
            },
            Err(super::AuthError::Unavailable(m)) => return Err(Status::unavailable(m)),
            Err(e) => {
                req.extensions_mut().insert(Refused(e.to_string()));
                return Ok(req);
            }
        }
    };
    req.extensions_mut().insert(caller);
    Ok(req)
}

/// Authorizes `rpc` for the request's caller. A refusal is audited and
/// answered PERMISSION_DENIED naming the caller's roles and the ones the
/// call needs; a break-glass use and an auditor's read are audited too.
pub async fn authorize<T>(
    ids: &Identities,
    req: &Request<T>,
    rpc: &'static str,
) -> Result<Authz, Status> {
    let cluster: &Cluster = &ids.cluster;
    let (ip, addr) = super::source(req);
    let Some(caller) = req.extensions().get::<Caller>().cloned() else {
        // A refused credential: audited, throttled, then answered. A source
        // backing off is refused unchecked (a valid credential from it is
        // still served: it is not a guess).
        ids.gate(ip, "API calls").await?;
        let why = req
            .extensions()
            .get::<Refused>()
            .map(|r| r.0.clone())
            .unwrap_or_else(|| "missing bearer token".into());
        let detail = format!("API credential for {rpc} from {addr} refused: {why}");
        if ids.refused(ip, "", "api", detail).await.is_err() {
            return Err(Status::unavailable("the refusal could not be audited"));
        }
        return Err(Status::unauthenticated(why));
    };
    let actor = super::Actor {
        principal: caller.principal.clone(),
        addr: addr.clone(),
    };
    let Some((needs, access, glass_ok)) = policy(rpc) else {
        return Err(Status::permission_denied(format!(
            "{rpc} is not granted to any role"
        )));
    };
    let p = &caller.principal;
    let roles = if caller.break_glass {
        Vec::new()
    } else {
        cluster
            .reader
            .roles_of(&p.identity, &p.groups)
            .map_err(|e| Status::unavailable(e.to_string()))?
    };
    let event = |kind: EventKind, decision: Decision, detail: String| {
        let mut ev = cluster.event(kind, decision, &p.identity, "", "");
        p.stamp(&mut ev);
        ev.detail = Some(detail);
        ev
    };
    let granted = if caller.break_glass {
        glass_ok
    } else {
        needs.is_empty() || roles.iter().any(|r| needs.contains(&r.as_str()))
    };
    if !granted {
        let held = if caller.break_glass {
            "the break-glass admin token, which may only manage roles, service accounts, issuers and membership".to_string()
        } else if roles.is_empty() {
            "no role".to_string()
        } else {
            format!("role {}", roles.join(", "))
        };
        let msg = format!(
            "{} has {held}; {rpc} needs {}",
            p.identity,
            needs.join(" or ")
        );
        let ev = event(
            EventKind::ApiCall,
            Decision::Deny,
            format!("{msg}; from {addr}"),
        );
        cluster
            .audit(ev)
            .await
            .map_err(|_| Status::unavailable("the refusal could not be audited"))?;
        return Err(Status::permission_denied(msg));
    }
    if caller.break_glass {
        let ev = event(
            EventKind::ApiCall,
            Decision::Allow,
            format!("break-glass admin token used for {rpc} from {addr}"),
        );
        cluster.audit(ev).await.map_err(|_| {
            Status::unavailable("the break-glass use could not be audited; refusing")
        })?;
        return Ok(Authz {
            actor,
            roles: vec!["admin".into()],
        });
    }
    if access == Access::Read && roles.iter().any(|r| r == "auditor") {
        let ev = event(
            EventKind::ApiCall,
            Decision::Allow,
            format!("auditor read: {rpc} from {addr}"),
        );
        cluster
            .audit(ev)
            .await
            .map_err(|_| Status::unavailable("the read could not be audited; refusing"))?;
    }
    Ok(Authz { actor, roles })
}
