//! The order API's routes and how each answer is built. Errors become problem+json here, in one place.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use opentelemetry::KeyValue;
use opentelemetry::global::BoxedTracer;
use opentelemetry::metrics::Histogram;
use order_contract::{OrderCommand, OrderRequest};
use service_core::db::trace::Scope;
use service_core::problem::{self, Problem};
use service_core::telemetry::{self, Context, TraceContextExt as _};
use tracing::Instrument as _;

use crate::auth::{AuthError, Verifier};
use crate::idempotency::{self, Answer, Claim, ClaimGuard};
use crate::publish::Publisher;
use crate::replies::Replies;

/// Role needed to create orders.
pub const ROLE_WRITE: &str = "orders:write";
/// Role needed to read them.
pub const ROLE_READ: &str = "orders:read";

/// Everything a request handler needs.
pub struct Api {
    pub verifier: Verifier,
    pub publisher: Publisher,
    pub replies: Arc<Replies>,
    pub sync_timeout: std::time::Duration,
    /// Bounds the order requests in flight (`max_in_flight`).
    pub in_flight: Arc<tokio::sync::Semaphore>,
    /// `kafka` is failing here: new orders get `503` at once instead of waiting for a delivery timeout.
    pub readiness: service_core::admin::Readiness,
    pub orders_db: deadpool_postgres::Pool,
    /// `Idempotency-Key` records (`None` when disabled: the header is then ignored).
    pub idempotency: Option<Arc<idempotency::Store>>,
    pub max_body_bytes: usize,
    pub duration: Histogram<f64>,
    pub tracer: BoxedTracer,
    /// `db.namespace` of the read spans.
    pub db_name: String,
}

pub type Body = Full<Bytes>;

