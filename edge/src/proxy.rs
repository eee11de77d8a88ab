//! The request's life through the edge, written as Pingora's phases:
//! `request_filter` names the request and applies the rate limits (see `ratelimit`), `upstream_peer` picks a
//! gateway instance from the pool (see `edge::upstream`), `fail_to_connect` / `error_while_proxy` report failures
//! and decide retries on another instance, `upstream_request_filter` sets the forwarding headers,
//! `response_filter` echoes the request id and the rate-limit headers, `logging` records the metrics.

use std::borrow::Cow;
use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use edge::limiter::Limiter;
use edge::upstream::{Lease, Pool};
use http::HeaderValue;
use opentelemetry::KeyValue;
use opentelemetry::global::BoxedTracer;
use opentelemetry::metrics::Counter;
use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::{HttpPeer, ProxyHttp, Result, Session};
use pingora::proxy::FailToProxy;
use pingora::{ErrorSource, ErrorType};
use service_core::metrics::{Histogram, HistogramVec};
use service_core::problem::Problem;
use service_core::telemetry::{self, Context, TraceContextExt as _};

use crate::connections::{ClientGuard, Connections, RequestGuard};
use crate::metric_cache::{self, Children};
use crate::ratelimit::{self, Applied, LimitMetrics};

pub const REQUEST_ID: &str = "x-request-id";
/// Header names looked up on every request, made once (a name given as text is parsed at each lookup).
const X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static(REQUEST_ID);
const X_FORWARDED_FOR: http::HeaderName = http::HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_HOST: http::HeaderName = http::HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PROTO: http::HeaderName = http::HeaderName::from_static("x-forwarded-proto");
const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");

/// What the edge remembers about one request.
pub struct RequestCtx {
    started: Instant,
    /// The client's `X-Request-Id` when it is short and plain, else a new one; empty until `request_filter`.
    request_id: HeaderValue,
    limits: Applied,
    /// The request's SERVER span (a no-op span carrying the incoming context when tracing is off).
    trace: Context,
    /// The instance the request is on (counted as in flight while held).
    lease: Option<Lease>,
    /// Instances this request failed on: a retry goes elsewhere.
    tried: Vec<SocketAddr>,
    /// When the current instance was picked, and how long until its response header came (the access log).
    upstream_started: Option<Instant>,
    upstream_ms: Option<f64>,
    /// The trace id sent upstream in `traceparent`.
    trace_id: Option<TraceId>,
    /// The request came with `X-Forwarded-For` (set by `request_filter`).
    forwarded: bool,
    /// The body limit of the request's path, and the body bytes seen so far.
    body_limit: u64,
    body_seen: u64,
    /// The connection has a request in flight (its idle deadline waits) while held.
    _connection: Option<RequestGuard>,
    /// The client key's slot among its requests in flight (`limits.max_requests_per_client`).
    _client_slot: Option<ClientGuard>,
    /// The instance timed out while the client had not finished sending the body: the client's fault (408).
    client_stalled: bool,
    /// When the last chunk of the request body came.
    last_body_at: Option<Instant>,
    /// The client's `User-Agent` (the access log).
    user_agent: Option<HeaderValue>,
}

impl RequestCtx {
    /// The request id as text (ASCII by construction; empty before `request_filter`).
    fn request_id(&self) -> &str {
        self.request_id.to_str().unwrap_or_default()
    }
}

/// Timeouts of the connections to the gateway instances.
pub struct PeerTimeouts {
    pub connect: Duration,
    pub read: Duration,
    pub idle: Duration,
}

pub struct EdgeProxy {
    pub pool: Arc<Pool>,
    pub timeouts: PeerTimeouts,
    pub max_tries: usize,
    pub retries: Counter<u64>,
    /// One JSON line per request on stdout.
    pub access_log: bool,
    pub limits: crate::config::Limits,
    pub conns: Arc<Connections>,
    /// `http_request_method`, `http_response_status_code`, `status_class`, `http_route`.
    pub duration: HistogramVec,
    /// Time until the instance's response header, per instance.
    pub upstream_duration: HistogramVec,
    pub limiter: Arc<Limiter>,
    pub limit_metrics: LimitMetrics,
    pub tracer: BoxedTracer,
}

#[async_trait]
impl ProxyHttp for EdgeProxy {
    /// Boxed: Pingora keeps the context by value in its per-request future (three times over, in the states of
    /// `process_new_http` and `process_request`), which is moved as a whole once per request; 496 bytes inline
    /// made that future 1,488 bytes larger than the bare proxy's and every request copied them.
    type CTX = Box<RequestCtx>;

    fn new_ctx(&self) -> Self::CTX {
        Box::new(RequestCtx {
            started: Instant::now(),
            request_id: HeaderValue::from_static(""),
            limits: Applied::default(),
            trace: Context::new(),
            lease: None,
            tried: Vec::new(),
            upstream_started: None,
            upstream_ms: None,
            trace_id: None,
            forwarded: false,
            body_limit: u64::MAX,
            body_seen: 0,
            _connection: None,
            _client_slot: None,
            client_stalled: false,
            last_body_at: None,
            user_agent: None,
        })
    }

