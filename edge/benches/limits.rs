//! Decision cost of the rate limiter: one hot key, and keys spread over 1M, on 1 and 2 threads; one key through
//! two zones.
//! Memory per tracked key is printed once (measured from the process's resident set).

use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use edge::limits::algorithm::Params;
use edge::limits::{Limit, Zone, decide};

fn nginx_default() -> Params {
    Params::new(1, 1, 25, Some(0))
}

fn decisions(c: &mut Criterion) {
    let mut g = c.benchmark_group("decide");
    g.throughput(Throughput::Elements(1));
    for threads in [1usize, 2] {
        for (name, spread) in [("one_key", 1u64), ("1M_keys", 1_000_000u64)] {
            let zone = Arc::new(Zone::new(nginx_default(), 1_000_000));
            g.bench_with_input(BenchmarkId::new(name, threads), &threads, |b, &threads| {
                b.iter_custom(|iters| {
                    let per_thread = iters / threads as u64;
                    let start = std::time::Instant::now();
                    std::thread::scope(|s| {
                        for t in 0..threads {
                            let zone = zone.clone();
                            s.spawn(move || {
                                // A cheap walk over `spread` keys (an LCG), so the measurement is the limiter's.
                                let mut state = t as u64 * 7919 + 1;
                                // Each thread keeps its own clock (1 ms per 1000 decisions): a shared atomic
                                // would measure cache-line ping-pong, not the limiter.
                                for i in 0..per_thread {
                                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                                    let key = u128::from((state >> 16) % spread);
                                    let now = i / 1000;
                                    std::hint::black_box(decide(&[Limit { zone: &zone, key, dry_run: false }], now));
                                }
                            });
                        }
                    });
                    start.elapsed()
                })
            });
        }
    }
    // Two zones on one route: both shards are locked together for the decision (`limits::Locked`).
    let (a, b) = (Zone::new(nginx_default(), 1_000_000), Zone::new(Params::new(10, 1, 50, Some(0)), 1_000_000));
    g.bench_function(BenchmarkId::new("two_zones_one_key", 1), |bench| {
        let mut i = 0u64;
        bench.iter(|| {
            i += 1;
            let limits = [Limit { zone: &a, key: 7, dry_run: false }, Limit { zone: &b, key: 7, dry_run: false }];
            std::hint::black_box(decide(&limits, i / 1000))
        })
    });
    g.finish();
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()))
        .map_or(0, |pages| pages * 4096)
}

fn memory_per_key(_c: &mut Criterion) {
    let before = rss_bytes();
    let zone = Zone::new(nginx_default(), 1_000_000);
    println!(
        "memory: an empty zone for 1M keys: {:.1} MiB resident of {:.1} MiB allocated",
        (rss_bytes() - before) as f64 / f64::from(1 << 20),
        zone.allocated_bytes() as f64 / f64::from(1 << 20)
    );
    // Fill the zone to what it holds (its tables are sized up to a power of two).
    for k in 0..zone.capacity() as u128 {
        zone.check_and_charge(k, 0);
    }
    let after = rss_bytes();
    println!(
        "memory: {} keys tracked, {:.1} bytes per key (resident set growth)",
        zone.len(),
        (after - before) as f64 / zone.len() as f64
    );
}

// Memory first, in a fresh process: once other benchmarks have freed their zones, the allocator reuses that
// memory and the resident set no longer grows.
criterion_group!(benches, memory_per_key, decisions);
criterion_main!(benches);
