//! The short version of every scenario (tens of seconds each, against a stack of their own): each invariant
//! must hold and the report must render. And the Locust journey against a real stack.
//!
//! The scenarios run one at a time (a lock): each loads the whole 2-core machine.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use loadtest::{Options, Scenario};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn short(out: &Path) -> Options {
    Options { duration: Duration::from_secs(24), rate: 40.0, connections: 4, out: out.to_path_buf() }
}

fn run(scenario: Scenario) -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let out = tempfile::Builder::new().prefix("loadtest-").tempdir()?;
    let outcome = tokio::runtime::Runtime::new()?.block_on(scenario.run(&short(out.path())))?;
    let failed: Vec<_> = outcome.invariants.iter().filter(|i| !i.ok).collect();
    assert!(outcome.passed, "{scenario:?}: invariants failed: {failed:#?}");
    assert_report(&outcome.dir)?;
    Ok(())
}

/// The report exists with its plots, and says what was checked.
fn assert_report(dir: &Path) -> anyhow::Result<()> {
    let md = std::fs::read_to_string(dir.join("report.md"))?;
    assert!(md.contains("PASSED"), "report.md does not say PASSED:\n{md}");
    let html = std::fs::read_to_string(dir.join("report.html"))?;
    assert!(html.contains("<img"), "report.html has no image");
    for png in ["requests.png", "latency.png", "lag.png", "ratelimit.png", "database.png"] {
        let bytes = std::fs::read(dir.join(png))?;
        assert!(bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000, "{png}: not a plot ({} bytes)", bytes.len());
        assert!(md.contains(png), "report.md does not show {png}");
    }
    Ok(())
}

#[test]
fn steady_traffic_loses_nothing() -> anyhow::Result<()> {
    run(Scenario::Steady)
}

#[test]
fn workers_throttled_then_down_delay_but_lose_nothing() -> anyhow::Result<()> {
    run(Scenario::Workers)
}

#[test]
fn database_starved_then_down_delays_but_loses_nothing() -> anyhow::Result<()> {
    run(Scenario::Database)
}

#[test]
fn one_abuser_gets_nginx_answers_and_others_are_unaffected() -> anyhow::Result<()> {
    run(Scenario::Limits)
}

/// `loadtest/locust/locustfile.py` headless against a real stack: journeys complete (created, then stored),
/// none fails.
#[test]
fn the_locust_journey_runs_against_the_stack() -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let rt = tokio::runtime::Runtime::new()?;
    let stack = rt.block_on(testkit::Stack::start(testkit::StackOptions {
        policy: loadtest::harness::policy()?,
        ..testkit::StackOptions::default()
    }))?;
    let out = tempfile::Builder::new().prefix("locust-").tempdir()?;
    let locustfile = Path::new(env!("CARGO_MANIFEST_DIR")).join("locust").join("locustfile.py");
    let run = std::process::Command::new("locust")
        .arg("-f")
        .arg(&locustfile)
        .args(["--headless", "-u", "4", "-r", "4", "-t", "15s", "--only-summary", "--host", &stack.edge_url()])
        .arg("--csv")
        .arg(out.path().join("run"))
        .env("TOKEN", stack.token())
        .env("CA_FILE", stack.tls_dir().join("dev-cert.pem"))
        .env("SPREAD_CLIENTS", "1")
        .env("WAIT_MIN_S", "0.2")
        .env("WAIT_MAX_S", "0.5")
        .output()
        .map_err(|e| anyhow::anyhow!("running locust (apt-get install python3-locust): {e}"))?;
    let log = format!("{}{}", String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    assert!(run.status.success(), "locust failed: {log}");
    let stats = std::fs::read_to_string(out.path().join("run_stats.csv"))?;
    let journey = stats
        .lines()
        .find(|l| l.starts_with("JOURNEY,"))
        .ok_or_else(|| anyhow::anyhow!("no JOURNEY row in the stats:\n{stats}\n{log}"))?;
    let fields: Vec<&str> = journey.split(',').collect();
    let (done, failed): (u64, u64) = (fields[2].parse()?, fields[3].parse()?);
    assert!(done >= 4 && failed == 0, "journeys: {done} done, {failed} failed\n{stats}");
    Ok(())
}

/// The report's arithmetic (label parsing, counter resets, histogram quantiles) checks itself.
#[test]
fn the_report_arithmetic_passes_its_self_test() -> anyhow::Result<()> {
    let report = Path::new(env!("CARGO_MANIFEST_DIR")).join("report.py");
    let out = std::process::Command::new(loadtest::harness::python()).arg(&report).arg("--self-test").output()?;
    assert!(
        out.status.success(),
        "report.py --self-test: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
