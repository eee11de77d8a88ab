//! The upstream pool's background work, as a Pingora background service: resolving the servers again every
//! `resolve_interval_secs` and checking every instance every `health.interval_ms`; the readiness check `upstream`
//! is true while at least one instance is in rotation. The proxy waits for the first round (see `main`).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use edge::upstream::{Discovery, Pool};
use pingora::server::ShutdownWatch;
use pingora::services::ServiceReadyNotifier;
use pingora::services::background::BackgroundService;
use service_core::admin::Readiness;
use tokio::sync::Mutex;

pub struct UpstreamWatch {
    pub pool: Arc<Pool>,
    pub discovery: Mutex<Discovery>,
    pub resolve_every: Duration,
    pub check_every: Duration,
    pub readiness: Readiness,
}

impl UpstreamWatch {
    async fn resolve(&self) {
        let errors = self.discovery.lock().await.refresh(&self.pool).await;
        for e in errors {
            tracing::warn!(error = %e, "resolving an upstream server failed; keeping its previous addresses");
        }
    }

    async fn check(&self) {
        self.pool.check_all().await;
        self.readiness.set("upstream", self.pool.any_available());
    }

    /// Resolves and checks again, every interval, until shutdown.
    async fn watch(&self, mut shutdown: ShutdownWatch) {
        let mut resolve = tokio::time::interval(self.resolve_every);
        let mut check = tokio::time::interval(self.check_every);
        for t in [&mut resolve, &mut check] {
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t.reset();
        }
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = resolve.tick() => self.resolve().await,
                _ = check.tick() => self.check().await,
            }
        }
    }
}

#[async_trait]
impl BackgroundService for UpstreamWatch {
    /// Ready (the proxy, which depends on this service, starts accepting) after the first resolution and
    /// health check, whatever they found: with every instance down the proxy answers 503 at once.
    async fn start_with_ready_notifier(&self, shutdown: ShutdownWatch, ready: ServiceReadyNotifier) {
        self.resolve().await;
        self.check().await;
        ready.notify_ready();
        self.watch(shutdown).await;
    }
}
