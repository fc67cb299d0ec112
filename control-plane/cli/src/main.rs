use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use gatehouse_audit::AuditEvent;
use gatehouse_cli::client::{Client, connect};
use gatehouse_proto::v1::*;
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "gatehouse",
    version,
    about = "Gatehouse: access gateway with compliance evidence"
)]
struct Cli {
    /// Admin API address.
    #[arg(
        long,
        env = "GATEHOUSE_API",
        global = true,
        default_value = "https://127.0.0.1:7443"
    )]
    api: String,
    /// Admin token.
    #[arg(long, env = "GATEHOUSE_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// The cluster CA certificate (PEM) the API's certificate must chain to.
    #[arg(long, env = "GATEHOUSE_CA_FILE", global = true)]
    ca_file: Option<std::path::PathBuf>,
    /// Output format of listings.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a complete local deployment (server, agent, demo PostgreSQL).
    Dev(gatehouse_cli::dev::DevArgs),
    #[command(subcommand)]
    Targets(TargetsCmd),
    #[command(subcommand, name = "service-accounts")]
    ServiceAccounts(SaCmd),
    #[command(subcommand)]
    Rules(RulesCmd),
    /// The policy document: guardrails every session enforces.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Access requests for held statements (GATEHOUSE_TOKEN: your own API
    /// key to review).
    #[command(subcommand)]
    Requests(RequestsCmd),
    #[command(subcommand)]
    Agents(AgentsCmd),
    #[command(subcommand)]
    Sessions(SessionsCmd),
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Node status.
    Status,
    #[command(subcommand)]
    Cluster(ClusterCmd),
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Members, leader, term and replication progress.
    Status,
    /// Create a single-use token for a new node and print how to start it.
    Join {
        #[arg(long)]
        node_id: u64,
        #[arg(long, default_value_t = 3600)]
        ttl_seconds: u64,
    },
    /// Remove a node from the cluster (run against the leader).
    Remove { node_id: u64 },
    /// SHA-256 over this node's applied state.
    Digest,
}

#[derive(Subcommand)]
enum TargetsCmd {
    List,
    Create {
        name: String,
        #[arg(long)]
        agent: String,
        #[arg(long, default_value = "postgres")]
        kind: String,
        /// Role the agent uses when the client names none.
        #[arg(long, default_value = "")]
        db_user: String,
    },
}

#[derive(Subcommand)]
enum SaCmd {
    List,
    /// Create a service account; prints its API key once.
    Create {
        name: String,
        #[arg(long = "group")]
        groups: Vec<String>,
    },
}

#[derive(Subcommand)]
enum RulesCmd {
    List,
    /// Allow a subject (sa:<name> or group:<name>) to use a target.
    Create {
        #[arg(long)]
        subject: String,
        #[arg(long)]
        target: String,
    },
}

