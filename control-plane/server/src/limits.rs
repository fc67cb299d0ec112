//! Limits before authentication: connection caps per source address and in
//! total, the deadline of each handshake stage, failed-login throttling, a
//! file-descriptor budget, and log lines that do not flood.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Limits of one listener, from the command line.
#[derive(Clone, Copy, Debug)]
pub struct ListenerLimits {
    /// Concurrent unauthenticated connections from one address.
    pub per_source: usize,
    /// Concurrent unauthenticated connections in all.
    pub total: usize,
    /// Deadline of each stage before authentication.
    pub stage: Duration,
}

/// Logs at most once per interval, counting what it did not log.
pub struct LogEvery {
    interval: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

// === impl LogEvery ===

impl LogEvery {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            state: Mutex::new((None, 0)),
        }
    }

    /// Counts one occurrence; returns how many happened since the last log
    /// line when it is time for another.
    pub fn tick(&self) -> Option<u64> {
        let mut s = lock(&self.state);
        s.1 += 1;
        let now = Instant::now();
        if s.0.is_none_or(|t| now.duration_since(t) >= self.interval) {
            let n = s.1;
            *s = (Some(now), 0);
            return Some(n);
        }
        None
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Counts a listener's unauthenticated connections.
pub struct ConnLimits {
    name: &'static str,
    limits: ListenerLimits,
    total: AtomicUsize,
    per_source: Mutex<HashMap<IpAddr, usize>>,
    refused: LogEvery,
}

/// One admitted connection; its drop frees the slot (when the connection
/// authenticates or ends).
pub struct ConnSlot {
    owner: Arc<ConnLimits>,
    ip: IpAddr,
}

// === impl ConnLimits ===

impl ConnLimits {
    pub fn new(name: &'static str, limits: ListenerLimits) -> Arc<Self> {
        Arc::new(Self {
            name,
            limits,
            total: AtomicUsize::new(0),
            per_source: Mutex::new(HashMap::new()),
            refused: LogEvery::new(Duration::from_secs(10)),
        })
    }

    pub fn stage(&self) -> Duration {
        self.limits.stage
    }

    /// A slot for a new connection from `ip`, or `None` (the caller closes
    /// the connection at once) when its address or the listener is full.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<ConnSlot> {
        let mut map = lock(&self.per_source);
        let n = map.get(&ip).copied().unwrap_or(0);
        let total = self.total.load(Ordering::Relaxed);
        if n >= self.limits.per_source || total >= self.limits.total {
            drop(map);
            if let Some(count) = self.refused.tick() {
                tracing::warn!(
                    listener = self.name,
                    source = %ip,
                    refused = count,
                    per_source = self.limits.per_source,
                    total = self.limits.total,
                    "unauthenticated connections over the limit closed"
                );
            }
            return None;
        }
        map.insert(ip, n + 1);
        self.total.fetch_add(1, Ordering::Relaxed);
        Some(ConnSlot {
            owner: self.clone(),
            ip,
        })
    }

    /// Unauthenticated connections now open.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut map = lock(&self.owner.per_source);
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
        self.owner.total.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Failed logins per source address and per subject, with exponential
/// back-off. A source that failed too often is refused without a check
/// until its back-off passes; a subject that failed too often (from
/// anywhere) only makes failures answer later, so a valid login from
/// another address is never slowed.
pub struct LoginThrottle {
    sources: Mutex<HashMap<IpAddr, Failures>>,
    subjects: Mutex<HashMap<String, Failures>>,
    /// Attempts refused unchecked per source since its last audit event.
    throttled: Mutex<HashMap<IpAddr, (u64, Instant)>>,
}

/// One audit event per throttled source and this interval.
const THROTTLE_AUDIT_EVERY: Duration = Duration::from_secs(10);

#[derive(Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
    blocked_until: Option<Instant>,
}

/// Failures a source may have before back-off starts.
const FREE_FAILURES: u32 = 5;
/// Failures a subject may have before its failures are answered late.
const FREE_SUBJECT_FAILURES: u32 = 20;
/// Back-off starts here and doubles per failure, up to the cap.
const BACKOFF_BASE: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
const SUBJECT_DELAY_MAX: Duration = Duration::from_secs(2);
/// A record is forgotten after this long without a failure.
const FORGET_AFTER: Duration = Duration::from_secs(900);
/// Records kept per map before old ones are dropped.
const MAX_RECORDS: usize = 100_000;

fn backoff(base: Duration, over: u32, max: Duration) -> Duration {
    base.saturating_mul(1u32 << over.min(16)).min(max)
}

impl Default for LoginThrottle {
    fn default() -> Self {
        Self {
            sources: Mutex::new(HashMap::new()),
            subjects: Mutex::new(HashMap::new()),
            throttled: Mutex::new(HashMap::new()),
        }
    }
}

// === impl LoginThrottle ===

