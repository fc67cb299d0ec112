//! Recording throughput for a large result set:
//! - the agent's recorder alone: result-row events per second and MB/s of
//!   record lines into the spool (encoded, written through, cut into zstd
//!   chunks, each fsync'd);
//! - the uploader: MB/s of chunk objects to a real S3-compatible server,
//!   each read back and its SHA-256 compared;
//! - end to end: psql fetching a large result directly and through the
//!   gateway with every row recorded, in the same run, and how long after
//!   the session ended its recording was committed.
//!
//! Run with `bash benches/recording.sh` (builds release binaries first).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use gatehouse_e2e::*;
use gatehouse_recording::RecordEvent;
use gatehouse_recording::chunked::SessionMeta;

const ROWS: u64 = 1_000_000;
const E2E_ROWS: u64 = 500_000;

fn mb(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    read_tree(dir)
        .iter()
        .map(|(p, _)| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum()
}

fn main() {
    let rows: u64 = std::env::var("GATEHOUSE_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ROWS);
    let tmp = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(tmp.path());
    let data = tmp.path().join("agent");
    std::fs::create_dir_all(&data).unwrap();
    let cfg_path = data.join("agent.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "name = \"bench\"\nservers = [\"127.0.0.1:1\"]\ndata_dir = \"{}\"\n{}",
            data.display(),
            s3.agent_toml()
        ),
    )
    .unwrap();
    let cfg = gatehouse_agent::config::AgentConfig::load(&cfg_path).unwrap();
    let store = gatehouse_recording::store::open(&cfg.store()).unwrap();
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let key = aws_lc_rs::signature::EcdsaKeyPair::generate_pkcs8(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        &rng,
    )
    .unwrap()
    .as_ref()
    .to_vec();
    let (ctx, _queues) =
        gatehouse_agent::AgentCtx::new(cfg, store, key, gatehouse_agent::protocols());

    // Into the spool.
    let meta = SessionMeta {
        session_id: "bench-session".into(),
        identity: "sa:bench".into(),
        target: "db".into(),
        agent: "bench".into(),
        policy_version: "p".into(),
        started_ms: 0,
        database: "app".into(),
        db_user: "app".into(),
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut rec = rt
        .block_on(gatehouse_agent::recorder::Recorder::start(&ctx, meta))
        .unwrap();
    let mut line_bytes = 0u64;
    let t0 = Instant::now();
    for i in 0..rows {
        let values = vec![
            Some(i.to_string()),
            Some(gatehouse_recording::sha256_hex(&i.to_le_bytes())[..32].to_string()),
            Some(format!(
                "2026-11-30 01:{:02}:{:02}.{:03}+00",
                i % 60,
                i % 59,
                i % 1000
            )),
            Some(format!("customer-{}@example.com", i % 9973)),
        ];
        // What the line costs (values plus framing), for MB/s of records.
        line_bytes += values
            .iter()
            .flatten()
            .map(|v| v.len() as u64 + 3)
            .sum::<u64>()
            + 32;
        rec.record(i as i64 / 1000, RecordEvent::Row { values })
            .unwrap();
        if i % 256 == 0 {
            rec.flush().unwrap();
        }
    }
    rec.finish(&ctx, "bench").unwrap();
    let spool_time = t0.elapsed();
    let spooled = dir_bytes(&data.join("recordings"));
    println!(
        "recorder: {rows} result-row events in {:.2} s: {:.0} events/s, {:.1} MB/s of record lines ({:.1} MB) into the spool as {:.1} MB of zstd chunks (fsync'd)",
        spool_time.as_secs_f64(),
        rows as f64 / spool_time.as_secs_f64(),
        mb(line_bytes, spool_time),
        line_bytes as f64 / 1e6,
        spooled as f64 / 1e6,
    );

    // To the S3-compatible server.
    let t0 = Instant::now();
    rt.block_on(gatehouse_agent::recorder::upload_all(&ctx))
        .unwrap();
    let up = t0.elapsed();
    println!(
        "uploader: {:.1} MB of chunks and manifest in {:.2} s: {:.1} MB/s compressed ({:.0} events/s), each object read back and hashed",
        spooled as f64 / 1e6,
        up.as_secs_f64(),
        mb(spooled, up),
        rows as f64 / up.as_secs_f64(),
    );
    drop(s3);

    // End to end, direct and through the gateway, same run.
    let (stack, key) = Stack::start_with(true, "");
    let sql = format!(
        "select g, md5(g::text), now() + g * interval '1 second', 'customer-' || (g % 9973) || '@example.org' from generate_series(1, {E2E_ROWS}) g"
    );
    let time = |args: &[String], password: &str| {
        let t0 = Instant::now();
        let out = Command::new("psql")
            .args(args)
            .env("PGPASSWORD", password)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (t0.elapsed(), out.stdout.len() as u64)
    };
    let direct_args = vec![
        "-X".to_string(),
        "-A".into(),
        "-t".into(),
        "-c".into(),
        sql.clone(),
        format!(
            "host=127.0.0.1 port={} user={AGENT_ROLE} dbname=app sslmode=disable",
            stack.pg.port
        ),
    ];
    let (host, port) = stack.pg_addr.rsplit_once(':').unwrap();
    let gw_args = vec![
        "-X".to_string(),
        "-A".into(),
        "-t".into(),
        "-c".into(),
        sql.clone(),
        format!("host={host} port={port} user=db dbname=app sslmode=require"),
    ];
    let mut direct = Vec::new();
    let mut gateway = Vec::new();
    let mut bytes = 0;
    for _ in 0..3 {
        let (d, b) = time(&direct_args, AGENT_PASSWORD);
        direct.push(d);
        bytes = b;
        let (g, _) = time(&gw_args, &key);
        gateway.push(g);
    }
    let ended = Instant::now();
    let n = 3;
    wait_until("recordings committed", Duration::from_secs(300), || {
        let v: serde_json::Value =
            serde_json::from_str(&stack.cli_ok(&["sessions", "list", "-o", "json"])).unwrap();
        let all = v.as_array().unwrap().clone();
        (all.len() >= n && all.iter().all(|s| s["recording_sha256"] != "")).then_some(())
    });
    let committed = ended.elapsed();
    direct.sort();
    gateway.sort();
    let (d, g) = (direct[1], gateway[1]);
    println!(
        "end to end: psql fetching {E2E_ROWS} rows ({:.1} MB as text), median of 3: direct {:.2} s ({:.1} MB/s), through Gatehouse with every row recorded {:.2} s ({:.1} MB/s), {:.2}x direct; the last recording was committed {:.2} s after its session ended",
        bytes as f64 / 1e6,
        d.as_secs_f64(),
        mb(bytes, d),
        g.as_secs_f64(),
        mb(bytes, g),
        g.as_secs_f64() / d.as_secs_f64(),
        committed.as_secs_f64(),
    );
}