#[derive(Subcommand)]
enum RequestsCmd {
    /// Requests, oldest first.
    List {
        /// pending | approved | denied | expired | used
        #[arg(long)]
        state: Option<String>,
    },
    /// Approve a request (never your own).
    Approve {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Deny a request; the requester is told your reason.
    Deny {
        id: String,
        #[arg(long)]
        reason: String,
    },
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Validate a policy document (YAML) and put it in force.
    Apply {
        #[arg(long, short = 'f')]
        file: std::path::PathBuf,
    },
    /// Print the document in force, or an earlier one (by history number or
    /// version).
    Show {
        /// A history number (`#3` or `3`) or a document version.
        which: Option<String>,
    },
    /// Every applied document, oldest first.
    History,
    /// Line differences between two documents (default: the one before the
    /// document in force, and the document in force).
    Diff {
        from: Option<String>,
        to: Option<String>,
    },
}

#[derive(Subcommand)]
enum AgentsCmd {
    List,
    /// Create a single-use enrollment token for an agent.
    EnrollToken {
        #[arg(long)]
        agent: String,
        #[arg(long, default_value_t = 3600)]
        ttl_seconds: u64,
    },
}

#[derive(Subcommand)]
enum SessionsCmd {
    List {
        #[arg(long, default_value = "")]
        identity: String,
        #[arg(long, default_value = "")]
        target: String,
        #[arg(long, default_value_t = 0)]
        limit: u32,
    },
    /// The statements of a session, read from its recording.
    Show { id: String },
    /// Re-reads recordings from the object store and checks every chunk's
    /// hash, the chain and the agent's signature against the sessions
    /// index. Exits non-zero when any recording does not verify.
    Verify {
        /// The session to check.
        #[arg(required_unless_present = "all")]
        id: Option<String>,
        /// Check every recorded session.
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
    /// A session as a timeline: time offset, statements, decisions, result
    /// rows as delivered (masked values as the client saw them), errors.
    Replay {
        id: String,
        #[arg(long, value_enum, default_value = "text")]
        format: ReplayFormat,
    },
    /// Puts a session's recording under legal hold: retention never deletes it.
    Hold {
        id: String,
        #[arg(long)]
        reason: String,
    },
    /// Releases a legal hold.
    Release {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ReplayFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Audit events in log order.
    Events {
        #[arg(long, default_value = "")]
        identity: String,
        #[arg(long, default_value = "")]
        target: String,
        #[arg(long, default_value = "")]
        session: String,
        /// Unix milliseconds, or a duration ago such as 15m, 2h, 7d.
        #[arg(long)]
        since: Option<String>,
        /// Unix milliseconds, or a duration ago.
        #[arg(long)]
        until: Option<String>,
        #[arg(long, default_value_t = 0)]
        limit: u32,
    },
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        let msg = match e.downcast_ref::<tonic::Status>() {
            Some(s) => s.message().to_string(),
            None => format!("{e:#}"),
        };
        eprintln!("gatehouse: {}", msg.replace('\n', " "));
        std::process::exit(1);
    }
}

async fn client(cli: &Cli) -> anyhow::Result<Client> {
    let (token, ca) = credentials(cli, "no admin token: set GATEHOUSE_TOKEN or pass --token")?;
    connect(&cli.api, token, &ca).await
}

/// The bearer token and the cluster CA the CLI calls the API with.
fn credentials<'a>(cli: &'a Cli, no_token: &'static str) -> anyhow::Result<(&'a str, String)> {
    let token = cli.token.as_deref().context(no_token)?;
    let ca_file = cli
        .ca_file
        .as_ref()
        .context("no CA certificate: set GATEHOUSE_CA_FILE or pass --ca-file")?;
    let ca = std::fs::read_to_string(ca_file)
        .with_context(|| format!("reading {}", ca_file.display()))?;
    Ok((token, ca))
}

fn parse_time(s: &str, now_ms: i64) -> anyhow::Result<i64> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    let (num, unit) = s.split_at(s.len().saturating_sub(1));
    let n: i64 = num
        .parse()
        .with_context(|| format!("invalid time {s:?}: use Unix ms or 15m/2h/7d"))?;
    let ms = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => anyhow::bail!("invalid time {s:?}: use Unix ms or 15m/2h/7d"),
    };
    Ok(now_ms - n * ms)
}

fn fmt_ms(ms: i64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms.rem_euclid(1000)
    )
}

/// Prints rows as aligned columns.
fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{:w$}", c, w = widths.get(i).copied().unwrap_or(0)))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

fn request_json(r: &AccessRequest) -> serde_json::Value {
    json!({"id": r.id, "state": r.state, "requester": r.requester, "target": r.target,
        "statement": r.statement, "rule": r.rule, "reason": r.reason,
        "session_id": r.session_id, "policy_version": r.policy_version,
        "created_ms": r.created_ms, "expires_ms": r.expires_ms,
        "approvals_required": r.approvals_required, "approved_by": r.approved_by,
        "denied_by": r.denied_by, "denial_reason": r.denial_reason,
        "grant_minutes": r.grant_minutes})
}