    /// No downstream modules: Pingora adds a disabled response-compression module by default, which still costs
    /// a context per request and a pass over every response header and body chunk. The edge does not compress
    /// (the gateway's answers are small JSON; a client that wants compression gets it from a CDN in front).
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    /// The request head is in: the connection is busy, and this request's timeouts are set (Pingora reads and
    /// writes without a deadline unless told). Keep-alive without Pingora's timeout: the connection's watchdog
    /// (`connections::Tracked`) closes it `keepalive_timeout_secs` after this request if no complete head has
    /// come by then, with no timer per request (Pingora's arms a runtime timer on every idle read: made,
    /// registered, polled and dropped once per request). A client without a known peer address is not watched
    /// and keeps Pingora's timeout.
    async fn early_request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<()> {
        let peer = session.client_addr().and_then(|a| a.as_inet()).copied();
        ctx._connection = self.conns.request_started(peer);
        let l = &self.limits;
        // Only where Pingora keeps the connection for another request (HTTP/1.1 unless `Connection: close`; HTTP/1.0
        // only with `Connection: keep-alive`): setting it on an HTTP/1.0 request without it kept that connection
        // open after the response, where the client expects the close.
        if let Some(current) = session.get_keepalive() {
            let keepalive = if ctx._connection.is_some() { 0 } else { l.keepalive_timeout_secs.max(1) };
            // Usually already so (HTTP/1.1 keeps alive without a limit, `0`): setting it looks `Connection` up again.
            if current != keepalive {
                session.set_keepalive(Some(keepalive));
            }
        }
        session.set_read_timeout(Some(Duration::from_secs(l.body_timeout_secs.max(1))));
        session.set_write_timeout(Some(Duration::from_secs(l.send_timeout_secs.max(1))));
        Ok(())
    }

