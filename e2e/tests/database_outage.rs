//! PostgreSQL down or slow: the workers keep running, say so on `/readyz` (and stay alive on `/healthz`), keep
//! the backlog in Kafka, retry, and apply every order exactly once when the database is back.

use std::time::Duration;

use testkit::kafka::Publisher;
use testkit::{Stack, StackOptions, eventually, metric};

async fn get(url: String) -> Option<(u16, String)> {
    let r = reqwest::get(url).await.ok()?;
    let status = r.status().as_u16();
    Some((status, r.text().await.ok()?))
}

async fn order_count(stack: &Stack) -> anyhow::Result<i64> {
    Ok(stack.postgres.client().await?.query_one("SELECT count(*) FROM orders", &[]).await?.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_for_twenty_seconds_loses_nothing() -> anyhow::Result<()> {
    let mut stack = Stack::start(StackOptions { edge: false, gateway: false, ..StackOptions::default() }).await?;
    let kafka = Publisher::new(&stack.tansu.brokers())?;
    let mut ids = kafka.publish_orders(500, "before").await?;
    eventually(Duration::from_secs(30), "the first 500", || async {
        (order_count(&stack).await.ok()? == 500).then_some(())
    })
    .await?;

    stack.postgres.stop()?;
    let ready = stack.admin_url(stack.ports.workers_admin, "/readyz");
    let health = stack.admin_url(stack.ports.workers_admin, "/healthz");
    let (_, body) = eventually(Duration::from_secs(10), "readiness to fail", || async {
        get(ready.clone()).await.filter(|(s, _)| *s == 503)
    })
    .await?;
    assert!(body.contains("database"), "{body}");
    for chunk in 0..4 {
        ids.extend(kafka.publish_orders(500, &format!("during-{chunk}")).await?);
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(get(health.clone()).await.map(|(s, _)| s), Some(200), "alive while the database is down");
        assert_eq!(get(ready.clone()).await.map(|(s, _)| s), Some(503));
    }
    tokio::time::sleep(Duration::from_secs(4)).await; // 20 s in all
    let workers = stack.workers.as_mut().expect("workers");
    assert!(workers.exited().is_none(), "the workers never crashed");
    let metrics = get(stack.admin_url(stack.ports.workers_admin, "/metrics")).await.map(|(_, t)| t).unwrap_or_default();
    assert!(
        metric(&metrics, "worker_retries_total", &["worker=\"persist\"", "cause=\"database\""]) >= 2.0,
        "{metrics}"
    );

    stack.postgres.start_again()?;
    eventually(Duration::from_secs(30), "readiness to come back", || async {
        get(ready.clone()).await.filter(|(s, _)| *s == 200)
    })
    .await?;
    eventually(Duration::from_secs(60), "all 2500 orders", || async {
        (order_count(&stack).await.ok()? >= 2500).then_some(())
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let db = stack.postgres.client().await?;
    let row = db.query_one("SELECT count(*), count(*) FILTER (WHERE id = ANY($1)) FROM orders", &[&ids]).await?;
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (2500, 2500));
    assert!(stack.workers.as_mut().expect("workers").exited().is_none(), "still running");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_table_builds_a_backlog_that_drains_afterwards() -> anyhow::Result<()> {
    let stack = Stack::start(StackOptions { edge: false, gateway: false, ..StackOptions::default() }).await?;
    let kafka = Publisher::new(&stack.tansu.brokers())?;
    let mut locker = stack.postgres.client().await?;
    let tx = locker.transaction().await?;
    // EXCLUSIVE blocks inserts but not reads: the database is "slow" for writers only.
    tx.batch_execute("LOCK TABLE orders IN EXCLUSIVE MODE").await?;
    let ids = kafka.publish_orders(2000, "slow").await?;

    let url = stack.admin_url(stack.ports.workers_admin, "/metrics");
    let lag = eventually(Duration::from_secs(20), "persist lag to show the backlog", || async {
        let text = get(url.clone()).await?.1;
        let lag: f64 = (0..3)
            .map(|p| metric(&text, "worker_consumer_lag", &["worker=\"persist\"", &format!("partition=\"{p}\"")]))
            .sum();
        (lag > 0.0).then_some(lag)
    })
    .await?;
    assert_eq!(order_count(&stack).await?, 0, "nothing got past the lock (lag {lag})");

    tx.commit().await?;
    eventually(Duration::from_secs(60), "the backlog to drain", || async {
        (order_count(&stack).await.ok()? == 2000).then_some(())
    })
    .await?;
    let db = stack.postgres.client().await?;
    let n: i64 = db.query_one("SELECT count(*) FROM orders WHERE id = ANY($1)", &[&ids]).await?.get(0);
    assert_eq!(n, 2000);
    Ok(())
}
