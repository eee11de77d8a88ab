//! The rate-limit phase of a request: ask the limiter, record the decision, then reject (problem+json with
//! `Retry-After` and the IETF `RateLimit` headers), delay (a timer, no thread held), or let the request through
//! (the proxy's `request_filter` acts on the [`Next`] step).

use std::cell::RefCell;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use edge::limiter::{Active, Limiter, RequestInfo, Verdict};
use edge::limits::ZoneOutcome;
use http::{HeaderName, HeaderValue};
use opentelemetry::KeyValue;
use opentelemetry::metrics::Histogram;
use pingora::prelude::Session;
use service_core::metrics::{IntCounter, IntCounterVec};
use service_core::problem::Problem;
use service_core::telemetry::{self, Context, TraceContextExt as _};
use smallvec::SmallVec;

use crate::metric_cache::{self, Children};

const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Rate-limit metrics, per zone.
pub struct LimitMetrics {
    /// `zone`, `outcome`; one per zone consulted, on every request (a hot-path counter).
    pub decisions: IntCounterVec,
    pub delay: Histogram<f64>,
}

/// What the rest of the request's life needs from the decision (response headers, access log).
#[derive(Default, Clone)]
pub struct Applied {
    /// `immediate`, `delayed`, `rejected`, ... of the most significant zone; empty when no route applied.
    pub outcome: &'static str,
    pub delay_ms: u64,
    /// `RateLimit-Policy` and `RateLimit`, for the response.
    pub headers: SmallVec<[(HeaderName, HeaderValue); 2]>,
    /// The client's address (the peer, or the right-most untrusted `X-Forwarded-For` entry), set by the proxy.
    pub client: Option<IpAddr>,
    /// The policy route that applied (metrics); `None` when none did.
    pub route: Option<Arc<str>>,
}

/// What the request does after the limiter: go on at once, after a wait, or get `problem` as its answer.
pub enum Next {
    Pass,
    Delay(Duration),
    Reject { problem: Box<Problem>, headers: Vec<(HeaderName, HeaderValue)> },
}

