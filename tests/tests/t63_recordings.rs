//! Session recordings that are never lost: spooled, uploaded to a real
//! S3-compatible server, verified, replayed, kept or deleted by policy.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use gatehouse_e2e::*;
use object_store::{ObjectStoreExt, PutPayload};
use serde_json::Value;

/// Starts psql through the gateway without waiting for it; each statement
/// is sent as its own query.
fn psql_bg(stack: &Stack, key: &str, statements: &[&str]) -> Child {
    let mut args = vec!["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"];
    args.extend(statements.iter().flat_map(|s| ["-c", s]));
    stack.psql_spawn(key, &args, "")
}

fn sessions(stack: &Stack) -> Vec<Value> {
    let v: Value =
        serde_json::from_str(&stack.cli_ok(&["sessions", "list", "-o", "json"])).unwrap();
    v.as_array().unwrap().clone()
}

/// Waits until `n` sessions have their recordings committed and every
/// session in the index has ended; returns the recorded ones.
fn wait_all_recorded(stack: &Stack, n: usize, timeout: Duration) -> Vec<Value> {
    wait_until("recordings committed", timeout, || {
        let all = sessions(stack);
        let recorded: Vec<Value> = all
            .iter()
            .filter(|s| s["recording_sha256"] != "")
            .cloned()
            .collect();
        (recorded.len() >= n && all.iter().all(|s| s["ended_ms"] != 0)).then_some(recorded)
    })
}

fn verify(stack: &Stack, args: &[&str]) -> (bool, String) {
    let out = stack.cli(&[&["sessions", "verify"], args].concat());
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn replay_json(stack: &Stack, id: &str) -> Value {
    serde_json::from_str(&stack.cli_ok(&["sessions", "replay", id, "--format", "json"])).unwrap()
}

/// Every value of every recorded row.
fn row_values(replay: &Value) -> Vec<String> {
    replay["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "row")
        .flat_map(|e| e["values"].as_array().unwrap().clone())
        .map(|v| v.as_str().unwrap_or("NULL").to_string())
        .collect()
}

fn store_of(stack: &Stack) -> std::sync::Arc<dyn object_store::ObjectStore> {
    let s3 = stack.s3.as_ref().unwrap();
    gatehouse_recording::store::open(&gatehouse_recording::store::StoreConfig {
        url: s3.url(),
        options: s3.options().into_iter().collect(),
    })
    .unwrap()
}

#[test]
fn sessions_complete_through_a_60s_storage_outage_and_every_recording_uploads_and_verifies() {
    let (mut stack, key) = Stack::start_with(true, "");
    // Three sessions that run for a while, with rows to record.
    let scripts: Vec<String> = (1..=3)
        .map(|i| {
            format!(
                "select 'session-{i}-start'; select pg_sleep(3); \
                 select 'row-{i}-' || g from generate_series(1, 2000) g; select pg_sleep(2); \
                 select 'session-{i}-end'"
            )
        })
        .collect();
    let children: Vec<Child> = scripts
        .iter()
        .map(|s| psql_bg(&stack, &key, &[s]))
        .collect();
    // Storage goes away while they run.
    std::thread::sleep(Duration::from_millis(1500));
    let outage = Instant::now();
    stack.s3.as_mut().unwrap().stop();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "a session failed during the outage: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).lines().count(),
            1 + 1 + 2000 + 1 + 1,
            "every statement answered"
        );
    }
    assert!(
        outage.elapsed() < Duration::from_secs(50),
        "the sessions did not finish while storage was down"
    );
    // Nothing could be uploaded: no recording is committed yet, and the
    // spool holds them.
    let during = sessions(&stack);
    assert_eq!(during.len(), 3);
    assert!(
        during.iter().all(|s| s["recording_sha256"] == ""),
        "{during:?}"
    );
    let spooled = read_tree(&stack.tmp.path().join("agent").join("recordings"));
    for i in 1..=3 {
        let needle = format!("session-{i}-end");
        assert!(
            spooled.iter().any(|(_, b)| contains(b, needle.as_bytes())),
            "{needle} not in the spool"
        );
    }
    // Storage stays down for 60 s.
    let left = Duration::from_secs(60).saturating_sub(outage.elapsed());
    std::thread::sleep(left);
    stack.s3.as_mut().unwrap().resume();
    let all = wait_all_recorded(&stack, 3, Duration::from_secs(60));
    let (ok, out) = verify(&stack, &["--all"]);
    assert!(ok, "{out}");
    assert_eq!(out.matches(": ok (").count(), 3, "{out}");
    for s in &all {
        let id = s["id"].as_str().unwrap();
        let r = replay_json(&stack, id);
        assert_eq!(r["verified"], true);
        let values = row_values(&r);
        let i = ["1", "2", "3"]
            .into_iter()
            .find(|i| values.contains(&format!("session-{i}-start")))
            .unwrap();
        assert!(values.contains(&format!("row-{i}-2000")), "rows recorded");
        assert!(values.contains(&format!("session-{i}-end")));
        assert_eq!(values.len(), 2004);
        assert_eq!(
            r["events"].as_array().unwrap().last().unwrap()["type"],
            "end"
        );
    }
    // The spool is empty once everything is committed.
    wait_until("spool drained", Duration::from_secs(20), || {
        read_tree(&stack.tmp.path().join("agent").join("recordings"))
            .is_empty()
            .then_some(())
    });
    // Storage credentials and the target password are in no log, recording
    // or audit event.
    let audit = stack.cli_ok(&["audit", "events", "-o", "json"]);
    let mut evidence = read_tree(&stack.s3.as_ref().unwrap().bucket_dir());
    evidence.push(("audit".into(), audit.into_bytes()));
    for log in ["server.log", "agent.log", "s3.log"] {
        evidence.push((
            log.into(),
            std::fs::read(stack.tmp.path().join(log)).unwrap_or_default(),
        ));
    }
    for (path, data) in evidence {
        for secret in [S3_SECRET_KEY, AGENT_PASSWORD] {
            assert!(
                !contains(&data, secret.as_bytes()),
                "{secret} in {}",
                path.display()
            );
        }
    }
}

