//! `gatehouse dev`, exercised the way the README documents it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::Duration;

use gatehouse_e2e::*;

#[test]
fn gatehouse_dev_starts_serves_psql_from_dev_env_and_stops_on_ctrl_c() {
    let tmp = tempfile::tempdir().unwrap();
    let log = std::fs::File::create(tmp.path().join("dev.out")).unwrap();
    let mut dev = Command::new(bin("gatehouse"))
        .arg("dev")
        .current_dir(tmp.path())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let env_file = tmp.path().join(".gatehouse-dev/dev.env");
    wait_until("dev.env", Duration::from_secs(90), || {
        if let Some(s) = dev.try_wait().unwrap() {
            panic!(
                "gatehouse dev exited early ({s}): {}",
                std::fs::read_to_string(tmp.path().join("dev.out")).unwrap()
            );
        }
        env_file.exists().then_some(())
    });
    let printed = std::fs::read_to_string(tmp.path().join("dev.out")).unwrap();
    let env = std::fs::read_to_string(&env_file).unwrap();
    for var in [
        "PGHOST",
        "PGPORT",
        "PGUSER",
        "PGDATABASE",
        "PGPASSWORD",
        "PGSSLMODE",
        "GATEHOUSE_API",
        "GATEHOUSE_TOKEN",
    ] {
        assert!(
            env.contains(&format!("export {var}=")),
            "dev.env lacks {var}: {env}"
        );
    }

    // As documented: source dev.env, run psql.
    let out = Command::new("bash")
        .arg("-c")
        .arg("source .gatehouse-dev/dev.env && psql -X -A -t -c 'select count(*) from customers'")
        .current_dir(tmp.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "4");

    // The printed psql command line works as printed.
    let line = printed
        .lines()
        .find(|l| l.trim_start().starts_with("PGPASSWORD="))
        .unwrap()
        .trim();
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "{line} -X -A -t -c 'select name from customers order by id limit 1'"
        ))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "Ada Lovelace",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The CLI works from the same environment.
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source .gatehouse-dev/dev.env && {} audit events -o json",
            bin("gatehouse").display()
        ))
        .current_dir(tmp.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("select count(*) from customers"));

    // Ctrl-C stops everything.
    let api_port: u16 = env
        .lines()
        .find_map(|l| l.strip_prefix("export GATEHOUSE_API=https://127.0.0.1:"))
        .unwrap()
        .parse()
        .unwrap();
    Command::new("kill")
        .args(["-INT", &dev.id().to_string()])
        .status()
        .unwrap();
    let status = wait_until("dev to stop", Duration::from_secs(30), || {
        dev.try_wait().unwrap()
    });
    assert!(status.success(), "gatehouse dev exit status {status}");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", api_port)).is_err(),
        "server still listening"
    );
}
