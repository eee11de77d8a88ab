//! The admin listener: `/healthz` (liveness), `/readyz` (readiness) and `/metrics` (Prometheus text), on a port
//! of its own so that probes and scrapes never compete with traffic and are never exposed with it.
//!
//! Liveness says the process can make progress; readiness says it should get traffic. A service registers the
//! named checks that make it ready (for example `kafka` and `jwks`) and flips them as its dependencies come and go;
//! `/readyz` answers 503 with the names of the failing checks until all pass.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// The named readiness checks of a service. Cheap to clone; all clones share the state.
#[derive(Clone, Default)]
pub struct Readiness {
    checks: Arc<Mutex<BTreeMap<&'static str, bool>>>,
}

impl Readiness {
    /// A readiness with the given checks, all failing until set.
    pub fn new(checks: &[&'static str]) -> Self {
        let r = Self::default();
        for c in checks {
            r.set(c, false);
        }
        r
    }

    pub fn set(&self, check: &'static str, ok: bool) {
        if let Ok(mut m) = self.checks.lock() {
            let before = m.insert(check, ok);
            if before != Some(ok) {
                tracing::info!(check, ok, "readiness changed");
            }
        }
    }

    /// The checks that fail now (empty when ready).
    pub fn failing(&self) -> Vec<&'static str> {
        match self.checks.lock() {
            Ok(m) => m.iter().filter(|(_, ok)| !**ok).map(|(k, _)| *k).collect(),
            Err(_) => vec!["poisoned"],
        }
    }

    /// Whether `check` passes now (an unknown check does not).
    pub fn is_ok(&self, check: &str) -> bool {
        self.checks.lock().map(|m| m.get(check).copied().unwrap_or(false)).unwrap_or(false)
    }

    pub fn is_ready(&self) -> bool {
        self.failing().is_empty()
    }

    /// Every check and whether it passes now.
    pub fn checks(&self) -> Vec<(&'static str, bool)> {
        self.checks.lock().map(|m| m.iter().map(|(k, v)| (*k, *v)).collect()).unwrap_or_default()
    }
}

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    pub readiness: Readiness,
    pub metrics: Metrics,
}

/// Binds the admin listener. Separate from [`serve`] so that a bind failure stops the service at start.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves the admin endpoints until `shutdown` is cancelled, then lets open exchanges finish.
pub async fn serve(listener: TcpListener, state: AdminState, shutdown: CancellationToken) {
    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    continue;
                }
            },
        };
        let state = state.clone();
        let service = service_fn(move |req| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(route(&state, &req)) }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
    graceful.shutdown().await;
}

fn route(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n".into());
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => {
            let failing = state.readiness.failing();
            if failing.is_empty() {
                text(StatusCode::OK, "ready\n".into())
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", failing.join(", ")))
            }
        }
        "/metrics" => match state.metrics.render() {
            Ok(body) => {
                let mut r = text(StatusCode::OK, body);
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                r
            }
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

/// Starts the admin listener on its own task. Returns the bound address (useful with port 0).
pub async fn spawn(
    addr: SocketAddr,
    state: AdminState,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = bind(addr).await?;
    let local = listener.local_addr()?;
    tracing::info!(%local, "admin listening");
    Ok((local, tokio::spawn(serve(listener, state, shutdown))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_lists_failing_checks_until_all_pass() {
        let r = Readiness::new(&["kafka", "jwks"]);
        assert_eq!(r.failing(), vec!["jwks", "kafka"]);
        r.set("kafka", true);
        assert_eq!(r.failing(), vec!["jwks"]);
        r.set("jwks", true);
        assert!(r.is_ready());
        r.set("kafka", false);
        assert!(!r.is_ready());
    }
}
