//! The two-stage pipeline: `validate` applies the business rules and publishes every verdict (and a reply when
//! the command asked for one); `persist` stores accepted and rejected orders with their history.

use std::time::Duration;

use order_contract::{OrderCommand, OrderItem, OrderRequest, headers, topics};
use serde_json::Value;
use testkit::kafka::{Publisher, header, read_topic, valid_order};
use testkit::{Stack, StackOptions, eventually, metric};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verdicts_are_stored_and_replies_carry_the_correlation_id() -> anyhow::Result<()> {
    let stack = Stack::start(StackOptions { edge: false, gateway: false, ..StackOptions::default() }).await?;
    let kafka = Publisher::new(&stack.tansu.brokers())?;
    let good = OrderCommand::new(valid_order("cust-1", 1));
    let bad = OrderCommand::new(OrderRequest {
        customer_id: "cust-2".into(),
        currency: "XXX".into(),
        items: vec![OrderItem { sku: "A".into(), qty: 0, unit_price_cents: 10 }],
    });
    let silent = OrderCommand::new(valid_order("cust-3", 3));
    kafka.send_command(&good, &[(headers::REPLY_TO, topics::REPLIES), (headers::CORRELATION_ID, "corr-good")]).await?;
    kafka.send_command(&bad, &[(headers::REPLY_TO, topics::REPLIES), (headers::CORRELATION_ID, "corr-bad")]).await?;
    kafka.send_command(&silent, &[]).await?;

    let db = stack.postgres.client().await?;
    eventually(Duration::from_secs(20), "three orders", || {
        let db = &db;
        async move {
            let n: i64 = db.query_one("SELECT count(*) FROM orders", &[]).await.ok()?.get(0);
            (n == 3).then_some(())
        }
    })
    .await?;
    let status = |id| {
        let db = &db;
        async move { db.query_one("SELECT status FROM orders WHERE id = $1", &[&id]).await.map(|r| r.get::<_, String>(0)) }
    };
    assert_eq!(status(good.order_id).await?, "accepted");
    assert_eq!(status(bad.order_id).await?, "rejected");
    assert_eq!(status(silent.order_id).await?, "accepted");
    let history = db
        .query("SELECT status, detail FROM order_status_history WHERE order_id = $1 ORDER BY at, id", &[&bad.order_id])
        .await?;
    let steps: Vec<String> = history.iter().map(|r| r.get(0)).collect();
    assert_eq!(steps, ["received", "rejected"]);
    let detail: Value = history[1].get(1);
    let rules: Vec<&str> = detail.as_array().into_iter().flatten().filter_map(|f| f["rule"].as_str()).collect();
    assert_eq!(rules, ["known-currency", "positive-quantity"], "{detail}");

    // Only the two commands that asked for a reply got one, each with its correlation id and verdict.
    let replies = read_topic(&stack.tansu.brokers(), topics::REPLIES, 2, Duration::from_secs(20)).await?;
    let mut seen: Vec<(String, String)> = replies
        .iter()
        .map(|m| {
            let body: Value =
                serde_json::from_slice(rdkafka::Message::payload(m).unwrap_or_default()).unwrap_or_default();
            (
                header(m, headers::CORRELATION_ID).unwrap_or_default(),
                body["verdict"]["status"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(seen, [("corr-bad".into(), "rejected".into()), ("corr-good".into(), "accepted".into())]);
    assert!(
        read_topic(&stack.tansu.brokers(), topics::REPLIES, 3, Duration::from_secs(2)).await.is_err(),
        "no reply for the command that did not ask"
    );

    let http = reqwest::Client::new();
    let url = stack.admin_url(stack.ports.workers_admin, "/metrics");
    let text = eventually(Duration::from_secs(10), "the workers' counters", || {
        let (http, url) = (&http, url.clone());
        async move {
            let text = http.get(url).send().await.ok()?.text().await.ok()?;
            (metric(&text, "worker_messages_processed_total", &["worker=\"persist\"", "outcome=\"applied\""]) == 3.0)
                .then_some(text)
        }
    })
    .await?;
    assert_eq!(metric(&text, "worker_messages_processed_total", &["worker=\"validate\"", "outcome=\"rejected\""]), 1.0);
    assert_eq!(metric(&text, "worker_messages_processed_total", &["worker=\"validate\"", "outcome=\"accepted\""]), 2.0);
    assert_eq!(metric(&text, "worker_messages_consumed_total", &["worker=\"persist\""]), 3.0);
    assert!(text.contains("worker_db_duration_seconds_bucket"), "{text}");
    assert!(text.contains("worker_db_pool_connections{"), "{text}");
    Ok(())
}
