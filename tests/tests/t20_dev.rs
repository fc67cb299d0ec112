//! `gatehouse dev`, exercised the way the README and its printed tour
//! document it: `source dev.env`, then every tour line as printed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use gatehouse_e2e::*;

/// Runs a shell line with dev.env sourced, as a user who followed the
/// README would; psql reports SQLSTATEs (VERBOSITY verbose).
fn sh(dir: &Path, line: &str) -> Output {
    Command::new("bash")
        .arg("-c")
        .arg(format!("source .gatehouse-dev/dev.env && {line}"))
        .current_dir(dir)
        .env("PSQLRC", dir.join("psqlrc"))
        .env_remove("GATEHOUSE_TOKEN")
        .env_remove("GATEHOUSE_API")
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn gatehouse_dev_tour_shows_masking_guardrails_approvals_and_evidence() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("psqlrc"), "\\set VERBOSITY verbose\n").unwrap();
    let mut dev = start_dev(dir, &[]);
    let env_file = dir.join(".gatehouse-dev/dev.env");
    let printed = std::fs::read_to_string(dir.join("dev.out")).unwrap();
    let env = std::fs::read_to_string(&env_file).unwrap();

    // After `source dev.env`, `gatehouse` is the running build.
    let o = sh(dir, "command -v gatehouse");
    assert_eq!(
        Path::new(String::from_utf8_lossy(&o.stdout).trim())
            .canonicalize()
            .unwrap(),
        bin("gatehouse").canonicalize().unwrap(),
        "{}",
        text(&o)
    );
    // The caller's key is sent only to a server the cluster CA vouches for.
    assert!(env.contains("export PGSSLMODE=verify-full"), "{env}");
    assert!(env.contains("export PGSSLROOTCERT="), "{env}");

    // The printed ssh lines work as printed: a command runs on the demo
    // SSH target, and the demo policy refuses a recursive delete.
    let ssh_lines: Vec<&str> = printed
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("SSH_ASKPASS="))
        .collect();
    assert!(ssh_lines.len() >= 2, "{printed}");
    let uname = ssh_lines.iter().find(|l| l.contains("'uname -a'")).unwrap();
    let o = sh(dir, uname);
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("Linux"),
        "{}",
        text(&o)
    );
    let rm = ssh_lines
        .iter()
        .find(|l| l.contains("'rm -rf /tmp/x'"))
        .unwrap();
    let rm = rm.split('#').next().unwrap();
    let o = sh(dir, rm);
    assert_eq!(o.status.code(), Some(126), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no-recursive-delete"),
        "{}",
        text(&o)
    );

    // The printed psql command line works as printed.
    let line = printed
        .lines()
        .find(|l| l.trim_start().starts_with("PGPASSWORD="))
        .unwrap()
        .trim();
    assert!(line.contains("sslmode=verify-full"), "{line}");
    let o = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "{line} -X -A -t -c 'select name from customers order by id limit 1'"
        ))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "Ada Lovelace",
        "{}",
        text(&o)
    );

    // The tour, line by line as printed.
    let tour: Vec<String> = printed
        .lines()
        .skip_while(|l| !l.starts_with("Then take the tour"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .map(|l| l.split(" # ").next().unwrap().trim().to_string())
        .collect();
    assert!(tour.len() >= 6, "tour: {tour:?}\n{printed}");
    let step = |prefix: &str| -> String {
        tour.iter()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no tour line starting {prefix:?}: {tour:?}"))
            .clone()
    };

    // 1. The masked select: rows arrive, no clear e-mail, phone or card.
    let o = sh(dir, &step("psql -c 'select * from customers'"));
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("Ada Lovelace") && out.contains("Barbara Liskov"),
        "{out}"
    );
    for clear in [
        "ada@example.com",
        "grace@example.com",
        "+44 20 7946 0958",
        "(202) 555-0143",
        "4242 4242 4242 4242",
        "5555 5555 5555 4444",
        "3782 822463 10005",
    ] {
        assert!(!out.contains(clear), "{clear} in clear: {out}");
    }
    assert!(out.contains("@example.com"), "masks keep the shape: {out}");

    // 2. The unbounded delete is refused with 42501 naming the rule.
    let o = sh(dir, &step("psql -c 'delete from customers'"));
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(
        out.contains("42501") && out.contains("no-unbounded-writes"),
        "{out}"
    );

    // 3. A schema change is refused.
    let o = sh(dir, &step("psql -c 'drop table customers'"));
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(
        out.contains("42501") && out.contains("no-schema-changes"),
        "{out}"
    );

    // 4. The bounded delete is held; the answer names the request.
    let held = step("psql -c 'delete from customers where id = 4'");
    let o = sh(dir, &held);
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    let id = out
        .split("approval requested as request ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no request id: {out}"))
        .to_string();
    assert_eq!(
        count(dir),
        4,
        "the held delete must not run before its approval"
    );

    // 5. The printed approve line, with the id the client was given.
    let approve = step("GATEHOUSE_TOKEN=").replace("<request id>", &id);
    assert!(approve.contains("gatehouse requests approve"), "{approve}");
    let o = sh(dir, &approve);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("approved"), "{}", text(&o));

    // 6. Run again: it runs, once.
    let again: Vec<&String> = tour.iter().filter(|l| **l == held).collect();
    assert_eq!(
        again.len(),
        2,
        "the tour runs the held delete twice: {tour:?}"
    );
    let o = sh(dir, &held);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("DELETE 1"), "{}", text(&o));
    assert_eq!(count(dir), 3);
    // The grant was for that statement once: a third run is held again.
    let o = sh(dir, &held);
    assert!(text(&o).contains("approval requested"), "{}", text(&o));

    // 7. The evidence.
    let o = sh(dir, &step("gatehouse audit events"));
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("delete from customers where id = 4"), "{out}");
    assert!(out.contains("no-unbounded-writes"), "{out}");
    let o = sh(dir, &step("gatehouse sessions list"));
    assert!(o.status.success(), "{}", text(&o));

    // Every psql above ended with Terminate, and the index says so; the
    // recordings are uploaded.
    let sessions = wait_until("recordings", Duration::from_secs(60), || {
        let o = sh(dir, "gatehouse sessions list -o json");
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
        let all = v.as_array()?.clone();
        all.iter()
            .all(|s| !s["recording_sha256"].as_str().unwrap_or("").is_empty())
            .then_some(all)
    });
    assert!(sessions.len() >= 8, "{sessions:?}");
    for s in &sessions {
        assert_eq!(s["end_reason"], "client ended the session", "{s}");
    }
    let o = sh(dir, "gatehouse audit events -o json");
    let events: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let select_session = events
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["statement"] == "select * from customers")
        .unwrap()["session_id"]
        .as_str()
        .unwrap()
        .to_string();

    // 8. Replay and verify, as printed.
    let replay = step("gatehouse sessions replay").replace("<session id>", &select_session);
    let o = sh(dir, &replay);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("recording verified"), "{out}");
    assert!(!out.contains("ada@example.com"), "{out}");
    let o = sh(dir, &step("gatehouse sessions verify"));
    assert!(o.status.success(), "{}", text(&o));

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

