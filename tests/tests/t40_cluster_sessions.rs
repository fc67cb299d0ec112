//! PostgreSQL sessions through a cluster: any node serves any target, and
//! agents move to another node when theirs dies, also from behind a NAT.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use gatehouse_e2e::cluster::TestCluster;
use gatehouse_e2e::netns::NatNet;
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

/// Creates target `db` (served by agent `edge-1`), service account `alice`
/// allowed on it, and an enrollment token. Returns alice's key and the token.
fn provision(c: &TestCluster) -> (String, String) {
    let api1 = c.node(1).api.clone();
    ok(
        c,
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
        c,
        &api1,
        &["service-accounts", "create", "alice", "-o", "json"],
    ))
    .unwrap();
    let key = key["api_key"].as_str().unwrap().to_string();
    ok(
        c,
        &api1,
        &["rules", "create", "--subject", "sa:alice", "--target", "db"],
    );
    let token = ok(c, &api1, &["agents", "enroll-token", "--agent", "edge-1"])
        .trim()
        .to_string();
    (key, token)
}

/// Writes the agent's config (every node listed) and returns its path.
fn agent_config(c: &TestCluster, pg_port: u16) -> std::path::PathBuf {
    let dir = c.tmp.path().join("agent");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("pw"), AGENT_PASSWORD).unwrap();
    let servers: Vec<String> = c.live().map(|n| format!("\"{}\"", n.tunnel)).collect();
    let cfg = format!(
        "name = \"edge-1\"\nservers = [{}]\ndata_dir = \"{}\"\nrecordings_dir = \"{}\"\n\n[[targets]]\nname = \"db\"\nhost = \"127.0.0.1\"\nport = {pg_port}\nuser = \"{AGENT_ROLE}\"\npassword_file = \"{}\"\n",
        servers.join(", "),
        dir.display(),
        c.tmp.path().join("recordings").display(),
        dir.join("pw").display()
    );
    std::fs::write(dir.join("agent.toml"), cfg).unwrap();
    dir.join("agent.toml")
}

/// Runs `select '<tag>-<n>'` through `node` until it works; returns the tag
/// that went through (each attempt has its own, so the audit log can be
/// checked for exactly-once).
fn select_until_ok(c: &TestCluster, node: u64, key: &str, tag: &str) -> String {
    let mut attempt = 0;
    wait_until(tag, Duration::from_secs(20), || {
        attempt += 1;
        let t = format!("{tag}-{attempt}");
        let o = psql_at(&c.node(node).pg, key, &format!("select '{t}'"));
        (o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == t).then_some(t)
    })
}