#[test]
fn a_session_cut_by_kill_9_of_the_agent_is_closed_as_agent_restarted_and_verifies() {
    let (mut stack, key) = Stack::start_with(true, "");
    let child = psql_bg(
        &stack,
        &key,
        &[
            "select 'before-the-crash-' || g from generate_series(1, 500) g",
            "select pg_sleep(60)",
        ],
    );
    // The first statement's rows and the second statement are in the
    // agent's spool (written through to the OS as they pass) before the
    // agent dies in the middle of the second.
    let spool = stack.tmp.path().join("agent").join("recordings");
    wait_until("rows in the spool", Duration::from_secs(30), || {
        read_tree(&spool)
            .iter()
            .any(|(_, b)| contains(b, b"before-the-crash-500") && contains(b, b"pg_sleep(60)"))
            .then_some(())
    });
    stack.agent.as_mut().unwrap().kill9();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "psql should lose its session");
    stack.start_agent(None);
    let all = wait_all_recorded(&stack, 1, Duration::from_secs(60));
    let s = &all[0];
    assert_eq!(s["end_reason"], "agent restarted", "{s}");
    let id = s["id"].as_str().unwrap();
    let (ok, out) = verify(&stack, &[id]);
    assert!(ok, "{out}");
    let r = replay_json(&stack, id);
    let values = row_values(&r);
    assert_eq!(values.len(), 500);
    assert_eq!(values.last().unwrap(), "before-the-crash-500");
    let events = r["events"].as_array().unwrap();
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "query" && e["text"].as_str().unwrap().contains("pg_sleep(60)")),
        "the statement running at the crash is recorded"
    );
    assert_eq!(events.last().unwrap()["reason"], "agent restarted");
    // The manifest in the bucket says so, signed.
    let manifest = std::fs::read(
        stack
            .s3
            .as_ref()
            .unwrap()
            .bucket_dir()
            .join(s["recording_key"].as_str().unwrap()),
    )
    .unwrap();
    let m: Value = serde_json::from_slice(&manifest).unwrap();
    assert_eq!(m["end_reason"], "agent restarted");
    assert!(m["signature"].as_str().unwrap().len() > 100);
}