impl Api {
    /// Answers one request; never fails (every error is an HTTP answer).
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let method = req.method().clone();
        // The server span continues the edge's trace (its `traceparent`); logs written meanwhile carry its ids.
        let http = telemetry::HttpRequest {
            method: req.method(),
            uri: req.uri(),
            version: req.version(),
            headers: req.headers(),
            scheme: "http",
        };
        let cx = telemetry::http_server_span(&self.tracer, &http, |v| {
            if let Some(id) = header_str(&req, "x-request-id") {
                v.push(KeyValue::new("http.request.header.x-request-id", id.to_owned()));
            }
        });
        let (route, response) = self.route(req, &cx).instrument(telemetry::log_span(&cx)).await;
        let status = response.status();
        let span = cx.span();
        if span.is_recording() {
            span.update_name(format!("{method} {route}"));
            span.set_attribute(KeyValue::new("http.route", route));
            span.set_attribute(KeyValue::new("http.response.status_code", i64::from(status.as_u16())));
        }
        let error = status.is_server_error().then(|| status.as_u16().to_string());
        telemetry::end(&cx, error.as_deref().map(|e| (e, &status as &dyn std::fmt::Display)));
        self.duration.record(
            started.elapsed().as_secs_f64(),
            &[
                KeyValue::new("http.request.method", method.as_str().to_owned()),
                KeyValue::new("http.route", route),
                KeyValue::new("http.response.status_code", i64::from(response.status().as_u16())),
            ],
        );
        response
    }

    async fn route(&self, req: Request<Incoming>, cx: &Context) -> (&'static str, Response<Body>) {
        let path = req.uri().path();
        match path {
            "/v1/orders/async" => {
                let r = if req.method() == Method::POST {
                    self.create(req, false, cx).await
                } else {
                    method_not_allowed("POST")
                };
                ("/v1/orders/async", r)
            }
            "/v1/orders" => {
                let r = if req.method() == Method::POST {
                    self.create(req, true, cx).await
                } else {
                    method_not_allowed("POST")
                };
                ("/v1/orders", r)
            }
            _ => match path.strip_prefix("/v1/orders/").filter(|id| !id.is_empty() && !id.contains('/')) {
                Some(id) => {
                    let r = if req.method() == Method::GET || req.method() == Method::HEAD {
                        let id = id.to_owned();
                        self.get_order(&req, &id, cx).await
                    } else {
                        method_not_allowed("GET, HEAD")
                    };
                    ("/v1/orders/{id}", r)
                }
                None => ("unmatched", problem_response(&Problem::new("not-found", 404, "Not Found"))),
            },
        }
    }

    /// `POST /v1/orders/async` (`sync` false): `202` once the broker has the command. `POST /v1/orders`
    /// (`sync` true): then waits for the validate job's verdict: `201`, `422`, or `504` after the timeout.
    async fn create(&self, req: Request<Incoming>, sync: bool, cx: &Context) -> Response<Body> {
        let principal = match self.verifier.authenticate(header_str(&req, header::AUTHORIZATION)).await {
            Ok(p) => p,
            Err(e) => return auth_failure(&e),
        };
        if let Err(e) = principal.require(ROLE_WRITE) {
            return auth_failure(&e);
        }
        // Present but not text (obs-text bytes) is a bad key, not an absent one.
        let raw_key = req.headers().get("idempotency-key").map(|v| v.to_str().unwrap_or(""));
        let key = match (&self.idempotency, raw_key) {
            (Some(_), Some(_)) if principal.subject.is_empty() => {
                return problem_response(
                    &Problem::new("invalid-idempotency-key", 400, "Bad Request")
                        .with_detail("Idempotency-Key needs a token with a subject (sub): keys belong to a subject"),
                );
            }
            (Some(store), Some(raw)) => match idempotency::parse_key(raw) {
                Some(k) => Some((store, k.to_owned())),
                None => {
                    return problem_response(&Problem::new("invalid-idempotency-key", 400, "Bad Request").with_detail(
                        format!("Idempotency-Key must be 1 to {} visible ASCII characters", idempotency::MAX_KEY_LEN),
                    ));
                }
            },
            _ => None,
        };
        // Backpressure: refuse at once rather than pile up requests behind a slow or absent broker.
        let Ok(_permit) = self.in_flight.try_acquire() else {
            return unavailable("overloaded", "too many orders in flight; retry shortly");
        };
        let broker_down = || unavailable("broker-unavailable", "the message broker is unreachable; retry later");
        // With a key, a stored answer is replayed even while the broker is down: checked after the claim.
        if key.is_none() && !self.readiness.is_ok("kafka") {
            return broker_down();
        }
        let path = req.uri().path().to_owned();
        let (body, order) = match self.read_order(req).await {
            Ok(o) => o,
            Err(r) => return *r,
        };
        let (mut order_id, mut event_id) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
        // Held while this request owns its key; releases it if the request is dropped before it answered.
        let mut claim: Option<ClaimGuard> = None;
        if let Some((store, key)) = &key {
            let hash = idempotency::fingerprint(&path, &body);
            match store.claim(&principal.subject, key, &hash, (order_id, event_id)).await {
                Ok(Claim::Owned { order_id: o, event_id: e }) => {
                    let mut guard = ClaimGuard::new(Arc::clone(store), &principal.subject, key);
                    if !self.readiness.is_ok("kafka") {
                        // Disarmed once released: dropped during the release, the guard still releases.
                        if let Err(e) = store.release(&principal.subject, key).await {
                            tracing::warn!(error = %e, "releasing an idempotency key failed");
                        }
                        guard.disarm();
                        return broker_down();
                    }
                    (order_id, event_id) = (o, e);
                    claim = Some(guard);
                }
                Ok(Claim::Replay(answer)) => return replay(answer),
                Ok(Claim::Mismatch) => {
                    return problem_response(
                        &Problem::new("idempotency-key-reused", 422, "Unprocessable Content")
                            .with_detail("this Idempotency-Key was used for another request; use a new key"),
                    );
                }
                Ok(Claim::InProgress) => {
                    let mut r = problem_response(
                        &Problem::new("idempotency-key-in-use", 409, "Conflict")
                            .with_detail("a request with this Idempotency-Key is still being processed; retry shortly"),
                    );
                    r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                    return r;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "claiming an idempotency key failed");
                    return unavailable(
                        "idempotency-unavailable",
                        "the Idempotency-Key cannot be checked now; the order was not accepted, retry later",
                    );
                }
            }
        }
        let command = OrderCommand { event_id, order_id, received_at: time::OffsetDateTime::now_utc(), order };
        let correlation_id = uuid::Uuid::now_v7().to_string();
        // Registered before publishing, so that even an instant reply finds its request.
        let waiter = sync.then(|| self.replies.register(&correlation_id));
        let reply = sync.then_some((self.replies.topic.as_str(), correlation_id.as_str()));
        if let Err(e) = self.publisher.publish(&command, cx, reply).await {
            tracing::warn!(error = %e, "publishing an order failed");
            if let Some((store, key)) = &key
                && let Err(e) = store.release(&principal.subject, key).await
            {
                // The claim then stays until its lease ends; a retry then takes it over with the same ids.
                tracing::warn!(error = %e, "releasing an idempotency key failed");
            }
            if let Some(g) = claim.as_mut() {
                g.disarm();
            }
            return unavailable(
                "broker-unavailable",
                "the broker did not confirm the order; it may still have been recorded: retry with the same \
                 Idempotency-Key to be safe from a duplicate",
            );
        }
        tracing::info!(order_id = %command.order_id, subject = %principal.subject, sync, "order accepted");
        let location = format!("/v1/orders/{}", command.order_id);
        let mut r = match waiter {
            None => json_response(StatusCode::ACCEPTED, &serde_json::json!({ "id": command.order_id, "status": "received" })),
            Some(w) => match w.wait(self.sync_timeout).await {
                Some(verdict) => verdict_response(&verdict),
                None => problem_response(
                    &Problem::new("validation-timeout", 504, "Gateway Timeout")
                        .with_detail("the order was accepted but not validated in time; it is still being processed, see Location")
                        .with("id", serde_json::json!(command.order_id)),
                ),
            },
        };
        if let Ok(v) = HeaderValue::from_str(&location) {
            r.headers_mut().insert(header::LOCATION, v);
        }
        match &key {
            Some((store, key)) => {
                let r = record(store, &principal.subject, key, r).await;
                if let Some(g) = claim.as_mut() {
                    g.disarm();
                }
                r
            }
            None => r,
        }
    }

    async fn get_order(&self, req: &Request<Incoming>, id: &str, cx: &Context) -> Response<Body> {
        let principal = match self.verifier.authenticate(header_str(req, header::AUTHORIZATION)).await {
            Ok(p) => p,
            Err(e) => return auth_failure(&e),
        };
        if let Err(e) = principal.require(ROLE_READ) {
            return auth_failure(&e);
        }
        let Ok(id) = id.parse::<uuid::Uuid>() else {
            return problem_response(
                &Problem::new("invalid-order-id", 400, "Bad Request").with_detail("an order id is a UUID"),
            );
        };
        match crate::read::order(
            &self.orders_db,
            id,
            &Scope { tracer: &self.tracer, parent: cx, namespace: &self.db_name },
        )
        .await
        {
            Ok(Some(order)) => match serde_json::to_value(&order) {
                Ok(v) => json_response(StatusCode::OK, &v),
                Err(e) => problem_response(
                    &Problem::new("internal-error", 500, "Internal Server Error").with_detail(e.to_string()),
                ),
            },
            Ok(None) => problem_response(
                &Problem::new("order-not-found", 404, "Not Found")
                    .with_detail("no such order (yet: an accepted order appears once a worker has stored it)")
                    .with("order_id", serde_json::json!(id)),
            ),
            Err(e) => {
                tracing::warn!(error = %e, "reading an order failed");
                unavailable("database-unavailable", "orders cannot be read now")
            }
        }
    }

    /// Reads and parses the JSON body (returned with the order), or the answer that explains why not.
    async fn read_order(&self, req: Request<Incoming>) -> Result<(Bytes, OrderRequest), Box<Response<Body>>> {
        let is_json = header_str(&req, header::CONTENT_TYPE)
            .and_then(|ct| ct.split(';').next())
            .map(|mt| {
                let mt = mt.trim().to_ascii_lowercase();
                mt == "application/json" || (mt.starts_with("application/") && mt.ends_with("+json"))
            })
            .unwrap_or(false);
        if !is_json {
            return Err(Box::new(problem_response(
                &Problem::new("unsupported-media-type", 415, "Unsupported Media Type")
                    .with_detail("send the order as application/json"),
            )));
        }
        let too_large = || {
            Box::new(problem_response(
                &Problem::new("payload-too-large", 413, "Content Too Large")
                    .with_detail(format!("the body exceeds {} bytes", self.max_body_bytes)),
            ))
        };
        let declared = header_str(&req, header::CONTENT_LENGTH).and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > self.max_body_bytes) {
            return Err(too_large());
        }
        let body = match Limited::new(req.into_body(), self.max_body_bytes).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
            Err(e) => {
                return Err(Box::new(problem_response(
                    &Problem::new("bad-request", 400, "Bad Request").with_detail(format!("reading the body: {e}")),
                )));
            }
        };
        let order = serde_json::from_slice::<OrderRequest>(&body).map_err(|e| {
            Box::new(problem_response(
                &Problem::new("malformed-body", 400, "Bad Request")
                    .with_detail(format!("the body is not a valid order: {e}")),
            ))
        })?;
        let violations = order.violations();
        if !violations.is_empty() {
            return Err(Box::new(problem_response(
                &Problem::new("invalid-order", 400, "Bad Request")
                    .with_detail("the order breaks the schema; see errors")
                    .with("errors", serde_json::json!(violations)),
            )));
        }
        Ok((body, order))
    }
}

