//! The workers: Kafka consumer jobs. `workers migrate` applies the schema; `workers run [JOB...]` runs jobs
//! (`validate`, `persist`; by default those in `jobs`, i.e. both, in one process).

mod config;
mod consume;
mod db;
mod dlq;
mod jobs;
mod rules;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use service_core::admin::{self, AdminState, Readiness};
use service_core::metrics::Metrics;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::jobs::JobMetrics;

#[derive(Parser)]
#[command(about = "Order processing workers")]
struct Cli {
    /// TOML configuration file; environment variables `WORKERS_*` override it.
    #[arg(long, env = "WORKERS_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Apply pending schema migrations and exit.
    Migrate,
    /// Run jobs (the default): `validate`, `persist`; none named runs those in the `jobs` setting.
    Run { jobs: Vec<String> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Job {
    Validate,
    Persist,
}

impl Job {
    fn parse(name: &str) -> anyhow::Result<Self> {
        match name {
            "validate" => Ok(Job::Validate),
            "persist" => Ok(Job::Persist),
            other => anyhow::bail!("unknown job {other:?}: expected validate or persist"),
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config: Config = service_core::config::load(cli.config.as_deref(), "WORKERS_")?;
    let _logs = service_core::logging::init(&config.log, service_core::logging::Writer::Background);
    let tracing = service_core::telemetry::init("workers")?;
    let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
    let result = runtime.block_on(start(cli, config));
    drop(runtime);
    tracing.shutdown();
    result
}

async fn start(cli: Cli, config: Config) -> anyhow::Result<()> {
    let pool = service_core::db::pool(&config.database, service_core::db::Access::ReadWrite)?;
    match cli.cmd.unwrap_or(Cmd::Run { jobs: vec![] }) {
        Cmd::Migrate => {
            let n = db::migrate::run(&pool).await.context("migrating the database")?;
            tracing::info!(applied = n, "schema up to date");
            Ok(())
        }
        Cmd::Run { jobs } => {
            let names = if jobs.is_empty() { config.jobs.clone() } else { jobs };
            let mut selected = Vec::new();
            for name in &names {
                let job = Job::parse(name)?;
                if !selected.contains(&job) {
                    selected.push(job);
                }
            }
            anyhow::ensure!(!selected.is_empty(), "no job to run");
            run(config, pool, selected).await
        }
    }
}

async fn run(config: Config, pool: deadpool_postgres::Pool, jobs: Vec<Job>) -> anyhow::Result<()> {
    let shutdown = service_core::shutdown::on_signals().context("installing signal handlers")?;
    let metrics = Metrics::new("workers")?;
    let uses_db = jobs.contains(&Job::Persist);
    let checks: &[&'static str] = if uses_db { &["database", "consumer"] } else { &["consumer"] };
    let readiness = Readiness::new(checks);
    metrics.observe_readiness(&readiness);
    let (admin_addr, admin_task) = admin::spawn(
        config.admin_listen,
        AdminState { readiness: readiness.clone(), metrics: metrics.clone() },
        shutdown.child_token(),
    )
    .await
    .with_context(|| format!("binding admin listener {}", config.admin_listen))?;
    tracing::info!(admin = %admin_addr, ?jobs, "workers starting");

    let meter = metrics.meter();
    let job_metrics = JobMetrics::new(&meter);
    let dead_letters = dlq::DeadLetters::new(&config.kafka, &config.kafka.dlq_topic)?;
    let mut tasks = tokio::task::JoinSet::new();
    let _pool_gauge = uses_db.then(|| pool_gauge(&meter, pool.clone()));
    if uses_db {
        if config.migrate_on_start {
            migrate_until_done(&pool, &shutdown).await?;
        }
        readiness.set("database", true);
        tasks.spawn(probe_database(pool.clone(), readiness.clone(), shutdown.child_token()));
        let deleted = meter
            .u64_counter("worker.retention.deleted")
            .with_description("Rows deleted by the retention task")
            .build();
        tasks.spawn(jobs::retention::run(pool.clone(), config.retention.clone(), deleted, shutdown.child_token()));
    }
    let mut job_tasks = tokio::task::JoinSet::new();
    for job in jobs {
        let stop = shutdown.clone();
        match job {
            Job::Validate => {
                let job = jobs::validate::ValidateJob {
                    kafka: config.kafka.clone(),
                    batch: config.batch.clone(),
                    rules: config.rules.clone(),
                    dead_letters: dead_letters.clone(),
                    readiness: readiness.clone(),
                    metrics: job_metrics.clone(),
                    tracer: service_core::telemetry::tracer("workers"),
                };
                job_tasks.spawn(async move { job.run(stop).await });
            }
            Job::Persist => {
                let job = jobs::persist::PersistJob {
                    pool: pool.clone(),
                    kafka: config.kafka.clone(),
                    batch: config.batch.clone(),
                    dead_letters: dead_letters.clone(),
                    readiness: readiness.clone(),
                    metrics: job_metrics.clone(),
                    tracer: service_core::telemetry::tracer("workers"),
                    db_name: service_core::db::trace::namespace(&config.database.url),
                };
                job_tasks.spawn(async move { job.run(stop).await });
            }
        }
    }
    // A job that fails stops the others: the process exits non-zero and its supervisor restarts it.
    let mut result = Ok(());
    while let Some(joined) = job_tasks.join_next().await {
        let outcome = joined.map_err(anyhow::Error::from).and_then(|r| r);
        if let Err(e) = outcome {
            tracing::error!(error = %e, "a job failed; stopping the others");
            shutdown.cancel();
            if result.is_ok() {
                result = Err(e);
            }
        }
    }
    shutdown.cancel();
    tasks.shutdown().await;
    let _ = admin_task.await;
    result
}

/// Keeps readiness `database` true only while PostgreSQL answers, also when no message is flowing.
async fn probe_database(pool: deadpool_postgres::Pool, readiness: Readiness, stop: CancellationToken) {
    loop {
        let ok = tokio::time::timeout(Duration::from_secs(3), async {
            let client = pool.get().await.ok()?;
            client.simple_query("SELECT 1").await.ok()
        })
        .await
        .ok()
        .flatten()
        .is_some();
        readiness.set("database", ok);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

/// `worker.db.pool.connections{state}`: connections in use and idle, against `max`.
fn pool_gauge(meter: &opentelemetry::metrics::Meter, pool: deadpool_postgres::Pool) -> impl Sized {
    use opentelemetry::KeyValue;
    meter
        .i64_observable_gauge("worker.db.pool.connections")
        .with_description("Database pool connections by state")
        .with_unit("{connection}")
        .with_callback(move |obs| {
            let s = pool.status();
            let idle = i64::try_from(s.available).unwrap_or(0);
            let total = i64::try_from(s.size).unwrap_or(0);
            obs.observe(total - idle, &[KeyValue::new("state", "in_use")]);
            obs.observe(idle, &[KeyValue::new("state", "idle")]);
            obs.observe(i64::try_from(s.max_size).unwrap_or(0), &[KeyValue::new("state", "max")]);
        })
        .build()
}

/// Waits for the database at start (it may come up after us), then migrates.
async fn migrate_until_done(pool: &deadpool_postgres::Pool, stop: &CancellationToken) -> anyhow::Result<()> {
    loop {
        match db::migrate::run(pool).await {
            Ok(n) => {
                tracing::info!(applied = n, "schema up to date");
                return Ok(());
            }
            Err(db::migrate::MigrateError::Changed { version, name }) => {
                anyhow::bail!("migration {version} ({name}) changed after it was applied")
            }
            Err(e) => {
                tracing::warn!(error = %e, "database not ready for migrations; retrying");
                tokio::select! {
                    _ = stop.cancelled() => anyhow::bail!("stopped before the database was reachable"),
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}
