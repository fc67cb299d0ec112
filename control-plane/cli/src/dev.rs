//! `gatehouse dev`: a complete single-machine deployment on embedded
//! defaults — one server node, one enrolled agent, recordings on the local
//! filesystem, and a throwaway PostgreSQL with sample data when the machine
//! has PostgreSQL server binaries.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use gatehouse_proto::v1::{
    ApplyPolicyRequest, CreateEnrollmentTokenRequest, CreateRuleRequest,
    CreateServiceAccountRequest, CreateTargetRequest, ListRequest, RoleGrant,
};
use tokio::process::{Child, Command};

use crate::postgres::{LocalPostgres, free_port};

/// Options of `gatehouse dev`.
#[derive(Clone, Debug, clap::Args)]
pub struct DevArgs {
    /// Where everything lives; wiped and recreated on every start.
    #[arg(long, default_value = ".gatehouse-dev")]
    pub data_dir: PathBuf,
    /// PostgreSQL ingress port (a free one is chosen if it is taken).
    #[arg(long, default_value_t = 6432)]
    pub pg_port: u16,
    /// API port (a free one is chosen if it is taken).
    #[arg(long, default_value_t = 7443)]
    pub api_port: u16,
    /// SSH ingress port (a free one is chosen if it is taken; 0: any).
    #[arg(long, default_value_t = 2222)]
    pub ssh_port: u16,
    /// Start without the demo policy: no guardrails, no masking.
    #[arg(long)]
    pub no_policy: bool,
}

const SAMPLE: &str = "create table customers (id serial primary key, name text not null, email text not null, phone text not null, card text not null, country text not null);
insert into customers (name, email, phone, card, country) values
  ('Ada Lovelace', 'ada@example.com', '+44 20 7946 0958', '4242 4242 4242 4242', 'GB'),
  ('Grace Hopper', 'grace@example.com', '(202) 555-0143', '5555 5555 5555 4444', 'US'),
  ('Edsger Dijkstra', 'edsger@example.org', '+31 20 794 6012', '4000 0566 5566 5556', 'NL'),
  ('Barbara Liskov', 'barbara@example.net', '(617) 555-0199', '3782 822463 10005', 'US');";

/// The policy `gatehouse dev` applies (unless `--no-policy`): what a first
/// look at Gatehouse should show — masked results, a refused unbounded
/// delete, a refused schema change, a delete held for a reviewer.
pub const DEMO_POLICY: &str = r#"# The demo policy of `gatehouse dev`. Edit it and apply it again with
#   gatehouse policy apply -f <this file>
guardrails:
  default: deny                  # whatever no rule allows is refused
  rules:
    - name: side-effect-functions
      action: deny
      message: functions with side effects outside the query are not allowed
      functions: [pg_terminate_backend, pg_cancel_backend, pg_read_file, pg_ls_dir,
                  lo_import, lo_export, set_config, pg_reload_conf, dblink_exec]
    - name: no-unbounded-writes
      action: deny
      message: UPDATE and DELETE need a WHERE clause
      without_where: true
    - name: no-schema-changes
      action: deny
      message: schema changes are not allowed through the gateway
      kinds: [ddl, privilege]
    - name: reads
      action: allow
      kinds: [read, transaction, config]
    - name: writes-need-approval
      action: approve
      message: changes to data need a reviewer's approval
      kinds: [write]
approvals:
  wait_seconds: 0                # answer at once with the request id; run it again once approved
  required: 1
  approver_groups: [reviewers]
masking:
  detectors: [email, phone, card, iban, us_ssn, secret]
ssh:
  commands:
    default: allow
    rules:
      - name: no-recursive-delete
        action: deny
        message: recursive deletes are not allowed
        programs: [rm]
        args: ["-*r*"]
      - name: no-pipe-to-shell
        action: deny
        message: shells must be given their script on the command line
        hidden_script: true
"#;

/// `preferred` when it is free, else (or when it is 0) any free port.
fn port_or_free(preferred: u16) -> anyhow::Result<u16> {
    if preferred == 0 {
        return free_port();
    }
    match std::net::TcpListener::bind(("127.0.0.1", preferred)) {
        Ok(_) => Ok(preferred),
        Err(_) => free_port(),
    }
}

fn udp_free_port() -> anyhow::Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The sibling binary `name` next to the running executable.
fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the gatehouse binary")?;
    let p = exe.with_file_name(name);
    anyhow::ensure!(
        p.exists(),
        "{} not found next to {} (build the whole workspace: cargo build --workspace)",
        name,
        exe.display()
    );
    Ok(p)
}

fn spawn_logged(bin: &Path, args: &[String], log: &Path) -> anyhow::Result<Child> {
    let out = std::fs::File::create(log)?;
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))
}

