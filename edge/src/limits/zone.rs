//! A rate-limit zone: one [`Params`] and the buckets of every key it tracks, in memory bounded by `max_keys`.
//!
//! Buckets live in shards (a mutex and a region of one fixed table each, see [`super::table`]) so that two cores
//! rarely wait on each other. Memory is bounded: the table is allocated once for `max_keys` and never grows.
//! When a shard is full, keys whose bucket has drained are forgotten first (a drained key behaves exactly like a
//! new one, so nothing is lost); if that is not enough, the keys idle the longest are evicted in a batch (what
//! nginx does when its zone is full: it drops the least recently used state), which resets their buckets.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

// foldhash with a random seed per zone: a few ns per key instead of SipHash's ~20, and the seed keeps clients
// from predicting which keys collide.
use foldhash::fast::RandomState;

use super::PerLimit;
use super::algorithm::{self, Bucket, Params, Verdict};
use super::table::{Region, SLOT_BYTES, Slab};

pub use super::table::Key;

/// Shards: enough that two cores rarely contend, few enough that each stays sizeable. A power of two: a key's
/// shard is the top bits of its hash, its slot in the shard the bottom bits.
const SHARDS: usize = 64;
const SHARD_BITS: u32 = SHARDS.trailing_zeros();

/// When a full shard has to evict live keys, it frees this fraction (1/n) at once, so eviction is amortised.
const EVICT_BATCH_DIVISOR: usize = 16;

/// A shard's lock on a cache line of its own: two cores working on neighbouring shards do not slow each other.
#[repr(align(64))]
struct Shard(Mutex<Region>);

pub struct Zone {
    pub params: Params,
    hasher: RandomState,
    shards: Box<[Shard]>,
    /// Keys a shard holds at most.
    per_shard: usize,
    evictions: AtomicU64,
    slab: Slab,
}

impl Zone {
    /// A zone tracking at least `max_keys` keys: each shard's region has room for its share at 3/4 load, rounded
    /// up to a power of two, and the share is then raised to what the region holds, so no allocated byte is idle.
    pub fn new(params: Params, max_keys: usize) -> Self {
        let share = max_keys.div_ceil(SHARDS).max(1);
        let region_slots = (share * 4).div_ceil(3).next_power_of_two().max(2);
        // SAFETY: the regions go into `shards`, a field of the same zone as `slab`: they are never used after it.
        let (slab, regions) = unsafe { Slab::new(SHARDS, region_slots) };
        let per_shard = regions[0].max_len();
        let shards = regions.into_iter().map(|r| Shard(Mutex::new(r))).collect();
        Self { params, hasher: RandomState::default(), shards, per_shard, evictions: AtomicU64::new(0), slab }
    }

    /// The key's hash and the index of its shard.
    fn locate(&self, key: Key) -> (u64, usize) {
        let hash = self.hasher.hash_one(key);
        (hash, (hash >> (u64::BITS - SHARD_BITS)) as usize)
    }

    fn lock_shard(&self, i: usize) -> MutexGuard<'_, Region> {
        // A panic while holding a shard lock cannot leave a bucket half-written (plain copies), so carry on.
        self.shards[i].0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The key's hash and its shard, locked.
    fn shard(&self, key: Key) -> (u64, MutexGuard<'_, Region>) {
        let (hash, i) = self.locate(key);
        (hash, self.lock_shard(i))
    }

    /// nginx's lookup without accounting: would a request at `now` fit? Charges nothing. (nginx creates an empty
    /// node here with `last = 0`, which its account step then finds fully drained: exactly a key never seen,
    /// which is how it is kept here, by not storing it until [`Zone::charge`].)
    pub fn check(&self, key: Key, now: u64) -> Verdict {
        let (hash, shard) = self.shard(key);
        self.check_in(&shard, key, hash, now)
    }

    /// Lookup with accounting, atomically: charges the request when it fits.
    pub fn check_and_charge(&self, key: Key, now: u64) -> Verdict {
        let (hash, mut shard) = self.shard(key);
        self.check_and_charge_in(&mut shard, key, hash, now)
    }

