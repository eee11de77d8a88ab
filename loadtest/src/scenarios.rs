//! The four scenarios. Each runs its phases with wrk through the edge (HTTPS), acts on the stack at the phase
//! boundaries, then checks its invariants and renders the report.

use std::time::{Duration, Instant};

use testkit::Nginx;

use crate::harness::Harness;
use crate::nginx_model::{self, Decision};
use crate::throttle::Throttle;
use crate::wrk::{Load, Summary};
use crate::{Options, Outcome};

/// Statuses a mixed load may get when everything works: reads (200), sync created (201), async accepted
/// (202), and reads of orders not stored yet (404).
const MIX_OK: &[u16] = &[200, 201, 202, 404];

fn async_load(name: &str, opts: &Options, duration: Duration, invalid_ratio: f64) -> Load {
    Load {
        name: name.to_owned(),
        mode: "async",
        clients: "many",
        rate: opts.rate,
        connections: opts.connections,
        duration,
        invalid_ratio,
    }
}

/// Time for the backlog to drain after the load stops.
fn drain_timeout(opts: &Options) -> Duration {
    Duration::from_secs(120) + opts.duration
}

pub async fn steady(opts: &Options) -> anyhow::Result<Outcome> {
    let mut h = Harness::start(&opts.out, "steady").await?;
    h.phase("steady", "60% async orders, 20% sync orders, 20% reads, from many clients");
    let load = Load { mode: "mix", ..async_load("mix, many clients", opts, opts.duration, 0.0) };
    let s = h.load(&load).await?;
    check_no_errors(&mut h, "no errors", &s, MIX_OK);
    h.check(
        "reads of stored orders answered",
        s.count(200) > 0 && s.count(404) * 10 <= s.count(200),
        format!("{} reads answered 200, {} not stored yet (404; at most a tenth allowed)", s.count(200), s.count(404)),
    );
    h.fact("throughput", format!("{:.0} req/s", s.rps()));
    h.fact("reads of orders not stored yet (404)", s.count(404).to_string());
    h.check_exactly_once(&[&s], drain_timeout(opts)).await?;
    check_drained(&mut h).await?;
    h.finish(
        "steady",
        "Steady traffic",
        "Mixed traffic from many clients through the edge (HTTPS) for the whole run: async and sync order \
         creation and reads of orders created earlier. Invariants: no errors, and every order the API \
         acknowledged is stored exactly once after the load stops.",
    )
    .await
}

pub async fn workers(opts: &Options) -> anyhow::Result<Outcome> {
    let mut h = Harness::start(&opts.out, "workers").await?;
    let quarter = opts.duration / 4;
    let pid = h.stack.workers.as_ref().and_then(|w| w.pid()).ok_or_else(|| anyhow::anyhow!("no workers"))?;
    let load = |name: &str| async_load(name, opts, quarter, 0.05);

    h.phase("baseline", "async orders from many clients (5% in a currency the rules refuse)");
    let base = h.load(&load("async, many clients")).await?;
    let throttle = Throttle::apply("loadtest-workers", &[pid], 0.03, None)?;
    h.phase("throttled", format!("workers limited to {}", throttle.description));
    let throttled = h.load(&load("async, many clients")).await?;
    drop(throttle);
    h.phase("down", "workers stopped (SIGTERM)");
    // The traffic goes on while the workers drain and exit.
    let mut w = h.stack.workers.take().ok_or_else(|| anyhow::anyhow!("no workers"))?;
    let down_load = load("async, many clients");
    let (down, stopped) =
        tokio::join!(h.run_load(&down_load), tokio::task::spawn_blocking(move || w.terminate().map(|_| w)));
    h.stack.workers = Some(stopped??);
    let down = down?;
    h.record(&down_load, &down);
    h.phase("restored", "workers started again");
    h.stack.start_workers().await?;
    let restored = h.load(&load("async, many clients")).await?;
    h.phase("drain", "no traffic: the backlog drains");

    let all = [&base, &throttled, &down, &restored];
    check_no_errors_all(&mut h, &all, &[202]);
    check_latency_unaffected(&mut h, &base, &[("throttled", &throttled), ("down", &down)]);
    check_lag_grew(&mut h, "down", "validate", &down);
    h.check_exactly_once(&all, drain_timeout(opts)).await?;
    check_drained(&mut h).await?;
    h.finish(
        "workers",
        "Workers overloaded, then down",
        "Async orders from many clients through the edge while the workers are first starved of CPU, then \
         stopped, then started again. The gateway only needs the broker, so its answers must not suffer; the \
         commands wait in Kafka (lag grows) and are all processed after the restore.",
    )
    .await
}