    /// The awaits here are boxed (the refusals, a rate-limit delay or rejection): rare, and inline they made this
    /// filter's future, which every request allocates and moves, ~2 KiB (`-Zprint-type-sizes`: 1,968 bytes);
    /// boxed, each is a pointer in it.
    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        let known = Known::scan(&session.req_header().headers);
        ctx.request_id =
            known.request_id.filter(|id| id.to_str().is_ok_and(is_valid_request_id)).unwrap_or_else(new_request_id);
        ctx.user_agent = known.user_agent;
        ctx.trace = self.server_span(session, ctx.request_id(), known.traceparent);
        // A head or a declared body over the limits is refused before anything else (no bucket is charged for
        // it); a body sent without a length is counted in `request_body_filter`.
        if let Some(problem) = self.head_over_limits(session) {
            Box::pin(self.refuse(session, ctx, problem, &[])).await;
            return Ok(true);
        }
        ctx.body_limit = self.limits.for_path(session.req_header().uri.path());
        let declared = known.content_length.as_ref().and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > ctx.body_limit) {
            let problem = Problem::new("payload-too-large", 413, "Content Too Large")
                .with_detail(format!("the request body exceeds {} bytes", ctx.body_limit));
            Box::pin(self.refuse(session, ctx, problem, &[])).await;
            return Ok(true);
        }
        // Who the client is, once: the requests-in-flight limit and the rate limits key on it.
        let active = self.limiter.active();
        let chain = if known.forwarded_for { forwarded_chain(&session.req_header().headers) } else { None };
        ctx.forwarded = chain.is_some();
        let client = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|peer| edge::client::client_ip(peer.ip(), chain.as_deref(), &active.policy.client.trusted_proxies));
        ctx.limits.client = client;
        match self.client_slot(&active, client) {
            Ok(slot) => ctx._client_slot = slot,
            Err(max) => {
                let problem = Problem::new("too-many-requests-in-flight", 429, "Too Many Requests")
                    .with_detail(format!("this client already has {max} requests in flight, the most allowed"));
                let retry = [(http::header::RETRY_AFTER, HeaderValue::from_static("1"))];
                Box::pin(self.refuse(session, ctx, problem, &retry)).await;
                return Ok(true);
            }
        }
        let next = ratelimit::apply(
            &self.limiter,
            &self.limit_metrics,
            session,
            known.authorization.as_ref().and_then(|v| v.to_str().ok()),
            ctx.request_id.to_str().unwrap_or_default(),
            &mut ctx.limits,
            &ctx.trace,
            active,
            client,
        );
        match next {
            ratelimit::Next::Pass => Ok(false),
            ratelimit::Next::Delay(wait) => {
                Box::pin(tokio::time::sleep(wait)).await;
                Ok(false)
            }
            ratelimit::Next::Reject { problem, headers } => {
                Box::pin(crate::respond::problem(session, &problem, ctx.request_id(), &headers)).await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Self::CTX) -> Result<Box<HttpPeer>> {
        // A retry: the previous instance failed this request.
        if let Some(previous) = ctx.lease.take() {
            ctx.tried.push(previous.instance.addr);
        }
        let Some(lease) = self.pool.pick(&ctx.tried) else {
            // Nobody to send it to: 503 at once (see fail_to_proxy), never a hang.
            return Err(pingora::Error::explain(ErrorType::ConnectNoRoute, "no healthy upstream instance"));
        };
        let mut peer = HttpPeer::new(lease.instance.addr, false, String::new());
        peer.options.connection_timeout = Some(self.timeouts.connect);
        peer.options.read_timeout = Some(self.timeouts.read);
        peer.options.idle_timeout = Some(self.timeouts.idle);
        ctx.lease = Some(lease);
        ctx.upstream_started = Some(Instant::now());
        Ok(Box::new(peer))
    }

    /// The request never reached the instance: always safe to try another one.
    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Self::CTX,
        mut e: Box<pingora::Error>,
    ) -> Box<pingora::Error> {
        if let Some(lease) = &ctx.lease {
            self.pool.report_failure(&lease.instance);
        }
        if ctx.tried.len() + 1 < self.max_tries {
            e.set_retry(true);
            self.retries.add(1, &[KeyValue::new("reason", "connect")]);
        }
        e
    }

    /// The exchange failed after the request was sent: only an idempotent request whose body is still buffered
    /// is tried again, on another instance.
    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<pingora::Error>,
        ctx: &mut Self::CTX,
        client_reused: bool,
    ) -> Box<pingora::Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        // The instance waited for a body the client stopped sending (nothing from it for as long as the instance's
        // read timeout): not the instance's fault.
        let quiet_since = ctx.last_body_at.unwrap_or(ctx.started);
        ctx.client_stalled = e.etype() == &ErrorType::ReadTimedout
            && !session.is_body_done()
            && quiet_since.elapsed() >= self.timeouts.read;
        let upstream_fault = e.esource() == &ErrorSource::Upstream && !ctx.client_stalled;
        // Only the instance's own failures count against it (not a client that went away), and a pooled
        // connection it had already closed says nothing about it, unless it stopped answering.
        let stale_pooled = client_reused && !matches!(e.etype(), ErrorType::ReadTimedout | ErrorType::WriteTimedout);
        if upstream_fault
            && !stale_pooled
            && let Some(lease) = &ctx.lease
        {
            self.pool.report_failure(&lease.instance);
        }
        // Again elsewhere only if nothing of the answer went to the client yet, the method is idempotent and its
        // body is still buffered.
        let replayable = session.req_header().method.is_idempotent()
            && !session.as_ref().retry_buffer_truncated()
            && session.response_written().is_none();
        let retry = upstream_fault && replayable && ctx.tried.len() + 1 < self.max_tries;
        e.set_retry(retry);
        if retry {
            self.retries.add(1, &[KeyValue::new("reason", "idempotent")]);
        }
        e
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<bytes::Bytes>,
        _end_of_stream: bool,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        if let Some(chunk) = body {
            ctx.last_body_at = Some(Instant::now());
            ctx.body_seen += chunk.len() as u64;
            if ctx.body_seen > ctx.body_limit {
                return Err(pingora::Error::explain(ErrorType::HTTPStatus(413), "request body over the limit"));
            }
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        _upstream_response: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        if let Some(lease) = &ctx.lease {
            self.pool.report_success(&lease.instance);
        }
        ctx.upstream_ms = ctx.upstream_started.map(|t| t.elapsed().as_secs_f64() * 1000.0);
        Ok(())
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        // Pingora keeps the client's header-name case in a second map, and both maps were sized for the
        // client's headers: each header added here grew and rehashed both (a quarter of the edge's own work per
        // request). The gateway reads names case-insensitively, so the request goes on without the case map
        // (standard names title-cased, others lower-case, as HTTP/2 sends them all), with room made once and
        // names made at compile time. Values are shared (reference-counted), not copied, wherever they can be.
        let (mut parts, restore) = take_request(upstream);
        let headers = &mut parts.headers;
        strip_hop_by_hop(headers);
        headers.reserve(5);
        // HTTP/2 clients send :authority instead of Host; either names the host the client asked for.
        let host = headers
            .get(http::header::HOST)
            .cloned()
            .or_else(|| parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()));
        if let Some(host) = host {
            headers.insert(X_FORWARDED_HOST, host);
        }
        let client_ip = session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip());
        // Most requests come without `X-Forwarded-For` (`request_filter` looked): no second lookup for them.
        let incoming = if ctx.forwarded { forwarded_chain(headers) } else { None };
        if let Some(v) = forwarded_for(incoming.as_deref(), client_ip) {
            headers.insert(X_FORWARDED_FOR, v);
        }
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        headers.insert(X_REQUEST_ID, ctx.request_id.clone());
        // The gateway's span is a child of ours; without tracing, a valid incoming context passes unchanged, and
        // a request without one still gets a fresh trace id to correlate logs.
        // The access log names the trace the upstream continues.
        let (traceparent, trace_id) = traceparent(&ctx.trace);
        ctx.trace_id = Some(trace_id);
        headers.insert(TRACEPARENT, traceparent);

        *upstream = restore.into_request(parts)?;
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        // As for the upstream request (see `upstream_request_filter`): room made once, no case map to grow.
        let limit_headers = std::mem::take(&mut ctx.limits.headers);
        let reason =
            response.get_reason_phrase().filter(|r| Some(*r) != response.status.canonical_reason()).map(str::to_owned);
        let placeholder = ResponseHeader::from(http::Response::new(()).into_parts().0);
        let mut parts: http::response::Parts = std::mem::replace(response, placeholder).into();
        parts.headers.reserve(1 + limit_headers.len());
        if !ctx.request_id.is_empty() {
            parts.headers.insert(X_REQUEST_ID, ctx.request_id.clone());
        }
        for (name, value) in limit_headers {
            parts.headers.insert(name, value);
        }
        *response = ResponseHeader::from(parts);
        if reason.is_some() {
            response.set_reason_phrase(reason.as_deref())?;
        }
        Ok(())
    }

    /// When the request could not be proxied: a problem+json answer instead of Pingora's bare page. A gateway that
    /// cannot be reached (the request never left the edge) is `503` with `Retry-After`, at once; one that failed
    /// or timed out mid-exchange is `502` / `504`.
    async fn fail_to_proxy(&self, session: &mut Session, e: &pingora::Error, ctx: &mut Self::CTX) -> FailToProxy {
        let (status, slug, title) = match e.etype() {
            ErrorType::HTTPStatus(413) => (413, "payload-too-large", "Content Too Large"),
            ErrorType::HTTPStatus(code) => (*code, "http-error", "Error"),
            // The client paused longer than `limits.body_timeout_secs` in its body.
            ErrorType::ReadTimedout if e.esource() == &ErrorSource::Downstream || ctx.client_stalled => {
                (408, "request-timeout", "Request Timeout")
            }
            _ if e.esource() == &ErrorSource::Downstream => {
                let code = match e.etype() {
                    // The client is gone or stopped reading: nothing to answer it.
                    ErrorType::WriteError
                    | ErrorType::WriteTimedout
                    | ErrorType::ReadError
                    | ErrorType::ConnectionClosed => 0,
                    _ => 400,
                };
                (code, "bad-request", "Bad Request")
            }
            ErrorType::ConnectTimedout
            | ErrorType::ConnectRefused
            | ErrorType::ConnectNoRoute
            | ErrorType::ConnectError
            | ErrorType::TLSHandshakeFailure
            | ErrorType::TLSHandshakeTimedout
            | ErrorType::HandshakeError
            | ErrorType::SocketError => (503, "upstream-unavailable", "Service Unavailable"),
            ErrorType::ReadTimedout | ErrorType::WriteTimedout => (504, "upstream-timeout", "Gateway Timeout"),
            _ if e.esource() == &ErrorSource::Upstream => (502, "bad-gateway", "Bad Gateway"),
            _ => (500, "internal-error", "Internal Server Error"),
        };
        // Once a response header went out, a problem body would be spliced into that response.
        if status > 0 && session.response_written().is_none() {
            let problem = Problem::new(slug, status, title);
            let retry: &[(http::HeaderName, HeaderValue)] =
                if status == 503 { &[(http::header::RETRY_AFTER, HeaderValue::from_static("1"))] } else { &[] };
            if let Err(write_error) = crate::respond::problem(session, &problem, ctx.request_id(), retry).await {
                tracing::debug!(error = %write_error, "could not send the error response");
            }
        }
        FailToProxy { error_code: status, can_reuse_downstream: false }
    }

    async fn logging(&self, session: &mut Session, error: Option<&pingora::Error>, ctx: &mut Self::CTX) {
        let status = session.response_written().map(|r| r.status.as_u16()).unwrap_or(0);
        let span = ctx.trace.span();
        if span.is_recording() {
            span.set_attribute(KeyValue::new("http.response.status_code", i64::from(status)));
        }
        match error {
            Some(e) => telemetry::end(&ctx.trace, Some((error_type(e), e))),
            None if status >= 500 => telemetry::end(&ctx.trace, Some((&status.to_string(), &status))),
            None => telemetry::end(&ctx.trace, None),
        }
        let method = telemetry::known_method(&session.req_header().method).unwrap_or("_OTHER");
        let class = status_class(status);
        let route = ctx.limits.route.take();
        let total = ctx.started.elapsed().as_secs_f64();
        // The children by the words their labels are made from (see `metric_cache`): the method's static text,
        // the status (its code and class), the route's shared name.
        let [m_addr, m_len] = metric_cache::static_words(method);
        let key = [m_addr, m_len, usize::from(status), route.as_ref().map_or(0, metric_cache::arc_word)];
        let make = || {
            let code = http::StatusCode::from_u16(status).ok();
            let code = code.as_ref().map_or("0", http::StatusCode::as_str);
            let route = route.as_deref().unwrap_or("unmatched");
            metric_cache::made(self.duration.get_metric_with_label_values(&[method, code, class, route]))
        };
        metric_cache::with_child(&DURATIONS, key, route.as_ref(), make, |h| h.observe(total));
        if let (Some(ms), Some(lease)) = (ctx.upstream_ms, &ctx.lease) {
            let label = &lease.instance.label;
            let key = [metric_cache::arc_word(label), usize::from(status / 100), 0, 0];
            let make = || metric_cache::made(self.upstream_duration.get_metric_with_label_values(&[&**label, class]));
            metric_cache::with_child(&UPSTREAM_DURATIONS, key, Some(label), make, |h| h.observe(ms / 1000.0));
        }
        if let Some(e) = error {
            tracing::warn!(request_id = ctx.request_id(), status, error = %e, "request failed");
        }
        if self.access_log {
            access_log(session, status, ctx, total);
        }
        tracing::debug!(
            request_id = ctx.request_id(),
            status,
            rate_limit = ctx.limits.outcome,
            delay_ms = ctx.limits.delay_ms,
            "request done"
        );
    }
}

