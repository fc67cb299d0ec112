//! The admin and auditor gRPC API.

use std::sync::Arc;

use gatehouse_audit::{Decision, EventKind};
use gatehouse_cp_raft::read::AuditFilter;
use gatehouse_cp_raft::state::{self, SessionRecord};
use gatehouse_cp_raft::{Command, Rejection};
use gatehouse_proto::v1::admin_server::{Admin, AdminServer};
use gatehouse_proto::v1::*;
use tonic::{Request, Response, Status};

use crate::TlsChain;
use crate::cluster::{Cluster, ProposeError, now_ms};
use crate::tunnel::AgentRegistry;

/// Why an API call failed; each maps to one gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("not the leader; retry at {leader:?}")]
    NotLeader { leader: Option<String> },
    #[error("{0}")]
    Unavailable(String),
    /// The call may or may not have taken effect.
    #[error("{0}")]
    OutcomeUnknown(String),
    #[error("{0}")]
    Internal(String),
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::InvalidArgument(m) => Status::invalid_argument(m),
            ApiError::NotFound(m) => Status::not_found(m),
            ApiError::AlreadyExists(m) => Status::already_exists(m),
            ApiError::NotLeader { leader } => Status::unavailable(format!(
                "not the leader; leader is {}",
                leader.unwrap_or_else(|| "unknown".into())
            )),
            ApiError::Unavailable(m) => Status::unavailable(m),
            ApiError::OutcomeUnknown(m) => Status::deadline_exceeded(m),
            ApiError::Internal(m) => Status::internal(m),
        }
    }
}

impl From<ProposeError> for ApiError {
    fn from(e: ProposeError) -> Self {
        match e {
            ProposeError::ForwardToLeader { leader } => ApiError::NotLeader { leader },
            e @ ProposeError::NoQuorum => ApiError::Unavailable(e.to_string()),
            e @ ProposeError::OutcomeUnknown(_) => ApiError::OutcomeUnknown(e.to_string()),
            ProposeError::Raft(m) => ApiError::Internal(m),
            ProposeError::Rejected(Rejection::AlreadyExists(m)) => {
                ApiError::AlreadyExists(format!("{m} already exists"))
            }
            ProposeError::Rejected(Rejection::NotFound(m)) => {
                ApiError::NotFound(format!("{m} not found"))
            }
            ProposeError::Rejected(r) => ApiError::InvalidArgument(r.to_string()),
        }
    }
}

impl From<gatehouse_cp_raft::read::ReadError> for ApiError {
    fn from(e: gatehouse_cp_raft::read::ReadError) -> Self {
        ApiError::Internal(e.to_string())
    }
}

type ApiResult<T> = Result<Response<T>, Status>;

/// Largest policy document accepted (it travels in every SessionOpen).
const MAX_POLICY_BYTES: usize = 256 << 10;

fn policy_doc(p: state::PolicyRecord, policy_version: String) -> PolicyDocument {
    PolicyDocument {
        seq: p.seq,
        doc_version: p.doc_version,
        yaml: p.yaml,
        canonical: p.canonical,
        author: p.author,
        applied_ms: p.applied_ms,
        policy_version,
        unchanged: false,
    }
}

fn req_name(r: &GetPolicyRequest) -> String {
    if r.doc_version.is_empty() {
        format!("#{}", r.seq)
    } else {
        r.doc_version.clone()
    }
}

/// The service implementation.
pub struct AdminService {
    pub(crate) cluster: Arc<Cluster>,
    agents: AgentRegistry,
    recordings: Arc<crate::recordings::Recordings>,
    ca_fingerprint: String,
    pub(crate) ids: Arc<crate::identity::Identities>,
    /// The SSH ingress's port and names, for `gatehouse ssh config`.
    pub(crate) ssh: crate::identity::ssh_admin::SshIngress,
}

/// The services of the API port.
pub struct Services {
    pub admin: AdminService,
    pub join: crate::peer::JoinService,
    pub reviews: crate::approvals::ReviewsService,
    pub identity: crate::identity::service::IdentityService,
    pub saml: std::sync::Arc<crate::identity::saml::Saml>,
}

/// Serves the API with TLS until the process exits.
pub async fn serve(
    listener: tokio::net::TcpListener,
    services: Services,
    admin_token: String,
    chain: TlsChain,
    limits: std::sync::Arc<crate::limits::ConnLimits>,
) {
    let Services {
        admin: svc,
        join,
        reviews,
        identity,
        saml,
    } = services;
    let expected = format!("Bearer {admin_token}");
    let auth = {
        let ids = svc.ids.clone();
        let bearer = expected.clone();
        move |req: Request<()>| crate::identity::roles::authenticate(&ids, &bearer, req)
    };
    let review_auth = auth.clone();
    let acceptor = match crate::tls_listener::acceptor(&chain.cert_pem, &chain.key_pem, None) {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "API TLS configuration failed");
            return;
        }
    };
    let incoming = crate::tls_listener::incoming("api", listener, acceptor, limits);
    let mut server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        // Browsers reach the SAML routes over HTTP/1.1 as well.
        .accept_http1(true);
    let web = tonic::service::Routes::from(crate::identity::saml::router(saml));
    if let Err(e) = server
        .add_routes(web)
        .add_service(AdminServer::with_interceptor(svc, auth))
        .add_service(
            gatehouse_proto::v1::reviews_server::ReviewsServer::with_interceptor(
                reviews,
                review_auth,
            ),
        )
        .add_service(gatehouse_proto::cluster::join_server::JoinServer::new(join))
        .add_service(gatehouse_proto::v1::identity_server::IdentityServer::new(
            identity,
        ))
        .serve_with_incoming(incoming)
        .await
    {
        tracing::error!(error = %e, "API server failed");
    }
}

