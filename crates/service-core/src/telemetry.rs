//! Traces with OpenTelemetry, exported over OTLP and configured the standard way, by environment variables, so
//! that the same image works with any collector:
//!
//! - exporting is on when `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set, or when
//!   `OTEL_TRACES_EXPORTER=otlp`; `OTEL_TRACES_EXPORTER=none` or `OTEL_SDK_DISABLED=true` turn it off;
//! - `OTEL_EXPORTER_OTLP_PROTOCOL` (or `..._TRACES_PROTOCOL`): `grpc` or `http/protobuf` (the default);
//! - `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` (for example `parentbased_traceidratio` and `0.01`);
//! - `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES` (else the service's own name, its version and an instance id);
//! - `OTEL_BSP_*` for the batch processor (queue size, delay).
//!
//! Contexts travel as W3C `traceparent`: in HTTP headers (edge → gateway) and in Kafka message headers (gateway →
//! validate → persist). When exporting is off the propagation still works (spans are no-ops that keep the
//! incoming context), so a trace started elsewhere is not broken by a service that does not export.

use std::sync::OnceLock;

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{Span as _, SpanContext, Status, Tracer as _};
pub use opentelemetry::trace::{SpanKind, TraceContextExt};
pub use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;

/// Why tracing could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("building the OTLP span exporter: {0}")]
    Exporter(String),
    #[error("starting the OTLP export runtime: {0}")]
    Runtime(#[from] std::io::Error),
}

/// The service's tracer provider; dropping it without [`Tracing::shutdown`] may lose the last spans.
pub struct Tracing {
    provider: Option<SdkTracerProvider>,
    /// gRPC export runs on its own small runtime, so that it works from any thread (Pingora's and the SDK's
    /// batch thread included) and outlives the service's runtime during the final flush.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Tracing {
    /// Whether spans are exported.
    pub fn enabled(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports what is still queued and stops the exporter.
    pub fn shutdown(mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            tracing::warn!(error = %e, "flushing the last spans failed");
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
}

/// Whether the environment asks for OTLP trace export.
pub fn export_requested() -> bool {
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return false;
    }
    match env("OTEL_TRACES_EXPORTER").map(|v| v.to_ascii_lowercase()) {
        Some(v) if v == "none" => false,
        Some(v) if v == "otlp" => true,
        _ => env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some() || env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some(),
    }
}

fn grpc_requested() -> bool {
    env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .is_some_and(|p| p.eq_ignore_ascii_case("grpc"))
}

/// The resource every signal of `service` carries: the standard variables first, then the service's own name,
/// its version and an instance id (the pod's host name when there is one, so that replicas can be told apart).
pub fn resource(service: &'static str) -> Resource {
    static INSTANCE: OnceLock<String> = OnceLock::new();
    let detected = Resource::builder().build();
    let mut builder = Resource::builder();
    // The SDK's detectors read OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, else fall back to
    // `unknown_service:<executable>`.
    let named = detected.get(&"service.name".into()).is_some_and(|n| !n.as_str().starts_with("unknown_service"));
    if !named {
        builder = builder.with_service_name(service);
    }
    let mut extra = Vec::new();
    if detected.get(&"service.version".into()).is_none() {
        extra.push(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    }
    if detected.get(&"service.instance.id".into()).is_none() {
        let id = INSTANCE.get_or_init(|| {
            let host = env("HOSTNAME").unwrap_or_else(|| "localhost".into());
            format!("{host}-{}", std::process::id())
        });
        extra.push(KeyValue::new("service.instance.id", id.clone()));
    }
    builder.with_attributes(extra).build()
}

/// Installs the W3C propagator and, when asked for (see the module docs), the OTLP exporter as the global
/// tracer provider. Call once, after logging is set up.
pub fn init(service: &'static str) -> Result<Tracing, TelemetryError> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    if !export_requested() {
        return Ok(Tracing { provider: None, runtime: None });
    }
    SPANS.store(true, std::sync::atomic::Ordering::Relaxed);
    let runtime = if grpc_requested() {
        Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("otlp-export")
                .enable_all()
                .build()?,
        )
    } else {
        None
    };
    let exporter = {
        let _guard = runtime.as_ref().map(|rt| rt.enter());
        opentelemetry_otlp::SpanExporter::builder().build().map_err(|e| TelemetryError::Exporter(e.to_string()))?
    };
    let provider = SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource(service)).build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    tracing::info!(grpc = runtime.is_some(), "exporting traces over OTLP");
    Ok(Tracing { provider: Some(provider), runtime })
}

/// The tracer a service's spans come from.
pub fn tracer(name: &'static str) -> opentelemetry::global::BoxedTracer {
    opentelemetry::global::tracer(name)
}

