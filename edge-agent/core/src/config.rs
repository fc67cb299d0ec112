//! The agent's configuration file (TOML). It holds the target credentials;
//! they never leave the agent.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The agent's name; its certificate is issued for it.
    pub name: String,
    /// Control-plane QUIC endpoints, tried in order.
    pub servers: Vec<SocketAddr>,
    /// Name the control plane's certificate is checked against.
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// Keys, certificate and the recording spool live here.
    pub data_dir: PathBuf,
    /// A local directory recordings are uploaded to (shorthand for
    /// `[recordings] url`).
    pub recordings_dir: Option<PathBuf>,
    /// The object store recordings are uploaded to.
    pub recordings: Option<gatehouse_recording::store::StoreConfig>,
    #[serde(default)]
    pub spool: SpoolConfig,
    #[serde(default)]
    pub targets: Vec<TargetConfig>,
    /// Threads that run sessions and the tunnel (default 1). One thread
    /// with every session, the QUIC connection and their timers on it costs
    /// the least CPU per statement: nothing crosses threads but the audit
    /// spool's fsync. More threads spread CPU-heavy sessions (masking large
    /// results) over cores at the price of wake-ups between them.
    #[serde(default = "default_threads")]
    pub threads: usize,
}

fn default_threads() -> usize {
    1
}

/// Limits of the local recording spool. Below them, new recorded sessions
/// are refused (running ones carry on).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// Where recordings wait for upload (default `<data dir>/recordings`).
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Most bytes the spool may hold (0: no limit).
    #[serde(default)]
    pub max_bytes: u64,
    /// Free bytes the spool's filesystem must keep.
    #[serde(default = "default_min_free")]
    pub min_free_bytes: u64,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            dir: None,
            max_bytes: 0,
            min_free_bytes: default_min_free(),
        }
    }
}

fn default_min_free() -> u64 {
    256 << 20
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub name: String,
    /// `postgres` (the default) or `ssh`.
    #[serde(default = "default_kind")]
    pub kind: String,
    pub host: String,
    pub port: u16,
    /// Role the agent authenticates as (PostgreSQL), or the default login
    /// (SSH).
    pub user: String,
    /// SSH: the logins a caller may ask for (`<login>@<target>`); default
    /// only `user`.
    #[serde(default)]
    pub logins: Vec<String>,
    /// SSH: a private key (OpenSSH format) the agent logs in with.
    pub ssh_key_file: Option<PathBuf>,
    /// SSH, preferred: the private key of a user CA the target's sshd
    /// trusts (`TrustedUserCAKeys`). Each session logs in with a fresh key
    /// and a certificate for its login only, valid for minutes, with the
    /// caller's identity and the session in its key id.
    pub ssh_user_ca_file: Option<PathBuf>,
    /// SSH: the target's host key (an OpenSSH public-key line), pinned.
    pub ssh_host_key: Option<String>,
    /// SSH: a host CA's public key the target's host certificate must be
    /// signed by (instead of a pinned key).
    pub ssh_host_ca: Option<String>,
    pub password: Option<String>,
    pub password_file: Option<PathBuf>,
    /// TLS to the target, as libpq's `sslmode` (default `prefer`).
    #[serde(default)]
    pub sslmode: SslMode,
    /// CA certificates (PEM) the target's certificate must chain to under
    /// `verify-full`.
    pub sslrootcert: Option<PathBuf>,
}

/// TLS to the target. `verify-ca` is deliberately absent: a gateway that
/// holds credentials checks the name too.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Plain TCP.
    Disable,
    /// TLS when the target offers it, plain otherwise.
    #[default]
    Prefer,
    /// TLS or nothing; the certificate is not checked (encryption only).
    Require,
    /// TLS with a certificate that chains to `sslrootcert` and names `host`.
    VerifyFull,
}

// Never print the password.
impl std::fmt::Debug for TargetConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetConfig")
            .field("name", &self.name)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("kind", &self.kind)
            .field("user", &self.user)
            .field("logins", &self.logins)
            .field("sslmode", &self.sslmode)
            .finish_non_exhaustive()
    }
}

fn default_kind() -> String {
    "postgres".into()
}

fn default_server_name() -> String {
    "localhost".into()
}

// === impl AgentConfig ===

impl AgentConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let cfg: AgentConfig =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        anyhow::ensure!(!cfg.servers.is_empty(), "config lists no servers");
        anyhow::ensure!(
            cfg.recordings_dir.is_some() ^ cfg.recordings.is_some(),
            "set exactly one of recordings_dir, [recordings] url"
        );
        for t in &cfg.targets {
            if t.kind == "ssh" {
                anyhow::ensure!(
                    t.ssh_key_file.is_some() || t.ssh_user_ca_file.is_some(),
                    "target {}: an ssh target needs ssh_key_file or ssh_user_ca_file",
                    t.name
                );
                anyhow::ensure!(
                    t.ssh_host_key.is_some() ^ t.ssh_host_ca.is_some(),
                    "target {}: set exactly one of ssh_host_key, ssh_host_ca (the target's host key is always verified)",
                    t.name
                );
                continue;
            }
            anyhow::ensure!(
                t.kind == "postgres",
                "target {}: kind {:?} is not supported (postgres, ssh)",
                t.name,
                t.kind
            );
            anyhow::ensure!(
                t.password.is_some() ^ t.password_file.is_some(),
                "target {}: set exactly one of password, password_file",
                t.name
            );
            anyhow::ensure!(
                t.sslmode != SslMode::VerifyFull || t.sslrootcert.is_some(),
                "target {}: sslmode verify-full needs sslrootcert",
                t.name
            );
        }
        Ok(cfg)
    }

    /// Where recordings are uploaded.
    pub fn store(&self) -> gatehouse_recording::store::StoreConfig {
        match (&self.recordings, &self.recordings_dir) {
            (Some(r), _) => r.clone(),
            (None, Some(d)) => gatehouse_recording::store::StoreConfig {
                url: d.display().to_string(),
                options: Default::default(),
            },
            (None, None) => Default::default(),
        }
    }

    pub fn target(&self, name: &str) -> Option<&TargetConfig> {
        self.targets.iter().find(|t| t.name == name)
    }
}

// === impl TargetConfig ===

impl TargetConfig {
    /// Reads the credential at the moment of use, so a rotated file is picked up.
    pub fn password(&self) -> std::io::Result<String> {
        match (&self.password, &self.password_file) {
            (Some(p), _) => Ok(p.clone()),
            (None, Some(f)) => Ok(std::fs::read_to_string(f)?
                .trim_end_matches(['\n', '\r'])
                .to_string()),
            (None, None) => Ok(String::new()),
        }
    }
}
