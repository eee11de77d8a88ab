//! Benchmark of the gateway, direct (no edge), against a real Tansu with the validate and persist jobs running:
//!
//! 1. the broker's produce ceiling: a plain librdkafka producer with the gateway's settings (idempotent,
//!    `acks=all`, `linger.ms=5`) and the same command payload and headers, `CONNECTIONS` concurrent senders that
//!    each wait for the acknowledgement before sending again (what the gateway does per request);
//! 2. `POST /v1/orders/async` with wrk at `CONNECTIONS` connections;
//! 3. `POST /v1/orders` (sync: through Kafka, the validate job and back) with one connection (unloaded) and with
//!    `CONNECTIONS`.
//!
//! Rounds alternate 1 and 2 (`ROUNDS`, default 3) and the medians are compared: target async >= 0.8x the ceiling,
//! sync p99 unloaded < 50 ms. CPU seconds of the gateway, Tansu and the workers per 1,000 requests come from /proc.
//! With `PROFILE=1` (default when `perf` exists) the last async round is sampled with `perf record` and the
//! hottest symbols are printed.
//!
//! `BENCH_GATEWAY_LOG=warn` runs the gateway without its per-order log line.
//!
//! `loadtest/gateway-bench [SECONDS per run]` builds the release binaries and runs this. Loopback only; stops
//! by itself.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use order_contract::{ORDER_CREATE, OrderCommand, headers, topics};
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use testkit::kafka::valid_order;
use testkit::{Stack, StackOptions};

/// One measured run.
#[derive(Debug, Clone, Default)]
struct Run {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    /// CPU seconds per 1,000 requests: gateway, Tansu, workers.
    cpu: [f64; 3],
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let secs: u64 = std::env::args().nth(1).map(|a| a.parse()).transpose()?.unwrap_or(10);
    let rounds: usize = env_or("ROUNDS", 3);
    let conns: usize = env_or("CONNECTIONS", 64);
    let profile = std::env::var("PROFILE").map(|v| v == "1").unwrap_or_else(|_| which("perf"));
    anyhow::ensure!(which("wrk"), "wrk is missing: apt-get install wrk");

    let work = tempfile::Builder::new().prefix("gateway-bench-").tempdir()?;
    let body = serde_json::to_string(&valid_order("bench", 1))?;
    println!(
        "gateway benchmark: {rounds} rounds of {secs} s, {conns} connections, body {} bytes, release binaries from {}",
        body.len(),
        std::env::var("E2E_BIN_DIR").unwrap_or_else(|_| "target/debug".into())
    );
    // Every run gets a fresh stack: Tansu's memory store gets slower as it holds more (its CPU per message
    // roughly doubled over three runs on one broker), which would favour whichever run came first.
    let (mut ceiling, mut asynchronous) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let b = Fresh::start(work.path(), &body).await?;
        let pids = [Some(std::process::id()), b.pids[1], b.pids[2]];
        let c = produce_ceiling(&b.stack.tansu.brokers(), conns, secs, pids).await?;
        println!("round {round} ceiling: {c:?}");
        ceiling.push(c);
        drop(b);

        let b = Fresh::start(work.path(), &body).await?;
        wrk(&b.script, &b.url("/v1/orders/async"), 2, conns, 2, b.pids)?; // warm-up
        let perf = (profile && round == rounds).then(|| start_perf(b.pids[0], secs, work.path())).transpose()?;
        let a = wrk(&b.script, &b.url("/v1/orders/async"), 2, conns, secs, b.pids)?;
        println!("round {round} async:   {a:?}");
        asynchronous.push(a);
        if let Some(p) = perf {
            report_perf(p, work.path())?;
        }
    }
    let b = Fresh::start(work.path(), &body).await?;
    wrk(&b.script, &b.url("/v1/orders"), 1, 1, 2, b.pids)?; // warm-up
    let sync_one = wrk(&b.script, &b.url("/v1/orders"), 1, 1, secs, b.pids)?;
    println!("sync, 1 connection:  {sync_one:?}");
    drop(b);
    let b = Fresh::start(work.path(), &body).await?;
    wrk(&b.script, &b.url("/v1/orders"), 1, 1, 2, b.pids)?; // warm-up
    let sync_many = wrk(&b.script, &b.url("/v1/orders"), 2, conns, secs, b.pids)?;
    println!("sync, {conns} connections: {sync_many:?}");
    drop(b);

    let (c, a) = (median(&ceiling), median(&asynchronous));
    println!();
    println!(
        "| run | req/s | p50 ms | p99 ms | errors | CPU s per 1k requests: producer (gateway or client) / tansu / workers |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | --- |");
    for (name, r) in [
        ("produce ceiling (librdkafka, median)", &c),
        ("POST /v1/orders/async (median)", &a),
        ("POST /v1/orders, 1 connection", &sync_one),
        ("POST /v1/orders, many connections", &sync_many),
    ] {
        println!(
            "| {name} | {:.0} | {:.2} | {:.2} | {} | {:.3} / {:.3} / {:.3} |",
            r.rps, r.p50_ms, r.p99_ms, r.errors, r.cpu[0], r.cpu[1], r.cpu[2]
        );
    }
    println!();
    println!("async / ceiling = {:.2} (target >= 0.8)", a.rps / c.rps);
    println!("sync p99 unloaded = {:.1} ms (target < 50 ms)", sync_one.p99_ms);
    Ok(())
}