/// Whether [`init`] installed a tracer provider. Without one, [`start`] returns the parent context itself: the
/// no-op tracer's span would carry the parent's span context anyway, and making it (a boxed span, a new context)
/// cost every request a few allocations for nothing.
static SPANS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Starts a span of `kind` under `parent` and returns the context holding it. Attributes are only built when the
/// span is sampled: `attributes` is not called for the spans a ratio sampler drops. Without tracing (see
/// [`init`]) the parent context is returned: an incoming context still passes on unchanged.
pub fn start(
    tracer: &opentelemetry::global::BoxedTracer,
    name: impl Into<std::borrow::Cow<'static, str>>,
    kind: SpanKind,
    parent: &Context,
    attributes: impl FnOnce() -> Vec<KeyValue>,
) -> Context {
    if !SPANS.load(std::sync::atomic::Ordering::Relaxed) {
        return parent.clone();
    }
    let mut span = tracer.span_builder(name).with_kind(kind).start_with_context(tracer, parent);
    if span.is_recording() {
        span.set_attributes(attributes());
    }
    parent.with_span(span)
}

/// What an HTTP SERVER span is made of: the request's line and headers, and the scheme it came in on.
pub struct HttpRequest<'a> {
    pub method: &'a http::Method,
    pub uri: &'a http::Uri,
    pub version: http::Version,
    pub headers: &'a http::HeaderMap,
    pub scheme: &'static str,
}

/// Starts the SERVER span of an HTTP request, continuing the `traceparent` it carries. The name is the method
/// (the semantic conventions' name without a route; `HTTP` for an unknown method); the attributes are the
/// request's, then those `extra` adds (all built only for a sampled span).
pub fn http_server_span(
    tracer: &opentelemetry::global::BoxedTracer,
    req: &HttpRequest<'_>,
    extra: impl FnOnce(&mut Vec<KeyValue>),
) -> Context {
    http_server_span_under(tracer, req, &extract_http(req.headers), extra)
}

/// [`http_server_span`] under a parent the caller already has: [`extract_http`]'s answer, or an empty context
/// when it knows the request carries no `traceparent` (the edge, which reads the head in one pass).
pub fn http_server_span_under(
    tracer: &opentelemetry::global::BoxedTracer,
    req: &HttpRequest<'_>,
    parent: &Context,
    extra: impl FnOnce(&mut Vec<KeyValue>),
) -> Context {
    let name = http_span_name(req.method);
    start(tracer, name, SpanKind::Server, parent, || {
        let mut v = vec![
            KeyValue::new("http.request.method", if name == "HTTP" { "_OTHER" } else { name }),
            KeyValue::new("url.path", req.uri.path().to_owned()),
            KeyValue::new("url.scheme", req.scheme),
            KeyValue::new("network.protocol.version", http_protocol_version(req.version)),
        ];
        if let Some(ua) = req.headers.get(http::header::USER_AGENT).and_then(|v| v.to_str().ok()) {
            v.push(KeyValue::new("user_agent.original", ua.to_owned()));
        }
        extra(&mut v);
        v
    })
}

fn http_span_name(method: &http::Method) -> &'static str {
    known_method(method).unwrap_or("HTTP")
}

/// The method's name if it is one of HTTP's standard methods (the semantic conventions' known methods; others
/// are `_OTHER` in attributes and labels, so that clients cannot grow their set without bound).
pub fn known_method(method: &http::Method) -> Option<&'static str> {
    Some(match method.as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        "PATCH" => "PATCH",
        "CONNECT" => "CONNECT",
        "TRACE" => "TRACE",
        _ => return None,
    })
}

/// `network.protocol.version` of an HTTP version.
fn http_protocol_version(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_10 => "1.0",
        http::Version::HTTP_2 => "2",
        http::Version::HTTP_3 => "3",
        _ => "1.1",
    }
}

/// Ends the current span of `cx`; with an error, marks it failed with the semantic conventions' `error.type`.
pub fn end(cx: &Context, error: Option<(&str, &dyn std::fmt::Display)>) {
    let span = cx.span();
    if let Some((kind, message)) = error
        && span.is_recording()
    {
        span.set_attribute(KeyValue::new("error.type", kind.to_owned()));
        span.set_status(Status::error(message.to_string()));
    }
    span.end();
}

