//! Harness for end-to-end tests: real `gatehouse-server` and
//! `gatehouse-agent` processes, a real PostgreSQL, the real `psql`, and the
//! `gatehouse` CLI, all on loopback in a temp dir.

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod capture;
pub mod cluster;
pub mod netns;
pub mod oidc;
pub mod proxy;
pub mod rawpg;
pub mod ssh;
pub mod tpg;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub use gatehouse_cli::postgres::LocalPostgres;

/// Password of the role the agent uses; tests grep for it everywhere.
pub const AGENT_PASSWORD: &str = "Upstream-Secret-7f3a9c";
pub const AGENT_ROLE: &str = "gatehouse_agent";

/// Directory of the workspace's built binaries.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    if dir.ends_with("deps") {
        dir.parent().unwrap().to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} missing: build with cargo build --workspace first",
        p.display()
    );
    p
}

/// Polls `f` until it returns Some or the timeout passes.
pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A running process, killed on drop.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

/// The key-encryption key every server of a test is started with (in the
/// environment, outside every data directory).
pub const TEST_KEK: &str = "5e1f0c0ffee5e1f0c0ffee5e1f0c0ffee5e1f0c0ffee5e1f0c0ffee5e1f0c0ff";

/// Writes a secret to a file of its own (tokens go to processes as files,
/// never on their command line) and returns the path.
pub fn secret_file(dir: &Path, name: &str, secret: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, secret).unwrap();
    p
}

impl Proc {
    pub fn spawn(bin: &Path, args: &[String], log: &Path) -> Self {
        let f = std::fs::File::create(log).unwrap();
        let child = Command::new(bin)
            .args(args)
            .env("RUST_LOG", "info")
            .env("GATEHOUSE_KEK", TEST_KEK)
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap();
        Self {
            child,
            log: log.to_path_buf(),
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
        // A failing test shows what each of its processes said last, so a
        // failure seen once in CI can be read after its temp dir is gone.
        if std::thread::panicking() {
            let text = self.log_text();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            let name = self.log.file_name().unwrap_or_default().to_string_lossy();
            eprintln!("--- last {} lines of {name} ---", tail.len());
            for l in tail {
                eprintln!("{l}");
            }
        }
    }
}

/// A whole deployment: PostgreSQL, one server, one agent serving target `db`.
pub struct Stack {
    pub pg: LocalPostgres,
    pub server: Proc,
    pub agent: Option<Proc>,
    /// "serving sessions" lines in agent.log before the last start_agent.
    pub agent_serving_before: usize,
    pub api: String,
    pub pg_addr: String,
    /// The SSH ingress (`host:port`).
    pub ssh_addr: String,
    pub tunnel: String,
    /// The API key of `sa:gatehouse-admin` (roles admin and auditor),
    /// which the bootstrap token created.
    pub token: String,
    /// The bootstrap admin token (break-glass only).
    pub break_glass: String,
    pub ca_file: PathBuf,
    pub recordings: PathBuf,
    pub agent_config: PathBuf,
    /// The S3-compatible server recordings go to, when the stack uses one.
    pub s3: Option<S3Server>,
    /// Extra environment of the agent processes started from now on.
    pub agent_env: Vec<(String, String)>,
    /// Last, so it is removed after the processes: a failing test prints
    /// their logs as they are dropped.
    pub tmp: tempfile::TempDir,
}

/// A real S3-compatible server (s3s-fs) on a loopback port, storing its
/// buckets as directories under `root`. It can be stopped and started
/// again on the same port with the same data.
pub struct S3Server {
    pub root: PathBuf,
    pub port: u16,
    pub bucket: String,
    proc: Option<Proc>,
    log: PathBuf,
}

pub const S3_ACCESS_KEY: &str = "gatehouse-test";
pub const S3_SECRET_KEY: &str = "s3cr3t-never-in-evidence";

impl S3Server {
    pub fn start(dir: &Path) -> Self {
        let root = dir.join("s3");
        let bucket = "recordings".to_string();
        std::fs::create_dir_all(root.join(&bucket)).unwrap();
        let port = free_port();
        let mut s = Self {
            root,
            port,
            bucket,
            proc: None,
            log: dir.join("s3.log"),
        };
        s.resume();
        s
    }

