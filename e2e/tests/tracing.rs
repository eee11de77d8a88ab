//! One request, one trace: through the real stack (edge, gateway, Tansu, validate, persist, PostgreSQL), every
//! service exports its spans over OTLP to a real receiver that decodes the protobuf requests (the edge over
//! HTTP/protobuf, the others over gRPC), and the spans link up parent to child from the edge's server span down
//! to the INSERTs. A request whose incoming context is not sampled leaves no span anywhere.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{Value, json};
use testkit::otlp::{OtlpReceiver, ReceivedSpan};
use testkit::{Stack, StackOptions, eventually};

const SERVER: i32 = 2;
const CLIENT: i32 = 3;
const PRODUCER: i32 = 4;
const CONSUMER: i32 = 5;

fn env(receiver: &OtlpReceiver) -> Vec<(&'static str, String, String)> {
    let kv = |s: &'static str, k: &str, v: &str| (s, k.to_owned(), v.to_owned());
    let mut env = vec![
        kv("*", "OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
        kv("*", "OTEL_TRACES_SAMPLER_ARG", "1.0"),
        kv("*", "OTEL_BSP_SCHEDULE_DELAY", "100"),
        kv("edge", "OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.http_endpoint),
        kv("edge", "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        kv("gateway", "OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=test,service.instance.id=gw-1"),
    ];
    for s in ["gateway", "workers"] {
        env.push(kv(s, "OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.grpc_endpoint));
        env.push(kv(s, "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"));
    }
    env
}

fn order() -> Value {
    json!({"customer_id": "traced", "currency": "EUR", "items": [{"sku": "SKU-1", "qty": 2, "unit_price_cents": 500}]})
}

/// The one span named `name` of `service`, with `kind`.
fn one<'a>(spans: &'a [ReceivedSpan], service: &str, name: &str, kind: i32) -> &'a ReceivedSpan {
    let found: Vec<&ReceivedSpan> =
        spans.iter().filter(|s| s.service == service && s.name == name && s.kind == kind).collect();
    assert_eq!(found.len(), 1, "expected one {service} span {name} (kind {kind}) in {:#?}", names(spans));
    found[0]
}

fn names(spans: &[ReceivedSpan]) -> Vec<String> {
    spans
        .iter()
        .map(|s| format!("{}: {} ({}) {} <- {}", s.service, s.name, s.kind, s.span_id, s.parent_span_id))
        .collect()
}

fn has(spans: &[ReceivedSpan], service: &str, name: &str) -> bool {
    spans.iter().any(|s| s.service == service && s.name == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_is_one_trace_from_the_edge_to_postgresql() -> anyhow::Result<()> {
    let receiver = OtlpReceiver::start().await?;
    let stack = Stack::start(StackOptions { env: env(&receiver), ..StackOptions::default() }).await?;
    let client = stack.https_client()?;
    let token = stack.token();

    // A sync order: edge → gateway → orders.commands → validate → orders.validated (+ replies) → persist → SQL.
    let request_id = format!("trace-{}", uuid::Uuid::new_v4());
    let r = client
        .post(format!("{}/v1/orders", stack.edge_url()))
        .bearer_auth(&token)
        .header("x-request-id", &request_id)
        .json(&order())
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 201);
    let body: Value = r.json().await?;
    let order_id = body["id"].as_str().unwrap_or_default().to_owned();

    let edge_span = eventually(Duration::from_secs(20), "the edge's server span", || async {
        receiver
            .spans()
            .into_iter()
            .find(|s| s.service == "edge" && s.attr("http.request.header.x-request-id") == Some(request_id.as_str()))
    })
    .await?;
    let trace_id = edge_span.trace_id.clone();
    let spans = receiver
        .wait_trace(&trace_id, Duration::from_secs(30), |s| {
            has(s, "workers", "COMMIT") && has(s, "workers", "INSERT order_status_history")
        })
        .await;
    println!("{:#?}", names(&spans));

    // Who sent what, over which transport, with which resource.
    let edge = one(&spans, "edge", "POST", SERVER);
    assert!(edge.parent_span_id.is_empty(), "the edge starts the trace");
    assert_eq!(edge.transport, "http");
    assert_eq!(edge.attr("http.response.status_code"), Some("201"));
    assert_eq!(edge.attr("http.request.method"), Some("POST"));
    assert_eq!(edge.attr("url.path"), Some("/v1/orders"));
    assert_eq!(edge.attr("edge.rate_limit.outcome"), Some("immediate"));
    assert!(edge.events.iter().any(|e| e == "rate_limit.decision"), "{:?}", edge.events);

    let gateway = one(&spans, "gateway", "POST /v1/orders", SERVER);
    assert_eq!(gateway.parent_span_id, edge.span_id);
    assert_eq!(gateway.transport, "grpc");
    assert_eq!(gateway.attr("http.route"), Some("/v1/orders"));
    assert_eq!(gateway.attr("http.response.status_code"), Some("201"));

    let send = one(&spans, "gateway", "send orders.commands", PRODUCER);
    assert_eq!(send.parent_span_id, gateway.span_id);
    assert_eq!(send.attr("messaging.system"), Some("kafka"));
    assert_eq!(send.attr("messaging.destination.name"), Some("orders.commands"));
    assert_eq!(send.attr("messaging.kafka.message.key"), Some(order_id.as_str()));
    assert!(send.attr("messaging.kafka.offset").is_some());

    let validate = one(&spans, "workers", "process orders.commands", CONSUMER);
    assert_eq!(validate.parent_span_id, send.span_id);
    assert_eq!(validate.attr("messaging.operation.type"), Some("process"));
    assert!(validate.attr("messaging.consumer.group.name").is_some_and(|g| g.ends_with(".validate")));
    for topic in ["orders.validated", "orders.replies"] {
        let out = one(&spans, "workers", &format!("send {topic}"), PRODUCER);
        assert_eq!(out.parent_span_id, validate.span_id, "send {topic}");
    }
    let validated = one(&spans, "workers", "send orders.validated", PRODUCER);
    let persist = one(&spans, "workers", "process orders.validated", CONSUMER);
    assert_eq!(persist.parent_span_id, validated.span_id);
    assert!(persist.attr("messaging.consumer.group.name").is_some_and(|g| g.ends_with(".persist")));

    for statement in ["BEGIN", "INSERT processed_events", "INSERT orders", "INSERT order_items", "COMMIT"] {
        let sql = one(&spans, "workers", statement, CLIENT);
        assert_eq!(sql.parent_span_id, persist.span_id, "{statement}");
        assert_eq!(sql.attr("db.system.name"), Some("postgresql"));
        assert!(sql.attr("db.namespace").is_some_and(|n| !n.is_empty()), "{statement}: {:?}", sql.attributes);
    }
    let insert = one(&spans, "workers", "INSERT orders", CLIENT);
    assert_eq!(insert.attr("db.operation.name"), Some("INSERT"));
    assert_eq!(insert.attr("db.collection.name"), Some("orders"));
    assert!(insert.attr("db.query.text").is_some_and(|q| q.contains("INSERT INTO orders") && !q.contains("traced")));

    // Every span is in this one trace and every parent is a span of it (no dangling links).
    let ids: HashMap<&str, &ReceivedSpan> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    for s in &spans {
        assert!(s.parent_span_id.is_empty() || ids.contains_key(s.parent_span_id.as_str()), "{s:?}");
    }
    assert_eq!(spans.iter().filter(|s| s.parent_span_id.is_empty()).count(), 1);

    // Logs carry the ids: the gateway's "order accepted" line names this trace and the gateway's span.
    let gateway_log = stack.gateway.as_ref().map(|g| g.log_text()).unwrap_or_default();
    assert!(
        gateway_log.lines().any(|l| l.contains("order accepted")
            && l.contains(&format!("trace_id={trace_id}"))
            && l.contains(&format!("span_id={}", gateway.span_id))),
        "no log line with the trace's ids"
    );

    // Reading the order back: the gateway's SELECTs are children of its server span.
    let request_id = format!("trace-{}", uuid::Uuid::new_v4());
    let r = client
        .get(format!("{}/v1/orders/{order_id}", stack.edge_url()))
        .bearer_auth(&token)
        .header("x-request-id", &request_id)
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 200);
    let edge_span = eventually(Duration::from_secs(20), "the GET's edge span", || async {
        receiver.spans().into_iter().find(|s| s.attr("http.request.header.x-request-id") == Some(request_id.as_str()))
    })
    .await?;
    let spans = receiver
        .wait_trace(&edge_span.trace_id, Duration::from_secs(20), |s| has(s, "gateway", "SELECT order_status_history"))
        .await;
    let get = one(&spans, "gateway", "GET /v1/orders/{id}", SERVER);
    for statement in ["SELECT orders", "SELECT order_items", "SELECT order_status_history"] {
        assert_eq!(one(&spans, "gateway", statement, CLIENT).parent_span_id, get.span_id, "{statement}");
    }

    // Parent-based sampling: a request whose incoming context says "not sampled" leaves no span anywhere, and
    // its order still goes all the way to the database.
    let unsampled = uuid::Uuid::new_v4().simple().to_string();
    let r = client
        .post(format!("{}/v1/orders", stack.edge_url()))
        .bearer_auth(&token)
        .header("traceparent", format!("00-{unsampled}-00f067aa0ba902b7-00"))
        .json(&order())
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 201);
    let id = r.json::<Value>().await?["id"].as_str().unwrap_or_default().to_owned();
    eventually(Duration::from_secs(20), "the unsampled order in PostgreSQL", || async {
        let r = client.get(format!("{}/v1/orders/{id}", stack.edge_url())).bearer_auth(&token).send().await.ok()?;
        (r.status().as_u16() == 200).then_some(())
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await; // more than the batch delay of every exporter
    let leaked: Vec<String> =
        names(&receiver.spans().into_iter().filter(|s| s.trace_id == unsampled).collect::<Vec<_>>());
    assert!(leaked.is_empty(), "spans of an unsampled trace: {leaked:#?}");
    Ok(())
}
