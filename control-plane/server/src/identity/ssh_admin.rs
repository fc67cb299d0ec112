//! API calls for OpenSSH callers: a user certificate from the cluster's SSH
//! CA for the caller's own key, and what a client needs to trust the
//! gateway's host certificates and reach its targets.

use gatehouse_proto::v1::*;
use tonic::{Request, Response, Status};

use crate::api::{AdminService, ApiError};
use crate::cluster::now_ms;
use crate::identity::roles::Authz;

/// Longest public key line accepted.
const MAX_PUBLIC_KEY: usize = 16 << 10;

/// Where the SSH ingress listens, as `gatehouse ssh config` tells clients.
#[derive(Clone, Debug, Default)]
pub struct SshIngress {
    pub port: u16,
    pub host_names: Vec<String>,
}

impl AdminService {
    pub(crate) async fn do_issue_ssh_certificate(
        &self,
        req: Request<IssueSshCertificateRequest>,
        authz: Authz,
    ) -> Result<Response<IssueSshCertificateResponse>, Status> {
        let who = authz.actor.principal;
        let req = req.into_inner();
        if req.public_key.len() > MAX_PUBLIC_KEY {
            return Err(ApiError::InvalidArgument("the public key is too long".into()).into());
        }
        let now = now_ms().max(0) as u64 / 1000;
        let policy_max = self
            .cluster
            .policy_doc()
            .map_err(ApiError::from)?
            .and_then(|d| d.ssh)
            .unwrap_or_default()
            .certificate_ttl()
            .as_secs();
        let mut until = now + policy_max;
        if req.ttl_secs > 0 {
            until = until.min(now.saturating_add(req.ttl_secs));
        }
        if who.expires_ms > 0 {
            until = until.min(who.expires_ms.max(0) as u64 / 1000);
        }
        let cert = self
            .ids
            .ssh_ca
            .sign_user(&who, &req.public_key, until)
            .map_err(|e| match e {
                crate::identity::ssh_ca::SshCaError::BadPublicKey(_) => {
                    ApiError::InvalidArgument(e.to_string())
                }
                e => ApiError::Unavailable(e.to_string()),
            })?;
        let line = cert
            .to_openssh()
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        // No certificate without its evidence.
        let detail = format!(
            "SSH certificate serial {} issued from {} for key {}, valid until {} s",
            cert.serial(),
            authz.actor.addr,
            cert.public_key().fingerprint(russh::keys::HashAlg::Sha256),
            cert.valid_before()
        );
        self.ids.audit_issued(&who, detail).await.map_err(|()| {
            ApiError::Unavailable("the certificate could not be audited; try again".into())
        })?;
        Ok(Response::new(IssueSshCertificateResponse {
            certificate: line,
            serial: cert.serial(),
            key_id: cert.key_id().to_string(),
            valid_before_ms: cert.valid_before() as i64 * 1000,
        }))
    }

    pub(crate) async fn do_get_ssh_setup(
        &self,
        authz: Authz,
    ) -> Result<Response<SshSetup>, Status> {
        let who = authz.actor.principal;
        let ca = self
            .ids
            .ssh_ca
            .public_line()
            .map_err(|e| ApiError::Unavailable(e.to_string()))?;
        let mut targets = Vec::new();
        for t in self.cluster.reader.targets().map_err(ApiError::from)? {
            if t.kind != "ssh" {
                continue;
            }
            let admitting = self
                .cluster
                .reader
                .admitting(&who.identity, &who.groups, &t.name)
                .map_err(ApiError::from)?;
            if !admitting.is_empty() {
                targets.push(SshSetupTarget {
                    name: t.name,
                    default_login: t.default_db_user,
                });
            }
        }
        Ok(Response::new(SshSetup {
            ca_public_key: ca,
            host_names: self.ssh.host_names.clone(),
            port: u32::from(self.ssh.port),
            targets,
        }))
    }
}
