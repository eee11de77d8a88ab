//! The running rate limiter: the active policy with its zones, swapped atomically on reload.
//!
//! Time comes from a governor [`Clock`] (a monotonic clock in production, a fake one in tests), read as
//! milliseconds since the limiter started, nginx's resolution. A reload builds the new zones before it swaps:
//! a zone whose definition did not change keeps its buckets (the same `Arc<Zone>` moves over), a new or changed
//! zone starts empty. Requests in flight keep the policy they started with.

use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use governor::clock::{Clock, MonotonicClock, Reference};

use crate::client;
use crate::limits::{Decision, Limit, PerLimit, Zone, decide};
use crate::policy::{KeySource, Policy, ZoneSpec};

/// The policy in force and its zones (same order as `policy.zones`).
pub struct Active {
    pub policy: Policy,
    pub zones: Vec<Arc<Zone>>,
    /// Each route's `RateLimit-Policy` header (see [`Policy::rate_limit_policy`]), made once per policy.
    pub rate_limit_policy: Vec<Option<http::HeaderValue>>,
}

/// What the limiter needs to know about a request (besides who sent it).
pub struct RequestInfo<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub authorization: Option<&'a str>,
    /// Looks a header up by lower-case name.
    pub header: &'a dyn Fn(&str) -> Option<String>,
}

/// The limiter's answer for a request on a limited route.
pub struct Verdict {
    pub active: Arc<Active>,
    /// Indices into `active.policy.zones`, in the route's order.
    pub zones: PerLimit<usize>,
    pub decision: Decision,
    pub client_ip: IpAddr,
    /// Index into `active.policy.routes`: the route that applied.
    pub route: usize,
}

pub struct Limiter<C: Clock = MonotonicClock> {
    clock: C,
    start: C::Instant,
    active: RwLock<Arc<Active>>,
}

impl Limiter<MonotonicClock> {
    pub fn new(policy: Policy) -> Self {
        Self::with_clock(policy, MonotonicClock)
    }
}

impl<C: Clock> Limiter<C> {
    pub fn with_clock(policy: Policy, clock: C) -> Self {
        let start = clock.now();
        let active = Arc::new(build(policy, None));
        Self { clock, start, active: RwLock::new(active) }
    }

    /// Milliseconds since the limiter started.
    pub fn now_ms(&self) -> u64 {
        self.clock.now().duration_since(self.start).as_u64() / 1_000_000
    }

    pub fn active(&self) -> Arc<Active> {
        self.active.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Installs `policy`, keeping the buckets of zones whose definition did not change.
    pub fn replace(&self, policy: Policy) {
        let next = Arc::new(build(policy, Some(&self.active())));
        *self.active.write().unwrap_or_else(|e| e.into_inner()) = next;
    }

    /// Forgets drained keys in every zone; returns how many.
    pub fn sweep(&self) -> usize {
        let now = self.now_ms();
        self.active().zones.iter().map(|z| z.sweep(now)).sum()
    }

    /// Decides on a request from `peer` (with its `X-Forwarded-For` chain); `None` when no route applies or the
    /// client is exempt.
    pub fn check(&self, req: &RequestInfo<'_>, peer: IpAddr, forwarded_for: Option<&str>) -> Option<Verdict> {
        let active = self.active();
        let client_ip = client::client_ip(peer, forwarded_for, &active.policy.client.trusted_proxies);
        self.check_client(active, req, client_ip)
    }

    /// [`Limiter::check`] for a client address the caller already derived with `active`'s trusted proxies (the
    /// proxy needs it for the requests-in-flight limit too).
    pub fn check_client(&self, active: Arc<Active>, req: &RequestInfo<'_>, client_ip: IpAddr) -> Option<Verdict> {
        let policy = &active.policy;
        let route_index = policy.route_index(req.method, req.path)?;
        let route = &policy.routes[route_index];
        if policy.is_exempt(client_ip) {
            return None;
        }
        let ip_key = client::ip_key(client_ip, policy.client.ipv6_prefix);
        let zones: PerLimit<usize> = route.zones.iter().copied().collect();
        let limits: PerLimit<Limit<'_>> = zones
            .iter()
            .map(|&i| {
                let spec = &policy.zones[i];
                let key = match &spec.key {
                    KeySource::ClientIp => ip_key,
                    KeySource::Header(h) => (req.header)(h).map_or(ip_key, |v| client::value_key(&v)),
                    KeySource::Claim(c) => {
                        client::bearer_claim(req.authorization, c).map_or(ip_key, |v| client::value_key(&v))
                    }
                };
                Limit { zone: &active.zones[i], key, dry_run: spec.dry_run }
            })
            .collect();
        let decision = decide(&limits, self.now_ms());
        drop(limits);
        Some(Verdict { active, zones, decision, client_ip, route: route_index })
    }
}

fn build(policy: Policy, previous: Option<&Active>) -> Active {
    let zones = policy
        .zones
        .iter()
        .map(|spec| reuse(spec, previous).unwrap_or_else(|| Arc::new(Zone::new(spec.params, spec.max_keys))))
        .collect();
    let rate_limit_policy = policy
        .routes
        .iter()
        .map(|route| policy.rate_limit_policy(route).and_then(|text| http::HeaderValue::try_from(text).ok()))
        .collect();
    Active { policy, zones, rate_limit_policy }
}

fn reuse(spec: &ZoneSpec, previous: Option<&Active>) -> Option<Arc<Zone>> {
    let prev = previous?;
    let i = prev.policy.zones.iter().position(|old| old.same_state_as(spec))?;
    Some(prev.zones[i].clone())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use governor::clock::FakeRelativeClock;

    use super::*;
    use crate::policy::load_dir;

    fn policy(text: &str) -> Policy {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("p.toml"), text).expect("write");
        load_dir(dir.path()).expect("valid policy")
    }

