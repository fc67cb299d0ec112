//! PostgreSQL sessions through a cluster: any node serves any target, and
//! agents move to another node when theirs dies.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use gatehouse_e2e::cluster::TestCluster;
use gatehouse_e2e::*;

fn ok(c: &TestCluster, api: &str, args: &[&str]) -> String {
    let out = c.cli(api, args);
    assert!(
        out.status.success(),
        "gatehouse {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn connected_at(c: &TestCluster, agent: &str) -> Option<u64> {
    c.live().find_map(|n| {
        let out = c.cli(&n.api, &["agents", "list", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v.as_array()?
            .iter()
            .any(|a| a["name"] == agent && a["connected"] == true)
            .then_some(n.id)
    })
}

fn psql_at(node_pg: &str, key: &str, sql: &str) -> std::process::Output {
    let (host, port) = node_pg.rsplit_once(':').unwrap();
    psql(host, port, "db", key, "app", "require", sql)
}

#[test]
fn any_node_serves_sessions_and_the_agent_fails_over_to_a_surviving_node() {
    let mut c = TestCluster::start(3, 20_000);
    let pg = LocalPostgres::start().unwrap();
    pg.create_role_and_db(AGENT_ROLE, AGENT_PASSWORD, "app")
        .unwrap();
    let api1 = c.node(1).api.clone();
    ok(
        &c,
        &api1,
        &[
            "targets",
            "create",
            "db",
            "--agent",
            "edge-1",
            "--db-user",
            AGENT_ROLE,
        ],
    );
    let key: serde_json::Value = serde_json::from_str(&ok(
        &c,
        &api1,
        &["service-accounts", "create", "alice", "-o", "json"],
    ))
    .unwrap();
    let key = key["api_key"].as_str().unwrap().to_string();
    ok(
        &c,
        &api1,
        &["rules", "create", "--subject", "sa:alice", "--target", "db"],
    );
    let token = ok(&c, &api1, &["agents", "enroll-token", "--agent", "edge-1"])
        .trim()
        .to_string();

    // The agent lists every node; it dials node 1 first.
    let dir = c.tmp.path().join("agent");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("pw"), AGENT_PASSWORD).unwrap();
    let servers: Vec<String> = [1, 2, 3]
        .iter()
        .map(|id| format!("\"{}\"", c.node(*id).tunnel))
        .collect();
    let cfg = format!(
        "name = \"edge-1\"\nservers = [{}]\ndata_dir = \"{}\"\nrecordings_dir = \"{}\"\n\n[[targets]]\nname = \"db\"\nhost = \"127.0.0.1\"\nport = {}\nuser = \"{AGENT_ROLE}\"\npassword_file = \"{}\"\n",
        servers.join(", "),
        dir.display(),
        c.tmp.path().join("recordings").display(),
        pg.port,
        dir.join("pw").display()
    );
    std::fs::write(dir.join("agent.toml"), cfg).unwrap();
    let log = c.tmp.path().join("agent.log");
    let _agent = Proc::spawn(
        &bin("gatehouse-agent"),
        &[
            "--config".into(),
            dir.join("agent.toml").display().to_string(),
            "--enroll-token".into(),
            token,
        ],
        &log,
    );
    let home = wait_until("agent connected", Duration::from_secs(30), || {
        connected_at(&c, "edge-1")
    });
    assert_eq!(home, 1);

    // A client on node 2 reaches the agent on node 1 (relayed node to node).
    for (node, tag) in [(2u64, "via-2"), (3, "via-3"), (1, "via-1")] {
        let out = psql_at(&c.node(node).pg, &key, &format!("select '{tag}'"));
        assert!(
            out.status.success(),
            "node {node}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), tag);
    }

    // Kill the node the agent is connected to.
    c.kill9(1);
    let t0 = std::time::Instant::now();
    let new_home = wait_until(
        "agent reconnected elsewhere",
        Duration::from_secs(30),
        || connected_at(&c, "edge-1"),
    );
    println!(
        "agent moved from node 1 to node {new_home} in {} ms",
        t0.elapsed().as_millis()
    );
    assert!(
        t0.elapsed() < Duration::from_secs(8),
        "agent took too long to move"
    );
    let other = if new_home == 2 { 3 } else { 2 };
    let out = wait_until("sessions work again", Duration::from_secs(20), || {
        let o = psql_at(&c.node(other).pg, &key, "select 'after-failover'");
        o.status.success().then_some(o)
    });
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "after-failover"
    );

    // Every session's statements are in the audit log exactly once.
    let api2 = c.node(2).api.clone();
    let events = wait_until("audit committed", Duration::from_secs(30), || {
        let out = c.cli(&api2, &["audit", "events", "--target", "db", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let ev = v.as_array()?.clone();
        let stmts = ev.iter().filter(|e| e["kind"] == "statement").count();
        (stmts >= 4).then_some(ev)
    });
    for tag in ["via-1", "via-2", "via-3", "after-failover"] {
        let n = events
            .iter()
            .filter(|e| e["statement"] == format!("select '{tag}'"))
            .count();
        assert_eq!(n, 1, "{tag} audited {n} times");
    }
    let mut ids: Vec<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    let total = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), total);
}
