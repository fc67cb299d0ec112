//! The CLI's commands: one module per command group, each with its
//! arguments and its `exec`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use crate::client::{Client, ReviewsClient};

pub mod agents;
pub mod audit;
pub mod cluster;
pub mod issuers;
pub mod login;
pub mod policy;
pub mod requests;
pub mod rules;
pub mod service_accounts;
pub mod sessions;
pub mod ssh;
pub mod status;
pub mod targets;
pub mod users;

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
    /// A credential: an API key, an access token, or the bootstrap admin
    /// token. Without one, the token `gatehouse login` saved is used.
    #[arg(long, env = "GATEHOUSE_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// Where `gatehouse login` keeps the access token (owner-only).
    #[arg(long, env = "GATEHOUSE_TOKEN_FILE", global = true)]
    pub token_file: Option<PathBuf>,
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
    /// Log in with the company's identity provider (or a workload token)
    /// and keep a short-lived access token.
    Login(login::LoginArgs),
    /// Print the access token (for PGPASSWORD=$(gatehouse token)),
    /// refreshed when it has expired.
    Token,
    /// Forget the access token.
    Logout,
    /// Trusted identity providers.
    #[command(subcommand)]
    Issuers(issuers::IssuersCmd),
    /// People seen at login, and static groups.
    #[command(subcommand)]
    Users(users::UsersCmd),
    /// Roles on the API and who holds them.
    #[command(subcommand)]
    Roles(users::RolesCmd),
    /// Identities: revoke one (its tokens, a service account's API keys),
    /// ending its running sessions.
    #[command(subcommand)]
    Identities(users::IdentitiesCmd),
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
    /// OpenSSH: a certificate for your identity, and a client configuration
    /// for the SSH targets you may use.
    #[command(subcommand)]
    Ssh(ssh::SshCmd),
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
    pub token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub json: bool,
}

// === impl Ctx ===

impl Ctx {
    /// The admin API, with the caller's credential.
    pub async fn admin(&self) -> anyhow::Result<Client> {
        let (token, ca) = self.credentials().await?;
        crate::client::connect(&self.api, &token, &ca).await
    }

    /// The reviewers' API, with the caller's credential.
    pub async fn reviews(&self) -> anyhow::Result<ReviewsClient> {
        let (token, ca) = self.credentials().await?;
        crate::client::connect_reviews(&self.api, &token, &ca).await
    }

    /// The login service, which needs no credential.
    pub async fn identity(&self) -> anyhow::Result<crate::client::IdentityClient> {
        crate::client::check_transport(&self.api, self.insecure_loopback_http)?;
        crate::client::connect_identity(&self.api, &self.ca()?).await
    }

    fn ca(&self) -> anyhow::Result<String> {
        let ca_file = self
            .ca_file
            .as_ref()
            .context("no CA certificate: set GATEHOUSE_CA_FILE or pass --ca-file")?;
        std::fs::read_to_string(ca_file).with_context(|| format!("reading {}", ca_file.display()))
    }

    /// --token / GATEHOUSE_TOKEN, else the token `gatehouse login` saved.
    async fn credentials(&self) -> anyhow::Result<(String, String)> {
        crate::client::check_transport(&self.api, self.insecure_loopback_http)?;
        let token = match &self.token {
            Some(t) => t.clone(),
            None => {
                let path = login::token_path(self.token_file.as_deref())?;
                if !path.exists() {
                    anyhow::bail!(
                        "no credential: run `gatehouse login`, or set GATEHOUSE_TOKEN (an API key or access token)"
                    );
                }
                login::current(self, &path).await?.access_token
            }
        };
        Ok((token, self.ca()?))
    }
}

/// Runs the command line.
pub async fn exec(cli: Cli) -> anyhow::Result<()> {
    let ctx = Ctx {
        api: cli.api,
        insecure_loopback_http: cli.insecure_loopback_http,
        token: cli.token,
        token_file: cli.token_file,
        ca_file: cli.ca_file,
        json: cli.output == Output::Json,
    };
    match cli.cmd {
        Cmd::Dev(args) => crate::dev::run(args).await,
        Cmd::Login(args) => {
            login::login(&args, &ctx, &login::token_path(ctx.token_file.as_deref())?).await
        }
        Cmd::Token => login::token(&ctx, &login::token_path(ctx.token_file.as_deref())?).await,
        Cmd::Logout => login::logout(&login::token_path(ctx.token_file.as_deref())?),
        Cmd::Issuers(c) => issuers::exec(&c, &ctx).await,
        Cmd::Ssh(c) => ssh::exec(&c, &ctx).await,
        Cmd::Users(c) => users::users(&c, &ctx).await,
        Cmd::Roles(c) => users::roles(&c, &ctx).await,
        Cmd::Identities(c) => users::identities(&c, &ctx).await,
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
