//! Durability per query cycle: no client sees the end of a statement
//! (CommandComplete, ReadyForQuery) whose audit event could be lost. The
//! agent is killed with -9 at each step of a read that ends pipelined
//! cycles (paused there by its debug-build test hook), restarted, and the
//! audit trail is compared with what the client saw.

use std::time::Duration;

use gatehouse_e2e::*;

const STEPS: [&str; 4] = ["inspected", "queued", "durable", "forwarded"];
const PIPELINED: usize = 12;

fn paused_count(stack: &Stack) -> usize {
    std::fs::read_to_string(stack.tmp.path().join("agent.log"))
        .unwrap_or_default()
        .matches("test hook: relay paused")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_agent_at_each_step_of_a_pipelined_cycle_loses_no_event_the_client_saw() {
    let (mut stack, key) = tokio::task::block_in_place(Stack::start);
    for step in STEPS {
        // The agent, restarted with the hook set to this step.
        stack.agent_env = vec![("GATEHOUSE_AGENT_TEST_PAUSE".into(), step.into())];
        tokio::task::block_in_place(|| {
            stack.agent.as_mut().unwrap().kill9();
            stack.start_agent(None);
            stack.wait_agent_connected("edge-1");
        });
        let paused_before = paused_count(&stack);
        let client = stack.driver(&key).await;
        // Simple queries sent back to back without waiting: pipelined
        // cycles, each answered with its CommandComplete and ReadyForQuery.
        let texts: Vec<String> = (0..PIPELINED)
            .map(|i| format!("select '{step}-{i}'"))
            .collect();
        let run = {
            let texts = texts.clone();
            tokio::spawn(async move {
                let calls = texts.iter().map(|t| client.simple_query(t));
                futures::future::join_all(calls)
                    .await
                    .into_iter()
                    .map(|r| r.is_ok())
                    .collect::<Vec<bool>>()
            })
        };
        tokio::task::block_in_place(|| {
            wait_until("the relay paused", Duration::from_secs(20), || {
                (paused_count(&stack) > paused_before).then_some(())
            });
            stack.agent.as_mut().unwrap().kill9();
        });
        let seen = tokio::time::timeout(Duration::from_secs(30), run)
            .await
            .expect("the client learns the session ended")
            .unwrap();
        let completed: Vec<&String> = texts
            .iter()
            .zip(&seen)
            .filter(|(_, ok)| **ok)
            .map(|(t, _)| t)
            .collect();
        if step == "forwarded" {
            assert!(
                !completed.is_empty(),
                "the forwarded cycle did not reach the client"
            );
        } else {
            assert!(
                completed.is_empty(),
                "paused at {step}, the client still saw {completed:?} complete"
            );
        }

        // Restarted without the hook: what the spool held is shipped.
        stack.agent_env.clear();
        tokio::task::block_in_place(|| {
            stack.start_agent(None);
            stack.wait_agent_connected("edge-1");
        });
        let events = tokio::task::block_in_place(|| {
            wait_until(
                "every completed statement audited",
                Duration::from_secs(30),
                || {
                    let ev = stack.audit_events(&["--target", "db"]);
                    completed
                        .iter()
                        .all(|t| {
                            ev.iter()
                                .any(|e| e["kind"] == "statement" && e["statement"] == t.as_str())
                        })
                        .then_some(ev)
                },
            )
        });
        for t in &texts {
            let n = events
                .iter()
                .filter(|e| e["kind"] == "statement" && e["statement"] == t.as_str())
                .count();
            assert!(n <= 1, "{t} audited {n} times (step {step})");
        }
        let mut ids: Vec<&str> = events.iter().filter_map(|e| e["id"].as_str()).collect();
        let n = ids.len();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), n, "an audit event appears twice (step {step})");
        eprintln!(
            "killed at {step}: the client saw {} of {PIPELINED} complete, all audited once",
            completed.len()
        );
    }
}
