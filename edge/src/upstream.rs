//! The pool of gateway instances the edge proxies to.
//!
//! - **Discovery**: `servers` entries are `host:port`; names are resolved at start and again every
//!   `resolve_interval_secs` (a Kubernetes headless Service lists its ready pods' addresses). An instance keeps
//!   its health state across resolutions; one whose address disappears is dropped; a name that fails to resolve
//!   keeps its previous addresses.
//! - **Active health checks**: `GET {health.path}` on each instance's `health.port` (the gateway's admin port,
//!   `/readyz`) every `health.interval_ms`; `unhealthy_threshold` failures in a row take it out, `healthy_threshold`
//!   successes bring it back. New instances start out of rotation until their first check passes.
//! - **Passive ejection**: `max_fails` connection or proxy failures in a row eject an instance for `fail_timeout_secs`
//!   (nginx's `max_fails`/`fail_timeout`); a success resets the count.
//! - **Balancing**: round robin, or least connections (ties broken round robin).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How the next instance is chosen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    #[default]
    RoundRobin,
    LeastConn,
}

/// Active health checks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// Port of the health endpoint on each instance (the gateway's admin port); `0` checks the traffic port.
    pub port: u16,
    pub path: String,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            port: 9102,
            path: "/readyz".into(),
            interval_ms: 2000,
            timeout_ms: 1000,
            unhealthy_threshold: 2,
            healthy_threshold: 1,
        }
    }
}

/// One gateway instance and what the edge knows about it.
#[derive(Debug)]
pub struct Instance {
    pub addr: SocketAddr,
    /// `addr` as text, made once (a metric label of every request).
    pub label: Arc<str>,
    /// As the active checks see it.
    healthy: AtomicBool,
    streak: AtomicU32,
    /// Failures in a row seen by requests.
    fails: AtomicU32,
    /// Ejected until this many milliseconds after the pool's epoch (0: not ejected).
    ejected_until_ms: AtomicU64,
    /// Requests in flight (least connections).
    active: AtomicUsize,
}

impl Instance {
    fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            label: addr.to_string().into(),
            healthy: AtomicBool::new(false),
            streak: AtomicU32::new(0),
            fails: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            active: AtomicUsize::new(0),
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    pub fn in_flight(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }
}

