//! `gatehouse login`, `gatehouse token`, `gatehouse logout`: a Gatehouse
//! access token from the company's OpenID Provider (authorization code
//! with PKCE on a loopback redirect, or the device flow), or from a
//! workload's own token (token exchange), kept in an owner-only file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use gatehouse_proto::v1::{
    BeginDeviceLoginRequest, BeginLoginRequest, CompleteLoginRequest, ExchangeTokenRequest,
    LoginResponse, PollDeviceLoginRequest,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Ctx;
use crate::outln;
use crate::output;

/// How long the loopback listener waits for the provider's redirect.
const REDIRECT_WAIT: Duration = Duration::from_secs(300);

#[derive(Args)]
pub struct LoginArgs {
    /// The trusted issuer to log in with (needed when there are several).
    #[arg(long)]
    pub issuer: Option<String>,
    /// Use the device authorization flow (for machines without a browser).
    #[arg(long)]
    pub device: bool,
    /// Do not try to open a browser; only print the address.
    #[arg(long)]
    pub no_browser: bool,
    /// A workload token file (a CI job's or Kubernetes service account's
    /// JWT) to exchange instead of logging in as a person; read again on
    /// every refresh.
    #[arg(long, requires = "service_account")]
    pub workload_token_file: Option<PathBuf>,
    /// The service account whose workload binding the token matches.
    #[arg(long)]
    pub service_account: Option<String>,
    /// Log in with an ID token a trusted OpenID Provider already issued
    /// for Gatehouse's client id (a file holding the JWT).
    #[arg(long, conflicts_with_all = ["device", "workload_token_file"])]
    pub id_token_file: Option<PathBuf>,
}

/// What the token file holds.
#[derive(Serialize, Deserialize)]
pub struct Saved {
    pub api: String,
    pub access_token: String,
    pub expires_ms: i64,
    pub identity: String,
    pub issuer: String,
    pub groups: Vec<String>,
    /// How to get a new token without the person: a workload token file
    /// and the service account.
    #[serde(default)]
    pub workload_token_file: Option<PathBuf>,
    #[serde(default)]
    pub service_account: Option<String>,
    /// How the person logged in (issuer name, device flow), to log in the
    /// same way again when the token has expired.
    #[serde(default)]
    pub person_login: Option<PersonLogin>,
}

#[derive(Clone, Serialize, Deserialize)]
pub struct PersonLogin {
    pub issuer: String,
    pub device: bool,
}

/// The token file: --token-file, GATEHOUSE_TOKEN_FILE, or
/// $XDG_CONFIG_HOME/gatehouse/token.json (~/.config/...).
pub fn token_path(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .context("no token file: set GATEHOUSE_TOKEN_FILE or HOME")?;
    Ok(base.join("gatehouse").join("token.json"))
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn save(path: &Path, s: &Saved) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let data = serde_json::to_vec_pretty(s)?;
    gatehouse_secure_fs::write_private(path, &data)
        .with_context(|| format!("writing {}", path.display()))
}

/// The saved token, if it is still valid for at least a minute; a workload
/// login is refreshed by exchanging its token file again.
pub async fn current(ctx: &Ctx, path: &Path) -> anyhow::Result<Saved> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "not logged in (no {}): run `gatehouse login`",
            path.display()
        )
    })?;
    let saved: Saved = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a Gatehouse token file", path.display()))?;
    if saved.expires_ms > now_ms() + 60_000 {
        return Ok(saved);
    }
    match (&saved.workload_token_file, &saved.service_account) {
        (Some(f), Some(sa)) => {
            let r = exchange(ctx, f, Some(sa)).await?;
            let s = to_saved(ctx, r, Some(f.clone()), Some(sa.clone()));
            save(path, &s)?;
            Ok(s)
        }
        _ => match &saved.person_login {
            // The provider vouches again: the same flow as the first login
            // (its instructions on stderr; the token alone on stdout).
            Some(how) => {
                eprintln!(
                    "the access token of {} has expired; logging in again",
                    saved.identity
                );
                let args = LoginArgs {
                    issuer: Some(how.issuer.clone()),
                    device: how.device,
                    no_browser: false,
                    workload_token_file: None,
                    service_account: None,
                    id_token_file: None,
                };
                let r = if how.device {
                    device(&args, ctx).await?
                } else {
                    browser(&args, ctx).await?
                };
                let mut s = to_saved(ctx, r, None, None);
                s.person_login = Some(how.clone());
                save(path, &s)?;
                Ok(s)
            }
            None => anyhow::bail!(
                "the access token of {} has expired; run `gatehouse login` again",
                saved.identity
            ),
        },
    }
}