/// Every tag's statement is in the audit log exactly once, and no event is
/// there twice.
fn assert_audited_once(c: &TestCluster, via: u64, tags: &[String]) {
    let api = c.node(via).api.clone();
    let events = wait_until("audit committed", Duration::from_secs(30), || {
        let out = c.cli(&api, &["audit", "events", "--target", "db", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let ev = v.as_array()?.clone();
        tags.iter()
            .all(|t| ev.iter().any(|e| e["statement"] == format!("select '{t}'")))
            .then_some(ev)
    });
    for tag in tags {
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
    assert_eq!(ids.len(), total, "an audit event is stored twice");
}

/// Kills the node the agent uses and waits until it is connected to another;
/// returns the new node.
fn kill_home_and_wait(c: &mut TestCluster, home: u64) -> u64 {
    c.kill9(home);
    let t0 = std::time::Instant::now();
    let new_home = wait_until(
        "agent reconnected elsewhere",
        Duration::from_secs(30),
        || connected_at(c, "edge-1"),
    );
    println!(
        "agent moved from node {home} to node {new_home} in {} ms",
        t0.elapsed().as_millis()
    );
    assert_ne!(new_home, home);
    assert!(
        t0.elapsed() < Duration::from_secs(8),
        "agent took too long to move"
    );
    new_home
}

/// Starts a sleeping psql as `key` through `client_node`, ends its session
/// with `end` (given the session id, run against `api_node`), and checks
/// that the client was told `want` within a second, the target's backend
/// went away, and the index and the audit log say why.
fn end_a_running_session(
    c: &TestCluster,
    pg: &LocalPostgres,
    key: &str,
    (client_node, api_node): (u64, u64),
    end: &dyn Fn(&str, &str),
    want: &[&str],
) {
    let sleep = format!("select pg_sleep(31), {client_node}");
    let (host, port) = c.node(client_node).pg.rsplit_once(':').unwrap();
    let sleeper = std::process::Command::new("psql")
        .args(["-X", "-v", "VERBOSITY=verbose", "-c", &sleep])
        .arg(format!(
            "host={host} port={port} user=db dbname=app sslmode=require"
        ))
        .env("PGPASSWORD", key)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let running_upstream = |want: &str| {
        let q = format!("select count(*) from pg_stat_activity where query = '{sleep}'");
        (pg.psql_super("postgres", &q).unwrap().trim() == want).then_some(())
    };
    wait_until("sleep running upstream", Duration::from_secs(10), || {
        running_upstream("1")
    });
    let api = c.node(api_node).api.clone();
    let running: serde_json::Value = serde_json::from_str(&ok(
        c,
        &api,
        &["sessions", "list", "--running", "-o", "json"],
    ))
    .unwrap();
    let session = running
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["node"] == client_node)
        .expect("the running session is listed with its node")
        .clone();
    assert_eq!(session["agent"], "edge-1");
    assert_eq!(session["ended_ms"], 0);
    let id = session["id"].as_str().unwrap().to_string();
    let table = ok(c, &api, &["sessions", "list", "--running"]);
    assert!(table.contains("DURATION") && table.contains(&id), "{table}");

    let t0 = std::time::Instant::now();
    end(&api, &id);
    let out = sleeper.wait_with_output().unwrap();
    let took = t0.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("FATAL:  57P01: gatehouse: session ended: ")
            && want.iter().all(|w| err.contains(w)),
        "{err}"
    );
    assert!(
        took < Duration::from_secs(1),
        "ending the session took {took:?}"
    );
    println!(
        "{}: client on node {client_node}, API on node {api_node}: {} ms",
        want[0],
        took.as_millis()
    );
    // The target's backend is gone too.
    wait_until("backend gone", Duration::from_secs(5), || {
        running_upstream("0")
    });
    // The index and the evidence say why, and who.
    wait_until("index closed", Duration::from_secs(10), || {
        let v: serde_json::Value =
            serde_json::from_str(&ok(c, &api, &["sessions", "list", "-o", "json"])).ok()?;
        let s = v
            .as_array()?
            .iter()
            .find(|s| s["id"] == id.as_str())?
            .clone();
        let reason = s["end_reason"].as_str()?.to_string();
        want.iter().all(|w| reason.contains(w)).then_some(())
    });
    let events: serde_json::Value = serde_json::from_str(&ok(
        c,
        &api,
        &["audit", "events", "--target", "db", "-o", "json"],
    ))
    .unwrap();
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "session_killed"
                && e["session_id"] == id.as_str()
                && e["detail"]
                    .as_str()
                    .is_some_and(|d| want.iter().all(|w| d.contains(w)))),
        "a session_killed event names who and why"
    );
}

/// A service account allowed on `db`; returns its key and its rule's id.
fn account_with_rule(c: &TestCluster, name: &str) -> (String, String) {
    let api1 = c.node(1).api.clone();
    let v: serde_json::Value = serde_json::from_str(&ok(
        c,
        &api1,
        &["service-accounts", "create", name, "-o", "json"],
    ))
    .unwrap();
    let created = ok(
        c,
        &api1,
        &[
            "rules",
            "create",
            "--subject",
            &format!("sa:{name}"),
            "--target",
            "db",
        ],
    );
    let rule = created.split_whitespace().nth(1).unwrap().to_string();
    (v["api_key"].as_str().unwrap().to_string(), rule)
}

/// Lines a child writes to stdout, each with when it was read.
fn timed_lines(
    out: impl std::io::Read + Send + 'static,
) -> std::sync::mpsc::Receiver<(std::time::Instant, String)> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send((std::time::Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    rx
}

/// The first line containing `needle`, with when it arrived.
fn line_with(
    rx: &std::sync::mpsc::Receiver<(std::time::Instant, String)>,
    needle: &str,
    seen: &mut Vec<String>,
) -> std::time::Instant {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let (at, line) = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no line with {needle:?}; seen {seen:?}"));
        seen.push(line.clone());
        if line.contains(needle) {
            return at;
        }
    }
}