impl EdgeProxy {
    /// Answers `problem` and closes the connection (the rest of the request is not read).
    async fn refuse(
        &self,
        session: &mut Session,
        ctx: &RequestCtx,
        problem: Problem,
        extra: &[(http::HeaderName, HeaderValue)],
    ) {
        session.set_keepalive(None);
        if let Err(e) = crate::respond::problem(session, &problem, ctx.request_id(), extra).await {
            tracing::debug!(error = %e, status = problem.status, "could not send the refusal");
        }
    }

    /// `431` when the request head has more fields or bytes than allowed. HTTP/1.1: the head's bytes as
    /// received; HTTP/2: the decoded fields counted as its header list (name + value + 32 each, RFC 7541).
    fn head_over_limits(&self, session: &Session) -> Option<Problem> {
        let req = session.req_header();
        let count = req.headers.len();
        let bytes = match session.as_downstream().as_http1() {
            Some(h1) => h1.get_headers_raw_bytes().len(),
            None => req.headers.iter().map(|(n, v)| n.as_str().len() + v.len() + 32).sum(),
        };
        let (max_count, max_bytes) = (self.limits.max_headers, self.limits.max_header_bytes);
        let detail = if count > max_count {
            format!("{count} header fields; at most {max_count}")
        } else if bytes > max_bytes {
            format!("the request head is {bytes} bytes; at most {max_bytes}")
        } else {
            return None;
        };
        Some(
            Problem::new("request-header-fields-too-large", 431, "Request Header Fields Too Large").with_detail(detail),
        )
    }

