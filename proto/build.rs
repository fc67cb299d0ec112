fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_with_config(
            config,
            &[
                "gatehouse/v1/admin.proto",
                "gatehouse/v1/identity.proto",
                "gatehouse/v1/tunnel.proto",
                "gatehouse/v1/cluster.proto",
            ],
            &["."],
        )?;
    println!("cargo:rerun-if-changed=gatehouse");
    Ok(())
}
