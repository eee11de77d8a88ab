//! Downstream connections: how many are open (TLS handshakes included) and established, a global cap (over
//! it, new connections are closed before TLS, as a full `worker_connections` would leave them waiting), TLS
//! handshake outcomes, a deadline for a connection that does not send a complete request head (slowloris; nginx's
//! `client_header_timeout`, which closes without an answer), and nginx's `limit_conn`: requests in flight per
//! client key.
//!
//! Pingora 0.9.1 has no hook for a connection's end or for a failed handshake; what it has: a connection filter
//! (before TLS, feature `connection_filter`), a pre-TLS callback that may attach a tracer to the socket, whose
//! `on_disconnected` runs when the socket is dropped (handshake failed or connection done), and the service's
//! app, which gets each connection after its handshake and holds it until it ends. Connections are known by
//! their peer address (unique among live connections to one listener).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use edge::limits::Key;
use futures_util::task::AtomicWaker;
use opentelemetry::KeyValue;
use opentelemetry::metrics::Counter;
use pingora::apps::ServerApp;
use pingora::listeners::{ConnectionFilter, PreTlsProcess};
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::{GetSocketDigest, Stream};
use pingora::server::ShutdownWatch;
use pingora::upstreams::peer::{Tracer, Tracing};

/// The limits, from `[limits]`.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub max_connections: u64,
    /// For a new connection's first request head.
    pub header_timeout: Duration,
    /// For a kept-alive connection's next complete request head, from the end of its last request. The edge's
    /// only keep-alive deadline for HTTP/1.1: Pingora's own (a runtime timer armed on every idle read, created
    /// and dropped per request) is off. HTTP/2 has Pingora's idle timeout, set to the same value.
    pub keepalive_timeout: Duration,
    /// Requests in flight per client key; 0: no limit.
    pub max_requests_per_client: u32,
}

pub struct Metrics {
    /// `result`: `ok`, `failed` (closed before its handshake completed).
    pub handshakes: Counter<u64>,
    /// `reason`: `max_connections`.
    pub refused: Counter<u64>,
    /// Closed by the edge, `reason`: `header_timeout` (no complete request head in time), `idle`.
    pub closed: Counter<u64>,
}

pub struct Connections {
    settings: Settings,
    metrics: Metrics,
    epoch: Instant,
    /// Looked up on every request: foldhash, not SipHash (the keys are the edge's own peers' addresses).
    live: Mutex<HashMap<SocketAddr, Arc<Conn>, foldhash::fast::RandomState>>,
    open: AtomicU64,
    established: AtomicU64,
    /// Looked up on every request too (when the limit is on): foldhash with a per-process seed, as the zones.
    in_flight_per_client: Mutex<HashMap<Key, u32, foldhash::fast::RandomState>>,
}

/// One live connection.
struct Conn {
    established: AtomicBool,
    gone: AtomicBool,
    in_flight: AtomicU32,
    served: AtomicBool,
    /// Milliseconds since `epoch` when the connection last had no request in flight.
    idle_since_ms: AtomicU64,
}

impl Connections {
    pub fn new(settings: Settings, metrics: Metrics) -> Arc<Self> {
        Arc::new(Self {
            settings,
            metrics,
            epoch: Instant::now(),
            live: Mutex::default(),
            open: AtomicU64::new(0),
            established: AtomicU64::new(0),
            in_flight_per_client: Mutex::default(),
        })
    }