pub async fn database(opts: &Options) -> anyhow::Result<Outcome> {
    let mut h = Harness::start(&opts.out, "database").await?;
    let quarter = opts.duration / 4;
    let load = |name: &str| async_load(name, opts, quarter, 0.05);

    h.phase("baseline", "async orders from many clients (5% in a currency the rules refuse)");
    let base = h.load(&load("async, many clients")).await?;
    let pid = h.stack.postgres.pid().ok_or_else(|| anyhow::anyhow!("PostgreSQL's pid is unknown"))?;
    let throttle = Throttle::apply("loadtest-postgres", &[pid], 0.1, Some(256 * 1024 * 1024))?;
    h.phase("starved", format!("PostgreSQL limited to {}", throttle.description));
    let starved = h.load(&load("async, many clients")).await?;
    drop(throttle);
    h.phase("down", "PostgreSQL stopped (pg_ctl stop -m fast)");
    h.stack.postgres.stop()?;
    let retries_before = workers_metric(&h, "worker_retries_total").await;
    let down = h.load(&load("async, many clients")).await?;
    let retries_after = workers_metric(&h, "worker_retries_total").await;
    h.phase("restored", "PostgreSQL started again");
    h.stack.postgres.start_again()?;
    let restored = h.load(&load("async, many clients")).await?;
    h.phase("drain", "no traffic: the backlog drains");

    let all = [&base, &starved, &down, &restored];
    check_no_errors_all(&mut h, &all, &[202]);
    check_lag_grew(&mut h, "down", "persist", &down);
    h.check(
        "the persist job retried while the database was down",
        retries_after > retries_before,
        format!("worker_retries_total {retries_before} → {retries_after}"),
    );
    h.check_exactly_once(&all, drain_timeout(opts)).await?;
    check_drained(&mut h).await?;
    h.finish(
        "database",
        "PostgreSQL starved, then down",
        "Async orders from many clients while PostgreSQL is first held to a tenth of a CPU and 256 MiB (the \
         original experiment's limits), then stopped, then started again. Validation goes on; the persist job \
         retries and its backlog grows in Kafka, then drains; every acknowledged order is stored once.",
    )
    .await
}

/// The abusing client's address (X-Forwarded-For, believed from the load generator).
const ABUSER: &str = "203.0.113.7";
const BURST: usize = 40;
/// Requests per second the abuser keeps sending after its burst.
const HAMMER_RATE: u64 = 3;

