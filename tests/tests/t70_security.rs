//! Security hardening, probed as an attacker would: the node port trusts
//! only members, keys at rest, limits before authentication, throttled
//! failed logins, every configuration change is evidence, and no session
//! stays open in the index.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use gatehouse_e2e::cluster::TestCluster;
use gatehouse_e2e::*;
use gatehouse_proto::cluster::raft_peer_client::RaftPeerClient;
use gatehouse_proto::cluster::{RaftPayload, RelayChunk};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// A Raft-port client presenting `cert`/`key` (PEM).
fn peer_client(
    raft: &str,
    ca_pem: &str,
    cert: &str,
    key: &str,
) -> RaftPeerClient<tonic::transport::Channel> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .identity(Identity::from_pem(cert, key))
        .domain_name(gatehouse_pki::NODE_SAN);
    let ch = Endpoint::from_shared(format!("https://{raft}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy();
    RaftPeerClient::new(ch)
}

/// Calls every RPC of the Raft port and returns, per RPC, the error (an
/// `Ok` is returned as the text "ACCEPTED").
async fn probe_every_rpc(
    mut c: RaftPeerClient<tonic::transport::Channel>,
) -> Vec<(&'static str, String)> {
    let forged = gatehouse_cp_raft::Command::CreateServiceAccount {
        name: "intruder".into(),
        groups: vec!["dba".into()],
        key_id: "k".into(),
        key_sha256: "00".repeat(32),
        now_ms: 1,
    };
    let payload = |v: serde_json::Value| RaftPayload {
        json: serde_json::to_vec(&v).unwrap(),
    };
    let forward = RaftPayload {
        json: serde_json::to_vec(&forged).unwrap(),
    };
    let show = |r: Result<(), tonic::Status>| match r {
        Ok(()) => "ACCEPTED".to_string(),
        Err(s) => format!("{:?}: {}", s.code(), s.message()),
    };
    let mut out = Vec::new();
    out.push((
        "has_agent",
        show(
            c.has_agent(payload(serde_json::json!("edge-1")))
                .await
                .map(|_| ()),
        ),
    ));
    out.push(("forward", show(c.forward(forward).await.map(|_| ()))));
    out.push((
        "read_index",
        show(
            c.read_index(payload(serde_json::json!(null)))
                .await
                .map(|_| ()),
        ),
    ));
    out.push((
        "vote",
        show(
            c.vote(payload(serde_json::json!({"vote": {"leader_id": {"term": 99, "node_id": 7}, "committed": false}, "last_log_id": null})))
                .await
                .map(|_| ()),
        ),
    ));
    out.push((
        "append_entries",
        show(
            c.append_entries(payload(serde_json::json!({"vote": {"leader_id": {"term": 99, "node_id": 7}, "committed": true}, "prev_log_id": null, "entries": [], "leader_commit": null})))
                .await
                .map(|_| ()),
        ),
    ));
    out.push((
        "install_snapshot",
        show(
            c.install_snapshot(payload(serde_json::json!({})))
                .await
                .map(|_| ()),
        ),
    ));
    let open = gatehouse_proto::tunnel::SessionOpen {
        session_id: "forged".into(),
        identity: "sa:nobody".into(),
        target: "db".into(),
        database: "app".into(),
        ..Default::default()
    };
    let chunks = futures::stream::iter([RelayChunk {
        data: gatehouse_proto::frame(&open),
    }]);
    let mut req = tonic::Request::new(chunks);
    req.metadata_mut()
        .insert("x-gatehouse-agent", "edge-1".parse().unwrap());
    let relay = match c.relay_session(req).await {
        Ok(resp) => {
            // A stream that opened must not carry the target's greeting.
            let mut s = resp.into_inner();
            match tokio::time::timeout(Duration::from_secs(3), s.message()).await {
                Ok(Ok(Some(_))) => Ok(()),
                Ok(Err(st)) => Err(st),
                _ => Err(tonic::Status::cancelled(
                    "stream opened but carried nothing",
                )),
            }
        }
        Err(s) => Err(s),
    };
    out.push(("relay_session", show(relay)));
    out
}

fn assert_all_refused(results: &[(&str, String)], why: &str) {
    assert_eq!(results.len(), 7);
    for (rpc, r) in results {
        assert_ne!(r, "ACCEPTED", "{rpc} accepted {why}");
        assert!(
            // A member-only refusal, or (another CA) a failed handshake.
            r.contains("PermissionDenied")
                || r.contains("Unavailable")
                || r.contains("Unknown")
                || r.contains("Cancelled"),
            "{rpc} with {why}: {r}"
        );
    }
}

/// A self-signed certificate (a CA of its own making, presented as is).
fn self_signed_node_cert() -> (String, String) {
    let own = gatehouse_pki::ClusterCa::generate("gatehouse", 1_790_000_000).unwrap();
    (own.cert_pem, own.key_pem)
}

fn ready(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("ready.json")).unwrap()).unwrap()
}

