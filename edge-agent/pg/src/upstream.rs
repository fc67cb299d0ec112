//! The agent's side of a target connection: TCP, TLS as the target's
//! `sslmode` says, authentication with the agent's own credential, the
//! cancel key swap, and cancel requests.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use gatehouse_pgwire_inspect::build::{self, Severity};
use gatehouse_proto::tunnel::SessionOpen;
use pgwire::messages::startup::Authentication;
use pgwire::messages::{DecodeContext, PgWireBackendMessage};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use gatehouse_agent_core::config::{SslMode, TargetConfig};

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connecting to the target failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot reach target: {0}")]
    Io(#[from] std::io::Error),
    /// The target refused us; its ErrorResponse goes to the client as is.
    #[error("target refused the connection: {code} {message}")]
    Refused {
        code: String,
        message: String,
        raw: Vec<u8>,
    },
    #[error("target spoke an unexpected protocol: {0}")]
    Protocol(String),
    #[error("target asked for an unsupported authentication method")]
    UnsupportedAuth,
    #[error("target does not offer TLS and its sslmode is {0:?}")]
    NoTls(SslMode),
    #[error("TLS to target failed: {0}")]
    Tls(String),
}

/// A connection to the target, in clear or in TLS.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// The target's own cancel key for one session; it never leaves the agent.
#[derive(Clone, Debug)]
pub struct UpstreamKey {
    pub pid: i32,
    pub secret: Bytes,
}

/// An authenticated target connection.
pub struct Connected {
    pub stream: Stream,
    /// What the target sent after AuthenticationOk up to its first
    /// ReadyForQuery (or its error), with the gateway's cancel secret in
    /// place of the target's; it goes to the client as is.
    pub greeting: BytesMut,
    pub key: Option<UpstreamKey>,
}

/// Connects and authenticates to the target as `db_user`; a `read_only`
/// session has `default_transaction_read_only` on from its start.
pub async fn connect(
    target: &TargetConfig,
    open: &SessionOpen,
    db_user: &str,
    read_only: bool,
) -> Result<Connected, UpstreamError> {
    let mut sock = dial(target).await?;
    let mut params: BTreeMap<String, String> = open
        .startup_params
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    params.insert("user".into(), db_user.to_string());
    params.insert("database".into(), open.database.clone());
    if read_only {
        params.insert("default_transaction_read_only".into(), "on".into());
    }
    sock.write_all(&build::startup(&params)).await?;

    let mut ctx = DecodeContext::default();
    ctx.awaiting_frontend_ssl = false;
    ctx.awaiting_frontend_startup = false;
    let mut buf = BytesMut::with_capacity(8192);
    let mut scram: Option<ScramSha256> = None;
    loop {
        // Typed messages frame alike in both directions; pgwire panics on a
        // length under 4.
        if !gatehouse_pgwire_inspect::frontend_length_ok(&buf, false) {
            return Err(UpstreamError::Protocol(
                "message with an invalid length during authentication".into(),
            ));
        }
        let msg = match PgWireBackendMessage::decode(&mut buf, &ctx) {
            Ok(Some(m)) => m,
            Ok(None) => {
                if sock.read_buf(&mut buf).await? == 0 {
                    return Err(UpstreamError::Protocol(
                        "connection closed during authentication".into(),
                    ));
                }
                continue;
            }
            Err(e) => return Err(UpstreamError::Protocol(e.to_string())),
        };
        match msg {
            PgWireBackendMessage::Authentication(Authentication::Ok) => break,
            PgWireBackendMessage::Authentication(Authentication::CleartextPassword) => {
                let pw = target.password()?;
                sock.write_all(&build::password(&pw)).await?;
            }
            PgWireBackendMessage::Authentication(Authentication::MD5Password(salt)) => {
                let salt: [u8; 4] = salt
                    .as_slice()
                    .try_into()
                    .map_err(|_| UpstreamError::Protocol("bad MD5 salt".into()))?;
                let pw = target.password()?;
                let hashed = postgres_protocol::authentication::md5_hash(
                    db_user.as_bytes(),
                    pw.as_bytes(),
                    salt,
                );
                sock.write_all(&build::password(&hashed)).await?;
            }
            PgWireBackendMessage::Authentication(Authentication::SASL(mechs)) => {
                if !mechs.iter().any(|m| m == "SCRAM-SHA-256") {
                    return Err(UpstreamError::UnsupportedAuth);
                }
                let pw = target.password()?;
                let s = ScramSha256::new(pw.as_bytes(), ChannelBinding::unsupported());
                sock.write_all(&build::sasl_initial_response("SCRAM-SHA-256", s.message()))
                    .await?;
                scram = Some(s);
            }
            PgWireBackendMessage::Authentication(Authentication::SASLContinue(data)) => {
                let mut s = scram
                    .take()
                    .ok_or_else(|| UpstreamError::Protocol("unexpected SASL continue".into()))?;
                // The key derivation (4,096 rounds of HMAC by default) takes
                // milliseconds of CPU: off the event loop the sessions share.
                let s = tokio::task::spawn_blocking(move || s.update(&data).map(|()| s))
                    .await
                    .map_err(|e| UpstreamError::Protocol(e.to_string()))?
                    .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
                sock.write_all(&build::sasl_response(s.message())).await?;
                scram = Some(s);
            }
            PgWireBackendMessage::Authentication(Authentication::SASLFinal(data)) => {
                let mut s = scram
                    .take()
                    .ok_or_else(|| UpstreamError::Protocol("unexpected SASL final".into()))?;
                s.finish(&data)
                    .map_err(|e| UpstreamError::Protocol(format!("server signature: {e}")))?;
            }
            PgWireBackendMessage::Authentication(_) => return Err(UpstreamError::UnsupportedAuth),
            PgWireBackendMessage::ErrorResponse(e) => {
                let field = |k: u8| {
                    e.fields
                        .iter()
                        .find(|(f, _)| *f == k)
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default()
                };
                let (code, message) = (field(b'C'), field(b'M'));
                let raw = build::error_response(
                    Severity::Fatal,
                    &code,
                    &format!("target \"{}\": {message}", open.target),
                );
                return Err(UpstreamError::Refused { code, message, raw });
            }
            PgWireBackendMessage::NoticeResponse(_)
            | PgWireBackendMessage::NegotiateProtocolVersion(_) => {}
            other => {
                return Err(UpstreamError::Protocol(format!(
                    "unexpected {other:?} during authentication"
                )));
            }
        }
    }
    let (greeting, key) = greeting(&mut sock, buf, open).await?;
    Ok(Connected {
        stream: sock,
        greeting,
        key,
    })
}