    /// A slot among the client key's requests in flight; `Err(max)` when it has them all. Exempt clients and
    /// requests without a peer address take none.
    fn client_slot(
        &self,
        active: &edge::limiter::Active,
        client: Option<std::net::IpAddr>,
    ) -> std::result::Result<Option<ClientGuard>, u32> {
        let Some(ip) = client else { return Ok(None) };
        // 0: no limit, and nothing to count.
        if self.limits.max_requests_per_client == 0 || active.policy.is_exempt(ip) {
            return Ok(None);
        }
        self.conns
            .client_request(edge::client::ip_key(ip, active.policy.client.ipv6_prefix))
            .map(Some)
            .ok_or(self.limits.max_requests_per_client)
    }

    /// Starts the request's SERVER span, continuing the client's `traceparent` when it sent a valid one.
    /// `traceparent` says whether the head has one at all ([`Known::scan`]): without one, no propagator runs.
    fn server_span(&self, session: &Session, request_id: &str, traceparent: bool) -> Context {
        let req = session.req_header();
        let parent = if traceparent { telemetry::extract_http(&req.headers) } else { Context::new() };
        let http = telemetry::HttpRequest {
            method: &req.method,
            uri: &req.uri,
            version: req.version,
            headers: &req.headers,
            scheme: "https",
        };
        telemetry::http_server_span_under(&self.tracer, &http, &parent, |v| {
            v.push(KeyValue::new("http.request.header.x-request-id", request_id.to_owned()));
            let host = req.headers.get(http::header::HOST).and_then(|v| v.to_str().ok());
            if let Some(host) = host.or_else(|| req.uri.host()) {
                v.push(KeyValue::new("server.address", host.to_owned()));
            }
            if let Some(peer) = session.client_addr().and_then(|a| a.as_inet()) {
                v.push(KeyValue::new("network.peer.address", peer.ip().to_string()));
            }
        })
    }
}

/// The request headers the edge reads, found in one pass over the head (as nginx fills its `headers_in` while
/// it parses) instead of a lookup each: a lookup hashes the name and probes the map, ~110-190 instructions, six
/// of them per request; the pass compares each field's name with these, a few instructions a field. Each is the
/// field's first value, what `HeaderMap::get` answers. (`Host` is read where it is used: Pingora may set it from
/// an absolute-form target in between.)
#[derive(Default)]
struct Known {
    request_id: Option<HeaderValue>,
    content_length: Option<HeaderValue>,
    authorization: Option<HeaderValue>,
    user_agent: Option<HeaderValue>,
    /// Whether the fields are present (their values are read where they are used).
    traceparent: bool,
    forwarded_for: bool,
}

