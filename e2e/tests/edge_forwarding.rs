//! What the edge forwards: the forwarding headers set, hop-by-hop headers dropped, over HTTP/1.1 and HTTP/2.

use serde_json::Value;
use testkit::{Stack, StackOptions};

/// With either runtime model (`work_stealing`: the default one single-threaded runtime per worker thread, or
/// Pingora's work-stealing runtime), two worker threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_are_set_and_hop_by_hop_ones_dropped() -> anyhow::Result<()> {
    for work_stealing in ["false", "true"] {
        forwards_headers(work_stealing).await.map_err(|e| e.context(format!("work_stealing = {work_stealing}")))?;
    }
    Ok(())
}

async fn forwards_headers(work_stealing: &str) -> anyhow::Result<()> {
    let env = vec![
        ("edge", "EDGE_WORK_STEALING".to_owned(), work_stealing.to_owned()),
        ("edge", "EDGE_THREADS".to_owned(), "2".to_owned()),
    ];
    let stack = Stack::start(StackOptions { gateway: false, workers: false, env, ..StackOptions::default() }).await?;
    // Without a gateway the stack puts an echo server on its port (the upstream).
    let ca = reqwest::Certificate::from_pem(&std::fs::read(stack.tls_dir().join("dev-cert.pem"))?)?;
    // HTTP/1.1: the only version with a Connection header (HTTP/2 forbids it).
    let client = reqwest::Client::builder().tls_certs_only([ca.clone()]).http1_only().build()?;
    let resp = client
        .get(format!("{}/v1/echo", stack.edge_url()))
        .header("connection", "x-secret")
        .header("x-secret", "not for the upstream")
        .header("x-forwarded-for", "198.51.100.9")
        .header("x-request-id", "client-chosen-id")
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), reqwest::Version::HTTP_11);
    assert_eq!(resp.headers().get("x-request-id").and_then(|v| v.to_str().ok()), Some("client-chosen-id"));
    let seen: Value = resp.json().await?;
    let h = &seen["headers"];
    let one = |k: &str| h[k][0].as_str().unwrap_or_default().to_owned();
    assert_eq!(one("x-forwarded-proto"), "https");
    assert_eq!(one("x-forwarded-for"), "198.51.100.9, 127.0.0.1", "the client's chain plus the peer");
    assert_eq!(one("x-forwarded-host"), format!("127.0.0.1:{}", stack.ports.edge));
    assert_eq!(one("x-request-id"), "client-chosen-id");
    assert!(one("traceparent").starts_with("00-"), "{seen}");
    assert!(h.get("x-secret").is_none(), "a header named by Connection is hop-by-hop: {seen}");
    assert_eq!(seen["path"], "/v1/echo");

    // HTTP/2 (by ALPN): no Host header, the :authority names the host.
    let h2 = reqwest::Client::builder().tls_certs_only([ca]).http2_prior_knowledge().build()?;
    let resp = h2.get(format!("{}/v1/echo", stack.edge_url())).send().await?;
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    let seen: Value = resp.json().await?;
    assert_eq!(seen["headers"]["x-forwarded-host"][0], format!("127.0.0.1:{}", stack.ports.edge));
    assert_eq!(seen["headers"]["x-forwarded-for"][0], "127.0.0.1", "no incoming chain: the peer alone: {seen}");
    assert!(seen["headers"]["x-request-id"][0].as_str().is_some_and(|id| !id.is_empty()), "generated: {seen}");
    Ok(())
}