/// Reads the target's messages after AuthenticationOk up to ReadyForQuery
/// or an error, replacing the secret of its BackendKeyData with the
/// client's.
async fn greeting(
    sock: &mut Stream,
    mut buf: BytesMut,
    open: &SessionOpen,
) -> Result<(BytesMut, Option<UpstreamKey>), UpstreamError> {
    let mut out = BytesMut::with_capacity(buf.len() + 64);
    let mut key = None;
    loop {
        let (ty, msg) = read_message(sock, &mut buf, "before ready for query", 1 << 20).await?;
        match ty {
            b'K' => {
                if let Some((pid, secret)) = msg.get(5..).and_then(|b| b.split_first_chunk::<4>()) {
                    key = Some(UpstreamKey {
                        pid: i32::from_be_bytes(*pid),
                        secret: Bytes::copy_from_slice(secret),
                    });
                }
                // The target's process id, the gateway's secret: the
                // target's secret never leaves the agent.
                match &key {
                    Some(k) if open.cancel_secret != 0 => {
                        out.extend_from_slice(&build::backend_key_data(k.pid, open.cancel_secret))
                    }
                    // A key of another shape (protocol 3.2) is not passed
                    // on: the client gets none rather than the target's.
                    _ => {}
                }
            }
            b'Z' | b'E' => {
                out.extend_from_slice(&msg);
                out.extend_from_slice(&buf);
                return Ok((out, key));
            }
            _ => out.extend_from_slice(&msg),
        }
    }
}

/// Whether the greeting ended ready for queries (not with an error).
pub fn greeting_ready(greeting: &[u8]) -> bool {
    greeting.len() >= 6 && greeting.get(greeting.len() - 6) == Some(&b'Z')
}

/// Runs one catalog query of the agent's own on the connection before the
/// client's first byte (so the client never sees it); returns its rows as
/// text. The connection is left ready for queries.
pub async fn agent_query(
    sock: &mut Stream,
    sql: &str,
) -> Result<Vec<Vec<Option<String>>>, UpstreamError> {
    sock.write_all(&build::query(sql)).await?;
    sock.flush().await?;
    let mut buf = BytesMut::with_capacity(4096);
    let mut rows = Vec::new();
    let mut error = None;
    loop {
        let (ty, msg) = read_message(sock, &mut buf, "during a catalog query", 16 << 20).await?;
        match ty {
            b'D' => {
                let values = gatehouse_pgwire_inspect::data_row_values(&msg).ok_or_else(|| {
                    UpstreamError::Protocol("malformed row in a catalog query".into())
                })?;
                rows.push(
                    values
                        .into_iter()
                        .map(|v| v.map(|v| String::from_utf8_lossy(v).into_owned()))
                        .collect(),
                );
            }
            b'E' => error = gatehouse_pgwire_inspect::error_fields(&msg),
            b'Z' => {
                return match error {
                    Some((code, message)) => Err(UpstreamError::Protocol(format!(
                        "catalog query failed: {code} {message}"
                    ))),
                    None => Ok(rows),
                };
            }
            _ => {}
        }
    }
}