fn service_account_names(stack: &Stack) -> String {
    stack.cli_ok(&["service-accounts", "list"])
}

#[test]
fn the_node_port_refuses_agent_and_foreign_certificates_on_every_rpc_and_writes_nothing() {
    let (stack, _key) = Stack::start();
    let server_dir = stack.tmp.path().join("server");
    let raft = ready(&server_dir)["raft"].as_str().unwrap().to_string();
    let ca = std::fs::read_to_string(&stack.ca_file).unwrap();
    let agent_dir = stack.tmp.path().join("agent");
    let agent_cert = std::fs::read_to_string(agent_dir.join("agent.crt")).unwrap();
    let agent_key = std::fs::read_to_string(agent_dir.join("agent.key")).unwrap();
    let before = stack.audit_events(&[]).len();
    let rt = rt();

    // The agent's own, genuine certificate.
    let r = rt.block_on(async {
        probe_every_rpc(peer_client(&raft, &ca, &agent_cert, &agent_key)).await
    });
    assert_all_refused(&r, "an agent's certificate");
    for (rpc, e) in &r {
        assert!(e.contains("PermissionDenied"), "{rpc}: {e}");
        assert!(e.contains("members only"), "{rpc}: {e}");
    }
    // A node certificate from a look-alike CA: the handshake fails.
    let (cert, key) = self_signed_node_cert();
    let r = rt.block_on(async { probe_every_rpc(peer_client(&raft, &ca, &cert, &key)).await });
    assert_all_refused(&r, "a certificate of another CA");

    // Nothing was written: no account, no new audit event from the port.
    assert!(!service_account_names(&stack).contains("intruder"));
    let log = stack.server.log_text();
    assert!(
        log.contains("Raft port call refused"),
        "refusals are logged"
    );
    let events = stack.audit_events(&[]);
    assert!(
        events
            .iter()
            .skip(before)
            .all(|e| e["identity"] != "sa:nobody"),
        "{events:?}"
    );
    // The port still serves psql (it was not disturbed).
    let (out, err, ok) = stack.psql_user(&_key, "select 1");
    assert!(ok, "{out}{err}");
}

