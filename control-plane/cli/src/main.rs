use clap::Parser;
use gatehouse_cli::commands::{Cli, exec};

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = exec(cli).await {
        // `gatehouse … | head`: the reader left; nothing to say.
        if gatehouse_cli::output::is_broken_pipe(&e) {
            std::process::exit(0);
        }
        let msg = match e.downcast_ref::<tonic::Status>() {
            Some(s) => s.message().to_string(),
            None => format!("{e:#}"),
        };
        eprintln!("gatehouse: {}", msg.replace('\n', " "));
        std::process::exit(1);
    }
}
