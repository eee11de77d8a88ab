//! A real OTLP trace receiver for tests: a gRPC `TraceService` (tonic) and an HTTP/protobuf `POST /v1/traces`
//! endpoint on loopback, both decoding the protobuf requests the services send and keeping the spans, so that a
//! test can check what a collector such as Tempo would get.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message as _;
use tokio::net::TcpListener;

/// One received span, flattened for assertions (ids in lowercase hex, as in `traceparent`).
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// `service.name` of the resource that sent it.
    pub service: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    /// OTLP `SpanKind`: 1 internal, 2 server, 3 client, 4 producer, 5 consumer.
    pub kind: i32,
    pub attributes: BTreeMap<String, String>,
    /// Names of the span's events.
    pub events: Vec<String>,
    /// OTLP status code: 0 unset, 1 ok, 2 error.
    pub status: i32,
    /// `grpc` or `http`: the transport it arrived on.
    pub transport: &'static str,
}

impl ReceivedSpan {
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

type Store = Arc<Mutex<Vec<ReceivedSpan>>>;

/// The receiver; stops when dropped.
pub struct OtlpReceiver {
    /// `http://127.0.0.1:{port}`, for `OTEL_EXPORTER_OTLP_ENDPOINT` with `OTEL_EXPORTER_OTLP_PROTOCOL=grpc`.
    pub grpc_endpoint: String,
    /// `http://127.0.0.1:{port}`, for `OTEL_EXPORTER_OTLP_ENDPOINT` with `http/protobuf` (`/v1/traces` is added).
    pub http_endpoint: String,
    spans: Store,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(v: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn keep(store: &Store, request: ExportTraceServiceRequest, transport: &'static str) {
    let mut out = Vec::new();
    for rs in request.resource_spans {
        let service = rs
            .resource
            .as_ref()
            .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
            .map(|a| text(a.value.as_ref()))
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                out.push(ReceivedSpan {
                    service: service.clone(),
                    name: s.name,
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: hex(&s.parent_span_id),
                    kind: s.kind,
                    attributes: s.attributes.iter().map(|a| (a.key.clone(), text(a.value.as_ref()))).collect(),
                    events: s.events.iter().map(|e| e.name.clone()).collect(),
                    status: s.status.map_or(0, |st| st.code),
                    transport,
                });
            }
        }
    }
    if let Ok(mut spans) = store.lock() {
        spans.extend(out);
    }
}

struct Grpc(Store);

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        keep(&self.0, request.into_inner(), "grpc");
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

impl OtlpReceiver {
    /// Listens on two free loopback ports.
    pub async fn start() -> anyhow::Result<Self> {
        let spans: Store = Arc::default();
        let grpc_listener = TcpListener::bind("127.0.0.1:0").await?;
        let http_listener = TcpListener::bind("127.0.0.1:0").await?;
        let grpc_endpoint = format!("http://{}", grpc_listener.local_addr()?);
        let http_endpoint = format!("http://{}", http_listener.local_addr()?);

        let grpc = {
            let service = TraceServiceServer::new(Grpc(spans.clone()));
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(grpc_listener);
            tokio::spawn(async move {
                if let Err(e) =
                    tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming).await
                {
                    eprintln!("OTLP gRPC receiver stopped: {e}");
                }
            })
        };
        let http = {
            let store = spans.clone();
            tokio::spawn(async move {
                while let Ok((stream, _)) = http_listener.accept().await {
                    let store = store.clone();
                    tokio::spawn(async move {
                        let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                            let store = store.clone();
                            async move { Ok::<_, Infallible>(http_export(&store, req).await) }
                        });
                        let _ = auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            })
        };
        Ok(Self { grpc_endpoint, http_endpoint, spans, tasks: vec![grpc, http] })
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The spans of trace `trace_id`, once `done` holds for them, or whatever arrived by `timeout`.
    pub async fn wait_trace(
        &self,
        trace_id: &str,
        timeout: Duration,
        done: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> Vec<ReceivedSpan> {
        let deadline = Instant::now() + timeout;
        loop {
            let spans: Vec<ReceivedSpan> = self.spans().into_iter().filter(|s| s.trace_id == trace_id).collect();
            if done(&spans) || Instant::now() >= deadline {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn http_export(store: &Store, req: hyper::Request<hyper::body::Incoming>) -> hyper::Response<Full<Bytes>> {
    let reply = |status: u16, body: Vec<u8>| {
        let mut r = hyper::Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
        r.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("application/x-protobuf"));
        r
    };
    if req.method() != hyper::Method::POST || req.uri().path() != "/v1/traces" {
        return reply(404, Vec::new());
    }
    let is_protobuf = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/x-protobuf"));
    if !is_protobuf {
        return reply(415, Vec::new());
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return reply(400, Vec::new()),
    };
    match ExportTraceServiceRequest::decode(body) {
        Ok(request) => {
            keep(store, request, "http");
            reply(200, ExportTraceServiceResponse { partial_success: None }.encode_to_vec())
        }
        Err(_) => reply(400, Vec::new()),
    }
}
