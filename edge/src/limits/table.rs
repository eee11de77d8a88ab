//! The memory behind a zone's buckets: one allocation of fixed-size slots, split into regions that each shard
//! owns (an open-addressing table with linear probing).
//!
//! Why not a `HashMap` per shard: a decision on a key that is not in the CPU's caches costs what its memory
//! accesses cost. A SwissTable reads its control bytes and then its entry (two cache misses), and 64 small maps
//! cannot be backed by huge pages, so with a million keys every lookup also missed the TLB. Here a key and its
//! bucket share one 32-byte slot (two per cache line, never straddling one), the probe usually ends in that line,
//! and the whole zone is one allocation, advised to the kernel as huge pages when it is large (`MADV_HUGEPAGE`;
//! honoured where transparent huge pages are `always` or `madvise`, Debian's and Ubuntu's default) and as small
//! pages otherwise (see [`HUGE_PAGES_FROM`]). The table never grows: its size is fixed at creation and removals
//! rebuild a region in place, so there are no tombstones either.

use std::alloc::Layout;
use std::mem::size_of;

use super::algorithm::Bucket;

/// A client key, packed into 128 bits (an IPv4 or IPv6 prefix, or a hash of a header or claim).
pub type Key = u128;

/// A key and its bucket, with `last` stored plus one so that a slot of zero bytes is free: the table can come
/// from zeroed memory that the kernel provides on first touch, and a zone costs resident memory only where keys
/// landed.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(32))]
struct Slot {
    key: Key,
    excess: u64,
    /// `last + 1`; 0 marks a free slot (no clock reaches `u64::MAX` ms).
    stamp: u64,
}

impl Slot {
    const FREE: Slot = Slot { key: 0, excess: 0, stamp: 0 };

    fn new(key: Key, b: Bucket) -> Self {
        Slot { key, excess: b.excess, stamp: b.last.saturating_add(1) }
    }

    fn is_free(&self) -> bool {
        self.stamp == 0
    }

    fn bucket(&self) -> Bucket {
        Bucket { excess: self.excess, last: self.stamp - 1 }
    }
}

/// Bytes per slot (for sizing and the memory figures).
pub const SLOT_BYTES: usize = size_of::<Slot>();

/// Slots start on a cache line, so that none straddles two.
const LINE: usize = 64;

/// The zone's slots. Owns the allocation; [`Region`]s point into disjoint parts of it.
pub struct Slab {
    alloc: *mut u8,
    layout: Layout,
    slots: usize,
}

// The slab only frees its allocation; every access goes through a region, each owned by one shard's mutex.
unsafe impl Send for Slab {}
unsafe impl Sync for Slab {}

impl Slab {
    /// `regions` regions of `region_slots` slots each (a power of two, at least 2); returns the slab and its
    /// regions.
    ///
    /// # Safety
    /// The regions point into the slab's memory: none may be used after the slab is dropped (keep them together,
    /// as [`super::zone::Zone`] does).
    pub unsafe fn new(regions: usize, region_slots: usize) -> (Self, Vec<Region>) {
        assert!(
            region_slots.is_power_of_two() && region_slots >= 2,
            "region size {region_slots} is not a power of two of at least 2"
        );
        let total = regions * region_slots;
        let bytes = total * SLOT_BYTES;
        // Zeroed memory with the allocator's ordinary alignment: for a large table that is a fresh mapping the
        // allocator does not write to (an alignment over 16 would make it memset the whole table at once). The
        // slots start at the first cache line inside it.
        let layout = match Layout::from_size_align(bytes + LINE, 16) {
            Ok(l) => l,
            Err(e) => panic!("a zone of {total} slots does not fit in memory: {e}"),
        };
        // SAFETY: the layout's size is not zero (LINE bytes at least).
        let alloc = unsafe { std::alloc::alloc_zeroed(layout) };
        if alloc.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        // SAFETY: the offset is below LINE, so `base..base + bytes` lies inside the allocation.
        let base: *mut Slot = unsafe { alloc.add(alloc.align_offset(LINE)) }.cast();
        // Advised before the first touch, so that pages are huge from their first fault: only a table that small
        // pages would spread beyond the TLB's reach; a smaller one is kept on small pages even where the kernel
        // would otherwise use huge pages everywhere (`always`).
        advise_pages(base.cast(), bytes, bytes >= HUGE_PAGES_FROM);
        let regions = (0..regions)
            // SAFETY: `i * region_slots + region_slots <= total`: each region is in bounds and disjoint from the
            // others. Zeroed slots are valid (integers) and free.
            .map(|i| Region { slots: unsafe { base.add(i * region_slots) }, mask: region_slots - 1, len: 0 })
            .collect();
        (Self { alloc, layout, slots: total }, regions)
    }