impl Known {
    fn scan(headers: &http::HeaderMap) -> Self {
        let mut known = Known::default();
        for (name, value) in headers {
            let slot = if name == http::header::CONTENT_LENGTH {
                &mut known.content_length
            } else if name == http::header::USER_AGENT {
                &mut known.user_agent
            } else if name == http::header::AUTHORIZATION {
                &mut known.authorization
            } else if name == X_REQUEST_ID {
                &mut known.request_id
            } else {
                known.traceparent |= name == TRACEPARENT;
                known.forwarded_for |= name == X_FORWARDED_FOR;
                continue;
            };
            if slot.is_none() {
                *slot = Some(value.clone());
            }
        }
        known
    }
}

/// What a request head loses when it is taken apart into plain parts: a request-target that the URI does not
/// reproduce (absolute-form, CONNECT) and the HTTP/2 end-of-stream flag. Header-name case is dropped on purpose.
struct Restore {
    raw_target: Option<Vec<u8>>,
    end_stream: Option<bool>,
}

/// Moves `req` out of Pingora's case-preserving head into plain parts (nothing copied).
fn take_request(req: &mut RequestHeader) -> (http::request::Parts, Restore) {
    let from_uri = req.uri.path_and_query().map(|pq| pq.as_str().as_bytes());
    let raw_target = (Some(req.raw_path()) != from_uri).then(|| req.raw_path().to_vec());
    let restore = Restore { raw_target, end_stream: req.send_end_stream() };
    let placeholder = RequestHeader::from(http::Request::new(()).into_parts().0);
    (std::mem::replace(req, placeholder).into(), restore)
}

impl Restore {
    fn into_request(self, parts: http::request::Parts) -> Result<RequestHeader> {
        let mut req = RequestHeader::from(parts);
        if let Some(raw) = self.raw_target {
            req.set_raw_path(&raw)?;
        }
        if let Some(end_stream) = self.end_stream {
            req.set_send_end_stream(end_stream);
        }
        Ok(req)
    }
}

/// The request's access log line (see [`crate::access_log`]).
/// `total` is the request's time so far in seconds (the one its metrics recorded).
fn access_log(session: &Session, status: u16, ctx: &RequestCtx, total: f64) {
    let req = session.req_header();
    // The trace the upstream continued, else the client's (a request answered at the edge).
    let trace_id = ctx.trace_id.or_else(|| {
        let span = ctx.trace.span();
        let sc = span.span_context();
        sc.is_valid().then(|| sc.trace_id())
    });
    let line = crate::access_log::Line {
        client: ctx.limits.client,
        method: req.method.as_str(),
        path: req.uri.path(),
        protocol: protocol(req.version),
        status,
        bytes: session.body_bytes_sent(),
        upstream: ctx.lease.as_ref().map(|l| &*l.instance.label),
        upstream_ms: ctx.upstream_ms,
        total_ms: total * 1000.0,
        tries: ctx.tried.len() + usize::from(ctx.lease.is_some()),
        rate_limit: if ctx.limits.outcome.is_empty() { None } else { Some(ctx.limits.outcome) },
        rate_limit_delay_ms: ctx.limits.delay_ms,
        request_id: ctx.request_id(),
        trace_id,
        user_agent: ctx.user_agent.as_ref().and_then(|v| v.to_str().ok()),
    };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    crate::access_log::record(&line, now);
}

fn protocol(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_2 => "HTTP/2.0",
        http::Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

thread_local! {
    /// This thread's children of `http_server_request_duration_seconds` and `edge_upstream_duration_seconds`.
    static DURATIONS: RefCell<Children<Histogram>> = const { RefCell::new(Children::new()) };
    static UPSTREAM_DURATIONS: RefCell<Children<Histogram>> = const { RefCell::new(Children::new()) };
}

/// `2xx`, `4xx`, ...; `none` when nothing was answered (status 0) or for a status outside 100-599. The same for
/// every status with the same hundreds (the upstream metric's cache key holds `status / 100`).
fn status_class(status: u16) -> &'static str {
    match status / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        5 => "5xx",
        _ => "none",
    }
}

fn error_type(e: &pingora::Error) -> &'static str {
    match e.esource() {
        ErrorSource::Upstream => "upstream",
        ErrorSource::Downstream => "downstream",
        _ => "internal",
    }
}

/// Headers that describe one connection, not the message (RFC 9110 section 7.6.1): never forwarded, and neither
/// are the headers a `Connection` header names. Pingora sets the upstream connection's own framing.
const HOP_BY_HOP: &[&str] =
    &["connection", "keep-alive", "proxy-connection", "proxy-authorization", "te", "trailer", "upgrade"];

fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    // Most requests carry none of them: one pass over the names instead of a removal per listed header.
    if !headers.keys().any(|k| HOP_BY_HOP.contains(&k.as_str())) {
        return;
    }
    let named: Vec<String> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    for name in HOP_BY_HOP.iter().copied().chain(named.iter().map(String::as_str)) {
        headers.remove(name);
    }
}

/// Every `X-Forwarded-For` line of a request, in order, as one comma-separated chain (a proxy may add a line of
/// its own instead of appending to the client's). Bytes that are not UTF-8 are replaced, not fatal: the parser
/// then refuses that hop only.
pub fn forwarded_chain(headers: &http::HeaderMap) -> Option<Cow<'_, str>> {
    let mut lines = headers.get_all(X_FORWARDED_FOR).iter();
    let first = lines.next()?;
    let Some(second) = lines.next() else { return Some(String::from_utf8_lossy(first.as_bytes())) };
    let parts: Vec<Cow<'_, str>> =
        [first, second].into_iter().chain(lines).map(|v| String::from_utf8_lossy(v.as_bytes())).collect();
    Some(Cow::Owned(parts.join(", ")))
}

