//! One scenario run: the stack (PostgreSQL, Tansu, workers, gateway, edge, started by testkit on free loopback
//! ports so that the run may break them), a scraper writing the services' metrics, the broker's consumer lag
//! and the stored order count to `metrics.jsonl` every second, the phases, and the summary the report is made of.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use serde::Serialize;
use testkit::{Stack, StackOptions};

use crate::wrk::{self, Load, Summary};

/// Metric families kept from each scrape (what the report plots).
const FAMILIES: &[&str] = &[
    "http_server_request_duration_seconds",
    "edge_ratelimit_decisions_total",
    "worker_retries_total",
    "db_client_operation_duration_seconds",
];

/// The jobs' consumer groups and the topics they read.
const GROUPS: &[(&str, &str, &str)] =
    &[("validate", "orders.validate", "orders.commands"), ("persist", "orders.persist", "orders.validated")];

#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub name: String,
    pub start: f64,
    pub end: f64,
    pub action: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub phase: String,
    pub name: String,
    pub requests: u64,
    pub rps: f64,
    pub latency_ms: serde_json::Value,
    pub statuses: std::collections::BTreeMap<String, u64>,
    pub errors: wrk::SocketErrors,
}

#[derive(Debug, Clone, Serialize)]
pub struct Invariant {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// One sample of the broker-side lag per job.
#[derive(Debug, Clone, Copy, Default)]
pub struct LagSample {
    pub t: f64,
    pub validate: Option<i64>,
    pub persist: Option<i64>,
}

pub struct Harness {
    pub stack: Stack,
    pub dir: PathBuf,
    pub token: String,
    started: Instant,
    phases: Vec<Phase>,
    pub loads: Vec<LoadReport>,
    pub facts: Vec<(String, String)>,
    pub invariants: Vec<Invariant>,
    lag: Arc<Mutex<Vec<LagSample>>>,
    scraper: Option<tokio::task::JoinHandle<()>>,
}

/// The repository's default policy (nginx's `limit_req` 1r/s burst 25 per client), believing X-Forwarded-For
/// from loopback: the load generator plays the load balancer that spreads many clients' addresses.
pub fn policy() -> anyhow::Result<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/default.toml");
    let text = std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let line = "trusted_proxies = []";
    anyhow::ensure!(text.contains(line), "{} no longer has `{line}`", path.display());
    Ok(text.replace(line, "trusted_proxies = [\"127.0.0.1/32\"]"))
}

impl Harness {
    /// Starts the stack and the scraper; results go to a new folder under `out`.
    pub async fn start(out: &Path, scenario: &str) -> anyhow::Result<Self> {
        let stamp = time::OffsetDateTime::now_utc()
            .format(time::macros::format_description!("[year][month][day]-[hour][minute][second]"))?;
        let dir = out.join(format!("{stamp}-{scenario}"));
        std::fs::create_dir_all(&dir)?;
        let stack = Stack::start(StackOptions { policy: policy()?, ..StackOptions::default() }).await?;
        let token = stack.token();
        let mut h = Self {
            stack,
            dir,
            token,
            started: Instant::now(),
            phases: Vec::new(),
            loads: Vec::new(),
            facts: Vec::new(),
            invariants: Vec::new(),
            lag: Arc::default(),
            scraper: None,
        };
        h.scraper = Some(h.spawn_scraper()?);
        Ok(h)
    }