    /// Charges a request that an earlier check let through (nginx's account phase for all but the last limit):
    /// the excess is recomputed now and stored without a burst check. Returns it.
    pub fn charge(&self, key: Key, now: u64) -> u64 {
        let (hash, mut shard) = self.shard(key);
        self.charge_in(&mut shard, key, hash, now)
    }

    /// ms until `key` may send again (0 when it may now).
    pub fn retry_after_ms(&self, key: Key, now: u64) -> u64 {
        let (hash, shard) = self.shard(key);
        self.retry_after_ms_in(&shard, key, hash, now)
    }

    fn check_in(&self, shard: &Region, key: Key, hash: u64, now: u64) -> Verdict {
        algorithm::evaluate(shard.get(key, hash).as_ref(), now, &self.params)
    }

    fn check_and_charge_in(&self, shard: &mut Region, key: Key, hash: u64, now: u64) -> Verdict {
        let bucket = shard.get(key, hash);
        let verdict = algorithm::evaluate(bucket.as_ref(), now, &self.params);
        if let Verdict::Pass { excess } = verdict {
            self.store(shard, key, hash, bucket, now, excess);
        }
        verdict
    }

    fn charge_in(&self, shard: &mut Region, key: Key, hash: u64, now: u64) -> u64 {
        let bucket = shard.get(key, hash);
        let excess = match algorithm::evaluate(bucket.as_ref(), now, &self.params) {
            Verdict::Pass { excess } | Verdict::Reject { excess } => excess,
        };
        self.store(shard, key, hash, bucket, now, excess);
        excess
    }

    fn retry_after_ms_in(&self, shard: &Region, key: Key, hash: u64, now: u64) -> u64 {
        shard.get(key, hash).map_or(0, |b| algorithm::retry_after_ms(&b, now, &self.params))
    }

    /// Stores the new state of `key`, whose bucket was `bucket` (`None`: not tracked, so it needs room).
    fn store(&self, shard: &mut Region, key: Key, hash: u64, bucket: Option<Bucket>, now: u64, excess: u64) {
        if bucket.is_none() && shard.len() >= self.per_shard {
            self.make_room(shard, now);
        }
        shard.put(key, hash, algorithm::charge(bucket.as_ref(), now, excess));
    }

    /// Frees room in a full shard: drained keys first, then the longest idle ones in a batch.
    fn make_room(&self, shard: &mut Region, now: u64) {
        let live = shard.buckets().filter(|b| !algorithm::is_drained(b, now, &self.params)).count();
        let target = self.per_shard - (self.per_shard / EVICT_BATCH_DIVISOR).max(1);
        let hash = |k: Key| self.hasher.hash_one(k);
        if live <= target {
            shard.retain(hash, |b| !algorithm::is_drained(b, now, &self.params));
            return;
        }
        // Evict the `cut` longest-idle live keys: those whose `last` is at or below the cut-th smallest.
        let mut lasts: Vec<u64> =
            shard.buckets().filter(|b| !algorithm::is_drained(b, now, &self.params)).map(|b| b.last).collect();
        let cut = live - target;
        let (_, &mut oldest_kept, _) = lasts.select_nth_unstable(cut - 1);
        let mut to_remove = cut;
        shard.retain(hash, |b| {
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

    /// Forgets every drained key (a periodic sweep; like governor's `retain_recent`). Returns how many.
    pub fn sweep(&self, now: u64) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let mut s = s.0.lock().unwrap_or_else(|e| e.into_inner());
                let before = s.len();
                // Most shards of a large zone hold nothing: scanning their slots would be the sweep's whole cost.
                if before == 0 {
                    return 0;
                }
                // Rebuilding a region rewrites all of it under the lock: worth it only for a sizeable share. The
                // rest goes when the shard fills up (make_room drops drained keys first).
                let drained = s.buckets().filter(|b| algorithm::is_drained(b, now, &self.params)).count();
                if drained > 0 && drained >= s.len() / 8 {
                    s.retain(|k| self.hasher.hash_one(k), |b| !algorithm::is_drained(b, now, &self.params));
                }
                before - s.len()
            })
            .sum()
    }

