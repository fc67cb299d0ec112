//! The CLI's commands: one module per command group, each with its
//! arguments and its `exec`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use crate::client::{Client, ReviewsClient};

pub mod agents;
pub mod audit;
pub mod cluster;
pub mod policy;
pub mod requests;
pub mod rules;
pub mod service_accounts;
pub mod sessions;
pub mod status;
pub mod targets;

#[derive(Parser)]
#[command(
    name = "gatehouse",
    version,
    about = "Gatehouse: access gateway with compliance evidence"
)]
pub struct Cli {
    /// Admin API address (https://; http:// only on loopback with
    /// --insecure-loopback-http).
    #[arg(
        long,
        env = "GATEHOUSE_API",
        global = true,
        default_value = "https://127.0.0.1:7443"
    )]
    pub api: String,
    /// Admin token, or your own API key for reviews.
    #[arg(long, env = "GATEHOUSE_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// The cluster CA certificate (PEM) the API's certificate must chain to.
    #[arg(long, env = "GATEHOUSE_CA_FILE", global = true)]
    pub ca_file: Option<PathBuf>,
    /// Output format of listings.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Allow an http:// API address on loopback (the token then travels
    /// unencrypted; never use it across a network).
    #[arg(long, global = true)]
    pub insecure_loopback_http: bool,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Run a complete local deployment (server, agent, demo PostgreSQL).
    Dev(crate::dev::DevArgs),
    /// Targets: the databases and hosts agents serve.
    #[command(subcommand)]
    Targets(targets::TargetsCmd),
    /// Service accounts: machine identities with API keys.
    #[command(subcommand, name = "service-accounts")]
    ServiceAccounts(service_accounts::SaCmd),
    /// Access rules: which identities and groups may use which targets.
    #[command(subcommand)]
    Rules(rules::RulesCmd),
    /// The policy document: guardrails, masking, approvals, retention.
    #[command(subcommand)]
    Policy(policy::PolicyCmd),
    /// Access requests for held statements (GATEHOUSE_TOKEN: your own API
    /// key to review).
    #[command(subcommand)]
    Requests(requests::RequestsCmd),
    /// Edge agents: enrollment and connection state.
    #[command(subcommand)]
    Agents(agents::AgentsCmd),
    /// Sessions: the index, recordings, replay, verification, legal hold.
    #[command(subcommand)]
    Sessions(sessions::SessionsCmd),
    /// The audit log.
    #[command(subcommand)]
    Audit(audit::AuditCmd),
    /// This node's status: leader, applied index, audit events, policy.
    Status,
    /// Cluster membership: status, join tokens, removal, state digest.
    #[command(subcommand)]
    Cluster(cluster::ClusterCmd),
}

/// What every command needs from the global options.
pub struct Ctx {
    pub api: String,
    pub insecure_loopback_http: bool,
    pub token: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub json: bool,
}

// === impl Ctx ===

impl Ctx {
    /// The admin API, with the admin token.
    pub async fn admin(&self) -> anyhow::Result<Client> {
        let (token, ca) =
            self.credentials("no admin token: set GATEHOUSE_TOKEN or pass --token")?;
        crate::client::connect(&self.api, token, &ca).await
    }

    /// The reviewers' API, with the caller's own key.
    pub async fn reviews(&self) -> anyhow::Result<ReviewsClient> {
        let (token, ca) =
            self.credentials("no token: set GATEHOUSE_TOKEN (your API key) or pass --token")?;
        crate::client::connect_reviews(&self.api, token, &ca).await
    }

    fn credentials(&self, no_token: &'static str) -> anyhow::Result<(&str, String)> {
        crate::client::check_transport(&self.api, self.insecure_loopback_http)?;
        let token = self.token.as_deref().context(no_token)?;
        let ca_file = self
            .ca_file
            .as_ref()
            .context("no CA certificate: set GATEHOUSE_CA_FILE or pass --ca-file")?;
        let ca = std::fs::read_to_string(ca_file)
            .with_context(|| format!("reading {}", ca_file.display()))?;
        Ok((token, ca))
    }
}

/// Runs the command line.
pub async fn exec(cli: Cli) -> anyhow::Result<()> {
    let ctx = Ctx {
        api: cli.api,
        insecure_loopback_http: cli.insecure_loopback_http,
        token: cli.token,
        ca_file: cli.ca_file,
        json: cli.output == Output::Json,
    };
    match cli.cmd {
        Cmd::Dev(args) => crate::dev::run(args).await,
        Cmd::Targets(c) => targets::exec(&c, &ctx).await,
        Cmd::ServiceAccounts(c) => service_accounts::exec(&c, &ctx).await,
        Cmd::Rules(c) => rules::exec(&c, &ctx).await,
        Cmd::Policy(c) => policy::exec(&c, &ctx).await,
        Cmd::Requests(c) => requests::exec(&c, &ctx).await,
        Cmd::Agents(c) => agents::exec(&c, &ctx).await,
        Cmd::Sessions(c) => sessions::exec(&c, &ctx).await,
        Cmd::Audit(c) => audit::exec(&c, &ctx).await,
        Cmd::Status => status::exec(&ctx).await,
        Cmd::Cluster(c) => cluster::exec(&c, &ctx).await,
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn tokens_never_travel_over_plain_http_off_loopback() {
        use crate::client::check_transport;
        assert!(check_transport("https://gw.example:7443", false).is_ok());
        let e = check_transport("http://gw.example:7443", true).unwrap_err();
        assert!(e.to_string().contains("refusing to send a token"), "{e}");
        let e = check_transport("http://127.0.0.1:7443", false).unwrap_err();
        assert!(e.to_string().contains("--insecure-loopback-http"), "{e}");
        assert!(check_transport("http://127.0.0.1:7443", true).is_ok());
        assert!(check_transport("http://[::1]:7443", true).is_ok());
        assert!(check_transport("ftp://x", true).is_err());
    }

    /// Every command and subcommand says what it does in `--help`.
    #[test]
    fn every_command_has_a_description() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for sub in cmd.get_subcommands() {
                let p = format!("{path} {}", sub.get_name());
                if sub
                    .get_about()
                    .is_none_or(|a| a.to_string().trim().is_empty())
                {
                    missing.push(p.clone());
                }
                walk(sub, &p, missing);
            }
        }
        let cmd = super::Cli::command();
        cmd.clone().debug_assert();
        let mut missing = Vec::new();
        walk(&cmd, "gatehouse", &mut missing);
        assert!(
            missing.is_empty(),
            "commands without a description: {missing:?}"
        );
        assert!(cmd.get_subcommands().count() >= 10);
    }
}
