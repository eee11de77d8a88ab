//! The workers: Kafka consumer jobs. `workers migrate` applies the schema; `workers run` runs the jobs.

mod config;
mod db;
mod dlq;
mod jobs;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use service_core::admin::{self, AdminState, Readiness};
use service_core::metrics::Metrics;

use crate::config::Config;

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
    /// Run the jobs (the default).
    Run,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config: Config = service_core::config::load(cli.config.as_deref(), "WORKERS_")?;
    service_core::logging::init(&config.log);
    let pool = service_core::db::pool(&config.database, service_core::db::Access::ReadWrite)?;
    match cli.cmd.unwrap_or(Cmd::Run) {
        Cmd::Migrate => {
            let n = db::migrate::run(&pool).await.context("migrating the database")?;
            tracing::info!(applied = n, "schema up to date");
            Ok(())
        }
        Cmd::Run => run(config, pool).await,
    }
}

async fn run(config: Config, pool: deadpool_postgres::Pool) -> anyhow::Result<()> {
    let shutdown = service_core::shutdown::on_signals().context("installing signal handlers")?;
    let metrics = Metrics::new("workers")?;
    let readiness = Readiness::new(&["database", "consumer"]);
    let (admin_addr, admin_task) = admin::spawn(
        config.admin_listen,
        AdminState { readiness: readiness.clone(), metrics: metrics.clone() },
        shutdown.child_token(),
    )
    .await
    .with_context(|| format!("binding admin listener {}", config.admin_listen))?;
    tracing::info!(admin = %admin_addr, "workers starting");

    if config.migrate_on_start {
        migrate_until_done(&pool, &shutdown).await?;
    }
    readiness.set("database", true);

    let processed = metrics
        .meter()
        .u64_counter("worker.messages.processed")
        .with_description("Messages handled by a job, by outcome")
        .build();
    let job = jobs::persist::PersistJob {
        pool,
        dead_letters: dlq::DeadLetters::new(&config.kafka.brokers, &config.kafka.dlq_topic)?,
        kafka: config.kafka,
        readiness,
        processed,
    };
    let result = job.run(shutdown.clone()).await;
    shutdown.cancel();
    let _ = admin_task.await;
    result
}

/// Waits for the database at start (it may come up after us), then migrates.
async fn migrate_until_done(
    pool: &deadpool_postgres::Pool,
    stop: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
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
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                }
            }
        }
    }
}
