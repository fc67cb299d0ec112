//! Admin calls for identities: trusted issuers, workload bindings, people,
//! static groups and role grants.

use gatehouse_cp_raft::Command;
use gatehouse_cp_raft::identity as id;
use gatehouse_proto::v1::*;
use tonic::{Request, Response, Status};

use crate::api::{AdminService, ApiError, valid_name};
use crate::cluster::now_ms;
use crate::identity::roles::Authz;

/// Roles of the API.
pub const ROLES: [&str; 4] = ["admin", "auditor", "reviewer", "user"];

fn issuer_proto(i: id::Issuer) -> Issuer {
    Issuer {
        has_client_secret: !i.client_secret_sealed.is_empty(),
        name: i.name,
        kind: i.kind,
        issuer_url: i.issuer_url,
        client_id: i.client_id,
        client_secret: String::new(),
        groups_claim: i.groups_claim,
        algorithms: i.algorithms,
        audiences: i.audiences,
        scopes: i.scopes,
        created_ms: i.created_ms,
        metadata_xml: i.metadata_xml,
        metadata_url: i.metadata_url,
    }
}

pub fn binding_proto(b: id::WorkloadBinding) -> WorkloadBinding {
    WorkloadBinding {
        issuer: b.issuer,
        subject: b.subject,
        audience: b.audience,
        claims: b.claims.into_iter().collect(),
    }
}

/// `user:<issuer>/<subject>`, `sa:<name>` or `group:<name>`.
pub fn valid_principal(p: &str, allow_group: bool) -> Result<(), ApiError> {
    let ok = if let Some(rest) = p.strip_prefix("user:") {
        rest.split_once('/').is_some_and(|(iss, sub)| {
            valid_name("issuer", iss).is_ok()
                && !sub.is_empty()
                && sub.len() <= 255
                && !sub.chars().any(char::is_control)
        })
    } else if let Some(n) = p.strip_prefix("sa:") {
        valid_name("service account", n).is_ok()
    } else if let Some(n) = p.strip_prefix("group:") {
        allow_group && valid_name("group", n).is_ok()
    } else {
        false
    };
    if ok {
        Ok(())
    } else {
        Err(ApiError::InvalidArgument(format!(
            "{p:?} must be user:<issuer>/<subject>, sa:<name>{}",
            if allow_group { " or group:<name>" } else { "" }
        )))
    }
}

