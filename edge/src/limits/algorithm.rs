//! nginx's `limit_req` leaky bucket, to the millisecond and the milli-request, as in
//! `ngx_http_limit_req_module.c`. Pure arithmetic on one key's [`Bucket`]; locking, keys and time live elsewhere.
//!
//! - State per key: `excess` (milli-requests waiting in the bucket) and `last` (ms of the last accounted request).
//! - On a request: `ms = now - last` (a clock step backwards counts as 0);
//!   `excess = max(0, excess - rate * ms / 1000 + 1000)`.
//! - Rejected when `excess > burst` (strictly); a rejected request changes nothing.
//! - Otherwise `excess` is stored, and `last` moves to `now` only when `ms != 0`.
//! - Delay: 0 when `excess <= delay`, else `(excess - delay) * 1000 / rate` ms.
//!
//! Units: `rate` in milli-requests per second (1r/s = 1000; 30r/m = 500), `burst` and `delay` in milli-requests.

/// One key's state: 16 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    /// Milli-requests in the bucket.
    pub excess: u64,
    /// Milliseconds (on the zone's clock) of the last accounted request.
    pub last: u64,
}

/// A zone's numbers, in nginx's units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// Milli-requests per second; never 0.
    pub rate: u64,
    /// Milli-requests allowed over the rate.
    pub burst: u64,
    /// Milli-requests that pass without delay (`nodelay`: `u64::MAX`; default: 0; `delay=N`: N*1000).
    pub delay: u64,
}

impl Params {
    /// `rate` requests per `per_secs` seconds, `burst` requests, `delay` requests without delay (`None`: nodelay).
    pub fn new(rate: u64, per_secs: u64, burst: u64, delay: Option<u64>) -> Self {
        Self {
            rate: (rate * 1000 / per_secs.max(1)).max(1),
            burst: burst * 1000,
            delay: delay.map_or(u64::MAX, |d| d.saturating_mul(1000)),
        }
    }
}

/// What the bucket says about a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Accepted: the bucket's new excess.
    Pass { excess: u64 },
    /// Over the burst: nothing was charged.
    Reject { excess: u64 },
}

/// The excess after a request arriving at `now`, and whether it fits (nginx's lookup).
pub fn evaluate(bucket: Option<&Bucket>, now: u64, p: &Params) -> Verdict {
    let Some(b) = bucket else {
        // A key seen for the first time starts empty, and its first request adds nothing.
        return Verdict::Pass { excess: 0 };
    };
    let ms = now.saturating_sub(b.last);
    let drained = p.rate.saturating_mul(ms) / 1000;
    // The clamp at zero applies to the whole sum, as in nginx: a long-idle key comes back with excess 0.
    let excess = b.excess.saturating_add(1000).saturating_sub(drained);
    if excess > p.burst { Verdict::Reject { excess } } else { Verdict::Pass { excess } }
}

/// Stores an accepted request's excess (nginx moves `last` only when time has passed).
pub fn charge(bucket: Option<&Bucket>, now: u64, excess: u64) -> Bucket {
    match bucket {
        Some(b) if b.last >= now => Bucket { excess, last: b.last },
        _ => Bucket { excess, last: now },
    }
}

/// How long an accepted request with `excess` waits, in ms.
pub fn delay_ms(excess: u64, p: &Params) -> u64 {
    if excess <= p.delay { 0 } else { (excess - p.delay).saturating_mul(1000) / p.rate }
}

/// After a rejection: ms until a request would fit again (for `Retry-After`).
pub fn retry_after_ms(bucket: &Bucket, now: u64, p: &Params) -> u64 {
    // Accepted when excess - rate*ms/1000 + 1000 <= burst, i.e. rate*ms/1000 >= excess + 1000 - burst.
    let needed = (bucket.excess + 1000).saturating_sub(p.burst);
    let since_last = now.saturating_sub(bucket.last);
    (needed.saturating_mul(1000).div_ceil(p.rate)).saturating_sub(since_last)
}

