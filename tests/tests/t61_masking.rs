//! Inline masking through the whole path: values leave the agent masked for
//! psql, drivers (text and binary results) and COPY, exempt callers see them
//! in clear, and no clear value reaches the audit log, the agent's spool or
//! the recordings.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use gatehouse_e2e::*;

const SCHEMA: &str = r#"
create table customers (
  id int primary key, name text, email text, card varchar(32), iban text,
  ssn text, phone text, note jsonb, account_no text);
insert into customers values
 (1, 'Ada Lovelace', 'ada@example.com', '4242-4242-4242-4242', 'DE89 3704 0044 0532 0130 00',
  '123-45-6789', '+44 20 7946 0958', '{"contact": "ada.l@example.org"}', '4242424242424241'),
 (2, 'Bob Stone', 'bob.stone@example.net', '5555555555554444', 'GB82WEST12345698765432',
  '078-05-1120', '(415) 555-0100', '{"ip": "10.1.2.3"}', '1234567812345678');
create table products (id int, name text);
insert into products values (1, 'Widget Pro');
"#;

/// Clear values that must never leave the agent for a masked session.
const CLEAR: [&str; 10] = [
    "ada@example.com",
    "4242-4242-4242-4242",
    "DE89 3704 0044 0532 0130 00",
    "123-45-6789",
    "+44 20 7946 0958",
    "ada.l@example.org",
    "bob.stone@example.net",
    "5555555555554444",
    "GB82WEST12345698765432",
    "078-05-1120",
];

const POLICY: &str = r#"
masking:
  columns: ["*.ssn", "customers.name"]
  exempt_groups: [auditors]
"#;

/// A result value as the server sent it, whatever its type.
struct Raw(Vec<u8>);

impl<'a> tokio_postgres::types::FromSql<'a> for Raw {
    fn from_sql(
        _: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(raw.to_vec()))
    }

    fn accepts(_: &tokio_postgres::types::Type) -> bool {
        true
    }
}