pub(crate) fn valid_name(kind: &str, name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(ApiError::InvalidArgument(format!(
            "{kind} name {name:?} must be 1-63 letters, digits, '-' or '_'"
        )))
    }
}

fn session_proto(s: SessionRecord) -> Session {
    Session {
        id: s.id,
        identity: s.identity,
        target: s.target,
        agent: s.agent,
        database: s.database,
        db_user: s.db_user,
        client_addr: s.client_addr,
        started_ms: s.started_ms,
        ended_ms: s.ended_ms.unwrap_or(0),
        end_reason: s.end_reason.unwrap_or_default(),
        recording_key: s.recording_key.unwrap_or_default(),
        recording_sha256: s.recording_sha256.unwrap_or_default(),
        recording_size: s.recording_size.unwrap_or(0),
        policy_version: s.policy_version,
        chunk_keys: s.chunk_keys,
        recording_events: s.recording_events,
        legal_hold: s.legal_hold.is_some(),
        legal_hold_reason: s.legal_hold.unwrap_or_default(),
        recording_deleted_ms: s.recording_deleted_ms.unwrap_or(0),
        node: s.node,
    }
}

fn rule_proto(r: state::Rule) -> Rule {
    Rule {
        id: r.id,
        subject: r.subject,
        target: r.target,
        created_ms: r.created_ms,
        max_session_secs: r.max_session_secs.unwrap_or(0),
        idle_timeout_secs: r.idle_timeout_secs.unwrap_or(0),
    }
}

// === impl AdminService ===

impl AdminService {
    async fn allow<T>(
        &self,
        req: &Request<T>,
        rpc: &'static str,
    ) -> Result<crate::identity::roles::Authz, Status> {
        crate::identity::roles::authorize(&self.ids, req, rpc).await
    }

    pub(crate) fn sa_proto(&self, a: state::ServiceAccount) -> ServiceAccount {
        let bindings = self
            .cluster
            .reader
            .workload_bindings(&a.name)
            .unwrap_or_default()
            .into_iter()
            .map(crate::identity::admin::binding_proto)
            .collect();
        ServiceAccount {
            name: a.name,
            groups: a.groups,
            created_ms: a.created_ms,
            key_ids: a.keys.into_iter().map(|k| k.key_id).collect(),
            bindings,
        }
    }

    fn session(&self, id: &str) -> Result<SessionRecord, ApiError> {
        self.cluster
            .reader
            .session(id)
            .map_err(ApiError::from)?
            .ok_or_else(|| ApiError::NotFound(format!("session {id} not found")))
    }

