//! Nothing lost, nothing applied twice: the persist job killed with SIGKILL mid-stream, the workers stopped while
//! commands pile up, and two persist instances sharing the partitions through rebalances.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use testkit::kafka::Publisher;
use testkit::{Service, Stack, StackOptions, eventually, free_port, metric};

/// Waits until the database holds exactly `ids` (all of them, nothing else, once each) and checks that the
/// side tables agree: one inbox row per order, two history rows and two lines per order.
async fn assert_exactly(stack: &Stack, ids: &[uuid::Uuid], timeout: Duration) -> anyhow::Result<()> {
    let db = stack.postgres.client().await?;
    let n = ids.len() as i64;
    let reached = eventually(timeout, &format!("{n} orders"), || {
        let db = &db;
        async move {
            let c: i64 = db.query_one("SELECT count(*) FROM orders", &[]).await.ok()?.get(0);
            (c >= n).then_some(())
        }
    })
    .await;
    if let Err(e) = reached {
        let c: i64 = db.query_one("SELECT count(*) FROM orders", &[]).await?.get(0);
        anyhow::bail!("{e}: {c} stored");
    }
    // A redelivery after the last commit would show up now, if the inbox failed.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = stack.postgres.stored(ids).await?;
    assert_eq!(
        [s.orders, s.of_ids, s.inbox, s.history, s.items],
        [n, n, n, 2 * n, 2 * n],
        "orders, of ours, inbox rows, history rows, lines"
    );
    Ok(())
}

fn jitter_ms(max: u64) -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| u64::from(d.subsec_nanos()) % max).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_orders_survive_three_sigkills_of_persist() -> anyhow::Result<()> {
    let stack =
        Stack::start(StackOptions { edge: false, gateway: false, workers: false, ..StackOptions::default() }).await?;
    let _validate = stack.spawn_worker("validate", &["validate"], free_port())?;
    let mut persist = stack.spawn_worker("persist", &["persist"], free_port())?;
    let kafka = Publisher::new(&stack.tansu.brokers())?;
    let db = stack.postgres.client().await?;

    let mut ids = Vec::new();
    for chunk in 0..10 {
        ids.extend(kafka.publish_orders(1000, &format!("kill-{chunk}")).await?);
        if chunk % 3 == 1 {
            // At a moment that varies from run to run, while batches are in flight.
            tokio::time::sleep(Duration::from_millis(200 + jitter_ms(1500))).await;
            let before: i64 = db.query_one("SELECT count(*) FROM orders", &[]).await?.get(0);
            persist.stop_with(libc::SIGKILL, Duration::from_secs(5))?;
            eprintln!("persist killed after chunk {chunk} with {before} orders stored");
            persist.start()?;
        }
    }
    assert_exactly(&stack, &ids, Duration::from_secs(180)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_published_while_the_workers_are_down_are_processed_after_start() -> anyhow::Result<()> {
    let mut stack = Stack::start(StackOptions { edge: false, gateway: false, ..StackOptions::default() }).await?;
    let kafka = Publisher::new(&stack.tansu.brokers())?;
    let warm = kafka.publish_orders(1, "warm-up").await?;
    assert_exactly(&stack, &warm, Duration::from_secs(20)).await?;

    let status = stack.workers.as_mut().map(Service::terminate).transpose()?;
    assert!(status.is_some_and(|s| s.success()), "workers exit 0 on SIGTERM: {status:?}");
    let mut ids = warm;
    ids.extend(kafka.publish_orders(5000, "while-down").await?);
    let db = stack.postgres.client().await?;
    let n: i64 = db.query_one("SELECT count(*) FROM orders", &[]).await?.get(0);
    assert_eq!(n, 1, "nothing is processed while the workers are down");

    stack.start_workers().await?;
    assert_exactly(&stack, &ids, Duration::from_secs(120)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_persist_instances_share_partitions_through_rebalances() -> anyhow::Result<()> {
    let stack =
        Stack::start(StackOptions { edge: false, gateway: false, workers: false, ..StackOptions::default() }).await?;
    let _validate = stack.spawn_worker("validate", &["validate"], free_port())?;
    let a_admin = free_port();
    let mut a = stack.spawn_worker("persist-a", &["persist"], a_admin)?;
    let b_admin = free_port();
    let kafka = Publisher::new(&stack.tansu.brokers())?;
    let http = reqwest::Client::new();
    let applied = |port: u16| {
        let (http, url) = (&http, stack.admin_url(port, "/metrics"));
        async move {
            let text = http.get(url).send().await.ok()?.text().await.ok()?;
            Some(metric(&text, "worker_messages_processed_total", &["worker=\"persist\"", "outcome=\"applied\""]))
        }
    };

    let mut ids = kafka.publish_orders(1000, "one-member").await?;
    let _b = stack.spawn_worker("persist-b", &["persist"], b_admin)?; // joins: a rebalance under load
    for chunk in 0..3 {
        ids.extend(kafka.publish_orders(1000, &format!("two-members-{chunk}")).await?);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Both members got partitions and applied part of the stream.
    eventually(Duration::from_secs(60), "persist-b to apply orders", || async {
        (applied(b_admin).await? > 0.0).then_some(())
    })
    .await?;
    let by_a = applied(a_admin).await.unwrap_or(0.0);
    assert!(by_a > 0.0, "persist-a applied orders too");
    // One member leaves (SIGTERM: it commits and leaves the group): another rebalance, under load.
    let publishing = {
        let kafka = kafka.clone();
        tokio::spawn(async move { kafka.publish_orders(2000, "after-leave").await })
    };
    assert!(a.terminate()?.success(), "persist-a exits 0 on SIGTERM");
    ids.extend(publishing.await??);
    assert_exactly(&stack, &ids, Duration::from_secs(120)).await
}

/// The broker freezes while `validate` has verdicts in flight, longer than its delivery timeout: the deliveries
/// fail, librdkafka bumps the idempotent producer's epoch, and Tansu 0.6 then refuses that producer (fenced) for
/// good (seen in every run here; without the job's producer renewal, 2,332 of 3,000 orders were stored after
/// 90 s). Every order still gets its verdict and is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_frozen_past_the_delivery_timeout_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    let stack = Stack::start(StackOptions {
        edge: false,
        gateway: false,
        env: vec![("workers", "WORKERS_KAFKA__PROPERTIES__MESSAGE_TIMEOUT_MS".into(), "1500".into())],
        ..StackOptions::default()
    })
    .await?;
    let kafka = Publisher::new(&stack.tansu.brokers())?;
    let ids = kafka.publish_orders(6_000, "freeze").await?;
    // Freeze once verdicts flow, with the rest of the commands still to validate.
    let db = stack.postgres.client().await?;
    eventually(Duration::from_secs(30), "first orders stored", || {
        let db = &db;
        async move {
            let c: i64 = db.query_one("SELECT count(*) FROM orders", &[]).await.ok()?.get(0);
            (c > 0).then_some(())
        }
    })
    .await?;
    stack.tansu.freeze()?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    stack.tansu.thaw()?;
    assert_exactly(&stack, &ids, Duration::from_secs(90)).await?;
    let log = stack.workers.as_ref().map(Service::log_text).unwrap_or_default();
    eprintln!(
        "verdict deliveries failed: {}, producers replaced: {}",
        log.matches("publishing a verdict failed").count(),
        log.matches("producer is unusable; replaced it").count()
    );
    assert!(log.contains("publishing a verdict failed"), "the freeze made deliveries fail");
    Ok(())
}