    /// Starts (again) on the same port and data.
    pub fn resume(&mut self) {
        let p = Proc::spawn(
            Path::new("s3s-fs"),
            &[
                "--host".into(),
                "127.0.0.1".into(),
                "--port".into(),
                self.port.to_string(),
                "--access-key".into(),
                S3_ACCESS_KEY.into(),
                "--secret-key".into(),
                S3_SECRET_KEY.into(),
                self.root.display().to_string(),
            ],
            &self.log,
        );
        let addr = format!("127.0.0.1:{}", self.port);
        wait_until("S3 server listening", Duration::from_secs(30), || {
            std::net::TcpStream::connect(&addr).ok()
        });
        self.proc = Some(p);
    }

    /// Stops the server (its data stays on disk).
    pub fn stop(&mut self) {
        self.proc = None;
        let addr = format!("127.0.0.1:{}", self.port);
        wait_until("S3 server stopped", Duration::from_secs(10), || {
            std::net::TcpStream::connect(&addr).is_err().then_some(())
        });
    }

    pub fn url(&self) -> String {
        format!("s3://{}", self.bucket)
    }

    /// object_store options for this server.
    pub fn options(&self) -> Vec<(String, String)> {
        [
            ("aws_endpoint", format!("http://127.0.0.1:{}", self.port)),
            ("aws_region", "us-east-1".to_string()),
            ("aws_access_key_id", S3_ACCESS_KEY.to_string()),
            ("aws_secret_access_key", S3_SECRET_KEY.to_string()),
            ("aws_allow_http", "true".to_string()),
            ("aws_virtual_hosted_style_request", "false".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// The agent's `[recordings]` table for this server.
    pub fn agent_toml(&self) -> String {
        format!(
            "[recordings]\nurl = \"{}\"\noptions = {{ {} }}\n",
            self.url(),
            self.options()
                .iter()
                .map(|(k, v)| format!("{k} = \"{v}\""))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }

    /// The bucket's directory (objects are files under it).
    pub fn bucket_dir(&self) -> PathBuf {
        self.root.join(&self.bucket)
    }
}

/// A TCP port free on loopback now.
/// The service account the harness acts as (created with the bootstrap
/// token); tests that list accounts leave it out.
pub const HARNESS_ADMIN: &str = "gatehouse-admin";

/// With the break-glass bootstrap token, creates `sa:gatehouse-admin`,
/// grants it admin and auditor, and returns its API key: the harness's
/// credential from then on.
pub fn bootstrap_admin(api: &str, ca_file: &Path, break_glass: &str) -> String {
    // A cluster that just changed membership may refuse a write for a
    // moment (its leader confirming the new majority); a refusal before
    // the call ran is retried, bounded.
    let transient = [
        "could not be audited",
        "cannot reach a majority",
        "not the leader",
    ];
    // A grant is a put: one whose outcome is unknown (the leader lost its
    // majority after proposing it) is safe to send again.
    let run = |args: &[&str], idempotent: bool| {
        for _ in 0..40 {
            let out = Command::new(bin("gatehouse"))
                .args(args)
                .env("GATEHOUSE_API", api)
                .env("GATEHOUSE_TOKEN", break_glass)
                .env("GATEHOUSE_CA_FILE", ca_file)
                .stdin(Stdio::null())
                .output()
                .unwrap();
            if out.status.success() {
                return String::from_utf8(out.stdout).unwrap();
            }
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(
                transient.iter().any(|t| err.contains(t))
                    || (idempotent && err.contains("its outcome is unknown")),
                "gatehouse {args:?} with the bootstrap token failed: {err}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!("gatehouse {args:?} with the bootstrap token kept failing");
    };
    let out = run(
        &[
            "service-accounts",
            "create",
            "gatehouse-admin",
            "-o",
            "json",
        ],
        false,
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    for role in ["admin", "auditor"] {
        run(&["roles", "grant", role, "sa:gatehouse-admin"], true);
    }
    v["api_key"].as_str().unwrap().to_string()
}

/// The back-off a refusal names ("… retry in N s"), capped at 30 s;
/// `None` when it names none.
pub fn retry_after(refusal: &str) -> Option<Duration> {
    let (_, rest) = refusal.split_once("retry in ")?;
    let secs: u64 = rest.split(' ').next()?.parse().ok()?;
    Some(Duration::from_secs(secs.clamp(1, 30)))
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

impl Stack {
    /// Starts PostgreSQL (databases `app` and `direct`, both owned by the
    /// agent's role) and a server; no agent yet.
    pub fn start_server() -> Self {
        Self::start_server_with(false)
    }

    /// Like [`Self::start_server`]; with `s3`, recordings go to a real
    /// S3-compatible server the stack starts.
    pub fn start_server_with(s3: bool) -> Self {
        Self::start_server_opts(s3, &[])
    }

    /// Like [`Self::start_server_with`], with `server_args` added to the
    /// server's command line.
    pub fn start_server_opts(s3: bool, server_args: &[&str]) -> Self {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        // As a deployment keeps them: data directories owner-only.
        gatehouse_secure_fs::owner_only_umask();
        let tmp = tempfile::tempdir().unwrap();
        let s3 = s3.then(|| S3Server::start(tmp.path()));
        let pg = LocalPostgres::start().unwrap();
        pg.create_role_and_db(AGENT_ROLE, AGENT_PASSWORD, "app")
            .unwrap();
        pg.psql_super(
            "postgres",
            &format!("create database direct owner {AGENT_ROLE}"),
        )
        .unwrap();
        let data = tmp.path().join("server");
        let recordings = match &s3 {
            Some(s3) => s3.bucket_dir(),
            None => tmp.path().join("recordings"),
        };
        let mut store_args = match &s3 {
            Some(s3) => {
                let mut a = vec!["--recordings".to_string(), s3.url()];
                for (k, v) in s3.options() {
                    a.push("--recordings-option".into());
                    a.push(format!("{k}={v}"));
                }
                a
            }
            None => vec!["--recordings-dir".into(), recordings.display().to_string()],
        };
        store_args.extend(["--retention-interval-secs".to_string(), "1".to_string()]);
        let server = Proc::spawn(
            &bin("gatehouse-server"),
            &[
                store_args,
                vec![
                    "--data-dir".into(),
                    data.display().to_string(),
                    "--pg-listen".into(),
                    "127.0.0.1:0".into(),
                    "--ssh-listen".into(),
                    "127.0.0.1:0".into(),
                    "--api-listen".into(),
                    "127.0.0.1:0".into(),
                    "--tunnel-listen".into(),
                    "127.0.0.1:0".into(),
                    "--raft-listen".into(),
                    "127.0.0.1:0".into(),
                ],
                server_args.iter().map(|a| a.to_string()).collect(),
            ]
            .concat(),
            &tmp.path().join("server.log"),
        );
        let ready: serde_json::Value = wait_until("server ready", Duration::from_secs(60), || {
            std::fs::read(data.join("ready.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
        });
        let s = |k: &str| ready[k].as_str().unwrap().to_string();
        let break_glass = std::fs::read_to_string(data.join("admin.token"))
            .unwrap()
            .trim()
            .to_string();
        let token = bootstrap_admin(&s("api"), &data.join("ca.pem"), &break_glass);
        Self {
            token,
            break_glass,
            ca_file: data.join("ca.pem"),
            api: s("api"),
            pg_addr: s("pg"),
            ssh_addr: s("ssh"),
            tunnel: s("tunnel"),
            recordings,
            agent_config: tmp.path().join("agent").join("agent.toml"),
            s3,
            tmp,
            pg,
            server,
            agent: None,
            agent_serving_before: 0,
            agent_env: Vec::new(),
        }
    }

    /// Server plus an enrolled, connected agent `edge-1` serving target `db`,
    /// and a service account `alice` allowed on it. Returns alice's API key.
    pub fn start() -> (Self, String) {
        Self::start_with(false, "")
    }

    /// Like [`Self::start`]; `s3` as in [`Self::start_server_with`], and
    /// `agent_extra` appended to the agent's configuration (TOML).
    pub fn start_with(s3: bool, agent_extra: &str) -> (Self, String) {
        Self::start_opts(s3, agent_extra, &[])
    }

    /// Like [`Self::start_with`], with `server_args` added to the server's
    /// command line.
    pub fn start_opts(s3: bool, agent_extra: &str, server_args: &[&str]) -> (Self, String) {
        let mut s = Self::start_server_opts(s3, server_args);
        s.cli_ok(&[
            "targets",
            "create",
            "db",
            "--agent",
            "edge-1",
            "--db-user",
            AGENT_ROLE,
        ]);
        let key = s.create_account("alice", &["dev"]);
        s.cli_ok(&["rules", "create", "--subject", "sa:alice", "--target", "db"]);
        let token = s.enroll_token("edge-1");
        let cfg = s.write_agent_config("edge-1", &s.tmp.path().join("agent"));
        if !agent_extra.is_empty() {
            let mut text = std::fs::read_to_string(&cfg).unwrap();
            text.push_str(agent_extra);
            std::fs::write(&cfg, text).unwrap();
        }
        s.start_agent(Some(&token));
        s.wait_agent_connected("edge-1");
        (s, key)
    }

    pub fn create_account(&self, name: &str, groups: &[&str]) -> String {
        let mut args = vec!["service-accounts", "create", name, "-o", "json"];
        for g in groups {
            args.push("--group");
            args.push(g);
        }
        let out = self.cli_ok(&args);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["api_key"].as_str().unwrap().to_string()
    }

    pub fn enroll_token(&self, agent: &str) -> String {
        self.cli_ok(&["agents", "enroll-token", "--agent", agent])
            .trim()
            .to_string()
    }

    pub fn write_agent_config(&self, name: &str, dir: &Path) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let pw = dir.join("db.password");
        std::fs::write(&pw, AGENT_PASSWORD).unwrap();
        let store = match &self.s3 {
            Some(s3) => s3.agent_toml(),
            None => format!("recordings_dir = \"{}\"\n", self.recordings.display()),
        };
        // Tables after the top-level keys (the store may be a table).
        let cfg = format!(
            "name = \"{name}\"\nservers = [\"{}\"]\ndata_dir = \"{}\"\n{store}\n[[targets]]\nname = \"db\"\nhost = \"127.0.0.1\"\nport = {}\nuser = \"{AGENT_ROLE}\"\npassword_file = \"{}\"\n",
            self.tunnel,
            dir.display(),
            self.pg.port,
            pw.display()
        );
        let path = dir.join("agent.toml");
        std::fs::write(&path, cfg).unwrap();
        path
    }

    /// Starts the agent with the main config; `token` only for enrollment.
    pub fn start_agent(&mut self, token: Option<&str>) {
        self.agent_serving_before = self.agent_serving_lines();
        let config = self.agent_config.clone();
        self.agent = Some(self.spawn_agent(&config, token, "agent.log"));
    }

    pub fn spawn_agent(&self, config: &Path, token: Option<&str>, log: &str) -> Proc {
        let mut args = vec!["--config".to_string(), config.display().to_string()];
        if let Some(t) = token {
            args.push("--enroll-token-file".into());
            let f = secret_file(self.tmp.path(), &format!("{log}.enroll-token"), t);
            args.push(f.display().to_string());
        }
        // Append to the log so restarts keep earlier lines.
        let path = self.tmp.path().join(log);
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        let child = Command::new(bin("gatehouse-agent"))
            .args(&args)
            .envs(self.agent_env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap();
        Proc { child, log: path }
    }

    pub fn agent_connected(&self, name: &str) -> bool {
        let out = self.cli_ok(&["agents", "list", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .any(|a| a["name"] == name && a["connected"] == true)
    }

    /// Waits until the control plane lists the agent as connected and,
    /// when the stack started it, until that process's own connection is
    /// the one registered (after a kill -9 the dead connection is still
    /// listed until it times out).
    pub fn wait_agent_connected(&self, name: &str) {
        wait_until("agent connected", Duration::from_secs(30), || {
            let ours =
                self.agent.is_none() || self.agent_serving_lines() > self.agent_serving_before;
            (ours && self.agent_connected(name)).then_some(())
        });
    }

    fn agent_serving_lines(&self) -> usize {
        std::fs::read_to_string(self.tmp.path().join("agent.log"))
            .unwrap_or_default()
            .matches("serving sessions")
            .count()
    }

    /// Runs the `gatehouse` CLI against this stack.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_cmd(&self.token, args).output().unwrap()
    }

    /// The CLI against this stack's API with `token` (an API key to act
    /// as a service account, or the admin token), ready to run.
    pub fn cli_cmd(&self, token: &str, args: &[&str]) -> Command {
        let mut c = Command::new(bin("gatehouse"));
        c.args(args)
            .env("GATEHOUSE_API", &self.api)
            .env("GATEHOUSE_TOKEN", token)
            .env("GATEHOUSE_CA_FILE", &self.ca_file)
            .stdin(Stdio::null());
        c
    }

    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "gatehouse {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs psql through the gateway.
    pub fn psql_gateway(&self, user: &str, password: &str, db: &str, sql: &str) -> Output {
        let (host, port) = self.pg_addr.rsplit_once(':').unwrap();
        psql(host, port, user, password, db, "require", sql)
    }

    /// libpq-style connection settings for target `db`, database `app`
    /// through the gateway with API key `key`.
    pub fn gateway_conf(&self, key: &str) -> String {
        let (host, port) = self.pg_addr.rsplit_once(':').unwrap();
        format!("host={host} port={port} user=db password={key} dbname=app sslmode=require")
    }

    /// A tokio-postgres client through the gateway (its connection driven
    /// by a task on the current runtime).
    pub async fn driver(&self, key: &str) -> tokio_postgres::Client {
        let (c, conn) = tokio_postgres::connect(
            &self.gateway_conf(key),
            tpg::RustlsConnect::new(&self.ca_file),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        c
    }

    /// Starts psql through the gateway to target `db`, database `app`,
    /// with `args` (flags and `-c` statements) and `conninfo` appended to
    /// the connection string, without waiting for it.
    pub fn psql_spawn(&self, key: &str, args: &[&str], conninfo: &str) -> std::process::Child {
        let (host, port) = self.pg_addr.rsplit_once(':').unwrap();
        Command::new("psql")
            .args(args)
            .arg(format!(
                "host={host} port={port} user=db dbname=app sslmode=verify-full sslrootcert={} {conninfo}",
                self.ca_file.display()
            ))
            .env("PGPASSWORD", key)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Runs psql through the gateway to target `db`, database `app`, as a
    /// user would (errors with their SQLSTATE); returns stdout, stderr and
    /// whether psql succeeded.
    pub fn psql_user(&self, key: &str, sql: &str) -> (String, String, bool) {
        self.psql_user_options(key, "", sql)
    }

    /// Like [`Self::psql_user`], with `PGOPTIONS` set (startup options).
    pub fn psql_user_options(&self, key: &str, options: &str, sql: &str) -> (String, String, bool) {
        let (host, port) = self.pg_addr.rsplit_once(':').unwrap();
        let out = Command::new("psql")
            .args(["-X", "-A", "-v", "VERBOSITY=verbose", "-c", sql])
            .arg(format!(
                "host={host} port={port} user=db dbname=app sslmode=verify-full sslrootcert={} connect_timeout=10",
                self.ca_file.display()
            ))
            .env("PGPASSWORD", key)
            .env("PGOPTIONS", options)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            out.status.success(),
        )
    }

    /// Runs psql directly against PostgreSQL as the agent's role.
    pub fn psql_direct(&self, db: &str, sql: &str) -> Output {
        psql(
            "127.0.0.1",
            &self.pg.port.to_string(),
            AGENT_ROLE,
            AGENT_PASSWORD,
            db,
            "disable",
            sql,
        )
    }

    /// Audit events as JSON values, in log order.
    pub fn audit_events(&self, extra: &[&str]) -> Vec<serde_json::Value> {
        let mut args = vec!["audit", "events", "-o", "json"];
        args.extend_from_slice(extra);
        let out = self.cli_ok(&args);
        serde_json::from_str::<serde_json::Value>(&out)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }

    /// Number of client connections PostgreSQL has accepted so far.
    pub fn upstream_connections(&self) -> i64 {
        let log = std::fs::read_to_string(self.pg.dir.join("postgres.log")).unwrap_or_default();
        log.matches("connection authorized: user=gatehouse_agent")
            .count() as i64
    }
}

/// Runs the real psql with a password and sslmode; unaligned, tuples only.
pub fn psql(
    host: &str,
    port: &str,
    user: &str,
    password: &str,
    db: &str,
    sslmode: &str,
    sql: &str,
) -> Output {
    Command::new("psql")
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .arg(format!(
            "host={host} port={port} user={user} dbname={db} sslmode={sslmode} connect_timeout=10"
        ))
        .args(["-c", sql])
        .env("PGPASSWORD", password)
        .env_remove("PGSERVICEFILE")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Every file under `dir`, recursively, as bytes.
pub fn read_tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(read_tree(&p));
        } else if let Ok(b) = std::fs::read(&p) {
            // Recording chunks are zstd: scan what they hold.
            let b = match p.extension().is_some_and(|e| e == "zst") {
                true => zstd::decode_all(b.as_slice()).unwrap_or(b),
                false => b,
            };
            out.push((p, b));
        }
    }
    out
}

pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Everything a refused statement could have changed, as one digest: table
/// contents and files, the catalog (relations, columns, privileges, roles,
/// memberships, functions, triggers, policies, comments, extensions),
/// sequences, large objects, statistics of VACUUM/ANALYZE, server settings.
pub const FINGERPRINT: &str = r#"
select md5(string_agg(x, '|' order by x)) from (
  select format('rel %s.%s %s %s %s', n.nspname, c.relname, c.relkind, c.relfilenode, coalesce(c.relacl::text, '')) as x
    from pg_class c join pg_namespace n on n.oid = c.relnamespace
    where n.nspname not in ('pg_catalog', 'information_schema', 'pg_toast')
  union all select 'col ' || attrelid::regclass || '.' || attname || ' ' || atttypid
    from pg_attribute where attrelid in (select oid from pg_class where relnamespace in
      (select oid from pg_namespace where nspname in ('public', 'payroll'))) and attnum > 0 and not attisdropped
  union all select 'customers ' || coalesce(md5(string_agg(t::text, ',' order by t::text)), '') from customers t
  union all select 'orders ' || coalesce(md5(string_agg(t::text, ',' order by t::text)), '') from orders t
  union all select 'salaries ' || coalesce(md5(string_agg(t::text, ',' order by t::text)), '') from payroll.salaries t
  union all select 'seq ' || last_value || is_called from orders_id_seq
  union all select 'role ' || rolname || rolsuper || rolcanlogin || coalesce(array_to_string(rolconfig, ','), '') from pg_roles
  union all select 'member ' || roleid || ' ' || member from pg_auth_members
  union all select 'dbrole ' || setdatabase || ' ' || setrole || ' ' || array_to_string(setconfig, ',') from pg_db_role_setting
  union all select 'proc ' || proname from pg_proc where pronamespace in (select oid from pg_namespace where nspname in ('public', 'payroll'))
  union all select 'trigger ' || tgname from pg_trigger where not tgisinternal
  union all select 'policy ' || polname from pg_policy
  union all select 'defacl ' || defaclacl::text from pg_default_acl
  union all select 'comment ' || objoid || ' ' || description from pg_description where objoid >= 16384
  union all select 'ext ' || extname from pg_extension
  union all select 'schema ' || nspname || ' ' || coalesce(nspacl::text, '') from pg_namespace
  union all select 'lo ' || count(*) from pg_largeobject_metadata
  union all select 'stat ' || relname || coalesce(last_vacuum::text, '') || coalesce(last_analyze::text, '') from pg_stat_user_tables
  union all select 'file ' || coalesce(sourcefile, '') || ' ' || name || ' ' || coalesce(setting, '') from pg_file_settings
) s
"#;

/// The database `app`'s [`FINGERPRINT`].
pub fn fingerprint(stack: &Stack) -> String {
    stack.pg.psql_super("app", FINGERPRINT).unwrap()
}

/// A runtime for a test's own clients.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Opens `n` connections from `src`; `stall` says what each sends before it
/// goes silent. Returns how long each took to be closed by the server.
pub async fn stalled(
    addr: std::net::SocketAddr,
    src: std::net::IpAddr,
    n: usize,
    stall: &'static [u8],
    concurrency: usize,
) -> Vec<std::time::Duration> {
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut tasks = Vec::new();
    for _ in 0..n {
        let permit = sem.clone().acquire_owned().await.unwrap();
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.bind(std::net::SocketAddr::new(src, 0)).unwrap();
            let started = std::time::Instant::now();
            let Ok(mut c) = s.connect(addr).await else {
                return started.elapsed();
            };
            let _ = tokio::io::AsyncWriteExt::write_all(&mut c, stall).await;
            let mut buf = [0u8; 1024];
            // Until the server closes (or 60 s: a test bound, far above
            // every deadline).
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            loop {
                match tokio::time::timeout_at(
                    deadline.into(),
                    tokio::io::AsyncReadExt::read(&mut c, &mut buf),
                )
                .await
                {
                    Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                    Ok(Ok(_)) => {}
                }
            }
            started.elapsed()
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// Writes an executable script readable by its owner only.
pub fn write_script(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, body).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).unwrap();
}