#[test]
fn verify_names_the_session_and_chunk_of_a_flipped_byte_a_deleted_chunk_and_a_replaced_manifest() {
    let (stack, key) = Stack::start_with(true, "");
    // Large enough for several chunks (about 4 MiB of record lines each).
    let (_, err, ok) = stack.psql_user(
        &key,
        "select g, md5(g::text), md5((g * 7)::text) from generate_series(1, 120000) g",
    );
    assert!(ok, "{err}");
    let (_, err, ok) = stack.psql_user(&key, "select 'second session'");
    assert!(ok, "{err}");
    let all = wait_all_recorded(&stack, 2, Duration::from_secs(60));
    let big = all
        .iter()
        .find(|s| s["chunk_keys"].as_array().unwrap().len() >= 3)
        .unwrap_or_else(|| panic!("no session with 3 chunks: {all:?}"));
    let other = all.iter().find(|s| s["id"] != big["id"]).unwrap();
    let id = big["id"].as_str().unwrap();
    let (ok, out) = verify(&stack, &["--all"]);
    assert!(ok, "{out}");

    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = store_of(&stack);
    let path = |k: &Value| object_store::path::Path::parse(k.as_str().unwrap()).unwrap();
    let get = |k: &Value| {
        rt.block_on(async { store.get(&path(k)).await.unwrap().bytes().await.unwrap() })
    };
    let put = |k: &Value, b: Vec<u8>| {
        rt.block_on(store.put(&path(k), PutPayload::from(b)))
            .unwrap();
    };

    // A flipped byte in chunk 1, through the storage's own API.
    let k1 = &big["chunk_keys"][1];
    let original = get(k1).to_vec();
    let mut flipped = original.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x20;
    put(k1, flipped);
    let (ok, out) = verify(&stack, &["--all"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!("session {id}: FAILED: chunk 1: SHA-256")),
        "{out}"
    );
    assert!(
        out.contains(k1.as_str().unwrap()),
        "names the object: {out}"
    );
    assert!(
        out.contains(&format!("session {}: ok", other["id"].as_str().unwrap())),
        "the other session still verifies: {out}"
    );
    assert!(out.contains("1 of 2 recordings did not verify"), "{out}");
    put(k1, original);
    assert!(verify(&stack, &[id]).0);

    // A deleted chunk.
    let k0 = &big["chunk_keys"][0];
    let original = get(k0).to_vec();
    rt.block_on(store.delete(&path(k0))).unwrap();
    let (ok, out) = verify(&stack, &[id]);
    assert!(!ok);
    assert!(
        out.contains(&format!("session {id}: FAILED: chunk 0: missing")),
        "{out}"
    );
    put(k0, original);
    assert!(verify(&stack, &[id]).0);

    // A replaced manifest: edited (end reason rewritten) and re-signed with
    // another key, or another session's genuine manifest.
    let mk = &big["recording_key"];
    let original = get(mk).to_vec();
    let mut m = gatehouse_recording::chunked::Manifest::from_bytes(&original).unwrap();
    m.end_reason = "nothing to see".into();
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let forger = aws_lc_rs::signature::EcdsaKeyPair::generate_pkcs8(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        &rng,
    )
    .unwrap();
    m.sign(forger.as_ref()).unwrap();
    put(mk, m.to_bytes());
    let (ok, out) = verify(&stack, &[id]);
    assert!(!ok);
    assert!(
        out.contains(&format!("session {id}: FAILED: manifest"))
            && out.contains("does not match the sessions index"),
        "{out}"
    );
    assert!(out.contains("does not match the agent's key"), "{out}");
    put(mk, get(&other["recording_key"]).to_vec());
    let (ok, out) = verify(&stack, &[id]);
    assert!(!ok);
    assert!(
        out.contains(&format!("names session {}", other["id"].as_str().unwrap())),
        "{out}"
    );
    put(mk, original);
    let (ok, out) = verify(&stack, &["--all"]);
    assert!(ok, "{out}");
}

