//! `Idempotency-Key` across gateway replicas, with real PostgreSQL (the shared key table) and Tansu: concurrent
//! identical requests make one order and publish one command; a retry gets the first answer again and publishes
//! nothing; the key reused with another body is refused; keys belong to one subject and expire.

use std::time::Duration;

use devkit::Claims;
use serde_json::{Value, json};
use testkit::kafka::topic_end;
use testkit::{Stack, StackOptions, eventually, free_port, wait_admin_ready};

fn order(customer: &str) -> Value {
    json!({"customer_id": customer, "currency": "EUR", "items": [{"sku": "SKU-1", "qty": 2, "unit_price_cents": 1250}]})
}

struct Answer {
    status: u16,
    replayed: bool,
    location: Option<String>,
    body: Value,
}

async fn post(http: &reqwest::Client, url: &str, token: &str, key: &str, body: &Value) -> anyhow::Result<Answer> {
    let r = http.post(url).bearer_auth(token).header("idempotency-key", key).json(body).send().await?;
    let header = |n: &str| r.headers().get(n).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let (status, replayed, location) =
        (r.status().as_u16(), header("idempotent-replayed").as_deref() == Some("true"), header("location"));
    Ok(Answer { status, replayed, location, body: r.json().await? })
}

async fn orders_of(stack: &Stack, customer: &str) -> anyhow::Result<i64> {
    let db = stack.postgres.client().await?;
    Ok(db.query_one("SELECT count(*) FROM orders WHERE customer_id = $1", &[&customer]).await?.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_makes_one_order_across_replicas() -> anyhow::Result<()> {
    let stack = Stack::start(StackOptions { edge: false, ..StackOptions::default() }).await?;
    let (port2, admin2) = (free_port(), free_port());
    let _replica = stack.spawn_gateway("gateway-2", port2, admin2, &[])?;
    wait_admin_ready("gateway-2", admin2).await?;
    let http = reqwest::Client::new();
    let urls = [stack.ports.gateway, port2].map(|p| format!("http://127.0.0.1:{p}/v1/orders/async"));
    let token = stack.token();
    let brokers = stack.tansu.brokers();
    let commands = order_contract::topics::COMMANDS;

    // 50 identical requests at once, alternating between the replicas.
    let before = topic_end(&brokers, commands).await?;
    let body = order("idem-concurrent");
    let answers =
        futures_util::future::join_all((0..50).map(|i| post(&http, &urls[i % 2], &token, "key-concurrent-1", &body)))
            .await;
    let mut ids = std::collections::BTreeSet::new();
    let (mut accepted, mut in_use) = (0, 0);
    for a in answers {
        let a = a?;
        match a.status {
            202 => {
                accepted += 1;
                ids.insert(a.body["id"].as_str().unwrap_or_default().to_owned());
            }
            409 => {
                in_use += 1;
                assert!(a.body["type"].as_str().is_some_and(|t| t.ends_with("/idempotency-key-in-use")), "{}", a.body);
            }
            s => anyhow::bail!("unexpected {s}: {}", a.body),
        }
    }
    println!("concurrent: {accepted} accepted (1 fresh + replays), {in_use} in use");
    assert!(accepted >= 1, "{accepted} accepted, {in_use} in use");
    assert_eq!(ids.len(), 1, "every 202 names the same order: {ids:?}");
    let id = ids.into_iter().next().unwrap_or_default();
    assert_eq!(topic_end(&brokers, commands).await? - before, 1, "exactly one command published");
    eventually(Duration::from_secs(30), "the order to be stored", || async {
        orders_of(&stack, "idem-concurrent").await.ok().filter(|n| *n == 1)
    })
    .await?;

    // A retry later, on either replica: the first answer again, marked as replayed, nothing published.
    for url in &urls {
        let a = post(&http, url, &token, "key-concurrent-1", &body).await?;
        assert_eq!((a.status, a.replayed), (202, true), "{}", a.body);
        assert_eq!(a.body["id"], id.as_str());
        assert_eq!(a.location, Some(format!("/v1/orders/{id}")));
    }
    // The same key with another body is refused.
    let a = post(&http, &urls[1], &token, "key-concurrent-1", &order("idem-other")).await?;
    assert_eq!(a.status, 422, "{}", a.body);
    assert!(a.body["type"].as_str().is_some_and(|t| t.ends_with("/idempotency-key-reused")), "{}", a.body);
    assert_eq!(topic_end(&brokers, commands).await? - before, 1, "retries published nothing");

    // Keys belong to a subject: another user's identical key and body is another order.
    let bob = stack.key.sign(&Claims { sub: "bob".into(), ..stack.claims() })?;
    let a = post(&http, &urls[0], &bob, "key-concurrent-1", &body).await?;
    assert_eq!((a.status, a.replayed), (202, false), "{}", a.body);
    assert_ne!(a.body["id"], id.as_str());

    // Sync: the verdict is replayed, body and all.
    let sync_url = format!("http://127.0.0.1:{}/v1/orders", stack.ports.gateway);
    let first = post(&http, &sync_url, &token, "key-sync-1", &order("idem-sync")).await?;
    assert_eq!(first.status, 201, "{}", first.body);
    let again = post(
        &http,
        &sync_url.replace(&stack.ports.gateway.to_string(), &port2.to_string()),
        &token,
        "key-sync-1",
        &order("idem-sync"),
    )
    .await?;
    assert_eq!((again.status, again.replayed), (201, true));
    assert_eq!(again.body, first.body);

    // A key that is not visible ASCII is a 400.
    let a = post(&http, &urls[0], &token, &"k".repeat(256), &body).await?;
    assert_eq!(a.status, 400, "{}", a.body);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_expire_and_abandoned_claims_are_taken_over() -> anyhow::Result<()> {
    let stack = Stack::start(StackOptions { edge: false, ..StackOptions::default() }).await?;
    let http = reqwest::Client::new();
    let db = stack.postgres.client().await?;
    let url = format!("http://127.0.0.1:{}/v1/orders/async", stack.ports.gateway);
    let token = stack.token();
    let first = post(&http, &url, &token, "key-expiring", &order("idem-expiry")).await?;
    assert_eq!(first.status, 202, "{}", first.body);
    let replay = post(&http, &url, &token, "key-expiring", &order("idem-expiry")).await?;
    assert_eq!((replay.status, replay.replayed, &replay.body["id"]), (202, true, &first.body["id"]));
    // The key's time is up (the TTL must exceed a request's lease, so the test ages the row instead of waiting).
    let aged = db
        .execute("UPDATE idempotency_keys SET expires_at = now() - interval '1 s' WHERE key = 'key-expiring'", &[])
        .await?;
    assert_eq!(aged, 1);
    let later = post(&http, &url, &token, "key-expiring", &order("idem-expiry")).await?;
    assert_eq!((later.status, later.replayed), (202, false), "{}", later.body);
    assert_ne!(later.body["id"], first.body["id"], "an expired key starts a new order");
    eventually(Duration::from_secs(30), "both orders to be stored", || async {
        orders_of(&stack, "idem-expiry").await.ok().filter(|n| *n == 2)
    })
    .await?;

    // A replica that died after publishing left its claim without an answer: once the lease is over, a retry
    // takes the claim over with the same order and event ids, and the republished command changes nothing.
    let first = post(&http, &url, &token, "key-abandoned", &order("idem-abandoned")).await?;
    assert_eq!(first.status, 202, "{}", first.body);
    let n = db
        .execute(
            "UPDATE idempotency_keys SET response_status = NULL, response_body = NULL, locked_until = now() - interval '1 s'
             WHERE key = 'key-abandoned'",
            &[],
        )
        .await?;
    assert_eq!(n, 1);
    let brokers = stack.tansu.brokers();
    let before = topic_end(&brokers, order_contract::topics::COMMANDS).await?;
    let retry = post(&http, &url, &token, "key-abandoned", &order("idem-abandoned")).await?;
    assert_eq!((retry.status, retry.replayed, &retry.body["id"]), (202, false, &first.body["id"]));
    assert_eq!(topic_end(&brokers, order_contract::topics::COMMANDS).await? - before, 1, "republished once");
    let replay = post(&http, &url, &token, "key-abandoned", &order("idem-abandoned")).await?;
    assert_eq!((replay.status, replay.replayed), (202, true));
    eventually(Duration::from_secs(30), "the order to be stored", || async {
        orders_of(&stack, "idem-abandoned").await.ok().filter(|n| *n == 1)
    })
    .await?;
    // Both copies of the command were validated; the second verdict is the same event and was dropped.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(orders_of(&stack, "idem-abandoned").await?, 1);
    let history: i64 = db
        .query_one(
            "SELECT count(*) FROM order_status_history h JOIN orders o ON o.id = h.order_id WHERE o.customer_id = 'idem-abandoned'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(history, 2, "received + accepted, once each");
    Ok(())
}

/// A client that gives up while its keyed request is still being published (the broker is frozen) does not lock
/// its own retry out: the gateway releases the claim of a request that went away, so the retry is served at once
/// instead of getting `409` until the claim's lease runs out. The retry republishes the same command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_its_client_abandoned_does_not_lock_its_key() -> anyhow::Result<()> {
    let stack = Stack::start(StackOptions { edge: false, ..StackOptions::default() }).await?;
    let http = reqwest::Client::new();
    let db = stack.postgres.client().await?;
    let url = format!("http://127.0.0.1:{}/v1/orders/async", stack.ports.gateway);
    let token = stack.token();
    let warm = post(&http, &url, &token, "key-warm", &order("idem-gone")).await?;
    assert_eq!(warm.status, 202, "{}", warm.body);

    stack.tansu.freeze()?;
    let impatient = reqwest::Client::builder().timeout(Duration::from_millis(500)).build()?;
    let gone = post(&impatient, &url, &token, "key-gone", &order("idem-gone")).await;
    assert!(gone.is_err(), "the client gave up before the broker answered");
    let released = eventually(Duration::from_secs(5), "the abandoned claim to be released", || {
        let db = &db;
        async move {
            let row = db
                .query_opt(
                    "SELECT 1 FROM idempotency_keys WHERE key = 'key-gone' AND locked_until <= now()
                     AND response_status IS NULL",
                    &[],
                )
                .await
                .ok()?;
            row.map(|_| ())
        }
    })
    .await;
    stack.tansu.thaw()?;
    released?;
    let retry = post(&http, &url, &token, "key-gone", &order("idem-gone")).await?;
    assert_eq!((retry.status, retry.replayed), (202, false), "{}", retry.body);
    eventually(Duration::from_secs(30), "both orders to be stored", || async {
        orders_of(&stack, "idem-gone").await.ok().filter(|n| *n == 2)
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(orders_of(&stack, "idem-gone").await?, 2, "the republished command changed nothing");
    Ok(())
}