pub async fn limits(opts: &Options) -> anyhow::Result<Outcome> {
    let mut h = Harness::start(&opts.out, "limits").await?;
    let ca = h.stack.tls_dir().join("dev-cert.pem");
    let nginx = Nginx::start(
        "limit_req_zone $binary_remote_addr zone=per_client:10m rate=1r/s;\nlimit_req_status 429;",
        "location /v1/ { limit_req zone=per_client burst=25; try_files /x =404; }",
        &ca,
        &h.stack.tls_dir().join("dev-key.pem"),
    )
    .await?;
    let hammer = (opts.duration / 4).min(Duration::from_secs(30));
    h.phase(
        "abuse",
        format!(
            "one client ({ABUSER}) sends {BURST} requests at once, then {HAMMER_RATE}/s for {} s, to the edge \
             (default policy: 1r/s burst 25) and the same to nginx; many other clients send async orders",
            hammer.as_secs()
        ),
    );
    // The abuser's last admitted request leaves about 25 s after it was sent: the others keep going meanwhile.
    let background = async_load("async, many clients (beside the abuser)", opts, hammer + Duration::from_secs(27), 0.0);
    let others = h.run_load(&background);
    let abuse = abuse(&h, &nginx, hammer);
    let (others, (arrivals, edge, ng)) = tokio::try_join!(others, abuse)?;
    h.record(&background, &others);
    h.phase("after", "no traffic");

    let model = nginx_model::decide(&arrivals, 1, 25);
    let classify = |seen: &[Seen]| -> Vec<Decision> {
        seen.iter()
            .map(|s| match (s.status, s.latency) {
                (429, _) => Decision::Rejected,
                (_, l) if l >= Duration::from_millis(500) => Decision::Delayed(l.as_millis() as u64),
                _ => Decision::Now,
            })
            .collect()
    };
    let (e, n) = (classify(&edge), classify(&ng));
    let (eb, nb, mb) =
        (nginx_model::tally(&e[..BURST]), nginx_model::tally(&n[..BURST]), nginx_model::tally(&model[..BURST]));
    h.check(
        "the burst: the edge answers exactly as nginx and its algorithm",
        eb == nb && eb == mb,
        format!("(at once, delayed, rejected) edge {eb:?}, nginx {nb:?}, algorithm {mb:?}"),
    );
    let (et, nt, mt) = (nginx_model::tally(&e), nginx_model::tally(&n), nginx_model::tally(&model));
    let close = |a: (usize, usize, usize), b: (usize, usize, usize)| {
        (a.0 + a.1).abs_diff(b.0 + b.1) <= 1 && a.2.abs_diff(b.2) <= 1
    };
    h.check(
        "the whole abuse: accepted and rejected within one of nginx's",
        close(et, nt) && close(et, mt),
        format!(
            "(at once, delayed, rejected) edge {et:?}, nginx {nt:?}, algorithm {mt:?} of {} requests; a request \
             that arrives within milliseconds of the moment a slot frees may fall either side",
            arrivals.len()
        ),
    );
    let worst = release_gap(&edge, &ng);
    h.fact(
        "largest difference between the edge's and nginx's release of the k-th delayed request",
        format!("{worst} ms"),
    );
    h.fact("abuser at the edge (at once, delayed, rejected)", format!("{et:?}"));
    h.fact("abuser at nginx (at once, delayed, rejected)", format!("{nt:?}"));
    check_no_errors(&mut h, "other clients unaffected: no 429, no errors", &others, &[202]);
    h.fact("other clients' p99", format!("{:.1} ms", others.latency_us.p99 as f64 / 1000.0));
    h.check_exactly_once(&[&others], drain_timeout(opts)).await?;
    h.finish(
        "limits",
        "The edge's limit: one abuser among many clients",
        "One client hits the default policy (nginx's limit_req 1r/s burst 25 per client) with a burst and then \
         a steady excess, while a real nginx with the same limit_req receives the same requests at the same \
         moments; many other clients send orders meanwhile. The edge must give the abuser nginx's answers and \
         the others none of its penalty.",
    )
    .await
}

/// What one of the abuser's requests got.
#[derive(Debug, Clone, Copy)]
struct Seen {
    status: u16,
    latency: Duration,
}

/// Sends the abuser's schedule to the edge and nginx at the same moments; returns the send times (ms since
/// the first) and what each server answered, in send order.
async fn abuse(h: &Harness, nginx: &Nginx, hammer: Duration) -> anyhow::Result<(Vec<u64>, Vec<Seen>, Vec<Seen>)> {
    let ca = h.stack.tls_dir().join("dev-cert.pem");
    let edge = testkit::https_client_trusting(&ca, None)?;
    let ng = testkit::https_client_trusting(&ca, None)?;
    let token = h.token.clone();
    // Open the connections first (from another address at the edge, and nginx's unlimited /warmup).
    edge.get(format!("{}/readyz", h.stack.edge_url())).header("x-forwarded-for", "198.51.100.1").send().await?;
    ng.get(format!("{}/warmup", nginx.url())).send().await?;
    let mut schedule = vec![Duration::ZERO; BURST];
    let every = Duration::from_millis(1000 / HAMMER_RATE);
    schedule.extend((1..).map(|k| every * k).take_while(|t| *t <= hammer));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for at in schedule {
        tokio::time::sleep_until((start + at).into()).await;
        let sent = start.elapsed().as_millis() as u64;
        let id = uuid::Uuid::new_v4();
        let e = edge
            .get(format!("{}/v1/orders/{id}", h.stack.edge_url()))
            .bearer_auth(&token)
            .header("x-forwarded-for", ABUSER);
        let n = ng.get(format!("{}/v1/orders/{id}", nginx.url()));
        tasks.push((sent, tokio::spawn(timed(e)), tokio::spawn(timed(n))));
    }
    let (mut arrivals, mut edge_seen, mut nginx_seen) = (Vec::new(), Vec::new(), Vec::new());
    for (sent, e, n) in tasks {
        arrivals.push(sent);
        edge_seen.push(e.await??);
        nginx_seen.push(n.await??);
    }
    Ok((arrivals, edge_seen, nginx_seen))
}

