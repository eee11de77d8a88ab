//! The load-test scenarios of the original system's experiments, against our real stack: steady traffic,
//! workers overloaded then down, PostgreSQL starved then down, and the edge's limit hit by one client among
//! many. Each checks its invariant at the end and leaves a report (Markdown, HTML, PNG plots) in its folder.
//!
//! A run starts its own stack (PostgreSQL, Tansu, workers, gateway, edge: the local stack's parts, through
//! testkit, on free loopback ports) because the scenarios stop and starve those processes, and may only touch
//! processes they started.

pub mod harness;
pub mod nginx_model;
pub mod scenarios;
pub mod throttle;
pub mod wrk;

use std::path::PathBuf;
use std::time::Duration;

pub use harness::Outcome;

/// How long and how hard.
#[derive(Debug, Clone)]
pub struct Options {
    /// The steady scenario's length; the others split it into their phases.
    pub duration: Duration,
    /// Requests per second of the background traffic (approximate: wrk paces each connection).
    pub rate: f64,
    pub connections: usize,
    /// Results go to `{out}/{timestamp}-{scenario}/`.
    pub out: PathBuf,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(120),
            rate: 200.0,
            connections: 16,
            out: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/results")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// 1. Steady mixed traffic: throughput, latency, zero errors, every acknowledged order stored once.
    Steady,
    /// 2. Workers throttled, then down, then back: gateway latency unaffected, lag grows and drains.
    Workers,
    /// 3. PostgreSQL starved (0.1 CPU, 256 MiB), then down, then back: lag grows, retries, drains.
    Database,
    /// 4. One client hammers the edge: exactly nginx's answers; other clients unaffected.
    Limits,
}

impl Scenario {
    pub const ALL: [Scenario; 4] = [Scenario::Steady, Scenario::Workers, Scenario::Database, Scenario::Limits];

    pub async fn run(self, opts: &Options) -> anyhow::Result<Outcome> {
        match self {
            Scenario::Steady => scenarios::steady(opts).await,
            Scenario::Workers => scenarios::workers(opts).await,
            Scenario::Database => scenarios::database(opts).await,
            Scenario::Limits => scenarios::limits(opts).await,
        }
    }
}