#[test]
fn a_removed_nodes_certificate_is_refused_and_membership_changes_are_audited() {
    let mut c = TestCluster::start(2, 20_000);
    let n2 = c.node(2).dir.clone();
    let cert = std::fs::read_to_string(n2.join("node.crt")).unwrap();
    let key = std::fs::read_to_string(n2.join("node.key")).unwrap();
    let ca = std::fs::read_to_string(&c.ca_file).unwrap();
    let api1 = c.node(1).api.clone();
    let raft1 = c.node(1).raft.clone();
    let out = c.cli(&api1, &["cluster", "remove", "2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.kill9(2);
    c.forget(2);
    let rt = rt();
    let r = rt.block_on(async { probe_every_rpc(peer_client(&raft1, &ca, &cert, &key)).await });
    assert_all_refused(&r, "a removed node's certificate");
    for (rpc, e) in &r {
        assert!(e.contains("node 2 is not a member"), "{rpc}: {e}");
    }
    // Joining, the join token and the removal are each one config_change
    // event naming who did it.
    let out = c.cli(&api1, &["audit", "events", "-o", "json"]);
    let events: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let changes: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["kind"] == "config_change")
        .collect();
    let count = |needle: &str| {
        changes
            .iter()
            .filter(|e| e["detail"].as_str().unwrap_or("").contains(needle))
            .count()
    };
    assert_eq!(count("created join token"), 1, "{changes:?}");
    assert_eq!(count("admitted node 2"), 1, "{changes:?}");
    assert_eq!(count("removed node 2"), 1, "{changes:?}");
    for e in &changes {
        assert!(!e["identity"].as_str().unwrap().is_empty(), "{e}");
    }
    assert!(changes.iter().any(|e| e["identity"] == "node-2"));
}

/// Every entry under `dir` with its mode.
fn modes(dir: &Path) -> Vec<(PathBuf, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        out.push((p.clone(), m.permissions().mode() & 0o777));
        if m.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
    }
    out
}

#[test]
fn keys_at_rest_are_owner_only_and_the_ca_key_is_never_in_clear() {
    let (stack, key) = Stack::start();
    let (_, err, ok) = stack.psql_user(&key, "select 1");
    assert!(ok, "{err}");
    wait_until("recording uploaded", Duration::from_secs(30), || {
        let s = stack.cli_ok(&["sessions", "list", "-o", "json"]);
        s.contains("recording_sha256\": \"").then_some(())
    });
    let server = stack.tmp.path().join("server");
    for dir in [&server, &stack.tmp.path().join("agent"), &stack.recordings] {
        for (p, mode) in modes(dir) {
            assert_eq!(mode & 0o077, 0, "{} is mode {mode:03o}", p.display());
        }
    }
    // Neither the state nor the log holds a private key in clear: no PEM
    // marker, no PKCS#8 EC key header.
    let pkcs8_ec = [
        0x02, 0x01, 0x00, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01,
    ];
    let mut checked = 0;
    for (p, bytes) in read_tree(&server.join("raft")) {
        checked += 1;
        assert!(!contains(&bytes, b"PRIVATE KEY"), "{}", p.display());
        assert!(!contains(&bytes, &pkcs8_ec), "{}", p.display());
    }
    assert!(checked > 0);
    let state = read_tree(&server.join("raft"))
        .into_iter()
        .any(|(_, b)| contains(&b, b"gh-sealed-v1:"));
    assert!(state, "the sealed CA key is in the state");
}

#[test]
fn a_server_refuses_to_start_on_an_exposed_data_dir_or_a_wrong_key_encryption_key() {
    use std::os::unix::fs::PermissionsExt;
    let stack = Stack::start_server();
    let server = stack.tmp.path().join("server");
    drop(stack.server);
    let run = |env_kek: &str| {
        Command::new(bin("gatehouse-server"))
            .args([
                "--data-dir",
                server.to_str().unwrap(),
                "--recordings-dir",
                stack.recordings.to_str().unwrap(),
                "--pg-listen",
                "127.0.0.1:0",
                "--ssh-listen",
                "127.0.0.1:0",
                "--api-listen",
                "127.0.0.1:0",
                "--tunnel-listen",
                "127.0.0.1:0",
                "--raft-listen",
                "127.0.0.1:0",
            ])
            .env("GATEHOUSE_KEK", env_kek)
            .output()
            .unwrap()
    };
    // A state copied with another key-encryption key yields no CA.
    let out = run(&"ab".repeat(32));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("key-encryption key"), "{err}");
    // A file others can read stops the start, naming it.
    let leak = server.join("ca.pem");
    std::fs::set_permissions(&leak, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = run(TEST_KEK);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ca.pem") && err.contains("644") && err.contains("chmod"),
        "{err}"
    );
    let lines = err.trim().lines().count();
    assert_eq!(lines, 1, "one line: {err}");
}