/// `X-Forwarded-For` for the upstream: the incoming chain with the client's address appended (as nginx's
/// `$proxy_add_x_forwarded_for`). `None` when there is neither, or the chain is not a valid header value.
fn forwarded_for(incoming: Option<&str>, client_ip: Option<IpAddr>) -> Option<HeaderValue> {
    let chain = incoming.map(str::trim).filter(|s| !s.is_empty());
    if chain.is_none() && client_ip.is_none() {
        return None;
    }
    let ip = client_ip.map(crate::wire::IpText::new);
    let (chain, ip) = (chain.map_or(&b""[..], str::as_bytes), ip.as_ref().map_or(&b""[..], |t| t.as_bytes()));
    let separator = if chain.is_empty() || ip.is_empty() { &b""[..] } else { b", " };
    crate::wire::header_value(&[chain, separator, ip])
}

/// A client's request id is kept only if it is short and plain (it ends up in logs and headers).
fn is_valid_request_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// A new request id: a random UUID (version 4; 36 bytes, hyphenated), written without an intermediate string.
/// The bytes come from the thread's generator (ChaCha12 seeded from the OS, as uuid's `new_v4`), in one draw;
/// `new_v4` costs ~190 instructions an id through `rand::random`, and the edge makes three ids per request.
fn new_request_id() -> HeaderValue {
    use rand::Rng as _;
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let id = uuid::Builder::from_random_bytes(bytes).into_uuid().hyphenated().encode_lower(&mut buf);
    // Hex digits and hyphens: always a valid header value.
    HeaderValue::from_str(id).unwrap_or_else(|_| HeaderValue::from_static("-"))
}

