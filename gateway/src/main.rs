//! The gateway: the order API behind the edge. Stateless; run as many replicas as needed.

mod api;
mod auth;
mod config;
mod idempotency;
mod publish;
mod read;
mod replies;
mod server;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use service_core::admin::{self, AdminState, Readiness};
use service_core::metrics::Metrics;

use crate::auth::keys::KeySource;
use crate::auth::{KeyStore, Verifier};
use crate::config::Config;

#[derive(Parser)]
#[command(about = "Order API gateway")]
struct Cli {
    /// TOML configuration file; environment variables `GATEWAY_*` override it.
    #[arg(long, env = "GATEWAY_CONFIG")]
    config: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config: Config = service_core::config::load(cli.config.as_deref(), "GATEWAY_")?;
    let _logs = service_core::logging::init(&config.log, service_core::logging::Writer::Background);
    let tracing = service_core::telemetry::init("gateway")?;
    let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
    let result = runtime.block_on(run(config));
    drop(runtime);
    tracing.shutdown();
    result
}

async fn run(config: Config) -> anyhow::Result<()> {
    let shutdown = service_core::shutdown::on_signals().context("installing signal handlers")?;
    let metrics = Metrics::new("gateway")?;
    let readiness = Readiness::new(&["jwks", "kafka", "replies", "serving"]);
    metrics.observe_readiness(&readiness);
    // The admin listener outlives the drain: probes see `serving` go false while in-flight requests finish.
    let admin_stop = tokio_util::sync::CancellationToken::new();
    let (admin_addr, admin_task) = admin::spawn(
        config.admin_listen,
        AdminState { readiness: readiness.clone(), metrics: metrics.clone() },
        admin_stop.clone(),
    )
    .await
    .with_context(|| format!("binding admin listener {}", config.admin_listen))?;

    let auth = &config.auth;
    let source = match (&auth.jwks_url, auth.discovery, &auth.jwks_file) {
        (Some(url), _, _) => KeySource::Url(url.clone()),
        (None, true, _) => KeySource::Discovery { issuer: auth.issuer.clone() },
        (None, false, Some(file)) => KeySource::File(file.clone()),
        (None, false, None) => anyhow::bail!("auth: set jwks_url, discovery or jwks_file"),
    };
    let keys = KeyStore::new(source, Duration::from_secs(auth.jwks_min_refresh_secs));
    {
        let readiness = readiness.clone();
        let every = Duration::from_secs(config.auth.jwks_refresh_secs.max(1));
        tokio::spawn(keys.clone().refresh_loop(every, shutdown.child_token(), move |ok| readiness.set("jwks", ok)));
    }
    let verifier = Verifier::new(keys, &auth.issuer, &auth.audience, auth.leeway_secs, auth.token_cache_size);

    let publisher = publish::Publisher::new(&config.kafka, readiness.clone())?;
    tokio::spawn(probe_kafka(publisher.clone(), readiness.clone(), shutdown.child_token()));

    let duration = metrics
        .meter()
        .f64_histogram("http.server.request.duration")
        .with_unit("s")
        .with_description("Duration of HTTP requests handled by the gateway")
        .with_boundaries(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
        .build();
    let orders_db = service_core::db::pool(&config.database, service_core::db::Access::ReadOnly)?;
    let idempotency = if config.idempotency.enabled {
        let mut db = config.database.clone();
        db.pool_size = config.idempotency.pool_size.max(1);
        let pool = service_core::db::pool(&db, service_core::db::Access::ReadWriteBounded)?;
        // A claim outlives any request that holds it: the publish timeout, the sync wait, and a margin.
        let lease =
            Duration::from_millis(config.kafka.delivery_timeout_ms + config.sync.timeout_ms) + Duration::from_secs(30);
        let ttl = Duration::from_secs(config.idempotency.ttl_secs.max(1));
        anyhow::ensure!(
            ttl > lease,
            "idempotency.ttl_secs ({}) must exceed the longest a request can hold its key ({} s: \
             kafka.delivery_timeout_ms + sync.timeout_ms + 30 s)",
            ttl.as_secs(),
            lease.as_secs()
        );
        let store = Arc::new(idempotency::Store::new(pool, ttl, lease));
        let every = Duration::from_secs(config.idempotency.purge_interval_secs.max(1));
        tokio::spawn(store.clone().purge_loop(every, shutdown.child_token()));
        Some(store)
    } else {
        None
    };
    let replies = replies::Replies::start(&config.kafka, readiness.clone(), shutdown.child_token())?;
    let api = Arc::new(api::Api {
        verifier,
        publisher: publisher.clone(),
        replies,
        sync_timeout: Duration::from_millis(config.sync.timeout_ms),
        in_flight: Arc::new(tokio::sync::Semaphore::new(config.max_in_flight.max(1))),
        readiness: readiness.clone(),
        orders_db,
        idempotency,
        max_body_bytes: config.max_body_bytes,
        duration,
        tracer: service_core::telemetry::tracer("gateway"),
        db_name: service_core::db::trace::namespace(&config.database.url),
    });

    let listener =
        tokio::net::TcpListener::bind(config.listen).await.with_context(|| format!("binding {}", config.listen))?;
    tracing::info!(listen = %listener.local_addr()?, admin = %admin_addr, "gateway started");
    readiness.set("serving", true);
    {
        let (readiness, shutdown) = (readiness.clone(), shutdown.clone());
        tokio::spawn(async move {
            shutdown.cancelled().await;
            readiness.set("serving", false);
        });
    }
    server::serve(listener, api, shutdown.clone(), Duration::from_secs(config.shutdown_timeout_secs)).await;

    tokio::task::spawn_blocking(move || publisher.flush(Duration::from_secs(5))).await?;
    admin_stop.cancel();
    let _ = admin_task.await;
    tracing::info!("gateway stopped");
    Ok(())
}

/// Keeps the `kafka` readiness check current: the broker answers and the commands topic exists.
async fn probe_kafka(publisher: publish::Publisher, readiness: Readiness, stop: tokio_util::sync::CancellationToken) {
    loop {
        let p = publisher.clone();
        let ok = match tokio::task::spawn_blocking(move || p.probe()).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "Kafka not reachable or commands topic missing");
                false
            }
            Err(_) => false,
        };
        readiness.set("kafka", ok);
        // Every second while failing; every 10 s while fine, or at once when the producer reports all brokers
        // down (it turns the check off itself; the probe is what turns it on again).
        for _ in 0..if ok { 10 } else { 1 } {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            if !readiness.is_ok("kafka") {
                break;
            }
        }
    }
}