impl AdminService {
    pub(crate) async fn do_put_issuer(
        &self,
        req: Request<PutIssuerRequest>,
        authz: Authz,
    ) -> Result<Response<Issuer>, Status> {
        let actor = authz.actor;
        let Some(mut i) = req.into_inner().issuer else {
            return Err(ApiError::InvalidArgument("issuer is required".into()).into());
        };
        valid_name("issuer", &i.name)?;
        let kind = if i.kind.is_empty() {
            "oidc".to_string()
        } else {
            i.kind.clone()
        };
        let url = match kind.as_str() {
            "oidc" => {
                if i.client_id.is_empty() {
                    return Err(ApiError::InvalidArgument("client_id is required".into()).into());
                }
                url_ok(&i.issuer_url)?
            }
            "saml" => {
                if i.metadata_xml.is_empty() && !i.metadata_url.is_empty() {
                    let url = url_ok(&i.metadata_url)?;
                    let body = self.ids.providers.get(&url).await.map_err(|e| {
                        ApiError::Unavailable(format!("fetching the SAML metadata from {url}: {e}"))
                    })?;
                    i.metadata_xml = String::from_utf8(body).map_err(|_| {
                        ApiError::InvalidArgument(format!(
                            "the SAML metadata at {url} is not UTF-8"
                        ))
                    })?;
                }
                let md: samael::metadata::EntityDescriptor =
                    i.metadata_xml.parse().map_err(|e| {
                        ApiError::InvalidArgument(format!("the SAML metadata does not parse: {e}"))
                    })?;
                md.entity_id.ok_or_else(|| {
                    ApiError::InvalidArgument("the SAML metadata names no entityID".into())
                })?
            }
            other => {
                return Err(ApiError::InvalidArgument(format!(
                    "issuer kind {other:?} is not supported (supported: oidc, saml)"
                ))
                .into());
            }
        };
        crate::identity::oidc::algorithms(&i.algorithms).map_err(ApiError::InvalidArgument)?;
        let sealed = if i.client_secret.is_empty() {
            // Keep the secret already stored when none is given.
            self.cluster
                .reader
                .issuer(&i.name)
                .map_err(ApiError::from)?
                .map(|old| old.client_secret_sealed)
                .unwrap_or_default()
        } else {
            self.ids.kek.seal(
                &crate::identity::service::secret_purpose(&i.name),
                self.cluster.random_nonce(),
                i.client_secret.as_bytes(),
            )
        };
        let rec = id::Issuer {
            name: i.name,
            kind,
            issuer_url: url,
            client_id: i.client_id,
            client_secret_sealed: sealed,
            groups_claim: if i.groups_claim.is_empty() {
                "groups".into()
            } else {
                i.groups_claim
            },
            algorithms: if i.algorithms.is_empty() {
                vec!["RS256".into(), "ES256".into()]
            } else {
                i.algorithms
            },
            audiences: i.audiences,
            scopes: i.scopes,
            created_ms: now_ms(),
            metadata_xml: i.metadata_xml,
            metadata_url: i.metadata_url,
        };
        self.cluster
            .propose_audited(
                &actor,
                Command::PutIssuer {
                    issuer: Box::new(rec.clone()),
                },
            )
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(issuer_proto(rec)))
    }

    pub(crate) async fn do_list_issuers(&self) -> Result<Response<ListIssuersResponse>, Status> {
        let issuers = self
            .cluster
            .reader
            .issuers()
            .map_err(ApiError::from)?
            .into_iter()
            .map(issuer_proto)
            .collect();
        Ok(Response::new(ListIssuersResponse { issuers }))
    }

    pub(crate) async fn do_delete_issuer(
        &self,
        req: Request<DeleteIssuerRequest>,
        authz: Authz,
    ) -> Result<Response<Issuer>, Status> {
        let actor = authz.actor;
        let name = req.into_inner().name;
        let Some(old) = self.cluster.reader.issuer(&name).map_err(ApiError::from)? else {
            return Err(ApiError::NotFound(format!("issuer {name} not found")).into());
        };
        self.cluster
            .propose_audited(&actor, Command::DeleteIssuer { name })
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(issuer_proto(old)))
    }

    pub(crate) async fn do_add_workload_binding(
        &self,
        req: Request<AddWorkloadBindingRequest>,
        authz: Authz,
    ) -> Result<Response<ServiceAccount>, Status> {
        let actor = authz.actor;
        let req = req.into_inner();
        let Some(b) = req.binding else {
            return Err(ApiError::InvalidArgument("binding is required".into()).into());
        };
        if b.subject.is_empty() || b.audience.is_empty() {
            return Err(ApiError::InvalidArgument(
                "a binding needs a subject pattern and an audience".into(),
            )
            .into());
        }
        let mut claims: Vec<(String, String)> = b.claims.into_iter().collect();
        claims.sort();
        let rec = id::WorkloadBinding {
            issuer: b.issuer,
            subject: b.subject,
            audience: b.audience,
            claims,
        };
        self.cluster
            .propose_audited(
                &actor,
                Command::AddWorkloadBinding {
                    service_account: req.service_account.clone(),
                    binding: Box::new(rec),
                },
            )
            .await
            .map_err(ApiError::from)?;
        let sa = self
            .cluster
            .reader
            .service_account(&req.service_account)
            .map_err(ApiError::from)?
            .ok_or_else(|| {
                ApiError::NotFound(format!("service account {} not found", req.service_account))
            })?;
        Ok(Response::new(self.sa_proto(sa)))
    }

    pub(crate) async fn do_list_users(&self) -> Result<Response<ListUsersResponse>, Status> {
        let reader = &self.cluster.reader;
        let users = reader
            .users()
            .map_err(ApiError::from)?
            .into_iter()
            .map(|u| User {
                static_groups: reader.static_groups(&u.identity).unwrap_or_default(),
                identity: u.identity,
                issuer: u.issuer,
                subject: u.subject,
                email: u.email,
                groups: u.groups,
                last_login_ms: u.last_login_ms,
            })
            .collect();
        Ok(Response::new(ListUsersResponse { users }))
    }

    pub(crate) async fn do_set_static_groups(
        &self,
        req: Request<SetStaticGroupsRequest>,
        authz: Authz,
    ) -> Result<Response<StaticGroups>, Status> {
        let actor = authz.actor;
        let req = req.into_inner();
        valid_principal(&req.identity, false)?;
        for g in &req.groups {
            valid_name("group", g)?;
        }
        self.cluster
            .propose_audited(
                &actor,
                Command::SetStaticGroups {
                    identity: req.identity.clone(),
                    groups: req.groups.clone(),
                },
            )
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(StaticGroups {
            identity: req.identity,
            groups: req.groups,
        }))
    }

    pub(crate) async fn do_grant_role(
        &self,
        req: Request<RoleGrant>,
        grant: bool,
        authz: Authz,
    ) -> Result<Response<RoleGrant>, Status> {
        let actor = authz.actor;
        let g = req.into_inner();
        if !ROLES.contains(&g.role.as_str()) {
            return Err(ApiError::InvalidArgument(format!(
                "unknown role {:?} (roles: {})",
                g.role,
                ROLES.join(", ")
            ))
            .into());
        }
        valid_principal(&g.principal, true)?;
        let created_ms = now_ms();
        let cmd = if grant {
            Command::GrantRole {
                grant: id::RoleGrant {
                    role: g.role.clone(),
                    principal: g.principal.clone(),
                    created_ms,
                },
            }
        } else {
            Command::RevokeRole {
                role: g.role.clone(),
                principal: g.principal.clone(),
            }
        };
        self.cluster
            .propose_audited(&actor, cmd)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(RoleGrant { created_ms, ..g }))
    }

    pub(crate) async fn do_list_role_grants(
        &self,
    ) -> Result<Response<ListRoleGrantsResponse>, Status> {
        let grants = self
            .cluster
            .reader
            .role_grants()
            .map_err(ApiError::from)?
            .into_iter()
            .map(|g| RoleGrant {
                role: g.role,
                principal: g.principal,
                created_ms: g.created_ms,
            })
            .collect();
        Ok(Response::new(ListRoleGrantsResponse { grants }))
    }
}

fn url_ok(u: &str) -> Result<String, ApiError> {
    let ok = (u.starts_with("https://")
        || u.starts_with("http://127.")
        || u.starts_with("http://localhost")
        || u.starts_with("http://[::1]"))
        && openidconnect::IssuerUrl::new(u.to_string()).is_ok();
    if ok {
        Ok(u.to_string())
    } else {
        Err(ApiError::InvalidArgument(format!(
            "issuer URL {u:?} must be https:// (plain http only on loopback)"
        )))
    }
}
