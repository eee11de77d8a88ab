//! The edge benchmark's script (`loadtest/edge_bench.py`), shortest form (one round of one second per load and
//! target), on the debug binaries the tests use: it must start nginx, the bare Pingora proxy and the edge, load
//! each with HTTP/1.1, HTTP/2 and a new connection per request without an error, find in the access logs that
//! every proxy did the work it is measured with (the edge's limiter decided every request), and print every
//! figure, ratio and target. The numbers themselves say nothing here (debug builds); `loadtest/edge-bench`
//! measures them.

use std::os::unix::process::ExitStatusExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The script ends by itself in about a minute; past this it is interrupted (its `finally` stops what it started).
const LIMIT: Duration = Duration::from_secs(300);

#[test]
fn the_benchmark_runs_every_target_and_load_without_an_error_and_reports_every_ratio() -> anyhow::Result<()> {
    let bin_dir = testkit::bin_path("edge").parent().map(Path::to_path_buf).unwrap_or_default();
    for name in ["edge", "bare-proxy"] {
        anyhow::ensure!(
            bin_dir.join(name).exists(),
            "{name} is not built in {} (cargo build --bins)",
            bin_dir.display()
        );
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("edge_bench.py");
    let out = tempfile::Builder::new().prefix("edge-bench-out-").tempfile()?;
    let mut child = Command::new("python3")
        .arg(&script)
        .arg(&bin_dir)
        .args(["1", "1"])
        .env_remove("LOADS")
        .env_remove("TARGETS")
        .stdout(out.reopen()?)
        .stderr(Stdio::inherit())
        .spawn()?;
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > LIMIT {
            // SIGINT: Python's KeyboardInterrupt runs the script's `finally`, which stops nginx and the proxies.
            let pid = i32::try_from(child.id())?;
            // SAFETY: a signal to our own child, by its PID.
            unsafe { libc::kill(pid, libc::SIGINT) };
            let status = child.wait()?;
            anyhow::bail!("the benchmark ran over {LIMIT:?} and was interrupted ({status:?})");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let report = std::fs::read_to_string(out.path())?;
    assert!(status.success(), "exit {:?} (signal {:?}):\n{report}", status.code(), status.signal());

    // Every target and load: a row with requests served and no error.
    let loads = ["HTTP/1.1 keep-alive", "HTTP/2 (h2load -m10)", "new connection per request"];
    for load in loads {
        let targets: &[&str] = if load.starts_with("HTTP/2") {
            &["nginx", "bare", "edge"]
        } else {
            &["nginx", "bare", "edge", "upstream"]
        };
        for target in targets {
            let row = report
                .lines()
                .find(|l| l.starts_with(&format!("| {load} | {target} |")))
                .unwrap_or_else(|| panic!("no row for {target}, {load}:\n{report}"));
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let rps: f64 = cells[3].parse().unwrap_or_else(|e| panic!("req/s in {row:?}: {e}"));
            assert!(rps > 0.0, "{target} served nothing with {load}: {row}");
            assert_eq!(cells[8], "0", "{target} had errors with {load}: {row}");
        }
        // The load's six ratios (a row of seven cells; a figures row has eight), all finite numbers.
        let ratios = report
            .lines()
            .find(|l| l.starts_with(&format!("| {load} | ")) && l.split('|').count() == 9)
            .unwrap_or_else(|| panic!("no ratios for {load}:\n{report}"));
        for cell in ratios.split('|').map(str::trim).filter(|c| !c.is_empty()).skip(1) {
            let value: f64 = cell.parse().unwrap_or_else(|e| panic!("ratio {cell:?} in {ratios:?}: {e}"));
            assert!(value.is_finite() && value > 0.0, "ratio {value} in {ratios}");
        }
    }
    // The six targets, each judged.
    let judged = report.lines().filter(|l| l.starts_with("  met ") || l.starts_with("  NOT met ")).count();
    assert_eq!(judged, 6, "targets judged:\n{report}");
    // The script's own check of the access logs passed (it prints the counts).
    assert!(report.contains("access logs (warm-ups included): edge "), "{report}");
    assert!(!report.contains("INVALID"), "{report}");
    Ok(())
}