    pub fn new(
        cluster: Arc<Cluster>,
        agents: AgentRegistry,
        recordings: Arc<crate::recordings::Recordings>,
        ca_pem: &str,
        ids: Arc<crate::identity::Identities>,
        ssh: crate::identity::ssh_admin::SshIngress,
    ) -> Self {
        Self {
            cluster,
            agents,
            recordings,
            ca_fingerprint: gatehouse_pki::fingerprint_pem(ca_pem).unwrap_or_default(),
            ids,
            ssh,
        }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn issue_ssh_certificate(
        &self,
        req: Request<IssueSshCertificateRequest>,
    ) -> ApiResult<IssueSshCertificateResponse> {
        let authz = self.allow(&req, "IssueSshCertificate").await?;
        self.do_issue_ssh_certificate(req, authz).await
    }

    async fn get_ssh_setup(&self, req: Request<ListRequest>) -> ApiResult<SshSetup> {
        let authz = self.allow(&req, "GetSshSetup").await?;
        self.do_get_ssh_setup(authz).await
    }

    async fn put_issuer(&self, req: Request<PutIssuerRequest>) -> ApiResult<Issuer> {
        let authz = self.allow(&req, "PutIssuer").await?;
        self.do_put_issuer(req, authz).await
    }

    async fn list_issuers(&self, req: Request<ListRequest>) -> ApiResult<ListIssuersResponse> {
        self.allow(&req, "ListIssuers").await?;
        self.do_list_issuers().await
    }

    async fn delete_issuer(&self, req: Request<DeleteIssuerRequest>) -> ApiResult<Issuer> {
        let authz = self.allow(&req, "DeleteIssuer").await?;
        self.do_delete_issuer(req, authz).await
    }

    async fn add_workload_binding(
        &self,
        req: Request<AddWorkloadBindingRequest>,
    ) -> ApiResult<ServiceAccount> {
        let authz = self.allow(&req, "AddWorkloadBinding").await?;
        self.do_add_workload_binding(req, authz).await
    }

    async fn list_users(&self, req: Request<ListRequest>) -> ApiResult<ListUsersResponse> {
        self.allow(&req, "ListUsers").await?;
        self.do_list_users().await
    }

    async fn set_static_groups(
        &self,
        req: Request<SetStaticGroupsRequest>,
    ) -> ApiResult<StaticGroups> {
        let authz = self.allow(&req, "SetStaticGroups").await?;
        self.do_set_static_groups(req, authz).await
    }

    async fn grant_role(&self, req: Request<RoleGrant>) -> ApiResult<RoleGrant> {
        let authz = self.allow(&req, "GrantRole").await?;
        self.do_grant_role(req, true, authz).await
    }

    async fn revoke_role(&self, req: Request<RoleGrant>) -> ApiResult<RoleGrant> {
        let authz = self.allow(&req, "RevokeRole").await?;
        self.do_grant_role(req, false, authz).await
    }

    async fn list_role_grants(
        &self,
        req: Request<ListRequest>,
    ) -> ApiResult<ListRoleGrantsResponse> {
        self.allow(&req, "ListRoleGrants").await?;
        self.do_list_role_grants().await
    }

    async fn who_am_i(&self, req: Request<ListRequest>) -> ApiResult<WhoAmIResponse> {
        let authz = self.allow(&req, "WhoAmI").await?;
        let p = authz.actor.principal;
        let roles = self
            .cluster
            .reader
            .roles_of(&p.identity, &p.groups)
            .map_err(ApiError::from)?;
        Ok(Response::new(WhoAmIResponse {
            break_glass: p.identity == crate::identity::roles::BREAK_GLASS,
            identity: p.identity,
            issuer: p.issuer,
            groups: p.groups,
            roles,
        }))
    }

    async fn create_service_account(
        &self,
        req: Request<CreateServiceAccountRequest>,
    ) -> ApiResult<CreateServiceAccountResponse> {
        let authz = self.allow(&req, "CreateServiceAccount").await?;
        let actor = authz.actor.clone();
        let req = req.into_inner();
        valid_name("service account", &req.name)?;
        for g in &req.groups {
            valid_name("group", g)?;
        }
        let key_id = self.cluster.new_secret(4);
        let secret = self.cluster.new_secret(24);
        let now = now_ms();
        self.cluster
            .propose_audited(
                &actor,
                Command::CreateServiceAccount {
                    name: req.name.clone(),
                    groups: req.groups.clone(),
                    key_id: key_id.clone(),
                    key_sha256: state::sha256_hex(secret.as_bytes()),
                    now_ms: now,
                },
            )
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(CreateServiceAccountResponse {
            account: Some(ServiceAccount {
                name: req.name,
                groups: req.groups,
                created_ms: now,
                key_ids: vec![key_id.clone()],
                bindings: Vec::new(),
            }),
            api_key: format!("ghk_{key_id}_{secret}"),
        }))
    }

    async fn list_service_accounts(
        &self,
        req: Request<ListRequest>,
    ) -> ApiResult<ListServiceAccountsResponse> {
        self.allow(&req, "ListServiceAccounts").await?;
        let accounts = self
            .cluster
            .reader
            .service_accounts()
            .map_err(ApiError::from)?
            .into_iter()
            .map(|a| self.sa_proto(a))
            .collect();
        Ok(Response::new(ListServiceAccountsResponse { accounts }))
    }