/// `sessions watch` through a node that neither the client nor the agent
/// uses shows each statement within 200 ms of the client seeing its result,
/// with masked values exactly as the client (and the recording) got them.
fn watch_a_running_session(c: &TestCluster, key: &str, client_node: u64, api_node: u64) {
    let api = c.node(api_node).api.clone();
    ok(
        c,
        &api,
        &[
            "policy",
            "apply",
            "-f",
            c.tmp.path().join("mask.yaml").to_str().unwrap(),
        ],
    );
    let (host, port) = c.node(client_node).pg.rsplit_once(':').unwrap();
    let mut client = std::process::Command::new("psql")
        .args(["-X", "-A", "-t", "-q"])
        .arg(format!(
            "host={host} port={port} user=db dbname=app sslmode=require"
        ))
        .env("PGPASSWORD", key)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = client.stdin.take().unwrap();
    let client_out = timed_lines(client.stdout.take().unwrap());
    let mut seen_client = Vec::new();
    use std::io::Write;
    writeln!(stdin, "select 'warm-up';").unwrap();
    line_with(&client_out, "warm-up", &mut seen_client);
    let running: serde_json::Value = serde_json::from_str(&ok(
        c,
        &api,
        &["sessions", "list", "--running", "-o", "json"],
    ))
    .unwrap();
    let id = running
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["node"] == client_node)
        .expect("the running session")["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut watcher = std::process::Command::new(bin("gatehouse"))
        .args(["sessions", "watch", &id])
        .env("GATEHOUSE_API", &api)
        .env("GATEHOUSE_TOKEN", &c.token)
        .env("GATEHOUSE_CA_FILE", &c.ca_file)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let watch_out = timed_lines(watcher.stdout.take().unwrap());
    // The watch is open once it shows a statement run after it started.
    let mut seen_watch = Vec::new();
    let mut n = 0;
    wait_until("the watch is open", Duration::from_secs(10), || {
        n += 1;
        writeln!(stdin, "select 'ping-{n}';").unwrap();
        line_with(&client_out, &format!("ping-{n}"), &mut seen_client);
        let got = watch_out.recv_timeout(Duration::from_millis(300)).ok()?;
        seen_watch.push(got.1.clone());
        Some(())
    });
    let mut worst = Duration::ZERO;
    for i in 0..5 {
        writeln!(
            stdin,
            "select 'watch-{i}' as tag, 'ada{i}@example.com' as email;"
        )
        .unwrap();
        let client_at = line_with(&client_out, &format!("watch-{i}"), &mut seen_client);
        let watch_at = line_with(&watch_out, &format!("watch-{i}"), &mut seen_watch);
        worst = worst.max(watch_at.saturating_duration_since(client_at));
    }
    println!(
        "watch: a statement showed within {} ms of its result",
        worst.as_millis()
    );
    assert!(
        worst <= Duration::from_millis(200),
        "the watch lagged {worst:?}"
    );
    // Masked values stay masked, as the client saw them.
    let masked_line = seen_client
        .iter()
        .find(|l| l.contains("watch-0"))
        .unwrap()
        .clone();
    assert!(!masked_line.contains("ada0@example.com"), "{masked_line}");
    let masked = masked_line.split('|').nth(1).unwrap().to_string();
    let watched = seen_watch.join("\n");
    assert!(
        watched.contains(&format!("watch-0 | {masked}")),
        "{watched}"
    );
    // The statement text is shown as typed; result values never in clear.
    assert!(
        !seen_watch
            .iter()
            .any(|l| l.contains(" row ") && l.contains("ada")),
        "{watched}"
    );
    // The watch ends with the session.
    drop(stdin);
    client.wait().unwrap();
    let t0 = std::time::Instant::now();
    while watcher.try_wait().unwrap().is_none() && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let st = watcher
        .try_wait()
        .unwrap()
        .expect("the watch ends with the session");
    assert!(st.success());
    // No policy again for what follows.
    std::fs::write(
        c.tmp.path().join("open.yaml"),
        "guardrails:\n  default: allow\n",
    )
    .unwrap();
    ok(
        c,
        &api,
        &[
            "policy",
            "apply",
            "-f",
            c.tmp.path().join("open.yaml").to_str().unwrap(),
        ],
    );
}

