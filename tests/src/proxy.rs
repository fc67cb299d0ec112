//! A TCP relay standing in for one network link, which a test can cut and
//! heal. A cut link is silent, as in a partition: bytes stop flowing in
//! both directions, new connections are accepted but go nowhere, and
//! nothing is reset. Healing closes what was held so peers reconnect.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// One directed link: connections to `addr` are relayed to the target.
pub struct LinkProxy {
    pub addr: String,
    cut: Arc<watch::Sender<bool>>,
    _rt: tokio::runtime::Runtime,
}

impl LinkProxy {
    /// Starts relaying from a fresh loopback port to `target`.
    pub fn start(target: String) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (tx, _) = watch::channel(false);
        let cut = Arc::new(tx);
        let c = cut.clone();
        rt.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let _ = client.set_nodelay(true);
                tokio::spawn(relay(client, target.clone(), c.subscribe()));
            }
        });
        Self { addr, cut, _rt: rt }
    }

    /// Stops all traffic on the link.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Lets traffic flow again; held connections are closed.
    pub fn heal(&self) {
        self.cut.send_replace(false);
    }
}

async fn relay(client: TcpStream, target: String, mut cut: watch::Receiver<bool>) {
    if *cut.borrow_and_update() {
        let _ = cut.wait_for(|c| !*c).await;
        return;
    }
    let Ok(upstream) = TcpStream::connect(&target).await else {
        return;
    };
    let _ = upstream.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    tokio::join!(pump(cr, uw, cut.clone()), pump(ur, cw, cut));
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut cut: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if *cut.borrow_and_update() {
            let _ = cut.wait_for(|c| !*c).await;
            return;
        }
        tokio::select! {
            n = from.read(&mut buf) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if to.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            },
            _ = cut.changed() => {}
        }
    }
}
