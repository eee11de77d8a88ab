//! A rate-limit zone: one [`Params`] and the buckets of every key it tracks, in memory bounded by `max_keys`.
//!
//! Buckets live in shards (a mutex and a hash map each) so that two cores rarely wait on each other. Memory is
//! bounded: each shard's map is allocated for its share of `max_keys` and never grows. Removing keys in place
//! would leave tombstones that make the map grow on later inserts, so removals rebuild the shard's map instead
//! (at most once every `max_keys / 16 / shards` inserts, or on the periodic sweep). When a shard is full,
//! keys whose bucket has drained are forgotten first (a drained key behaves exactly like a new one, so nothing is
//! lost); if that is not enough, the keys idle the longest are evicted in a batch (what nginx does when its zone is
//! full: it drops the least recently used state), which resets their buckets.

use std::collections::HashMap;
use std::hash::BuildHasher;

// foldhash with a random seed per zone: a few ns per key instead of SipHash's ~20, and the seed keeps clients
// from predicting which keys collide.
use foldhash::fast::RandomState;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::algorithm::{self, Bucket, Params, Verdict};

/// A client key, packed into 128 bits (an IPv4 or IPv6 prefix, or a hash of a header or claim).
pub type Key = u128;

/// Keys per shard: enough shards that two cores rarely contend, few enough that each stays sizeable.
const SHARDS: usize = 64;

/// When a full shard has to evict live keys, it frees this fraction (1/n) at once, so eviction is amortised.
const EVICT_BATCH_DIVISOR: usize = 16;

pub struct Zone {
    pub params: Params,
    /// Picks a key's shard. Separate from the maps' hasher: with one hasher, every key of a shard would share
    /// the low bits that choose its slot in the shard's table, and probes would pile up.
    shard_hasher: RandomState,
    hasher: RandomState,
    shards: Box<[Mutex<HashMap<Key, Bucket, RandomState>>]>,
    per_shard: usize,
    evictions: AtomicU64,
}

impl Zone {
    /// A zone tracking at least `max_keys` keys: each shard's table is allocated for its share, and the share is
    /// then raised to what the table really holds (tables come in powers of two), so no allocated byte is idle.
    pub fn new(params: Params, max_keys: usize) -> Self {
        let asked = max_keys.div_ceil(SHARDS).max(1);
        let hasher = RandomState::default();
        let shards: Box<[_]> =
            (0..SHARDS).map(|_| Mutex::new(HashMap::with_capacity_and_hasher(asked, hasher.clone()))).collect();
        let per_shard = shards[0].lock().map(|m| m.capacity()).unwrap_or(asked).max(asked);
        Self { params, shard_hasher: RandomState::default(), hasher, shards, per_shard, evictions: AtomicU64::new(0) }
    }

    fn shard(&self, key: Key) -> std::sync::MutexGuard<'_, HashMap<Key, Bucket, RandomState>> {
        let i = (self.shard_hasher.hash_one(key) as usize) % SHARDS;
        // A panic while holding a shard lock cannot leave a bucket half-written (plain copies), so carry on.
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// nginx's lookup without accounting: would a request at `now` fit? Charges nothing. (nginx creates an empty
    /// node here with `last = 0`, which its account step then finds fully drained: exactly a key never seen,
    /// which is how it is kept here, by not storing it until [`Zone::charge`].)
    pub fn check(&self, key: Key, now: u64) -> Verdict {
        algorithm::evaluate(self.shard(key).get(&key), now, &self.params)
    }

    /// Lookup with accounting, atomically: charges the request when it fits.
    pub fn check_and_charge(&self, key: Key, now: u64) -> Verdict {
        let mut shard = self.shard(key);
        let verdict = algorithm::evaluate(shard.get(&key), now, &self.params);
        if let Verdict::Pass { excess } = verdict {
            self.store(&mut shard, key, now, excess);
        }
        verdict
    }

    /// Charges a request that an earlier check let through (nginx's account phase for all but the last limit):
    /// the excess is recomputed now and stored without a burst check. Returns it.
    pub fn charge(&self, key: Key, now: u64) -> u64 {
        let mut shard = self.shard(key);
        let excess = match algorithm::evaluate(shard.get(&key), now, &self.params) {
            Verdict::Pass { excess } | Verdict::Reject { excess } => excess,
        };
        self.store(&mut shard, key, now, excess);
        excess
    }

    /// ms until `key` may send again (0 when it may now).
    pub fn retry_after_ms(&self, key: Key, now: u64) -> u64 {
        self.shard(key).get(&key).map_or(0, |b| algorithm::retry_after_ms(b, now, &self.params))
    }

    fn store(&self, shard: &mut HashMap<Key, Bucket, RandomState>, key: Key, now: u64, excess: u64) {
        // A known key is updated in place: one lookup on the common path.
        if let Some(bucket) = shard.get_mut(&key) {
            *bucket = algorithm::charge(Some(bucket), now, excess);
            return;
        }
        if shard.len() >= self.per_shard {
            self.make_room(shard, now);
        }
        shard.insert(key, algorithm::charge(None, now, excess));
    }