    /// Seconds since the run started.
    pub fn now(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Ends the current phase (if any) and starts `name`.
    pub fn phase(&mut self, name: &str, action: impl Into<String>) {
        let now = (self.now() * 10.0).round() / 10.0;
        if let Some(p) = self.phases.last_mut() {
            p.end = now;
        }
        self.phases.push(Phase { name: name.to_owned(), start: now, end: now, action: action.into() });
    }

    fn current_phase(&self) -> String {
        self.phases.last().map(|p| p.name.clone()).unwrap_or_default()
    }

    /// Runs `load` through the edge during the current phase and records it.
    pub async fn load(&mut self, load: &Load) -> anyhow::Result<Summary> {
        let summary = self.run_load(load).await?;
        self.record(load, &summary);
        Ok(summary)
    }

    /// Runs `load` without recording it (to run it beside something else, then [`Harness::record`] it).
    pub fn run_load(&self, load: &Load) -> impl std::future::Future<Output = anyhow::Result<Summary>> + use<> {
        let (dir, url, token, load) = (self.dir.clone(), self.stack.edge_url(), self.token.clone(), load.clone());
        let tag = format!("{}-{}", self.loads.len() + 1, self.current_phase());
        async move { wrk::run(&dir, &tag, &url, &token, &load).await }
    }

    pub fn record(&mut self, load: &Load, s: &Summary) {
        let ms = |us: u64| us as f64 / 1000.0;
        self.loads.push(LoadReport {
            phase: self.current_phase(),
            name: load.name.clone(),
            requests: s.requests,
            rps: s.rps(),
            latency_ms: serde_json::json!({
                "p50": ms(s.latency_us.p50), "p90": ms(s.latency_us.p90),
                "p99": ms(s.latency_us.p99), "max": ms(s.latency_us.max),
            }),
            statuses: s.statuses.clone(),
            errors: s.errors.clone(),
        });
    }

    pub fn fact(&mut self, label: &str, value: impl Into<String>) {
        self.facts.push((label.to_owned(), value.into()));
    }

    pub fn check(&mut self, name: &str, ok: bool, detail: impl Into<String>) {
        self.invariants.push(Invariant { name: name.to_owned(), ok, detail: detail.into() });
    }

    /// Lag samples taken between `from` and `to` seconds.
    pub fn lag_between(&self, from: f64, to: f64) -> Vec<LagSample> {
        let lag = self.lag.lock().unwrap_or_else(|e| e.into_inner());
        lag.iter().filter(|s| s.t >= from && s.t <= to).copied().collect()
    }

    /// The start and end of phase `name`.
    pub fn phase_span(&self, name: &str) -> Option<(f64, f64)> {
        self.phases.iter().find(|p| p.name == name).map(|p| (p.start, p.end))
    }

    /// Waits until the stored orders include every id the `loads` were given (all published), then checks that
    /// each is stored exactly once with its side rows, and that nothing else was stored beyond what their unseen
    /// requests (sent, answer never read) may have created. Records the drain time and the invariant.
    pub async fn check_exactly_once(&mut self, loads: &[&Summary], timeout: Duration) -> anyhow::Result<()> {
        let unseen: u64 = loads.iter().map(|s| s.unseen()).sum();
        let mut ids: Vec<uuid::Uuid> = loads.iter().flat_map(|s| s.created.iter().map(|(_, id)| *id)).collect();
        ids.sort_unstable();
        let handed_out = ids.len();
        ids.dedup();
        let duplicates = handed_out - ids.len();
        let n = ids.len() as i64;
        let db = self.stack.postgres.client().await?;
        let waited = Instant::now();
        let mut ours = 0i64;
        while waited.elapsed() < timeout {
            ours = db.query_one("SELECT count(*) FROM orders WHERE id = ANY($1)", &[&ids]).await?.get(0);
            if ours >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        self.fact("stored after the load stopped", format!("{:.1} s", waited.elapsed().as_secs_f64()));
        // A message redelivered after the last commit would show up now if the inbox failed.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let testkit::Stored { orders: total, of_ids, inbox, history, rejected, .. } =
            self.stack.postgres.stored(&ids).await?;
        ours = ours.max(of_ids);
        self.fact("orders acknowledged (201, 202, 422, 504)", n.to_string());
        self.fact("orders stored", format!("{total} ({rejected} rejected by the rules)"));
        let extra = total - ours;
        let ok = n > 0
            && duplicates == 0
            && ours == n
            && extra >= 0
            && extra as u64 <= unseen
            && inbox == total
            && history == 2 * total;
        self.check(
            "every acknowledged order stored exactly once",
            ok,
            format!(
                "{n} acknowledged, {ours} of them stored; {total} stored in all ({extra} beyond the acknowledged, \
                 at most {unseen} requests sent whose answer was not read); inbox rows {inbox}, history rows {history} (2 per order); \
                 {duplicates} ids handed out twice"
            ),
        );
        Ok(())
    }

    /// The broker-side lag now, per job.
    pub async fn lag_now(&self) -> anyhow::Result<LagSample> {
        let brokers = self.stack.tansu.brokers();
        let t = self.now();
        tokio::task::spawn_blocking(move || {
            let consumers = lag_consumers(&brokers)?;
            Ok(measure(&consumers, t))
        })
        .await?
    }

    fn spawn_scraper(&self) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let file = std::fs::File::create(self.dir.join("metrics.jsonl"))?;
        let p = self.stack.ports;
        let targets = [("edge", p.edge_admin), ("gateway", p.gateway_admin), ("workers", p.workers_admin)];
        let (brokers, db_url, started, lag) =
            (self.stack.tansu.brokers(), self.stack.postgres.url(), self.started, self.lag.clone());
        Ok(tokio::spawn(async move {
            let mut out = std::io::BufWriter::new(file);
            let http = reqwest::Client::builder().timeout(Duration::from_millis(800)).build().unwrap_or_default();
            let consumers = {
                let b = brokers.clone();
                tokio::task::spawn_blocking(move || lag_consumers(&b).ok()).await.ok().flatten()
            };
            let consumers = consumers.map(Arc::new);
            let mut db: Option<tokio_postgres::Client> = None;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                // The three at once, each stamped when it answered (a starved process answers late).
                let [a, b, c] = targets.map(|(service, port)| {
                    let http = &http;
                    async move { (service, scrape(http, port).await, started.elapsed().as_secs_f64()) }
                });
                let (a, b, c) = tokio::join!(a, b, c);
                for (service, text, t) in [a, b, c] {
                    let Some(text) = text else { continue };
                    let lines: Vec<&str> = text
                        .lines()
                        .filter(|l| !l.starts_with('#') && FAMILIES.iter().any(|f| l.starts_with(f)))
                        .collect();
                    let row = serde_json::json!({ "t": t, "service": service, "lines": lines });
                    let _ = writeln!(out, "{row}");
                }
                let t = started.elapsed().as_secs_f64();
                let sample = match &consumers {
                    Some(c) => {
                        let c = c.clone();
                        tokio::task::spawn_blocking(move || measure(&c, t)).await.unwrap_or_default()
                    }
                    None => LagSample { t, ..LagSample::default() },
                };
                lag.lock().unwrap_or_else(|e| e.into_inner()).push(sample);
                if db.as_ref().is_none_or(|c| c.is_closed()) {
                    db = connect(&db_url).await;
                }
                let orders = match &db {
                    Some(c) => tokio::time::timeout(
                        Duration::from_millis(500),
                        c.query_one("SELECT count(*) FROM orders", &[]),
                    )
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .map(|r| r.get::<_, i64>(0)),
                    None => None,
                };
                let row = serde_json::json!({
                    "t": t, "service": "loadtest",
                    "lag": { "validate": sample.validate, "persist": sample.persist },
                    "orders": orders,
                });
                let _ = writeln!(out, "{row}");
                let _ = out.flush();
            }
        }))
    }