#[test]
fn a_full_spool_refuses_new_sessions_with_an_audit_event_while_running_ones_keep_recording() {
    let (mut stack, key) = Stack::start_with(true, "\n[spool]\nmax_bytes = 262144\n");
    stack.s3.as_mut().unwrap().stop();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let conf = stack.gateway_conf(&key);
    let client = rt.block_on(stack.driver(&key));
    // About 6 MiB of record lines: a sealed chunk and a tail, with storage
    // down, so the spool passes its quota.
    let rows = rt
        .block_on(client.query(
            "select g, md5(g::text) from generate_series(1, 100000) g",
            &[],
        ))
        .unwrap();
    assert_eq!(rows.len(), 100_000);
    let (_, err, ok) = stack.psql_user(&key, "select 1");
    assert!(!ok, "a new session was admitted with a full spool");
    assert!(err.contains("recording spool is full"), "{err}");
    let refused = rt
        .block_on(tokio_postgres::connect(
            &conf,
            gatehouse_e2e::tpg::RustlsConnect::new(&stack.ca_file),
        ))
        .err()
        .expect("a driver's new session is refused too");
    assert_eq!(
        refused.as_db_error().map(|e| e.code().code()),
        Some("53100"),
        "{refused}"
    );
    // The refusal is evidence, one event per refused session. The agent
    // ships each in the background once it is durable in its spool: wait
    // (bounded) for both, then check there are no more.
    let refused: Vec<Value> = gatehouse_e2e::wait_until(
        "both refusals' audit events",
        std::time::Duration::from_secs(15),
        || {
            let r: Vec<Value> = stack
                .audit_events(&[])
                .into_iter()
                .filter(|e| e["kind"] == "recording_refused")
                .collect();
            (r.len() >= 2).then_some(r)
        },
    );
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert!(
        refused[0]["detail"]
            .as_str()
            .unwrap()
            .contains("quota 262144 bytes")
    );
    // The running session keeps working and recording.
    let row = rt
        .block_on(client.query_one("select 'after the refusal'::text", &[]))
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "after the refusal");
    drop(client);
    stack.s3.as_mut().unwrap().resume();
    let all = wait_all_recorded(&stack, 1, Duration::from_secs(60));
    assert_eq!(all.len(), 1);
    let id = all[0]["id"].as_str().unwrap();
    // The refused sessions are in the index as ended, with the reason.
    let refused_sessions: Vec<Value> = sessions(&stack)
        .into_iter()
        .filter(|s| {
            s["end_reason"]
                .as_str()
                .unwrap()
                .contains("recording spool is full")
        })
        .collect();
    assert_eq!(refused_sessions.len(), 2, "{refused_sessions:?}");
    let (ok, out) = verify(&stack, &[id]);
    assert!(ok, "{out}");
    let values = row_values(&replay_json(&stack, id));
    assert_eq!(values.len(), 2 * 100_000 + 1);
    assert_eq!(values.last().unwrap(), "after the refusal");
    // Once uploaded, the spool takes sessions again.
    wait_until("spool drained", Duration::from_secs(30), || {
        read_tree(&stack.tmp.path().join("agent").join("recordings"))
            .is_empty()
            .then_some(())
    });
    let (_, err, ok) = stack.psql_user(&key, "select 1");
    assert!(ok, "{err}");
}