    /// Frees room in a full shard: drained keys first, then the longest idle ones in a batch.
    fn make_room(&self, shard: &mut HashMap<Key, Bucket, RandomState>, now: u64) {
        let live = shard.values().filter(|b| !algorithm::is_drained(b, now, &self.params)).count();
        let target = self.per_shard - (self.per_shard / EVICT_BATCH_DIVISOR).max(1);
        if live <= target {
            self.rebuild(shard, |b| !algorithm::is_drained(b, now, &self.params));
            return;
        }
        // Evict the `cut` longest-idle live keys: those whose `last` is at or below the cut-th smallest.
        let mut lasts: Vec<u64> =
            shard.values().filter(|b| !algorithm::is_drained(b, now, &self.params)).map(|b| b.last).collect();
        let cut = live - target;
        let (_, &mut oldest_kept, _) = lasts.select_nth_unstable(cut - 1);
        let mut to_remove = cut;
        self.rebuild(shard, |b| {
            if algorithm::is_drained(b, now, &self.params) {
                return false;
            }
            if to_remove > 0 && b.last <= oldest_kept {
                to_remove -= 1;
                return false;
            }
            true
        });
        self.evictions.fetch_add(cut as u64, Ordering::Relaxed);
    }

    /// Replaces a shard's map by a fresh one holding the buckets that `keep` keeps (no tombstones, same size).
    fn rebuild(&self, shard: &mut HashMap<Key, Bucket, RandomState>, mut keep: impl FnMut(&Bucket) -> bool) {
        let mut fresh = HashMap::with_capacity_and_hasher(self.per_shard, self.hasher.clone());
        fresh.extend(shard.drain().filter(|(_, b)| keep(b)));
        *shard = fresh;
    }

    /// Forgets every drained key (a periodic sweep; like governor's `retain_recent`). Returns how many.
    pub fn sweep(&self, now: u64) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let mut s = s.lock().unwrap_or_else(|e| e.into_inner());
                let before = s.len();
                // Rebuilding allocates a fresh table under the lock: worth it only for a sizeable share. The rest
                // goes when the shard fills up (make_room drops drained keys first).
                let drained = s.values().filter(|b| algorithm::is_drained(b, now, &self.params)).count();
                if drained > 0 && drained >= s.len() / 8 {
                    self.rebuild(&mut s, |b| !algorithm::is_drained(b, now, &self.params));
                }
                before - s.len()
            })
            .sum()
    }

    /// Keys tracked now.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len()).sum()
    }

    /// [`Zone::len`] as a metric value.
    pub fn len_u64(&self) -> u64 {
        self.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Buckets the zone's maps have room for: allocated at creation, and never more.
    pub fn allocated(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).capacity()).sum()
    }

    /// The most keys this zone will ever hold.
    pub fn capacity(&self) -> usize {
        self.per_shard * SHARDS
    }

    /// Live keys evicted because the zone was full, since start.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone(max: usize) -> Zone {
        Zone::new(Params::new(1, 1, 25, Some(0)), max)
    }

    #[test]
    fn keys_are_independent() {
        let z = zone(1000);
        for _ in 0..26 {
            assert!(matches!(z.check_and_charge(1, 0), Verdict::Pass { .. }));
        }
        assert!(matches!(z.check_and_charge(1, 0), Verdict::Reject { .. }));
        assert_eq!(z.check_and_charge(2, 0), Verdict::Pass { excess: 0 });
    }

    #[test]
    fn check_charges_nothing_and_charge_stores() {
        let z = zone(1000);
        z.check_and_charge(7, 0);
        assert_eq!(z.check(7, 0), Verdict::Pass { excess: 1000 });
        assert_eq!(z.check(7, 0), Verdict::Pass { excess: 1000 });
        assert_eq!(z.charge(7, 0), 1000);
        assert_eq!(z.check(7, 0), Verdict::Pass { excess: 2000 });
    }

    #[test]
    fn a_flood_of_a_million_distinct_keys_stays_within_the_bound() {
        let z = zone(160_000);
        let allocated = z.allocated();
        for k in 0..1_000_000u128 {
            // At time 0 no bucket has drained, so the bound holds only by evicting live keys.
            z.check_and_charge(k, 0);
        }
        assert!(z.len() <= z.capacity(), "{} > {}", z.len(), z.capacity());
        assert_eq!(z.allocated(), allocated, "the maps never grew past their first allocation");
        assert_eq!(z.evictions(), 1_000_000 - z.len() as u64, "every key not tracked was evicted, none lost twice");
    }

    #[test]
    fn drained_keys_go_first_and_are_not_counted_as_evictions() {
        let z = zone(SHARDS); // one key per shard
        for k in 0..10_000u128 {
            z.check_and_charge(k, k as u64 * 10_000); // each earlier key has drained by the next one's time
        }
        assert_eq!(z.evictions(), 0);
        assert!(z.len() <= z.capacity());
    }

    #[test]
    fn sweep_forgets_only_drained_keys() {
        let z = zone(1000);
        z.check_and_charge(1, 0);
        z.check_and_charge(1, 0); // excess 1000 at t=0: drained at t=2000
        z.check_and_charge(2, 1500);
        assert_eq!(z.sweep(1999), 0);
        assert_eq!(z.sweep(2000), 1);
        assert_eq!(z.len(), 1);
    }
}
