//! Messages no retry can fix go to the dead-letter topic with why and where they came from and their original
//! headers, and each job goes on with the next message instead of crashing or stalling: undecodable commands
//! (validate), undecodable verdicts and a verdict that breaks a database constraint (persist).

use std::time::Duration;

use order_contract::{OrderCommand, OrderValidated, Verdict, headers, topics};
use testkit::kafka::{Publisher, header, read_topic, valid_order};
use testkit::{Stack, StackOptions, eventually};
use time::OffsetDateTime;

const CMD: &[(&str, &str)] = &[(headers::EVENT_TYPE, order_contract::ORDER_CREATE), ("x-origin", "poison-test")];
const VALIDATED: &[(&str, &str)] = &[
    (headers::EVENT_TYPE, order_contract::ORDER_VALIDATED),
    (headers::SCHEMA_VERSION, "1"),
    ("x-origin", "poison-test"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_and_the_jobs_go_on() -> anyhow::Result<()> {
    let stack = Stack::start(StackOptions { edge: false, gateway: false, ..StackOptions::default() }).await?;
    let kafka = Publisher::new(&stack.tansu.brokers())?;
    let db = stack.postgres.client().await?;
    let count = || {
        let db = &db;
        async move { db.query_one("SELECT count(*) FROM orders", &[]).await.ok().map(|r| r.get::<_, i64>(0)) }
    };

    // validate: bad JSON and an unknown schema version, then a good command queued behind them (same key).
    let v1 = [CMD, &[(headers::SCHEMA_VERSION, "1")]].concat();
    let v99 = [CMD, &[(headers::SCHEMA_VERSION, "99")]].concat();
    kafka.send_raw(topics::COMMANDS, "k-1", b"{not json", &v1).await?;
    kafka.send_raw(topics::COMMANDS, "k-2", b"{}", &v99).await?;
    let good = OrderCommand::new(valid_order("after-poison", 1));
    kafka.send_raw(topics::COMMANDS, "k-1", &serde_json::to_vec(&good)?, &v1).await?;
    eventually(Duration::from_secs(20), "the good order behind the poison", || async {
        (count().await? == 1).then_some(())
    })
    .await?;

    // persist: an undecodable verdict, and a verdict for an order id that exists already under another event
    // id (a unique-key violation no retry can fix), then a good verdict behind them on the same key.
    kafka.send_raw(topics::VALIDATED, "k-3", b"[]", VALIDATED).await?;
    let mut clash =
        OrderValidated::new(OrderCommand::new(valid_order("clash", 2)), Verdict::Accepted, OffsetDateTime::now_utc());
    clash.order_id = good.order_id;
    kafka.send_raw(topics::VALIDATED, "k-3", &serde_json::to_vec(&clash)?, VALIDATED).await?;
    let after = OrderValidated::new(
        OrderCommand::new(valid_order("after-clash", 3)),
        Verdict::Accepted,
        OffsetDateTime::now_utc(),
    );
    kafka.send_raw(topics::VALIDATED, "k-3", &serde_json::to_vec(&after)?, VALIDATED).await?;
    eventually(Duration::from_secs(20), "the good verdict behind the poison", || async {
        (count().await? == 2).then_some(())
    })
    .await?;
    let customer: String =
        db.query_one("SELECT customer_id FROM orders WHERE id = $1", &[&good.order_id]).await?.get(0);
    assert_eq!(customer, "after-poison", "the clashing verdict changed nothing");

    let dead = read_topic(&stack.tansu.brokers(), topics::DLQ, 4, Duration::from_secs(20)).await?;
    let mut seen: Vec<(String, String, String, String)> = dead
        .iter()
        .map(|m| {
            assert_eq!(header(m, "x-origin").as_deref(), Some("poison-test"), "original headers are kept");
            assert!(header(m, "dlq-origin-offset").is_some_and(|o| o.parse::<i64>().is_ok()));
            assert!(header(m, "dlq-origin-partition").is_some());
            (
                header(m, "dlq-job").unwrap_or_default(),
                header(m, "dlq-origin-topic").unwrap_or_default(),
                String::from_utf8_lossy(rdkafka::Message::key(m).unwrap_or_default()).into_owned(),
                header(m, "dlq-error").unwrap_or_default(),
            )
        })
        .collect();
    seen.sort();
    let jobs: Vec<(&str, &str, &str)> = seen.iter().map(|(j, t, k, _)| (j.as_str(), t.as_str(), k.as_str())).collect();
    assert_eq!(
        jobs,
        [
            ("persist", topics::VALIDATED, "k-3"),
            ("persist", topics::VALIDATED, "k-3"),
            ("validate", topics::COMMANDS, "k-1"),
            ("validate", topics::COMMANDS, "k-2"),
        ],
        "{seen:?}"
    );
    let errors: Vec<&str> = seen.iter().map(|s| s.3.as_str()).collect();
    assert!(errors.iter().any(|e| e.contains("malformed payload")), "{errors:?}");
    assert!(errors.iter().any(|e| e.contains("schema version")), "{errors:?}");
    assert!(errors.iter().any(|e| e.contains("orders_pkey")), "the constraint is named: {errors:?}");
    Ok(())
}