async fn requests(cli: &Cli, cmd: &RequestsCmd) -> anyhow::Result<()> {
    let (token, ca) = credentials(
        cli,
        "no token: set GATEHOUSE_TOKEN (your API key) or pass --token",
    )?;
    let mut c = gatehouse_cli::client::connect_reviews(&cli.api, token, &ca).await?;
    let json_out = cli.output == Output::Json;
    match cmd {
        RequestsCmd::List { state } => {
            let r = c
                .list_access_requests(ListAccessRequestsRequest {
                    state: state.clone().unwrap_or_default(),
                })
                .await?
                .into_inner();
            if json_out {
                print_json(&json!(
                    r.requests.iter().map(request_json).collect::<Vec<_>>()
                ));
            } else {
                table(
                    &[
                        "ID",
                        "STATE",
                        "REQUESTER",
                        "TARGET",
                        "APPROVALS",
                        "STATEMENT",
                    ],
                    r.requests
                        .into_iter()
                        .map(|x| {
                            vec![
                                x.id,
                                x.state,
                                x.requester,
                                x.target,
                                format!("{}/{}", x.approved_by.len(), x.approvals_required),
                                x.statement.chars().take(60).collect(),
                            ]
                        })
                        .collect(),
                );
            }
        }
        RequestsCmd::Approve { id, reason } | RequestsCmd::Deny { id, reason } => {
            let approve = matches!(cmd, RequestsCmd::Approve { .. });
            let r = c
                .review_access_request(ReviewAccessRequestRequest {
                    id: id.clone(),
                    approve,
                    reason: reason.clone(),
                })
                .await?
                .into_inner();
            if json_out {
                print_json(&request_json(&r));
            } else {
                println!(
                    "request {} is {} ({}/{} approvals)",
                    r.id,
                    r.state,
                    r.approved_by.len(),
                    r.approvals_required
                );
            }
        }
    }
    Ok(())
}

/// A policy named on the command line: `#3`/`3` or a document version.
fn policy_request(which: Option<&str>) -> GetPolicyRequest {
    match which.map(|w| w.trim_start_matches('#')) {
        None => GetPolicyRequest::default(),
        Some(w) => match w.parse::<u64>() {
            Ok(seq) if w.len() < 16 => GetPolicyRequest {
                seq,
                ..Default::default()
            },
            _ => GetPolicyRequest {
                doc_version: w.to_string(),
                ..Default::default()
            },
        },
    }
}

fn policy_json(p: &PolicyDocument) -> serde_json::Value {
    json!({"seq": p.seq, "doc_version": p.doc_version, "policy_version": p.policy_version,
        "author": p.author, "applied_ms": p.applied_ms, "yaml": p.yaml,
        "document": serde_json::from_str::<serde_json::Value>(&p.canonical).unwrap_or_default()})
}