async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs the deployment until Ctrl-C or SIGTERM.
pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let data = std::path::absolute(&args.data_dir)?;
    if data.exists() {
        anyhow::ensure!(
            data.join(".gatehouse-dev").exists(),
            "{} exists and was not made by gatehouse dev; refusing to wipe it",
            data.display()
        );
        std::fs::remove_dir_all(&data)?;
    }
    std::fs::create_dir_all(&data)?;
    std::fs::write(data.join(".gatehouse-dev"), "")?;
    // The server's and the agent's data directories are owner-only, as a
    // deployment keeps them (each process checks at start-up).
    for d in ["server", "agent"] {
        gatehouse_secure_fs::private_dir(&data.join(d))?;
    }
    // The key-encryption key sealing the cluster's private keys lives
    // outside the server's data directory.
    let kek_file = data.join("kek");
    write_private(&kek_file, &hex::encode(rand::random::<[u8; 32]>()))?;
    let recordings = data.join("recordings");

    let mut pg = match crate::postgres::find_bin() {
        Some(_) => Some(LocalPostgres::start().context("starting the demo PostgreSQL")?),
        None => {
            eprintln!("no PostgreSQL server binaries found: starting without a demo target");
            None
        }
    };
    let agent_password = hex::encode(rand::random::<[u8; 16]>());
    if let Some(pg) = &pg {
        pg.create_role_and_db("gatehouse_agent", &agent_password, "app")?;
        pg.psql_super("app", &format!("set role gatehouse_agent; {SAMPLE}"))?;
    }

    // A demo SSH target when OpenSSH's server is on the machine.
    let sshd = match crate::sshd::find_sshd() {
        Some(_) if pg.is_some() => match crate::sshd::LocalSshd::start() {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("the demo SSH target did not start ({e:#}): starting without it");
                None
            }
        },
        _ => None,
    };
    let ssh_port = port_or_free(args.ssh_port)?;
    let (pg_port, api_port, tunnel_port) = (
        port_or_free(args.pg_port)?,
        port_or_free(args.api_port)?,
        udp_free_port()?,
    );
    let server_dir = data.join("server");
    let mut server = spawn_logged(
        &sibling("gatehouse-server")?,
        &[
            "--data-dir".into(),
            server_dir.display().to_string(),
            "--recordings-dir".into(),
            recordings.display().to_string(),
            "--pg-listen".into(),
            format!("127.0.0.1:{pg_port}"),
            "--api-listen".into(),
            format!("127.0.0.1:{api_port}"),
            "--ssh-listen".into(),
            format!("127.0.0.1:{ssh_port}"),
            "--tunnel-listen".into(),
            format!("127.0.0.1:{tunnel_port}"),
            "--raft-listen".into(),
            format!("127.0.0.1:{}", free_port()?),
            "--kek-file".into(),
            kek_file.display().to_string(),
        ],
        &data.join("server.log"),
    )?;
    let ready_file = server_dir.join("ready.json");
    let deadline = Instant::now() + Duration::from_secs(60);
    let ready: serde_json::Value = loop {
        if let Some(v) = std::fs::read(&ready_file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
        {
            break v;
        }
        if let Some(status) = server.try_wait()? {
            anyhow::bail!(
                "gatehouse-server exited ({status}); see {}",
                data.join("server.log").display()
            );
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "timed out waiting for the server"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let api = ready["api"].as_str().unwrap_or_default().to_string();
    let ca_file = server_dir.join("ca.pem");
    let break_glass = std::fs::read_to_string(server_dir.join("admin.token"))?
        .trim()
        .to_string();
    let ca_pem = std::fs::read_to_string(&ca_file)?;
    // The bootstrap token is break-glass only: it creates the first admin
    // (a service account holding admin and auditor), which does the rest.
    let token = {
        let mut glass = crate::client::connect(&api, &break_glass, &ca_pem).await?;
        let admin = glass
            .create_service_account(CreateServiceAccountRequest {
                name: "dev-admin".into(),
                groups: Vec::new(),
            })
            .await?
            .into_inner();
        for role in ["admin", "auditor"] {
            glass
                .grant_role(RoleGrant {
                    role: role.into(),
                    principal: "sa:dev-admin".into(),
                    created_ms: 0,
                })
                .await?;
        }
        admin.api_key
    };
    let mut client = crate::client::connect(&api, &token, &ca_pem).await?;

    let sa = client
        .create_service_account(CreateServiceAccountRequest {
            name: "dev".into(),
            groups: vec!["developers".into()],
        })
        .await?
        .into_inner();
    let reviewer = client
        .create_service_account(CreateServiceAccountRequest {
            name: "reviewer".into(),
            groups: vec!["reviewers".into()],
        })
        .await?
        .into_inner();
    for (role, principal) in [("reviewer", "sa:reviewer"), ("user", "group:developers")] {
        client
            .grant_role(RoleGrant {
                role: role.into(),
                principal: principal.into(),
                created_ms: 0,
            })
            .await?;
    }
    let policy_file = data.join("demo-policy.yaml");
    if pg.is_some() && !args.no_policy {
        std::fs::write(&policy_file, DEMO_POLICY)?;
        client
            .apply_policy(ApplyPolicyRequest {
                yaml: DEMO_POLICY.into(),
            })
            .await
            .context("applying the demo policy")?;
    }
    let mut agent = None;
    if let Some(pg) = &pg {
        client
            .create_target(CreateTargetRequest {
                name: "demo".into(),
                kind: "postgres".into(),
                agent: "dev-agent".into(),
                default_db_user: "gatehouse_agent".into(),
            })
            .await?;
        client
            .create_rule(CreateRuleRequest {
                subject: "group:developers".into(),
                target: "demo".into(),
                ..Default::default()
            })
            .await?;
        let enroll = client
            .create_enrollment_token(CreateEnrollmentTokenRequest {
                agent: "dev-agent".into(),
                ttl_seconds: 600,
            })
            .await?
            .into_inner();
        let agent_dir = data.join("agent");
        let password_file = agent_dir.join("demo.password");
        write_private(&password_file, &agent_password)?;
        let mut config = format!(
            "name = \"dev-agent\"\nservers = [\"127.0.0.1:{tunnel_port}\"]\nserver_name = \"localhost\"\ndata_dir = \"{}\"\nrecordings_dir = \"{}\"\n\n[[targets]]\nname = \"demo\"\nhost = \"127.0.0.1\"\nport = {}\nuser = \"gatehouse_agent\"\npassword_file = \"{}\"\n",
            agent_dir.display(),
            recordings.display(),
            pg.port,
            password_file.display()
        );
        if let Some(sshd) = &sshd {
            config.push_str(&format!(
                "\n[[targets]]\nname = \"demo-ssh\"\nkind = \"ssh\"\nhost = \"127.0.0.1\"\nport = {}\nuser = \"{}\"\nssh_key_file = \"{}\"\nssh_host_key = \"{}\"\n",
                sshd.port,
                sshd.user,
                sshd.client_key().display(),
                sshd.host_key
            ));
            client
                .create_target(CreateTargetRequest {
                    name: "demo-ssh".into(),
                    kind: "ssh".into(),
                    agent: "dev-agent".into(),
                    default_db_user: String::new(),
                })
                .await?;
            client
                .create_rule(CreateRuleRequest {
                    subject: "group:developers".into(),
                    target: "demo-ssh".into(),
                    ..Default::default()
                })
                .await?;
        }
        let config_file = agent_dir.join("agent.toml");
        write_private(&config_file, &config)?;
        // The single-use token goes to the agent in a file, not its argv.
        let token_file = data.join("enroll-token");
        write_private(&token_file, &enroll.token)?;
        agent = Some(spawn_logged(
            &sibling("gatehouse-agent")?,
            &[
                "--config".into(),
                config_file.display().to_string(),
                "--enroll-token-file".into(),
                token_file.display().to_string(),
            ],
            &data.join("agent.log"),
        )?);
        let probe = client.clone();
        wait_for("the agent to connect", Duration::from_secs(60), || {
            let mut c = probe.clone();
            async move {
                let agents = c
                    .list_agents(ListRequest {})
                    .await
                    .ok()?
                    .into_inner()
                    .agents;
                agents
                    .iter()
                    .any(|a| a.name == "dev-agent" && a.connected)
                    .then_some(())
            }
        })
        .await?;
        // Used: it opens nothing any more, and need not stay on disk.
        let _ = std::fs::remove_file(&token_file);
    }

    // The directory of this very binary goes first on PATH, so that the
    // `gatehouse …` lines printed below run this build.
    let bin_dir = std::env::current_exe()
        .context("locating the gatehouse binary")?
        .parent()
        .map(Path::to_path_buf)
        .context("the gatehouse binary has no directory")?;
    let env = format!(
        "export PATH=\"{}:$PATH\"\nexport PGHOST=127.0.0.1\nexport PGPORT={pg_port}\nexport PGUSER=demo\nexport PGDATABASE=app\nexport PGPASSWORD={}\nexport PGSSLMODE=verify-full\nexport PGSSLROOTCERT={}\nexport GATEHOUSE_API={api}\nexport GATEHOUSE_TOKEN={token}\nexport GATEHOUSE_CA_FILE={}\nexport GATEHOUSE_REVIEWER_TOKEN={}\n",
        bin_dir.display(),
        sa.api_key,
        ca_file.display(),
        ca_file.display(),
        reviewer.api_key,
    );
    let env_file = data.join("dev.env");
    write_private(&env_file, &env)?;
    println!("Gatehouse is running (data in {}).", data.display());
    if pg.is_some() {
        println!("Connect to the demo database through Gatehouse:");
        println!();
        println!(
            "  PGPASSWORD={} psql \"host=127.0.0.1 port={pg_port} user=demo dbname=app sslmode=verify-full sslrootcert={}\"",
            sa.api_key,
            ca_file.display()
        );
        println!();
        println!("(verify-full: psql checks the gateway's certificate against the cluster CA");
        println!("before it sends your key; `require` would send it to any server.)");
    }
    if let Some(sshd) = &sshd {
        let line = ssh_line(&data, &server_dir, ssh_port, &sshd.user, &sa.api_key)?;
        println!();
        println!("Run commands on the demo SSH target through Gatehouse (the askpass helper");
        println!("answers the gateway's prompt with the dev key; the gateway's host key is");
        println!("pinned in the known_hosts file):");
        println!();
        println!("  {line} 'uname -a'");
        if crate::postgres::is_root() {
            println!("  {line}                      # an interactive shell, recorded");
        }
        println!("  {line} 'rm -rf /tmp/x'      # with the demo policy: refused, exit 126");
    }
    println!();
    println!(
        "Load the settings into your shell:  source {}",
        env_file.display()
    );
    if pg.is_some() && !args.no_policy {
        println!();
        println!(
            "Then take the tour (the demo policy is {}):",
            policy_file.display()
        );
        for line in tour(&reviewer.api_key) {
            println!("  {line}");
        }
    } else {
        println!("Then try:  gatehouse audit events   ·   gatehouse sessions list");
    }
    println!();
    println!("Press Ctrl-C to stop.");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        s = server.wait() => eprintln!("gatehouse-server exited: {s:?}"),
    }
    eprintln!("stopping");
    if let Some(mut a) = agent {
        stop(&mut a).await;
    }
    stop(&mut server).await;
    if let Some(pg) = pg.as_mut() {
        pg.stop();
    }
    drop(sshd);
    Ok(())
}

/// The `ssh` command line to the demo SSH target: an askpass helper with the
/// dev key (owner-only) and a known_hosts file with the node's host key.
fn ssh_line(
    data: &Path,
    server_dir: &Path,
    port: u16,
    login: &str,
    key: &str,
) -> anyhow::Result<String> {
    let out = std::process::Command::new("ssh-keygen")
        .arg("-y")
        .arg("-f")
        .arg(server_dir.join("ssh_host_ed25519_key"))
        .output()
        .context("running ssh-keygen")?;
    anyhow::ensure!(
        out.status.success(),
        "reading the gateway's SSH host key failed"
    );
    let public = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let known = data.join("ssh_known_hosts");
    write_private(&known, &format!("[127.0.0.1]:{port} {public}\n"))?;
    let askpass = data.join("ssh-askpass");
    write_private(&askpass, &format!("#!/bin/sh\necho '{key}'\n"))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&askpass, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(format!(
        "SSH_ASKPASS={} SSH_ASKPASS_REQUIRE=force ssh -p {port} -o UserKnownHostsFile={} {login}@demo-ssh@127.0.0.1",
        askpass.display(),
        known.display()
    ))
}

/// The "try this" lines `gatehouse dev` prints, in order. Each comment
/// says what to look for.
pub fn tour(reviewer_key: &str) -> Vec<String> {
    [
        "psql -c 'select * from customers'                       # e-mails, phones, cards arrive masked",
        "psql -c 'delete from customers'                         # refused: rule no-unbounded-writes",
        "psql -c 'drop table customers'                          # refused: rule no-schema-changes",
        "psql -c 'delete from customers where id = 4'            # held: answers with a request id",
        &format!("GATEHOUSE_TOKEN={reviewer_key} gatehouse requests approve <request id>   # the reviewer approves"),
        "psql -c 'delete from customers where id = 4'            # now it runs, once",
        "gatehouse audit events                                  # the evidence: who, what, which rule",
        "gatehouse sessions list                                 # every session, with its end reason",
        "gatehouse sessions replay <session id>                  # a session as a timeline, verified",
        "gatehouse sessions verify --all                         # every recording's hashes and signature",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// SIGTERM, then SIGKILL after five seconds.
async fn stop(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        if tokio::time::timeout(Duration::from_secs(5), child.wait())
            .await
            .is_ok()
        {
            return;
        }
    }
    let _ = child.kill().await;
}

fn write_private(path: &Path, data: &str) -> std::io::Result<()> {
    gatehouse_secure_fs::write_private(path, data.as_bytes())
}
