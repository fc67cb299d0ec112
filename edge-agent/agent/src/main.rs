use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use gatehouse_agent::config::AgentConfig;
use gatehouse_agent::identity::{IdentityFiles, enroll};

#[derive(Parser)]
#[command(name = "gatehouse-agent", version, about = "Gatehouse edge agent")]
struct Args {
    /// Agent configuration file (TOML).
    #[arg(long, env = "GATEHOUSE_AGENT_CONFIG")]
    config: PathBuf,
    /// File holding the single-use enrollment token (or set
    /// GATEHOUSE_ENROLL_TOKEN); needed only on the first start. Never on
    /// the command line, where every local user could read it.
    #[arg(long)]
    enroll_token_file: Option<PathBuf>,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let started = AgentConfig::load(&args.config)
        .and_then(|cfg| runtime(cfg.threads)?.block_on(run(args, cfg)));
    if let Err(e) = started {
        eprintln!("gatehouse-agent: {e:#}");
        std::process::exit(1);
    }
}

/// The runtime sessions and the tunnel share: one worker thread unless the
/// configuration asks for more (`threads`). It is a multi-threaded runtime
/// even with one worker, so long synchronous work (inspecting a 60 MB value,
/// sealing a recording chunk) runs under `block_in_place` and hands the
/// other tasks, the tunnel's keep-alives among them, to another thread: on a
/// current-thread runtime such work stalled the tunnel past its idle timeout
/// and every session on the agent was lost.
fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.worker_threads(threads.max(1));
    Ok(b.enable_all().build()?)
}

async fn run(args: Args, cfg: AgentConfig) -> anyhow::Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    // Everything the agent creates (its key, spool, recordings on a local
    // store) is owner-only.
    gatehouse_secure_fs::owner_only_umask();
    gatehouse_secure_fs::private_dir(&cfg.data_dir)?;
    let files = IdentityFiles::new(&cfg.data_dir);
    if !files.exist() {
        let token = match &args.enroll_token_file {
            Some(f) => std::fs::read_to_string(f)
                .with_context(|| format!("reading the enrollment token from {}", f.display()))?,
            None => std::env::var("GATEHOUSE_ENROLL_TOKEN").context(
                "agent is not enrolled yet: pass --enroll-token-file or set GATEHOUSE_ENROLL_TOKEN",
            )?,
        };
        enroll(&cfg, token.trim(), &files)
            .await
            .context("enrollment")?;
        tracing::info!(agent = %cfg.name, "enrolled");
    }
    let store = gatehouse_recording::store::open(&cfg.store())?;
    let signing_key = std::fs::read_to_string(&files.key)
        .ok()
        .and_then(|pem| gatehouse_pki::pkcs8_der(&pem))
        .context("reading the agent key")?;
    let (ctx, queues) =
        gatehouse_agent::AgentCtx::new(cfg, store, signing_key, gatehouse_agent::protocols());
    let ctx = Arc::new(ctx);
    // Sessions a crash left open are closed ("agent restarted") before any
    // new one starts; the uploader then ships them.
    gatehouse_agent::recorder::recover(&ctx).context("recovering the recording spool")?;
    tokio::spawn(gatehouse_agent::recorder::uploader(ctx.clone()));
    tokio::select! {
        r = gatehouse_agent::tunnel::run(ctx.clone(), queues) => r,
        _ = shutdown() => Ok(()),
    }
}

async fn shutdown() {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