#[test]
fn any_node_serves_sessions_and_the_agent_fails_over_to_a_surviving_node() {
    let mut c = TestCluster::start(3, 20_000);
    let pg = LocalPostgres::start().unwrap();
    pg.create_role_and_db(AGENT_ROLE, AGENT_PASSWORD, "app")
        .unwrap();
    let (key, token) = provision(&c);
    let config = agent_config(&c, pg.port);
    let _agent = Proc::spawn(
        &bin("gatehouse-agent"),
        &[
            "--config".into(),
            config.display().to_string(),
            "--enroll-token-file".into(),
            secret_file(c.tmp.path(), "enroll-token", &token)
                .display()
                .to_string(),
        ],
        &c.tmp.path().join("agent.log"),
    );
    // The agent dials every node and keeps the first to answer.
    let home = wait_until("agent connected", Duration::from_secs(30), || {
        connected_at(&c, "edge-1")
    });

    // A client on any node reaches the agent (relayed node to node when the
    // agent is elsewhere).
    let mut tags = Vec::new();
    for node in [1u64, 2, 3] {
        let tag = format!("via-{node}");
        let out = psql_at(&c.node(node).pg, &key, &format!("select '{tag}'"));
        assert!(
            out.status.success(),
            "node {node}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), tag);
        tags.push(tag);
    }

    // Ctrl-C through a node that does not hold the agent's connection: the
    // cancel is relayed to the agent's node.
    let away = [1u64, 2, 3].into_iter().find(|n| *n != home).unwrap();
    let (host, port) = c.node(away).pg.rsplit_once(':').unwrap();
    let sleeper = std::process::Command::new("psql")
        .args(["-X", "-v", "VERBOSITY=verbose", "-c", "select pg_sleep(30)"])
        .arg(format!(
            "host={host} port={port} user=db dbname=app sslmode=require"
        ))
        .env("PGPASSWORD", &key)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("sleep running upstream", Duration::from_secs(10), || {
        let n = pg
            .psql_super(
                "postgres",
                "select count(*) from pg_stat_activity where query = 'select pg_sleep(30)'",
            )
            .unwrap();
        (n.trim() == "1").then_some(())
    });
    let t0 = std::time::Instant::now();
    let st = std::process::Command::new("kill")
        .args(["-INT", &sleeper.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let out = sleeper.wait_with_output().unwrap();
    let took = t0.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("57014"), "{err}");
    assert!(
        took < Duration::from_secs(1),
        "relayed cancel took {took:?}"
    );

    // The kill switch, from another node's API, for a client on the agent's
    // node and for one on another node: each ends within a second, the
    // client told why, the index and the audit log saying who did it.
    let kill = |api: &str, id: &str| {
        let out = ok(
            &c,
            api,
            &[
                "sessions",
                "kill",
                id,
                "--reason",
                "incident 7: runaway query",
            ],
        );
        assert!(out.contains("ended"), "{out}");
    };
    let killed = ["killed by", "incident 7: runaway query"];
    for nodes in [(home, away), (away, home)] {
        end_a_running_session(&c, &pg, &key, nodes, &kill, &killed);
    }
    // A session that has ended cannot be killed again.
    let ended: serde_json::Value = serde_json::from_str(&ok(
        &c,
        &c.node(home).api,
        &["sessions", "list", "-o", "json"],
    ))
    .unwrap();
    let last = ended.as_array().unwrap().last().unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let again = c.cli(
        &c.node(home).api,
        &["sessions", "kill", &last, "--reason", "again"],
    );
    assert!(String::from_utf8_lossy(&again.stderr).contains("already ended"));

    // The live view, through the third node.
    std::fs::write(
        c.tmp.path().join("mask.yaml"),
        "masking:\n  detectors: [email]\n",
    )
    .unwrap();
    let third = [1u64, 2, 3]
        .into_iter()
        .find(|n| *n != home && *n != away)
        .unwrap();
    watch_a_running_session(&c, &key, away, third);

    // Removing the only rule that admits a session ends it, and revoking
    // an identity (or one of its keys) ends its sessions everywhere; the
    // identity then opens no new one. Each with the client on the agent's
    // node and on another.
    for (i, nodes) in [(away, home), (home, away)].into_iter().enumerate() {
        let (bob, bob_rule) = account_with_rule(&c, &format!("bob{i}"));
        let delete = |api: &str, _id: &str| {
            let out = ok(&c, api, &["rules", "delete", &bob_rule]);
            assert!(out.contains("1 running session(s) ended"), "{out}");
        };
        let removed = ["access rule", "removed by"];
        end_a_running_session(&c, &pg, &bob, nodes, &delete, &removed);
        let refused = psql_at(&c.node(nodes.0).pg, &bob, "select 1");
        assert!(!refused.status.success());
        assert!(String::from_utf8_lossy(&refused.stderr).contains("may not use a target"));

        let carl = format!("carl{i}");
        let (carl_key, _) = account_with_rule(&c, &carl);
        let subject = format!("sa:{carl}");
        let revoke = |api: &str, _id: &str| {
            let out = ok(
                &c,
                api,
                &["identities", "revoke", &subject, "--reason", "key leaked"],
            );
            assert!(out.contains("1 running session(s) ended"), "{out}");
        };
        let revoked = [format!("{subject} revoked by"), "key leaked".to_string()];
        let revoked: Vec<&str> = revoked.iter().map(String::as_str).collect();
        end_a_running_session(&c, &pg, &carl_key, nodes, &revoke, &revoked);
        let refused = psql_at(&c.node(nodes.0).pg, &carl_key, "select 1");
        assert!(
            !refused.status.success(),
            "a revoked key still opens sessions"
        );
    }
    // One API key of an account.
    let (dora, _) = account_with_rule(&c, "dora");
    let key_id = dora.split('_').nth(1).unwrap().to_string();
    let revoke_key = |api: &str, _id: &str| {
        let out = ok(
            &c,
            api,
            &[
                "identities",
                "revoke",
                "sa:dora",
                "--key",
                &key_id,
                "--reason",
                "rotated",
            ],
        );
        assert!(out.contains("1 running session(s) ended"), "{out}");
    };
    let key_revoked = ["API key", "of sa:dora revoked by", "rotated"];
    end_a_running_session(&c, &pg, &dora, (away, home), &revoke_key, &key_revoked);
    assert!(
        !psql_at(&c.node(away).pg, &dora, "select 1")
            .status
            .success()
    );

    let new_home = kill_home_and_wait(&mut c, home);
    let other = [1, 2, 3]
        .into_iter()
        .find(|n| *n != home && *n != new_home)
        .unwrap();
    tags.push(select_until_ok(&c, other, &key, "after-failover"));
    assert_audited_once(&c, new_home, &tags);
}

#[test]
fn an_agent_behind_nat_serves_sessions_through_node_death_and_a_mapping_flush() {
    let net = NatNet::create()
        .unwrap_or_else(|e| panic!("cannot build the NAT (needs root, iproute2, iptables): {e}"));
    let mut c = TestCluster::start_with_tunnel_host(3, 20_000, &net.wan_host);
    // The target lives inside the LAN, on the LAN namespace's loopback.
    let pg = LocalPostgres::start_in(Some(&net.lan_ns)).unwrap();
    pg.create_role_and_db(AGENT_ROLE, AGENT_PASSWORD, "app")
        .unwrap();
    let direct = psql(
        "127.0.0.1",
        &pg.port.to_string(),
        AGENT_ROLE,
        AGENT_PASSWORD,
        "app",
        "disable",
        "select 1",
    );
    assert!(
        !direct.status.success(),
        "the target must not be reachable from outside the LAN"
    );
    let (key, token) = provision(&c);
    let config = agent_config(&c, pg.port);
    let agent_bin = bin("gatehouse-agent");
    let _agent = Proc::spawn(
        std::path::Path::new("ip"),
        &[
            "netns".into(),
            "exec".into(),
            net.lan_ns.clone(),
            agent_bin.display().to_string(),
            "--config".into(),
            config.display().to_string(),
            "--enroll-token-file".into(),
            secret_file(c.tmp.path(), "enroll-token", &token)
                .display()
                .to_string(),
        ],
        &c.tmp.path().join("agent.log"),
    );
    let home = wait_until("agent connected", Duration::from_secs(30), || {
        connected_at(&c, "edge-1")
    });
    // The node sees the agent at the NAT's outside address.
    let log = std::fs::read_to_string(c.tmp.path().join(format!("node{home}.log"))).unwrap();
    let seen = log
        .lines()
        .find(|l| l.contains("agent connected"))
        .unwrap_or_default()
        .to_string();
    assert!(
        seen.contains(&format!("{}:", net.wan_router)) && !seen.contains(&net.lan_host),
        "expected the agent behind {}: {seen}",
        net.wan_router
    );

    let mut tags = Vec::new();
    for node in [1u64, 2, 3] {
        tags.push(select_until_ok(&c, node, &key, &format!("nat-via-{node}")));
    }

    // The router forgets its mappings: the next packets get new ones.
    net.flush_mappings().unwrap();
    let t0 = std::time::Instant::now();
    tags.push(select_until_ok(&c, home, &key, "after-flush"));
    println!(
        "sessions work {} ms after the NAT flush",
        t0.elapsed().as_millis()
    );
    assert!(t0.elapsed() < Duration::from_secs(8));

    let new_home = kill_home_and_wait(&mut c, home);
    for node in [1u64, 2, 3].into_iter().filter(|n| *n != home) {
        tags.push(select_until_ok(
            &c,
            node,
            &key,
            &format!("nat-after-failover-{node}"),
        ));
    }
    assert_audited_once(&c, new_home, &tags);
}
