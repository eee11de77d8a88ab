//! Test support: real PostgreSQL, a real Kafka-protocol broker (Tansu) and our real binaries, each started on
//! free loopback ports in a temporary directory, so tests run in parallel and never touch a developer's stack.
//!
//! Everything started here is stopped when its handle drops (PostgreSQL with `pg_ctl stop`, processes by PID).
//! On a failing test, the logs of the processes are printed.

pub mod burst;
pub mod certs;
pub mod echo;
pub mod idp;
pub mod kafka;
mod nginx;
pub mod otlp;
mod postgres;
mod process;
mod stack;
mod tansu;

pub use nginx::Nginx;
pub use postgres::{Postgres, Stored};
pub use process::{Service, bin_path, cpu_seconds, tree_cpu_seconds, with_descendants};
pub use stack::{AUDIENCE, ISSUER, Stack, StackOptions, https_client_trusting, wait_admin_ready};
pub use tansu::{ONE_RECORD_PER_BATCH, Tansu};

use std::net::TcpListener;
use std::time::{Duration, Instant};

/// A loopback port that was free a moment ago, never handed out before by this process.
///
/// Taken below Linux's ephemeral range (32768-60999): a port the kernel picked with `bind(0)` is released
/// here and bound again later by a service, and meanwhile any outgoing connection (a health check, a broker
/// client) may be given the same number as its local port, which then fails the service's bind (seen in CI:
/// a gateway that could not bind its admin port, and another process answering there). Each test process
/// starts at its own offset and walks the range.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7_919) % SPAN,
        Ordering::AcqRel,
        Ordering::Acquire,
    );
    for _ in 0..SPAN {
        let port = (FIRST + NEXT.fetch_add(1, Ordering::AcqRel) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

/// The value of the sample of metric `name` whose labels include every `label="value"` in `labels`, from
/// Prometheus text; 0 when there is none.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Waits until something listens on loopback `port`.
pub async fn wait_listening(port: u16, timeout: Duration, what: &str) -> anyhow::Result<()> {
    eventually(
        timeout,
        what,
        || async move { tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok().map(|_| ()) },
    )
    .await
}

/// Polls `check` every 100 ms until it returns `Some` or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