/// A stack of its own for one run: PostgreSQL, Tansu, the jobs and the gateway, and a wrk script with a token
/// it accepts.
struct Fresh {
    stack: Stack,
    script: std::path::PathBuf,
    /// gateway, Tansu, workers
    pids: [Option<u32>; 3],
}

impl Fresh {
    async fn start(dir: &Path, body: &str) -> anyhow::Result<Self> {
        // The tests make every producer send one record per batch (Tansu's memory store, see testkit); a
        // benchmark of the gateway must batch as it does in production.
        let gw = |k: &str, v: &str| ("gateway", k.to_owned(), v.to_owned());
        // BENCH_GATEWAY_LOG (default info: one line per accepted order, as in production) sets the gateway's RUST_LOG.
        let log = std::env::var("BENCH_GATEWAY_LOG").unwrap_or_else(|_| "info".into());
        let stack = Stack::start(StackOptions {
            edge: false,
            env: vec![gw("GATEWAY_KAFKA__PROPERTIES__BATCH_NUM_MESSAGES", "10000"), gw("RUST_LOG", &log)],
            ..StackOptions::default()
        })
        .await?;
        let script = dir.join("post.lua");
        std::fs::write(
            &script,
            format!(
                "wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\n\
                 wrk.headers[\"Authorization\"] = \"Bearer {}\"\nwrk.body = [[{body}]]\n",
                stack.token()
            ),
        )?;
        let pids = [
            stack.gateway.as_ref().and_then(|s| s.pid()),
            stack.tansu.pid(),
            stack.workers.as_ref().and_then(|s| s.pid()),
        ];
        Ok(Self { stack, script, pids })
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.stack.ports.gateway)
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn which(program: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {program}")]).output().is_ok_and(|o| o.status.success())
}

fn cpu_snapshot(pids: [Option<u32>; 3]) -> [f64; 3] {
    pids.map(testkit::cpu_seconds)
}

fn per_thousand(before: [f64; 3], after: [f64; 3], requests: f64) -> [f64; 3] {
    let mut out = [0.0; 3];
    for i in 0..3 {
        out[i] = if requests > 0.0 { (after[i] - before[i]) * 1000.0 / requests } else { 0.0 };
    }
    out
}

/// Runs wrk and reads its summary.
fn wrk(
    script: &Path,
    url: &str,
    threads: usize,
    conns: usize,
    secs: u64,
    pids: [Option<u32>; 3],
) -> anyhow::Result<Run> {
    let before = cpu_snapshot(pids);
    let out = Command::new("wrk")
        .args(["-t", &threads.to_string(), "-c", &conns.to_string(), "-d", &format!("{secs}s"), "--latency", "-s"])
        .arg(script)
        .arg(url)
        .output()?;
    let after = cpu_snapshot(pids);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(out.status.success(), "wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    let field = |prefix: &str| text.lines().find_map(|l| l.trim().strip_prefix(prefix).map(|v| v.trim().to_owned()));
    let rps: f64 = field("Requests/sec:").and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let total: f64 = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let errors = field("Non-2xx or 3xx responses:").and_then(|v| v.parse().ok()).unwrap_or(0)
        + field("Socket errors:")
            .map(|v| v.split(',').filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok()).sum())
            .unwrap_or(0);
    Ok(Run {
        rps,
        p50_ms: field("50%").map(|v| millis(&v)).unwrap_or(f64::NAN),
        p99_ms: field("99%").map(|v| millis(&v)).unwrap_or(f64::NAN),
        errors,
        cpu: per_thousand(before, after, total),
    })
}

/// wrk's latency with its unit (`850.00us`, `1.23ms`, `2.00s`) in milliseconds.
fn millis(v: &str) -> f64 {
    let (num, factor) = if let Some(n) = v.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000.0)
    } else {
        (v, f64::NAN)
    };
    num.parse::<f64>().map(|n| n * factor).unwrap_or(f64::NAN)
}