/// The W3C `traceparent` for the upstream continuing `cx`'s span, or new random ids (sampled) when it has none;
/// and its trace id.
fn traceparent(cx: &Context) -> (HeaderValue, TraceId) {
    let span = cx.span();
    let current = span.span_context();
    let fresh;
    let sc = if current.is_valid() {
        current
    } else {
        // Random ids from one handle to the thread's generator. W3C ids are any value but all zeros (one chance
        // in 2^64 for the span id): the last bit is set then.
        use rand::Rng as _;
        let mut rng = rand::rng();
        let (mut trace, mut span) = ([0u8; 16], [0u8; 8]);
        rng.fill_bytes(&mut trace);
        rng.fill_bytes(&mut span);
        if trace == [0; 16] {
            trace[15] = 1;
        }
        if span == [0; 8] {
            span[7] = 1;
        }
        let (trace, span_id) = (TraceId::from_bytes(trace), SpanId::from_bytes(span));
        fresh = SpanContext::new(trace, span_id, TraceFlags::SAMPLED, false, TraceState::NONE);
        &fresh
    };
    // Hex digits and hyphens: always a valid header value.
    let value =
        HeaderValue::from_bytes(&telemetry::traceparent_bytes(sc)).unwrap_or_else(|_| HeaderValue::from_static(""));
    (value, sc.trace_id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_appends_the_client() {
        let ip: IpAddr = "1.2.3.4".parse().expect("ip");
        let v6: IpAddr = "2001:db8::1".parse().expect("ip");
        let text = |v: Option<HeaderValue>| v.map(|v| v.to_str().expect("ascii").to_owned());
        assert_eq!(text(forwarded_for(None, Some(ip))).as_deref(), Some("1.2.3.4"));
        assert_eq!(text(forwarded_for(Some("9.9.9.9"), Some(ip))).as_deref(), Some("9.9.9.9, 1.2.3.4"));
        assert_eq!(text(forwarded_for(Some("  "), Some(ip))).as_deref(), Some("1.2.3.4"));
        assert_eq!(text(forwarded_for(Some("9.9.9.9"), Some(v6))).as_deref(), Some("9.9.9.9, 2001:db8::1"));
        assert_eq!(text(forwarded_for(Some("9.9.9.9"), None)).as_deref(), Some("9.9.9.9"));
        assert_eq!(forwarded_for(None, None), None);
    }

    #[test]
    fn hop_by_hop_headers_and_those_named_by_connection_are_dropped() {
        let mut req = RequestHeader::build("GET", b"/", None).expect("request");
        for (k, v) in [
            ("connection", "keep-alive, X-Secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("accept", "*/*"),
        ] {
            req.append_header(k, v).expect("header");
        }
        let mut headers = req.headers.clone();
        strip_hop_by_hop(&mut headers);
        let left: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["accept"]);
    }

    #[test]
    fn every_forwarded_for_line_counts() {
        let mut h = http::HeaderMap::new();
        assert_eq!(forwarded_chain(&h), None);
        h.append("x-forwarded-for", http::HeaderValue::from_static("6.6.6.6"));
        h.append("x-forwarded-for", http::HeaderValue::from_static("198.51.100.7"));
        assert_eq!(forwarded_chain(&h).as_deref(), Some("6.6.6.6, 198.51.100.7"));
    }

    #[test]
    fn a_head_taken_apart_and_rebuilt_keeps_its_target_and_headers() {
        for target in [&b"/a/b?c=1"[..], b"http://example.com/x?y", b"*", b"/caf\xc3\xa9"] {
            let mut req = RequestHeader::build("GET", target, None).expect("request");
            req.append_header("X-Custom", "1").expect("header");
            req.append_header("accept", "a").expect("header");
            req.append_header("accept", "b").expect("header");
            let (mut parts, restore) = take_request(&mut req);
            parts.headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
            let rebuilt = restore.into_request(parts).expect("rebuilt");
            assert_eq!(rebuilt.raw_path(), target, "{}", String::from_utf8_lossy(target));
            assert_eq!(rebuilt.method, http::Method::GET);
            let accept: Vec<_> = rebuilt.headers.get_all("accept").iter().collect();
            assert_eq!(accept, ["a", "b"]);
            assert_eq!(rebuilt.headers.get("x-custom").map(HeaderValue::as_bytes), Some(&b"1"[..]));
            assert_eq!(rebuilt.headers.get("x-forwarded-proto").map(HeaderValue::as_bytes), Some(&b"https"[..]));
            let mut wire = Vec::new();
            rebuilt.header_to_h1_wire(&mut wire);
            let wire = String::from_utf8_lossy(&wire);
            assert!(wire.contains("x-forwarded-proto: https\r\n") && wire.contains("x-custom: 1\r\n"), "{wire}");
        }
    }

    #[test]
    fn one_pass_over_the_head_finds_what_lookups_find() {
        let mut h = http::HeaderMap::new();
        let known = Known::scan(&h);
        assert!(known.request_id.is_none() && known.content_length.is_none() && known.user_agent.is_none());
        assert!(known.authorization.is_none() && !known.traceparent && !known.forwarded_for);
        for (name, value) in [
            ("Host", "example.com"),
            ("user-agent", "curl/8"),
            ("X-Request-Id", "first"),
            ("accept", "*/*"),
            ("x-request-id", "second"),
            ("Authorization", "Bearer t"),
            ("content-length", "12"),
            ("X-Forwarded-For", "6.6.6.6"),
            ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            ("x-forwarded-for", "7.7.7.7"),
        ] {
            let name = http::HeaderName::from_bytes(name.as_bytes()).expect("name");
            h.append(name, HeaderValue::from_static(value));
        }
        let known = Known::scan(&h);
        let text = |v: &Option<HeaderValue>| v.as_ref().and_then(|v| v.to_str().ok()).map(str::to_owned);
        // The first value of a repeated field, as `get` answers.
        assert_eq!(text(&known.request_id), text(&h.get(X_REQUEST_ID).cloned()));
        assert_eq!(text(&known.request_id).as_deref(), Some("first"));
        assert_eq!(text(&known.user_agent).as_deref(), Some("curl/8"));
        assert_eq!(text(&known.authorization).as_deref(), Some("Bearer t"));
        assert_eq!(text(&known.content_length).as_deref(), Some("12"));
        assert!(known.traceparent && known.forwarded_for);
        // Only those names: a field that merely looks like one is not taken.
        let mut other = http::HeaderMap::new();
        other.append("x-request-ids", HeaderValue::from_static("no"));
        other.append("x-forwarded-host", HeaderValue::from_static("no"));
        let known = Known::scan(&other);
        assert!(known.request_id.is_none() && !known.forwarded_for && !known.traceparent);
    }

    #[test]
    fn request_ids_are_checked() {
        assert!(is_valid_request_id("abc-123_x.y:z"));
        assert!(!is_valid_request_id(""));
        assert!(!is_valid_request_id("a b"));
        assert!(!is_valid_request_id(&"a".repeat(129)));
        let (a, b) = (new_request_id(), new_request_id());
        let text = a.to_str().expect("ascii");
        assert!(is_valid_request_id(text) && text.len() == 36, "{text}");
        let uuid = uuid::Uuid::parse_str(text).expect("a UUID");
        assert_eq!((uuid.get_version_num(), uuid.get_variant()), (4, uuid::Variant::RFC4122), "{text}");
        assert_ne!(a, b);
    }

    #[test]
    fn traceparents_are_checked_and_generated_valid() {
        let (fresh, id) = traceparent(&Context::new());
        let text = fresh.to_str().expect("ascii");
        assert!(service_core::telemetry::is_valid_traceparent(text), "{text}");
        assert_eq!(text.get(3..35), Some(id.to_string().as_str()));
        assert!(text.ends_with("-01"), "sampled: {text}");
        assert_ne!(traceparent(&Context::new()).1, id, "new ids each time");
        // A context with a span is continued: same trace, the span as the parent, its flags.
        let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        let cx = service_core::telemetry::from_traceparent(Some(incoming));
        let (continued, id) = traceparent(&cx);
        assert_eq!(continued.to_str().ok(), Some(incoming));
        assert_eq!(id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
    }
}
