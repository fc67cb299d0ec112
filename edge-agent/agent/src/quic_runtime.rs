//! The tunnel's QUIC connection runs on a thread of its own.
//!
//! quinn's drivers (keep-alives, acknowledgements, loss recovery, the idle
//! timer) are tasks; on the runtime that serves sessions they would wait
//! behind a session's CPU work (authenticating to the target, masking and
//! recording a large value), and a busy agent could miss its keep-alives
//! until the connection times out, killing every other session with it.
//! [`Dedicated`] gives quinn a single-threaded runtime on its own OS thread
//! that does nothing else; session tasks read and write streams from the
//! main runtime as before.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use quinn::{AsyncTimer, AsyncUdpSocket, Runtime, TokioRuntime};
use tokio::runtime::Handle;

/// A quinn runtime whose tasks, timers and socket live on the tunnel
/// thread.
#[derive(Debug)]
pub struct Dedicated(Handle);

// === impl Dedicated ===

impl Dedicated {
    /// The process's tunnel runtime, started on first use.
    pub fn get() -> std::io::Result<Arc<Self>> {
        static HANDLE: OnceLock<Handle> = OnceLock::new();
        if let Some(h) = HANDLE.get() {
            return Ok(Arc::new(Self(h.clone())));
        }
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("quic-tunnel".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let _ = tx.send(Ok(rt.handle().clone()));
                rt.block_on(std::future::pending::<()>());
            })?;
        let handle = rx
            .recv()
            .map_err(|_| std::io::Error::other("the tunnel thread did not start"))??;
        Ok(Arc::new(Self(HANDLE.get_or_init(|| handle).clone())))
    }
}

impl Runtime for Dedicated {
    fn new_timer(&self, i: std::time::Instant) -> Pin<Box<dyn AsyncTimer>> {
        let _g = self.0.enter();
        TokioRuntime.new_timer(i)
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        self.0.spawn(future);
    }

    fn wrap_udp_socket(&self, t: std::net::UdpSocket) -> std::io::Result<Arc<dyn AsyncUdpSocket>> {
        let _g = self.0.enter();
        TokioRuntime.wrap_udp_socket(t)
    }
}