    /// Slots allocated (never changes).
    pub fn slots(&self) -> usize {
        self.slots
    }
}

impl Drop for Slab {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once. The regions pointing into it are fields of the
        // same zone and are not used after it is dropped (the zone owns both and drops them together).
        unsafe { std::alloc::dealloc(self.alloc, self.layout) };
    }
}

/// Tables of this many bytes or more are advised as huge pages. A CPU's second-level TLB maps 6-8 MiB of 4 KiB
/// pages (1,536-2,048 entries): a smaller table (the default zone, 160,000 keys, is 8 MiB) gains little from huge
/// pages, and its keys, spread by the hash, each fault a whole 2 MiB page in: one client made 2 MiB of the default
/// zone resident and a handful all 8 MiB, where 4 KiB pages hold a few KiB per client. From 16 MiB on (`max_keys`
/// above 196,608) small pages would miss the TLB on most decisions, and a zone that large is sized to be full.
const HUGE_PAGES_FROM: usize = 16 << 20;

/// Advises the whole 2 MiB-aligned pages inside `ptr..ptr + len` as huge pages, or as never huge.
#[cfg(target_os = "linux")]
fn advise_pages(ptr: *mut u8, len: usize, huge: bool) {
    const HUGE: usize = 2 << 20;
    let start = (ptr as usize).next_multiple_of(HUGE);
    let end = (ptr as usize + len) / HUGE * HUGE;
    if end > start {
        let advice = if huge { libc::MADV_HUGEPAGE } else { libc::MADV_NOHUGEPAGE };
        // SAFETY: the range lies inside an allocation of ours; the advice changes how it is backed, not its
        // contents. A refusal (a kernel without transparent huge pages) leaves ordinary pages: nothing to handle.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, advice) };
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_pages(_ptr: *mut u8, _len: usize, _huge: bool) {}

/// One shard's part of the slab: an open-addressing table of `mask + 1` slots with linear probing.
pub struct Region {
    slots: *mut Slot,
    mask: usize,
    len: usize,
}

// SAFETY: a region is the only pointer into its slots; whoever owns the region (a shard's mutex) owns them.
unsafe impl Send for Region {}

impl Region {
    fn slots(&self) -> &[Slot] {
        // SAFETY: `slots..slots + mask + 1` is this region's part of a live slab (see `Slab::new`), and `&self`
        // keeps it from being written meanwhile.
        unsafe { std::slice::from_raw_parts(self.slots, self.mask + 1) }
    }

    fn slots_mut(&mut self) -> &mut [Slot] {
        // SAFETY: as in `slots`; `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.slots, self.mask + 1) }
    }

    /// Where `key` is, or the free slot where it would go.
    fn find(&self, key: Key, hash: u64) -> Result<usize, usize> {
        let slots = self.slots();
        let mut i = hash as usize & self.mask;
        // A region is never full (at most 3/4 of its slots are used), so the walk ends at a free slot.
        loop {
            let s = &slots[i];
            if s.is_free() {
                return Err(i);
            }
            if s.key == key {
                return Ok(i);
            }
            i = (i + 1) & self.mask;
        }
    }

    pub fn get(&self, key: Key, hash: u64) -> Option<Bucket> {
        self.find(key, hash).ok().map(|i| self.slots()[i].bucket())
    }

    /// Stores `key`'s bucket; a key not yet present takes a free slot, and the caller keeps `len` below
    /// [`Region::max_len`] for it.
    pub fn put(&mut self, key: Key, hash: u64, bucket: Bucket) {
        match self.find(key, hash) {
            Ok(i) => self.slots_mut()[i] = Slot::new(key, bucket),
            Err(i) => {
                // A full region would make `find` walk forever: the callers make room first, and this holds them
                // to it (one comparison).
                assert!(self.len < self.max_len(), "region over its load limit");
                self.slots_mut()[i] = Slot::new(key, bucket);
                self.len += 1;
            }
        }
    }

    /// Keys the region holds at most: 3/4 of its slots, so that probes stay short.
    pub fn max_len(&self) -> usize {
        ((self.mask + 1) * 3 / 4).max(1)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn buckets(&self) -> impl Iterator<Item = Bucket> {
        self.slots().iter().filter(|s| !s.is_free()).map(Slot::bucket)
    }

    /// Keeps the buckets that `keep` keeps, laid out again from scratch (linear probing cannot just free a slot:
    /// keys behind it would be lost to lookups).
    pub fn retain(&mut self, hash: impl Fn(Key) -> u64, mut keep: impl FnMut(&Bucket) -> bool) {
        let kept: Vec<Slot> = self.slots().iter().filter(|s| !s.is_free() && keep(&s.bucket())).copied().collect();
        self.slots_mut().fill(Slot::FREE);
        self.len = 0;
        for s in kept {
            self.put(s.key, hash(s.key), s.bucket());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(n: u64) -> Bucket {
        Bucket { excess: n, last: n }
    }

    /// The `VmFlags` of this process's mappings that overlap the slab's memory (`hg`: advised as huge pages,
    /// `nh`: as never huge).
    #[cfg(target_os = "linux")]
    fn vm_flags(slab: &Slab) -> Vec<String> {
        let (start, end) = (slab.alloc as usize, slab.alloc as usize + slab.layout.size());
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("/proc/self/smaps");
        let mut inside = false;
        let mut flags = Vec::new();
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or_default();
            if let Some((lo, hi)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
                let (lo, hi) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16));
                inside = matches!((lo, hi), (Ok(lo), Ok(hi)) if lo < end && start < hi);
            } else if inside && first == "VmFlags:" {
                flags.push(line.trim_start_matches("VmFlags:").trim().to_owned());
            }
        }
        flags
    }

    #[cfg(target_os = "linux")]
    fn has_flag(flags: &[String], flag: &str) -> bool {
        flags.iter().any(|f| f.split_whitespace().any(|w| w == flag))
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn only_a_large_table_is_advised_as_huge_pages() {
        // The default zone: 64 regions of 4,096 slots, 8 MiB; and the smallest table advised as huge, 16 MiB.
        // SAFETY: the regions are dropped before their slab, at the end of the test.
        let (small, _small_regions) = unsafe { Slab::new(64, 4096) };
        let (large, _large_regions) = unsafe { Slab::new(64, 8192) };
        assert!(small.slots() * SLOT_BYTES < HUGE_PAGES_FROM && large.slots() * SLOT_BYTES >= HUGE_PAGES_FROM);
        let (small_flags, large_flags) = (vm_flags(&small), vm_flags(&large));
        assert!(!has_flag(&small_flags, "hg"), "an 8 MiB table is not advised as huge pages: {small_flags:?}");
        assert!(!has_flag(&large_flags, "nh"), "a 16 MiB table is not kept off huge pages: {large_flags:?}");
        // A kernel built without transparent huge pages refuses both advices and shows neither flag.
        if std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
            assert!(has_flag(&small_flags, "nh"), "an 8 MiB table is kept on small pages: {small_flags:?}");
            assert!(has_flag(&large_flags, "hg"), "a 16 MiB table is advised as huge pages: {large_flags:?}");
        }
    }

    #[test]
    fn slots_are_half_a_cache_line() {
        assert_eq!(SLOT_BYTES, 32);
        assert_eq!(std::mem::align_of::<Slot>(), 32);
    }

    #[test]
    fn colliding_keys_probe_past_each_other_and_survive_a_retain() {
        // SAFETY: the regions are dropped before `_slab`, at the end of the test (reverse order of declaration).
        let (_slab, mut regions) = unsafe { Slab::new(2, 8) };
        let r = &mut regions[1];
        // Every key hashes to slot 7: they wrap around the region's end.
        for k in 0..6u128 {
            r.put(k, 7, bucket(k as u64));
        }
        r.put(0, 7, bucket(0)); // present: updated, not added
        assert_eq!(r.get(0, 7), Some(bucket(0)), "a bucket at time 0 is not a free slot");
        assert_eq!(r.len(), 6);
        assert_eq!(r.max_len(), 6);
        for k in 0..6u128 {
            assert_eq!(r.get(k, 7), Some(bucket(k as u64)));
        }
        assert_eq!(r.get(99, 7), None);
        r.put(3, 7, Bucket { excess: 1000, last: 3 });
        // Dropping the first keys of the chain must not hide the ones behind them.
        r.retain(|_| 7, |b| b.last >= 2);
        assert_eq!(r.len(), 4);
        assert_eq!(r.get(0, 7), None);
        assert_eq!(r.get(3, 7), Some(Bucket { excess: 1000, last: 3 }));
        assert_eq!(r.get(5, 7), Some(bucket(5)));
        // The other region was never touched.
        assert_eq!(regions[0].buckets().count(), 0);
    }
}
