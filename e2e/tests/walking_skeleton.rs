//! The walking skeleton, end to end through the real binaries: HTTPS on the edge, JWT on the gateway, a command
//! in Tansu, the workers' consumer group, a row in PostgreSQL.

use std::time::Duration;

use devkit::{Claims, SigningKey, unsigned_token};
use serde_json::{Value, json};
use testkit::{Stack, StackOptions, eventually};

fn order_body(customer: &str) -> Value {
    json!({
        "customer_id": customer,
        "currency": "EUR",
        "items": [{"sku": "SKU-1", "qty": 2, "unit_price_cents": 1250}, {"sku": "SKU-2", "qty": 1, "unit_price_cents": 99}]
    })
}

async fn post_async(stack: &Stack, token: Option<&str>, body: &str) -> anyhow::Result<reqwest::Response> {
    let client = stack.https_client()?;
    let mut req = client
        .post(format!("{}/v1/orders/async", stack.edge_url()))
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    Ok(req.send().await?)
}

async fn order_count(stack: &Stack) -> anyhow::Result<i64> {
    let db = stack.postgres.client().await?;
    Ok(db.query_one("SELECT count(*) FROM orders", &[]).await?.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accepted_order_reaches_postgres() -> anyhow::Result<()> {
    let stack = Stack::start(StackOptions::default()).await?;
    let token = stack.token();
    let resp = post_async(&stack, Some(&token), &order_body("cust-42").to_string()).await?;
    assert_eq!(resp.status(), 202);
    assert!(resp.headers().get("x-request-id").is_some(), "the edge echoes a request id");
    let location = resp.headers().get("location").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let body: Value = resp.json().await?;
    let id = body["id"].as_str().expect("id in the answer").to_owned();
    assert_eq!(location.as_deref(), Some(format!("/v1/orders/{id}").as_str()));
    let order_id: uuid::Uuid = id.parse()?;

    let db = stack.postgres.client().await?;
    let row = eventually(Duration::from_secs(10), "the order row", || {
        let db = &db;
        async move {
            db.query_opt("SELECT customer_id, currency, total_cents, status FROM orders WHERE id = $1", &[&order_id])
                .await
                .ok()
                .flatten()
        }
    })
    .await?;
    assert_eq!(row.get::<_, String>(0), "cust-42");
    assert_eq!(row.get::<_, String>(1), "EUR");
    assert_eq!(row.get::<_, i64>(2), 2 * 1250 + 99);
    assert_eq!(row.get::<_, String>(3), "accepted");
    let items: i64 = db.query_one("SELECT count(*) FROM order_items WHERE order_id = $1", &[&order_id]).await?.get(0);
    assert_eq!(items, 2);

    // The Location answers, through the edge, from PostgreSQL.
    let client = stack.https_client()?;
    let get = |path: String, token: String| {
        let (client, url) = (client.clone(), format!("{}{path}", stack.edge_url()));
        async move { client.get(url).bearer_auth(token).send().await }
    };
    let resp = get(location.clone().unwrap_or_default(), token.clone()).await?;
    assert_eq!(resp.status(), 200);
    let order: Value = resp.json().await?;
    assert_eq!(order["id"], id.as_str());
    assert_eq!(order["status"], "accepted");
    assert_eq!(order["currency"], "EUR");
    assert_eq!(order["total_cents"], 2 * 1250 + 99);
    assert_eq!(order["items"].as_array().map(Vec::len), Some(2));
    assert_eq!(order["items"][0]["sku"], "SKU-1");
    assert_eq!(order["history"][0]["status"], "received");
    assert_eq!(order["history"][1]["status"], "accepted");

    let unknown = get(format!("/v1/orders/{}", uuid::Uuid::now_v7()), token.clone()).await?;
    assert_eq!(unknown.status(), 404);
    assert_eq!(get("/v1/orders/not-a-uuid".into(), token.clone()).await?.status(), 400);
    let mut write_only = stack.claims();
    write_only.realm_access.roles.retain(|r| r != "orders:read");
    let resp = get(location.unwrap_or_default(), stack.key.sign(&write_only)?).await?;
    assert_eq!(resp.status(), 403, "reading needs orders:read");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_and_bodies_are_refused_with_problem_json() -> anyhow::Result<()> {
    let stack = Stack::start(StackOptions { workers: false, ..StackOptions::default() }).await?;
    let body = order_body("cust-1").to_string();
    let other_key = SigningKey::generate()?;
    let cases: Vec<(&str, Option<String>)> = vec![
        ("no token", None),
        ("expired", Some(stack.key.sign(&stack.claims().expired(120))?)),
        ("signed by another key", Some(other_key.sign(&stack.claims())?)),
        (
            "another key under the trusted kid",
            Some(SigningKey::from_pem(&stack.key.kid, other_key.private_pem())?.sign(&stack.claims())?),
        ),
        ("alg none", Some(unsigned_token(&stack.claims())?)),
        ("HS256 signed with the public key", Some(stack.key.forge_hs256_with_public_key(&stack.claims())?)),
        (
            "wrong issuer",
            Some(stack.key.sign(&Claims { iss: "https://evil.test/realms/orders".into(), ..stack.claims() })?),
        ),
        ("wrong audience", Some(stack.key.sign(&Claims { aud: "another-api".into(), ..stack.claims() })?)),
        ("not yet valid", Some(stack.key.sign(&Claims { nbf: stack.claims().nbf + 600, ..stack.claims() })?)),
        ("garbage", Some("not.a.jwt".into())),
    ];
    for (what, token) in cases {
        let resp = post_async(&stack, token.as_deref(), &body).await?;
        assert_eq!(resp.status(), 401, "{what}");
        let challenge = resp.headers().get("www-authenticate").and_then(|v| v.to_str().ok()).unwrap_or("");
        assert!(challenge.starts_with("Bearer"), "{what}: {challenge}");
        assert_eq!(
            resp.headers().get("content-type").and_then(|v| v.to_str().ok()),
            Some("application/problem+json"),
            "{what}"
        );
        let problem: Value = resp.json().await?;
        assert_eq!(problem["status"], 401, "{what}");
        assert!(problem["type"].as_str().is_some_and(|t| t.ends_with("/unauthorized")), "{what}: {problem}");
    }

    let mut no_roles = stack.claims();
    no_roles.realm_access.roles.clear();
    let resp = post_async(&stack, Some(&stack.key.sign(&no_roles)?), &body).await?;
    assert_eq!(resp.status(), 403, "a valid token without orders:write");

    let token = stack.token();
    let resp = post_async(&stack, Some(&token), "{\"customer_id\": ").await?;
    assert_eq!(resp.status(), 400);
    let problem: Value = resp.json().await?;
    assert!(problem["type"].as_str().is_some_and(|t| t.ends_with("/malformed-body")), "{problem}");

    // Well-formed JSON that breaks the schema: every error located by a JSON pointer.
    let mut bad = order_body("cust-1");
    bad["currency"] = json!("euro");
    bad["items"][0]["sku"] = json!("");
    let resp = post_async(&stack, Some(&token), &bad.to_string()).await?;
    assert_eq!(resp.status(), 400);
    let problem: Value = resp.json().await?;
    assert!(problem["type"].as_str().is_some_and(|t| t.ends_with("/invalid-order")), "{problem}");
    let pointers: Vec<&str> =
        problem["errors"].as_array().into_iter().flatten().filter_map(|e| e["pointer"].as_str()).collect();
    assert_eq!(pointers, ["/items/0/sku", "/currency"], "{problem}");

    let resp = stack
        .https_client()?
        .post(format!("{}/v1/orders/async", stack.edge_url()))
        .bearer_auth(&token)
        .header("content-type", "text/plain")
        .body(body.clone())
        .send()
        .await?;
    assert_eq!(resp.status(), 415);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_resumes_from_its_committed_offset() -> anyhow::Result<()> {
    let mut stack = Stack::start(StackOptions::default()).await?;
    let token = stack.token();

    // One order through the running worker, so that its group has committed an offset.
    let resp = post_async(&stack, Some(&token), &order_body("warm-up").to_string()).await?;
    assert_eq!(resp.status(), 202);
    eventually(Duration::from_secs(10), "the warm-up order", || {
        let stack = &stack;
        async move { (order_count(stack).await.ok()? == 1).then_some(()) }
    })
    .await?;

    let status = stack.workers.as_mut().expect("workers").terminate()?;
    assert!(status.success(), "workers exit 0 on SIGTERM, got {status}");

    for i in 0..100 {
        let resp = post_async(&stack, Some(&token), &order_body(&format!("cust-{i}")).to_string()).await?;
        assert_eq!(resp.status(), 202, "order {i}");
    }
    assert_eq!(order_count(&stack).await?, 1, "nothing is persisted while the worker is down");

    stack.start_workers().await?;
    eventually(Duration::from_secs(30), "the 100 orders", || {
        let stack = &stack;
        async move { (order_count(stack).await.ok()? >= 101).then_some(()) }
    })
    .await?;
    // Give a duplicate (a redelivery from offset 0) the time to show up; there must be none.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(order_count(&stack).await?, 101, "exactly the 100 new orders, none twice");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_serve_admin_endpoints_and_stop_cleanly() -> anyhow::Result<()> {
    let mut stack = Stack::start(StackOptions::default()).await?;
    let token = stack.token();
    let resp = post_async(&stack, Some(&token), &order_body("metrics").to_string()).await?;
    assert_eq!(resp.status(), 202);

    let http = reqwest::Client::new();
    for (name, port) in [
        ("edge", stack.ports.edge_admin),
        ("gateway", stack.ports.gateway_admin),
        ("workers", stack.ports.workers_admin),
    ] {
        let r = http.get(stack.admin_url(port, "/healthz")).send().await?;
        assert_eq!(r.status(), 200, "{name} /healthz");
        let r = http.get(stack.admin_url(port, "/readyz")).send().await?;
        assert_eq!(r.status(), 200, "{name} /readyz");
    }
    let gateway_metrics = http.get(stack.admin_url(stack.ports.gateway_admin, "/metrics")).send().await?.text().await?;
    assert!(
        gateway_metrics.lines().any(|l| l.starts_with("http_server_request_duration_seconds_count")
            && l.contains("http_response_status_code=\"202\"")),
        "{gateway_metrics}"
    );
    let edge_metrics = http.get(stack.admin_url(stack.ports.edge_admin, "/metrics")).send().await?.text().await?;
    assert!(edge_metrics.contains("http_server_request_duration_seconds_count"), "{edge_metrics}");
    let workers_metrics = eventually(Duration::from_secs(10), "the workers' counter", || {
        let http = &http;
        let url = stack.admin_url(stack.ports.workers_admin, "/metrics");
        async move {
            let text = http.get(url).send().await.ok()?.text().await.ok()?;
            // validate counts its verdict before persist has applied it: wait for persist's count.
            (text.contains("worker_messages_processed_total") && text.contains("outcome=\"applied\"")).then_some(text)
        }
    })
    .await?;
    assert!(workers_metrics.contains("outcome=\"applied\""), "{workers_metrics}");

    // SIGINT and SIGTERM both drain and exit 0.
    let edge = stack.edge.as_mut().expect("edge");
    assert!(edge.stop_with(2, Duration::from_secs(30))?.success(), "edge exits 0 on SIGINT");
    let gateway = stack.gateway.as_mut().expect("gateway");
    assert!(gateway.terminate()?.success(), "gateway exits 0 on SIGTERM");
    let workers = stack.workers.as_mut().expect("workers");
    assert!(workers.stop_with(2, Duration::from_secs(30))?.success(), "workers exit 0 on SIGINT");
    Ok(())
}
