//! A minimal PostgreSQL client that keeps every byte it receives, so tests
//! can check exactly what a client sees (SQLSTATEs, and that no secret is
//! ever among the bytes).

use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What one raw session saw.
#[derive(Debug, Default)]
pub struct RawSession {
    /// Every byte received after the TLS handshake.
    pub received: Vec<u8>,
    /// SQLSTATE and message of the first ErrorResponse, if any.
    pub error: Option<(String, String)>,
    /// Whether authentication completed and the session became ready.
    pub ready: bool,
}

fn msg(ty: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![ty];
    v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// Connects over TLS (verifying the gateway against `ca_file`), logs in and
/// runs `queries` with the simple protocol.
pub fn session(
    addr: &str,
    ca_file: &Path,
    user: &str,
    db: &str,
    password: &str,
    queries: &[&str],
) -> RawSession {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run_from(None, addr, ca_file, user, db, password, queries))
}

/// Like [`session`], async, from the source address `src` when given (any
/// of 127.0.0.0/8 on loopback).
pub async fn run_from(
    src: Option<std::net::IpAddr>,
    addr: &str,
    ca_file: &Path,
    user: &str,
    db: &str,
    password: &str,
    queries: &[&str],
) -> RawSession {
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
    let mut sock = match src {
        None => tokio::net::TcpStream::connect(addr).await.unwrap(),
        Some(ip) => {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.bind(std::net::SocketAddr::new(ip, 0)).unwrap();
            s.connect(addr.parse().unwrap()).await.unwrap()
        }
    };
    sock.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await
        .unwrap();
    let mut s = [0u8; 1];
    sock.read_exact(&mut s).await.unwrap();
    assert_eq!(s[0], b'S', "gateway must accept TLS");
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca_file).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let mut tls = tls
        .connect(ServerName::try_from("localhost").unwrap(), sock)
        .await
        .unwrap();
    let mut startup = Vec::new();
    startup.extend_from_slice(&196608i32.to_be_bytes());
    for (k, v) in [("user", user), ("database", db)] {
        startup.extend(cstr(k));
        startup.extend(cstr(v));
    }
    startup.push(0);
    let mut first = ((startup.len() + 4) as i32).to_be_bytes().to_vec();
    first.extend(startup);
    tls.write_all(&first).await.unwrap();

    let mut out = RawSession::default();
    let mut pending: Vec<&str> = queries.to_vec();
    pending.reverse();
    let mut buf = Vec::new();
    loop {
        // Parse complete messages in buf.
        while buf.len() >= 5 {
            let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() < 1 + len {
                break;
            }
            let m: Vec<u8> = buf.drain(..1 + len).collect();
            match m[0] {
                b'R' if m.len() >= 9 && m[5..9] == [0, 0, 0, 3] => {
                    tls.write_all(&msg(b'p', &cstr(password))).await.unwrap();
                }
                b'E' => {
                    let body = &m[5..];
                    let mut fields = body.split(|b| *b == 0).filter(|f| !f.is_empty());
                    let (mut code, mut message) = (String::new(), String::new());
                    for f in fields.by_ref() {
                        match f[0] {
                            b'C' => code = String::from_utf8_lossy(&f[1..]).into(),
                            b'M' => message = String::from_utf8_lossy(&f[1..]).into(),
                            _ => {}
                        }
                    }
                    out.error.get_or_insert((code, message));
                }
                b'Z' => {
                    out.ready = true;
                    match pending.pop() {
                        Some(q) => tls.write_all(&msg(b'Q', &cstr(q))).await.unwrap(),
                        None => {
                            let _ = tls.write_all(&msg(b'X', b"")).await;
                            let _ = tls.shutdown().await;
                        }
                    }
                }
                _ => {}
            }
        }
        let mut chunk = [0u8; 8192];
        let n = tls.read(&mut chunk).await.unwrap_or_default();
        if n == 0 {
            return out;
        }
        out.received.extend_from_slice(&chunk[..n]);
        buf.extend_from_slice(&chunk[..n]);
    }
}