    async fn create_target(&self, req: Request<CreateTargetRequest>) -> ApiResult<Target> {
        let authz = self.allow(&req, "CreateTarget").await?;
        let actor = authz.actor.clone();
        let req = req.into_inner();
        valid_name("target", &req.name)?;
        valid_name("agent", &req.agent)?;
        let kind = if req.kind.is_empty() {
            "postgres".to_string()
        } else {
            req.kind
        };
        if kind != "postgres" && kind != "ssh" {
            return Err(ApiError::InvalidArgument(format!(
                "target kind {kind:?} is not supported (supported: postgres, ssh)"
            ))
            .into());
        }
        let target = state::Target {
            name: req.name,
            kind,
            agent: req.agent,
            default_db_user: req.default_db_user,
            created_ms: now_ms(),
        };
        self.cluster
            .propose_audited(
                &actor,
                Command::CreateTarget {
                    target: target.clone(),
                },
            )
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(self.target_proto(target)))
    }

    async fn list_targets(&self, req: Request<ListRequest>) -> ApiResult<ListTargetsResponse> {
        self.allow(&req, "ListTargets").await?;
        let targets = self
            .cluster
            .reader
            .targets()
            .map_err(ApiError::from)?
            .into_iter()
            .map(|t| self.target_proto(t))
            .collect();
        Ok(Response::new(ListTargetsResponse { targets }))
    }

    async fn create_rule(&self, req: Request<CreateRuleRequest>) -> ApiResult<Rule> {
        let authz = self.allow(&req, "CreateRule").await?;
        let actor = authz.actor.clone();
        let req = req.into_inner();
        crate::identity::admin::valid_principal(&req.subject, true)?;
        let rule = state::Rule {
            id: self.cluster.new_secret(8),
            subject: req.subject,
            target: req.target,
            created_ms: now_ms(),
            max_session_secs: (req.max_session_secs > 0).then_some(req.max_session_secs),
            idle_timeout_secs: (req.idle_timeout_secs > 0).then_some(req.idle_timeout_secs),
        };
        self.cluster
            .propose_audited(&actor, Command::CreateRule { rule: rule.clone() })
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(rule_proto(rule)))
    }

    async fn check_target(
        &self,
        req: Request<CheckTargetRequest>,
    ) -> ApiResult<CheckTargetResponse> {
        self.allow(&req, "CheckTarget").await?;
        let req = req.into_inner();
        let t = self
            .cluster
            .reader
            .target(&req.target)
            .map_err(ApiError::from)?
            .ok_or_else(|| ApiError::NotFound(format!("target {} not found", req.target)))?;
        let database = if req.database.is_empty() {
            "postgres".to_string()
        } else {
            req.database
        };
        let c =
            crate::ingress::check_target(&self.cluster, &self.agents, &t.agent, &t.name, &database)
                .await
                .map_err(ApiError::Unavailable)?;
        if !c.error.is_empty() {
            return Err(ApiError::Unavailable(format!("target {}: {}", t.name, c.error)).into());
        }
        Ok(Response::new(CheckTargetResponse {
            target: t.name,
            role: c.role,
            beyond_reads: c.beyond_reads,
        }))
    }

    async fn delete_rule(&self, req: Request<DeleteRuleRequest>) -> ApiResult<DeleteRuleResponse> {
        let authz = self.allow(&req, "DeleteRule").await?;
        let actor = authz.actor.clone();
        let id = req.into_inner().id;
        let rule = self
            .cluster
            .reader
            .rules()
            .map_err(ApiError::from)?
            .into_iter()
            .find(|r| r.id == id)
            .ok_or_else(|| ApiError::NotFound(format!("access rule {id} not found")))?;
        self.cluster
            .propose_audited(&actor, Command::DeleteRule { id: id.clone() })
            .await
            .map_err(ApiError::from)?;
        // Judge the running sessions on the rules as they now are.
        self.cluster.linearizable().await.map_err(ApiError::from)?;
        let reader = &self.cluster.reader;
        let unadmitted: Vec<_> = crate::sessions::running(&self.cluster)?
            .into_iter()
            .filter(|s| {
                !reader
                    .is_allowed(&s.identity, &s.groups, &s.target)
                    .unwrap_or(false)
            })
            .collect();
        let why = format!(
            "access rule {id} ({} may use {}) removed by {}",
            rule.subject, rule.target, actor.principal.identity
        );
        let ended = crate::sessions::end_all(
            &self.cluster,
            &self.agents,
            &unadmitted,
            &why,
            &format!("from {}", actor.addr),
        )
        .await;
        Ok(Response::new(DeleteRuleResponse {
            rule: Some(rule_proto(rule)),
            sessions_ended: ended,
        }))
    }

    async fn revoke_identity(
        &self,
        req: Request<RevokeIdentityRequest>,
    ) -> ApiResult<RevokeIdentityResponse> {
        let authz = self.allow(&req, "RevokeIdentity").await?;
        let actor = authz.actor.clone();
        let req = req.into_inner();
        crate::identity::admin::valid_principal(&req.identity, false)?;
        if req.reason.trim().is_empty() {
            return Err(
                ApiError::InvalidArgument("a revocation needs a reason (--reason)".into()).into(),
            );
        }
        let at_ms = now_ms();
        self.cluster
            .propose_audited(
                &actor,
                Command::RevokeIdentity {
                    identity: req.identity.clone(),
                    at_ms,
                    reason: req.reason.trim().to_string(),
                    key_id: (!req.key_id.is_empty()).then(|| req.key_id.clone()),
                },
            )
            .await
            .map_err(ApiError::from)?;
        self.cluster.linearizable().await.map_err(ApiError::from)?;
        let theirs: Vec<_> = crate::sessions::running(&self.cluster)?
            .into_iter()
            .filter(|s| s.identity == req.identity)
            .collect();
        // Sessions do not record which key opened them: revoking one key
        // ends all of the account's sessions.
        let what = if req.key_id.is_empty() {
            req.identity.clone()
        } else {
            format!("API key {} of {}", req.key_id, req.identity)
        };
        let why = format!(
            "{what} revoked by {}: {}",
            actor.principal.identity,
            req.reason.trim()
        );
        let ended = crate::sessions::end_all(
            &self.cluster,
            &self.agents,
            &theirs,
            &why,
            &format!("from {}", actor.addr),
        )
        .await;
        Ok(Response::new(RevokeIdentityResponse {
            identity: req.identity,
            revoked_ms: at_ms,
            sessions_ended: ended,
        }))
    }

    async fn list_rules(&self, req: Request<ListRequest>) -> ApiResult<ListRulesResponse> {
        self.allow(&req, "ListRules").await?;
        let reader = &self.cluster.reader;
        let rules = reader
            .rules()
            .map_err(ApiError::from)?
            .into_iter()
            .map(rule_proto)
            .collect();
        Ok(Response::new(ListRulesResponse {
            rules,
            policy_version: reader.policy_version().map_err(ApiError::from)?,
        }))
    }

    async fn apply_policy(&self, req: Request<ApplyPolicyRequest>) -> ApiResult<PolicyDocument> {
        let authz = self.allow(&req, "ApplyPolicy").await?;
        let actor = authz.actor.clone();
        let yaml = req.into_inner().yaml;
        if yaml.len() > MAX_POLICY_BYTES {
            return Err(ApiError::InvalidArgument(format!(
                "policy document is {} bytes; the limit is {MAX_POLICY_BYTES}",
                yaml.len()
            ))
            .into());
        }
        let doc = gatehouse_policy::PolicyDoc::from_yaml(&yaml)
            .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        let doc_version = doc.version();
        let reader = &self.cluster.reader;
        self.cluster.linearizable().await.map_err(ApiError::from)?;
        if let Some(cur) = reader.current_policy().map_err(ApiError::from)?
            && cur.doc_version == doc_version
        {
            let mut out = policy_doc(cur, reader.policy_version().map_err(ApiError::from)?);
            out.unchanged = true;
            return Ok(Response::new(out));
        }
        let record = state::PolicyRecord {
            seq: 0,
            doc_version,
            yaml,
            canonical: doc.canonical(),
            author: actor.principal.identity.clone(),
            applied_ms: now_ms(),
        };
        match self
            .cluster
            .propose_audited(
                &actor,
                Command::ApplyPolicy {
                    policy: Box::new(record),
                },
            )
            .await
        {
            Ok(_) | Err(ProposeError::Rejected(Rejection::Unchanged(_))) => {}
            Err(e) => return Err(ApiError::from(e).into()),
        }
        // Committed, but on a follower perhaps not applied here yet.
        self.cluster.linearizable().await.map_err(ApiError::from)?;
        let cur = reader
            .current_policy()
            .map_err(ApiError::from)?
            .ok_or_else(|| ApiError::Internal("applied policy not found".into()))?;
        let version = reader.policy_version().map_err(ApiError::from)?;
        if doc.enforce == gatehouse_policy::Enforce::Immediate {
            crate::sessions::enforce_immediately(
                &self.cluster,
                &self.agents,
                &cur.canonical,
                &version,
                &format!(
                    "applied by {} from {}",
                    actor.principal.identity, actor.addr
                ),
            )
            .await?;
        }
        Ok(Response::new(policy_doc(cur, version)))
    }

    async fn get_policy(&self, req: Request<GetPolicyRequest>) -> ApiResult<PolicyDocument> {
        self.allow(&req, "GetPolicy").await?;
        let req = req.into_inner();
        let reader = &self.cluster.reader;
        let found = if req.seq == 0 && req.doc_version.is_empty() {
            reader.current_policy().map_err(ApiError::from)?
        } else {
            reader
                .policy_history()
                .map_err(ApiError::from)?
                .into_iter()
                .rev()
                .find(|p| {
                    (req.seq == 0 || p.seq == req.seq)
                        && (req.doc_version.is_empty() || p.doc_version == req.doc_version)
                })
        };
        let p = found.ok_or_else(|| {
            ApiError::NotFound(if req.seq == 0 && req.doc_version.is_empty() {
                "no policy document has been applied".into()
            } else {
                format!("policy {} not found", req_name(&req))
            })
        })?;
        Ok(Response::new(policy_doc(
            p,
            reader.policy_version().map_err(ApiError::from)?,
        )))
    }

    async fn list_policies(&self, req: Request<ListRequest>) -> ApiResult<ListPoliciesResponse> {
        self.allow(&req, "ListPolicies").await?;
        let reader = &self.cluster.reader;
        let version = reader.policy_version().map_err(ApiError::from)?;
        let policies = reader
            .policy_history()
            .map_err(ApiError::from)?
            .into_iter()
            .map(|p| policy_doc(p, version.clone()))
            .collect();
        Ok(Response::new(ListPoliciesResponse { policies }))
    }

    async fn create_enrollment_token(
        &self,
        req: Request<CreateEnrollmentTokenRequest>,
    ) -> ApiResult<CreateEnrollmentTokenResponse> {
        let authz = self.allow(&req, "CreateEnrollmentToken").await?;
        let actor = authz.actor.clone();
        let req = req.into_inner();
        valid_name("agent", &req.agent)?;
        let ttl = match req.ttl_seconds {
            0 => 3600,
            t if t > 7 * 86_400 => {
                return Err(ApiError::InvalidArgument(
                    "enrollment tokens live at most 7 days".into(),
                )
                .into());
            }
            t => t as i64,
        };
        let secret = format!("ghe_{}", self.cluster.new_secret(24));
        let now = now_ms();
        let expires_ms = now + ttl * 1000;
        self.cluster
            .propose_audited(
                &actor,
                Command::CreateEnrollmentToken {
                    token_sha256: state::sha256_hex(secret.as_bytes()),
                    agent: req.agent,
                    expires_ms,
                    now_ms: now,
                },
            )
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(CreateEnrollmentTokenResponse {
            token: format!("{secret}.{}", self.ca_fingerprint),
            expires_ms,
        }))
    }

    async fn list_agents(&self, req: Request<ListRequest>) -> ApiResult<ListAgentsResponse> {
        self.allow(&req, "ListAgents").await?;
        let agents = self
            .cluster
            .reader
            .agents()
            .map_err(ApiError::from)?
            .into_iter()
            .map(|a| {
                let live = self.agents.get(&a.name);
                Agent {
                    connected: live.is_some(),
                    last_seen_ms: live
                        .as_ref()
                        .map(|c| c.last_seen_ms.load(std::sync::atomic::Ordering::Relaxed))
                        .unwrap_or(0),
                    version: live.as_ref().map(|c| c.version.clone()).unwrap_or_default(),
                    targets: live.map(|c| c.targets).unwrap_or_default(),
                    name: a.name,
                    cert_serial: a.cert_serial,
                    enrolled_ms: a.enrolled_ms,
                }
            })
            .collect();
        Ok(Response::new(ListAgentsResponse { agents }))
    }

    async fn list_sessions(
        &self,
        req: Request<ListSessionsRequest>,
    ) -> ApiResult<ListSessionsResponse> {
        let authz = self.allow(&req, "ListSessions").await?;
        let req = req.into_inner();
        let limit = if req.limit == 0 {
            usize::MAX
        } else {
            req.limit as usize
        };
        let sessions = self
            .cluster
            .reader
            .sessions()
            .map_err(ApiError::from)?
            .into_iter()
            .filter(|s| req.identity.is_empty() || s.identity == req.identity)
            .filter(|s| !authz.own_only() || s.identity == authz.actor.principal.identity)
            .filter(|s| req.target.is_empty() || s.target == req.target)
            .filter(|s| !req.running || s.ended_ms.is_none())
            .take(limit)
            .map(session_proto)
            .collect();
        Ok(Response::new(ListSessionsResponse { sessions }))
    }

    type GetRecordingStream = tonic::codegen::tokio_stream::wrappers::ReceiverStream<
        Result<GetRecordingResponse, Status>,
    >;

    async fn get_recording(
        &self,
        req: Request<GetRecordingRequest>,
    ) -> ApiResult<Self::GetRecordingStream> {
        let authz = self.allow(&req, "GetRecording").await?;
        let id = req.into_inner().session_id;
        let session = self.session(&id)?;
        if authz.own_only() && session.identity != authz.actor.principal.identity {
            return Err(Status::permission_denied(format!(
                "{} may read only the recordings of its own sessions",
                authz.actor.principal.identity
            )));
        }
        if session.recording_key.is_none() {
            return Err(ApiError::NotFound(format!(
                "session {id} has no recording yet (still open, or its upload is pending)"
            ))
            .into());
        }
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let recordings = self.recordings.clone();
        tokio::spawn(async move {
            let first = GetRecordingResponse {
                session: Some(session_proto(session.clone())),
                ..Default::default()
            };
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            let (lines_tx, mut lines_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(2);
            let forward = {
                let tx = tx.clone();
                tokio::spawn(async move {
                    while let Some(data) = lines_rx.recv().await {
                        let part = GetRecordingResponse {
                            data,
                            ..Default::default()
                        };
                        if tx.send(Ok(part)).await.is_err() {
                            break;
                        }
                    }
                })
            };
            let checked = recordings.check(&session, Some(&lines_tx)).await;
            drop(lines_tx);
            let _ = forward.await;
            let last = GetRecordingResponse {
                problems: checked.problems,
                done: true,
                ..Default::default()
            };
            let _ = tx.send(Ok(last)).await;
        });
        Ok(Response::new(
            tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
    }

    async fn verify_recordings(
        &self,
        req: Request<VerifyRecordingsRequest>,
    ) -> ApiResult<VerifyRecordingsResponse> {
        self.allow(&req, "VerifyRecordings").await?;
        let req = req.into_inner();
        let sessions = if req.all {
            self.cluster
                .reader
                .sessions()
                .map_err(ApiError::from)?
                .into_iter()
                .filter(|s| s.recording_key.is_some() && s.recording_deleted_ms.is_none())
                .collect()
        } else {
            vec![self.session(&req.session_id)?]
        };
        let mut results = Vec::with_capacity(sessions.len());
        for s in sessions {
            let c = self.recordings.check(&s, None).await;
            results.push(RecordingVerification {
                session_id: s.id,
                ok: c.problems.is_empty(),
                chunks: c.chunks,
                events: c.events,
                problems: c.problems,
            });
        }
        Ok(Response::new(VerifyRecordingsResponse { results }))
    }

    type WatchSessionStream =
        tonic::codegen::tokio_stream::wrappers::ReceiverStream<Result<WatchSessionEvent, Status>>;

    async fn watch_session(
        &self,
        req: Request<WatchSessionRequest>,
    ) -> ApiResult<Self::WatchSessionStream> {
        self.allow(&req, "WatchSession").await?;
        let id = req.into_inner().session_id;
        let _ = self.cluster.linearizable().await;
        let s = self.session(&id)?;
        if s.ended_ms.is_some() {
            return Err(Status::failed_precondition(format!(
                "session {id} has ended; read it with `gatehouse sessions replay {id}`"
            )));
        }
        let mut chunks = crate::ingress::watch_session(&self.cluster, &self.agents, &s)
            .await
            .map_err(ApiError::Unavailable)?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            // Whole lines only: a chunk may end inside one.
            let mut pending: Vec<u8> = Vec::new();
            while let Some(chunk) = chunks.recv().await {
                pending.extend_from_slice(&chunk);
                while let Some(i) = pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=i).collect();
                    let record =
                        String::from_utf8_lossy(line.get(..i).unwrap_or_default()).into_owned();
                    if tx.send(Ok(WatchSessionEvent { record })).await.is_err() {
                        return;
                    }
                }
                if pending.len() > 64 << 20 {
                    let _ = tx
                        .send(Err(Status::data_loss("a record over 64 MiB")))
                        .await;
                    return;
                }
            }
        });
        Ok(Response::new(
            tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
    }

    async fn kill_session(&self, req: Request<KillSessionRequest>) -> ApiResult<Session> {
        let authz = self.allow(&req, "KillSession").await?;
        let actor = authz.actor.clone();
        let req = req.into_inner();
        if req.reason.trim().is_empty() {
            return Err(
                ApiError::InvalidArgument("a kill needs a reason (--reason)".into()).into(),
            );
        }
        // Read after every committed write: a session opened on another
        // node a moment ago is found.
        let _ = self.cluster.linearizable().await;
        let s = self.session(&req.session_id)?;
        if let Some(ended) = s.ended_ms {
            return Err(Status::failed_precondition(format!(
                "session {} already ended at {ended} ms ({})",
                s.id,
                s.end_reason.clone().unwrap_or_default()
            )));
        }
        let why = format!(
            "killed by {}: {}",
            actor.principal.identity,
            req.reason.trim()
        );
        crate::sessions::end(
            &self.cluster,
            &self.agents,
            &s,
            &why,
            &format!("from {}", actor.addr),
        )
        .await?;
        Ok(Response::new(session_proto(self.session(&s.id)?)))
    }

    async fn set_legal_hold(&self, req: Request<SetLegalHoldRequest>) -> ApiResult<Session> {
        let authz = self.allow(&req, "SetLegalHold").await?;
        let actor = authz.actor.clone();
        let req = req.into_inner();
        let s = self.session(&req.session_id)?;
        if req.hold && req.reason.trim().is_empty() {
            return Err(ApiError::InvalidArgument("a legal hold needs a reason".into()).into());
        }
        self.cluster
            .propose(Command::SetLegalHold {
                session_id: s.id.clone(),
                hold: req.hold,
                reason: req.reason.clone(),
            })
            .await
            .map_err(ApiError::from)?;
        let mut ev = self.cluster.event(
            EventKind::LegalHold,
            if req.hold {
                Decision::Allow
            } else {
                Decision::Deny
            },
            &s.identity,
            &s.target,
            &s.id,
        );
        ev.detail = Some(match req.hold {
            true => format!(
                "legal hold placed by {} from {}: {}",
                actor.principal.identity, actor.addr, req.reason
            ),
            false => format!(
                "legal hold released by {} from {}: {}",
                actor.principal.identity, actor.addr, req.reason
            ),
        });
        self.cluster.audit(ev).await.map_err(ApiError::from)?;
        Ok(Response::new(session_proto(self.session(&s.id)?)))
    }

    async fn list_audit_events(
        &self,
        req: Request<ListAuditEventsRequest>,
    ) -> ApiResult<ListAuditEventsResponse> {
        self.allow(&req, "ListAuditEvents").await?;
        let req = req.into_inner();
        let nonempty = |s: String| if s.is_empty() { None } else { Some(s) };
        let filter = AuditFilter {
            identity: nonempty(req.identity),
            target: nonempty(req.target),
            session_id: nonempty(req.session_id),
            since_ms: (req.since_ms != 0).then_some(req.since_ms),
            until_ms: (req.until_ms != 0).then_some(req.until_ms),
            limit: (req.limit != 0).then_some(req.limit as usize),
        };
        let events = self
            .cluster
            .reader
            .audit_events(&filter)
            .map_err(ApiError::from)?
            .into_iter()
            .map(String::into_bytes)
            .collect();
        Ok(Response::new(ListAuditEventsResponse { events }))
    }

    async fn create_join_token(
        &self,
        req: Request<CreateJoinTokenRequest>,
    ) -> ApiResult<CreateJoinTokenResponse> {
        let authz = self.allow(&req, "CreateJoinToken").await?;
        let actor = authz.actor.clone();
        let req = req.into_inner();
        if req.node_id == 0 {
            return Err(ApiError::InvalidArgument("node id 0 is reserved".into()).into());
        }
        let ttl = if req.ttl_seconds == 0 {
            3600
        } else {
            req.ttl_seconds.min(7 * 86_400) as i64
        };
        let secret = format!("ghj_{}", self.cluster.new_secret(24));
        let now = now_ms();
        let expires_ms = now + ttl * 1000;
        self.cluster
            .propose_audited(
                &actor,
                Command::CreateJoinToken {
                    token_sha256: state::sha256_hex(secret.as_bytes()),
                    node_id: req.node_id,
                    expires_ms,
                    now_ms: now,
                },
            )
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(CreateJoinTokenResponse {
            token: format!("{secret}.{}", self.ca_fingerprint),
            expires_ms,
        }))
    }

    async fn cluster_status(&self, req: Request<ListRequest>) -> ApiResult<ClusterStatusResponse> {
        self.allow(&req, "ClusterStatus").await?;
        Ok(Response::new(self.cluster_status()))
    }

    async fn remove_node(
        &self,
        req: Request<RemoveNodeRequest>,
    ) -> ApiResult<ClusterStatusResponse> {
        let authz = self.allow(&req, "RemoveNode").await?;
        let actor = authz.actor.clone();
        let id = req.into_inner().node_id;
        let m = self.cluster.raft.metrics().borrow().clone();
        if m.current_leader != Some(self.cluster.node_id) {
            let leader = m.current_leader.and_then(|l| {
                m.membership_config
                    .membership()
                    .get_node(&l)
                    .map(|n| n.api_addr.clone())
            });
            return Err(ApiError::NotLeader { leader }.into());
        }
        let voters: std::collections::BTreeSet<u64> =
            m.membership_config.membership().voter_ids().collect();
        let change = if voters.contains(&id) {
            openraft::ChangeMembers::RemoveVoters(std::collections::BTreeSet::from([id]))
        } else {
            openraft::ChangeMembers::RemoveNodes(std::collections::BTreeSet::from([id]))
        };
        // The evidence commits first: a leader that removes itself cannot
        // write anything once it is out.
        let mut ev = self.cluster.event(
            EventKind::ConfigChange,
            Decision::Allow,
            &actor.principal.identity,
            "",
            "",
        );
        ev.detail = Some(format!(
            "removed node {id} from the cluster; by {} from {}",
            actor.principal.identity, actor.addr
        ));
        self.cluster.audit(ev).await.map_err(ApiError::from)?;
        if let Err(e) = self.cluster.raft.change_membership(change, false).await {
            let mut ev = self.cluster.event(
                EventKind::ConfigChange,
                Decision::Deny,
                &actor.principal.identity,
                "",
                "",
            );
            ev.detail = Some(format!(
                "removing node {id} failed, it is still a member: {e}; by {} from {}",
                actor.principal.identity, actor.addr
            ));
            let _ = self.cluster.audit(ev).await;
            return Err(ApiError::InvalidArgument(e.to_string()).into());
        }
        Ok(Response::new(self.cluster_status()))
    }

    async fn state_digest(&self, req: Request<ListRequest>) -> ApiResult<StateDigestResponse> {
        self.allow(&req, "StateDigest").await?;
        let m = self.cluster.raft.metrics().borrow().clone();
        Ok(Response::new(StateDigestResponse {
            digest: self.cluster.reader.digest().map_err(ApiError::from)?,
            last_applied: m.last_applied.map(|l| l.index).unwrap_or(0),
            audit_events: self.cluster.reader.audit_count().map_err(ApiError::from)?,
        }))
    }

    async fn status(&self, req: Request<ListRequest>) -> ApiResult<StatusResponse> {
        self.allow(&req, "Status").await?;
        let m = self.cluster.raft.metrics().borrow().clone();
        Ok(Response::new(StatusResponse {
            node_id: self.cluster.node_id,
            leader_id: m.current_leader.unwrap_or(0),
            last_applied: m.last_applied.map(|l| l.index).unwrap_or(0),
            audit_events: self.cluster.reader.audit_count().map_err(ApiError::from)?,
            policy_version: self
                .cluster
                .reader
                .policy_version()
                .map_err(ApiError::from)?,
        }))
    }
}

impl AdminService {
    fn cluster_status(&self) -> ClusterStatusResponse {
        let m = self.cluster.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
        let matched = m.replication.clone().unwrap_or_default();
        ClusterStatusResponse {
            leader_id: m.current_leader.unwrap_or(0),
            term: m.current_term,
            last_applied: m.last_applied.map(|l| l.index).unwrap_or(0),
            node_id: self.cluster.node_id,
            nodes: membership
                .nodes()
                .map(|(id, n)| ClusterNode {
                    id: *id,
                    raft_addr: n.raft_addr.clone(),
                    api_addr: n.api_addr.clone(),
                    voter: voters.contains(id),
                    matched_index: matched
                        .get(id)
                        .and_then(|l| l.as_ref())
                        .map(|l| l.index)
                        .unwrap_or(0),
                })
                .collect(),
        }
    }

    fn target_proto(&self, t: state::Target) -> Target {
        Target {
            online: self.agents.get(&t.agent).is_some(),
            name: t.name,
            kind: t.kind,
            agent: t.agent,
            default_db_user: t.default_db_user,
            created_ms: t.created_ms,
        }
    }
}
