//! Cost of one access-log line, written as the edge writes one per request: the line of a proxied request as
//! the edge benchmark makes them (`loadtest/edge_bench.py`: wrk's GET /, a rate-limit decision, an upstream), and
//! one with every optional field absent.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use edge::access_log::{Line, write_line};
use opentelemetry::trace::TraceId;

fn proxied() -> Line<'static> {
    Line {
        client: Some(std::net::IpAddr::from([127, 0, 0, 1])),
        method: "GET",
        path: "/",
        protocol: "HTTP/1.1",
        status: 200,
        bytes: 221,
        upstream: Some("127.0.0.1:38121"),
        upstream_ms: Some(0.412),
        total_ms: 0.655,
        tries: 1,
        rate_limit: Some("immediate"),
        rate_limit_delay_ms: 0,
        request_id: "0b6f2c1e-5d0a-4c3b-9e61-7f2d8a4b3c19",
        trace_id: TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").ok(),
        user_agent: None,
    }
}

fn lines(c: &mut Criterion) {
    let mut g = c.benchmark_group("access_line");
    g.throughput(Throughput::Elements(1));
    let proxied = proxied();
    let bare = Line {
        client: None,
        upstream: None,
        upstream_ms: None,
        rate_limit: None,
        trace_id: None,
        user_agent: None,
        ..proxied
    };
    for (name, line) in [("proxied", &proxied), ("no_optional_fields", &bare)] {
        let mut out = Vec::with_capacity(64 * 1024);
        // A second that moves on now and then, as it does under load (the seconds are formatted once per second).
        let mut now = std::time::Duration::new(1_795_701_316, 0);
        g.bench_function(name, |b| {
            b.iter(|| {
                now += std::time::Duration::from_micros(25);
                if out.len() > 60 * 1024 {
                    out.clear();
                }
                write_line(&mut out, std::hint::black_box(line), now);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, lines);
criterion_main!(benches);
