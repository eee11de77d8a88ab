//! nginx's `limit_req` decision (ngx_http_limit_req_module.c) for one key, as the reference the edge's answers
//! to an abusing client are compared with, beside a real nginx receiving the same requests.

/// What nginx decides for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Passed on at once.
    Now,
    /// Passed on after this many milliseconds.
    Delayed(u64),
    Rejected,
}

/// The decisions for requests arriving at `arrivals_ms` (non-decreasing) from one client, for
/// `limit_req_zone rate=<rate_per_s>r/s` and `limit_req burst=<burst>` (delay mode, `delay=0`).
pub fn decide(arrivals_ms: &[u64], rate_per_s: u64, burst: u64) -> Vec<Decision> {
    let rate_milli = rate_per_s * 1000;
    // (excess in milli-requests, last in ms); a new key starts at excess 0, last = now, and passes at once.
    let mut state: Option<(i64, u64)> = None;
    arrivals_ms
        .iter()
        .map(|&now| {
            let Some((excess, last)) = state else {
                state = Some((0, now));
                return Decision::Now;
            };
            let ms = now.saturating_sub(last);
            let next = (excess - (rate_milli * ms / 1000) as i64 + 1000).max(0);
            if next > (burst * 1000) as i64 {
                return Decision::Rejected; // a rejection changes nothing
            }
            state = Some((next, if ms != 0 { now } else { last }));
            match next as u64 * 1000 / rate_milli {
                0 => Decision::Now,
                d => Decision::Delayed(d),
            }
        })
        .collect()
}

/// (at once, delayed, rejected)
pub fn tally(decisions: &[Decision]) -> (usize, usize, usize) {
    decisions.iter().fold((0, 0, 0), |(n, d, r), x| match x {
        Decision::Now => (n + 1, d, r),
        Decision::Delayed(_) => (n, d + 1, r),
        Decision::Rejected => (n, d, r + 1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forty_at_once_against_one_per_second_burst_25() {
        let d = decide(&[0; 40], 1, 25);
        assert_eq!(tally(&d), (1, 25, 14));
        assert_eq!(d[1], Decision::Delayed(1000));
        assert_eq!(d[25], Decision::Delayed(25_000));
    }

    #[test]
    fn a_full_queue_admits_one_per_second_and_rejections_charge_nothing() {
        let mut arrivals = vec![0; 26];
        // Every 250 ms for 4 s after the burst: only those a whole second after the last admission pass.
        arrivals.extend((1..=16).map(|k| k * 250));
        let d = decide(&arrivals, 1, 25);
        let admitted: Vec<u64> =
            arrivals.iter().zip(&d).skip(26).filter(|(_, x)| **x != Decision::Rejected).map(|(t, _)| *t).collect();
        assert_eq!(admitted, [1000, 2000, 3000, 4000]);
    }

    #[test]
    fn a_slow_client_is_never_delayed() {
        let d = decide(&[0, 1000, 2000, 3500], 1, 25);
        assert!(d.iter().all(|x| *x == Decision::Now), "{d:?}");
    }
}