impl LoginThrottle {
    /// `Err(retry after)` while `ip` is backing off.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let map = lock(&self.sources);
        match map.get(&ip).and_then(|f| f.blocked_until) {
            Some(until) if until > now => Err(until - now),
            _ => Ok(()),
        }
    }

    /// Records a failure; returns how long to wait before answering it.
    pub fn failed(&self, ip: IpAddr, subject: &str, now: Instant) -> Duration {
        {
            let mut map = lock(&self.sources);
            let f = bump(&mut map, ip, now);
            if f.count > FREE_FAILURES {
                f.blocked_until =
                    Some(now + backoff(BACKOFF_BASE, f.count - FREE_FAILURES - 1, BACKOFF_MAX));
            }
        }
        let mut map = lock(&self.subjects);
        let key: String = subject.chars().take(128).collect();
        let f = bump(&mut map, key, now);
        if f.count > FREE_SUBJECT_FAILURES {
            backoff(
                Duration::from_millis(50),
                f.count - FREE_SUBJECT_FAILURES - 1,
                SUBJECT_DELAY_MAX,
            )
        } else {
            Duration::ZERO
        }
    }

    /// Counts an attempt refused unchecked; returns the count to audit when
    /// the source's interval is over (the first one at once).
    pub fn note_throttled(&self, ip: IpAddr, now: Instant) -> Option<u64> {
        let mut map = lock(&self.throttled);
        if map.len() >= MAX_RECORDS {
            map.retain(|_, (_, at)| now.duration_since(*at) < THROTTLE_AUDIT_EVERY);
        }
        match map.get_mut(&ip) {
            Some((n, at)) if now.duration_since(*at) < THROTTLE_AUDIT_EVERY => {
                *n += 1;
                None
            }
            Some((n, at)) => {
                let count = *n + 1;
                *n = 0;
                *at = now;
                Some(count)
            }
            None => {
                map.insert(ip, (0, now));
                Some(1)
            }
        }
    }

    /// A valid login clears its source's record.
    pub fn succeeded(&self, ip: IpAddr) {
        lock(&self.sources).remove(&ip);
    }
}

fn bump<K: std::hash::Hash + Eq>(
    map: &mut HashMap<K, Failures>,
    key: K,
    now: Instant,
) -> &mut Failures {
    if map.len() >= MAX_RECORDS {
        map.retain(|_, f| now.duration_since(f.last) < Duration::from_secs(60));
    }
    let f = map.entry(key).or_insert(Failures {
        count: 0,
        last: now,
        blocked_until: None,
    });
    if now.duration_since(f.last) > FORGET_AFTER {
        *f = Failures {
            count: 0,
            last: now,
            blocked_until: None,
        };
    }
    f.count = f.count.saturating_add(1);
    f.last = now;
    f
}

/// Raises the soft limit of open files to the hard limit and returns it:
/// the budget the listeners' caps are cut from.
pub fn raise_fd_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut l = getrlimit(Resource::Nofile);
    if let Some(hard) = l.maximum
        && l.current.is_none_or(|c| c < hard)
    {
        l.current = Some(hard);
        let _ = setrlimit(Resource::Nofile, l);
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// The TCP listeners whose unauthenticated connections share the
/// descriptors left: PostgreSQL, SSH, the API and the Raft port (agents
/// come over QUIC, one socket).
pub const TCP_LISTENERS: u64 = 4;

/// Descriptors kept free of every listener's cap: the API, the Raft port,
/// the QUIC socket, the Raft files, and the sessions' own connections.
pub const FD_RESERVE: u64 = 512;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_per_source_and_total() {
        let l = ConnLimits::new(
            "t",
            ListenerLimits {
                per_source: 2,
                total: 3,
                stage: Duration::from_secs(1),
            },
        );
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let s1 = l.admit(a).unwrap();
        let _s2 = l.admit(a).unwrap();
        assert!(l.admit(a).is_none(), "third from one source");
        let _s3 = l.admit(b).unwrap();
        assert!(l.admit("127.0.0.4".parse().unwrap()).is_none(), "total");
        drop(s1);
        assert!(l.admit(a).is_some());
    }

    #[test]
    fn a_failing_source_backs_off_and_others_do_not() {
        let t = LoginThrottle::default();
        let bad: IpAddr = "127.0.0.2".parse().unwrap();
        let good: IpAddr = "127.0.0.1".parse().unwrap();
        let now = Instant::now();
        for _ in 0..FREE_FAILURES {
            t.failed(bad, "orders", now);
            assert!(t.check(bad, now).is_ok());
        }
        t.failed(bad, "orders", now);
        let wait = t.check(bad, now).unwrap_err();
        assert_eq!(wait, BACKOFF_BASE);
        t.failed(bad, "orders", now);
        assert_eq!(t.check(bad, now).unwrap_err(), BACKOFF_BASE * 2);
        assert!(t.check(good, now).is_ok());
        assert!(t.check(bad, now + BACKOFF_MAX).is_ok());
        t.succeeded(bad);
        assert!(t.check(bad, now).is_ok());
    }

    #[test]
    fn log_every_counts_what_it_skipped() {
        let l = LogEvery::new(Duration::from_secs(3600));
        assert_eq!(l.tick(), Some(1));
        assert_eq!(l.tick(), None);
        assert_eq!(l.tick(), None);
    }
}