/// Runs the limiter for `session`, whose client (derived with `active`'s trusted proxies) is `client` and whose
/// `Authorization` is `authorization` (both read once by the proxy), and records the decision. Not async: the rare
/// waits and answers are the caller's, out of line, so that the request filter's future (allocated and moved on
/// every request) stays small.
#[allow(clippy::too_many_arguments)]
pub fn apply(
    limiter: &Arc<Limiter>,
    metrics: &LimitMetrics,
    session: &Session,
    authorization: Option<&str>,
    request_id: &str,
    applied: &mut Applied,
    trace: &Context,
    active: Arc<Active>,
    client: Option<IpAddr>,
) -> Next {
    let Some(client) = client else { return Next::Pass };
    let verdict = {
        let req = session.req_header();
        let get = |name: &str| req.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let info = RequestInfo { method: req.method.as_str(), path: req.uri.path(), authorization, header: &get };
        limiter.check_client(active, &info, client)
    };
    let Some(verdict) = verdict else { return Next::Pass };
    applied.route = verdict.active.policy.routes.get(verdict.route).map(|r| r.name.clone());
    record(metrics, &verdict);
    annotate(trace, &verdict);
    applied.headers = rate_limit_headers(&verdict);
    applied.delay_ms = verdict.decision.delay_ms;
    applied.outcome = summary(&verdict);

    if let Some(i) = verdict.decision.rejected_by {
        let spec = &verdict.active.policy.zones[verdict.zones[i]];
        let retry_ms = match verdict.decision.outcomes[i] {
            ZoneOutcome::Rejected { retry_after_ms } => retry_after_ms,
            _ => 1000,
        };
        let retry_secs = retry_ms.div_ceil(1000).max(1);
        // The trace's ids on the line itself: a `tracing` span around every request for them cost 5% of the
        // edge's instructions per request at the default log level.
        let (trace_id, span_id) = telemetry::log_ids(trace.span().span_context());
        tracing::info!(zone = %spec.name, client = %verdict.client_ip, request_id, retry_secs, trace_id = %trace_id,
            span_id = %span_id, "rate limited");
        // The zone's status may be nginx's 503 instead of 429: the title follows it.
        let title = http::StatusCode::from_u16(spec.status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("Too Many Requests");
        let problem = Problem::new("rate-limited", spec.status, title)
            .with_detail(format!("zone {} allows {} with a burst of {}", spec.name, spec.rate_text, spec.burst))
            .with("zone", serde_json::json!(&*spec.name));
        let mut headers: Vec<_> = applied.headers.to_vec();
        headers.push((http::header::RETRY_AFTER, HeaderValue::from(retry_secs)));
        return Next::Reject { problem: Box::new(problem), headers };
    }
    if verdict.decision.delay_ms > 0 {
        let span = trace.span();
        if span.is_recording() {
            span.add_event(
                "rate_limit.delay",
                vec![KeyValue::new("edge.rate_limit.delay_ms", verdict.decision.delay_ms as i64)],
            );
        }
        return Next::Delay(Duration::from_millis(verdict.decision.delay_ms));
    }
    Next::Pass
}

thread_local! {
    /// This thread's children of `edge_ratelimit_decisions_total` (see `metric_cache`).
    static DECISIONS: RefCell<Children<IntCounter>> = const { RefCell::new(Children::new()) };
}

fn record(metrics: &LimitMetrics, verdict: &Verdict) {
    for (pos, outcome) in verdict.decision.outcomes.iter().enumerate() {
        if matches!(outcome, ZoneOutcome::Skipped) {
            continue;
        }
        let zone = &verdict.active.policy.zones[verdict.zones[pos]].name;
        let label = outcome.label();
        let [l_addr, l_len] = metric_cache::static_words(label);
        let key = [metric_cache::arc_word(zone), l_addr, l_len, 0];
        let make = || metric_cache::made(metrics.decisions.get_metric_with_label_values(&[&**zone, label]));
        metric_cache::with_child(&DECISIONS, key, Some(zone), make, IntCounter::inc);
        if let ZoneOutcome::Delayed { ms } | ZoneOutcome::DryRunDelayed { ms } = outcome {
            metrics.delay.record(*ms as f64 / 1000.0, &[KeyValue::new("zone", zone.clone())]);
        }
    }
}

/// The decision on the request's span: the summary and delay as attributes, one event per zone consulted.
fn annotate(trace: &Context, verdict: &Verdict) {
    let span = trace.span();
    if !span.is_recording() {
        return;
    }
    span.set_attribute(KeyValue::new("edge.rate_limit.outcome", summary(verdict)));
    span.set_attribute(KeyValue::new("edge.rate_limit.delay_ms", verdict.decision.delay_ms as i64));
    span.set_attribute(KeyValue::new("client.address", verdict.client_ip.to_string()));
    if let Some(i) = verdict.decision.rejected_by {
        let zone = verdict.active.policy.zones[verdict.zones[i]].name.clone();
        span.set_attribute(KeyValue::new("edge.rate_limit.zone", zone));
    }
    for (pos, outcome) in verdict.decision.outcomes.iter().enumerate() {
        if matches!(outcome, ZoneOutcome::Skipped) {
            continue;
        }
        let zone = verdict.active.policy.zones[verdict.zones[pos]].name.clone();
        span.add_event(
            "rate_limit.decision",
            vec![
                KeyValue::new("edge.rate_limit.zone", zone),
                KeyValue::new("edge.rate_limit.outcome", outcome.label()),
            ],
        );
    }
}

/// The outcome that best describes the request: the rejection, else the longest delay, else immediate.
fn summary(verdict: &Verdict) -> &'static str {
    let d = &verdict.decision;
    if let Some(i) = d.rejected_by {
        return d.outcomes[i].label();
    }
    d.outcomes
        .iter()
        .max_by_key(|o| match o {
            ZoneOutcome::Delayed { ms } => 3_000_000 + ms,
            ZoneOutcome::DryRunRejected => 2_000_000,
            ZoneOutcome::DryRunDelayed { ms } => 1_000_000 + ms,
            _ => 0,
        })
        .map_or("immediate", ZoneOutcome::label)
}

/// `RateLimit-Policy` (every zone of the route, made once per policy: [`edge::policy::Policy::rate_limit_policy`])
/// and `RateLimit` (the zone with the least room left), as in the IETF httpapi draft.
fn rate_limit_headers(verdict: &Verdict) -> SmallVec<[(HeaderName, HeaderValue); 2]> {
    let active = &verdict.active;
    let mut tightest: Option<(u64, &str, u64)> = None;
    for (pos, &zi) in verdict.zones.iter().enumerate() {
        let spec = &active.policy.zones[zi];
        if spec.dry_run {
            continue;
        }
        let excess = verdict.decision.excess.get(pos).copied().flatten();
        let (remaining, reset) = match excess {
            Some(e) => (spec.params.burst.saturating_sub(e) / 1000, (e * 1000).div_ceil(spec.params.rate * 1000)),
            None => (0, active.zones[zi].params.burst.div_ceil(spec.params.rate).max(1)),
        };
        if tightest.as_ref().is_none_or(|(r, _, _)| remaining < *r) {
            tightest = Some((remaining, &spec.name, reset));
        }
    }
    let mut headers = SmallVec::new();
    if let Some(Some(policy)) = active.rate_limit_policy.get(verdict.route) {
        headers.push((RATELIMIT_POLICY, policy.clone()));
    }
    if let Some((remaining, name, reset)) = tightest {
        // `"name";r=remaining;t=reset`, written without the formatting machinery (on every request).
        let (mut r, mut t) = (itoa::Buffer::new(), itoa::Buffer::new());
        let (r, t) = (r.format(remaining).as_bytes(), t.format(reset).as_bytes());
        if let Some(value) = crate::wire::header_value(&[b"\"", name.as_bytes(), b"\";r=", r, b";t=", t]) {
            headers.push((RATELIMIT, value));
        }
    }
    headers
}