/// A request's hold on an instance: counts it as in flight until dropped.
#[derive(Debug)]
pub struct Lease {
    pub instance: Arc<Instance>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.instance.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The instances and the policy over them.
pub struct Pool {
    instances: RwLock<Vec<Arc<Instance>>>,
    balance: Balance,
    next: AtomicUsize,
    epoch: Instant,
    max_fails: u32,
    fail_timeout: Duration,
    health: HealthConfig,
}

impl Pool {
    pub fn new(balance: Balance, max_fails: u32, fail_timeout: Duration, health: HealthConfig) -> Self {
        Self {
            instances: RwLock::new(Vec::new()),
            balance,
            next: AtomicUsize::new(0),
            epoch: Instant::now(),
            max_fails: max_fails.max(1),
            fail_timeout,
            health,
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub fn instances(&self) -> Vec<Arc<Instance>> {
        self.instances.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Sets the resolved addresses: known ones keep their state, new ones start unchecked (out of rotation).
    pub fn set_addresses(&self, addrs: &[SocketAddr]) {
        let mut list = self.instances.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let known: HashMap<SocketAddr, Arc<Instance>> = list.iter().map(|i| (i.addr, i.clone())).collect();
        let mut fresh: Vec<Arc<Instance>> =
            addrs.iter().map(|a| known.get(a).cloned().unwrap_or_else(|| Arc::new(Instance::new(*a)))).collect();
        fresh.sort_by_key(|i| i.addr);
        fresh.dedup_by_key(|i| i.addr);
        *list = fresh;
    }

    /// Whether any instance is in rotation (readiness).
    pub fn any_available(&self) -> bool {
        let now = self.now_ms();
        self.instances().iter().any(|i| self.available(i, now))
    }

    fn available(&self, i: &Instance, now_ms: u64) -> bool {
        i.is_healthy() && i.ejected_until_ms.load(Ordering::Acquire) <= now_ms
    }

    /// The next instance for a request, avoiding `tried` (instances this request already failed on); `None` when
    /// none is available.
    pub fn pick(&self, tried: &[SocketAddr]) -> Option<Lease> {
        // Under the read lock, with no copy of the list and no list of candidates (two allocations per request
        // before), and the clock read only while some instance is ejected.
        let all = self.instances.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        // One pass over the ejection deadlines: an ejection that has run out is forgotten (unless a new one
        // replaced it meanwhile), so that the picks after it need no clock again.
        let mut now = 0;
        for i in all.iter() {
            let until = i.ejected_until_ms.load(Ordering::Acquire);
            if until == 0 {
                continue;
            }
            if now == 0 {
                now = self.now_ms();
            }
            if until <= now {
                let _ = i.ejected_until_ms.compare_exchange(until, 0, Ordering::AcqRel, Ordering::Relaxed);
            }
        }
        // Each pass reads the instances' state again: one may leave the set between counting and choosing (a
        // failed check, another request's ejection). Round robin counts around the set as it is then (`cycle`),
        // so that it still picks one of those left instead of finding none.
        let candidates = || all.iter().filter(move |i| self.available(i, now) && !tried.contains(&i.addr));
        let n = candidates().count();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let chosen = match self.balance {
            Balance::RoundRobin => candidates().cycle().nth(start)?,
            Balance::LeastConn => candidates().cycle().skip(start).take(n).min_by_key(|i| i.in_flight())?,
        };
        chosen.active.fetch_add(1, Ordering::Relaxed);
        Some(Lease { instance: chosen.clone() })
    }

    /// A request failed on `i` (connect error, reset, timeout): ejects it after `max_fails` in a row.
    pub fn report_failure(&self, i: &Instance) -> bool {
        let fails = i.fails.fetch_add(1, Ordering::AcqRel) + 1;
        if fails >= self.max_fails {
            i.fails.store(0, Ordering::Release);
            let until = self.now_ms() + u64::try_from(self.fail_timeout.as_millis()).unwrap_or(u64::MAX);
            i.ejected_until_ms.store(until, Ordering::Release);
            tracing::warn!(instance = %i.addr, fails, eject_for = ?self.fail_timeout, "upstream instance ejected");
            return true;
        }
        false
    }

    /// A request got an answer from `i`.
    pub fn report_success(&self, i: &Instance) {
        if i.fails.load(Ordering::Relaxed) != 0 {
            i.fails.store(0, Ordering::Release);
        }
    }

    /// Records one active check's result for `i`.
    pub fn record_check(&self, i: &Instance, ok: bool) {
        let was = i.is_healthy();
        if ok == was {
            i.streak.store(0, Ordering::Release);
            return;
        }
        let streak = i.streak.fetch_add(1, Ordering::AcqRel) + 1;
        let threshold = if ok { self.health.healthy_threshold } else { self.health.unhealthy_threshold };
        if streak >= threshold.max(1) {
            i.healthy.store(ok, Ordering::Release);
            i.streak.store(0, Ordering::Release);
            if ok {
                // Back in rotation: forget what the requests saw before.
                i.fails.store(0, Ordering::Release);
                i.ejected_until_ms.store(0, Ordering::Release);
                tracing::info!(instance = %i.addr, "upstream instance healthy");
            } else {
                tracing::warn!(instance = %i.addr, "upstream instance unhealthy");
            }
        }
    }

    /// One round of active checks, all instances at once.
    pub async fn check_all(&self) {
        let checks = self.instances().into_iter().map(|i| async move {
            let ok = self.check(&i).await;
            self.record_check(&i, ok);
        });
        futures_util::future::join_all(checks).await;
    }

    /// `GET {path}` on the instance's health port: healthy on a 2xx status.
    async fn check(&self, i: &Instance) -> bool {
        let port = if self.health.port == 0 { i.addr.port() } else { self.health.port };
        let addr = SocketAddr::new(i.addr.ip(), port);
        let request = format!("GET {} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n", self.health.path);
        let exchange = async {
            let mut stream = tokio::net::TcpStream::connect(addr).await?;
            stream.write_all(request.as_bytes()).await?;
            let mut head = [0u8; 12];
            stream.read_exact(&mut head).await?;
            std::io::Result::Ok(head)
        };
        match tokio::time::timeout(Duration::from_millis(self.health.timeout_ms), exchange).await {
            // "HTTP/1.1 200"
            Ok(Ok(head)) => head.starts_with(b"HTTP/1.") && head[9] == b'2',
            _ => false,
        }
    }
}

/// Keeps the pool's addresses current: resolves every entry of `servers`; an entry that fails to resolve keeps
/// the addresses it had (a DNS hiccup must not empty the pool).
pub struct Discovery {
    servers: Vec<String>,
    last: HashMap<String, Vec<SocketAddr>>,
}

impl Discovery {
    pub fn new(servers: Vec<String>) -> Self {
        Self { servers, last: HashMap::new() }
    }

    /// Resolves all entries and installs the result in `pool`; returns the entries that failed, with why.
    pub async fn refresh(&mut self, pool: &Pool) -> Vec<String> {
        let mut errors = Vec::new();
        for s in &self.servers {
            match tokio::net::lookup_host(s.as_str()).await {
                Ok(found) => {
                    let mut found: Vec<SocketAddr> = found.collect();
                    found.sort();
                    if self.last.get(s) != Some(&found) {
                        tracing::info!(server = %s, addresses = ?found, "upstream resolved");
                    }
                    self.last.insert(s.clone(), found);
                }
                Err(e) => errors.push(format!("{s}: {e}")),
            }
        }
        let all: Vec<SocketAddr> = self.last.values().flatten().copied().collect();
        pool.set_addresses(&all);
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(balance: Balance) -> Pool {
        let p = Pool::new(balance, 2, Duration::from_secs(60), HealthConfig::default());
        p.set_addresses(&["127.0.0.1:1".parse().expect("a"), "127.0.0.1:2".parse().expect("b")]);
        for i in p.instances() {
            p.record_check(&i, true);
        }
        p
    }

    fn port(l: &Option<Lease>) -> u16 {
        l.as_ref().map_or(0, |l| l.instance.addr.port())
    }

    #[test]
    fn round_robin_alternates_and_skips_what_was_tried() {
        let p = pool(Balance::RoundRobin);
        let picks: Vec<u16> = (0..4).map(|_| port(&p.pick(&[]))).collect();
        assert_eq!(picks, [1, 2, 1, 2]);
        let tried = ["127.0.0.1:1".parse().expect("a")];
        assert!((0..4).all(|_| port(&p.pick(&tried)) == 2));
        let both = ["127.0.0.1:1".parse().expect("a"), "127.0.0.1:2".parse().expect("b")];
        assert!(p.pick(&both).is_none());
    }

    #[test]
    fn least_connections_prefers_the_idle_instance() {
        let p = pool(Balance::LeastConn);
        let held = p.pick(&[]);
        let first = port(&held);
        let others: Vec<u16> = (0..3).map(|_| port(&p.pick(&[]))).collect();
        assert!(others.iter().all(|o| *o != first), "{first} {others:?}");
        drop(held);
    }

    #[test]
    fn failures_eject_and_a_passing_check_restores() {
        let p = pool(Balance::RoundRobin);
        let one = p.instances()[0].clone();
        assert!(!p.report_failure(&one));
        p.report_success(&one);
        assert!(!p.report_failure(&one), "a success resets the count");
        assert!(p.report_failure(&one), "two in a row eject");
        assert!((0..4).all(|_| port(&p.pick(&[])) == 2));
        // Unhealthy after two failed checks; healthy again after one good one, ejection forgotten.
        let two = p.instances()[1].clone();
        p.record_check(&two, false);
        assert!(p.any_available());
        p.record_check(&two, false);
        assert!(!p.any_available());
        p.record_check(&two, true);
        assert!(p.any_available(), "healthy again after one good check");
        // `one` passed its checks all along: its ejection lasts `fail_timeout` (60 s here).
        p.record_check(&one, true);
        let available: Vec<u16> =
            p.instances().iter().filter(|i| p.available(i, p.now_ms())).map(|i| i.addr.port()).collect();
        assert_eq!(available, [2]);
    }

    #[test]
    fn an_ejection_that_ran_out_is_forgotten() {
        let p = Pool::new(Balance::RoundRobin, 1, Duration::from_millis(1), HealthConfig::default());
        p.set_addresses(&["127.0.0.1:1".parse().expect("a")]);
        let one = p.instances()[0].clone();
        p.record_check(&one, true);
        assert!(p.report_failure(&one), "one failure ejects (max_fails 1) for 1 ms");
        assert_ne!(one.ejected_until_ms.load(Ordering::Acquire), 0);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(port(&p.pick(&[])), 1, "available again once the ejection ran out");
        assert_eq!(one.ejected_until_ms.load(Ordering::Acquire), 0, "and the deadline is forgotten");
    }

    #[test]
    fn new_addresses_start_unchecked_and_known_ones_keep_their_state() {
        let p = pool(Balance::RoundRobin);
        p.set_addresses(&["127.0.0.1:2".parse().expect("b"), "127.0.0.1:3".parse().expect("c")]);
        let ports: Vec<(u16, bool)> = p.instances().iter().map(|i| (i.addr.port(), i.is_healthy())).collect();
        assert_eq!(ports, [(2, true), (3, false)]);
    }
}