/// Every file under `dir`, as (lossy) text.
fn all_text(dir: &Path) -> String {
    read_tree(dir)
        .into_iter()
        .map(|(_, b)| String::from_utf8_lossy(&b).into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_leave_the_agent_masked_and_no_clear_value_reaches_the_evidence() {
    let (stack, key) = tokio::task::spawn_blocking(Stack::start).await.unwrap();
    let auditor_key = stack.create_account("carol", &["auditors"]);
    stack.cli_ok(&["rules", "create", "--subject", "sa:carol", "--target", "db"]);
    stack
        .pg
        .psql_super("app", &format!("set role {AGENT_ROLE};\n{SCHEMA}"))
        .unwrap();
    let policy = stack.tmp.path().join("masking.yaml");
    std::fs::write(&policy, POLICY).unwrap();
    stack.cli_ok(&["policy", "apply", "-f", policy.to_str().unwrap()]);

    // psql: masked values keep their shape; a 16-digit number that fails
    // Luhn is not a card; the ssn column is masked whole.
    let (out, err, ok) = stack.psql_user(&key, "select * from customers order by id");
    assert!(ok, "{err}");
    let want = [
        "id|name|email|card|iban|ssn|phone|note|account_no",
        "1|*** ********|a***@example.com|****-****-****-4242|DE** **** **** **** **30 00|***-**-****|+** ** **** **58|{\"contact\": \"a***@example.org\"}|4242424242424241",
        "2|*** *****|b***@example.net|************4444|GB****************5432|***-**-****|(***) ***-**00|{\"ip\": \"**.*.*.*\"}|1234567812345678",
        "(2 rows)",
    ];
    assert_eq!(out.trim().lines().collect::<Vec<_>>(), want, "{out}");

    // A table-qualified rule masks that table's column only.
    let (out, err, ok) = stack.psql_user(&key, "select name from products");
    assert!(ok, "{err}");
    assert!(out.contains("Widget Pro"), "{out}");

    // COPY text output is masked; binary COPY output is refused before it runs.
    let (out, err, ok) = stack.psql_user(
        &key,
        "copy (select email, card from customers order by id) to stdout with (format csv)",
    );
    assert!(ok, "{err}");
    assert_eq!(
        out,
        "a***@example.com,****-****-****-4242\nb***@example.net,************4444\n"
    );
    let (_, err, ok) = stack.psql_user(&key, "copy customers to stdout with (format binary)");
    assert!(!ok);
    assert!(
        err.contains("42501") && err.contains("rule \"masking\""),
        "{err}"
    );

    // A driver: binary results of text columns and jsonb, and a parameter
    // that is itself personal data.
    let c = stack.driver(&key).await;
    let row = c
        .query_one(
            "select email, note::text, note from customers where email = $1",
            &[&"ada@example.com"],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "a***@example.com");
    assert_eq!(
        row.get::<_, String>(1),
        r#"{"contact": "a***@example.org"}"#
    );
    // jsonb in binary: a version byte, then the text.
    let note: Raw = row.get(2);
    assert_eq!(note.0.first(), Some(&1));
    let note: serde_json::Value = serde_json::from_slice(&note.0[1..]).unwrap();
    assert_eq!(note["contact"], "a***@example.org");
    drop(c);

    // An exempt group sees clear values, and its session start says so.
    let (out, err, ok) = stack.psql_user(
        &auditor_key,
        "select email, ssn from customers where id = 1",
    );
    assert!(ok, "{err}");
    assert!(out.contains("ada@example.com|123-45-6789"), "{out}");

    // The evidence: masked counts per detector, no clear value anywhere.
    let deadline = Instant::now() + Duration::from_secs(20);
    let events = loop {
        let events = stack.cli_ok(&["audit", "events", "-o", "json"]);
        let parsed: serde_json::Value = serde_json::from_str(&events).unwrap();
        let done = parsed.as_array().unwrap().iter().any(|e| {
            e["kind"] == "statement"
                && e["statement"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("select * from customers")
        });
        if done || Instant::now() > deadline {
            break parsed;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let select = events
        .as_array()
        .unwrap()
        .iter()
        .find(|e| {
            e["identity"] == "sa:alice"
                && e["statement"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("select * from customers")
        })
        .expect("the select in the audit log");
    let counts: std::collections::BTreeMap<String, u64> = select["masked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["detector"].as_str().unwrap().to_string(),
                m["count"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(counts.get("email"), Some(&3), "{counts:?}");
    assert_eq!(counts.get("card"), Some(&2), "{counts:?}");
    assert_eq!(counts.get("iban"), Some(&2), "{counts:?}");
    assert_eq!(counts.get("phone"), Some(&2), "{counts:?}");
    assert_eq!(counts.get("ipv4"), Some(&1), "{counts:?}");
    assert_eq!(counts.get("column"), Some(&4), "{counts:?}");
    let param = events
        .as_array()
        .unwrap()
        .iter()
        .find(|e| {
            e["statement"]
                .as_str()
                .unwrap_or("")
                .contains("where email = $1")
        })
        .expect("the driver's statement in the audit log");
    assert_eq!(param["parameters"][0], "a***@example.com");
    let exempt_start = events.as_array().unwrap().iter().any(|e| {
        e["identity"] == "sa:carol"
            && e["kind"] == "session_start"
            && e["detail"]
                .as_str()
                .unwrap_or("")
                .contains("masking exemption")
    });
    assert!(
        exempt_start,
        "the exempt session is not marked in the audit log"
    );

    // Nothing clear in what alice's sessions left behind: the audit log (her
    // events), the agent's spool and the recordings.
    let alice: String = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["identity"] == "sa:alice")
        .map(|e| e.to_string())
        .collect();
    for v in CLEAR {
        assert!(!alice.contains(v), "audit log holds {v}");
    }
    let recordings = all_text(&stack.recordings);
    assert!(!recordings.is_empty(), "no recordings written");
    // Carol's exempt session may hold clear values in its own recording;
    // alice's recordings must not.
    for v in CLEAR
        .iter()
        .filter(|v| **v != "ada@example.com" && **v != "123-45-6789")
    {
        assert!(!recordings.contains(v), "a recording holds {v}");
    }
    let spool = all_text(&stack.tmp.path().join("agent"));
    for v in CLEAR
        .iter()
        .filter(|v| **v != "ada@example.com" && **v != "123-45-6789")
    {
        assert!(!spool.contains(v), "the agent's data directory holds {v}");
    }
}
