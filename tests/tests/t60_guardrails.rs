//! Guardrails through the whole path: a policy applied with the CLI, the
//! committed SQL corpus sent by psql through the gateway to a real
//! PostgreSQL, each decision checked, and for every refused statement the
//! database itself shows that nothing changed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};

use gatehouse_e2e::*;
use gatehouse_policy::Action;
use gatehouse_policy::corpus::Case;

const CORPUS: &str = include_str!("../../lib/policy/testdata/guardrails.sql");
const SCHEMA: &str = include_str!("../../lib/policy/testdata/schema.sql");
const POLICY_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../lib/policy/testdata");

fn corpus() -> Vec<Case> {
    gatehouse_policy::corpus::parse(CORPUS).unwrap()
}

/// Runs the whole corpus under the policy in force, `expect` choosing the
/// decision column. Returns the failures.
fn run_corpus(stack: &Stack, key: &str, expect: fn(&Case) -> Action) -> Vec<String> {
    let mut failures = Vec::new();
    let mut before = fingerprint(stack);
    for c in corpus() {
        let (stdout, stderr, _) = stack.psql_user(key, &c.sql);
        let refused = stderr.contains("ERROR:  42501: gatehouse: statement refused by rule");
        let want = expect(&c);
        match want {
            Action::Allow => {
                if refused {
                    failures.push(format!("{}: refused, want allow\n{stderr}", c.name));
                }
                before = fingerprint(stack);
            }
            Action::Deny | Action::Approve => {
                if !refused {
                    failures.push(format!(
                        "{}: not refused, want {want:?}\nstdout={stdout}\nstderr={stderr}",
                        c.name
                    ));
                } else if want == Action::Approve
                    && !stderr.contains("approval requested as request")
                {
                    failures.push(format!(
                        "{}: refused without approval wording\n{stderr}",
                        c.name
                    ));
                }
                let after = fingerprint(stack);
                if after != before {
                    failures.push(format!("{}: the database changed although refused", c.name));
                    before = after;
                }
            }
        }
    }
    failures
}

#[test]
fn corpus_through_psql_under_read_only_and_writes_need_approval_policies() {
    let (stack, key) = Stack::start();
    stack
        .pg
        .psql_super("app", &format!("set role {AGENT_ROLE};\n{SCHEMA}"))
        .unwrap();

    // No document yet: everything runs, and show says so.
    let none = stack.cli(&["policy", "show"]);
    assert!(!none.status.success());
    assert!(String::from_utf8_lossy(&none.stderr).contains("no policy document"));

    let readonly = format!("{POLICY_DIR}/readonly.yaml");
    let applied = stack.cli_ok(&["policy", "apply", "-f", &readonly, "-o", "json"]);
    let applied: serde_json::Value = serde_json::from_str(&applied).unwrap();
    assert_eq!(applied["seq"], 1);
    let ro_version = applied["policy_version"].as_str().unwrap().to_string();
    // Applying the same document again changes nothing.
    let again = stack.cli_ok(&["policy", "apply", "-f", &readonly]);
    assert!(again.contains("already in force"), "{again}");

    let failures = run_corpus(&stack, &key, |c| c.readonly);
    assert!(
        failures.is_empty(),
        "read-only policy:\n{}",
        failures.join("\n")
    );

    // The refusals are evidence: denied statements with the rule and the
    // policy version they were decided under.
    let events = stack.cli_ok(&["audit", "events", "-o", "json"]);
    let events: serde_json::Value = serde_json::from_str(&events).unwrap();
    let denied: Vec<&serde_json::Value> = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["decision"] == "deny" && e["kind"] == "statement")
        .collect();
    let terminate = denied
        .iter()
        .find(|e| {
            e["statement"]
                .as_str()
                .unwrap_or("")
                .contains("pg_terminate_backend(pid)")
        })
        .expect("a denied pg_terminate_backend statement in the audit log");
    assert_eq!(terminate["policy_version"], ro_version.as_str());
    assert!(
        terminate["detail"]
            .as_str()
            .unwrap()
            .contains("side-effect-functions"),
        "{terminate}"
    );

    let writes = format!("{POLICY_DIR}/writes-need-approval.yaml");
    let applied = stack.cli_ok(&["policy", "apply", "-f", &writes, "-o", "json"]);
    let applied: serde_json::Value = serde_json::from_str(&applied).unwrap();
    assert_eq!(applied["seq"], 2);
    assert_ne!(applied["policy_version"].as_str().unwrap(), ro_version);
    let diff = stack.cli_ok(&["policy", "diff"]);
    assert!(diff.contains("+    - name: writes-need-approval"), "{diff}");
    let history = stack.cli_ok(&["policy", "history", "-o", "json"]);
    let history: serde_json::Value = serde_json::from_str(&history).unwrap();
    assert_eq!(history.as_array().unwrap().len(), 2);
    let first = stack.cli_ok(&["policy", "show", "1"]);
    assert!(first.contains("Read-only access"), "{first}");

    let failures = run_corpus(&stack, &key, |c| c.writes);
    assert!(
        failures.is_empty(),
        "writes-need-approval policy:\n{}",
        failures.join("\n")
    );
}

