//! Deadlines before authentication: each stage the client must finish (its
//! key exchange, each authentication request) gets `--handshake-timeout-secs`,
//! as the PostgreSQL ingress's stages do. The version line's deadline is a
//! timeout around russh's `run_stream`.
//!
//! A connection past its deadline is told why when it can be (after the key
//! exchange, a disconnect message), and its socket is cut either way: in the
//! middle of a key exchange russh cannot send a disconnect message yet, and a
//! client that stopped reading would never take one.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

/// Where a connection stands before its session runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stage {
    /// Waiting for the client's key exchange.
    KeyExchange,
    /// Waiting for the client's next authentication request (each request
    /// restarts the deadline; russh ends the connection after
    /// `max_auth_attempts`).
    Authentication,
    /// The gateway checks a credential and admits the session: its own
    /// work, bounded by the cluster's timeouts, not the client's deadline.
    Verifying,
    Authenticated,
}

/// Ends a connection whose client lets a stage before authentication pass
/// its deadline; returns once the client is authenticated or gone.
pub(crate) async fn stage_deadlines(
    mut stage: watch::Receiver<Stage>,
    deadline: Duration,
    handle: russh::server::Handle,
    cut: Cut,
    peer: SocketAddr,
) {
    loop {
        let now = *stage.borrow_and_update();
        let changed = match now {
            Stage::Authenticated => return,
            Stage::Verifying => stage.changed().await,
            Stage::KeyExchange | Stage::Authentication => {
                match tokio::time::timeout(deadline, stage.changed()).await {
                    Ok(changed) => changed,
                    Err(_) => {
                        let what = if now == Stage::KeyExchange {
                            "key exchange"
                        } else {
                            "authentication"
                        };
                        tracing::debug!(%peer, stage = what, "SSH stage did not finish in time");
                        if now == Stage::Authentication {
                            let why = format!("{what} did not finish in {}s", deadline.as_secs());
                            let told = handle.disconnect(
                                russh::Disconnect::ByApplication,
                                why,
                                String::new(),
                            );
                            let _ = tokio::time::timeout(Duration::from_secs(1), told).await;
                            // Time for the message to leave before the cut.
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        cut.cut();
                        return;
                    }
                }
            }
        };
        if changed.is_err() {
            return;
        }
    }
}

/// Cuts a [`Cuttable`] socket: its reads end and its writes fail, so the
/// session reading and writing it ends and drops it.
#[derive(Clone, Default)]
pub(crate) struct Cut(Arc<CutState>);

#[derive(Default)]
struct CutState {
    done: AtomicBool,
    reader: AtomicWaker,
    writer: AtomicWaker,
}

// === impl Cut ===

impl Cut {
    fn cut(&self) {
        self.0.done.store(true, Ordering::Release);
        self.0.reader.wake();
        self.0.writer.wake();
    }

    fn is_cut(&self) -> bool {
        self.0.done.load(Ordering::Acquire)
    }
}

/// The client's socket as russh sees it: the socket itself until it is cut.
pub(crate) struct Cuttable {
    pub(crate) inner: TcpStream,
    pub(crate) cut: Cut,
}

// === impl Cuttable ===

impl AsyncRead for Cuttable {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.cut.0.reader.register(cx.waker());
        if self.cut.is_cut() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Cuttable {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.cut.0.writer.register(cx.waker());
        if self.cut.is_cut() {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.cut.0.writer.register(cx.waker());
        if self.cut.is_cut() {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
