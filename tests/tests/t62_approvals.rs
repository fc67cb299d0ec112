//! Just-in-time approval through the whole path: a held DELETE waits in
//! psql while reviewers decide with the CLI; it runs exactly once when
//! approved, is refused with the reviewer's reason when denied, refused
//! when its request expires; requesters cannot approve their own requests;
//! a 2-of-2 threshold needs both reviewers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gatehouse_e2e::*;

const SCHEMA: &str = "create table orders (id int primary key, amount int);
insert into orders select g, g * 10 from generate_series(1, 10) g;";

fn policy(stack: &Stack, wait_seconds: u64, required: u32, grant_minutes: u32, webhook: &str) {
    let yaml = format!(
        r#"
guardrails:
  default: allow
  rules:
    - name: deletes-need-approval
      action: approve
      message: deleting orders needs a reviewer
      kinds: [write]
      tables: [orders]
approvals:
  wait_seconds: {wait_seconds}
  required: {required}
  approver_groups: [reviewers]
  grant_minutes: {grant_minutes}
  webhook: {webhook}
"#
    );
    let path = stack
        .tmp
        .path()
        .join(format!("policy-{wait_seconds}-{required}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    stack.cli_ok(&["policy", "apply", "-f", path.to_str().unwrap()]);
}

/// An HTTP endpoint that answers its first POST with 500 (to prove
/// retries) and the rest with 204, and hands every body to the test.
fn webhook_receiver() -> (String, std::sync::mpsc::Receiver<serde_json::Value>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hooks/gatehouse", listener.local_addr().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for (n, conn) in listener.incoming().enumerate() {
            let Ok(mut conn) = conn else { return };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; len];
            if reader.read_exact(&mut body).is_err() {
                continue;
            }
            let status = if n == 0 {
                "500 Internal Server Error"
            } else {
                "204 No Content"
            };
            let _ = conn
                .write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes());
            if n > 0 {
                let _ = tx.send(serde_json::from_slice(&body).unwrap());
            }
        }
    });
    (url, rx)
}