    /// Stops the scraper, writes `summary.json` and renders the report (`python3 loadtest/report.py`).
    /// Returns whether every invariant held.
    pub async fn finish(mut self, scenario: &str, title: &str, description: &str) -> anyhow::Result<Outcome> {
        let now = (self.now() * 10.0).round() / 10.0;
        if let Some(p) = self.phases.last_mut() {
            p.end = now;
        }
        // One more second of samples after the end, then stop.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        if let Some(s) = self.scraper.take() {
            s.abort();
            let _ = s.await;
        }
        let passed = !self.invariants.is_empty() && self.invariants.iter().all(|i| i.ok);
        let summary = serde_json::json!({
            "scenario": scenario,
            "title": title,
            "description": description,
            "started_at": (time::OffsetDateTime::now_utc() - self.started.elapsed())
                .format(&time::format_description::well_known::Rfc3339)?,
            "machine": machine(),
            "binaries": binaries(),
            "phases": self.phases,
            "loads": self.loads,
            "facts": self.facts,
            "invariants": self.invariants,
            "passed": passed,
        });
        std::fs::write(self.dir.join("summary.json"), serde_json::to_vec_pretty(&summary)?)?;
        let report = Path::new(env!("CARGO_MANIFEST_DIR")).join("report.py");
        let out = tokio::process::Command::new(python()).arg(&report).arg(&self.dir).output().await?;
        anyhow::ensure!(
            out.status.success(),
            "rendering the report failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(Outcome { dir: self.dir.clone(), passed, invariants: self.invariants.clone() })
    }
}

