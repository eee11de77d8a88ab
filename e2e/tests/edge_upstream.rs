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

/// Two gateway instances, as two pods: the same ports on 127.0.0.1 and 127.0.0.2. Idempotent traffic through the
/// edge survives one of them being killed (retried on the other, then the dead one is out of rotation); with
/// both gone every request gets 503 at once; a restarted instance gets traffic again after its health check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_costs_no_idempotent_request_and_all_down_is_a_fast_503() -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    // The workers only apply the schema that the reads need.
    let mut stack = Stack::start(StackOptions { edge: false, ..StackOptions::default() }).await?;
    let (port, admin) = (stack.ports.gateway, stack.ports.gateway_admin);
    let mut second = stack.spawn_gateway(
        "gateway-2",
        port,
        admin,
        &[("GATEWAY_LISTEN", &format!("127.0.0.2:{port}")), ("GATEWAY_ADMIN_LISTEN", &format!("127.0.0.2:{admin}"))],
    )?;
    let _edge = stack.spawn_edge(
        "edge",
        &[],
        &[
            ("EDGE_UPSTREAM__SERVERS", format!("127.0.0.1:{port},127.0.0.2:{port}")),
            ("EDGE_UPSTREAM__HEALTH__PORT", admin.to_string()),
            ("EDGE_UPSTREAM__BALANCE", "least_conn".into()),
        ],
    )?;
    testkit::wait_admin_ready("edge", stack.ports.edge_admin).await?;
    let metrics = stack.admin_url(stack.ports.edge_admin, "/metrics");
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(20), "both instances healthy", || async {
        let text = http.get(&metrics).send().await.ok()?.text().await.ok()?;
        let healthy = text.lines().filter(|l| l.starts_with("edge_upstream_healthy{") && l.ends_with(" 1")).count();
        (healthy == 2).then_some(())
    })
    .await?;

    // Four clients reading orders (404: unknown ids, an idempotent GET) while the first instance is killed.
    let client = stack.https_client()?;
    let token = stack.token();
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let (client, token, stop, url) = (client.clone(), token.clone(), stop.clone(), stack.edge_url());
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let r = client
                        .get(format!("{url}/v1/orders/{}", uuid::Uuid::now_v7()))
                        .bearer_auth(&token)
                        .send()
                        .await?;
                    statuses.push(r.status().as_u16());
                }
                anyhow::Ok(statuses)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // SIGKILL: connections reset mid-request, nothing drained.
    let first = stack.gateway.as_mut().ok_or_else(|| anyhow::anyhow!("no gateway"))?;
    first.stop_with(libc::SIGKILL, Duration::from_secs(5))?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let mut statuses = Vec::new();
    for r in readers {
        statuses.extend(r.await??);
    }
    let failed: Vec<&u16> = statuses.iter().filter(|s| **s != 404).collect();
    println!("{} reads while an instance died, {} not 404", statuses.len(), failed.len());
    assert!(statuses.len() > 50);
    let mut by_status = std::collections::BTreeMap::new();
    for s in &failed {
        *by_status.entry(**s).or_insert(0) += 1;
    }
    assert!(failed.is_empty(), "every read should have been answered by an instance: {by_status:?}");
    let text = http.get(&metrics).send().await?.text().await?;
    assert!(
        text.lines().any(|l| l.starts_with("edge_upstream_healthy{") && l.contains("127.0.0.1") && l.ends_with(" 0")),
        "{text}"
    );

    // Both gone: 503 problem+json at once, and the edge says it is not ready.
    assert!(second.stop_with(libc::SIGKILL, Duration::from_secs(5)).is_ok());
    for _ in 0..5 {
        let started = Instant::now();
        let r = client
            .get(format!("{}/v1/orders/{}", stack.edge_url(), uuid::Uuid::now_v7()))
            .bearer_auth(&token)
            .send()
            .await?;
        assert_eq!(r.status(), 503);
        assert!(started.elapsed() < Duration::from_secs(1), "answered in {:?}", started.elapsed());
    }
    eventually(Duration::from_secs(10), "the edge to report no upstream", || async {
        let text = http.get(stack.admin_url(stack.ports.edge_admin, "/readyz")).send().await.ok()?.text().await.ok()?;
        text.contains("upstream").then_some(())
    })
    .await?;

    // One instance back: traffic resumes once its health check passes.
    second.start()?;
    let restored = Instant::now();
    eventually(Duration::from_secs(20), "traffic through the restored instance", || async {
        let r = client
            .get(format!("{}/v1/orders/{}", stack.edge_url(), uuid::Uuid::now_v7()))
            .bearer_auth(&token)
            .send()
            .await
            .ok()?;
        (r.status() == 404).then_some(())
    })
    .await?;
    println!("traffic resumed {:?} after the restart", restored.elapsed());
    Ok(())
}
