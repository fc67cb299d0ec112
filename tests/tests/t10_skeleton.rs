//! The walking skeleton, end to end: psql → gatehouse-server → QUIC →
//! gatehouse-agent → PostgreSQL, with evidence.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use gatehouse_e2e::*;

const SCRIPT: &[&str] = &[
    "select 1",
    "create table orders (id int primary key, item text, qty int)",
    "insert into orders values (1, 'bolt', 10), (2, 'nut', 25), (3, 'gear', 1)",
    "select id, item, qty from orders order by id",
    "update orders set qty = qty + 1 where id = 3",
    "select sum(qty) from orders",
];

fn text(o: &std::process::Output) -> String {
    format!(
        "status={:?}\nstdout={}\nstderr={}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn psql_through_the_gateway_matches_direct_and_leaves_evidence() {
    let (stack, key) = Stack::start();
    for sql in SCRIPT {
        let via = stack.psql_gateway("db", &key, "app", sql);
        let direct = stack.psql_direct("direct", sql);
        assert!(via.status.success(), "{sql}: {}", text(&via));
        assert_eq!(
            text(&via),
            text(&direct),
            "{sql}: gateway and direct differ"
        );
    }
    // `<db_user>@<target>` names the role explicitly.
    let via = stack.psql_gateway(
        &format!("{AGENT_ROLE}@db"),
        &key,
        "app",
        "select current_user",
    );
    assert_eq!(
        String::from_utf8_lossy(&via.stdout).trim(),
        AGENT_ROLE,
        "{}",
        text(&via)
    );

    // Audit: every statement, in order, with identity, target, policy version.
    let policy = {
        let v: serde_json::Value =
            serde_json::from_str(&stack.cli_ok(&["rules", "list", "-o", "json"])).unwrap();
        v["policy_version"].as_str().unwrap().to_string()
    };
    let events = wait_until("audit events committed", Duration::from_secs(20), || {
        let ev = stack.audit_events(&["--identity", "sa:alice", "--target", "db"]);
        let n = ev.iter().filter(|e| e["kind"] == "statement").count();
        (n == SCRIPT.len() + 1).then_some(ev)
    });
    let statements: Vec<&str> = events
        .iter()
        .filter(|e| e["kind"] == "statement")
        .map(|e| e["statement"].as_str().unwrap())
        .collect();
    let mut expected: Vec<&str> = SCRIPT.to_vec();
    expected.push("select current_user");
    assert_eq!(statements, expected);
    for e in &events {
        assert_eq!(e["identity"], "sa:alice");
        assert_eq!(e["target"], "db");
        assert_eq!(e["policy_version"], policy.as_str());
        assert_eq!(e["agent"], "edge-1");
    }
    let insert = events
        .iter()
        .find(|e| {
            e["statement"]
                .as_str()
                .is_some_and(|s| s.starts_with("insert"))
        })
        .unwrap();
    assert_eq!(insert["outcome"]["rows"], 3);
    assert_eq!(insert["outcome"]["command_tags"][0], "INSERT 0 3");
    // Sequence numbers are unique per agent.
    let mut seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    seqs.sort();
    seqs.dedup();
    assert_eq!(seqs.len(), events.len());

    // Sessions: the recording is in the object store, and its SHA-256 matches the index.
    let sessions: serde_json::Value =
        wait_until("sessions recorded", Duration::from_secs(20), || {
            let v: serde_json::Value =
                serde_json::from_str(&stack.cli_ok(&["sessions", "list", "-o", "json"])).unwrap();
            let all = v.as_array().unwrap();
            (all.len() == SCRIPT.len() + 1 && all.iter().all(|s| s["recording_sha256"] != ""))
                .then_some(v)
        });
    let insert_session = sessions
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == insert["session_id"])
        .unwrap();
    let key_path = stack
        .recordings
        .join(insert_session["recording_key"].as_str().unwrap());
    let bytes = std::fs::read(&key_path).unwrap();
    assert_eq!(
        gatehouse_recording_sha(&bytes),
        insert_session["recording_sha256"].as_str().unwrap()
    );
    let shown = stack.cli_ok(&["sessions", "show", insert_session["id"].as_str().unwrap()]);
    assert!(
        shown.contains("insert into orders values (1, 'bolt', 10), (2, 'nut', 25), (3, 'gear', 1)"),
        "{shown}"
    );
    assert!(shown.contains("(verified)"), "{shown}");
    let shown_json: serde_json::Value = serde_json::from_str(&stack.cli_ok(&[
        "sessions",
        "show",
        insert_session["id"].as_str().unwrap(),
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(shown_json["statements"][0]["statement"], SCRIPT[2]);

    // A tampered recording is detected, naming the chunk.
    let chunk_path = stack
        .recordings
        .join(insert_session["chunk_keys"][0].as_str().unwrap());
    let chunk = std::fs::read(&chunk_path).unwrap();
    let mut tampered = chunk.clone();
    let last = tampered.len() - 3;
    tampered[last] ^= 1;
    std::fs::write(&chunk_path, &tampered).unwrap();
    let out = stack.cli(&["sessions", "show", insert_session["id"].as_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does not verify") && err.contains("chunk 0"),
        "{err}"
    );
    std::fs::write(&chunk_path, &chunk).unwrap();
    // So is a manifest that is not the one the index committed.
    let mut tampered = bytes.clone();
    let last = tampered.len() - 3;
    tampered[last] ^= 1;
    std::fs::write(&key_path, &tampered).unwrap();
    let out = stack.cli(&["sessions", "show", insert_session["id"].as_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not match the sessions index"));
    std::fs::write(&key_path, &bytes).unwrap();

    // The raw bytes a client receives through the gateway.
    let raw = rawpg::session(
        &stack.pg_addr,
        &stack.ca_file,
        "db",
        "app",
        &key,
        &["select * from orders"],
    );
    assert!(raw.ready && raw.error.is_none(), "{raw:?}");
    assert!(contains(&raw.received, b"bolt"));

    // The target password is nowhere: client bytes, recordings, audit log, logs.
    let secret = AGENT_PASSWORD.as_bytes();
    assert!(
        !contains(&raw.received, secret),
        "client received the target password"
    );
    for sql in SCRIPT {
        let o = stack.psql_gateway("db", &key, "app", sql);
        assert!(!contains(&o.stdout, secret) && !contains(&o.stderr, secret));
    }
    for (path, data) in read_tree(&stack.recordings) {
        assert!(
            !contains(&data, secret),
            "password in recording {}",
            path.display()
        );
    }
    let audit = stack.cli_ok(&["audit", "events", "-o", "json"]);
    assert!(!audit.contains(AGENT_PASSWORD), "password in the audit log");
    assert!(
        !stack.server.log_text().contains(AGENT_PASSWORD),
        "password in the server log"
    );
    let agent_log = std::fs::read_to_string(stack.tmp.path().join("agent.log")).unwrap();
    assert!(
        !agent_log.contains(AGENT_PASSWORD),
        "password in the agent log"
    );
    for (path, data) in read_tree(&stack.tmp.path().join("server")) {
        assert!(
            !contains(&data, secret),
            "password in server state {}",
            path.display()
        );
    }
}

fn gatehouse_recording_sha(b: &[u8]) -> String {
    use std::fmt::Write;
    let out = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write as _;
            c.stdin.take().unwrap().write_all(b)?;
            c.wait_with_output()
        })
        .unwrap();
    let mut s = String::new();
    write!(
        s,
        "{}",
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap()
    )
    .unwrap();
    s
}

#[test]
fn wrong_key_and_missing_rule_are_refused_before_the_upstream() {
    let (stack, key) = Stack::start();
    let bob = stack.create_account("bob", &["others"]);
    let before = stack.upstream_connections();

    let wrong = rawpg::session(
        &stack.pg_addr,
        &stack.ca_file,
        "db",
        "app",
        "ghk_00000000_nope",
        &["select 1"],
    );
    let (code, message) = wrong.error.clone().expect("an error");
    assert_eq!(code, "28P01", "{message}");
    assert!(!wrong.ready);

    let no_rule = rawpg::session(
        &stack.pg_addr,
        &stack.ca_file,
        "db",
        "app",
        &bob,
        &["select 1"],
    );
    let (code, message) = no_rule.error.clone().expect("an error");
    assert!(code == "28000" || code == "42501", "{code} {message}");
    assert!(
        message.contains("\"db\""),
        "message must name the target: {message}"
    );
    assert!(!no_rule.ready);

    let no_target = rawpg::session(
        &stack.pg_addr,
        &stack.ca_file,
        "nosuch",
        "app",
        &key,
        &["select 1"],
    );
    assert_eq!(no_target.error.unwrap().0, "28000");

    // Plain-text connections are refused: the password is an API key.
    let plain = psql(
        stack.pg_addr.rsplit_once(':').unwrap().0,
        stack.pg_addr.rsplit_once(':').unwrap().1,
        "db",
        &key,
        "app",
        "disable",
        "select 1",
    );
    assert!(!plain.status.success());
    assert!(String::from_utf8_lossy(&plain.stderr).contains("requires TLS"));

    // None of them reached PostgreSQL.
    assert_eq!(stack.upstream_connections(), before);
    // The refusals are evidence too.
    let denials = wait_until("denials audited", Duration::from_secs(10), || {
        let ev: Vec<_> = stack
            .audit_events(&[])
            .into_iter()
            .filter(|e| e["decision"] == "deny")
            .collect();
        (ev.len() >= 3).then_some(ev)
    });
    assert!(
        denials
            .iter()
            .any(|e| e["identity"] == "sa:bob" && e["target"] == "db")
    );
    assert!(denials.iter().any(|e| e["identity"] == "anonymous"));
    // And an allowed identity still works.
    let ok = stack.psql_gateway("db", &key, "app", "select 42");
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "42");
}

#[test]
fn agent_killed_and_restarted_reconnects_and_loses_no_acknowledged_event() {
    let (mut stack, key) = Stack::start();
    for i in 0..5 {
        let o = stack.psql_gateway("db", &key, "app", &format!("select 'before-{i}'"));
        assert!(o.status.success(), "{}", text(&o));
    }
    let acked_before = wait_until("events committed", Duration::from_secs(20), || {
        let ev = stack.audit_events(&["--target", "db"]);
        (ev.iter().filter(|e| e["kind"] == "statement").count() == 5).then_some(ev)
    });

    stack.agent.as_mut().unwrap().kill9();
    wait_until("agent seen as gone", Duration::from_secs(30), || {
        (!stack.agent_connected("edge-1")).then_some(())
    });
    let down = stack.psql_gateway("db", &key, "app", "select 'while-down'");
    assert!(!down.status.success());
    assert!(
        String::from_utf8_lossy(&down.stderr).contains("not connected"),
        "{}",
        text(&down)
    );

    stack.start_agent(None);
    stack.wait_agent_connected("edge-1");
    for i in 0..5 {
        let o = stack.psql_gateway("db", &key, "app", &format!("select 'after-{i}'"));
        assert!(o.status.success(), "{}", text(&o));
    }
    let after = wait_until("events committed", Duration::from_secs(20), || {
        let ev = stack.audit_events(&["--target", "db"]);
        (ev.iter().filter(|e| e["kind"] == "statement").count() == 10).then_some(ev)
    });
    // Every event acknowledged before the kill is still there, once.
    for e in &acked_before {
        assert_eq!(after.iter().filter(|x| x["id"] == e["id"]).count(), 1);
    }
    let mut ids: Vec<&str> = after.iter().map(|e| e["id"].as_str().unwrap()).collect();
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "duplicate audit events");
    let stmts: Vec<&str> = after
        .iter()
        .filter(|e| e["kind"] == "statement")
        .map(|e| e["statement"].as_str().unwrap())
        .collect();
    for i in 0..5 {
        assert_eq!(
            stmts
                .iter()
                .filter(|s| **s == format!("select 'before-{i}'"))
                .count(),
            1
        );
        assert_eq!(
            stmts
                .iter()
                .filter(|s| **s == format!("select 'after-{i}'"))
                .count(),
            1
        );
    }
    // Sequence numbers keep increasing across the restart.
    let seq = |s: &str| {
        after.iter().find(|e| e["statement"] == s).unwrap()["seq"]
            .as_u64()
            .unwrap()
    };
    assert!(seq("select 'after-0'") > seq("select 'before-4'"));
}

#[test]
fn enrollment_tokens_are_single_use_and_foreign_certificates_are_refused() {
    let (stack, _key) = Stack::start();
    // Reusing the token edge-1 enrolled with: make a fresh one, use it twice.
    let token = stack.enroll_token("edge-2");
    let dir_a = stack.tmp.path().join("edge-2a");
    let cfg_a = stack.write_agent_config("edge-2", &dir_a);
    let mut a = stack.spawn_agent(&cfg_a, Some(&token), "edge-2a.log");
    stack.wait_agent_connected("edge-2");
    a.kill9();
    let dir_b = stack.tmp.path().join("edge-2b");
    let cfg_b = stack.write_agent_config("edge-2", &dir_b);
    let mut b = stack.spawn_agent(&cfg_b, Some(&token), "edge-2b.log");
    let status = wait_until("second enrollment to fail", Duration::from_secs(30), || {
        b.child.try_wait().unwrap()
    });
    assert!(!status.success());
    let log = b.log_text();
    assert!(log.contains("enrollment token was already used"), "{log}");

    // An expired token.
    let out = stack.cli_ok(&[
        "agents",
        "enroll-token",
        "--agent",
        "edge-3",
        "--ttl-seconds",
        "1",
    ]);
    std::thread::sleep(Duration::from_millis(1500));
    let dir_c = stack.tmp.path().join("edge-3");
    let cfg_c = stack.write_agent_config("edge-3", &dir_c);
    let mut c = stack.spawn_agent(&cfg_c, Some(out.trim()), "edge-3.log");
    let status = wait_until(
        "expired enrollment to fail",
        Duration::from_secs(30),
        || c.child.try_wait().unwrap(),
    );
    assert!(!status.success());
    assert!(c.log_text().contains("expired"), "{}", c.log_text());

    // A certificate for edge-2 signed by some other CA, with the real CA file.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let rogue_ca = gatehouse_pki::ClusterCa::from_pem(
        &gatehouse_pki::ClusterCa::generate("rogue", now).unwrap(),
    )
    .unwrap();
    let key = gatehouse_pki::AgentKey::generate("edge-2").unwrap();
    let cert = rogue_ca
        .sign_agent(&gatehouse_pki::AgentCertRequest {
            csr_pem: &key.csr_pem,
            agent_name: "edge-2",
            serial: 7,
            not_before_unix: now - 60,
            not_after_unix: now + 3600,
        })
        .unwrap();
    let dir_d = stack.tmp.path().join("edge-2-rogue");
    let cfg_d = stack.write_agent_config("edge-2", &dir_d);
    std::fs::write(dir_d.join("agent.key"), &key.key_pem).unwrap();
    std::fs::write(dir_d.join("agent.crt"), &cert).unwrap();
    std::fs::copy(&stack.ca_file, dir_d.join("ca.pem")).unwrap();
    wait_until(
        "killed edge-2 seen as gone",
        Duration::from_secs(30),
        || (!stack.agent_connected("edge-2")).then_some(()),
    );
    let _d = stack.spawn_agent(&cfg_d, None, "edge-2-rogue.log");
    wait_until(
        "server to refuse the rogue certificate",
        Duration::from_secs(30),
        || {
            stack
                .server
                .log_text()
                .contains("agent handshake failed")
                .then_some(())
        },
    );
    assert!(!stack.agent_connected("edge-2"));
}

#[test]
fn pgbench_select_only_runs_through_the_gateway_in_every_protocol_mode() {
    let (stack, key) = Stack::start();
    let init = std::process::Command::new("pgbench")
        .args([
            "-i",
            "-s",
            "1",
            "-q",
            "-h",
            "127.0.0.1",
            "-p",
            &stack.pg.port.to_string(),
            "-U",
            AGENT_ROLE,
            "app",
        ])
        .env("PGPASSWORD", AGENT_PASSWORD)
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let (host, port) = stack.pg_addr.rsplit_once(':').unwrap();
    let pg_port = stack.pg.port.to_string();
    let history = || -> i64 {
        stack
            .pg
            .psql_super("app", "select count(*) from pgbench_history")
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    // The extended protocol with unnamed statements, named prepared
    // statements, and the simple protocol; select-only and TPC-B-like (which
    // writes); each run through the gateway and directly must process every
    // transaction without a failure.
    for mode in ["extended", "prepared", "simple"] {
        for (script, per_client) in [("-S", "100"), ("-b tpcb-like", "25")] {
            for (via, h, p, user, pw, ssl) in [
                ("gateway", host, port, "db", key.as_str(), "require"),
                (
                    "direct",
                    "127.0.0.1",
                    pg_port.as_str(),
                    AGENT_ROLE,
                    AGENT_PASSWORD,
                    "disable",
                ),
            ] {
                let before = history();
                let run = std::process::Command::new("pgbench")
                    .args(script.split(' '))
                    .args(["-M", mode, "-c", "4", "-t", per_client, "-n"])
                    .args(["-h", h, "-p", p, "-U", user, "app"])
                    .env("PGPASSWORD", pw)
                    .env("PGSSLMODE", ssl)
                    .output()
                    .unwrap();
                let out = String::from_utf8_lossy(&run.stdout);
                let what = format!("{script} -M {mode} {via}");
                assert!(
                    run.status.success(),
                    "{what}: {}{}",
                    out,
                    String::from_utf8_lossy(&run.stderr)
                );
                let expect = 4 * per_client.parse::<i64>().unwrap();
                assert!(
                    out.contains(&format!(
                        "number of transactions actually processed: {expect}/{expect}"
                    )),
                    "{what}: {out}"
                );
                assert!(
                    out.contains("number of failed transactions: 0"),
                    "{what}: {out}"
                );
                let written = history() - before;
                assert_eq!(written, if script == "-S" { 0 } else { expect }, "{what}");
                let tps = out
                    .lines()
                    .find(|l| l.starts_with("tps"))
                    .unwrap_or_default();
                println!("pgbench {what}: {tps}");
            }
        }
    }
    // Statements of the extended protocol (the first sessions) are audited
    // with their text from Parse.
    let events = wait_until(
        "extended statements audited",
        Duration::from_secs(30),
        || {
            let ev = stack.audit_events(&["--target", "db", "--limit", "200"]);
            ev.iter()
                .any(|e| {
                    e["statement"]
                        .as_str()
                        .is_some_and(|s| s.contains("pgbench_accounts WHERE aid = $1"))
                })
                .then_some(ev)
        },
    );
    assert!(!events.is_empty());
}

#[test]
fn agent_killed_before_acknowledgement_delivers_its_spooled_events_once_after_restart() {
    let (mut stack, key) = Stack::start();
    for round in 0..3 {
        let tags: Vec<String> = (0..10).map(|i| format!("r{round}-s{i}")).collect();
        for t in &tags {
            let o = stack.psql_gateway("db", &key, "app", &format!("select '{t}'"));
            assert!(o.status.success(), "{}", text(&o));
        }
        // No waiting for the commit: whatever was not acknowledged yet is
        // only in the agent's spool now.
        stack.agent.as_mut().unwrap().kill9();
        stack.start_agent(None);
        stack.wait_agent_connected("edge-1");
        let events = wait_until("spooled events delivered", Duration::from_secs(30), || {
            let ev = stack.audit_events(&["--target", "db"]);
            tags.iter()
                .all(|t| ev.iter().any(|e| e["statement"] == format!("select '{t}'")))
                .then_some(ev)
        });
        for t in &tags {
            let n = events
                .iter()
                .filter(|e| e["statement"] == format!("select '{t}'"))
                .count();
            assert_eq!(n, 1, "{t} audited {n} times");
        }
    }
    let log = std::fs::read_to_string(stack.tmp.path().join("agent.log")).unwrap();
    println!(
        "restarts that found unacknowledged events in the spool: {}",
        log.matches("re-sending audit events").count()
    );
}
