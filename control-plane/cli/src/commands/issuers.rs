//! `gatehouse issuers`: trusted identity providers.

use clap::Subcommand;
use gatehouse_proto::v1::{DeleteIssuerRequest, Issuer, ListRequest, PutIssuerRequest};
use serde_json::json;

use super::Ctx;
use crate::outln;
use crate::output;

#[derive(Subcommand)]
pub enum IssuersCmd {
    /// Every trusted issuer.
    List,
    /// Trust an OpenID Provider (adds it, or replaces the one of that name).
    AddOidc {
        name: String,
        /// The issuer identifier, exactly as its tokens' `iss`.
        #[arg(long)]
        issuer_url: String,
        #[arg(long)]
        client_id: String,
        /// A file holding the client secret (kept sealed in the cluster).
        #[arg(long)]
        client_secret_file: Option<std::path::PathBuf>,
        /// The claim with the person's groups.
        #[arg(long, default_value = "groups")]
        groups_claim: String,
        /// An accepted signature algorithm (repeatable; default RS256, ES256).
        #[arg(long = "algorithm")]
        algorithms: Vec<String>,
        /// An audience trusted next to the client id (repeatable).
        #[arg(long = "audience")]
        audiences: Vec<String>,
        /// A scope asked at login (repeatable; default email profile groups).
        #[arg(long = "scope")]
        scopes: Vec<String>,
    },
    /// Trust a SAML 2.0 identity provider by its metadata; people log in
    /// in the browser at <API>/saml/<name>/login.
    AddSaml {
        name: String,
        /// The IdP's metadata XML (entity id, SSO location, signing
        /// certificate).
        #[arg(long, required_unless_present = "metadata_url")]
        metadata_file: Option<std::path::PathBuf>,
        /// Or where the server fetches it (https://).
        #[arg(long, conflicts_with = "metadata_file")]
        metadata_url: Option<String>,
        /// The attribute holding the person's groups.
        #[arg(long, default_value = "groups")]
        groups_attribute: String,
    },
    /// Stop trusting an issuer.
    Delete { name: String },
}

fn row(i: &Issuer) -> Vec<String> {
    vec![
        i.name.clone(),
        i.kind.clone(),
        i.issuer_url.clone(),
        i.client_id.clone(),
        i.groups_claim.clone(),
        i.algorithms.join(","),
    ]
}

pub async fn exec(cmd: &IssuersCmd, ctx: &Ctx) -> anyhow::Result<()> {
    let mut c = ctx.admin().await?;
    match cmd {
        IssuersCmd::List => {
            let list = c.list_issuers(ListRequest {}).await?.into_inner().issuers;
            if ctx.json {
                output::json(&json!(
                    list.iter()
                        .map(|i| json!({
                    "name": i.name, "kind": i.kind, "issuer_url": i.issuer_url,
                    "client_id": i.client_id, "groups_claim": i.groups_claim,
                    "algorithms": i.algorithms, "audiences": i.audiences,
                    "has_client_secret": i.has_client_secret}))
                        .collect::<Vec<_>>()
                ))?;
            } else {
                output::table(
                    &[
                        "NAME",
                        "KIND",
                        "ISSUER",
                        "CLIENT",
                        "GROUPS CLAIM",
                        "ALGORITHMS",
                    ],
                    list.iter().map(row).collect(),
                )?;
            }
        }
        IssuersCmd::AddOidc {
            name,
            issuer_url,
            client_id,
            client_secret_file,
            groups_claim,
            algorithms,
            audiences,
            scopes,
        } => {
            let client_secret = match client_secret_file {
                Some(f) => std::fs::read_to_string(f)
                    .map_err(|e| anyhow::anyhow!("reading {}: {e}", f.display()))?
                    .trim()
                    .to_string(),
                None => String::new(),
            };
            let i = c
                .put_issuer(PutIssuerRequest {
                    issuer: Some(Issuer {
                        name: name.clone(),
                        kind: "oidc".into(),
                        issuer_url: issuer_url.clone(),
                        client_id: client_id.clone(),
                        client_secret,
                        groups_claim: groups_claim.clone(),
                        algorithms: algorithms.clone(),
                        audiences: audiences.clone(),
                        scopes: scopes.clone(),
                        ..Default::default()
                    }),
                })
                .await?
                .into_inner();
            outln!("trusted issuer {} ({}) saved", i.name, i.issuer_url)?;
        }
        IssuersCmd::AddSaml {
            name,
            metadata_file,
            metadata_url,
            groups_attribute,
        } => {
            let metadata_xml = match metadata_file {
                Some(f) => std::fs::read_to_string(f)
                    .map_err(|e| anyhow::anyhow!("reading {}: {e}", f.display()))?,
                None => String::new(),
            };
            let i = c
                .put_issuer(PutIssuerRequest {
                    issuer: Some(Issuer {
                        name: name.clone(),
                        kind: "saml".into(),
                        metadata_xml,
                        metadata_url: metadata_url.clone().unwrap_or_default(),
                        groups_claim: groups_attribute.clone(),
                        ..Default::default()
                    }),
                })
                .await?
                .into_inner();
            outln!(
                "trusted SAML issuer {} ({}) saved; its service provider metadata: {}/saml/{}/metadata",
                i.name,
                i.issuer_url,
                ctx.api.trim_end_matches('/'),
                i.name
            )?;
        }
        IssuersCmd::Delete { name } => {
            c.delete_issuer(DeleteIssuerRequest { name: name.clone() })
                .await?;
            outln!("issuer {name} is no longer trusted")?;
        }
    }
    Ok(())
}