    const BASE: &str = "[zones.ip]\nrate = \"1r/s\"\nburst = 2\n[[routes]]\npath_prefix = \"/\"\nzones = [\"ip\"]\n";

    fn request<'a>(header: &'a dyn Fn(&str) -> Option<String>) -> RequestInfo<'a> {
        RequestInfo { method: "GET", path: "/x", authorization: None, header }
    }

    fn check(
        limiter: &Limiter<FakeRelativeClock>,
        peer: &str,
        header: &dyn Fn(&str) -> Option<String>,
    ) -> Option<Verdict> {
        limiter.check(&request(header), peer.parse().expect("ip"), None)
    }

    #[test]
    fn time_comes_from_the_clock_and_buckets_drain_with_it() {
        let clock = FakeRelativeClock::default();
        let limiter = Limiter::with_clock(policy(BASE), clock.clone());
        let none = |_: &str| None;
        for _ in 0..3 {
            assert_eq!(check(&limiter, "192.0.2.1", &none).expect("limited").decision.rejected_by, None);
        }
        assert_eq!(check(&limiter, "192.0.2.1", &none).expect("limited").decision.rejected_by, Some(0));
        clock.advance(Duration::from_millis(1000));
        assert_eq!(limiter.now_ms(), 1000);
        assert_eq!(check(&limiter, "192.0.2.1", &none).expect("limited").decision.rejected_by, None);
    }

    #[test]
    fn a_reload_keeps_the_buckets_of_unchanged_zones_only() {
        let limiter = Limiter::with_clock(policy(BASE), FakeRelativeClock::default());
        let none = |_: &str| None;
        for _ in 0..3 {
            check(&limiter, "192.0.2.1", &none);
        }
        let with_extra = format!("{BASE}[zones.other]\nrate = \"5r/s\"\n");
        limiter.replace(policy(&with_extra));
        assert_eq!(check(&limiter, "192.0.2.1", &none).expect("limited").decision.rejected_by, Some(0), "state kept");
        limiter.replace(policy(&BASE.replace("burst = 2", "burst = 3")));
        assert_eq!(
            check(&limiter, "192.0.2.1", &none).expect("limited").decision.rejected_by,
            None,
            "changed zone starts empty"
        );
    }

    #[test]
    fn header_keys_fall_back_to_the_address_and_exempt_networks_pass() {
        let text = "exempt = [\"198.51.100.0/24\"]\n[zones.k]\nkey = \"header:x-api-key\"\nrate = \"1r/s\"\n[[routes]]\npath_prefix = \"/\"\nzones = [\"k\"]\n";
        let limiter = Limiter::with_clock(policy(text), FakeRelativeClock::default());
        let alice = |h: &str| (h == "x-api-key").then(|| "alice".to_owned());
        let none = |_: &str| None;
        assert_eq!(check(&limiter, "192.0.2.1", &alice).expect("limited").decision.rejected_by, None);
        // Same address, other key: its own bucket.
        assert_eq!(check(&limiter, "192.0.2.1", &none).expect("limited").decision.rejected_by, None);
        assert_eq!(check(&limiter, "192.0.2.2", &alice).expect("limited").decision.rejected_by, Some(0));
        assert!(check(&limiter, "198.51.100.9", &none).is_none());
    }
}
