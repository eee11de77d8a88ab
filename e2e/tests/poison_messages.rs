//! A message the workers cannot decode goes to the dead-letter topic with why and where it came from, and the
//! job goes on with the next message instead of crashing or stalling.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use testkit::{Stack, StackOptions, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_command_is_dead_lettered_and_the_job_goes_on() -> anyhow::Result<()> {
    let stack = Stack::start(StackOptions { edge: false, gateway: false, ..StackOptions::default() }).await?;
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", stack.tansu.brokers()).create()?;
    let send = |key: &'static str, payload: Vec<u8>, version: &'static str| {
        let producer = producer.clone();
        async move {
            let headers = OwnedHeaders::new()
                .insert(Header { key: "event-type", value: Some("order.create") })
                .insert(Header { key: "schema-version", value: Some(version) });
            producer
                .send(
                    FutureRecord::to("orders.commands").key(key).payload(&payload).headers(headers),
                    Duration::from_secs(10),
                )
                .await
                .map_err(|(e, _)| e)
        }
    };
    send("poison-1", b"{not json".to_vec(), "1").await?;
    send("poison-2", b"{}".to_vec(), "99").await?;
    let good = order_contract::OrderCommand::new(order_contract::OrderRequest {
        customer_id: "after-poison".into(),
        currency: "EUR".into(),
        items: vec![order_contract::OrderItem { sku: "X".into(), qty: 1, unit_price_cents: 5 }],
    });
    // Same partition key as the first poison message, so it is queued behind it.
    send("poison-1", serde_json::to_vec(&good)?, "1").await?;

    let db = stack.postgres.client().await?;
    eventually(Duration::from_secs(15), "the good order after the poison", || {
        let db = &db;
        async move {
            let n: i64 = db.query_one("SELECT count(*) FROM orders", &[]).await.ok()?.get(0);
            (n == 1).then_some(())
        }
    })
    .await?;

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", stack.tansu.brokers())
        .set("group.id", "dlq-reader")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "10")
        .create()?;
    consumer.subscribe(&["orders.dlq"])?;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let msg = tokio::time::timeout(Duration::from_secs(20), consumer.recv()).await??;
        let header = |k: &str| {
            msg.headers()
                .and_then(|h| h.iter().find(|h| h.key == k))
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        assert_eq!(header("dlq-origin-topic").as_deref(), Some("orders.commands"));
        assert_eq!(header("dlq-job").as_deref(), Some("persist"));
        assert!(header("dlq-origin-offset").is_some());
        seen.push((
            String::from_utf8_lossy(msg.key().unwrap_or_default()).into_owned(),
            header("dlq-error").unwrap_or_default(),
        ));
    }
    seen.sort();
    assert_eq!(seen[0].0, "poison-1");
    assert!(seen[0].1.contains("malformed payload"), "{seen:?}");
    assert_eq!(seen[1].0, "poison-2");
    assert!(seen[1].1.contains("schema version"), "{seen:?}");
    Ok(())
}
