//! Control-plane benchmark on three real server processes:
//! - committed audit events per second, produced by a real agent (the
//!   agent library, over QUIC, batched into Raft entries, acknowledged after
//!   commit);
//! - failover time (kill -9 of the leader until the survivors agree on a new
//!   one) over several kills.
//!
//! Run with `bash benches/cluster.sh` (builds release binaries first).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use gatehouse_audit::{AuditEvent, Decision, EventKind};
use gatehouse_e2e::cluster::TestCluster;
use gatehouse_proto::v1::ListRequest;

const EVENTS: u64 = 200_000;
/// Concurrent producers, as many sessions of one agent would be; each waits
/// for its event's spool fsync before the next, so this bounds the size of
/// the agent's fsync groups. Override with GATEHOUSE_BENCH_PRODUCERS.
const PRODUCERS: u64 = 64;
const KILLS: usize = 7;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let producers: u64 = std::env::var("GATEHOUSE_BENCH_PRODUCERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(PRODUCERS);
    let mut c = TestCluster::start(3, 20_000);
    let api = c.node(1).api.clone();
    let out = c.cli(&api, &["agents", "enroll-token", "--agent", "bench-agent"]);
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let dir = c.tmp.path().join("bench-agent");
    let servers: Vec<String> = [1, 2, 3]
        .iter()
        .map(|id| format!("\"{}\"", c.node(*id).tunnel))
        .collect();
    let cfg_path = dir.join("agent.toml");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        &cfg_path,
        format!(
            "name = \"bench-agent\"\nservers = [{}]\ndata_dir = \"{}\"\nrecordings_dir = \"{}\"\n",
            servers.join(", "),
            dir.display(),
            dir.join("rec").display()
        ),
    )
    .unwrap();

    let mut times = Vec::new();
    for _ in 0..KILLS {
        // The leader every node agrees on (a single reply can be stale).
        let leader = rt.block_on(async {
            loop {
                let mut seen = Vec::new();
                for id in [1, 2, 3] {
                    if let Some(s) = c.status(id).await {
                        seen.push(s.leader_id);
                    }
                }
                if seen.len() == 3 && seen[0] != 0 && seen.iter().all(|l| *l == seen[0]) {
                    break seen[0];
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let survivors: Vec<u64> = [1, 2, 3].into_iter().filter(|i| *i != leader).collect();
        let t0 = Instant::now();
        c.kill9(leader);
        rt.block_on(async {
            let mut clients = Vec::new();
            for id in &survivors {
                clients.push(c.client(*id).await.unwrap());
            }
            loop {
                let mut leaders = Vec::new();
                for cl in clients.iter_mut() {
                    if let Ok(Ok(r)) = tokio::time::timeout(
                        Duration::from_millis(300),
                        cl.cluster_status(ListRequest {}),
                    )
                    .await
                    {
                        leaders.push(r.into_inner().leader_id);
                    }
                }
                if leaders.len() == survivors.len()
                    && leaders
                        .iter()
                        .all(|l| *l != 0 && *l != leader && *l == leaders[0])
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        times.push(t0.elapsed().as_millis());
        c.restart(leader);
        c.wait_voters(3);
        // The next kill starts from a cluster whose restarted node caught up.
        rt.block_on(c.converged_digest(Duration::from_secs(60)));
    }
    times.sort();
    println!(
        "failover over {KILLS} leader kills: min {} ms, median {} ms, max {} ms",
        times[0],
        times[times.len() / 2],
        times[times.len() - 1]
    );
    rt.block_on(async {
        let cfg = gatehouse_agent::config::AgentConfig::load(&cfg_path).unwrap();
        let files = gatehouse_agent::identity::IdentityFiles::new(&cfg.data_dir);
        gatehouse_agent::identity::enroll(&cfg, &token, &files).await.unwrap();
        let store = gatehouse_recording::store::open(&cfg.store()).unwrap();
        let key = gatehouse_pki::pkcs8_der(&std::fs::read_to_string(&files.key).unwrap()).unwrap();
        let (ctx, queues) = gatehouse_agent::AgentCtx::new(cfg, store, key, gatehouse_agent::protocols());
        let ctx = Arc::new(ctx);
        tokio::spawn(gatehouse_agent::recorder::uploader(ctx.clone()));
        tokio::spawn(gatehouse_agent::tunnel::run(ctx.clone(), queues));
        let mut client = c.client(1).await.unwrap();
        let base = client.status(ListRequest {}).await.unwrap().into_inner().audit_events;
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for p in 0..producers {
            let ctx = ctx.clone();
            tasks.push(tokio::spawn(async move {
                for i in (p..EVENTS).step_by(producers as usize) {
                    let ev = AuditEvent {
                        id: ctx.new_id(),
                        agent: String::new(),
                        seq: 0,
                        time_ms: gatehouse_agent::now_ms(),
                        kind: EventKind::Statement,
                        session_id: "bench".into(),
                        identity: "sa:bench".into(),
                        issuer: None,
                        groups: None,
                        target: "bench".into(),
                        policy_version: "bench".into(),
                        decision: Decision::Allow,
                        statement: Some(format!("select {i} from orders where id = {i}")),
                        parameters: None,
                        outcome: None,
                        detail: None,
                        masked: None,
                    };
                    ctx.audit(ev).await.unwrap();
                }
            }));
        }
        let spooled = {
            let tasks = std::mem::take(&mut tasks);
            tokio::spawn(async move {
                for p in tasks {
                    p.await.unwrap();
                }
                t0.elapsed().as_secs_f64()
            })
        };
        loop {
            let n = client.status(ListRequest {}).await.unwrap().into_inner().audit_events - base;
            if n >= EVENTS {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(600), "only {n} events committed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let secs = t0.elapsed().as_secs_f64();
        let spooled = spooled.await.unwrap();
        println!(
            "audit: all {EVENTS} events fsync'd in the agent's spool after {spooled:.2} s = {:.0} events/s",
            EVENTS as f64 / spooled
        );
        println!(
            "audit: {EVENTS} events from {producers} concurrent producers committed on 3 nodes in {secs:.2} s = {:.0} events/s (agent spool fsync'd, batched, acknowledged after Raft commit)",
            EVENTS as f64 / secs
        );
    });
}