/// Stores `r` as the answer for `key` and returns it. If storing fails the answer still goes out; the claim then
/// ends with its lease and a retry takes it over with the same ids.
async fn record(store: &idempotency::Store, principal: &str, key: &str, r: Response<Body>) -> Response<Body> {
    let (parts, body) = r.into_parts();
    let bytes = match body.collect().await {
        Ok(c) => c.to_bytes(),
        Err(never) => match never {},
    };
    let header = |name| parts.headers.get(name).and_then(|v: &HeaderValue| v.to_str().ok()).map(str::to_owned);
    let answer = Answer {
        status: parts.status.as_u16(),
        content_type: header(header::CONTENT_TYPE).unwrap_or_default(),
        location: header(header::LOCATION),
        body: bytes.to_vec(),
    };
    if let Err(e) = store.complete(principal, key, &answer).await {
        tracing::warn!(error = %e, "recording the answer of an idempotency key failed");
    }
    Response::from_parts(parts, Full::new(bytes))
}

/// The stored answer of an earlier request with the same key, marked `Idempotent-Replayed`.
fn replay(a: Answer) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(a.body)));
    *r.status_mut() = StatusCode::from_u16(a.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&a.content_type) {
        headers.insert(header::CONTENT_TYPE, v);
    }
    if let Some(v) = a.location.as_deref().and_then(|l| HeaderValue::from_str(l).ok()) {
        headers.insert(header::LOCATION, v);
    }
    headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    r
}

