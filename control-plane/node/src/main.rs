use clap::Parser;

#[tokio::main]
async fn main() {
    let config = gatehouse_cp_server::Config::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,openraft=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let ingresses = gatehouse_cp_server::ingress::Ingresses {
        postgres: Box::new(gatehouse_cp_ingress_pg::Postgres),
        ssh: Box::new(gatehouse_cp_ingress_ssh::Ssh),
    };
    if let Err(e) = gatehouse_cp_server::run(config, ingresses).await {
        eprintln!("gatehouse-server: {e:#}");
        std::process::exit(1);
    }
}