    /// Keys tracked now.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.0.lock().unwrap_or_else(|e| e.into_inner()).len()).sum()
    }

    /// [`Zone::len`] as a metric value.
    pub fn len_u64(&self) -> u64 {
        self.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of bucket memory: allocated at creation, and never more.
    pub fn allocated_bytes(&self) -> usize {
        self.slab.slots() * SLOT_BYTES
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

/// One key in each of several zones, all their shards locked at once: a request's decision over its route's
/// zones is then one step, as in a single nginx worker. Without it, another request of the same client could
/// run between this one's look-up of a zone and its charge, and both would get delays that neither order of
/// the two requests gives (seen: 0.5 s instead of 0 for the first of a burst).
///
/// Shards are locked in one global order (zone address, then shard index), so two decisions that share zones
/// never wait on each other in a cycle; a shard two entries share is locked once.
pub struct Locked<'z> {
    /// Per entry: its zone, key, hash, and which of `guards` holds its shard.
    entries: PerLimit<(&'z Zone, Key, u64, usize)>,
    guards: PerLimit<MutexGuard<'z, Region>>,
}

impl<'z> Locked<'z> {
    /// Locks the shards of `keys` (a zone and a key each), in the order above.
    pub fn new(keys: impl ExactSizeIterator<Item = (&'z Zone, Key)>) -> Self {
        let mut entries: PerLimit<(&'z Zone, Key, u64, usize)> = PerLimit::with_capacity(keys.len());
        let mut shards: PerLimit<(usize, usize, usize)> = PerLimit::with_capacity(keys.len());
        for (i, (zone, key)) in keys.enumerate() {
            let (hash, shard) = zone.locate(key);
            entries.push((zone, key, hash, usize::MAX));
            shards.push((std::ptr::from_ref(zone) as usize, shard, i));
        }
        shards.sort_unstable();
        let mut guards: PerLimit<MutexGuard<'z, Region>> = PerLimit::with_capacity(shards.len());
        let mut previous = None;
        for (zone_addr, shard, i) in shards {
            if previous != Some((zone_addr, shard)) {
                guards.push(entries[i].0.lock_shard(shard));
                previous = Some((zone_addr, shard));
            }
            entries[i].3 = guards.len() - 1;
        }
        Self { entries, guards }
    }

    /// [`Zone::check`] for entry `i`.
    pub fn check(&self, i: usize, now: u64) -> Verdict {
        let (zone, key, hash, g) = self.entries[i];
        zone.check_in(&self.guards[g], key, hash, now)
    }

    /// [`Zone::check_and_charge`] for entry `i`.
    pub fn check_and_charge(&mut self, i: usize, now: u64) -> Verdict {
        let (zone, key, hash, g) = self.entries[i];
        zone.check_and_charge_in(&mut self.guards[g], key, hash, now)
    }

    /// [`Zone::charge`] for entry `i`.
    pub fn charge(&mut self, i: usize, now: u64) -> u64 {
        let (zone, key, hash, g) = self.entries[i];
        zone.charge_in(&mut self.guards[g], key, hash, now)
    }

    /// [`Zone::retry_after_ms`] for entry `i`.
    pub fn retry_after_ms(&self, i: usize, now: u64) -> u64 {
        let (zone, key, hash, g) = self.entries[i];
        zone.retry_after_ms_in(&self.guards[g], key, hash, now)
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
        let allocated = z.allocated_bytes();
        for k in 0..1_000_000u128 {
            // At time 0 no bucket has drained, so the bound holds only by evicting live keys.
            z.check_and_charge(k, 0);
        }
        assert!(z.len() <= z.capacity(), "{} > {}", z.len(), z.capacity());
        assert_eq!(z.allocated_bytes(), allocated, "the table never grew past its first allocation");
        assert!(allocated / z.capacity() <= 64, "{} bytes per key at most", allocated / z.capacity());
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