#[test]
fn retention_deletes_expired_recordings_as_an_audit_event_and_never_those_under_legal_hold() {
    let (mut stack, key) = Stack::start_with(true, "");
    for i in 1..=2 {
        let (_, err, ok) = stack.psql_user(&key, &format!("select 'kept or not {i}'"));
        assert!(ok, "{err}");
    }
    let all = wait_all_recorded(&stack, 2, Duration::from_secs(60));
    let held = all[0]["id"].as_str().unwrap().to_string();
    let gone = all[1]["id"].as_str().unwrap().to_string();
    // A hold needs a reason.
    let out = stack.cli(&["sessions", "hold", &held, "--reason", ""]);
    assert!(!out.status.success());
    stack.cli_ok(&["sessions", "hold", &held, "--reason", "litigation 2026-17"]);
    let dir = stack.tmp.path().join("policy");
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("p.yaml");
    // An invalid retention is refused with the reason.
    std::fs::write(&policy, "recordings:\n  retention: 3 weeks\n").unwrap();
    let out = stack.cli(&["policy", "apply", "-f", policy.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("recordings: duration \"3 weeks\""), "{err}");
    std::fs::write(
        &policy,
        "recordings:\n  retention: 90d\n  targets:\n    db: 2s\n",
    )
    .unwrap();
    // Storage is down when retention runs: the deletion is decided and
    // audited, and the objects go once storage is back.
    stack.s3.as_mut().unwrap().stop();
    stack.cli_ok(&["policy", "apply", "-f", policy.to_str().unwrap()]);
    let deleted = wait_until("retention deletes", Duration::from_secs(30), || {
        sessions(&stack)
            .into_iter()
            .find(|s| s["id"] == gone && s["recording_deleted_ms"] != 0)
    });
    assert!(deleted["recording_deleted_ms"].as_i64().unwrap() > 0);
    let bucket = stack.s3.as_ref().unwrap().bucket_dir();
    let objects = read_tree(&bucket);
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        read_tree(&bucket)
            .iter()
            .any(|(p, _)| p.to_string_lossy().contains(&gone)),
        "objects vanished while storage was down"
    );
    stack.s3.as_mut().unwrap().resume();
    let listed = |id: &str| {
        objects
            .iter()
            .filter(|(p, _)| p.to_string_lossy().contains(id))
            .count()
    };
    wait_until("objects deleted", Duration::from_secs(10), || {
        read_tree(&bucket)
            .iter()
            .all(|(p, _)| !p.to_string_lossy().contains(&gone))
            .then_some(())
    });
    assert!(listed(&held) >= 2, "the held recording's objects are kept");
    let ev: Vec<Value> = stack
        .audit_events(&[])
        .into_iter()
        .filter(|e| e["kind"] == "recording_deleted")
        .collect();
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0]["session_id"], gone.as_str());
    assert!(ev[0]["detail"].as_str().unwrap().contains("retention 2s"));
    assert!(
        stack
            .audit_events(&[])
            .iter()
            .any(|e| e["kind"] == "legal_hold" && e["session_id"] == held.as_str())
    );
    // The held one still verifies; a deleted one is reported as deleted.
    assert!(verify(&stack, &[&held]).0);
    let (ok, out) = verify(&stack, &[&gone]);
    assert!(!ok && out.contains("deleted by retention"), "{out}");
    // Released, it goes too.
    stack.cli_ok(&["sessions", "release", &held, "--reason", "case closed"]);
    wait_until(
        "released recording deleted",
        Duration::from_secs(30),
        || {
            sessions(&stack)
                .into_iter()
                .find(|s| s["id"] == held && s["recording_deleted_ms"] != 0)
        },
    );
}