const SSL_REQUEST: &[u8] = &[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
/// A plaintext startup header promising 500 bytes, then silence.
const SHORT_STARTUP: &[u8] = &[0, 0, 1, 0xf4, 0, 3, 0, 0];

#[test]
fn stalled_handshakes_are_closed_within_the_deadline_and_a_flood_leaves_psql_and_the_api_working() {
    let (stack, key) = Stack::start_opts(false, "", &["--handshake-timeout-secs", "2"]);
    let pg: std::net::SocketAddr = stack.pg_addr.parse().unwrap();
    let api: std::net::SocketAddr = stack.api.trim_start_matches("https://").parse().unwrap();
    let rt = rt();

    // 500 stalled connections from 50 addresses: 250 after SSLRequest, 250
    // with a short startup header. All are closed by the 2 s deadline while
    // psql connects.
    let waits = rt.block_on(async {
        let mut all = Vec::new();
        for i in 0..50u8 {
            let src: IpAddr = format!("127.0.1.{}", i + 1).parse().unwrap();
            let stall = if i % 2 == 0 {
                SSL_REQUEST
            } else {
                SHORT_STARTUP
            };
            all.push(tokio::spawn(stalled(pg, src, 10, stall, 10)));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let started = Instant::now();
        let ok = tokio::task::spawn_blocking({
            let stack_pg = stack.pg_addr.clone();
            let ca = stack.ca_file.clone();
            let key = key.clone();
            move || {
                let r = rawpg::session(&stack_pg, &ca, "db", "app", &key, &["select 1"]);
                r.ready && r.error.is_none()
            }
        })
        .await
        .unwrap();
        assert!(ok, "psql-like login during the stall");
        assert!(started.elapsed() < Duration::from_secs(2));
        let mut waits = Vec::new();
        for t in all {
            waits.extend(t.await.unwrap());
        }
        waits
    });
    assert_eq!(waits.len(), 500);
    let slowest = waits.iter().max().unwrap();
    assert!(
        *slowest < Duration::from_secs(5),
        "a stalled connection stayed open {slowest:?}"
    );
    assert!(
        waits
            .iter()
            .filter(|w| **w >= Duration::from_millis(1500))
            .count()
            >= 450,
        "most were held until the deadline, not refused"
    );

    // 20,000 connections from one address: beyond its cap they are closed
    // at once; psql and the API keep working throughout.
    let src: IpAddr = "127.0.0.2".parse().unwrap();
    let flood = rt.spawn(async move {
        let pg_flood = stalled(pg, src, 18_000, b"", 1500);
        let api_flood = stalled(api, src, 2_000, b"", 500);
        let (a, b) = tokio::join!(pg_flood, api_flood);
        a.len() + b.len()
    });
    std::thread::sleep(Duration::from_secs(2));
    for _ in 0..3 {
        let started = Instant::now();
        let (out, err, ok) = stack.psql_user(&key, "select 1");
        assert!(ok, "psql during the flood: {out}{err}");
        let status = stack.cli(&["status"]);
        assert!(
            status.status.success(),
            "{}",
            String::from_utf8_lossy(&status.stderr)
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(rt.block_on(flood).unwrap(), 20_000);
    let log = stack.server.log_text();
    assert!(!log.contains("Too many open files"), "descriptors ran out");
    assert!(log.contains("unauthenticated connections over the limit closed"));
    let (_, err, ok) = stack.psql_user(&key, "select 1");
    assert!(ok, "{err}");
}

#[test]
fn failed_logins_are_throttled_per_source_and_audited_with_the_address() {
    let (stack, key) = Stack::start();
    let rt = rt();
    let attacker: IpAddr = "127.0.0.3".parse().unwrap();
    let (mut refused_fast, mut errors) = (0, Vec::new());
    let started = Instant::now();
    rt.block_on(async {
        for i in 0..2000 {
            let r = rawpg::run_from(
                Some(attacker),
                &stack.pg_addr,
                &stack.ca_file,
                "db",
                "app",
                &format!("ghk_wrong_{i}"),
                &[],
            )
            .await;
            assert!(!r.ready);
            let (code, msg) = r.error.unwrap();
            if msg.contains("too many failed logins from 127.0.0.3") {
                refused_fast += 1;
            }
            errors.push(code);
            // Meanwhile a valid login from another address goes through at once.
            if i == 1000 {
                let t = Instant::now();
                let ok = rawpg::run_from(
                    Some("127.0.0.1".parse().unwrap()),
                    &stack.pg_addr,
                    &stack.ca_file,
                    "db",
                    "app",
                    &key,
                    &["select 1"],
                )
                .await;
                assert!(ok.ready && ok.error.is_none(), "{:?}", ok.error);
                assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
            }
        }
    });
    assert!(refused_fast > 1900, "throttled: {refused_fast}");
    assert!(started.elapsed() < Duration::from_secs(120));
    assert!(
        errors.iter().all(|c| c == "28P01" || c == "28000"),
        "{errors:?}"
    );
    let events = stack.audit_events(&[]);
    let failures: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| {
            e["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with("invalid API key from 127.0.0.3:"))
        })
        .collect();
    assert!(
        !failures.is_empty() && failures.len() < 100,
        "{}",
        failures.len()
    );
    let throttled: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["kind"] == "login_throttled")
        .collect();
    assert!(!throttled.is_empty());
    assert!(
        throttled
            .iter()
            .all(|e| e["detail"].as_str().unwrap().contains("127.0.0.3"))
    );
}

#[test]
fn every_configuration_change_is_one_audit_event_naming_its_actor() {
    let (stack, key) = Stack::start();
    let (_, err, ok) = stack.psql_user(&key, "select 1");
    assert!(ok, "{err}");
    stack.cli_ok(&[
        "service-accounts",
        "create",
        "ci-bot",
        "--group",
        "deployers",
    ]);
    stack.cli_ok(&["targets", "create", "orders", "--agent", "edge-1"]);
    stack.cli_ok(&[
        "rules",
        "create",
        "--subject",
        "group:deployers",
        "--target",
        "orders",
    ]);
    let policy = stack.tmp.path().join("p.yaml");
    std::fs::write(&policy, "guardrails:\n  default: allow\n").unwrap();
    stack.cli_ok(&["policy", "apply", "-f", policy.to_str().unwrap()]);
    stack.cli_ok(&["agents", "enroll-token", "--agent", "edge-9"]);
    let sessions: Vec<serde_json::Value> =
        serde_json::from_str(&stack.cli_ok(&["sessions", "list", "-o", "json"])).unwrap();
    let sid = sessions[0]["id"].as_str().unwrap().to_string();
    stack.cli_ok(&["sessions", "hold", &sid, "--reason", "case 42"]);
    stack.cli_ok(&["sessions", "release", &sid, "--reason", "closed"]);

    // The harness's admin, which the break-glass token created.
    const ADMIN: &str = "sa:gatehouse-admin";
    let events = stack.audit_events(&[]);
    let with = |kind: &str, needle: &str| -> Vec<&serde_json::Value> {
        events
            .iter()
            .filter(|e| e["kind"] == kind && e["detail"].as_str().unwrap_or("").contains(needle))
            .collect()
    };
    for (needle, actor) in [
        ("created service account sa:alice", ADMIN),
        (
            "created service account sa:ci-bot (groups [deployers]",
            ADMIN,
        ),
        ("created target db ", ADMIN),
        ("created target orders ", ADMIN),
        ("may use orders", ADMIN),
        ("applied policy document", ADMIN),
        ("created enrollment token", ADMIN),
        ("enrolled agent edge-1", "agent:edge-1"),
    ] {
        let found = with("config_change", needle);
        assert_eq!(
            found.len(),
            if needle == "created enrollment token" {
                2
            } else {
                1
            },
            "{needle}: {found:?}"
        );
        for e in found {
            assert_eq!(e["identity"], actor, "{e}");
            let d = e["detail"].as_str().unwrap();
            assert!(d.contains(&format!("by {actor} from ")), "{d}");
            assert!(d.contains("policy version"), "{d}");
            // No secret in evidence: tokens appear by a prefix of their hash.
            assert!(!d.contains("ghe_") && !d.contains("ghk_"), "{d}");
        }
    }
    let policy_change = &with("config_change", "applied policy document")[0];
    let d = policy_change["detail"].as_str().unwrap();
    let versions = d.rsplit("policy version ").next().unwrap();
    let (before, after) = versions.split_once(" -> ").unwrap();
    assert_ne!(before, after, "{d}");
    assert_eq!(
        with("legal_hold", "placed by sa:gatehouse-admin from").len(),
        1
    );
    assert_eq!(
        with("legal_hold", "released by sa:gatehouse-admin from").len(),
        1
    );

    // A reader that leaves (`| head`) ends the CLI quietly.
    let mut child = stack
        .cli_cmd(&stack.token, &["audit", "events"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{:?}", out.status);
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_burst_of_200_logins_leaves_no_session_open_in_the_index() {
    let (stack, key) = Stack::start();
    let mut kids = Vec::new();
    for i in 0..200 {
        // Every fourth with a wrong database, so some are refused upstream.
        let db = if i % 4 == 0 { "nosuchdb" } else { "app" };
        let conninfo = format!(
            "host={} port={} user=db dbname={db} sslmode=verify-full sslrootcert={}",
            stack.pg_addr.split(':').next().unwrap(),
            stack.pg_addr.rsplit(':').next().unwrap(),
            stack.ca_file.display()
        );
        kids.push(
            Command::new("psql")
                .args(["-X", "-A", "-t", "-c", "select pg_sleep(0.2)", &conninfo])
                .env("PGPASSWORD", &key)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap(),
        );
    }
    let mut ok = 0;
    let mut why = std::collections::BTreeMap::<String, usize>::new();
    for k in kids {
        let out = k.wait_with_output().unwrap();
        if out.status.success() {
            ok += 1;
        } else {
            *why.entry(String::from_utf8_lossy(&out.stderr).trim().to_string())
                .or_default() += 1;
        }
    }
    assert!(ok >= 100, "{ok} of 200 succeeded: {why:#?}");
    let open = wait_until("every session closed", Duration::from_secs(60), || {
        let s: Vec<serde_json::Value> =
            serde_json::from_str(&stack.cli_ok(&["sessions", "list", "-o", "json"])).unwrap();
        let open: Vec<serde_json::Value> = s.into_iter().filter(|x| x["ended_ms"] == 0).collect();
        open.is_empty().then_some(open)
    });
    assert!(open.is_empty());
}

#[test]
fn a_60_mb_value_delays_only_its_own_session_and_one_over_the_limit_gets_a_clear_error() {
    let (stack, key) = Stack::start();
    // A session already running when the large value comes through.
    let sleeper = stack.psql_spawn(
        &key,
        &["-X", "-A", "-t", "-c", "select pg_sleep(8), 'still here'"],
        "",
    );
    std::thread::sleep(Duration::from_millis(500));
    let big = stack.psql_spawn(
        &key,
        &["-X", "-A", "-t", "-c", "select repeat('x', 60000000)"],
        "",
    );
    // New sessions are admitted while it streams.
    let started = Instant::now();
    let mut admitted = 0;
    while started.elapsed() < Duration::from_secs(4) || admitted < 2 {
        let (out, err, ok) = stack.psql_user(&key, "select 42");
        assert!(
            ok,
            "a new session while the large value streams: {out}{err}"
        );
        admitted += 1;
    }
    assert!(admitted >= 2);
    let out = big.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let value = String::from_utf8_lossy(&out.stdout);
    assert_eq!(value.trim_end().len(), 60_000_000);
    let out = sleeper.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("still here"));

    // Over the per-message inspection limit: a FATAL naming the limit, and
    // the agent keeps serving.
    let (out, err, ok) = stack.psql_user(&key, "select repeat('y', 70 * 1024 * 1024)");
    assert!(!ok, "{out}");
    assert!(
        err.contains("54000") && err.contains("inspection limit of 64 MiB"),
        "{err}"
    );
    let (out, err, ok) = stack.psql_user(&key, "select 'after'");
    assert!(ok && out.contains("after"), "{out}{err}");
    let agents = stack.cli_ok(&["agents", "list", "-o", "json"]);
    assert!(agents.contains("\"connected\": true"), "{agents}");
}

#[test]
fn requests_are_listed_only_to_their_requester_and_those_who_may_review_them() {
    let (stack, alice) = Stack::start();
    let policy = stack.tmp.path().join("p.yaml");
    std::fs::write(
        &policy,
        "guardrails:\n  default: allow\n  rules:\n    - name: writes-need-approval\n      action: approve\n      kinds: [write]\napprovals:\n  wait_seconds: 0\n  approver_groups: [dba]\n",
    )
    .unwrap();
    stack.cli_ok(&["policy", "apply", "-f", policy.to_str().unwrap()]);
    let (_, err, _) = stack.psql_user(&alice, "create table if not exists t (x int)");
    assert!(!err.contains("FATAL"), "{err}");
    let (_, err, ok) = stack.psql_user(&alice, "insert into t values (1)");
    assert!(!ok && err.contains("approval requested"), "{err}");
    let outsider = stack.create_account("mallory", &[]);
    let dba = stack.create_account("dana", &["dba"]);
    let rules_only = stack.create_account("rob", &["dev"]);
    // Everyone here may list requests: reviewers what they may review,
    // users their own.
    stack.cli_ok(&["roles", "grant", "reviewer", "sa:dana"]);
    for p in ["sa:alice", "sa:mallory", "sa:rob"] {
        stack.cli_ok(&["roles", "grant", "user", p]);
    }
    let list = |key: &str| -> Vec<serde_json::Value> {
        let out = stack
            .cli_cmd(key, &["requests", "list", "-o", "json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    assert_eq!(list(&alice).len(), 1, "the requester sees its own");
    assert_eq!(list(&dba).len(), 1, "an approver sees what it may review");
    assert!(list(&outsider).is_empty(), "an outsider sees nothing");
    assert!(
        list(&rules_only).is_empty(),
        "a user outside the approver groups sees nothing"
    );
    assert_eq!(list(&stack.token).len(), 1, "the admin sees all");
    // A caller without a rule cannot tell a missing target from one it may
    // not use.
    let (_, missing, _) = {
        let (host, port) = stack.pg_addr.rsplit_once(':').unwrap();
        let out = Command::new("psql")
            .args(["-X", "-c", "select 1"])
            .arg(format!(
                "host={host} port={port} user=nosuch dbname=app sslmode=verify-full sslrootcert={}",
                stack.ca_file.display()
            ))
            .env("PGPASSWORD", &outsider)
            .output()
            .unwrap();
        (0, String::from_utf8_lossy(&out.stderr).into_owned(), 0)
    };
    let (_, forbidden, _) = stack.psql_user(&outsider, "select 1");
    let shape = |e: &str, name: &str| e.replace(name, "<T>");
    assert_eq!(
        shape(missing.trim(), "nosuch").replace(|c: char| c.is_ascii_digit(), ""),
        shape(forbidden.trim(), "db").replace(|c: char| c.is_ascii_digit(), ""),
    );
}