/// Reads one whole backend message (type and bytes, header included),
/// refusing lengths outside 4..=`max`.
async fn read_message(
    sock: &mut Stream,
    buf: &mut BytesMut,
    when: &str,
    max: i32,
) -> Result<(u8, BytesMut), UpstreamError> {
    loop {
        if let Some(&[ty, a, b, c, d]) = buf.get(..5) {
            let len = i32::from_be_bytes([a, b, c, d]);
            if !(4..=max).contains(&len) {
                return Err(UpstreamError::Protocol(format!(
                    "message of length {len} {when}"
                )));
            }
            let total = 1 + len as usize;
            if buf.len() >= total {
                return Ok((ty, buf.split_to(total)));
            }
        }
        if sock.read_buf(buf).await? == 0 {
            return Err(UpstreamError::Protocol(format!("connection closed {when}")));
        }
    }
}

/// Asks the target to cancel the query running under `key`. The target
/// answers nothing; it closes the connection once it has the request.
pub async fn cancel(target: &TargetConfig, key: &UpstreamKey) -> Result<(), UpstreamError> {
    let mut sock = dial(target).await?;
    sock.write_all(&build::cancel_request(key.pid, &key.secret))
        .await?;
    sock.flush().await?;
    let mut sink = [0u8; 64];
    let _ = tokio::time::timeout(CONNECT_TIMEOUT, sock.read(&mut sink)).await;
    Ok(())
}

/// TCP, then TLS as `sslmode` says.
async fn dial(target: &TargetConfig) -> Result<Stream, UpstreamError> {
    let mut sock = tokio::time::timeout(
        CONNECT_TIMEOUT,
        TcpStream::connect((target.host.as_str(), target.port)),
    )
    .await
    .map_err(|_| UpstreamError::Io(std::io::ErrorKind::TimedOut.into()))??;
    sock.set_nodelay(true)?;
    if target.sslmode == SslMode::Disable {
        return Ok(Stream::Plain(sock));
    }
    sock.write_all(&build::ssl_request()).await?;
    let mut answer = [0u8; 1];
    sock.read_exact(&mut answer).await?;
    match (answer, target.sslmode) {
        ([b'S'], _) => {}
        ([b'N'], SslMode::Prefer) => return Ok(Stream::Plain(sock)),
        ([b'N'], mode) => return Err(UpstreamError::NoTls(mode)),
        (other, _) => {
            return Err(UpstreamError::Protocol(format!(
                "answer {:?} to SSLRequest",
                other.first()
            )));
        }
    }
    let config = tls_config(target)?;
    let name = ServerName::try_from(target.host.clone())
        .map_err(|e| UpstreamError::Tls(format!("target host as a TLS name: {e}")))?;
    let tls = TlsConnector::from(config)
        .connect(name, sock)
        .await
        .map_err(|e| UpstreamError::Tls(e.to_string()))?;
    Ok(Stream::Tls(Box::new(tls)))
}

fn tls_config(target: &TargetConfig) -> Result<Arc<rustls::ClientConfig>, UpstreamError> {
    let builder = rustls::ClientConfig::builder();
    let config = match (target.sslmode, &target.sslrootcert) {
        (SslMode::VerifyFull, Some(path)) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| UpstreamError::Tls(format!("{}: {e}", path.display())))?;
            for cert in certs {
                let cert =
                    cert.map_err(|e| UpstreamError::Tls(format!("{}: {e}", path.display())))?;
                roots
                    .add(cert)
                    .map_err(|e| UpstreamError::Tls(format!("{}: {e}", path.display())))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        (SslMode::VerifyFull, None) => {
            return Err(UpstreamError::Tls(
                "sslmode verify-full needs sslrootcert".into(),
            ));
        }
        _ => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(EncryptOnly::new()))
            .with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// `sslmode=require`: the handshake is checked, the certificate is not
/// (libpq's meaning of the mode).
#[derive(Debug)]
struct EncryptOnly(rustls::crypto::WebPkiSupportedAlgorithms);

impl EncryptOnly {
    fn new() -> Self {
        Self(rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms)
    }
}

impl rustls::client::danger::ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_schemes()
    }
}

// === impl Stream ===

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