/// One JSON access log line per request, with what an operator looks for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_gets_one_json_access_log_line() -> anyhow::Result<()> {
    let stack = Stack::start(StackOptions { gateway: false, workers: false, ..StackOptions::default() }).await?;
    let client = stack.https_client()?;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let resp = client
        .get(format!("{}/v1/echo?secret=not-logged", stack.edge_url()))
        .header("x-request-id", "access-log-1")
        .header("traceparent", traceparent)
        .header("user-agent", "access-log-test")
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    let body_len = resp.bytes().await?.len() as u64;
    let edge = stack.edge.as_ref().ok_or_else(|| anyhow::anyhow!("no edge"))?;
    let line: Value = testkit::eventually(std::time::Duration::from_secs(5), "the access log line", || async {
        edge.log_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["log"] == "access" && v["request_id"] == "access-log-1")
    })
    .await?;
    assert_eq!(line["method"], "GET");
    assert_eq!(line["path"], "/v1/echo", "no query string: it may carry secrets");
    assert_eq!(line["status"], 200);
    assert_eq!(line["bytes"].as_u64(), Some(body_len));
    assert_eq!(line["client"], "127.0.0.1");
    assert_eq!(line["upstream"], format!("127.0.0.1:{}", stack.ports.gateway));
    assert_eq!(line["tries"], 1);
    assert_eq!(line["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736", "the client's trace continues");
    assert_eq!(line["rate_limit"], "immediate");
    assert_eq!(line["user_agent"], "access-log-test");
    let (upstream, total) = (line["upstream_ms"].as_f64().unwrap_or(-1.0), line["total_ms"].as_f64().unwrap_or(-1.0));
    assert!(upstream >= 0.0 && total >= upstream, "{line}");
    assert!(line["time"].as_str().is_some_and(|t| t.ends_with('Z') && t.contains('T')), "{line}");
    let lines = edge.log_text().lines().filter(|l| l.contains("\"request_id\":\"access-log-1\"")).count();
    assert_eq!(lines, 1, "exactly one line per request");

    // The same request in the metrics: by status class and policy route, and the upstream's time per instance.
    let text = reqwest::get(stack.admin_url(stack.ports.edge_admin, "/metrics")).await?.text().await?;
    let instance = format!("instance=\"127.0.0.1:{}\"", stack.ports.gateway);
    assert!(
        testkit::metric(&text, "edge_upstream_duration_seconds_count", &[&instance, "status_class=\"2xx\""]) >= 1.0,
        "{text}"
    );
    let route_line = text
        .lines()
        .find(|l| l.starts_with("http_server_request_duration_seconds_count{") && l.contains("status_class=\"2xx\""))
        .unwrap_or_default();
    assert!(route_line.contains("http_route=") && !route_line.contains("http_route=\"unmatched\""), "{text}");
    Ok(())
}

/// Request bodies over the limit of their path get `413` problem+json, whether declared (`Content-Length`) or
/// streamed without a length; a route may allow more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_get_413() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("edge.toml");
    std::fs::write(
        &config,
        "[limits]\nmax_body_bytes = 1000\n[[limits.routes]]\npath_prefix = \"/v1/upload\"\nmax_body_bytes = 5000\n",
    )?;
    let stack = Stack::start(StackOptions {
        gateway: false,
        workers: false,
        env: vec![("edge", "EDGE_CONFIG".into(), config.display().to_string())],
        ..StackOptions::default()
    })
    .await?;
    let base = stack.edge_url();
    let post = |path: &str, body: reqwest::Body| {
        let (client, url) = (stack.https_client(), format!("{base}{path}"));
        async move { anyhow::Ok(client?.post(url).body(body).send().await?) }
    };

    let r = post("/v1/echo", vec![b'x'; 2000].into()).await?;
    assert_eq!(r.status(), 413);
    assert_eq!(r.headers().get("content-type").and_then(|v| v.to_str().ok()), Some("application/problem+json"));
    let problem: Value = r.json().await?;
    assert!(problem["type"].as_str().is_some_and(|t| t.ends_with("/payload-too-large")), "{problem}");
    assert_eq!(post("/v1/echo", vec![b'x'; 500].into()).await?.status(), 200);
    assert_eq!(post("/v1/upload/a", vec![b'x'; 3000].into()).await?.status(), 200, "the route allows 5000");
    assert_eq!(post("/v1/upload/a", vec![b'x'; 6000].into()).await?.status(), 413);

    // Streamed without a length (chunked): refused once the count passes the limit.
    let chunks: Vec<Result<hyper::body::Frame<bytes::Bytes>, std::io::Error>> =
        (0..4).map(|_| Ok(hyper::body::Frame::data(bytes::Bytes::from(vec![b'y'; 600])))).collect();
    let streamed = reqwest::Body::wrap(http_body_util::StreamBody::new(futures_util::stream::iter(chunks)));
    let r = post("/v1/echo", streamed).await;
    match r {
        Ok(r) => {
            println!("streamed body answered {}", r.status());
            assert_eq!(r.status(), 413)
        }
        // The edge may answer and close while the client is still sending: then the client sees the reset.
        Err(e) => {
            let cut = e.downcast_ref::<reqwest::Error>().is_some_and(|e| e.is_request() || e.is_body());
            assert!(cut, "streamed body failed some other way: {e}");
        }
    }
    Ok(())
}