/// `conns` senders, each sending one command like the gateway's and waiting for the acknowledgement, for `secs`.
async fn produce_ceiling(brokers: &str, conns: usize, secs: u64, pids: [Option<u32>; 3]) -> anyhow::Result<Run> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("client.id", "ceiling")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "10000")
        .create()?;
    // Connect and learn the partitions before the clock starts, as the gateway had.
    let warm = OrderCommand::new(valid_order("bench-ceiling", 0));
    send(&producer, &warm).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let before = cpu_snapshot(pids);
    let started = Instant::now();
    let tasks: Vec<_> = (0..conns)
        .map(|i| {
            let (producer, stop) = (producer.clone(), stop.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut errors = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let command = OrderCommand::new(valid_order("bench-ceiling", i));
                    let t = Instant::now();
                    match send(&producer, &command).await {
                        Ok(()) => latencies.push(t.elapsed()),
                        Err(_) => errors += 1,
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        latencies.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let after = cpu_snapshot(pids);
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(f64::NAN)
    };
    let n = latencies.len() as f64;
    Ok(Run { rps: n / elapsed, p50_ms: pct(0.5), p99_ms: pct(0.99), errors, cpu: per_thousand(before, after, n) })
}

/// What the gateway sends: the command keyed by order id, with its headers.
async fn send(producer: &FutureProducer, command: &OrderCommand) -> anyhow::Result<()> {
    let payload = serde_json::to_vec(command)?;
    let key = command.order_id.to_string();
    let traceparent =
        format!("00-{}-{}-01", uuid::Uuid::new_v4().simple(), &uuid::Uuid::new_v4().simple().to_string()[..16]);
    let hdrs = OwnedHeaders::new()
        .insert(Header { key: headers::EVENT_TYPE, value: Some(ORDER_CREATE) })
        .insert(Header { key: headers::SCHEMA_VERSION, value: Some("1") })
        .insert(Header { key: headers::TRACEPARENT, value: Some(traceparent.as_str()) });
    producer
        .send(FutureRecord::to(topics::COMMANDS).key(&key).payload(&payload).headers(hdrs), Duration::from_secs(10))
        .await
        .map_err(|(e, _)| anyhow::anyhow!("delivery: {e}"))?;
    Ok(())
}

fn start_perf(pid: Option<u32>, secs: u64, dir: &Path) -> anyhow::Result<std::process::Child> {
    let pid = pid.ok_or_else(|| anyhow::anyhow!("no gateway pid"))?;
    Ok(Command::new("perf")
        .args(["record", "-F", "499", "-g", "-o"])
        .arg(dir.join("perf.data"))
        .args(["-p", &pid.to_string(), "--", "sleep", &secs.saturating_sub(2).max(1).to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?)
}

fn report_perf(mut perf: std::process::Child, dir: &Path) -> anyhow::Result<()> {
    perf.wait()?;
    let data = dir.join("perf.data");
    let views: [(&str, &[&str]); 3] = [
        ("by library (self time)", &["--no-children", "--sort", "dso", "--percent-limit", "1.5"]),
        ("by function (self time)", &["--no-children", "--sort", "sym", "--percent-limit", "1.5"]),
        ("by function including callees", &["--children", "--sort", "sym", "--percent-limit", "4"]),
    ];
    for (title, args) in views {
        let out =
            Command::new("perf").args(["report", "--stdio", "-g", "none"]).args(args).arg("-i").arg(&data).output()?;
        println!("--- perf: gateway CPU {title} (last async round) ---");
        for line in String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .take(30)
        {
            println!("{line}");
        }
    }
    Ok(())
}

fn median(runs: &[Run]) -> Run {
    let mut sorted = runs.to_vec();
    sorted.sort_by(|a, b| a.rps.total_cmp(&b.rps));
    sorted.get(sorted.len() / 2).cloned().unwrap_or_default()
}
