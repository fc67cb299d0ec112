//! Approval notifications: an HTTP POST with a JSON body to the webhook the
//! policy document names, retried with backoff, never blocking the approval
//! itself. Bodies name the request, the statement and who decided; never a
//! credential.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;

/// Attempts per notification, and the first pause between them (doubled
/// each time).
const ATTEMPTS: u32 = 5;
const FIRST_PAUSE: Duration = Duration::from_millis(200);
/// One attempt's limit.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends `body` to `url` in the background until a 2xx answer or the last
/// attempt.
pub fn notify(url: String, body: serde_json::Value) {
    tokio::spawn(async move {
        let body = body.to_string();
        let mut pause = FIRST_PAUSE;
        for attempt in 1..=ATTEMPTS {
            match tokio::time::timeout(ATTEMPT_TIMEOUT, post(&url, &body)).await {
                Ok(Ok(())) => return,
                Ok(Err(e)) => {
                    tracing::warn!(%url, attempt, error = %e, "approval webhook failed")
                }
                Err(_) => tracing::warn!(%url, attempt, "approval webhook timed out"),
            }
            tokio::time::sleep(pause).await;
            pause *= 2;
        }
        tracing::error!(%url, "approval webhook gave up after {ATTEMPTS} attempts");
    });
}

/// One POST over HTTP/1.1 (plain `http://` URLs).
async fn post(url: &str, body: &str) -> Result<(), String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("bad URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err("only http:// webhooks are supported".into());
    }
    let host = uri.host().ok_or("URL without host")?.to_string();
    let port = uri.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let req = http::Request::post(path)
        .header(http::header::HOST, format!("{host}:{port}"))
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::USER_AGENT, "gatehouse-approvals")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("answered {}", resp.status()))
    }
}
