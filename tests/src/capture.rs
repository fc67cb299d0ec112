//! Records real client ↔ PostgreSQL traffic for the inspector's golden
//! tests: a TCP proxy on loopback that writes every chunk it relays, in the
//! order it relayed them.
//!
//! One file per connection. File format (`*.pgcap`): a sequence of records, each one byte of
//! direction (`F` frontend → backend, `B` backend → frontend), a 4-byte
//! big-endian length, and the bytes as they were read from the socket.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A proxy that captures the connections it relays.
pub struct CaptureProxy {
    pub port: u16,
    records: Arc<Mutex<Vec<Vec<u8>>>>,
    open: Arc<AtomicUsize>,
    /// Runs the proxy; its tasks end when it is dropped.
    _rt: tokio::runtime::Runtime,
}

impl CaptureProxy {
    /// Listens on a free loopback port and relays to `upstream_port`.
    pub fn start(upstream_port: u16) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let port = listener.local_addr().unwrap().port();
        let records = Arc::new(Mutex::new(Vec::new()));
        let r = records.clone();
        let open = Arc::new(AtomicUsize::new(0));
        let o = open.clone();
        rt.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let r = r.clone();
                let o = o.clone();
                let conn = {
                    let mut all = r.lock().unwrap();
                    all.push(Vec::new());
                    all.len() - 1
                };
                o.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let _closed = Closed(o);
                    let Ok(up) = TcpStream::connect(("127.0.0.1", upstream_port)).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut ur, mut uw) = up.into_split();
                    let r2 = r.clone();
                    tokio::join!(
                        pump(b'F', &mut cr, &mut uw, &r, conn),
                        pump(b'B', &mut ur, &mut cw, &r2, conn)
                    );
                });
            }
        });
        Self {
            port,
            records,
            open,
            _rt: rt,
        }
    }

    /// Every connection's capture once all have closed, in the order they
    /// were accepted, and clears them.
    pub fn take(&self) -> Vec<Vec<u8>> {
        crate::wait_until(
            "captured connections closed",
            std::time::Duration::from_secs(10),
            || (self.open.load(Ordering::SeqCst) == 0).then_some(()),
        );
        std::mem::take(&mut *self.records.lock().unwrap())
    }
}

async fn pump(
    dir: u8,
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    records: &Mutex<Vec<Vec<u8>>>,
    conn: usize,
) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        {
            let mut all = records.lock().unwrap();
            let r = &mut all[conn];
            r.push(dir);
            r.extend_from_slice(&(n as u32).to_be_bytes());
            r.extend_from_slice(&buf[..n]);
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// Counts a relayed connection as closed when dropped.
struct Closed(Arc<AtomicUsize>);

impl Drop for Closed {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