/// Starts `gatehouse dev` in `dir` with the PATH a new user has (no
/// directory holding a gatehouse binary) and waits until it has printed
/// everything; its output goes to `dir/dev.out`.
fn start_dev(dir: &Path, args: &[&str]) -> std::process::Child {
    let log = std::fs::File::create(dir.join("dev.out")).unwrap();
    let mut dev = Command::new(bin("gatehouse"))
        .arg("dev")
        .args(args)
        .current_dir(dir)
        .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    wait_until("gatehouse dev", Duration::from_secs(90), || {
        if let Some(s) = dev.try_wait().unwrap() {
            panic!(
                "gatehouse dev exited early ({s}): {}",
                std::fs::read_to_string(dir.join("dev.out")).unwrap()
            );
        }
        (dir.join(".gatehouse-dev/dev.env").exists()
            && std::fs::read_to_string(dir.join("dev.out"))
                .unwrap()
                .contains("Ctrl-C"))
        .then_some(())
    });
    dev
}

/// Rows left in the demo table, read through the gateway (reads are allowed).
fn count(dir: &Path) -> i64 {
    let o = sh(dir, "psql -X -A -t -c 'select count(*) from customers'");
    text(&o)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{}", text(&o)))
}

#[test]
fn gatehouse_dev_no_policy_starts_without_guardrails() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut dev = start_dev(
        dir,
        &[
            "--no-policy",
            "--pg-port",
            "0",
            "--api-port",
            "0",
            "--ssh-port",
            "0",
        ],
    );
    let o = sh(
        dir,
        "psql -X -A -t -c 'select email from customers order by id limit 1'",
    );
    assert_eq!(text(&o).trim(), "ada@example.com");
    let o = sh(dir, "gatehouse policy show");
    assert!(
        !o.status.success() || !text(&o).contains("no-unbounded-writes"),
        "{}",
        text(&o)
    );
    Command::new("kill")
        .args(["-INT", &dev.id().to_string()])
        .status()
        .unwrap();
    wait_until("dev to stop", Duration::from_secs(30), || {
        dev.try_wait().unwrap()
    });
}