fn to_saved(ctx: &Ctx, r: LoginResponse, file: Option<PathBuf>, sa: Option<String>) -> Saved {
    Saved {
        api: ctx.api.clone(),
        access_token: r.access_token,
        expires_ms: r.expires_ms,
        identity: r.identity,
        issuer: r.issuer,
        groups: r.groups,
        workload_token_file: file,
        service_account: sa,
        person_login: None,
    }
}

/// A token read from `file`, exchanged for an access token: a workload's
/// JWT acting as service account `sa`, or (no account) a person's ID token.
async fn exchange(ctx: &Ctx, file: &Path, sa: Option<&str>) -> anyhow::Result<LoginResponse> {
    let (what, token_type, refusal) = match sa {
        Some(_) => (
            "workload token",
            "urn:ietf:params:oauth:token-type:jwt",
            "token exchange refused",
        ),
        None => (
            "ID token",
            "urn:ietf:params:oauth:token-type:id_token",
            "login refused",
        ),
    };
    let jwt = std::fs::read_to_string(file)
        .with_context(|| format!("reading the {what} {}", file.display()))?;
    let mut c = ctx.identity().await?;
    Ok(c.exchange_token(ExchangeTokenRequest {
        subject_token: jwt.trim().to_string(),
        subject_token_type: token_type.into(),
        service_account: sa.unwrap_or_default().to_string(),
    })
    .await
    .map_err(|s| anyhow::anyhow!("{refusal}: {}", s.message()))?
    .into_inner())
}

pub async fn login(args: &LoginArgs, ctx: &Ctx, path: &Path) -> anyhow::Result<()> {
    let saved = if let Some(f) = &args.id_token_file {
        to_saved(ctx, exchange(ctx, f, None).await?, None, None)
    } else if let (Some(f), Some(sa)) = (&args.workload_token_file, &args.service_account) {
        let r = exchange(ctx, f, Some(sa)).await?;
        to_saved(ctx, r, Some(f.clone()), Some(sa.clone()))
    } else {
        let r = if args.device {
            device(args, ctx).await?
        } else {
            browser(args, ctx).await?
        };
        let mut s = to_saved(ctx, r, None, None);
        // user:<issuer name>/<subject>: log in at the same issuer again.
        s.person_login = s
            .identity
            .strip_prefix("user:")
            .and_then(|rest| rest.split_once('/'))
            .map(|(issuer, _)| PersonLogin {
                issuer: issuer.to_string(),
                device: args.device,
            });
        s
    };
    save(path, &saved)?;
    if ctx.json {
        output::json(&json!({"identity": saved.identity, "issuer": saved.issuer,
            "groups": saved.groups, "expires_ms": saved.expires_ms}))?;
    } else {
        outln!(
            "logged in as {} ({}), groups [{}]; token valid for {} min, saved in {}",
            saved.identity,
            saved.issuer,
            saved.groups.join(", "),
            (saved.expires_ms - now_ms()) / 60_000,
            path.display()
        )?;
    }
    Ok(())
}

async fn browser(args: &LoginArgs, ctx: &Ctx) -> anyhow::Result<LoginResponse> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("opening the loopback listener for the provider's redirect")?;
    let redirect_uri = format!("http://{}/callback", listener.local_addr()?);
    let mut c = ctx.identity().await?;
    let begin = c
        .begin_login(BeginLoginRequest {
            issuer: args.issuer.clone().unwrap_or_default(),
            redirect_uri,
        })
        .await
        .map_err(|s| anyhow::anyhow!("login refused: {}", s.message()))?
        .into_inner();
    eprintln!(
        "To log in with {}, open this address in your browser:\n{}",
        begin.issuer, begin.authorization_url
    );
    if !args.no_browser
        && (std::env::var_os("DISPLAY").is_some() || std::env::var_os("WAYLAND_DISPLAY").is_some())
    {
        let _ = std::process::Command::new("xdg-open")
            .arg(&begin.authorization_url)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
    }
    let (code, returned_state) = tokio::time::timeout(REDIRECT_WAIT, redirect(&listener))
        .await
        .context("no redirect from the provider within 5 minutes")??;
    c.complete_login(CompleteLoginRequest {
        state: begin.state,
        code,
        returned_state,
    })
    .await
    .map(|r| r.into_inner())
    .map_err(|s| anyhow::anyhow!("login refused: {}", s.message()))
}

