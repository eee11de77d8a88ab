//! `POST /v1/orders`: the gateway publishes the command and waits for the validate job's verdict over
//! `orders.replies`, matched by correlation id; `201`, `422` with the broken rules, or `504` after the timeout
//! (the order still goes on). Several replicas each get their own replies.

use std::time::Duration;

use serde_json::{Value, json};
use testkit::{Stack, StackOptions, eventually, free_port, wait_admin_ready};

fn order(customer: &str, currency: &str, qty: i32) -> Value {
    json!({
        "customer_id": customer,
        "currency": currency,
        "items": [{"sku": "SKU-1", "qty": qty, "unit_price_cents": 1250}, {"sku": "SKU-2", "qty": 1, "unit_price_cents": 99}]
    })
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    body: &Value,
) -> anyhow::Result<(u16, Option<String>, Value)> {
    let r = client.post(url).bearer_auth(token).json(body).send().await?;
    let status = r.status().as_u16();
    let location = r.headers().get("location").and_then(|v| v.to_str().ok()).map(str::to_owned);
    Ok((status, location, r.json().await?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_orders_get_their_verdict_or_a_timeout() -> anyhow::Result<()> {
    let mut stack = Stack::start(StackOptions::default()).await?;
    let client = stack.https_client()?;
    let url = format!("{}/v1/orders", stack.edge_url());
    let token = stack.token();

    let (status, location, body) = post(&client, &url, &token, &order("sync-1", "EUR", 2)).await?;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["status"], "accepted");
    assert_eq!(body["total_cents"], 2 * 1250 + 99);
    let id = body["id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(location, Some(format!("/v1/orders/{id}")));

    let (status, _, problem) = post(&client, &url, &token, &order("sync-2", "XXX", 0)).await?;
    assert_eq!(status, 422, "{problem}");
    assert!(problem["type"].as_str().is_some_and(|t| t.ends_with("/order-rejected")), "{problem}");
    let rules: Vec<(&str, &str)> = problem["errors"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| Some((e["rule"].as_str()?, e["pointer"].as_str()?)))
        .collect();
    assert_eq!(rules, [("known-currency", "/currency"), ("positive-quantity", "/items/0/qty")], "{problem}");

    // Workers down: the request gives up after the timeout (5 s) with the id; the order is processed later.
    let workers = stack.workers.as_mut().expect("workers");
    assert!(workers.terminate()?.success());
    let started = std::time::Instant::now();
    let (status, location, problem) = post(&client, &url, &token, &order("sync-late", "EUR", 1)).await?;
    assert_eq!(status, 504, "{problem}");
    assert!(started.elapsed() < Duration::from_secs(15), "{:?}", started.elapsed());
    let late: uuid::Uuid = problem["id"].as_str().unwrap_or_default().parse()?;
    assert_eq!(location, Some(format!("/v1/orders/{late}")));
    stack.start_workers().await?;
    let db = stack.postgres.client().await?;
    let status: String = eventually(Duration::from_secs(30), "the late order", || {
        let db = &db;
        async move { db.query_opt("SELECT status FROM orders WHERE id = $1", &[&late]).await.ok()?.map(|r| r.get(0)) }
    })
    .await?;
    assert_eq!(status, "accepted");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateway_replicas_under_concurrent_sync_load_get_their_own_replies() -> anyhow::Result<()> {
    let stack = Stack::start(StackOptions { edge: false, ..StackOptions::default() }).await?;
    let (port_b, admin_b) = (free_port(), free_port());
    let _b = stack.spawn_gateway("gateway-b", port_b, admin_b, &[])?;
    let http = reqwest::Client::new();
    wait_admin_ready("gateway-b", admin_b).await?;
    let token = stack.token();
    let mut tasks = Vec::new();
    for i in 0..60 {
        let port = if i % 2 == 0 { stack.ports.gateway } else { port_b };
        let (http, token) = (http.clone(), token.clone());
        let customer = format!("replica-{i}");
        tasks.push(tokio::spawn(async move {
            let url = format!("http://127.0.0.1:{port}/v1/orders");
            post(&http, &url, &token, &order(&customer, "EUR", 1 + i % 3)).await.map(|r| (customer, r))
        }));
    }
    for t in tasks {
        let (customer, (status, location, body)) = t.await??;
        assert_eq!(status, 201, "{customer}: {body}");
        assert_eq!(body["customer_id"], customer.as_str(), "each request gets the reply to its own order");
        let id = body["id"].as_str().unwrap_or_default();
        assert_eq!(location, Some(format!("/v1/orders/{id}")));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_max_in_flight_orders_are_refused_at_once_with_retry_after() -> anyhow::Result<()> {
    // No workers: a sync request holds its slot until its 3 s timeout.
    let stack = Stack::start(StackOptions { edge: false, workers: false, ..StackOptions::default() }).await?;
    let (port, admin) = (free_port(), free_port());
    let _g = stack.spawn_gateway(
        "gateway-one-slot",
        port,
        admin,
        &[("GATEWAY_MAX_IN_FLIGHT", "1"), ("GATEWAY_SYNC__TIMEOUT_MS", "3000")],
    )?;
    let http = reqwest::Client::new();
    wait_admin_ready("the gateway", admin).await?;
    let token = stack.token();
    let url = format!("http://127.0.0.1:{port}/v1/orders");
    let holder = {
        let (http, url, token) = (http.clone(), url.clone(), token.clone());
        tokio::spawn(async move { post(&http, &url, &token, &order("holder", "EUR", 1)).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = std::time::Instant::now();
    let r = http.post(&url).bearer_auth(&token).json(&order("second", "EUR", 1)).send().await?;
    assert_eq!(r.status(), 503);
    assert!(started.elapsed() < Duration::from_secs(1), "refused at once, not queued: {:?}", started.elapsed());
    assert_eq!(r.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
    let problem: Value = r.json().await?;
    assert!(problem["type"].as_str().is_some_and(|t| t.ends_with("/overloaded")), "{problem}");

    let (status, _, _) = holder.await??;
    assert_eq!(status, 504, "the holder timed out without a worker");
    let (status, _, body) =
        post(&http, &format!("http://127.0.0.1:{port}/v1/orders/async"), &token, &order("third", "EUR", 1)).await?;
    assert_eq!(status, 202, "the slot is free again: {body}");
    Ok(())
}