/// Whether a request at `now` would find the bucket at zero, exactly like a key never seen: forgetting the key
/// then changes nothing.
pub fn is_drained(bucket: &Bucket, now: u64, p: &Params) -> bool {
    p.rate.saturating_mul(now.saturating_sub(bucket.last)) / 1000 >= bucket.excess.saturating_add(1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_rps_burst_25() -> Params {
        Params::new(1, 1, 25, Some(0))
    }

    /// Runs `n` requests at the same millisecond through one bucket; returns (delays of accepted, rejected).
    fn burst(p: &Params, n: usize, now: u64, mut b: Option<Bucket>) -> (Vec<u64>, usize, Option<Bucket>) {
        let mut delays = Vec::new();
        let mut rejected = 0;
        for _ in 0..n {
            match evaluate(b.as_ref(), now, p) {
                Verdict::Pass { excess } => {
                    b = Some(charge(b.as_ref(), now, excess));
                    delays.push(delay_ms(excess, p));
                }
                Verdict::Reject { .. } => rejected += 1,
            }
        }
        (delays, rejected, b)
    }

    #[test]
    fn twenty_six_at_once_are_all_accepted_one_per_second() {
        let p = one_rps_burst_25();
        let (delays, rejected, _) = burst(&p, 26, 5_000, None);
        assert_eq!(rejected, 0);
        assert_eq!(delays, (0..26).map(|k| k * 1000).collect::<Vec<_>>());
    }

    #[test]
    fn forty_at_once_give_26_accepted_and_14_rejected() {
        let (delays, rejected, _) = burst(&one_rps_burst_25(), 40, 5_000, None);
        assert_eq!((delays.len(), rejected), (26, 14));
    }

    #[test]
    fn a_second_burst_queues_behind_the_first() {
        let p = one_rps_burst_25();
        let (_, _, b) = burst(&p, 10, 0, None);
        // 2.5 s later: 2500 milli-requests drained (excess 9000 -> 6500), so the next waits 7.5 s.
        let (delays, rejected, _) = burst(&p, 3, 2_500, b);
        assert_eq!(rejected, 0);
        assert_eq!(delays, vec![7_500, 8_500, 9_500]);
    }

    #[test]
    fn nodelay_never_delays_but_still_enforces_the_burst() {
        let p = Params::new(1, 1, 25, None);
        let (delays, rejected, _) = burst(&p, 40, 0, None);
        assert!(delays.iter().all(|d| *d == 0));
        assert_eq!((delays.len(), rejected), (26, 14));
    }

    #[test]
    fn delay_n_lets_the_first_n_plus_one_through() {
        let p = Params::new(1, 1, 25, Some(5));
        let (delays, _, _) = burst(&p, 10, 0, None);
        assert_eq!(delays, vec![0, 0, 0, 0, 0, 0, 1000, 2000, 3000, 4000]);
    }

    #[test]
    fn a_rejection_charges_nothing() {
        let p = Params::new(1, 1, 2, Some(0));
        let (_, rejected, b) = burst(&p, 10, 0, None);
        assert_eq!(rejected, 7);
        assert_eq!(b, Some(Bucket { excess: 2000, last: 0 }));
    }

    #[test]
    fn last_moves_only_when_time_passed() {
        let b = Bucket { excess: 3000, last: 100 };
        assert_eq!(charge(Some(&b), 100, 4000), Bucket { excess: 4000, last: 100 });
        assert_eq!(charge(Some(&b), 99, 4000), Bucket { excess: 4000, last: 100 }, "clock step back");
        assert_eq!(charge(Some(&b), 101, 4000), Bucket { excess: 4000, last: 101 });
    }

    #[test]
    fn per_minute_rates_round_like_nginx() {
        // 30r/m = 500 milli-requests per second; 7 ms drains 3 (integer division), not 3.5.
        let p = Params::new(30, 60, 10, Some(0));
        assert_eq!(p.rate, 500);
        let b = Bucket { excess: 5000, last: 0 };
        assert_eq!(evaluate(Some(&b), 7, &p), Verdict::Pass { excess: 5000 - 3 + 1000 });
        assert_eq!(delay_ms(6000, &p), 12_000);
    }

    #[test]
    fn retry_after_is_when_the_next_request_fits() {
        let p = one_rps_burst_25();
        let (_, _, b) = burst(&p, 26, 0, None);
        let b = b.expect("bucket");
        let wait = retry_after_ms(&b, 0, &p);
        assert_eq!(wait, 1000);
        assert!(matches!(evaluate(Some(&b), wait - 1, &p), Verdict::Reject { .. }));
        assert!(matches!(evaluate(Some(&b), wait, &p), Verdict::Pass { .. }));
    }

    #[test]
    fn drained_means_like_new() {
        let p = one_rps_burst_25();
        let b = Bucket { excess: 3000, last: 0 };
        assert!(!is_drained(&b, 3999, &p));
        assert_eq!(evaluate(Some(&b), 3999, &p), Verdict::Pass { excess: 1 });
        assert!(is_drained(&b, 4000, &p));
        assert_eq!(evaluate(Some(&b), 4000, &p), evaluate(None, 4000, &p));
        assert_eq!(evaluate(Some(&b), 90_000, &p), Verdict::Pass { excess: 0 }, "clamped as a whole");
    }
}
