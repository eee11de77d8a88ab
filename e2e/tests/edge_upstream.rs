//! The edge when the gateway is gone: an immediate 503 problem+json (the request never left the edge), and
//! traffic again once the gateway is back.

use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::{Stack, StackOptions, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_gateway_means_503_at_once_then_traffic_resumes() -> anyhow::Result<()> {
    let mut stack = Stack::start(StackOptions { workers: false, ..StackOptions::default() }).await?;
    let client = stack.https_client()?;
    let url = format!("{}/v1/orders/async", stack.edge_url());

    assert!(stack.gateway.as_mut().expect("gateway").terminate()?.success());
    let started = Instant::now();
    let resp = client.post(&url).header("content-type", "application/json").body("{}").send().await?;
    let elapsed = started.elapsed();
    assert_eq!(resp.status(), 503);
    assert!(elapsed < Duration::from_secs(1), "answered in {elapsed:?}");
    assert_eq!(resp.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
    assert!(resp.headers().get("x-request-id").is_some());
    assert_eq!(resp.headers().get("content-type").and_then(|v| v.to_str().ok()), Some("application/problem+json"));
    let problem: Value = resp.json().await?;
    assert!(problem["type"].as_str().is_some_and(|t| t.ends_with("/upstream-unavailable")), "{problem}");

    stack.gateway.as_mut().expect("gateway").start()?;
    stack.wait_ready().await?;
    eventually(Duration::from_secs(10), "the gateway to answer through the edge", || {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let r = client.post(url).header("content-type", "application/json").body("{}").send().await.ok()?;
            // No token: the gateway itself answers 401.
            (r.status() == 401).then_some(())
        }
    })
    .await?;
    Ok(())
}