async fn policy(c: &mut Client, cmd: &PolicyCmd, json_out: bool) -> anyhow::Result<()> {
    match cmd {
        PolicyCmd::Apply { file } => {
            let yaml = std::fs::read_to_string(file)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            let p = c
                .apply_policy(ApplyPolicyRequest { yaml })
                .await?
                .into_inner();
            if json_out {
                let mut v = policy_json(&p);
                v["unchanged"] = json!(p.unchanged);
                print_json(&v);
            } else if p.unchanged {
                println!(
                    "policy #{} ({}) is already in force; nothing changed",
                    p.seq, p.doc_version
                );
            } else {
                println!(
                    "policy #{} ({}) is in force; decisions now cite version {}",
                    p.seq, p.doc_version, p.policy_version
                );
            }
        }
        PolicyCmd::Show { which } => {
            let p = c
                .get_policy(policy_request(which.as_deref()))
                .await?
                .into_inner();
            if json_out {
                print_json(&policy_json(&p));
            } else {
                println!(
                    "# policy #{} ({}), applied by {} at {} ms",
                    p.seq, p.doc_version, p.author, p.applied_ms
                );
                print!("{}", p.yaml);
                if !p.yaml.ends_with('\n') {
                    println!();
                }
            }
        }
        PolicyCmd::History => {
            let r = c.list_policies(ListRequest {}).await?.into_inner();
            if json_out {
                print_json(&json!(
                    r.policies.iter().map(policy_json).collect::<Vec<_>>()
                ));
            } else {
                table(
                    &["#", "VERSION", "AUTHOR", "APPLIED_MS"],
                    r.policies
                        .into_iter()
                        .map(|p| {
                            vec![
                                p.seq.to_string(),
                                p.doc_version,
                                p.author,
                                p.applied_ms.to_string(),
                            ]
                        })
                        .collect(),
                );
            }
        }
        PolicyCmd::Diff { from, to } => {
            let to = c
                .get_policy(policy_request(to.as_deref()))
                .await?
                .into_inner();
            let from = match from {
                Some(f) => c.get_policy(policy_request(Some(f))).await?.into_inner(),
                None if to.seq > 1 => c
                    .get_policy(GetPolicyRequest {
                        seq: to.seq - 1,
                        ..Default::default()
                    })
                    .await?
                    .into_inner(),
                None => PolicyDocument::default(),
            };
            let diff = similar::TextDiff::from_lines(&from.yaml, &to.yaml);
            let a = format!("policy #{} ({})", from.seq, from.doc_version);
            let b = format!("policy #{} ({})", to.seq, to.doc_version);
            print!("{}", diff.unified_diff().context_radius(3).header(&a, &b));
        }
    }
    Ok(())
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn session_json(s: &Session) -> serde_json::Value {
    json!({
        "id": s.id, "identity": s.identity, "target": s.target, "agent": s.agent,
        "database": s.database, "db_user": s.db_user, "client_addr": s.client_addr,
        "started_ms": s.started_ms, "ended_ms": s.ended_ms, "end_reason": s.end_reason,
        "recording_key": s.recording_key, "recording_sha256": s.recording_sha256,
        "recording_size": s.recording_size, "policy_version": s.policy_version,
        "chunk_keys": s.chunk_keys, "recording_events": s.recording_events,
        "legal_hold": s.legal_hold, "legal_hold_reason": s.legal_hold_reason,
        "recording_deleted_ms": s.recording_deleted_ms,
    })
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Cmd::Dev(args) = &cli.cmd {
        return gatehouse_cli::dev::run(args.clone()).await;
    }
    if let Cmd::Requests(cmd) = &cli.cmd {
        return requests(&cli, cmd).await;
    }
    let mut c = client(&cli).await?;
    let json_out = cli.output == Output::Json;
    match &cli.cmd {
        Cmd::Dev(_) => {}
        Cmd::Status => {
            let s = c.status(ListRequest {}).await?.into_inner();
            let v = json!({"node_id": s.node_id, "leader_id": s.leader_id, "last_applied": s.last_applied,
                "audit_events": s.audit_events, "policy_version": s.policy_version});
            if json_out {
                print_json(&v);
            } else {
                table(
                    &["NODE", "LEADER", "APPLIED", "AUDIT EVENTS", "POLICY"],
                    vec![vec![
                        s.node_id.to_string(),
                        s.leader_id.to_string(),
                        s.last_applied.to_string(),
                        s.audit_events.to_string(),
                        s.policy_version,
                    ]],
                );
            }
        }
        Cmd::Cluster(ClusterCmd::Status) => {
            let s = c.cluster_status(ListRequest {}).await?.into_inner();
            print_cluster(&s, json_out);
        }
        Cmd::Cluster(ClusterCmd::Remove { node_id }) => {
            let s = c
                .remove_node(RemoveNodeRequest { node_id: *node_id })
                .await?
                .into_inner();
            print_cluster(&s, json_out);
        }
        Cmd::Cluster(ClusterCmd::Join {
            node_id,
            ttl_seconds,
        }) => {
            let t = c
                .create_join_token(CreateJoinTokenRequest {
                    node_id: *node_id,
                    ttl_seconds: *ttl_seconds,
                })
                .await?
                .into_inner();
            if json_out {
                print_json(
                    &json!({"node_id": node_id, "token": t.token, "expires_ms": t.expires_ms}),
                );
            } else {
                println!("{}", t.token);
                eprintln!(
                    "start the new node with: gatehouse-server --node-id {node_id} --join {} --join-token <token above> ...",
                    cli.api
                );
            }
        }
        Cmd::Cluster(ClusterCmd::Digest) => {
            let d = c.state_digest(ListRequest {}).await?.into_inner();
            if json_out {
                print_json(
                    &json!({"digest": d.digest, "last_applied": d.last_applied, "audit_events": d.audit_events}),
                );
            } else {
                println!(
                    "{}  applied={} audit_events={}",
                    d.digest, d.last_applied, d.audit_events
                );
            }
        }
        Cmd::Targets(TargetsCmd::List) => {
            let ts = c.list_targets(ListRequest {}).await?.into_inner().targets;
            if json_out {
                print_json(&json!(ts.iter().map(|t| json!({"name": t.name, "kind": t.kind, "agent": t.agent,
                    "default_db_user": t.default_db_user, "online": t.online, "created_ms": t.created_ms})).collect::<Vec<_>>()));
            } else {
                table(
                    &["NAME", "KIND", "AGENT", "ONLINE", "DEFAULT DB USER"],
                    ts.into_iter()
                        .map(|t| {
                            vec![
                                t.name,
                                t.kind,
                                t.agent,
                                t.online.to_string(),
                                t.default_db_user,
                            ]
                        })
                        .collect(),
                );
            }
        }
        Cmd::Targets(TargetsCmd::Create {
            name,
            agent,
            kind,
            db_user,
        }) => {
            let t = c
                .create_target(CreateTargetRequest {
                    name: name.clone(),
                    kind: kind.clone(),
                    agent: agent.clone(),
                    default_db_user: db_user.clone(),
                })
                .await?
                .into_inner();
            println!("target {} created (served by agent {})", t.name, t.agent);
        }
        Cmd::ServiceAccounts(SaCmd::List) => {
            let a = c
                .list_service_accounts(ListRequest {})
                .await?
                .into_inner()
                .accounts;
            if json_out {
                print_json(&json!(a.iter().map(|s| json!({"name": s.name, "groups": s.groups, "key_ids": s.key_ids, "created_ms": s.created_ms})).collect::<Vec<_>>()));
            } else {
                table(
                    &["NAME", "GROUPS", "KEYS"],
                    a.into_iter()
                        .map(|s| vec![s.name, s.groups.join(","), s.key_ids.join(",")])
                        .collect(),
                );
            }
        }
        Cmd::ServiceAccounts(SaCmd::Create { name, groups }) => {
            let r = c
                .create_service_account(CreateServiceAccountRequest {
                    name: name.clone(),
                    groups: groups.clone(),
                })
                .await?
                .into_inner();
            if json_out {
                print_json(
                    &json!({"name": name, "identity": format!("sa:{name}"), "api_key": r.api_key}),
                );
            } else {
                println!(
                    "service account sa:{name} created; its API key (shown once):\n{}",
                    r.api_key
                );
            }
        }
        Cmd::Policy(cmd) => policy(&mut c, cmd, json_out).await?,
        Cmd::Requests(_) => {}
        Cmd::Rules(RulesCmd::List) => {
            let r = c.list_rules(ListRequest {}).await?.into_inner();
            if json_out {
                print_json(
                    &json!({"policy_version": r.policy_version, "rules": r.rules.iter().map(|x| json!({"id": x.id, "subject": x.subject, "target": x.target})).collect::<Vec<_>>()}),
                );
            } else {
                println!("policy version {}", r.policy_version);
                table(
                    &["ID", "SUBJECT", "TARGET"],
                    r.rules
                        .into_iter()
                        .map(|x| vec![x.id, x.subject, x.target])
                        .collect(),
                );
            }
        }
        Cmd::Rules(RulesCmd::Create { subject, target }) => {
            let r = c
                .create_rule(CreateRuleRequest {
                    subject: subject.clone(),
                    target: target.clone(),
                })
                .await?
                .into_inner();
            println!("rule {} created: {} may use {}", r.id, r.subject, r.target);
        }
        Cmd::Agents(AgentsCmd::List) => {
            let a = c.list_agents(ListRequest {}).await?.into_inner().agents;
            if json_out {
                print_json(&json!(a.iter().map(|x| json!({"name": x.name, "connected": x.connected, "cert_serial": x.cert_serial,
                    "enrolled_ms": x.enrolled_ms, "last_seen_ms": x.last_seen_ms, "version": x.version, "targets": x.targets})).collect::<Vec<_>>()));
            } else {
                table(
                    &["NAME", "CONNECTED", "VERSION", "TARGETS", "LAST SEEN"],
                    a.into_iter()
                        .map(|x| {
                            vec![
                                x.name,
                                x.connected.to_string(),
                                x.version,
                                x.targets.join(","),
                                fmt_ms(x.last_seen_ms),
                            ]
                        })
                        .collect(),
                );
            }
        }
        Cmd::Agents(AgentsCmd::EnrollToken { agent, ttl_seconds }) => {
            let t = c
                .create_enrollment_token(CreateEnrollmentTokenRequest {
                    agent: agent.clone(),
                    ttl_seconds: *ttl_seconds,
                })
                .await?
                .into_inner();
            if json_out {
                print_json(&json!({"agent": agent, "token": t.token, "expires_ms": t.expires_ms}));
            } else {
                println!("{}", t.token);
            }
        }
        Cmd::Sessions(SessionsCmd::List {
            identity,
            target,
            limit,
        }) => {
            let s = c
                .list_sessions(ListSessionsRequest {
                    identity: identity.clone(),
                    target: target.clone(),
                    limit: *limit,
                })
                .await?
                .into_inner()
                .sessions;
            if json_out {
                print_json(&json!(s.iter().map(session_json).collect::<Vec<_>>()));
            } else {
                table(
                    &["ID", "IDENTITY", "TARGET", "STARTED", "ENDED", "END REASON"],
                    s.into_iter()
                        .map(|x| {
                            vec![
                                x.id,
                                x.identity,
                                x.target,
                                fmt_ms(x.started_ms),
                                fmt_ms(x.ended_ms),
                                x.end_reason,
                            ]
                        })
                        .collect(),
                );
            }
        }
        Cmd::Sessions(SessionsCmd::Show { id }) => show_session(&mut c, id, json_out).await?,
        Cmd::Sessions(SessionsCmd::Verify { id, all }) => {
            let results = c
                .verify_recordings(VerifyRecordingsRequest {
                    session_id: id.clone().unwrap_or_default(),
                    all: *all,
                })
                .await?
                .into_inner()
                .results;
            let bad = results.iter().filter(|r| !r.ok).count();
            if json_out {
                print_json(&json!(
                    results
                        .iter()
                        .map(|r| json!({
                            "session_id": r.session_id, "ok": r.ok, "chunks": r.chunks,
                            "events": r.events, "problems": r.problems,
                        }))
                        .collect::<Vec<_>>()
                ));
            } else {
                for r in &results {
                    if r.ok {
                        println!(
                            "session {}: ok ({} chunks, {} events; hashes, chain and signature verified)",
                            r.session_id, r.chunks, r.events
                        );
                    } else {
                        for p in &r.problems {
                            println!("session {}: FAILED: {p}", r.session_id);
                        }
                    }
                }
            }
            anyhow::ensure!(
                bad == 0,
                "{bad} of {} recordings did not verify",
                results.len()
            );
        }
        Cmd::Sessions(SessionsCmd::Replay { id, format }) => {
            replay(&mut c, id, json_out || *format == ReplayFormat::Json).await?
        }
        Cmd::Sessions(SessionsCmd::Hold { id, reason })
        | Cmd::Sessions(SessionsCmd::Release { id, reason }) => {
            let hold = matches!(&cli.cmd, Cmd::Sessions(SessionsCmd::Hold { .. }));
            let s = c
                .set_legal_hold(SetLegalHoldRequest {
                    session_id: id.clone(),
                    hold,
                    reason: reason.clone(),
                })
                .await?
                .into_inner();
            if json_out {
                print_json(&session_json(&s));
            } else if s.legal_hold {
                println!(
                    "session {} is under legal hold: {}",
                    s.id, s.legal_hold_reason
                );
            } else {
                println!("session {} is not under legal hold", s.id);
            }
        }
        Cmd::Audit(AuditCmd::Events {
            identity,
            target,
            session,
            since,
            until,
            limit,
        }) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis() as i64;
            let req = ListAuditEventsRequest {
                identity: identity.clone(),
                target: target.clone(),
                session_id: session.clone(),
                since_ms: since
                    .as_deref()
                    .map(|s| parse_time(s, now))
                    .transpose()?
                    .unwrap_or(0),
                until_ms: until
                    .as_deref()
                    .map(|s| parse_time(s, now))
                    .transpose()?
                    .unwrap_or(0),
                limit: *limit,
            };
            let raw = c.list_audit_events(req).await?.into_inner().events;
            let events: Vec<AuditEvent> = raw
                .iter()
                .map(|r| AuditEvent::decode(r))
                .collect::<Result<_, _>>()?;
            if json_out {
                let v: Vec<serde_json::Value> = raw
                    .iter()
                    .map(|r| serde_json::from_slice(r))
                    .collect::<Result<_, _>>()?;
                print_json(&serde_json::Value::Array(v));
            } else {
                table(
                    &[
                        "TIME",
                        "KIND",
                        "IDENTITY",
                        "TARGET",
                        "DECISION",
                        "ROWS",
                        "STATEMENT / DETAIL",
                    ],
                    events
                        .into_iter()
                        .map(|e| {
                            vec![
                                fmt_ms(e.time_ms),
                                serde_json::to_value(e.kind)
                                    .ok()
                                    .and_then(|v| v.as_str().map(String::from))
                                    .unwrap_or_default(),
                                e.identity,
                                e.target,
                                serde_json::to_value(e.decision)
                                    .ok()
                                    .and_then(|v| v.as_str().map(String::from))
                                    .unwrap_or_default(),
                                e.outcome
                                    .as_ref()
                                    .map(|o| o.rows.to_string())
                                    .unwrap_or_default(),
                                e.statement
                                    .or(e.detail)
                                    .unwrap_or_default()
                                    .replace('\n', " "),
                            ]
                        })
                        .collect(),
                );
            }
        }
    }
    Ok(())
}

