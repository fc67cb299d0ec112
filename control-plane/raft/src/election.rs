//! When a voter campaigns.
//!
//! openraft 0.9 draws each member's election timeout once, when the member
//! starts, and checks it on a tick of 1.5 heartbeats. Two survivors of a
//! dead leader whose draws and tick phases happen to line up then split
//! their votes, and, since neither draw changes, split again at the next
//! attempt and the one after (seen: four split rounds in a row, 3.7 s
//! without a leader). Raft's liveness argument needs a fresh random
//! timeout for every attempt, so the members here run with openraft's own
//! election trigger off and this driver in its place:
//!
//! - the peer service reports every accepted AppendEntries or snapshot from
//!   a leader and every vote granted ([`Elections::contact`]);
//! - a follower that knew a leader waits for that leader's lease
//!   (`election_timeout_max`, as openraft does) and then a timeout drawn
//!   afresh from `[election_timeout_min, election_timeout_max)`; a
//!   candidate whose campaign failed waits a fresh timeout only;
//! - a member told by a voter that its log is longer waits another
//!   `2 × election_timeout_max` before its next campaign, so the member
//!   with the longest log wins instead of the two trading terms (openraft's
//!   own rule, kept);
//! - the check runs every [`CHECK_MS`], not on a heartbeat-sized tick.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use openraft::ServerState;

use crate::Raft;

/// How often the driver looks at the clock.
pub const CHECK_MS: u64 = 10;

/// The time of the last sign of a live leader, and the timeout drawn for
/// the next attempt.
pub struct Elections {
    inner: Mutex<Timer>,
    min_ms: u64,
    max_ms: u64,
}

struct Timer {
    last_contact: Instant,
    timeout: Duration,
    /// A voter had a longer log at the last campaign.
    greater_log: bool,
}

// === impl Elections ===

impl Elections {
    pub fn new(min_ms: u64, max_ms: u64) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Timer {
                last_contact: Instant::now(),
                timeout: Duration::from_millis(draw(min_ms, max_ms)),
                greater_log: false,
            }),
            min_ms,
            max_ms,
        })
    }

    /// A leader was heard from, or this member granted a vote: the next
    /// campaign waits a whole timeout from now, drawn afresh.
    pub fn contact(&self) {
        if let Ok(mut t) = self.inner.lock() {
            t.last_contact = Instant::now();
            t.timeout = Duration::from_millis(draw(self.min_ms, self.max_ms));
            t.greater_log = false;
        }
    }

    /// A voter refused this member's campaign for a longer log.
    pub fn greater_log_seen(&self) {
        if let Ok(mut t) = self.inner.lock() {
            t.greater_log = true;
        }
    }

    /// Whether a campaign is due at `now`; `lease` is added when the member
    /// follows a known leader.
    fn due(&self, now: Instant, lease: Duration) -> bool {
        match self.inner.lock() {
            Ok(t) => {
                let extra = if t.greater_log {
                    Duration::from_millis(2 * self.max_ms)
                } else {
                    Duration::ZERO
                };
                now.saturating_duration_since(t.last_contact) >= lease + t.timeout + extra
            }
            Err(_) => false,
        }
    }

    /// Runs the driver until the Raft member shuts down.
    pub async fn drive(self: Arc<Self>, raft: Raft, node_id: u64) {
        let lease = Duration::from_millis(self.max_ms);
        let mut metrics = raft.metrics();
        loop {
            tokio::time::sleep(Duration::from_millis(CHECK_MS)).await;
            let (leader, voter, single, following, candidate) = {
                let m = metrics.borrow_and_update();
                if m.running_state.is_err() {
                    return;
                }
                let membership = m.membership_config.membership();
                let voters = membership.voter_ids().count();
                let voter = membership.voter_ids().any(|id| id == node_id);
                (
                    m.state == ServerState::Leader,
                    voter,
                    voters == 1,
                    m.vote.is_committed(),
                    m.state == ServerState::Candidate,
                )
            };
            if leader || !voter {
                self.contact();
                continue;
            }
            let wait = if following && !single {
                lease
            } else {
                Duration::ZERO
            };
            // The only voter elects itself at once, unless its campaign is
            // still being written.
            let at_once = single && !candidate;
            if at_once || self.due(Instant::now(), wait) {
                let quiet = self
                    .inner
                    .lock()
                    .map(|t| t.last_contact.elapsed().as_millis())
                    .unwrap_or_default();
                tracing::info!(
                    quiet_ms = quiet as u64,
                    following,
                    "no leader heard from: campaigning"
                );
                // The next attempt, if this one fails, waits a fresh timeout.
                self.contact();
                if raft.trigger().elect().await.is_err() {
                    return;
                }
            }
        }
    }
}

fn draw(min_ms: u64, max_ms: u64) -> u64 {
    use rand::Rng;
    rand::rng().random_range(min_ms..max_ms.max(min_ms + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_attempt_draws_its_own_timeout() {
        let e = Elections::new(300, 600);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..50 {
            e.contact();
            let t = e.inner.lock().map(|t| t.timeout).unwrap_or_default();
            assert!(t >= Duration::from_millis(300) && t < Duration::from_millis(600));
            seen.insert(t);
        }
        assert!(seen.len() > 10, "timeouts repeat: {seen:?}");
    }

    #[test]
    fn a_campaign_is_due_only_after_the_lease_and_the_timeout() {
        let e = Elections::new(300, 600);
        let start = e
            .inner
            .lock()
            .map(|t| t.last_contact)
            .unwrap_or_else(|_| Instant::now());
        let lease = Duration::from_millis(600);
        assert!(!e.due(start + Duration::from_millis(850), lease));
        assert!(e.due(start + Duration::from_millis(1200), lease));
        assert!(!e.due(start + Duration::from_millis(250), Duration::ZERO));
        assert!(e.due(start + Duration::from_millis(600), Duration::ZERO));
        e.greater_log_seen();
        assert!(!e.due(start + Duration::from_millis(1500), Duration::ZERO));
        assert!(e.due(start + Duration::from_millis(1800), Duration::ZERO));
    }
}