#[test]
fn replay_shows_statements_parameters_decisions_masked_rows_and_errors_on_a_timeline() {
    let (stack, key) = Stack::start_with(true, "");
    let policy = stack.tmp.path().join("p.yaml");
    std::fs::write(
        &policy,
        "guardrails:\n  default: allow\n  rules:\n    - name: no-drops\n      action: deny\n      kinds: [ddl]\nmasking:\n  detectors: [email]\n",
    )
    .unwrap();
    stack.cli_ok(&["policy", "apply", "-f", policy.to_str().unwrap()]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = stack.driver(&key).await;
        let row = c
            .query_one(
                "select $1::text || ' wrote to ' || 'ada' || '@' || 'example.com'",
                &[&"grace"],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "grace wrote to a***@example.com");
        let e = c
            .batch_execute("drop table if exists nothing_here")
            .await
            .unwrap_err();
        assert_eq!(e.as_db_error().unwrap().code().code(), "42501");
        c.batch_execute("select 1/0").await.unwrap_err();
    });
    let all = wait_all_recorded(&stack, 1, Duration::from_secs(60));
    let id = all[0]["id"].as_str().unwrap();
    let text = stack.cli_ok(&["sessions", "replay", id]);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].contains(&format!("session {id}")) && lines[0].contains("sa:alice"));
    assert!(
        lines.last().unwrap().starts_with("recording verified"),
        "{text}"
    );
    let lines = &lines[..lines.len() - 1];
    let find = |what: &str, needle: &str| {
        lines
            .iter()
            .position(|l| l.split_whitespace().nth(1) == Some(what) && l.contains(needle))
            .unwrap_or_else(|| panic!("no {what} line with {needle:?} in\n{text}"))
    };
    let parse = find("parse", "$1::text || ' wrote to '");
    let row = find("row", "grace wrote to a***@example.com");
    let params = find("params", "grace");
    let masked = find("ready", "1 rows; values masked: email 1");
    let decision = find(
        "decision",
        "deny by rule \"no-drops\": drop table if exists nothing_here",
    );
    let error = find("error", "22012");
    assert!(
        parse < row && row < params && params < masked && masked < decision && decision < error,
        "{text}"
    );
    assert!(
        !text.contains("ada@example.com"),
        "a clear value in the replay: {text}"
    );
    // Offsets grow along the timeline.
    let offsets: Vec<i64> = lines[1..]
        .iter()
        .map(|l| {
            l.trim_start()
                .trim_start_matches('+')
                .split("ms")
                .next()
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        })
        .collect();
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]), "{offsets:?}");
    assert_eq!(lines.last().unwrap().split_whitespace().nth(1), Some("end"));
}

/// A tmpfs of `size` mounted on a fresh directory for the test's life.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting a tmpfs (needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

#[test]
fn a_spool_that_cannot_be_written_ends_the_session_with_an_error_and_what_was_recorded_verifies() {
    let spool = Tmpfs::mount("3m");
    let (stack, key) = Stack::start_with(
        false,
        &format!(
            "\n[spool]\ndir = \"{}\"\nmin_free_bytes = 1048576\n",
            spool.0.path().display()
        ),
    );
    // More record lines than the spool's disk holds before a chunk is cut.
    let (out, err, ok) = stack.psql_user(
        &key,
        "select g, md5(g::text), md5((g + 1)::text) from generate_series(1, 300000) g",
    );
    assert!(!ok, "the session outlived its recording");
    assert!(
        err.contains("58030") && err.contains("session recording failed"),
        "{err}"
    );
    assert!(err.contains("No space left on device"), "{err}");
    assert!(out.lines().count() < 300_000, "every row was delivered");
    // What was recorded up to the failure is sealed, uploaded and verifies.
    let all = wait_all_recorded(&stack, 1, Duration::from_secs(60));
    let s = &all[0];
    assert!(
        s["end_reason"]
            .as_str()
            .unwrap()
            .starts_with("session recording failed"),
        "{s}"
    );
    let id = s["id"].as_str().unwrap();
    let (ok, out) = verify(&stack, &[id]);
    assert!(ok, "{out}");
    let r = replay_json(&stack, id);
    assert!(!row_values(&r).is_empty());
    // Once uploaded, the spool has room again.
    let (_, err, ok) = stack.psql_user(&key, "select 1");
    assert!(ok, "{err}");
}
