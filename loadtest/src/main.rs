//! `scenario <steady|workers|database|limits|all>`: runs load-test scenarios against a stack of our binaries
//! it starts itself, checks their invariants and writes a report per run. `loadtest/scenario` builds the
//! release binaries and runs this.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use loadtest::{Options, Scenario};

#[derive(Parser)]
#[command(about = "Load-test scenarios with invariants and a report")]
struct Args {
    /// `steady`, `workers`, `database`, `limits`, or `all` (one after the other).
    #[arg(value_parser = parse_scenarios)]
    scenario: Scenarios,
    /// Length of the steady scenario in seconds; the others split it into their phases (15 minutes: 900).
    #[arg(long, default_value_t = 120)]
    seconds: u64,
    /// Requests per second of the background traffic.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// wrk connections.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Where the run folders go.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results"))]
    out: PathBuf,
}

#[derive(Clone)]
struct Scenarios(Vec<Scenario>);

fn parse_scenarios(s: &str) -> Result<Scenarios, String> {
    if s == "all" {
        return Ok(Scenarios(Scenario::ALL.to_vec()));
    }
    <Scenario as clap::ValueEnum>::from_str(s, true).map(|one| Scenarios(vec![one]))
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    anyhow::ensure!(args.seconds >= 8, "--seconds must be at least 8 (the phases are a quarter of it)");
    let opts = Options {
        duration: Duration::from_secs(args.seconds),
        rate: args.rate,
        connections: args.connections,
        out: args.out,
    };
    let mut failed = false;
    for scenario in args.scenario.0 {
        println!("== {scenario:?}: {} s at {} req/s", args.seconds, args.rate);
        let outcome = scenario.run(&opts).await?;
        for i in &outcome.invariants {
            println!("  {} {}: {}", if i.ok { "ok  " } else { "FAIL" }, i.name, i.detail);
        }
        println!("  report: {}", outcome.dir.join("report.md").display());
        failed |= !outcome.passed;
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}
