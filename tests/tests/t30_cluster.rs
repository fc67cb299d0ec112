//! The highly available control plane: real server processes forming a Raft
//! cluster over mutual TLS.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use gatehouse_e2e::cluster::TestCluster;
use gatehouse_proto::v1::{CreateServiceAccountRequest, ListRequest};

/// The bound the issue sets for electing a new leader after a kill:
/// twice the election timeout plus a second. The election timeout here is
/// the longest a follower waits after the last heartbeat before it
/// campaigns, leader lease included.
const FAILOVER_BOUND_MS: u64 = 2 * gatehouse_cp_raft::EFFECTIVE_ELECTION_TIMEOUT_MS + 1_000;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn accounts(c: &TestCluster, id: u64) -> BTreeSet<String> {
    let mut cl = c.client(id).await.unwrap();
    cl.list_service_accounts(ListRequest {})
        .await
        .unwrap()
        .into_inner()
        .accounts
        .into_iter()
        .map(|a| a.name)
        .collect()
}

#[test]
fn followers_forward_writes_and_restarted_or_replaced_nodes_converge() {
    let mut c = TestCluster::start(3, 50);
    let rt = rt();
    rt.block_on(async {
        let s = c.status(1).await.unwrap();
        let follower = s
            .nodes
            .iter()
            .map(|n| n.id)
            .find(|id| *id != s.leader_id)
            .unwrap();
        // A write on a follower is forwarded to the leader.
        let mut f = c.client(follower).await.unwrap();
        f.create_service_account(CreateServiceAccountRequest {
            name: "via-follower".into(),
            groups: vec![],
        })
        .await
        .unwrap();
        for n in [1, 2, 3] {
            assert!(
                accounts(&c, n).await.contains("via-follower") || {
                    c.converged_digest(Duration::from_secs(10)).await;
                    accounts(&c, n).await.contains("via-follower")
                }
            );
        }
        c.converged_digest(Duration::from_secs(10)).await;
    });

    // A node restarted with its disk catches up on what it missed.
    c.kill9(3);
    rt.block_on(async {
        let mut cl = c.client(1).await.unwrap();
        for i in 0..120 {
            cl.create_service_account(CreateServiceAccountRequest {
                name: format!("while-3-down-{i}"),
                groups: vec![],
            })
            .await
            .unwrap();
        }
    });
    c.restart(3);
    let digest = rt.block_on(c.converged_digest(Duration::from_secs(30)));
    rt.block_on(async { assert!(accounts(&c, 3).await.contains("while-3-down-119")) });

    // A dead node replaced by a new one with an empty disk: the log has been
    // compacted (snapshots every 50 entries), so it catches up from a snapshot.
    c.kill9(2);
    let leader = rt.block_on(async { wait_leader(&c, &[1, 3], &[2]).await.0 });
    let out = c.cli(&c.node(leader).api, &["cluster", "remove", "2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.forget(2);
    c.join_node(4);
    c.wait_voters(3);
    let after = rt.block_on(c.converged_digest(Duration::from_secs(30)));
    assert_ne!(
        after, digest,
        "the join itself is a state change (token consumed)"
    );
    rt.block_on(async { assert!(accounts(&c, 4).await.contains("while-3-down-0")) });
    let log = std::fs::read_to_string(c.tmp.path().join("node4.log")).unwrap();
    assert!(log.contains("joined the cluster"), "{log}");
}

/// Polls the survivors until they agree on a leader that is not `dead`.
/// Returns the leader and the (term → leaders) observations.
async fn wait_leader(
    c: &TestCluster,
    survivors: &[u64],
    dead: &[u64],
) -> (u64, BTreeMap<u64, BTreeSet<u64>>) {
    let mut seen: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut clients = BTreeMap::new();
    loop {
        let mut leaders = BTreeSet::new();
        let mut all = true;
        for id in survivors {
            if !clients.contains_key(id)
                && let Ok(cl) = c.client(*id).await
            {
                clients.insert(*id, cl);
            }
            let status = match clients.get_mut(id) {
                Some(cl) => {
                    match tokio::time::timeout(
                        Duration::from_millis(500),
                        cl.cluster_status(ListRequest {}),
                    )
                    .await
                    {
                        Ok(Ok(r)) => Some(r.into_inner()),
                        _ => {
                            clients.remove(id);
                            None
                        }
                    }
                }
                None => None,
            };
            match status {
                Some(s) if s.leader_id != 0 && !dead.contains(&s.leader_id) => {
                    seen.entry(s.term).or_default().insert(s.leader_id);
                    leaders.insert(s.leader_id);
                }
                _ => all = false,
            }
        }
        if all && leaders.len() == 1 {
            return (*leaders.iter().next().unwrap(), seen);
        }
        assert!(Instant::now() < deadline, "no leader elected");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[test]
fn killing_the_leader_under_write_load_loses_no_acknowledged_write() {
    const ROUNDS: usize = 5;
    const WRITES: usize = 1_000;
    let mut c = TestCluster::start(3, 20_000);
    let rt = rt();
    let mut acked_all: BTreeSet<String> = BTreeSet::new();
    let mut attempted_all: BTreeSet<String> = BTreeSet::new();
    let mut elections = Vec::new();
    for round in 0..ROUNDS {
        let leader = rt.block_on(async { wait_leader(&c, &[1, 2, 3], &[]).await.0 });
        let survivors: Vec<u64> = [1, 2, 3].into_iter().filter(|id| *id != leader).collect();
        // Writers on the survivors (forwarded to the leader) while it dies.
        let (acked, attempted, elected_ms, terms) = rt.block_on(async {
            let mut clients = Vec::new();
            for id in &survivors {
                clients.push(c.client(*id).await.unwrap());
            }
            let names: Vec<String> = (0..WRITES).map(|i| format!("r{round}-w{i}")).collect();
            let mut tasks = Vec::new();
            for (w, chunk) in names.chunks(WRITES / 8).enumerate() {
                let mut cl = clients[w % clients.len()].clone();
                let chunk = chunk.to_vec();
                tasks.push(tokio::spawn(async move {
                    let mut acked = Vec::new();
                    for name in chunk {
                        let req = CreateServiceAccountRequest {
                            name: name.clone(),
                            groups: vec![],
                        };
                        let r = tokio::time::timeout(
                            Duration::from_secs(15),
                            cl.create_service_account(req),
                        )
                        .await;
                        if let Ok(Ok(_)) = r {
                            acked.push(name);
                        }
                    }
                    acked
                }));
            }
            // Kill the leader once writes are flowing.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let t0 = Instant::now();
            c.nodes.iter().find(|n| n.id == leader).unwrap();
            let pid = c.node(leader).proc.as_ref().unwrap().child.id();
            std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status()
                .unwrap();
            let (_, terms) = wait_leader(&c, &survivors, &[leader]).await;
            let elected = t0.elapsed().as_millis() as u64;
            let mut acked = BTreeSet::new();
            for t in tasks {
                acked.extend(t.await.unwrap());
            }
            (acked, names, elected, terms)
        });
        c.kill9(leader);
        for (term, leaders) in &terms {
            assert!(leaders.len() <= 1, "term {term} had leaders {leaders:?}");
        }
        println!(
            "round {round}: killed leader {leader}, new leader after {elected_ms} ms, {} of {WRITES} writes acknowledged",
            acked.len()
        );
        elections.push(elected_ms);
        if elected_ms > FAILOVER_BOUND_MS {
            println!("round {round}: over the bound of {FAILOVER_BOUND_MS} ms");
            for id in &survivors {
                let log = std::fs::read_to_string(c.tmp.path().join(format!("node{id}.log")))
                    .unwrap_or_default();
                let lines: Vec<&str> = log
                    .lines()
                    .filter(|l| l.contains("vote") || l.contains("elect") || l.contains("leader"))
                    .collect();
                println!(
                    "--- node {id}, last election lines:\n{}",
                    lines[lines.len().saturating_sub(40)..].join("\n")
                );
            }
        }
        assert!(
            acked.len() > WRITES / 2,
            "too few writes acknowledged: {}",
            acked.len()
        );
        acked_all.extend(acked);
        attempted_all.extend(attempted);
        c.restart(leader);
        c.wait_voters(3);
        // Each round starts from a cluster whose restarted node has caught up.
        rt.block_on(c.converged_digest(Duration::from_secs(30)));
    }
    // Every acknowledged write is on every node, exactly once; nothing that
    // was never attempted appears.
    rt.block_on(async {
        c.converged_digest(Duration::from_secs(30)).await;
        for id in [1, 2, 3] {
            let mut cl = c.client(id).await.unwrap();
            let list = cl
                .list_service_accounts(ListRequest {})
                .await
                .unwrap()
                .into_inner()
                .accounts;
            let names: Vec<String> = list
                .into_iter()
                .map(|a| a.name)
                .filter(|n| n != gatehouse_e2e::HARNESS_ADMIN)
                .collect();
            let set: BTreeSet<String> = names.iter().cloned().collect();
            assert_eq!(set.len(), names.len(), "node {id} lists a write twice");
            for a in &acked_all {
                assert!(set.contains(a), "node {id} lost acknowledged write {a}");
            }
            for n in &set {
                assert!(
                    attempted_all.contains(n),
                    "node {id} has {n}, which nobody wrote"
                );
            }
        }
    });
    elections.sort();
    println!(
        "failover over {ROUNDS} kills: min {} ms, median {} ms, max {} ms",
        elections[0],
        elections[elections.len() / 2],
        elections[elections.len() - 1]
    );
    assert!(
        elections.iter().all(|ms| *ms <= FAILOVER_BOUND_MS),
        "a new leader took longer than {FAILOVER_BOUND_MS} ms: {elections:?}"
    );
}

/// One write attempt: its name, when it returned (since the cut, ms; negative
/// before it) and its outcome.
struct Attempt {
    name: String,
    started_ms: i64,
    done_ms: i64,
    outcome: Result<(), tonic::Code>,
    message: String,
}

/// Writes sequentially through `cl` until `until`, recording every attempt.
async fn write_until(
    mut cl: gatehouse_cli::client::Client,
    prefix: String,
    cut: std::sync::Arc<std::sync::OnceLock<Instant>>,
    until: Instant,
) -> Vec<Attempt> {
    let since_cut = |t: Instant| match cut.get() {
        Some(c) if t >= *c => (t - *c).as_millis() as i64,
        Some(c) => -((*c - t).as_millis() as i64),
        None => -1_000_000,
    };
    let mut out = Vec::new();
    let mut i = 0;
    while Instant::now() < until {
        let name = format!("{prefix}-{i}");
        i += 1;
        let started = Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(15),
            cl.create_service_account(CreateServiceAccountRequest {
                name: name.clone(),
                groups: vec![],
            }),
        )
        .await;
        let (outcome, message) = match r {
            Ok(Ok(_)) => (Ok(()), String::new()),
            Ok(Err(s)) => (Err(s.code()), s.message().to_string()),
            Err(_) => (Err(tonic::Code::Cancelled), "no answer".to_string()),
        };
        let done = Instant::now();
        out.push(Attempt {
            name,
            started_ms: since_cut(started),
            done_ms: since_cut(done),
            outcome,
            message,
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    out
}

#[test]
fn an_isolated_leader_stops_acknowledging_writes_and_no_term_has_two_leaders() {
    use std::sync::{Arc, Mutex, OnceLock};
    let c = TestCluster::start_with_links(3, 1_000);
    let links = c.links.as_ref().unwrap();
    let rt = rt();
    let election_ms = gatehouse_cp_raft::EFFECTIVE_ELECTION_TIMEOUT_MS as i64;
    rt.block_on(async {
        let (old, _) = wait_leader(&c, &[1, 2, 3], &[]).await;
        let majority: Vec<u64> = [1, 2, 3].into_iter().filter(|id| *id != old).collect();
        let old_term = c.status(old).await.unwrap().term;

        // Every node's own claim to lead, sampled until the end.
        let claims: Arc<Mutex<BTreeMap<u64, BTreeSet<u64>>>> = Arc::default();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut monitor_clients = Vec::new();
        for id in [1, 2, 3] {
            monitor_clients.push(c.client(id).await.unwrap());
        }
        let monitor = {
            let (claims, done) = (claims.clone(), done.clone());
            tokio::spawn(async move {
                let mut samples = 0u64;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    for cl in monitor_clients.iter_mut() {
                        let status = tokio::time::timeout(
                            Duration::from_millis(300),
                            cl.cluster_status(ListRequest {}),
                        )
                        .await;
                        if let Ok(Ok(s)) = status {
                            let s = s.into_inner();
                            samples += 1;
                            if s.leader_id == s.node_id {
                                claims
                                    .lock()
                                    .unwrap()
                                    .entry(s.term)
                                    .or_default()
                                    .insert(s.node_id);
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                samples
            })
        };

        // A writer on the old leader and one on a node of the majority.
        let cut = Arc::new(OnceLock::new());
        let until = Instant::now() + Duration::from_millis(1_000 + 4_000);
        let on_old = tokio::spawn(write_until(
            c.client(old).await.unwrap(),
            "old".into(),
            cut.clone(),
            until,
        ));
        let on_majority = tokio::spawn(write_until(
            c.client(majority[0]).await.unwrap(),
            "maj".into(),
            cut.clone(),
            until,
        ));
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        links.isolate(old);
        let t_cut = Instant::now();
        cut.set(t_cut).unwrap();
        let (new, _) = wait_leader(&c, &majority, &[old]).await;
        let elected_ms = t_cut.elapsed().as_millis() as u64;
        let on_old = on_old.await.unwrap();
        let on_majority = on_majority.await.unwrap();
        let new_term = c.status(new).await.unwrap().term;
        println!(
            "isolated leader {old} (term {old_term}); node {new} leads term {new_term} after {elected_ms} ms"
        );
        assert!(new_term > old_term);
        assert!(
            elected_ms <= FAILOVER_BOUND_MS,
            "the majority took {elected_ms} ms to elect a leader"
        );

        // The old leader acknowledges nothing once the election timeout has
        // passed, and it answers (rather than hangs) within it.
        let late_acks: Vec<&Attempt> = on_old
            .iter()
            .filter(|a| a.outcome.is_ok() && a.done_ms > election_ms)
            .collect();
        assert!(
            late_acks.is_empty(),
            "the isolated leader acknowledged {:?}",
            late_acks.iter().map(|a| (&a.name, a.done_ms)).collect::<Vec<_>>()
        );
        let after: Vec<&Attempt> = on_old.iter().filter(|a| a.started_ms >= 0).collect();
        assert!(after.len() >= 2, "too few writes tried on the old leader");
        for a in &after {
            assert!(a.outcome.is_err(), "{} was acknowledged after the cut", a.name);
            assert!(
                a.done_ms - a.started_ms.max(0) <= election_ms + 500,
                "{} hung for {} ms on the isolated leader",
                a.name,
                a.done_ms - a.started_ms
            );
        }
        let codes: BTreeSet<String> = after
            .iter()
            .map(|a| format!("{:?}", a.outcome.unwrap_err()))
            .collect();
        println!(
            "old leader: {} writes after the cut, all refused ({codes:?}); first answer after {} ms",
            after.len(),
            after[0].done_ms
        );
        // The majority side keeps taking writes.
        let resumed = on_majority
            .iter()
            .filter(|a| a.outcome.is_ok() && a.started_ms > elected_ms as i64)
            .count();
        assert!(
            resumed > 0,
            "no write succeeded on the majority side: {:?}",
            on_majority
                .iter()
                .filter(|a| a.done_ms > -200)
                .map(|a| (a.started_ms, a.done_ms, a.outcome, &a.message))
                .collect::<Vec<_>>()
        );

        // Heal: the old leader rejoins as a follower and its unacknowledged
        // entries are gone; every acknowledged write is everywhere once.
        links.heal_all();
        c.converged_digest(Duration::from_secs(30)).await;
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let samples = monitor.await.unwrap();
        let s = c.status(old).await.unwrap();
        assert!(s.leader_id != old && s.term >= new_term, "{s:?}");
        let acked: BTreeSet<String> = on_old
            .iter()
            .chain(on_majority.iter())
            .filter(|a| a.outcome.is_ok())
            .map(|a| a.name.clone())
            .collect();
        let attempted: BTreeSet<String> = on_old
            .iter()
            .chain(on_majority.iter())
            .map(|a| a.name.clone())
            .collect();
        for id in [1, 2, 3] {
            let mut cl = c.client(id).await.unwrap();
            let names: Vec<String> = cl
                .list_service_accounts(ListRequest {})
                .await
                .unwrap()
                .into_inner()
                .accounts
                .into_iter()
                .map(|a| a.name)
                .filter(|n| n != gatehouse_e2e::HARNESS_ADMIN)
                .collect();
            let set: BTreeSet<String> = names.iter().cloned().collect();
            assert_eq!(set.len(), names.len(), "node {id} lists a write twice");
            assert!(acked.is_subset(&set), "node {id} lost an acknowledged write");
            assert!(set.is_subset(&attempted), "node {id} has a write nobody made");
        }
        let claims = claims.lock().unwrap().clone();
        println!("{samples} status samples; leaders by term: {claims:?}");
        for (term, leaders) in &claims {
            assert!(leaders.len() <= 1, "term {term} had leaders {leaders:?}");
        }
        assert!(claims.get(&old_term).is_some_and(|l| l.contains(&old)));
        assert!(claims.get(&new_term).is_some_and(|l| l.contains(&new)));
    });
}

#[test]
fn membership_grows_from_three_to_five_voters_and_shrinks_back() {
    let mut c = TestCluster::start(3, 20_000);
    let rt = rt();
    let write = |c: &TestCluster, via: u64, name: &str| {
        let name = name.to_string();
        rt.block_on(async {
            let mut cl = c.client(via).await.unwrap();
            cl.create_service_account(CreateServiceAccountRequest {
                name,
                groups: vec![],
            })
            .await
            .unwrap();
        })
    };
    write(&c, 1, "with-3");
    c.join_node(4);
    c.join_node(5);
    c.wait_voters(5);
    write(&c, 5, "with-5");

    // Five voters tolerate two failures.
    c.kill9(1);
    c.kill9(2);
    let leader = rt.block_on(async { wait_leader(&c, &[3, 4, 5], &[1, 2]).await.0 });
    assert!([3, 4, 5].contains(&leader), "leader {leader}");
    write(&c, 4, "with-3-of-5");
    c.restart(1);
    c.restart(2);
    c.wait_voters(5);
    let five = rt.block_on(c.converged_digest(Duration::from_secs(30)));

    // Back to three: remove two voters through the CLI on the leader.
    let mut removed = Vec::new();
    for gone in [4u64, 5] {
        let leader = rt.block_on(async {
            let live: Vec<u64> = c.live().map(|n| n.id).collect();
            wait_leader(&c, &live, &removed).await.0
        });
        let out = c.cli(
            &c.node(leader).api,
            &["cluster", "remove", &gone.to_string()],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        c.kill9(gone);
        c.forget(gone);
        removed.push(gone);
    }
    c.wait_voters(3);
    write(&c, 2, "back-to-3");
    let three = rt.block_on(c.converged_digest(Duration::from_secs(30)));
    assert_ne!(five, three);
    rt.block_on(async {
        let s = c.status(1).await.unwrap();
        let voters: BTreeSet<u64> = s.nodes.iter().filter(|n| n.voter).map(|n| n.id).collect();
        assert_eq!(voters, BTreeSet::from([1, 2, 3]));
        for id in [1, 2, 3] {
            let names = accounts(&c, id).await;
            for n in ["with-3", "with-5", "with-3-of-5", "back-to-3"] {
                assert!(names.contains(n), "node {id} misses {n}");
            }
        }
    });
    // With three voters again, one failure is tolerated and two are not.
    c.kill9(3);
    rt.block_on(async { wait_leader(&c, &[1, 2], &[3]).await });
    write(&c, 1, "two-of-3");
}