/// Connections the loopback listener serves at once; more are closed.
const REDIRECT_CONNS: usize = 8;
/// Each connection's deadline to send its request head and be answered.
const REDIRECT_STAGE: Duration = Duration::from_secs(10);
/// Largest request head read.
const REDIRECT_HEAD: usize = 16 << 10;

/// Waits for the provider's redirect to the loopback listener; answers the
/// browser and returns the code and state. Every connection is served on
/// its own, within a deadline, and only a few at once, so a stray or stalled
/// local connection cannot hold up the real redirect.
async fn redirect(listener: &tokio::net::TcpListener) -> anyhow::Result<(String, String)> {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(REDIRECT_CONNS));
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    loop {
        tokio::select! {
            got = rx.recv() => {
                return got.unwrap_or_else(|| Err(anyhow::anyhow!("the redirect listener stopped")));
            }
            accepted = listener.accept() => {
                let (conn, _) = accepted?;
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    continue;
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    if let Ok(Some(outcome)) = tokio::time::timeout(REDIRECT_STAGE, callback(conn)).await {
                        let _ = tx.send(outcome).await;
                    }
                });
            }
        }
    }
}

/// One connection to the loopback listener: `None` when it was not the
/// provider's redirect (answered 404), else what the redirect carried.
async fn callback(mut s: tokio::net::TcpStream) -> Option<anyhow::Result<(String, String)>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 2048];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < REDIRECT_HEAD {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let head = String::from_utf8_lossy(&buf);
    let target = head
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("GET "))
        .and_then(|l| l.split(' ').next())
        .unwrap_or("");
    let Some(query) = target.strip_prefix("/callback?") else {
        let _ = s
            .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            .await;
        return None;
    };
    let params: std::collections::HashMap<String, String> =
        url::form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
    let (status, body) = match (params.get("code"), params.get("error")) {
        (Some(_), _) => ("200 OK", "Logged in to Gatehouse. You can close this tab."),
        (_, Some(_)) => (
            "400 Bad Request",
            "The login was refused; see the terminal.",
        ),
        _ => ("400 Bad Request", "No code in the redirect."),
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(reply.as_bytes()).await;
    let _ = s.shutdown().await;
    if let Some(e) = params.get("error") {
        return Some(Err(anyhow::anyhow!(
            "the provider refused the login: {e}{}",
            params
                .get("error_description")
                .map(|d| format!(" ({d})"))
                .unwrap_or_default()
        )));
    }
    let code = params.get("code").cloned()?;
    Some(Ok((code, params.get("state").cloned().unwrap_or_default())))
}

async fn device(args: &LoginArgs, ctx: &Ctx) -> anyhow::Result<LoginResponse> {
    let mut c = ctx.identity().await?;
    let begin = c
        .begin_device_login(BeginDeviceLoginRequest {
            issuer: args.issuer.clone().unwrap_or_default(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("login refused: {}", s.message()))?
        .into_inner();
    eprintln!(
        "To log in, open {} and enter the code {}\n(or open {})",
        begin.verification_uri, begin.user_code, begin.verification_uri_complete
    );
    loop {
        let r = c
            .poll_device_login(PollDeviceLoginRequest {
                device_state: begin.device_state.clone(),
            })
            .await
            .map_err(|s| anyhow::anyhow!("login refused: {}", s.message()))?
            .into_inner();
        if let Some(l) = r.login {
            return Ok(l);
        }
        anyhow::ensure!(
            now_ms() < begin.expires_ms,
            "the device code expired before it was approved"
        );
        tokio::time::sleep(Duration::from_secs(u64::from(
            r.interval_seconds.clamp(1, 10),
        )))
        .await;
    }
}

/// `gatehouse token`: prints a valid access token.
pub async fn token(ctx: &Ctx, path: &Path) -> anyhow::Result<()> {
    let s = current(ctx, path).await?;
    if ctx.json {
        output::json(
            &json!({"access_token": s.access_token, "expires_ms": s.expires_ms,
            "identity": s.identity}),
        )?;
    } else {
        outln!("{}", s.access_token)?;
    }
    Ok(())
}

/// `gatehouse logout`: forgets the token.
pub fn logout(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(outln!("logged out; removed {}", path.display())?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(outln!("not logged in")?),
        Err(e) => Err(anyhow::Error::new(e).context(format!("removing {}", path.display()))),
    }
}