/// The CLI as another caller (a reviewer's own API key).
fn cli_as(stack: &Stack, token: &str, args: &[&str]) -> std::process::Output {
    Command::new(bin("gatehouse"))
        .args(args)
        .env("GATEHOUSE_API", &stack.api)
        .env("GATEHOUSE_TOKEN", token)
        .env("GATEHOUSE_CA_FILE", &stack.ca_file)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// psql running one statement through the gateway, in the background.
fn spawn_psql(stack: &Stack, key: &str, sql: &str) -> Child {
    stack.psql_spawn(
        key,
        &["-X", "-v", "VERBOSITY=verbose", "-c", sql],
        "application_name=cleanup-ticket-42",
    )
}

/// Runs one statement through the gateway to the end.
fn run(stack: &Stack, key: &str, sql: &str) -> (bool, String) {
    finish(spawn_psql(stack, key, sql))
}

fn finish(child: Child) -> (bool, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Waits for a pending request by alice; returns its id.
fn pending_request(stack: &Stack) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = stack.cli_ok(&["requests", "list", "--state", "pending", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        if let Some(r) = v.as_array().unwrap().first() {
            assert_eq!(r["requester"], "sa:alice");
            assert_eq!(r["rule"], "deletes-need-approval");
            assert_eq!(r["reason"], "cleanup-ticket-42");
            return r["id"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "no pending request appeared");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn orders(stack: &Stack) -> String {
    stack
        .pg
        .psql_super(
            "app",
            "select string_agg(id::text, ',' order by id) from orders",
        )
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn held_statements_run_once_after_approval_and_not_otherwise() {
    let (stack, alice) = Stack::start();
    let bob = stack.create_account("bob", &["reviewers"]);
    let carol = stack.create_account("carol", &["reviewers"]);
    let dave = stack.create_account("dave", &["ops"]);
    // Reviewing needs the reviewer role; alice (the requester) and dave
    // (outside the approver groups) hold it too, so the state machine's
    // own checks are what refuses them.
    for p in ["group:reviewers", "sa:alice", "sa:dave"] {
        stack.cli_ok(&["roles", "grant", "reviewer", p]);
    }
    stack
        .pg
        .psql_super("app", &format!("set role {AGENT_ROLE};\n{SCHEMA}"))
        .unwrap();
    let (hook, notes) = webhook_receiver();
    policy(&stack, 30, 1, 0, &hook);
    let all = "1,2,3,4,5,6,7,8,9,10";
    assert_eq!(orders(&stack), all);

    // Held: the DELETE waits; nothing ran yet.
    let psql = spawn_psql(&stack, &alice, "DELETE FROM orders WHERE id = 1");
    let id = pending_request(&stack);
    assert_eq!(orders(&stack), all);
    // The requester cannot approve, nor can someone outside the approver
    // groups, nor an admin without the reviewer role.
    let own = cli_as(&stack, &alice, &["requests", "approve", &id]);
    assert!(!own.status.success());
    assert!(
        String::from_utf8_lossy(&own.stderr).contains("cannot review"),
        "{own:?}"
    );
    let outsider = cli_as(&stack, &dave, &["requests", "approve", &id]);
    assert!(String::from_utf8_lossy(&outsider.stderr).contains("not in an approver group"));
    let admin = stack.cli(&["requests", "approve", &id]);
    assert!(
        String::from_utf8_lossy(&admin.stderr).contains("ReviewAccessRequest needs reviewer"),
        "{admin:?}"
    );
    // Bob approves: it runs, once.
    let ok = cli_as(
        &stack,
        &bob,
        &["requests", "approve", &id, "--reason", "ticket checked"],
    );
    assert!(ok.status.success(), "{ok:?}");
    let (ok, out) = finish(psql);
    assert!(ok && out.contains("DELETE 1"), "{out}");
    assert_eq!(orders(&stack), "2,3,4,5,6,7,8,9,10");
    // The webhook heard of the request and the approval (the first POST was
    // answered 500 and retried).
    let mut heard = Vec::new();
    while heard.len() < 2 {
        let n = notes
            .recv_timeout(Duration::from_secs(10))
            .expect("webhook notification");
        assert_eq!(n["request_id"], id.as_str());
        assert_eq!(n["statement"], "DELETE FROM orders WHERE id = 1");
        heard.push(n["event"].as_str().unwrap().to_string());
    }
    heard.sort();
    assert_eq!(heard, ["approved", "requested"]);
    // Approving again is refused: the grant was used.
    let again = cli_as(&stack, &carol, &["requests", "approve", &id]);
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("is used"),
        "{again:?}"
    );

    // The same statement again is held again; a denial returns the reason.
    let psql = spawn_psql(&stack, &alice, "DELETE FROM orders WHERE id = 2");
    let id = pending_request(&stack);
    let no = cli_as(
        &stack,
        &bob,
        &["requests", "deny", &id, "--reason", "not during the audit"],
    );
    assert!(no.status.success(), "{no:?}");
    let (ok, out) = finish(psql);
    assert!(!ok);
    assert!(out.contains("42501"), "{out}");
    assert!(
        out.contains("denied by sa:bob: not during the audit"),
        "{out}"
    );
    assert_eq!(orders(&stack), "2,3,4,5,6,7,8,9,10");

    // Nobody decides: the request expires and the statement does not run.
    policy(&stack, 2, 1, 0, &hook);
    let t0 = Instant::now();
    let psql = spawn_psql(&stack, &alice, "DELETE FROM orders WHERE id = 3");
    let (ok, out) = finish(psql);
    assert!(!ok);
    assert!(out.contains("expired without an approval"), "{out}");
    assert!(
        t0.elapsed() >= Duration::from_secs(2),
        "answered before the wait ended"
    );
    assert_eq!(orders(&stack), "2,3,4,5,6,7,8,9,10");

    // Two of two: one approval is not enough.
    policy(&stack, 30, 2, 0, &hook);
    let mut psql = spawn_psql(&stack, &alice, "DELETE FROM orders WHERE id = 4");
    let id = pending_request(&stack);
    assert!(
        cli_as(&stack, &bob, &["requests", "approve", &id])
            .status
            .success()
    );
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        psql.try_wait().unwrap().is_none(),
        "ran with one approval of two"
    );
    assert_eq!(orders(&stack), "2,3,4,5,6,7,8,9,10");
    let twice = cli_as(&stack, &bob, &["requests", "approve", &id]);
    assert!(String::from_utf8_lossy(&twice.stderr).contains("already approved"));
    assert!(
        cli_as(&stack, &carol, &["requests", "approve", &id])
            .status
            .success()
    );
    let (ok, out) = finish(psql);
    assert!(ok && out.contains("DELETE 1"), "{out}");
    assert_eq!(orders(&stack), "2,3,5,6,7,8,9,10");

    // No wait: the statement returns at once with its request id; once
    // approved, running it again runs it (once).
    policy(&stack, 0, 1, 0, &hook);
    let (ok, out) = run(&stack, &alice, "DELETE FROM orders WHERE id = 5");
    assert!(
        !ok && out.contains("approval requested as request"),
        "{out}"
    );
    let id = pending_request(&stack);
    assert!(out.contains(&id), "{out}");
    assert_eq!(orders(&stack), "2,3,5,6,7,8,9,10");
    assert!(
        cli_as(&stack, &bob, &["requests", "approve", &id])
            .status
            .success()
    );
    let (ok, out) = run(&stack, &alice, "DELETE FROM orders WHERE id = 5");
    assert!(ok && out.contains("DELETE 1"), "{out}");
    assert_eq!(orders(&stack), "2,3,6,7,8,9,10");
    // The one-time grant is spent: the same text is held again.
    let (ok, out) = run(&stack, &alice, "DELETE FROM orders WHERE id = 5");
    assert!(
        !ok && out.contains("approval requested as request"),
        "{out}"
    );
    let spent = pending_request(&stack);
    assert_ne!(spent, id);
    assert!(
        cli_as(
            &stack,
            &bob,
            &["requests", "deny", &spent, "--reason", "already done"]
        )
        .status
        .success()
    );

    // A time-bound grant: once approved, any statement on the target runs
    // for its minutes.
    policy(&stack, 0, 1, 5, &hook);
    let (ok, out) = run(&stack, &alice, "DELETE FROM orders WHERE id = 6");
    assert!(!ok, "{out}");
    let id = pending_request(&stack);
    assert!(
        cli_as(&stack, &carol, &["requests", "approve", &id])
            .status
            .success()
    );
    for sql in [
        "DELETE FROM orders WHERE id = 6",
        "DELETE FROM orders WHERE id = 7",
    ] {
        let (ok, out) = run(&stack, &alice, sql);
        assert!(ok && out.contains("DELETE 1"), "{sql}: {out}");
    }
    assert_eq!(orders(&stack), "2,3,8,9,10");

    // Every step is evidence.
    let events = stack.audit_events(&[]);
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["kind"].as_str()).collect();
    for k in [
        "approval_requested",
        "approval_reviewed",
        "approval_used",
        "approval_expired",
    ] {
        assert!(kinds.contains(&k), "no {k} event in {kinds:?}");
    }
    // They carry the requester, its issuer and its groups at the time.
    let requested = events
        .iter()
        .find(|e| e["kind"] == "approval_requested")
        .unwrap();
    assert_eq!(requested["identity"], "sa:alice");
    assert_eq!(requested["issuer"], "gatehouse");
    assert_eq!(requested["groups"], serde_json::json!(["dev"]));
    let denied = events
        .iter()
        .find(|e| e["kind"] == "approval_reviewed" && e["decision"] == "deny")
        .unwrap();
    assert!(
        denied["detail"]
            .as_str()
            .unwrap()
            .contains("not during the audit")
    );
}
