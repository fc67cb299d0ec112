//! `gatehouse ssh`: short-lived OpenSSH certificates from the cluster's SSH
//! CA, and an OpenSSH client configuration that reaches every SSH target
//! the caller may use with plain `ssh <target>`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use gatehouse_proto::v1::{IssueSshCertificateRequest, ListRequest};
use serde_json::json;
use ssh_key::{LineEnding, PrivateKey};

use super::Ctx;
use crate::outln;
use crate::output;

#[derive(Subcommand)]
pub enum SshCmd {
    /// Get an OpenSSH user certificate for your identity (a fresh key kept
    /// beside it), valid for the policy's `ssh.certificate_ttl` at most and
    /// never past your access token; plain `ssh` then logs in to the
    /// gateway with it.
    Login(LoginArgs),
    /// Print an OpenSSH client configuration: a Host block for each SSH
    /// target you may use, and the `@cert-authority` line that trusts the
    /// gateway's host certificates (also written to the known-hosts file
    /// the blocks name). Append it to ~/.ssh/config.
    Config(ConfigArgs),
}

#[derive(Args)]
pub struct LoginArgs {
    /// The private key's file; the certificate goes beside it with
    /// `-cert.pub` (default ~/.ssh/gatehouse).
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// How long the certificate should be valid (90s, 15m, 8h, 1d); the
    /// policy's limit and your token's expiry cap it.
    #[arg(long, value_parser = super::rules::duration_secs)]
    pub ttl: Option<u64>,
    /// Also add the key and its certificate to the running ssh-agent
    /// (SSH_AUTH_SOCK) until the certificate expires.
    #[arg(long)]
    pub add_to_agent: bool,
}

#[derive(Args)]
pub struct ConfigArgs {
    /// The key `gatehouse ssh login` wrote (default ~/.ssh/gatehouse).
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// Where the `@cert-authority` line is written (default
    /// ~/.ssh/gatehouse_known_hosts).
    #[arg(long)]
    pub known_hosts: Option<PathBuf>,
    /// The gateway's host name as clients reach it (default: the API
    /// address's host).
    #[arg(long)]
    pub host: Option<String>,
}

pub async fn exec(cmd: &SshCmd, ctx: &Ctx) -> anyhow::Result<()> {
    match cmd {
        SshCmd::Login(a) => login(a, ctx).await,
        SshCmd::Config(a) => config(a, ctx).await,
    }
}

fn ssh_dir() -> anyhow::Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set: pass --key-file")?;
    Ok(PathBuf::from(home).join(".ssh"))
}

fn key_path(given: &Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match given {
        Some(p) => Ok(p.clone()),
        None => Ok(ssh_dir()?.join("gatehouse")),
    }
}

/// `<key>-cert.pub`, where OpenSSH looks for a key's certificate.
fn cert_path(key: &Path) -> PathBuf {
    let mut name = key.as_os_str().to_os_string();
    name.push("-cert.pub");
    PathBuf::from(name)
}

