//! Policy hot reload, as a Pingora background service: the policy directory is checked for changes every few
//! seconds (modification times and sizes, which also catches a Kubernetes ConfigMap's symlink swap) and at once
//! on SIGHUP. A valid policy replaces the old one atomically; an invalid one is refused, logged with every
//! located error, and counted, and the old policy stays. Drained buckets are swept on the same timer. The TLS
//! certificate is reloaded the same way ([`CertReloader`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use edge::limiter::Limiter;
use edge::policy;
use opentelemetry::KeyValue;
use opentelemetry::metrics::Counter;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::signal::unix::{SignalKind, signal};

pub struct PolicyReloader {
    pub dir: PathBuf,
    pub interval: Duration,
    pub limiter: Arc<Limiter>,
    pub reloads: Counter<u64>,
}

/// What identifies the directory's content cheaply: each policy file's name, size and modification time.
fn fingerprint(dir: &Path) -> Vec<(PathBuf, Stamp)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "toml"))
        .map(|e| (e.path(), stamp(&e.path())))
        .collect();
    v.sort();
    v
}

/// A file's size and modification time.
type Stamp = (u64, Option<SystemTime>);

/// `path`'s stamp; `metadata` follows symlinks, so a swapped ConfigMap or Secret target shows up here.
fn stamp(path: &Path) -> Stamp {
    let md = std::fs::metadata(path).ok();
    (md.as_ref().map_or(0, |m| m.len()), md.and_then(|m| m.modified().ok()))
}

impl PolicyReloader {
    fn reload(&self, why: &str) -> bool {
        match policy::load_dir(&self.dir) {
            Ok(p) => {
                let (zones, routes) = (p.zones.len(), p.routes.len());
                self.limiter.replace(p);
                self.reloads.add(1, &[KeyValue::new("result", "ok")]);
                tracing::info!(why, zones, routes, dir = %self.dir.display(), "rate-limit policy reloaded");
                true
            }
            Err(errors) => {
                self.reloads.add(1, &[KeyValue::new("result", "failed")]);
                tracing::error!(why, dir = %self.dir.display(), errors = %errors,
                    "invalid rate-limit policy refused; the previous policy stays in force");
                false
            }
        }
    }
}

/// Something reloaded from files: at once on SIGHUP, else when the fingerprint of its files changes (checked
/// every `interval`).
trait Watched: Sync {
    type Print: PartialEq + Send;
    fn fingerprint(&self) -> Self::Print;
    /// Whether the new content was taken.
    fn reload(&self, why: &str) -> bool;
    /// Try a refused content again at every tick (until taken or changed), rather than wait for the next change.
    fn retry_refused(&self) -> bool {
        false
    }
    /// Other periodic work on the same timer.
    fn tick(&self) {}
}

async fn watch<W: Watched>(w: &W, interval: Duration, mut shutdown: ShutdownWatch) {
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "no SIGHUP handler; reloading on file changes only");
            None
        }
    };
    let mut seen = w.fingerprint();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = async { match hup.as_mut() { Some(h) => { h.recv().await; } None => std::future::pending().await } } => {
                let now = w.fingerprint();
                if w.reload("SIGHUP") || !w.retry_refused() {
                    seen = now;
                }
            }
            _ = tick.tick() => {
                let now = w.fingerprint();
                if now != seen && (w.reload("files changed") || !w.retry_refused()) {
                    seen = now;
                }
                w.tick();
            }
        }
    }
}

impl Watched for PolicyReloader {
    type Print = Vec<(PathBuf, Stamp)>;

    fn fingerprint(&self) -> Self::Print {
        fingerprint(&self.dir)
    }

    fn reload(&self, why: &str) -> bool {
        PolicyReloader::reload(self, why)
    }

    fn tick(&self) {
        let swept = self.limiter.sweep();
        if swept > 0 {
            tracing::debug!(swept, "forgot drained rate-limit keys");
        }
    }
}

#[async_trait]
impl BackgroundService for PolicyReloader {
    async fn start(&self, shutdown: ShutdownWatch) {
        watch(self, self.interval, shutdown).await;
    }
}

/// Certificate hot reload: the certificate and key files are checked every `interval` (size and modification
/// time, following symlinks: a Kubernetes Secret volume swaps a symlink) and reloaded at once on SIGHUP. A bad
/// pair (unreadable, key not matching, expired) is refused and counted; the served pair stays.
pub struct CertReloader {
    pub store: Arc<crate::tls::CertStore>,
    pub interval: Duration,
    pub reloads: Counter<u64>,
}

impl CertReloader {
    fn files(&self) -> [Stamp; 2] {
        [stamp(&self.store.cert_path), stamp(&self.store.key_path)]
    }

    fn reload(&self, why: &str) -> bool {
        match self.store.reload() {
            Ok(pair) => {
                self.reloads.add(1, &[KeyValue::new("result", "ok")]);
                tracing::info!(why, cert = %self.store.cert_path.display(), sha256 = %pair.fingerprint,
                    "TLS certificate reloaded; new connections get it");
                true
            }
            Err(e) => {
                self.reloads.add(1, &[KeyValue::new("result", "failed")]);
                tracing::error!(why, error = %e,
                    "TLS certificate refused; the previous certificate stays in use (tried again every interval)");
                false
            }
        }
    }
}

impl Watched for CertReloader {
    type Print = [Stamp; 2];

    fn fingerprint(&self) -> Self::Print {
        self.files()
    }

    fn reload(&self, why: &str) -> bool {
        CertReloader::reload(self, why)
    }

    /// A renewed certificate refused for a passing reason (files caught mid-write, `notBefore` a little ahead of
    /// this clock) is tried again at every tick: the old one may be about to expire.
    fn retry_refused(&self) -> bool {
        true
    }
}

#[async_trait]
impl BackgroundService for CertReloader {
    async fn start(&self, shutdown: ShutdownWatch) {
        watch(self, self.interval, shutdown).await;
    }
}
