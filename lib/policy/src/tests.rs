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

fn effects_corpus() -> Vec<crate::corpus::EffectCase> {
    match crate::corpus::parse_effects(include_str!("../testdata/side-effects.sql")) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    }
}

/// What the test schema's target says of the corpus's user functions.
fn target_says() -> Vec<UserFunction> {
    [("purge_orders", 'v'), ("order_count", 's')]
        .into_iter()
        .map(|(n, v)| UserFunction {
            schema: "public".into(),
            name: n.into(),
            volatility: v,
        })
        .collect()
}

/// Judges like the agent does: a question about user functions is answered
/// from `target_says` and the text decided again.
fn judge_as_agent(g: &mut Guard, sql: &str) -> Verdict {
    let v = g.judge(sql, 0);
    if v.rule != RULE_CONSULT {
        return v;
    }
    g.learn_volatility(sql, target_says());
    g.judge(sql, 0)
}

#[test]
fn side_effects_are_refused_under_a_read_only_policy_written_the_natural_way() {
    let d = doc(include_str!("../testdata/read-transaction.yaml"));
    let cases = effects_corpus();
    let effects: Vec<_> = cases.iter().filter(|c| c.effect.is_some()).collect();
    let reads: Vec<_> = cases.iter().filter(|c| c.effect.is_none()).collect();
    assert!(effects.len() >= 60, "{} side-effect cases", effects.len());
    assert!(reads.len() >= 40, "{} reads", reads.len());
    let mut names = std::collections::HashSet::new();
    let mut wrong = Vec::new();
    for c in &cases {
        assert!(names.insert(c.name.clone()), "duplicate case {}", c.name);
        // psql's own meta-commands run through the end-to-end test only.
        if c.sql.starts_with('\\') {
            continue;
        }
        let mut g = guard(&d);
        assert!(g.read_only(), "read-transaction.yaml admits no write");
        let v = judge_as_agent(&mut g, &c.sql);
        match c.effect {
            None if v.action != Action::Allow => {
                wrong.push(format!(
                    "{}: a read, got {:?} ({})",
                    c.name, v.action, v.message
                ));
            }
            Some(kind) => {
                let fx = classify(&c.sql).unwrap_or_default();
                let judged_as = fx.iter().any(|s| {
                    s.kinds.iter().any(|(k, _)| *k == kind)
                        || s.function_kinds.contains_key(&kind)
                        || !s.user_functions.is_empty()
                });
                if v.action != Action::Deny || !judged_as {
                    wrong.push(format!(
                        "{}: want deny as {}, got {:?} by {} ({})\n  {fx:?}",
                        c.name,
                        kind.as_str(),
                        v.action,
                        v.rule,
                        v.message
                    ));
                }
            }
            None => {}
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn volatile_user_functions_count_as_writes_unless_marked_safe() {
    let d = doc(include_str!("../testdata/read-transaction.yaml"));
    let mut g = guard(&d);
    // First the question, then the decision on what the target said.
    let asked = g.judge("SELECT purge_orders()", 0);
    assert_eq!(asked.rule, RULE_CONSULT);
    assert_eq!(
        g.user_functions("SELECT purge_orders()"),
        vec!["purge_orders"]
    );
    let v = judge_as_agent(&mut g, "SELECT purge_orders()");
    assert_eq!(v.action, Action::Deny);
    assert!(
        v.message
            .contains("purge_orders() (a VOLATILE user function)"),
        "{}",
        v.message
    );
    // What was learned is used once: the next call asks again.
    assert_eq!(g.judge("SELECT purge_orders()", 0).rule, RULE_CONSULT);
    // Another schema's function of the same name says nothing of it.
    g.learn_volatility("SELECT audit.purge_orders()", target_says());
    assert_eq!(
        g.judge("SELECT audit.purge_orders()", 0).action,
        Action::Allow
    );
    // STABLE runs; marked safe by name runs.
    assert_eq!(
        judge_as_agent(&mut g, "SELECT order_count()").action,
        Action::Allow
    );
    let safe = doc(
        "guardrails:\n  default: deny\n  safe_functions: [public.purge_orders]\n  rules:\n    - name: reads\n      action: allow\n      kinds: [read, transaction]\n",
    );
    let mut g = guard(&safe);
    assert_eq!(
        judge_as_agent(&mut g, "SELECT purge_orders()").action,
        Action::Allow
    );
    // A refusal needs no question.
    let mut g = guard(&d);
    assert_eq!(
        g.judge("DELETE FROM orders WHERE purge_orders() > 0", 0)
            .action,
        Action::Deny
    );
}

#[test]
fn turning_read_only_off_is_refused_in_a_read_only_session() {
    let d = doc(include_str!("../testdata/read-transaction.yaml"));
    for sql in [
        "SET default_transaction_read_only = off",
        "SET SESSION default_transaction_read_only TO false",
        "RESET default_transaction_read_only",
        "SET default_transaction_read_only TO DEFAULT",
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
        "BEGIN READ WRITE",
        "START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ WRITE",
        "BEGIN; SET TRANSACTION READ WRITE",
        "SET transaction_read_only = off",
        "SET LOCAL transaction_read_only = 0",
        "SELECT set_config('default_transaction_read_only', 'off', false)",
        "SELECT pg_catalog.set_config('transaction_read_only', 'false', true)",
        "SELECT set_config(name, 'off', false) FROM pg_settings WHERE name LIKE '%read_only'",
    ] {
        let v = guard(&d).judge(sql, 0);
        assert_eq!(
            (v.action, v.rule.as_str()),
            (Action::Deny, RULE_READ_ONLY),
            "{sql}: {}",
            v.message
        );
    }
    for sql in [
        "BEGIN READ ONLY",
        "SET TRANSACTION READ ONLY",
        "SHOW default_transaction_read_only",
    ] {
        let v = guard(&d).judge(sql, 0);
        assert_eq!(v.action, Action::Allow, "{sql}: {}", v.message);
    }
    // A policy that admits writes does not make sessions read-only.
    let wr = doc(include_str!("../testdata/writes-need-approval.yaml"));
    assert!(!guard(&wr).read_only());
    assert_eq!(
        guard(&wr).judge("BEGIN READ WRITE", 0).action,
        Action::Allow
    );
    assert!(guard(&doc(include_str!("../testdata/readonly.yaml"))).read_only());
}

#[test]
fn without_the_classifier_postgres_refusals_reach_postgres() {
    let d = doc(include_str!("../testdata/read-transaction.yaml"));
    for c in effects_corpus().iter().filter(|c| c.refused_by_postgres) {
        let v = guard(&d).without_function_classes().judge(&c.sql, 0);
        assert_eq!(v.action, Action::Allow, "{}: {}", c.name, v.message);
    }
}

#[test]
fn the_function_table_knows_every_class_and_plain_builtins() {
    assert_eq!(builtin("pg_terminate_backend"), Some(Some(Class::Admin)));
    assert_eq!(builtin("nextval"), Some(Some(Class::Sequence)));
    assert_eq!(
        builtin("pg_advisory_xact_lock"),
        Some(Some(Class::AdvisoryLock))
    );
    assert_eq!(builtin("dblink_exec"), Some(Some(Class::Remote)));
    assert_eq!(builtin("lower"), Some(None));
    assert_eq!(builtin("random"), Some(None));
    assert_eq!(builtin("purge_orders"), None);
}