async fn login(a: &LoginArgs, ctx: &Ctx) -> anyhow::Result<()> {
    let key_file = key_path(&a.key_file)?;
    if let Some(dir) = key_file.parent().filter(|d| !d.as_os_str().is_empty()) {
        gatehouse_secure_fs::private_dir(dir)
            .with_context(|| format!("making {} owner-only", dir.display()))?;
    }
    let seed: [u8; 32] = rand::random();
    let mut key = PrivateKey::from(ssh_key::private::Ed25519Keypair::from_seed(&seed));
    key.set_comment("gatehouse");
    let public = key
        .public_key()
        .to_openssh()
        .context("encoding the public key")?;
    let mut c = ctx.admin().await?;
    let r = c
        .issue_ssh_certificate(IssueSshCertificateRequest {
            public_key: public,
            ttl_secs: a.ttl.unwrap_or(0),
        })
        .await?
        .into_inner();
    let private = key
        .to_openssh(LineEnding::LF)
        .context("encoding the private key")?;
    gatehouse_secure_fs::write_private(&key_file, private.as_bytes())
        .with_context(|| format!("writing {}", key_file.display()))?;
    let cert_file = cert_path(&key_file);
    std::fs::write(&cert_file, format!("{}\n", r.certificate))
        .with_context(|| format!("writing {}", cert_file.display()))?;
    let left_secs = ((r.valid_before_ms - super::login::now_ms()) / 1000).max(1);
    if a.add_to_agent {
        let status = std::process::Command::new("ssh-add")
            .arg("-t")
            .arg(left_secs.to_string())
            .arg(&key_file)
            .stdout(std::process::Stdio::null())
            .status()
            .context("running ssh-add (is OpenSSH's client installed?)")?;
        if !status.success() {
            anyhow::bail!(
                "ssh-add could not add {} to the ssh-agent (is SSH_AUTH_SOCK set?)",
                key_file.display()
            );
        }
    }
    if ctx.json {
        output::json(&json!({"key_file": key_file, "certificate_file": cert_file,
            "serial": r.serial, "identity": r.key_id, "valid_before_ms": r.valid_before_ms}))?;
    } else {
        outln!(
            "SSH certificate for {} (serial {}) in {}, valid for {} s{}",
            r.key_id,
            r.serial,
            cert_file.display(),
            left_secs,
            if a.add_to_agent {
                "; added to the ssh-agent"
            } else {
                ""
            }
        )?;
    }
    Ok(())
}

async fn config(a: &ConfigArgs, ctx: &Ctx) -> anyhow::Result<()> {
    let key_file = key_path(&a.key_file)?;
    let known_hosts = match &a.known_hosts {
        Some(p) => p.clone(),
        None => ssh_dir()?.join("gatehouse_known_hosts"),
    };
    let host = match &a.host {
        Some(h) => h.clone(),
        None => url::Url::parse(&ctx.api)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string))
            .context("the API address names no host: pass --host")?,
    };
    let mut c = ctx.admin().await?;
    let s = c.get_ssh_setup(ListRequest {}).await?.into_inner();
    let port = s.port;
    let mut names: Vec<String> = s.host_names.clone();
    if !names.contains(&host) {
        names.push(host.clone());
    }
    let patterns: Vec<String> = names
        .iter()
        .map(|n| {
            if port == 22 {
                n.clone()
            } else {
                format!("[{n}]:{port}")
            }
        })
        .collect();
    let line = format!("@cert-authority {} {}", patterns.join(","), s.ca_public_key);
    if let Some(dir) = known_hosts.parent().filter(|d| !d.as_os_str().is_empty()) {
        gatehouse_secure_fs::private_dir(dir)
            .with_context(|| format!("making {} owner-only", dir.display()))?;
    }
    std::fs::write(&known_hosts, format!("{line}\n"))
        .with_context(|| format!("writing {}", known_hosts.display()))?;
    if !s.host_names.contains(&host) {
        eprintln!(
            "note: the gateway's host certificate names {}, not {host}; pass --host with one of them",
            s.host_names.join(", ")
        );
    }
    let mut out = format!(
        "# Gatehouse SSH ({}): the gateway's host keys are certified by the cluster's SSH CA.\n\
         # {} holds:\n# {line}\n# Get a certificate first: gatehouse ssh login\n",
        ctx.api,
        known_hosts.display()
    );
    for t in &s.targets {
        out.push_str(&format!(
            "\nHost {name}\n    HostName {host}\n    Port {port}\n    User {name}\n    \
             IdentityFile {key}\n    CertificateFile {cert}\n    IdentitiesOnly yes\n    \
             UserKnownHostsFile {kh}\n    StrictHostKeyChecking yes\n",
            name = t.name,
            key = key_file.display(),
            cert = cert_path(&key_file).display(),
            kh = known_hosts.display(),
        ));
        if !t.default_login.is_empty() {
            out.push_str(&format!(
                "    # logs in as {}; another login: ssh -l <login>@{} {}\n",
                t.default_login, t.name, t.name
            ));
        }
    }
    if s.targets.is_empty() {
        out.push_str("\n# No SSH target admits you yet.\n");
    }
    print!("{out}");
    Ok(())
}