fn print_cluster(s: &ClusterStatusResponse, json_out: bool) {
    if json_out {
        print_json(&json!({
            "node_id": s.node_id, "leader_id": s.leader_id, "term": s.term, "last_applied": s.last_applied,
            "nodes": s.nodes.iter().map(|n| json!({"id": n.id, "raft_addr": n.raft_addr, "api_addr": n.api_addr,
                "voter": n.voter, "matched_index": n.matched_index})).collect::<Vec<_>>(),
        }));
    } else {
        println!(
            "leader {} · term {} · this node {} applied {}",
            s.leader_id, s.term, s.node_id, s.last_applied
        );
        table(
            &["ID", "ROLE", "RAFT", "API", "MATCHED"],
            s.nodes
                .iter()
                .map(|n| {
                    let role = if n.id == s.leader_id {
                        "leader"
                    } else if n.voter {
                        "voter"
                    } else {
                        "learner"
                    };
                    vec![
                        n.id.to_string(),
                        role.into(),
                        n.raft_addr.clone(),
                        n.api_addr.clone(),
                        n.matched_index.to_string(),
                    ]
                })
                .collect(),
        );
    }
}

/// Reads a recording as it streams, calling `on_line` with each JSON line
/// (the session header first, then the records); returns the session and
/// what verification found.
async fn read_recording(
    c: &mut Client,
    id: &str,
    mut on_line: impl FnMut(&[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<(Session, Vec<String>)> {
    let mut stream = c
        .get_recording(GetRecordingRequest {
            session_id: id.to_string(),
        })
        .await?
        .into_inner();
    let mut session = None;
    let mut problems = None;
    let mut buf = Vec::new();
    while let Some(part) = stream.message().await? {
        if part.session.is_some() {
            session = part.session;
        }
        buf.extend_from_slice(&part.data);
        let mut start = 0;
        while let Some(n) = buf
            .get(start..)
            .and_then(|b| b.iter().position(|c| *c == b'\n'))
        {
            on_line(buf.get(start..start + n).unwrap_or_default())?;
            start += n + 1;
        }
        buf.drain(..start);
        if part.done {
            problems = Some(part.problems);
        }
    }
    let session = session.context("the server sent no session")?;
    let problems = problems.context("the recording stream ended early")?;
    Ok((session, problems))
}

/// One record as a timeline line: what it is, and its text.
fn timeline(rec: &gatehouse_recording::Record) -> (&'static str, String) {
    use gatehouse_recording::RecordEvent as E;
    let cell = |v: &Option<String>| v.clone().unwrap_or_else(|| "NULL".into());
    let (what, text) = match &rec.event {
        E::Query { text } => ("query", text.clone()),
        E::Parse { name, text } if name.is_empty() => ("parse", text.clone()),
        E::Parse { name, text } => ("parse", format!("{name}: {text}")),
        E::RowDescription { columns } => ("columns", columns.join(" | ")),
        E::Row { values } => (
            "row",
            values.iter().map(cell).collect::<Vec<_>>().join(" | "),
        ),
        E::CommandComplete { tag } => ("complete", tag.clone()),
        E::Error { code, message } => ("error", format!("{code} {message}")),
        E::Notice { code, message } => ("notice", format!("{code} {message}")),
        E::Decision {
            statement,
            action,
            rule,
        } => (
            "decision",
            format!("{action} by rule \"{rule}\": {statement}"),
        ),
        E::StatementDone { rows, masked, .. } if masked.is_empty() => {
            ("ready", format!("{rows} rows"))
        }
        E::StatementDone { rows, masked, .. } => (
            "ready",
            format!(
                "{rows} rows; values masked: {}",
                masked
                    .iter()
                    .map(|(d, n)| format!("{d} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        E::Parameters { values, .. } => (
            "params",
            values.iter().map(cell).collect::<Vec<_>>().join(" | "),
        ),
        E::End { reason } => ("end", reason.clone()),
        E::TerminalOutput { data } | E::TerminalInput { data } => ("terminal", data.clone()),
        E::WindowSize { cols, rows } => ("window", format!("{cols}x{rows}")),
        E::KubeRequest { verb, path, status } => ("kube", format!("{verb} {path} {status}")),
    };
    (what, text)
}

/// Prints a session's recording as a timeline, as it streams.
async fn replay(c: &mut Client, id: &str, json_out: bool) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut header: Option<gatehouse_recording::Header> = None;
    let mut first = true;
    let (s, problems) = read_recording(c, id, |line| {
        if header.is_none() {
            let h: gatehouse_recording::Header =
                serde_json::from_slice(line).context("parsing the recording's header")?;
            if json_out {
                write!(
                    out,
                    "{{\"header\":{},\"events\":[",
                    serde_json::to_string(&h)?
                )?;
            } else {
                writeln!(
                    out,
                    "session {} · {} → {} ({}) as {} · agent {} · policy {} · started {}",
                    h.session_id,
                    h.identity,
                    h.target,
                    h.database,
                    h.db_user,
                    h.agent,
                    h.policy_version,
                    fmt_ms(h.started_ms)
                )?;
            }
            header = Some(h);
            return Ok(());
        }
        let rec: gatehouse_recording::Record =
            serde_json::from_slice(line).context("parsing a record")?;
        if json_out {
            let sep = if first { "" } else { "," };
            write!(out, "{sep}{}", serde_json::to_string(&rec)?)?;
        } else {
            let (what, text) = timeline(&rec);
            writeln!(out, "{:>10}  {what:<9} {text}", format!("+{}ms", rec.t))?;
        }
        first = false;
        Ok(())
    })
    .await?;
    if json_out {
        if header.is_none() {
            write!(out, "{{\"header\":null,\"events\":[")?;
        }
        writeln!(
            out,
            "],\"session\":{},\"verified\":{},\"problems\":{}}}",
            session_json(&s),
            problems.is_empty(),
            json!(problems)
        )?;
    } else if problems.is_empty() {
        writeln!(
            out,
            "recording verified: every chunk hash, the chain and the agent's signature"
        )?;
    } else {
        writeln!(out, "RECORDING DOES NOT VERIFY: {}", problems.join("; "))?;
    }
    out.flush()?;
    anyhow::ensure!(
        problems.is_empty(),
        "recording of session {id} does not verify"
    );
    Ok(())
}

async fn show_session(c: &mut Client, id: &str, json_out: bool) -> anyhow::Result<()> {
    let mut header: Option<gatehouse_recording::Header> = None;
    let mut records: Vec<gatehouse_recording::Record> = Vec::new();
    let (s, problems) = read_recording(c, id, |l| {
        match header {
            None => header = Some(serde_json::from_slice(l).context("parsing the header")?),
            Some(_) => records.push(serde_json::from_slice(l).context("parsing a record")?),
        }
        Ok(())
    })
    .await?;
    anyhow::ensure!(
        problems.is_empty(),
        "recording of session {id} does not verify: {}",
        problems.join("; ")
    );
    let header = header.context("the recording has no header")?;
    let statements: Vec<(i64, String)> = records
        .iter()
        .filter_map(|r| match &r.event {
            gatehouse_recording::RecordEvent::Query { text } => Some((r.t, text.clone())),
            gatehouse_recording::RecordEvent::Parse { text, .. } => Some((r.t, text.clone())),
            _ => None,
        })
        .collect();
    if json_out {
        print_json(&json!({
            "session": session_json(&s),
            "recording_sha256_verified": true,
            "statements": statements.iter().map(|(t, q)| json!({"offset_ms": t, "statement": q})).collect::<Vec<_>>(),
            "events": records,
        }));
    } else {
        println!(
            "session {} · {} → {} as {} · started {} · recording sha256 {} (verified)",
            s.id,
            header.identity,
            header.target,
            header.db_user,
            fmt_ms(header.started_ms),
            s.recording_sha256
        );
        for (t, q) in statements {
            println!("+{t}ms\t{q}");
        }
    }
    Ok(())
}
