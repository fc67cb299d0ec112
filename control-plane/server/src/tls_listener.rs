//! TLS listeners for the gRPC ports (API and Raft): connections are counted
//! per source address and in total from accept to close, and the TLS
//! handshake and the first request each have a deadline, so stalled or
//! flooding clients cannot hold the node's descriptors. tonic serves the finished TLS streams.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};

use crate::limits::{ConnLimits, ConnSlot, LogEvery};

/// A TLS connection holding its slot until it closes. Its first request
/// (the HTTP/2 preface, or an HTTP/1.1 request line) must arrive within the
/// stage deadline after the handshake, or the connection is closed.
pub struct Counted {
    inner: TlsStream<TcpStream>,
    _slot: ConnSlot,
    first_request_by: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Connected for Counted {
    type ConnectInfo = TlsConnectInfo<TcpConnectInfo>;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Some(deadline) = this.first_request_by.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no request within the stage deadline",
            )));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.first_request_by = None;
        }
        r
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts on `listener`, admits each connection against `limits`,
/// finishes its TLS handshake within the stage deadline, and yields the
/// streams for tonic's `serve_with_incoming`.
pub fn incoming(
    name: &'static str,
    listener: TcpListener,
    acceptor: TlsAcceptor,
    limits: Arc<ConnLimits>,
) -> ReceiverStream<Result<Counted, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let accept_errors = LogEvery::new(std::time::Duration::from_secs(10));
        let handshake_errors = Arc::new(LogEvery::new(std::time::Duration::from_secs(10)));
        loop {
            let (sock, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    if let Some(n) = accept_errors.tick() {
                        tracing::warn!(listener = name, error = %e, count = n, "accept failed");
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(slot) = limits.admit(peer.ip()) else {
                drop(sock);
                continue;
            };
            let _ = sock.set_nodelay(true);
            let (acceptor, tx, stage) = (acceptor.clone(), tx.clone(), limits.stage());
            let handshake_errors = handshake_errors.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(stage, acceptor.accept(sock)).await {
                    Ok(Ok(inner)) => {
                        let _ = tx
                            .send(Ok(Counted {
                                inner,
                                _slot: slot,
                                first_request_by: Some(Box::pin(tokio::time::sleep(stage))),
                            }))
                            .await;
                    }
                    Ok(Err(e)) => {
                        if let Some(n) = handshake_errors.tick() {
                            tracing::info!(listener = name, %peer, error = %e, count = n, "TLS handshake failed");
                        }
                    }
                    Err(_) => {
                        if let Some(n) = handshake_errors.tick() {
                            tracing::info!(listener = name, %peer, count = n, "TLS handshake did not finish in time");
                        }
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// A server TLS configuration for gRPC (ALPN h2), optionally requiring a
/// client certificate that chains to `client_ca_pem`.
pub fn acceptor(
    chain_pem: &str,
    key_pem: &str,
    client_ca_pem: Option<&str>,
) -> anyhow::Result<TlsAcceptor> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(chain_pem.as_bytes()).collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
    let builder = rustls::ServerConfig::builder();
    // The API port also serves browsers (the SAML routes) over HTTP/1.1;
    // the node-to-node port speaks gRPC only.
    let alpn: Vec<Vec<u8>> = if client_ca_pem.is_some() {
        vec![b"h2".to_vec()]
    } else {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    };
    let mut cfg = match client_ca_pem {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
                roots.add(c?)?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder(Arc::new(roots)).build()?;
            builder
                .with_client_cert_verifier(verifier)
                .with_single_cert(certs, key)?
        }
        None => builder.with_no_client_auth().with_single_cert(certs, key)?,
    };
    cfg.alpn_protocols = alpn;
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}