async fn timed(req: reqwest::RequestBuilder) -> anyhow::Result<Seen> {
    let t = Instant::now();
    let status = req.send().await?.status().as_u16();
    Ok(Seen { status, latency: t.elapsed() })
}

/// The largest difference, in ms, between the k-th delayed release at the edge and at nginx.
fn release_gap(edge: &[Seen], nginx: &[Seen]) -> u64 {
    let delayed = |seen: &[Seen]| {
        let mut l: Vec<Duration> = seen
            .iter()
            .filter(|s| s.status != 429 && s.latency >= Duration::from_millis(500))
            .map(|s| s.latency)
            .collect();
        l.sort_unstable();
        l
    };
    delayed(edge).iter().zip(delayed(nginx)).map(|(a, b)| a.abs_diff(b).as_millis() as u64).max().unwrap_or(0)
}

fn check_no_errors(h: &mut Harness, name: &str, s: &Summary, expected: &[u16]) {
    let errors = s.errors_except(expected);
    h.check(
        name,
        errors == 0 && s.requests > 0,
        format!("{} requests, {errors} errors; statuses {:?}", s.requests, s.statuses),
    );
}

fn check_no_errors_all(h: &mut Harness, all: &[&Summary], expected: &[u16]) {
    let requests: u64 = all.iter().map(|s| s.requests).sum();
    let errors: u64 = all.iter().map(|s| s.errors_except(expected)).sum();
    h.check(
        "no errors in any phase",
        errors == 0 && requests > 0,
        format!("{requests} requests, {errors} errors (anything but {expected:?}, or no answer)"),
    );
}

/// p99 in each phase at most twice the baseline's plus 50 ms (a shared 2-core machine is noisy).
fn check_latency_unaffected(h: &mut Harness, base: &Summary, phases: &[(&str, &Summary)]) {
    let p99 = |s: &Summary| s.latency_us.p99 as f64 / 1000.0;
    let bound = 2.0 * p99(base) + 50.0;
    let worst = phases.iter().map(|(_, s)| p99(s)).fold(0.0, f64::max);
    let detail = phases.iter().map(|(n, s)| format!("{n} {:.1} ms", p99(s))).collect::<Vec<_>>().join(", ");
    h.check(
        "the gateway's latency is unaffected",
        worst <= bound,
        format!("p99 baseline {:.1} ms; {detail} (bound: 2 × baseline + 50 ms = {bound:.1} ms)", p99(base)),
    );
}

/// The `job`'s lag during `phase` reached at least half of what was acknowledged in it.
fn check_lag_grew(h: &mut Harness, phase: &str, job: &str, load: &Summary) {
    let Some((from, to)) = h.phase_span(phase) else { return };
    let samples = h.lag_between(from, to + 1.5);
    let pick = |s: &crate::harness::LagSample| if job == "validate" { s.validate } else { s.persist };
    let max = samples.iter().filter_map(pick).max().unwrap_or(0);
    let acked = load.created.len() as i64;
    h.fact(&format!("largest {job} lag while {phase}"), max.to_string());
    h.check(
        &format!("the {job} job's lag grew while {phase}"),
        acked > 0 && max * 2 >= acked,
        format!("{max} messages behind at most; {acked} orders acknowledged in that phase"),
    );
}

/// Both jobs caught up: the lag is 0.
async fn check_drained(h: &mut Harness) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut lag = h.lag_now().await?;
    while (lag.validate != Some(0) || lag.persist != Some(0)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        lag = h.lag_now().await?;
    }
    h.check(
        "the backlog drained",
        lag.validate == Some(0) && lag.persist == Some(0),
        format!("lag at the end: validate {:?}, persist {:?}", lag.validate, lag.persist),
    );
    Ok(())
}

/// The sum of every sample of `name` from the workers' metrics (0 when unreachable).
async fn workers_metric(h: &Harness, name: &str) -> f64 {
    let url = h.stack.admin_url(h.stack.ports.workers_admin, "/metrics");
    let Ok(r) = reqwest::get(url).await else { return 0.0 };
    let text = r.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
