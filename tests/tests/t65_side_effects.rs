//! "Read" means read: the committed side-effect corpus sent by psql through
//! the gateway under a read-only policy written the natural way
//! (`kinds: [read, transaction]`). Gatehouse refuses every side effect
//! itself; every read runs; the database shows nothing changed. Then the
//! second wall: with the classifier switched off (a debug-build hook), the
//! writes are still refused by PostgreSQL, because the session is
//! read-only, and turning read-only off is refused by Gatehouse.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use gatehouse_e2e::*;
use gatehouse_policy::corpus::EffectCase;

const CORPUS: &str = include_str!("../../lib/policy/testdata/side-effects.sql");
const SCHEMA: &str = include_str!("../../lib/policy/testdata/schema.sql");
const FUNCTIONS: &str = include_str!("../../lib/policy/testdata/side-effects-schema.sql");
const POLICY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../lib/policy/testdata/read-transaction.yaml"
);

const REFUSED: &str = "ERROR:  42501: gatehouse: statement refused by rule";

/// Statements that would turn read-only off, each refused by rule
/// "read-only" whatever else is on.
const TOGGLES: [&str; 9] = [
    "SET default_transaction_read_only = off",
    "RESET default_transaction_read_only",
    "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
    "BEGIN READ WRITE",
    "START TRANSACTION READ WRITE",
    "BEGIN; SET TRANSACTION READ WRITE",
    "BEGIN; SET LOCAL transaction_read_only = off",
    "SELECT set_config('default_transaction_read_only', 'off', false)",
    "SELECT pg_catalog.set_config('transaction_read_only', 'off', true)",
];

fn corpus() -> Vec<EffectCase> {
    gatehouse_policy::corpus::parse_effects(CORPUS).unwrap()
}

fn toggles_refused(stack: &Stack, key: &str) -> Vec<String> {
    let mut failures = Vec::new();
    for sql in TOGGLES {
        let (_, stderr, _) = stack.psql_user(key, sql);
        if !stderr.contains(&format!("{REFUSED} \"read-only\"")) {
            failures.push(format!("{sql}: not refused by rule read-only\n{stderr}"));
        }
    }
    for options in [
        "-c default_transaction_read_only=off",
        "--default-transaction-read-only=off",
        "-c transaction_read_only=off",
    ] {
        let (_, stderr, ok) = stack.psql_user_options(key, options, "select 1");
        if ok || !stderr.contains("session refused by rule \"read-only\"") {
            failures.push(format!("PGOPTIONS={options}: not refused\n{stderr}"));
        }
    }
    failures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn side_effects_refused_reads_run_and_postgres_is_the_second_wall() {
    let (mut stack, key) = tokio::task::block_in_place(Stack::start);
    stack
        .pg
        .psql_super(
            "app",
            &format!("set role {AGENT_ROLE};\n{SCHEMA}\n{FUNCTIONS}"),
        )
        .unwrap();
    stack.cli_ok(&["policy", "apply", "-f", POLICY]);
    let cases = corpus();
    assert!(cases.iter().filter(|c| c.effect.is_some()).count() >= 60);
    assert!(cases.iter().filter(|c| c.effect.is_none()).count() >= 40);

    // The session is read-only on the target.
    let (stdout, stderr, ok) = stack.psql_user(&key, "show default_transaction_read_only");
    assert!(ok && stdout.contains("\non\n"), "{stdout}{stderr}");

    // Every side effect is refused by Gatehouse itself, naming the rule;
    // every read runs; nothing changed.
    let mut failures = Vec::new();
    let before = fingerprint(&stack);
    for c in &cases {
        let (stdout, stderr, ok) = stack.psql_user(&key, &c.sql);
        match c.effect {
            Some(kind) if !stderr.contains(REFUSED) => failures.push(format!(
                "{} ({}): not refused by Gatehouse\nstdout={stdout}\nstderr={stderr}",
                c.name,
                kind.as_str()
            )),
            None if !ok || stderr.contains("ERROR") => {
                failures.push(format!("{}: a read that did not run\n{stderr}", c.name))
            }
            _ => {}
        }
    }
    assert_eq!(fingerprint(&stack), before, "the database changed");
    failures.extend(toggles_refused(&stack, &key));
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // The client is told what was called and why; the refusal is evidence.
    let (_, stderr, _) = stack.psql_user(&key, "SELECT pg_catalog.pg_terminate_backend(0)");
    assert!(
        stderr.contains("pg_terminate_backend() (server administration) is a server statement"),
        "{stderr}"
    );
    let events = stack.audit_events(&["--target", "db"]);
    assert!(
        events.iter().any(|e| e["decision"] == "deny"
            && e["statement"] == "SELECT pg_catalog.pg_terminate_backend(0)"
            && e["detail"] == "refused by rule \"default\""),
        "the refused pg_terminate_backend is in the audit log"
    );

    // A STABLE user function runs; made VOLATILE by CREATE OR REPLACE
    // elsewhere, the next call in the same session is refused.
    let client = stack.driver(&key).await;
    let n = client.simple_query("select order_count()").await;
    assert!(n.is_ok(), "{n:?}");
    tokio::task::block_in_place(|| {
        stack
            .pg
            .psql_super(
                "app",
                &format!(
                    "set role {AGENT_ROLE}; create or replace function order_count() returns bigint \
                     language sql volatile as 'select count(*) from orders'"
                ),
            )
            .unwrap()
    });
    let err = client
        .simple_query("select order_count()")
        .await
        .unwrap_err();
    let db = err.as_db_error().expect("a database error");
    assert_eq!(db.code().code(), "42501");
    assert!(
        db.message()
            .contains("order_count() (a VOLATILE user function)"),
        "{}",
        db.message()
    );
    drop(client);

    // The second wall: the classifier off, PostgreSQL refuses the writes
    // itself (25006, read-only transaction) and nothing changes; turning
    // read-only off is still refused by Gatehouse.
    stack.agent_env = vec![(
        "GATEHOUSE_AGENT_TEST_NO_FUNCTION_CLASSES".into(),
        "1".into(),
    )];
    tokio::task::block_in_place(|| {
        stack.agent.as_mut().unwrap().kill9();
        stack.start_agent(None);
        stack.wait_agent_connected("edge-1");
    });
    let before = fingerprint(&stack);
    let mut failures = Vec::new();
    let walled: Vec<&EffectCase> = cases.iter().filter(|c| c.refused_by_postgres).collect();
    assert!(
        walled.len() >= 20,
        "{} cases PostgreSQL refuses",
        walled.len()
    );
    for c in walled {
        let (stdout, stderr, _) = stack.psql_user(&key, &c.sql);
        if stderr.contains(REFUSED) || !stderr.contains("ERROR:  25006") {
            failures.push(format!(
                "{}: not refused by PostgreSQL as read-only\nstdout={stdout}\nstderr={stderr}",
                c.name
            ));
        }
    }
    assert_eq!(fingerprint(&stack), before, "the database changed");
    failures.extend(toggles_refused(&stack, &key));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let log = std::fs::read_to_string(stack.tmp.path().join("agent.log")).unwrap_or_default();
    assert!(log.contains("test hook: built-in functions are not judged by class"));
}