    /// Open connections: (handshaking, established).
    pub fn counts(&self) -> (u64, u64) {
        let open = self.open.load(Ordering::Relaxed);
        let established = self.established.load(Ordering::Relaxed);
        (open.saturating_sub(established), established)
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn find(&self, addr: &SocketAddr) -> Option<Arc<Conn>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner()).get(addr).cloned()
    }

    /// A request of the connection from `peer` starts; its end (the guard's drop) makes the connection idle.
    pub fn request_started(self: &Arc<Self>, peer: Option<SocketAddr>) -> Option<RequestGuard> {
        let conn = self.find(&peer?)?;
        conn.in_flight.fetch_add(1, Ordering::AcqRel);
        Some(RequestGuard { conns: self.clone(), conn })
    }

    /// Counts a request in flight for client `key`; `None` when the client already has the maximum (nginx
    /// `limit_conn`; the edge answers 429).
    pub fn client_request(self: &Arc<Self>, key: Key) -> Option<ClientGuard> {
        let max = self.settings.max_requests_per_client;
        let mut counts = self.in_flight_per_client.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(key).or_insert(0);
        if max > 0 && *n >= max {
            return None;
        }
        *n += 1;
        Some(ClientGuard { conns: self.clone(), key })
    }

    /// Resolves when `conn` has gone without a request in flight for longer than allowed, having counted and
    /// logged why.
    ///
    /// Nothing wakes it when a request starts or ends (that would cost every request); instead it never sleeps
    /// past a deadline that a request ending meanwhile could set: a request that ends at `e` gives the connection
    /// until `e + keepalive_timeout`, and `e` is after the sleep began, so no sleep is longer than
    /// `keepalive_timeout` unless the connection is idle and already served (its deadline can then only move
    /// later). While requests are in flight that is one timer per `keepalive_timeout`.
    ///
    /// `h2`: the connection's idleness is Pingora's to close (see `Tracked`); its deadline once served is
    /// `header_timeout + keepalive_timeout`, a backstop.
    async fn deadline(&self, conn: &Conn, h2: bool) {
        let keepalive = self.settings.keepalive_timeout;
        let served_limit = if h2 { self.settings.header_timeout + keepalive } else { keepalive };
        let served = loop {
            let served = conn.served.load(Ordering::Acquire);
            if conn.in_flight.load(Ordering::Acquire) > 0 {
                tokio::time::sleep(keepalive).await;
                continue;
            }
            let limit = if served { served_limit } else { self.settings.header_timeout };
            let idle = Duration::from_millis(self.now_ms().saturating_sub(conn.idle_since_ms.load(Ordering::Acquire)));
            match limit.checked_sub(idle) {
                Some(left) if !left.is_zero() => {
                    tokio::time::sleep(if served { left } else { left.min(keepalive) }).await;
                }
                _ => break served,
            }
        };
        // Counted here, before the caller drops (and so closes) the connection: a client that sees the close
        // finds it counted.
        if served {
            // The usual end of a kept-alive connection.
            self.metrics.closed.add(1, &[KeyValue::new("reason", "idle")]);
            tracing::debug!(reason = "idle", "closed an idle kept-alive connection");
        } else {
            self.metrics.closed.add(1, &[KeyValue::new("reason", "header_timeout")]);
            tracing::info!(reason = "header_timeout", "closed a connection that sent no complete request in time");
        }
    }
}

/// Held while a request is in flight on its connection.
pub struct RequestGuard {
    conns: Arc<Connections>,
    conn: Arc<Conn>,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.conn.idle_since_ms.store(self.conns.now_ms(), Ordering::Release);
        self.conn.served.store(true, Ordering::Release);
        self.conn.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Held while a request of a client key is in flight.
pub struct ClientGuard {
    conns: Arc<Connections>,
    key: Key,
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        let mut counts = self.conns.in_flight_per_client.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

fn peer_of(digest: Option<Arc<pingora::protocols::SocketDigest>>) -> Option<SocketAddr> {
    digest?.peer_addr()?.as_inet().copied()
}

/// Before TLS: refuses connections over the cap (the listener drops them; the client sees the connection
/// closed before any TLS byte). The cap is soft by the connections accepted but not yet registered (counted in
/// their own task a moment later): a few over it in a burst of accepts.
#[derive(Clone)]
pub struct Cap(pub Arc<Connections>);

impl std::fmt::Debug for Cap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cap").field("max", &self.0.settings.max_connections).finish()
    }
}

#[async_trait]
impl ConnectionFilter for Cap {
    async fn should_accept(&self, _addr: Option<&SocketAddr>) -> bool {
        let ok = self.0.open.load(Ordering::Acquire) < self.0.settings.max_connections;
        if !ok {
            self.0.metrics.refused.add(1, &[KeyValue::new("reason", "max_connections")]);
        }
        ok
    }
}

/// Before TLS: registers the connection and attaches the tracer that sees it go.
pub struct Register(pub Arc<Connections>);

#[async_trait]
impl PreTlsProcess for Register {
    async fn process(&self, stream: &mut L4Stream) -> pingora::Result<()> {
        let Some(addr) = peer_of(stream.get_socket_digest()) else { return Ok(()) };
        let conns = &self.0;
        let conn = Arc::new(Conn {
            established: AtomicBool::new(false),
            gone: AtomicBool::new(false),
            in_flight: AtomicU32::new(0),
            served: AtomicBool::new(false),
            idle_since_ms: AtomicU64::new(conns.now_ms()),
        });
        conns.open.fetch_add(1, Ordering::AcqRel);
        conns.live.lock().unwrap_or_else(|e| e.into_inner()).insert(addr, conn.clone());
        stream.tracer = Some(Tracer(Box::new(Ticket { conns: conns.clone(), addr, conn })));
        Ok(())
    }
}

/// Sees the socket dropped: the connection is over (or its handshake failed).
#[derive(Clone)]
struct Ticket {
    conns: Arc<Connections>,
    addr: SocketAddr,
    conn: Arc<Conn>,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket").field("addr", &self.addr).finish()
    }
}

impl Tracing for Ticket {
    fn on_connected(&self) {}

