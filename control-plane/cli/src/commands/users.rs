//! `gatehouse users` and `gatehouse roles`: people seen at login, static
//! groups, and roles on the API.

use clap::Subcommand;
use gatehouse_proto::v1::{ListRequest, RevokeIdentityRequest, RoleGrant, SetStaticGroupsRequest};
use serde_json::json;

use super::Ctx;
use crate::outln;
use crate::output;

#[derive(Subcommand)]
pub enum UsersCmd {
    /// People seen at login, with the groups their provider gave.
    List,
    /// Set an identity's static groups (added to its provider's).
    SetGroups {
        /// user:<issuer>/<subject> or sa:<name>
        identity: String,
        #[arg(long = "group")]
        groups: Vec<String>,
    },
}

#[derive(Subcommand)]
pub enum IdentitiesCmd {
    /// Revoke an identity: a person's tokens issued so far (a new login
    /// gets a new one), or a service account for good (its API keys and
    /// tokens); its running sessions end everywhere.
    Revoke {
        /// user:<issuer>/<subject> or sa:<name>
        identity: String,
        #[arg(long)]
        reason: String,
        /// Only this API key of the service account (its running sessions
        /// still end).
        #[arg(long)]
        key: Option<String>,
    },
}

pub async fn identities(cmd: &IdentitiesCmd, ctx: &Ctx) -> anyhow::Result<()> {
    let mut c = ctx.admin().await?;
    match cmd {
        IdentitiesCmd::Revoke {
            identity,
            reason,
            key,
        } => {
            let r = c
                .revoke_identity(RevokeIdentityRequest {
                    identity: identity.clone(),
                    reason: reason.clone(),
                    key_id: key.clone().unwrap_or_default(),
                })
                .await?
                .into_inner();
            if ctx.json {
                output::json(&json!({"identity": r.identity, "revoked_ms": r.revoked_ms,
                    "sessions_ended": r.sessions_ended}))?;
            } else {
                outln!(
                    "{} revoked; {} running session(s) ended",
                    r.identity,
                    r.sessions_ended
                )?;
            }
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum RolesCmd {
    /// Every role grant.
    List,
    /// Grant a role (admin, auditor, reviewer, user) to an identity or group.
    Grant { role: String, principal: String },
    /// Revoke a role grant.
    Revoke { role: String, principal: String },
    /// Who the current credential is, and its roles.
    Whoami,
}

pub async fn users(cmd: &UsersCmd, ctx: &Ctx) -> anyhow::Result<()> {
    let mut c = ctx.admin().await?;
    match cmd {
        UsersCmd::List => {
            let users = c.list_users(ListRequest {}).await?.into_inner().users;
            if ctx.json {
                output::json(&json!(
                    users
                        .iter()
                        .map(|u| json!({
                    "identity": u.identity, "issuer": u.issuer, "subject": u.subject,
                    "email": u.email, "groups": u.groups, "static_groups": u.static_groups,
                    "last_login_ms": u.last_login_ms}))
                        .collect::<Vec<_>>()
                ))?;
            } else {
                output::table(
                    &["IDENTITY", "EMAIL", "GROUPS", "STATIC GROUPS", "ISSUER"],
                    users
                        .into_iter()
                        .map(|u| {
                            vec![
                                u.identity,
                                u.email,
                                u.groups.join(","),
                                u.static_groups.join(","),
                                u.issuer,
                            ]
                        })
                        .collect(),
                )?;
            }
        }
        UsersCmd::SetGroups { identity, groups } => {
            c.set_static_groups(SetStaticGroupsRequest {
                identity: identity.clone(),
                groups: groups.clone(),
            })
            .await?;
            outln!("static groups of {identity}: [{}]", groups.join(", "))?;
        }
    }
    Ok(())
}

pub async fn roles(cmd: &RolesCmd, ctx: &Ctx) -> anyhow::Result<()> {
    let mut c = ctx.admin().await?;
    match cmd {
        RolesCmd::List => {
            let grants = c
                .list_role_grants(ListRequest {})
                .await?
                .into_inner()
                .grants;
            if ctx.json {
                output::json(&json!(
                    grants
                        .iter()
                        .map(|g| json!({
                    "role": g.role, "principal": g.principal, "created_ms": g.created_ms}))
                        .collect::<Vec<_>>()
                ))?;
            } else {
                output::table(
                    &["ROLE", "PRINCIPAL"],
                    grants
                        .into_iter()
                        .map(|g| vec![g.role, g.principal])
                        .collect(),
                )?;
            }
        }
        RolesCmd::Grant { role, principal } | RolesCmd::Revoke { role, principal } => {
            let g = RoleGrant {
                role: role.clone(),
                principal: principal.clone(),
                created_ms: 0,
            };
            if matches!(cmd, RolesCmd::Grant { .. }) {
                c.grant_role(g).await?;
                outln!("granted {role} to {principal}")?;
            } else {
                c.revoke_role(g).await?;
                outln!("revoked {role} from {principal}")?;
            }
        }
        RolesCmd::Whoami => {
            let w = c.who_am_i(ListRequest {}).await?.into_inner();
            if ctx.json {
                output::json(&json!({"identity": w.identity, "issuer": w.issuer,
                    "groups": w.groups, "roles": w.roles, "break_glass": w.break_glass}))?;
            } else {
                outln!(
                    "{} ({}), groups [{}], roles [{}]{}",
                    w.identity,
                    w.issuer,
                    w.groups.join(", "),
                    w.roles.join(", "),
                    if w.break_glass {
                        " (break-glass admin token)"
                    } else {
                        ""
                    }
                )?;
            }
        }
    }
    Ok(())
}