/// What a run found.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub dir: PathBuf,
    pub passed: bool,
    pub invariants: Vec<Invariant>,
}

async fn scrape(http: &reqwest::Client, port: u16) -> Option<String> {
    let r = http.get(format!("http://127.0.0.1:{port}/metrics")).send().await.ok()?;
    r.status().is_success().then_some(())?;
    r.text().await.ok()
}

async fn connect(url: &str) -> Option<tokio_postgres::Client> {
    let (client, conn) =
        tokio::time::timeout(Duration::from_secs(1), tokio_postgres::connect(url, tokio_postgres::NoTls))
            .await
            .ok()?
            .ok()?;
    tokio::spawn(conn);
    Some(client)
}

/// One consumer per job group, never subscribed: it only reads the group's committed offsets.
fn lag_consumers(brokers: &str) -> anyhow::Result<Vec<(&'static str, &'static str, BaseConsumer)>> {
    GROUPS
        .iter()
        .map(|(job, group, topic)| {
            let c: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", brokers)
                .set("group.id", *group)
                .set("enable.auto.commit", "false")
                .create()?;
            Ok((*job, *topic, c))
        })
        .collect()
}

/// Σ over partitions of (end offset − committed offset); `None` when the broker did not answer.
fn measure(consumers: &[(&str, &str, BaseConsumer)], t: f64) -> LagSample {
    let timeout = Duration::from_millis(800);
    let one = |topic: &str, c: &BaseConsumer| -> Option<i64> {
        let metadata = c.fetch_metadata(Some(topic), timeout).ok()?;
        let mut tpl = rdkafka::TopicPartitionList::new();
        let mut ends = Vec::new();
        for p in metadata.topics().iter().flat_map(|t| t.partitions()) {
            tpl.add_partition(topic, p.id());
            ends.push((p.id(), c.fetch_watermarks(topic, p.id(), timeout).ok()?));
        }
        let committed = c.committed_offsets(tpl, timeout).ok()?;
        let mut lag = 0;
        for (partition, (low, high)) in ends {
            let at = committed
                .find_partition(topic, partition)
                .and_then(|e| e.offset().to_raw())
                .filter(|o| *o >= 0)
                .unwrap_or(low);
            lag += (high - at).max(0);
        }
        Some(lag)
    };
    let mut s = LagSample { t, ..LagSample::default() };
    for (job, topic, c) in consumers {
        let v = one(topic, c);
        match *job {
            "validate" => s.validate = v,
            _ => s.persist = v,
        }
    }
    s
}

/// `$LOADTEST_PYTHON`, else Debian's interpreter (where `apt-get install python3-matplotlib` put matplotlib,
/// whatever `python3` a version manager puts first on the PATH), else `python3`.
pub fn python() -> String {
    std::env::var("LOADTEST_PYTHON").unwrap_or_else(|_| {
        if Path::new("/usr/bin/python3").is_file() { "/usr/bin/python3".into() } else { "python3".into() }
    })
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next()?.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map(|kb| kb / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} cores, {mem_gib:.0} GiB, Linux {}", kernel.trim())
}

fn binaries() -> String {
    match std::env::var("E2E_BIN_DIR") {
        Ok(d) if d.contains("release") => "release".into(),
        Ok(d) => d,
        Err(_) => "debug (next to the test binary)".into(),
    }
}
