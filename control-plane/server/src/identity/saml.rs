//! A SAML 2.0 service provider (samael, with xmlsec checking signatures):
//! SP metadata, SP-initiated login (HTTP-Redirect), and an assertion
//! consumer service that validates the IdP's signature (on the reduced,
//! signed XML only, so wrapped copies are ignored), audience, recipient,
//! destination, InResponseTo, NotBefore/NotOnOrAfter, and refuses an
//! assertion id already used (a replay cache in Raft, so across nodes).
//! It issues the same Gatehouse access token as an OIDC login: shown once,
//! and set as a secure cookie for the web console.
//!
//! Routes (on the API port, next to gRPC):
//! - `GET  /saml/{issuer}/metadata`
//! - `GET  /saml/{issuer}/login` → 302 to the IdP
//! - `POST /saml/{issuer}/acs`
//! - `GET|POST /saml/{issuer}/slo`: clears the console cookie (the IdP's
//!   own session is not ended)

use std::sync::Arc;

use axum::extract::{Extension, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use gatehouse_cp_raft::Command;
use gatehouse_cp_raft::identity::{Issuer, User};
use samael::metadata::{EntityDescriptor, HTTP_REDIRECT_BINDING};
use samael::service_provider::{ServiceProvider, ServiceProviderBuilder};
use samael::traits::ToXml;
use serde::{Deserialize, Serialize};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use super::{Identities, Principal};
use crate::cluster::{ProposeError, now_ms};

const RELAY_PURPOSE: &str = "saml-relay-state";
/// How long a started SAML login may take.
const LOGIN_TTL_MS: i64 = 600_000;
/// Largest SAMLResponse form accepted.
const MAX_FORM: usize = 256 << 10;
/// The cookie the web console reads.
pub const COOKIE: &str = "gatehouse_token";

pub struct Saml {
    pub ids: Arc<Identities>,
    /// The API's public base URL (`https://host:port`).
    pub public_url: String,
}

#[derive(Serialize, Deserialize)]
struct Relay {
    issuer: String,
    request_id: String,
    expires_ms: i64,
}

/// The routes, for the API port.
pub fn router(saml: Arc<Saml>) -> axum::Router {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/saml/{issuer}/metadata", get(metadata))
        .route("/saml/{issuer}/login", get(login))
        .route("/saml/{issuer}/acs", post(acs))
        .route("/saml/{issuer}/slo", get(logout).post(logout))
        // A larger form is refused before it is read in full.
        .layer(axum::extract::DefaultBodyLimit::max(MAX_FORM))
        .with_state(saml)
}

fn text(code: StatusCode, body: String) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

impl Saml {
    fn issuer(&self, name: &str) -> Result<Issuer, (StatusCode, String)> {
        match self.ids.cluster.reader.issuer(name) {
            Ok(Some(i)) if i.kind == "saml" => Ok(i),
            Ok(_) => Err((
                StatusCode::NOT_FOUND,
                format!("no SAML issuer named {name:?}\n"),
            )),
            Err(e) => Err((StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n"))),
        }
    }

    fn entity_id(&self, issuer: &str) -> String {
        format!("{}/saml/{issuer}", self.public_url)
    }

    fn acs_url(&self, issuer: &str) -> String {
        format!("{}/saml/{issuer}/acs", self.public_url)
    }

    fn sp(&self, issuer: &Issuer) -> Result<ServiceProvider, String> {
        let md: EntityDescriptor = issuer
            .metadata_xml
            .parse()
            .map_err(|e| format!("the IdP metadata does not parse: {e}"))?;
        ServiceProviderBuilder::default()
            .entity_id(Some(self.entity_id(&issuer.name)))
            .metadata_url(Some(format!("{}/metadata", self.entity_id(&issuer.name))))
            .acs_url(Some(self.acs_url(&issuer.name)))
            .slo_url(Some(format!("{}/slo", self.entity_id(&issuer.name))))
            .idp_metadata(md)
            .allowed_signature_algorithms(Some(vec![
                samael::crypto::AllowedSignatureAlgorithm::RsaSha256,
                samael::crypto::AllowedSignatureAlgorithm::EcdsaSha256,
            ]))
            .max_clock_skew(chrono::Duration::seconds(super::tokens::SKEW_SECS as i64))
            .build()
            .map_err(|e| e.to_string())
    }
}

async fn metadata(State(s): State<Arc<Saml>>, Path(name): Path<String>) -> Response {
    let issuer = match s.issuer(&name) {
        Ok(i) => i,
        Err((code, why)) => return text(code, why),
    };
    let xml = s
        .sp(&issuer)
        .and_then(|sp| sp.metadata().map_err(|e| e.to_string()))
        .and_then(|m| m.to_string().map_err(|e| format!("{e:?}")));
    match xml {
        Ok(x) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/samlmetadata+xml")],
            x,
        )
            .into_response(),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

async fn logout() -> Response {
    (
        StatusCode::OK,
        [
            (
                header::SET_COOKIE,
                format!("{COOKIE}=; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=0"),
            ),
            (header::CONTENT_TYPE, "text/plain; charset=utf-8".into()),
        ],
        "Logged out of Gatehouse.\n",
    )
        .into_response()
}

async fn login(State(s): State<Arc<Saml>>, Path(name): Path<String>) -> Response {
    let issuer = match s.issuer(&name) {
        Ok(i) => i,
        Err((code, why)) => return text(code, why),
    };
    let made = s.sp(&issuer).and_then(|sp| {
        let sso = sp
            .sso_binding_location(HTTP_REDIRECT_BINDING)
            .ok_or("the IdP metadata has no HTTP-Redirect SingleSignOnService")?;
        let req = sp
            .make_authentication_request(&sso)
            .map_err(|e| e.to_string())?;
        let relay = s
            .ids
            .seal_json(
                RELAY_PURPOSE,
                &Relay {
                    issuer: issuer.name.clone(),
                    request_id: req.id.clone(),
                    expires_ms: now_ms() + LOGIN_TTL_MS,
                },
            )
            .map_err(|e| e.to_string())?;
        req.redirect(&relay)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "no redirect URL".to_string())
    });
    match made {
        Ok(url) => (StatusCode::FOUND, [(header::LOCATION, url.to_string())]).into_response(),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

async fn acs(
    State(s): State<Arc<Saml>>,
    Path(name): Path<String>,
    Extension(info): Extension<TlsConnectInfo<TcpConnectInfo>>,
    body: axum::body::Bytes,
) -> Response {
    let Some(peer) = info.get_ref().remote_addr() else {
        return text(StatusCode::BAD_REQUEST, "no peer address\n".into());
    };
    let ip = peer.ip();
    let addr = peer.to_string();
    if let Err(st) = s.ids.gate(ip, "SAML logins").await {
        return text(StatusCode::TOO_MANY_REQUESTS, format!("{}\n", st.message()));
    }
    match consume(&s, &name, &body).await {
        Ok((who, user)) => match s
            .ids
            .logged_in(ip, &format!("SAML login from {addr}"), who, Some(user))
            .await
        {
            Ok(super::LoggedIn {
                token,
                expires_ms: exp,
                ..
            }) => {
                let cookie = format!(
                    "{COOKIE}={token}; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age={}",
                    (exp - now_ms()) / 1000
                );
                let body =
                    format!("Logged in to Gatehouse. Your access token (shown once):\n{token}\n");
                (
                    StatusCode::OK,
                    [
                        (header::SET_COOKIE, cookie),
                        (header::CONTENT_TYPE, "text/plain; charset=utf-8".into()),
                    ],
                    body,
                )
                    .into_response()
            }
            Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
        },
        Err((subject, why)) => {
            let detail = format!("SAML login at {name} from {addr} refused: {why}");
            if s.ids.refused(ip, &subject, &subject, detail).await.is_err() {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the refusal could not be audited\n".into(),
                );
            }
            text(
                StatusCode::FORBIDDEN,
                format!("SAML login refused: {why}\n"),
            )
        }
    }
}

/// Validates the posted response; the person, or (subject, why not).
async fn consume(s: &Saml, name: &str, body: &[u8]) -> Result<(Principal, User), (String, String)> {
    let fail = |why: String| (String::new(), why);
    if body.len() > MAX_FORM {
        return Err(fail(format!("the form is larger than {MAX_FORM} bytes")));
    }
    let form: std::collections::HashMap<String, String> =
        openidconnect::url::form_urlencoded::parse(body)
            .into_owned()
            .collect();
    let (Some(response), Some(relay)) = (form.get("SAMLResponse"), form.get("RelayState")) else {
        return Err(fail("the form needs SAMLResponse and RelayState".into()));
    };
    let relay: Relay = s.ids.open_json(RELAY_PURPOSE, relay).ok_or_else(|| {
        fail("RelayState is not one this cluster issued (unsolicited response)".into())
    })?;
    if relay.issuer != name {
        return Err(fail("RelayState belongs to another issuer".into()));
    }
    if now_ms() > relay.expires_ms {
        return Err(fail("the login took too long; start again".into()));
    }
    let issuer = s
        .issuer(name)
        .map_err(|_| fail(format!("no SAML issuer named {name:?}")))?;
    let sp = s.sp(&issuer).map_err(fail)?;
    let assertion = sp
        .parse_base64_response(response, Some(&[relay.request_id.as_str()]))
        .map_err(|e| fail(describe(e.as_ref())))?;
    // An audience restriction naming us is required, not only checked
    // when present.
    let ours = s.entity_id(name);
    let audience_ok = assertion
        .conditions
        .as_ref()
        .and_then(|c| c.audience_restrictions.as_ref())
        .is_some_and(|rs| rs.iter().any(|r| r.audience.contains(&ours)));
    if !audience_ok {
        return Err(fail(format!(
            "wrong audience: the assertion is not restricted to {ours}"
        )));
    }
    let subject = assertion
        .subject
        .as_ref()
        .and_then(|s| s.name_id.as_ref())
        .map(|n| n.value.clone())
        .filter(|v| !v.is_empty() && v.len() <= 255)
        .ok_or_else(|| fail("the assertion has no NameID".into()))?;
    let identity = format!("user:{}/{subject}", issuer.name);
    // The replay cache: each assertion id is accepted once, cluster-wide.
    let expires_ms = assertion
        .conditions
        .as_ref()
        .and_then(|c| c.not_on_or_after)
        .map(|t| t.timestamp_millis())
        .unwrap_or(now_ms() + LOGIN_TTL_MS);
    match s
        .ids
        .cluster
        .propose(Command::UseAssertion {
            issuer: issuer.name.clone(),
            assertion_id: assertion.id.clone(),
            expires_ms,
            now_ms: now_ms(),
        })
        .await
    {
        Ok(_) => {}
        Err(ProposeError::Rejected(_)) => {
            return Err((
                identity,
                format!("assertion {} was already used (replay)", assertion.id),
            ));
        }
        Err(e) => return Err((identity, format!("the replay cache is unavailable: {e}"))),
    }
    let attr = if issuer.groups_claim.is_empty() {
        "groups"
    } else {
        &issuer.groups_claim
    };
    let mut groups = Vec::new();
    let mut email = String::new();
    for st in assertion.attribute_statements.iter().flatten() {
        for a in &st.attributes {
            let n = a
                .name
                .as_deref()
                .or(a.friendly_name.as_deref())
                .unwrap_or("");
            let vals = a.values.iter().filter_map(|v| v.value.clone());
            if n == attr {
                groups.extend(vals);
            } else if n == "email" || n.ends_with("emailaddress") {
                email = vals.into_iter().next().unwrap_or_default();
            }
        }
    }
    let who = Principal {
        identity: identity.clone(),
        issuer: issuer.issuer_url.clone(),
        groups: groups.clone(),
        email: email.clone(),
        expires_ms: 0,
    };
    let user = User {
        identity,
        issuer: issuer.issuer_url.clone(),
        subject,
        email,
        groups,
        last_login_ms: now_ms(),
    };
    Ok((who, user))
}

fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    use samael::service_provider::Error as E;
    match e.downcast_ref::<E>() {
        Some(E::FailedToValidateSignature) => {
            "bad signature: the response is not signed by the IdP's key".into()
        }
        Some(e @ (E::FailedToParseSamlResponse(_) | E::FailedToParseSamlAssertion(_))) => {
            format!("malformed or unsigned response ({e})")
        }
        _ => super::oidc::chain(e),
    }
}
