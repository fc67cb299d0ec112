//! A throwaway PostgreSQL server from the machine's PostgreSQL binaries, for
//! `gatehouse dev` and the tests. PostgreSQL refuses to run as root, so when
//! we are root the server runs as the `postgres` system user.

use std::path::{Path, PathBuf};

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

/// A running server; stopped on drop.
pub struct LocalPostgres {
    pub bin: PathBuf,
    pub dir: PathBuf,
    pub port: u16,
    pub superuser: String,
    stopped: bool,
}

/// Finds `initdb`/`pg_ctl`: `$PG_BIN`, then `pg_config --bindir`, then the
/// newest `/usr/lib/postgresql/*/bin`.
pub fn find_bin() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("PG_BIN") {
        let p = PathBuf::from(p);
        if p.join("initdb").exists() {
            return Some(p);
        }
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if p.join("initdb").exists() {
            return Some(p);
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    found.sort();
    found.pop()
}

pub(crate) fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// Runs a PostgreSQL binary, as `postgres` when we are root.
fn pg_command(bin: &Path, tool: &str) -> Command {
    pg_command_in(bin, tool, None)
}

/// Like [`pg_command`], inside the network namespace `netns` if given.
fn pg_command_in(bin: &Path, tool: &str, netns: Option<&str>) -> Command {
    let mut argv: Vec<std::ffi::OsString> = Vec::new();
    if let Some(ns) = netns {
        argv.extend(["ip", "netns", "exec", ns].map(Into::into));
    }
    if is_root() {
        argv.extend(["runuser", "-u", "postgres", "--"].map(Into::into));
    }
    argv.push(bin.join(tool).into_os_string());
    let mut c = Command::new(&argv[0]);
    c.args(&argv[1..]);
    c
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

// === impl LocalPostgres ===

impl LocalPostgres {
    /// initdb (SCRAM for TCP connections) and start on a free loopback port,
    /// in a fresh directory under the system temp dir (reachable by the
    /// `postgres` user even when our own directories are private). The
    /// directory is removed when the server stops.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_in(None)
    }

    /// Like [`LocalPostgres::start`], with the server listening on the
    /// loopback of the network namespace `netns` (its Unix socket, used for
    /// administration, stays reachable from everywhere).
    pub fn start_in(netns: Option<&str>) -> anyhow::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let bin = find_bin().context("no PostgreSQL server binaries found (install postgresql)")?;
        let dir = &std::env::temp_dir().join(format!(
            "gatehouse-pg-{}",
            hex::encode(rand::random::<[u8; 8]>())
        ));
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
        let superuser = if is_root() {
            "postgres".to_string()
        } else {
            whoami()
        };
        if is_root() {
            let st = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir)
                .status()?;
            anyhow::ensure!(st.success(), "chown of {} failed", dir.display());
        }
        let data = dir.join("data");
        let out = pg_command(&bin, "initdb")
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                &superuser,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--no-sync",
            ])
            .stdin(Stdio::null())
            .output()
            .context("running initdb")?;
        anyhow::ensure!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port()?;
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -c port={port} -k {} -c fsync=off -c max_connections=200 -c log_connections=on",
            dir.display()
        );
        let out = pg_command_in(&bin, "pg_ctl", netns)
            .arg("-D")
            .arg(&data)
            .args(["-o", &opts, "-l"])
            .arg(dir.join("postgres.log"))
            .args(["-w", "-t", "60", "start"])
            .stdin(Stdio::null())
            .output()
            .context("running pg_ctl start")?;
        anyhow::ensure!(
            out.status.success(),
            "pg_ctl start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pg = Self {
            bin,
            dir: dir.to_path_buf(),
            port,
            superuser,
            stopped: false,
        };
        pg.wait_ready()?;
        Ok(pg)
    }

    fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.psql_super("postgres", "select 1").is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        anyhow::bail!("PostgreSQL did not become ready")
    }

    /// Runs SQL as the superuser over the Unix socket; returns unaligned output.
    pub fn psql_super(&self, db: &str, sql: &str) -> anyhow::Result<String> {
        let out = pg_command(&self.bin, "psql")
            .arg("-h")
            .arg(&self.dir)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                &self.superuser,
                "-d",
                db,
            ])
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .stdin(Stdio::null())
            .output()
            .context("running psql")?;
        anyhow::ensure!(
            out.status.success(),
            "psql: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Creates a login role with a SCRAM password and a database it owns.
    pub fn create_role_and_db(&self, role: &str, password: &str, db: &str) -> anyhow::Result<()> {
        self.psql_super(
            "postgres",
            &format!("set password_encryption = 'scram-sha-256'; create role {role} login password '{password}'"),
        )?;
        self.psql_super("postgres", &format!("create database {db} owner {role}"))?;
        Ok(())
    }

    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let _ = pg_command(&self.bin, "pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "fast", "-w", "stop"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        self.stop();
    }
}

fn whoami() -> String {
    std::env::var("USER").unwrap_or_else(|_| "postgres".into())
}
