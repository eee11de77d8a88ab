//! Decision cost of the rate limiter: one hot key, and keys spread over 1M, on 1 and 2 threads.
//! Memory per tracked key is printed once (measured from the process's resident set).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

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
        for (name, spread) in [("one_key", 1u128), ("1M_keys", 1_000_000u128)] {
            let zone = Arc::new(Zone::new(nginx_default(), 1_000_000));
            let clock = Arc::new(AtomicU64::new(0));
            g.bench_with_input(BenchmarkId::new(name, threads), &threads, |b, &threads| {
                b.iter_custom(|iters| {
                    let per_thread = iters / threads as u64;
                    let start = std::time::Instant::now();
                    std::thread::scope(|s| {
                        for t in 0..threads {
                            let zone = zone.clone();
                            let clock = clock.clone();
                            s.spawn(move || {
                                let mut key = t as u128 * 7919;
                                for _ in 0..per_thread {
                                    key = (key * 6364136223846793005 + 1442695040888963407) % spread;
                                    let now = clock.fetch_add(1, Ordering::Relaxed) / 1000;
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
    g.finish();
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()))
        .map_or(0, |pages| pages * 4096)
}

fn memory_per_key(_c: &mut Criterion) {
    let keys = 1_000_000usize;
    let before = rss_bytes();
    let zone = Zone::new(nginx_default(), keys);
    for k in 0..keys as u128 {
        zone.check_and_charge(k, 0);
    }
    let after = rss_bytes();
    println!(
        "memory: {} keys tracked, {:.1} bytes per key (resident set growth)",
        zone.len(),
        (after - before) as f64 / zone.len() as f64
    );
}

criterion_group!(benches, decisions, memory_per_key);
criterion_main!(benches);
