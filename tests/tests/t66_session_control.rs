//! Session limits from access rules: the longest a session may last and
//! how long it may sit idle. Each ends the session with a FATAL naming the
//! limit and an audit event; activity keeps an idle limit away.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gatehouse_e2e::*;

/// psql reading statements from a pipe, through the gateway as `key`.
fn interactive(stack: &Stack, key: &str) -> Child {
    let (host, port) = stack.pg_addr.rsplit_once(':').unwrap();
    Command::new("psql")
        .args(["-X", "-A", "-t", "-q", "-v", "VERBOSITY=verbose"])
        .arg(format!(
            "host={host} port={port} user=db dbname=app sslmode=verify-full sslrootcert={}",
            stack.ca_file.display()
        ))
        .env("PGPASSWORD", key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn account(stack: &Stack, name: &str, limit: &[&str]) -> String {
    let key = stack.create_account(name, &[]);
    let subject = format!("sa:{name}");
    let mut args = vec!["rules", "create", "--subject", &subject, "--target", "db"];
    args.extend_from_slice(limit);
    stack.cli_ok(&args);
    key
}

/// Waits for psql to end on its own (the gateway ended the session), then
/// returns its stderr.
fn ended(mut psql: Child, within: Duration) -> String {
    let t0 = Instant::now();
    // libpq reads the FATAL when it next talks to the server.
    let mut stdin = psql.stdin.take().unwrap();
    while t0.elapsed() < within {
        if psql.try_wait().unwrap().is_some() {
            break;
        }
        let _ = writeln!(stdin, "select 1;");
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(stdin);
    let out = psql.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rules_limits_end_sessions_with_a_fatal_error_and_an_audit_event() {
    let (stack, _) = tokio::task::block_in_place(Stack::start);

    // Idle timeout: a session that keeps talking stays; one that stops is
    // ended once the limit has passed with nothing moving.
    let idle_key = account(&stack, "idler", &["--idle-timeout", "2s"]);
    let busy = stack.driver(&idle_key).await;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(4) {
        busy.simple_query("select 1")
            .await
            .expect("an active session stays");
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    drop(busy);
    let quiet = tokio::task::block_in_place(|| {
        let mut psql = interactive(&stack, &idle_key);
        writeln!(psql.stdin.as_mut().unwrap(), "select 'awake';").unwrap();
        let t_last = Instant::now();
        // Nothing more is sent until well past the limit.
        std::thread::sleep(Duration::from_millis(3_000));
        let err = ended(psql, Duration::from_secs(5));
        (err, t_last.elapsed())
    });
    assert!(
        quiet
            .0
            .contains("FATAL:  57P05: gatehouse: session ended: idle for 2s"),
        "{}",
        quiet.0
    );

    // Maximum session length: ended however busy it is.
    let short_key = account(&stack, "brief", &["--max-session", "3s"]);
    let err = tokio::task::block_in_place(|| {
        let psql = interactive(&stack, &short_key);
        let t0 = Instant::now();
        let err = ended(psql, Duration::from_secs(8));
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(2_900) && took < Duration::from_millis(5_000),
            "the session lasted {took:?}"
        );
        err
    });
    assert!(
        err.contains(
            "FATAL:  57P01: gatehouse: session ended: it reached the access rule's maximum session length of 3s"
        ),
        "{err}"
    );

    // Both are evidence: the session's end event names the limit.
    let events = stack.audit_events(&["--target", "db"]);
    for (who, limit) in [
        ("sa:idler", "idle for 2s"),
        ("sa:brief", "maximum session length"),
    ] {
        assert!(
            events.iter().any(|e| e["kind"] == "session_end"
                && e["identity"] == who
                && e["detail"].as_str().is_some_and(|d| d.contains(limit))),
            "no session_end for {who} naming {limit}"
        );
    }
    // The rule shows its limits.
    let rules: serde_json::Value =
        serde_json::from_str(&stack.cli_ok(&["rules", "list", "-o", "json"])).unwrap();
    let brief = rules["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["subject"] == "sa:brief")
        .unwrap();
    assert_eq!(brief["max_session_secs"], 3);
    assert_eq!(brief["idle_timeout_secs"], 0);

    // The third wall: what the agent's role may do on the target beyond
    // reading, from the target's own catalog.
    let out = stack.psql_direct("app", "create table checked (x int)");
    assert!(out.status.success());
    let check = stack.cli(&["targets", "check", "db", "--database", "app", "-o", "json"]);
    assert_eq!(check.status.code(), Some(3), "{check:?}");
    let v: serde_json::Value = serde_json::from_slice(&check.stdout).unwrap();
    assert_eq!(v["read_only"], false);
    assert_eq!(v["role"], AGENT_ROLE);
    let beyond: Vec<&str> = v["beyond_reads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    assert!(
        beyond.iter().any(|b| b.starts_with("write to tables")),
        "{beyond:?}"
    );
    assert!(
        beyond.iter().any(|b| b.starts_with("own relations")),
        "{beyond:?}"
    );
    let text = stack.cli(&["targets", "check", "db", "--database", "app"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("may do more than read:"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforce_immediate_closes_what_the_new_version_no_longer_admits() {
    let (stack, key) = tokio::task::block_in_place(Stack::start);
    let dir = stack.tmp.path();
    let apply = |name: &str, yaml: &str| -> String {
        let f = dir.join(name);
        std::fs::write(&f, yaml).unwrap();
        let out = stack.cli_ok(&["policy", "apply", "-f", f.to_str().unwrap(), "-o", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["policy_version"].as_str().unwrap().to_string()
    };
    const READS: &str = "guardrails:\n  default: deny\n  rules:\n    - name: reads\n      action: allow\n      kinds: [read, transaction]\n";

    // A read-write session, and a new read-only version for new sessions
    // only: the running one keeps its version.
    apply("open.yaml", "guardrails:\n  default: allow\n");
    let writer = stack.driver(&key).await;
    apply("reads.yaml", READS);
    writer
        .simple_query("create temp table scratch (x int)")
        .await
        .expect("the running session keeps the version it opened under");
    let reader = stack.driver(&key).await;
    reader
        .simple_query("select pg_backend_pid()")
        .await
        .unwrap();

    // The same reads, now refusing pg_backend_pid, in force immediately.
    let strict = "enforce: immediate\nguardrails:\n  default: deny\n  rules:\n    - name: no-pid-first\n      action: deny\n      functions: [pg_backend_pid]\n    - name: reads\n      action: allow\n      kinds: [read, transaction]\n";
    let version = apply("strict.yaml", strict);
    // The read-write session cannot go on under a read-only version.
    let err = writer.simple_query("select 1").await.unwrap_err();
    assert!(err.is_closed() || err.as_db_error().is_some(), "{err}");
    // The read-only one goes on, judged by the new version.
    let refused = reader
        .simple_query("select pg_backend_pid()")
        .await
        .unwrap_err();
    let db = refused.as_db_error().expect("a refusal");
    assert_eq!(db.code().code(), "42501");
    assert!(db.message().contains("no-pid-first"), "{}", db.message());
    reader
        .simple_query("select 1")
        .await
        .expect("still running");

    // The agent ships its events in the background (each is durable in its
    // spool before the client hears the answer): wait for the refusal's.
    let events = gatehouse_e2e::wait_until(
        "the refusal's audit event",
        std::time::Duration::from_secs(15),
        || {
            let ev = stack.audit_events(&["--target", "db"]);
            ev.iter()
                .any(|e| {
                    e["kind"] == "statement"
                        && e["statement"] == "select pg_backend_pid()"
                        && e["decision"] == "deny"
                })
                .then_some(ev)
        },
    );
    assert!(
        events.iter().any(|e| e["kind"] == "session_killed"
            && e["detail"].as_str().is_some_and(
                |d| d.contains("in force immediately") && d.contains("admits no write")
            )),
        "the closing is evidence"
    );
    assert!(
        events.iter().any(|e| e["kind"] == "statement"
            && e["statement"] == "select pg_backend_pid()"
            && e["decision"] == "deny"
            && e["policy_version"] == version.as_str()),
        "the refusal cites the version in force"
    );
    let sessions = stack.cli_ok(&["sessions", "list", "-o", "json"]);
    assert!(sessions.contains("cannot go on under it"), "{sessions}");
}
