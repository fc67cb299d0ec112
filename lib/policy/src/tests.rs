use std::sync::Arc;

use super::*;

fn doc(yaml: &str) -> Arc<PolicyDoc> {
    match PolicyDoc::from_yaml(yaml) {
        Ok(d) => Arc::new(d),
        Err(e) => panic!("{e}"),
    }
}

fn guard(d: &Arc<PolicyDoc>) -> Guard {
    Guard::new(
        d.clone(),
        Subject {
            identity: "ana".into(),
            groups: vec!["analysts".into()],
            target: "orders".into(),
        },
    )
}

fn corpus() -> Vec<crate::corpus::Case> {
    match crate::corpus::parse(include_str!("../testdata/guardrails.sql")) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn corpus_decisions_under_both_policies() {
    let ro = doc(include_str!("../testdata/readonly.yaml"));
    let wr = doc(include_str!("../testdata/writes-need-approval.yaml"));
    let cases = corpus();
    assert!(cases.len() >= 150, "{} cases", cases.len());
    let mut names = std::collections::HashSet::new();
    let mut wrong = Vec::new();
    for c in &cases {
        assert!(names.insert(c.name.clone()), "duplicate case {}", c.name);
        for (label, d, want) in [("readonly", &ro, c.readonly), ("writes", &wr, c.writes)] {
            let v = guard(d).judge(&c.sql, 0);
            if v.action != want {
                wrong.push(format!(
                    "{} under {label}: got {:?} by {} ({}), want {want:?}\n  {:?}",
                    c.name,
                    v.action,
                    v.rule,
                    v.message,
                    classify(&c.sql)
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn every_kind_is_covered_by_the_corpus() {
    let mut seen = std::collections::BTreeSet::new();
    for c in corpus() {
        if let Ok(stmts) = classify(&c.sql) {
            for s in stmts {
                seen.extend(s.kinds.iter().map(|(k, _)| *k));
            }
        }
    }
    for k in [
        Kind::Read,
        Kind::Write,
        Kind::Ddl,
        Kind::Privilege,
        Kind::Session,
        Kind::Config,
        Kind::Transaction,
        Kind::Utility,
        Kind::Procedural,
        Kind::Server,
    ] {
        assert!(seen.contains(&k), "no case of kind {k:?}");
    }
}

#[test]
fn writable_cte_is_a_write_on_its_table() {
    let s =
        classify("WITH d AS (DELETE FROM s.t RETURNING *) SELECT * FROM d, u").unwrap_or_default();
    assert_eq!(s.len(), 1);
    let kinds = &s[0].kinds;
    assert!(kinds.contains(&(Kind::Write, Some("s.t".into()))));
    assert!(kinds.contains(&(Kind::Read, Some("u".into()))));
    // The CTE's own name is not a table.
    assert!(!kinds.iter().any(|(_, t)| t.as_deref() == Some("d")));
    assert!(s[0].without_where.contains("s.t"));
}

#[test]
fn statements_keep_their_own_text() {
    let s = classify("SELECT 1; /* c */ DELETE FROM t WHERE x = 1").unwrap_or_default();
    assert_eq!(s.len(), 2);
    assert_eq!(s[0].text, "SELECT 1");
    assert!(
        s[1].text.ends_with("DELETE FROM t WHERE x = 1"),
        "{}",
        s[1].text
    );
}

#[test]
fn subject_and_target_conditions() {
    let d = doc(r#"
guardrails:
  default: deny
  rules:
    - name: dba-writes
      action: allow
      kinds: [write, read]
      groups: [dba]
    - name: ana-on-orders
      action: approve
      kinds: [write]
      identities: [ana]
      targets: [orders]
    - name: reads
      action: allow
      kinds: [read]
"#);
    let mut who = Subject {
        identity: "ana".into(),
        groups: vec!["analysts".into()],
        target: "orders".into(),
    };
    let sql = "DELETE FROM x WHERE id = 1";
    let judge = |who: &Subject| Guard::new(d.clone(), who.clone()).judge(sql, 0);
    assert_eq!(judge(&who).action, Action::Approve);
    assert_eq!(judge(&who).rule, "ana-on-orders");
    who.target = "billing".into();
    assert_eq!(judge(&who).action, Action::Deny);
    assert_eq!(judge(&who).rule, RULE_DEFAULT);
    who.groups.push("dba".into());
    assert_eq!(judge(&who).action, Action::Allow);
    assert_eq!(judge(&who).rule, "dba-writes");
}

#[test]
fn time_of_day_windows() {
    let d = doc(r#"
guardrails:
  default: allow
  rules:
    - name: change-freeze-nights
      action: deny
      kinds: [write]
      hours: {from: "22:00", to: "06:00"}
    - name: no-weekend-ddl
      action: deny
      kinds: [ddl]
      hours: {from: "00:00", to: "23:59", days: [sat, sun]}
"#);
    let at = |h: i64, m: i64, day: i64| (day * 86_400 + h * 3600 + m * 60) * 1000;
    let mut g = guard(&d);
    // 1970-01-01 was a Thursday.
    assert_eq!(
        g.judge("UPDATE t SET a = 1 WHERE b", at(23, 0, 0)).action,
        Action::Deny
    );
    assert_eq!(
        g.judge("UPDATE t SET a = 1 WHERE b", at(5, 59, 0)).action,
        Action::Deny
    );
    assert_eq!(
        g.judge("UPDATE t SET a = 1 WHERE b", at(6, 0, 0)).action,
        Action::Allow
    );
    assert_eq!(
        g.judge("UPDATE t SET a = 1 WHERE b", at(12, 0, 0)).action,
        Action::Allow
    );
    assert_eq!(
        g.judge("CREATE TABLE x (a int)", at(12, 0, 0)).action,
        Action::Allow
    );
    assert_eq!(
        g.judge("CREATE TABLE x (a int)", at(12, 0, 2)).action,
        Action::Deny
    );
    assert_eq!(
        g.judge("CREATE TABLE x (a int)", at(12, 0, 3)).action,
        Action::Deny
    );
    assert_eq!(
        g.judge("CREATE TABLE x (a int)", at(12, 0, 4)).action,
        Action::Allow
    );
}

#[test]
fn table_patterns() {
    assert!(table_matches("*", "x"));
    assert!(table_matches("orders", "orders"));
    assert!(table_matches("orders", "sales.orders"));
    assert!(table_matches("public.orders", "orders"));
    assert!(!table_matches("sales.orders", "orders"));
    assert!(table_matches("sales.*", "SALES.anything"));
    assert!(!table_matches("sales.*", "hr.x"));
}

#[test]
fn documents_are_validated_and_versioned() {
    for (bad, why) in [
        (
            "guardrails: {rules: [{name: a, action: allow}, {name: a, action: deny}]}",
            "twice",
        ),
        ("guardrails: {rules: [{name: '', action: allow}]}", "name"),
        ("guardrails: {rules: [{name: a, action: maybe}]}", "YAML"),
        (
            "guardrails: {rules: [{name: a, action: deny, kinds: [writes]}]}",
            "YAML",
        ),
        (
            "guardrails: {rules: [{name: a, action: deny, tabels: [x]}]}",
            "YAML",
        ),
        (
            "guardrails: {rules: [{name: a, action: deny, tables: [a.b.c]}]}",
            "table",
        ),
        (
            "guardrails: {rules: [{name: a, action: deny, functions: [f], kinds: [read]}]}",
            "functions",
        ),
        (
            "guardrails: {rules: [{name: a, action: deny, hours: {from: '25:00', to: '01:00'}}]}",
            "HH:MM",
        ),
    ] {
        match PolicyDoc::from_yaml(bad) {
            Ok(_) => panic!("accepted {bad}"),
            Err(e) => assert!(e.to_string().contains(why), "{bad}: {e}"),
        }
    }
    let a = doc(include_str!("../testdata/readonly.yaml"));
    let again = PolicyDoc::from_canonical(&a.canonical()).unwrap_or_default();
    assert_eq!(*a, again);
    assert_eq!(a.version(), again.version());
    assert_eq!(a.version().len(), 16);
    let b = doc(include_str!("../testdata/writes-need-approval.yaml"));
    assert_ne!(a.version(), b.version());
}

#[test]
fn unparseable_text_is_denied_with_the_parser_message() {
    let d = Arc::new(PolicyDoc::default());
    let v = guard(&d).judge("SELEC 1", 0);
    assert_eq!(v.action, Action::Deny);
    assert_eq!(v.rule, RULE_UNPARSEABLE);
    assert!(v.message.contains("syntax error"), "{}", v.message);
    // The empty default document allows everything that parses.
    assert_eq!(guard(&d).judge("DROP TABLE x", 0).action, Action::Allow);
}

#[test]
fn masking_section_is_validated_and_refuses_binary_copy_out() {
    for (bad, why) in [
        ("masking: {detectors: [emial]}", "emial"),
        ("masking: {custom: [{name: x, regex: '('}]}", "x"),
        ("masking: {columns: [ssn]}", "*.column"),
        ("masking: {columns: ['a.b.c.d']}", "schema.table.column"),
    ] {
        match PolicyDoc::from_yaml(bad) {
            Ok(_) => panic!("accepted {bad}"),
            Err(e) => assert!(e.to_string().contains(why), "{bad}: {e}"),
        }
    }
    let d = doc(
        "masking: {columns: ['*.ssn', Customers.Email, hr.staff.salary], exempt_groups: [auditors]}",
    );
    let rules = d
        .masking
        .as_ref()
        .map(|m| m.column_rules())
        .unwrap_or_default();
    assert_eq!(rules.len(), 3);
    assert_eq!(rules[1].table.as_deref(), Some("customers"));
    assert_eq!(rules[1].column, "email");
    assert_eq!(rules[2].schema.as_deref(), Some("hr"));
    let mut g = guard(&d);
    for sql in [
        "COPY t TO STDOUT (FORMAT binary)",
        "COPY t TO STDOUT BINARY",
    ] {
        let v = g.judge(sql, 0);
        assert_eq!(v.action, Action::Deny, "{sql}");
        assert_eq!(v.rule, RULE_MASKING);
    }
    assert_eq!(
        g.judge("COPY t TO STDOUT (FORMAT csv)", 0).action,
        Action::Allow
    );
    assert_eq!(
        g.judge("COPY t FROM STDIN (FORMAT binary)", 0).action,
        Action::Allow
    );
    // An exempt group sees clear values, so binary COPY is fine.
    let mut exempt = Guard::new(
        d.clone(),
        Subject {
            identity: "eve".into(),
            groups: vec!["auditors".into()],
            target: "orders".into(),
        },
    );
    assert_eq!(
        exempt.judge("COPY t TO STDOUT (FORMAT binary)", 0).action,
        Action::Allow
    );
}