    fn on_disconnected(&self) {
        // Clones of the tracer share `conn`: count the end once.
        if self.conn.gone.swap(true, Ordering::AcqRel) {
            return;
        }
        let c = &self.conns;
        c.open.fetch_sub(1, Ordering::AcqRel);
        {
            let mut live = c.live.lock().unwrap_or_else(|e| e.into_inner());
            if live.get(&self.addr).is_some_and(|x| Arc::ptr_eq(x, &self.conn)) {
                live.remove(&self.addr);
            }
        }
        if self.conn.established.load(Ordering::Acquire) {
            c.established.fetch_sub(1, Ordering::AcqRel);
        } else {
            c.metrics.handshakes.add(1, &[KeyValue::new("result", "failed")]);
        }
    }

    fn boxed_clone(&self) -> Box<dyn Tracing> {
        Box::new(self.clone())
    }
}

/// The proxy, holding each established connection under its deadline.
pub struct Tracked<A> {
    pub inner: Arc<A>,
    pub conns: Arc<Connections>,
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Tracked<A> {
    async fn process_new(self: &Arc<Self>, stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        let Some(conn) = peer_of(stream.get_socket_digest()).and_then(|a| self.conns.find(&a)) else {
            return self.inner.process_new(stream, shutdown).await;
        };
        if !conn.established.swap(true, Ordering::AcqRel) {
            self.conns.established.fetch_add(1, Ordering::AcqRel);
            self.conns.metrics.handshakes.add(1, &[KeyValue::new("result", "ok")]);
        }
        // HTTP/2: Pingora's idle timeout (`keepalive_timeout_secs` too) closes an idle connection, and it counts a
        // stream as busy from its acceptance, before the stream's task reaches `early_request_filter`; the
        // watchdog's keep-alive deadline would race it at the same instant. It stays a backstop there.
        let h2 = matches!(stream.selected_alpn_proto(), Some(pingora::protocols::ALPN::H2));
        let serve = self.inner.process_new(stream, shutdown);
        // The stream is closed when `serve` is dropped, after the deadline counted the close (`deadline`).
        match UntilDeadline::new(serve, Box::pin(self.conns.deadline(&conn, h2))).await {
            Ended::Served(kept) => kept,
            Ended::Deadline(()) => None,
        }
    }

    async fn cleanup(&self) {
        // The proxy's cleanup wakes kept-alive connections waiting for a request when the server stops.
        self.inner.cleanup().await;
    }
}

/// How a connection raced against its deadline ended.
enum Ended<S, D> {
    Served(S),
    Deadline(D),
}

/// `serve` until it ends, or `deadline` if that comes first. As `tokio::select!`, except that `deadline` is
/// polled only when its own timer woke the task (and on the first poll): the connection's task wakes about four
/// times per request, and `select!` polled the timer each time (~120 instructions, plus a random draw).
struct UntilDeadline<S, D> {
    serve: S,
    deadline: D,
    wake: Arc<DeadlineWake>,
    waker: Waker,
    first: bool,
}

/// The deadline's waker: marks it due, then wakes the task.
#[derive(Default)]
struct DeadlineWake {
    due: AtomicBool,
    task: AtomicWaker,
}

impl Wake for DeadlineWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.due.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<S: Future + Unpin, D: Future + Unpin> UntilDeadline<S, D> {
    fn new(serve: S, deadline: D) -> Self {
        let wake = Arc::new(DeadlineWake::default());
        let waker = Waker::from(wake.clone());
        Self { serve, deadline, wake, waker, first: true }
    }
}

impl<S: Future + Unpin, D: Future + Unpin> Future for UntilDeadline<S, D> {
    type Output = Ended<S::Output, D::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if let Poll::Ready(v) = Pin::new(&mut this.serve).poll(cx) {
            return Poll::Ready(Ended::Served(v));
        }
        // The task's waker first: a timer firing after the check below still wakes the task.
        this.wake.task.register(cx.waker());
        if std::mem::take(&mut this.first) || this.wake.due.swap(false, Ordering::AcqRel) {
            let mut own = TaskContext::from_waker(&this.waker);
            if let Poll::Ready(v) = Pin::new(&mut this.deadline).poll(&mut own) {
                return Poll::Ready(Ended::Deadline(v));
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_deadline_ends_a_connection_that_is_not_done() {
        let serve = Box::pin(std::future::pending::<()>());
        let deadline = Box::pin(async {
            // A deadline that re-arms once, as `Connections::deadline` does while a request is in flight.
            tokio::time::sleep(Duration::from_secs(1)).await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            "idle"
        });
        let start = tokio::time::Instant::now();
        let ended = UntilDeadline::new(serve, deadline).await;
        assert!(matches!(ended, Ended::Deadline("idle")));
        assert_eq!(start.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_ends_first_is_served() {
        let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let _ = tx.send(7);
        });
        let deadline = Box::pin(async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            "idle"
        });
        let ended = UntilDeadline::new(rx, deadline).await;
        assert!(matches!(ended, Ended::Served(Ok(7))));
    }
}
