//! A connection to the admin API.

use anyhow::Context;
use gatehouse_proto::v1::admin_client::AdminClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

/// Adds the admin token to every call.
#[derive(Clone)]
pub struct Bearer(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

pub type Client = AdminClient<InterceptedService<Channel, Bearer>>;

/// The reviewers' API, with the caller's own API key (or the admin token).
pub type ReviewsClient =
    gatehouse_proto::v1::reviews_client::ReviewsClient<InterceptedService<Channel, Bearer>>;

/// Connects over TLS, trusting only the cluster CA in `ca_pem`.
pub async fn connect(api: &str, token: &str, ca_pem: &str) -> anyhow::Result<Client> {
    let channel = channel(api, ca_pem).await?;
    // Recordings stream in parts of about 1 MiB; one record (a row with a
    // large value) may be bigger.
    Ok(AdminClient::with_interceptor(channel, bearer(token)?).max_decoding_message_size(64 << 20))
}

fn bearer(token: &str) -> anyhow::Result<Bearer> {
    let value = format!("Bearer {token}")
        .parse()
        .context("token contains invalid characters")?;
    Ok(Bearer(value))
}

/// Whether a token may travel to `api`: over https always; over plain
/// http only to a loopback address and only when the caller said so.
pub fn check_transport(api: &str, allow_loopback_http: bool) -> anyhow::Result<()> {
    let uri: tonic::transport::Uri = api
        .parse()
        .with_context(|| format!("invalid API address {api}"))?;
    match uri.scheme_str() {
        Some("https") => Ok(()),
        Some("http") => {
            let host = uri.host().unwrap_or("").trim_matches(['[', ']']);
            let loopback = host == "localhost"
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            anyhow::ensure!(
                loopback && allow_loopback_http,
                "refusing to send a token over {api}: plain http exposes it to anyone on the path; use https://{}",
                if loopback {
                    "… or pass --insecure-loopback-http for this loopback address"
                } else {
                    "…"
                }
            );
            Ok(())
        }
        _ => anyhow::bail!("invalid API address {api}: use https://host:port"),
    }
}

async fn channel(api: &str, ca_pem: &str) -> anyhow::Result<Channel> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let uri: tonic::transport::Uri = api
        .parse()
        .with_context(|| format!("invalid API address {api}"))?;
    let host = uri
        .host()
        .unwrap_or("localhost")
        .trim_matches(['[', ']'])
        .to_string();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(host);
    let channel = Channel::builder(uri)
        .tls_config(tls)
        .context("API TLS configuration")?
        .connect()
        .await
        .with_context(|| format!("cannot reach the Gatehouse API at {api}"))?;
    Ok(channel)
}

/// The Reviews service on the same kind of connection as [`connect`].
pub async fn connect_reviews(
    api: &str,
    token: &str,
    ca_pem: &str,
) -> anyhow::Result<ReviewsClient> {
    let channel = channel(api, ca_pem).await?;
    Ok(
        gatehouse_proto::v1::reviews_client::ReviewsClient::with_interceptor(
            channel,
            bearer(token)?,
        ),
    )
}

/// The login service: no credential.
pub type IdentityClient = gatehouse_proto::v1::identity_client::IdentityClient<Channel>;

pub async fn connect_identity(api: &str, ca_pem: &str) -> anyhow::Result<IdentityClient> {
    Ok(gatehouse_proto::v1::identity_client::IdentityClient::new(
        channel(api, ca_pem).await?,
    ))
}