/// Attributes of Kafka spans (semantic conventions for messaging, Kafka flavour).
pub fn kafka_attributes(operation: &'static str, destination: &str, extra: &[(&'static str, String)]) -> Vec<KeyValue> {
    let kind = match operation {
        "send" => "send",
        "process" => "process",
        "poll" => "receive",
        _ => "settle",
    };
    let mut v = vec![
        KeyValue::new("messaging.system", "kafka"),
        KeyValue::new("messaging.operation.name", operation),
        KeyValue::new("messaging.operation.type", kind),
        KeyValue::new("messaging.destination.name", destination.to_owned()),
    ];
    v.extend(extra.iter().map(|(k, val)| KeyValue::new(*k, val.clone())));
    v
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        let v = self.0.get(key).and_then(|v| v.to_str().ok());
        if key == "traceparent" { v.filter(|v| is_valid_traceparent(v)) } else { v }
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct TraceparentExtractor<'a>(&'a str);

impl Extractor for TraceparentExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent" && is_valid_traceparent(self.0)).then_some(self.0)
    }
    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

/// W3C trace context version 00: `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`, lowercase, ids not all
/// zero. (The OpenTelemetry propagator alone also takes short ids, which other tracers would refuse.)
pub fn is_valid_traceparent(v: &str) -> bool {
    let mut parts = v.split('-');
    fn hex(s: Option<&str>, n: usize) -> Option<&str> {
        s.filter(|s| s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    }
    let version = parts.next();
    let (trace, span, flags) = (hex(parts.next(), 32), hex(parts.next(), 16), hex(parts.next(), 2));
    version == Some("00")
        && parts.next().is_none()
        && flags.is_some()
        && trace.is_some_and(|t| t.bytes().any(|b| b != b'0'))
        && span.is_some_and(|s| s.bytes().any(|b| b != b'0'))
}

/// The remote context of an HTTP request's `traceparent` (empty when absent or malformed).
pub fn extract_http(headers: &http::HeaderMap) -> Context {
    const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");
    // Most requests carry none: no propagator, no name parsed from text, no copy of the thread's current
    // context (the propagator's answer without a parent; nothing here ever attaches one).
    if !headers.contains_key(TRACEPARENT) {
        return Context::new();
    }
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// The remote context named by a `traceparent` value (a Kafka header), empty when absent or malformed.
pub fn from_traceparent(traceparent: Option<&str>) -> Context {
    match traceparent {
        Some(tp) => TraceContextPropagator::new().extract(&TraceparentExtractor(tp)),
        None => Context::new(),
    }
}

/// The `traceparent` value naming the context's current span, if it has a valid one.
pub fn traceparent(cx: &Context) -> Option<String> {
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| traceparent_of(sc))
}

/// The W3C `traceparent` of `sc`: `00-{trace id}-{span id}-{flags}` in lower-case hex. Written digit by digit,
/// not through `format!` (the edge makes one for every request; `{:032x}` of the ids cost it ~1,500
/// instructions).
pub fn traceparent_of(sc: &SpanContext) -> String {
    // ASCII by construction.
    String::from_utf8(traceparent_bytes(sc).to_vec()).unwrap_or_default()
}

/// [`traceparent_of`] into a fixed array: no allocation, no capacity checks (the edge makes one per request).
pub fn traceparent_bytes(sc: &SpanContext) -> [u8; 55] {
    let mut out = *b"00-00000000000000000000000000000000-0000000000000000-00";
    hex_into(&mut out[3..35], &sc.trace_id().to_bytes());
    hex_into(&mut out[36..52], &sc.span_id().to_bytes());
    hex_into(&mut out[53..55], &[sc.trace_flags().to_u8()]);
    out
}

/// `bytes` in lower-case hex into `out` (twice as long).
pub fn hex_into(out: &mut [u8], bytes: &[u8]) {
    // Both digits of a byte in one lookup: every request writes 25 bytes of ids this way (its `traceparent`),
    // and the edge's access log 16 more.
    const PAIRS: [[u8; 2]; 256] = {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut t = [[0u8; 2]; 256];
        let mut b = 0;
        while b < 256 {
            t[b] = [HEX[b >> 4], HEX[b & 15]];
            b += 1;
        }
        t
    };
    for (pair, &b) in out.chunks_exact_mut(2).zip(bytes) {
        pair.copy_from_slice(&PAIRS[usize::from(b)]);
    }
}

/// `bytes` in lower-case hex, appended to `out` (trace and span ids in headers and log lines).
pub fn write_hex(out: &mut Vec<u8>, bytes: &[u8]) {
    let start = out.len();
    out.resize(start + 2 * bytes.len(), 0);
    hex_into(&mut out[start..], bytes);
}

/// The ids that logs of a span carry (`trace_id`, `span_id` in hex), empty when the context has no valid span.
pub fn log_ids(span: &SpanContext) -> (String, String) {
    if span.is_valid() {
        (span.trace_id().to_string(), span.span_id().to_string())
    } else {
        (String::new(), String::new())
    }
}

/// A `tracing` span whose fields are the OpenTelemetry ids of `cx`, entered while handling a request or a
/// message so that every log line written meanwhile carries `trace_id` and `span_id`.
pub fn log_span(cx: &Context) -> tracing::Span {
    let span = cx.span();
    let sc = span.span_context();
    if !sc.is_valid() {
        return tracing::info_span!("trace", trace_id = "", span_id = "");
    }
    // Formatted only if the span is enabled and recorded by the subscriber.
    tracing::info_span!("trace", trace_id = %sc.trace_id(), span_id = %sc.span_id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanId, TraceFlags, TraceId};
    use opentelemetry::trace::{TraceState, TracerProvider as _};

    #[test]
    fn hex_is_lower_case_and_keeps_leading_zeros() {
        let mut out = Vec::new();
        write_hex(&mut out, &0x00ab_cdef_u32.to_be_bytes());
        assert_eq!(out, b"00abcdef");
        let every: Vec<u8> = (0..=255).collect();
        let mut out = Vec::new();
        write_hex(&mut out, &every);
        let expected: String = every.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(String::from_utf8(out).expect("ascii"), expected, "every byte value");
    }

    #[test]
    fn a_traceparent_round_trips_and_malformed_ones_are_empty() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = from_traceparent(Some(tp));
        let sc = cx.span().span_context().clone();
        assert!(sc.is_valid() && sc.is_remote() && sc.is_sampled());
        assert_eq!(sc.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(traceparent(&cx).as_deref(), Some(tp));
        for bad in [
            "",
            "garbage",
            "00-4bf9-00f0-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-00",
        ] {
            assert!(!is_valid_traceparent(bad), "{bad}");
            assert!(!from_traceparent(Some(bad)).span().span_context().is_valid(), "{bad}");
        }
        assert!(traceparent(&Context::new()).is_none());
        let mut headers = http::HeaderMap::new();
        headers.insert("traceparent", http::HeaderValue::from_static(tp));
        assert_eq!(extract_http(&headers).span().span_context().span_id().to_string(), "00f067aa0ba902b7");
        assert_eq!(traceparent(&extract_http(&headers)).as_deref(), Some(tp), "written back as it came");
        assert!(!extract_http(&http::HeaderMap::new()).span().span_context().is_valid(), "no header: no parent");
    }

    #[test]
    fn a_child_span_keeps_the_trace_and_names_itself_in_the_traceparent() {
        let provider = SdkTracerProvider::builder().build();
        let tracer = provider.tracer("unit");
        let parent = from_traceparent(Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        let span = tracer.start_with_context("child", &parent);
        let child_id = span.span_context().span_id();
        let cx = parent.with_span(span);
        let tp = traceparent(&cx).expect("traceparent");
        assert_eq!(tp, format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{child_id}-01"));
        let (trace_id, span_id) = log_ids(cx.span().span_context());
        assert_eq!((trace_id.as_str(), span_id), ("4bf92f3577b34da6a3ce929d0e0e4736", child_id.to_string()));
        cx.span().end();
    }

    #[test]
    fn the_service_names_itself_unless_the_environment_does() {
        let name = resource("unit").get(&"service.name".into()).map(|v| v.as_str().into_owned());
        match std::env::var("OTEL_SERVICE_NAME") {
            Ok(from_env) => assert_eq!(name, Some(from_env)),
            // Not the SDK's fallback `unknown_service:<executable>`.
            Err(_) if std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_err() => assert_eq!(name.as_deref(), Some("unit")),
            Err(_) => assert!(name.is_some_and(|n| !n.starts_with("unknown_service"))),
        }
    }

    #[test]
    fn without_tracing_a_span_is_its_parent_context() {
        // No test of this crate calls `init`, so no provider is installed.
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = start(&tracer("unit"), "x", SpanKind::Server, &from_traceparent(Some(tp)), || {
            panic!("attributes built without tracing")
        });
        assert_eq!(traceparent(&cx).as_deref(), Some(tp), "the incoming context passes on unchanged");
        assert!(traceparent(&start(&tracer("unit"), "y", SpanKind::Server, &Context::new(), Vec::new)).is_none());
    }

    #[test]
    fn an_unsampled_parent_stays_unsampled() {
        let provider = SdkTracerProvider::builder().build();
        let tracer = provider.tracer("unit");
        let remote = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("id"),
            SpanId::from_hex("00f067aa0ba902b7").expect("id"),
            TraceFlags::default(),
            true,
            TraceState::default(),
        );
        let parent = Context::new().with_remote_span_context(remote);
        let span = tracer.start_with_context("child", &parent);
        assert!(!span.span_context().is_sampled());
        assert!(traceparent(&parent.with_span(span)).is_some_and(|tp| tp.ends_with("-00")));
    }
}