#[test]
fn a_bad_policy_is_refused_with_a_one_line_cause_and_startup_role_changes_are_judged() {
    let (stack, key) = Stack::start();
    let bad = stack.tmp.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "guardrails:\n  rules:\n    - name: x\n      action: maybe\n",
    )
    .unwrap();
    let out = stack.cli(&["policy", "apply", "-f", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("action") && err.trim().lines().count() == 1,
        "{err}"
    );

    stack.cli_ok(&[
        "policy",
        "apply",
        "-f",
        &format!("{POLICY_DIR}/readonly.yaml"),
    ]);
    // PGOPTIONS setting a role reaches the gateway as a startup parameter.
    let (host, port) = stack.pg_addr.rsplit_once(':').unwrap();
    let out = Command::new("psql")
        .args(["-X", "-c", "select current_user"])
        .arg(format!(
            "host={host} port={port} user=db dbname=app sslmode=require"
        ))
        .env("PGPASSWORD", &key)
        .env("PGOPTIONS", "-c role=postgres")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("session refused by rule \"default\""), "{err}");
    // Without it the same connection works.
    let (stdout, stderr, _) = stack.psql_user(&key, "select current_user");
    assert!(stdout.contains(AGENT_ROLE), "{stdout}{stderr}");
}

/// The error a refused statement gives a driver: SQLSTATE and message.
fn db_error(e: &tokio_postgres::Error) -> (String, String) {
    let d = e
        .as_db_error()
        .unwrap_or_else(|| panic!("not a server error: {e}"));
    (d.code().code().to_string(), d.message().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_refusals_keep_the_connection_and_abort_the_transaction() {
    let (stack, key) = tokio::task::spawn_blocking(Stack::start).await.unwrap();
    stack
        .pg
        .psql_super("app", &format!("set role {AGENT_ROLE};\n{SCHEMA}"))
        .unwrap();
    stack.cli_ok(&[
        "policy",
        "apply",
        "-f",
        &format!("{POLICY_DIR}/readonly.yaml"),
    ]);

    let mut c = stack.driver(&key).await;

    // Refused at Parse, naming the rule; the connection carries on.
    let e = c
        .prepare("SELECT pg_terminate_backend($1)")
        .await
        .unwrap_err();
    let (code, message) = db_error(&e);
    assert_eq!(code, "42501");
    assert!(
        message.contains("rule \"side-effect-functions\""),
        "{message}"
    );
    let n: i64 = c
        .query_one("SELECT count(*) FROM orders WHERE id > $1", &[&0i32])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 3);

    // Pipelined: the allowed query before and after the refused one both run.
    let (a, b, d) = tokio::join!(
        c.query_one("SELECT $1::int + 1", &[&1i32]),
        c.execute("DELETE FROM orders WHERE id = $1", &[&1i32]),
        c.query_one("SELECT $1::text", &[&"after"]),
    );
    assert_eq!(a.unwrap().get::<_, i32>(0), 2);
    assert_eq!(db_error(&b.unwrap_err()).0, "42501");
    assert_eq!(d.unwrap().get::<_, String>(0), "after");

    // In a transaction the refusal aborts it, as any error would.
    let tx = c.transaction().await.unwrap();
    tx.query("SELECT 1", &[]).await.unwrap();
    let e = tx
        .execute("UPDATE orders SET amount = 0 WHERE id = $1", &[&2i32])
        .await
        .unwrap_err();
    assert_eq!(db_error(&e).0, "42501");
    let e = tx.query("SELECT 1", &[]).await.unwrap_err();
    assert_eq!(db_error(&e).0, "25P02", "{e}");
    tx.rollback().await.unwrap();

    // Nothing changed, read from the database itself.
    let rows = stack
        .pg
        .psql_super(
            "app",
            "select string_agg(id || ':' || amount, ',' order by id) from orders",
        )
        .unwrap();
    assert_eq!(rows.trim(), "1:10,2:20,3:30");
}
