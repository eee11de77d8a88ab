//! Rate limiting: nginx `limit_req` semantics over in-memory zones.
//!
//! - [`algorithm`]: one bucket's arithmetic, exactly nginx's;
//! - [`zone`]: the buckets of a zone, sharded and bounded in memory, in a fixed table ([`table`]);
//! - [`decide`]: several limits on one request, in nginx's order (check each, the first rejection stops and
//!   charges nothing; when all pass, all are charged and the longest delay wins).

pub mod algorithm;
mod table;
pub mod zone;

use zone::Locked;
pub use zone::{Key, Zone};

use algorithm::Verdict;
use smallvec::{SmallVec, smallvec};

/// Per-limit values of one request, inline up to four limits (a route rarely has more): no allocation per
/// decision.
pub type PerLimit<T> = SmallVec<[T; 4]>;

/// One limit to apply to a request: a zone, the request's key in it, and whether the zone only observes.
pub struct Limit<'a> {
    pub zone: &'a Zone,
    pub key: Key,
    pub dry_run: bool,
}

/// What happened in one zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZoneOutcome {
    Immediate,
    Delayed {
        ms: u64,
    },
    Rejected {
        retry_after_ms: u64,
    },
    DryRunDelayed {
        ms: u64,
    },
    DryRunRejected,
    /// Not looked at: an earlier zone rejected the request.
    Skipped,
}

impl ZoneOutcome {
    /// The label of this outcome in metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            ZoneOutcome::Immediate => "immediate",
            ZoneOutcome::Delayed { .. } => "delayed",
            ZoneOutcome::Rejected { .. } => "rejected",
            ZoneOutcome::DryRunDelayed { .. } => "dry_run_delayed",
            ZoneOutcome::DryRunRejected => "dry_run_rejected",
            ZoneOutcome::Skipped => "skipped",
        }
    }
}

/// The decision on one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// One outcome per limit, in order.
    pub outcomes: PerLimit<ZoneOutcome>,
    /// The index of the limit that rejected the request, if one did.
    pub rejected_by: Option<usize>,
    /// How long the request waits before it is forwarded (the longest delay of the enforcing zones).
    pub delay_ms: u64,
    /// Each zone's excess (milli-requests) after this request, where it was charged.
    pub excess: PerLimit<Option<u64>>,
}

/// Applies `limits` to one request arriving at `now` (ms), as one step: concurrent decisions on the same keys
/// give what they would give one after the other.
pub fn decide(limits: &[Limit<'_>], now: u64) -> Decision {
    let n = limits.len();
    let mut outcomes: PerLimit<ZoneOutcome> = smallvec![ZoneOutcome::Skipped; n];
    // Each zone's excess once it passed; becomes the decision's `excess` (cleared when a zone rejects).
    let mut passed: PerLimit<Option<u64>> = smallvec![None; n];
    // Every zone's shard of the request's key, held for the whole decision (see [`Locked`]); one zone needs no
    // more than its own atomic check-and-charge (half the time per decision in `benches/limits.rs`).
    let mut locked = match limits {
        [one] => Shards::One(one.zone, one.key),
        _ => Shards::Many(Locked::new(limits.iter().map(|l| (l.zone, l.key)))),
    };
    for (i, l) in limits.iter().enumerate() {
        // The last limit is looked up and charged in one step, the others only looked up (as nginx does).
        let verdict = if i + 1 == n { locked.check_and_charge(i, now) } else { locked.check(i, now) };
        match verdict {
            Verdict::Pass { excess } => passed[i] = Some(excess),
            Verdict::Reject { .. } if l.dry_run => outcomes[i] = ZoneOutcome::DryRunRejected,
            Verdict::Reject { .. } => {
                outcomes[i] = ZoneOutcome::Rejected { retry_after_ms: locked.retry_after_ms(i, now) };
                passed.iter_mut().for_each(|e| *e = None);
                return Decision { outcomes, rejected_by: Some(i), delay_ms: 0, excess: passed };
            }
        }
    }
    let mut delay_ms = 0;
    for (i, l) in limits.iter().enumerate() {
        let Some(mut excess) = passed[i] else { continue };
        if i + 1 != n {
            excess = locked.charge(i, now);
            passed[i] = Some(excess);
        }
        let ms = algorithm::delay_ms(excess, &l.zone.params);
        outcomes[i] = match (ms, l.dry_run) {
            (0, _) => ZoneOutcome::Immediate,
            (ms, true) => ZoneOutcome::DryRunDelayed { ms },
            (ms, false) => {
                delay_ms = delay_ms.max(ms);
                ZoneOutcome::Delayed { ms }
            }
        };
    }
    Decision { outcomes, rejected_by: None, delay_ms, excess: passed }
}

/// The buckets one decision works on: a single zone's (each call locks its shard), or several zones' shards held
/// together. Lives on the stack for one decision: boxing the large variant would allocate on every request.
#[allow(clippy::large_enum_variant)]
enum Shards<'z> {
    One(&'z Zone, Key),
    Many(Locked<'z>),
}

impl Shards<'_> {
    fn check(&self, i: usize, now: u64) -> Verdict {
        match self {
            Shards::One(zone, key) => zone.check(*key, now),
            Shards::Many(locked) => locked.check(i, now),
        }
    }

    fn check_and_charge(&mut self, i: usize, now: u64) -> Verdict {
        match self {
            Shards::One(zone, key) => zone.check_and_charge(*key, now),
            Shards::Many(locked) => locked.check_and_charge(i, now),
        }
    }

    fn charge(&mut self, i: usize, now: u64) -> u64 {
        match self {
            Shards::One(zone, key) => zone.charge(*key, now),
            Shards::Many(locked) => locked.charge(i, now),
        }
    }

    fn retry_after_ms(&self, i: usize, now: u64) -> u64 {
        match self {
            Shards::One(zone, key) => zone.retry_after_ms(*key, now),
            Shards::Many(locked) => locked.retry_after_ms(i, now),
        }
    }
}

#[cfg(test)]
mod tests;
