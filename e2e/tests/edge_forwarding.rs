//! What the edge forwards: the forwarding headers set, hop-by-hop headers dropped, over HTTP/1.1 and HTTP/2.

use serde_json::Value;
use testkit::{Stack, StackOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_are_set_and_hop_by_hop_ones_dropped() -> anyhow::Result<()> {
    let stack = Stack::start(StackOptions { gateway: false, workers: false, ..StackOptions::default() }).await?;
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
    assert!(seen["headers"]["x-request-id"][0].as_str().is_some_and(|id| !id.is_empty()), "generated: {seen}");
    Ok(())
}