/// `201` with the order when accepted, `422` with the broken rules when rejected.
fn verdict_response(v: &order_contract::OrderValidated) -> Response<Body> {
    match &v.verdict {
        order_contract::Verdict::Accepted => json_response(
            StatusCode::CREATED,
            &serde_json::json!({
                "id": v.order_id,
                "status": "accepted",
                "customer_id": v.order.customer_id,
                "currency": v.order.currency,
                "total_cents": v.total_cents,
                "items": v.order.items,
            }),
        ),
        order_contract::Verdict::Rejected { failures } => problem_response(
            &Problem::new("order-rejected", 422, "Unprocessable Content")
                .with_detail("the order breaks business rules; see errors")
                .with("id", serde_json::json!(v.order_id))
                .with("errors", serde_json::json!(failures)),
        ),
    }
}

fn header_str<B>(req: &Request<B>, name: impl header::AsHeaderName) -> Option<&str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

fn auth_failure(e: &AuthError) -> Response<Body> {
    let (status, slug, title) = match e {
        AuthError::Forbidden(_) => (403, "forbidden", "Forbidden"),
        AuthError::KeysUnavailable => (503, "auth-unavailable", "Service Unavailable"),
        _ => (401, "unauthorized", "Unauthorized"),
    };
    let mut r = problem_response(&Problem::new(slug, status, title).with_detail(e.to_string()));
    if status != 503 {
        let challenge = match e.bearer_error() {
            Some(code) => format!("Bearer realm=\"orders\", error=\"{code}\""),
            None => "Bearer realm=\"orders\"".to_owned(),
        };
        if let Ok(v) = HeaderValue::from_str(&challenge) {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
    }
    r
}

/// `503` with `Retry-After: 1`: a dependency is down, the client may retry.
fn unavailable(slug: &str, detail: &str) -> Response<Body> {
    let mut r = problem_response(&Problem::new(slug, 503, "Service Unavailable").with_detail(detail));
    r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut r = problem_response(&Problem::new("method-not-allowed", 405, "Method Not Allowed"));
    r.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

/// A problem+json answer with the problem's status.
pub fn problem_response(p: &Problem) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(p.to_body())));
    *r.status_mut() = StatusCode::from_u16(p.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(problem::CONTENT_TYPE));
    r
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}
