//! Benchmark of the `persist` job: drains a backlog of N verdicts (default 100,000) from `orders.validated` into
//! PostgreSQL, then loads the very same rows into the same (emptied) tables with `COPY`, the physical ceiling,
//! and prints both rates and their ratio.
//!
//! `cargo build --release -p workers && E2E_BIN_DIR=target/release cargo run -p e2e --example persist_drain [N]`
//! (the script `loadtest/persist-drain` does exactly this). Loopback only; stops by itself.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, TryStreamExt};
use order_contract::{OrderCommand, OrderValidated, Verdict, headers, topics};
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use testkit::kafka::valid_order;
use testkit::{Stack, StackOptions, free_port};

/// Tables in load order (foreign keys first) with the columns the job writes.
const TABLES: &[(&str, &str)] = &[
    ("orders", "id, customer_id, currency, total_cents, status, received_at, validated_at"),
    ("order_items", "order_id, line, sku, qty, unit_price_cents"),
    ("order_status_history", "order_id, status, event_id, at, detail"),
    ("processed_events", "consumer, event_id"),
];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args().nth(1).map(|a| a.parse()).transpose()?.unwrap_or(100_000);
    let stack =
        Stack::start(StackOptions { edge: false, gateway: false, workers: false, ..StackOptions::default() }).await?;
    // Publish the backlog straight to orders.validated, as the validate job would.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", stack.tansu.brokers())
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set(testkit::ONE_RECORD_PER_BATCH.0, testkit::ONE_RECORD_PER_BATCH.1)
        .create()?;
    let started = Instant::now();
    let now = time::OffsetDateTime::now_utc();
    let mut inflight = Vec::with_capacity(n);
    for i in 0..n {
        let ev = OrderValidated::new(
            OrderCommand::new(valid_order(&format!("bench-{}", i % 1000), i)),
            Verdict::Accepted,
            now,
        );
        let payload = serde_json::to_vec(&ev)?;
        let key = ev.order_id.to_string();
        let h = OwnedHeaders::new()
            .insert(Header { key: headers::EVENT_TYPE, value: Some(order_contract::ORDER_VALIDATED) })
            .insert(Header { key: headers::SCHEMA_VERSION, value: Some("1") });
        loop {
            match producer
                .send_result(FutureRecord::to(topics::VALIDATED).key(&key).payload(&payload).headers(h.clone()))
            {
                Ok(d) => {
                    inflight.push(d);
                    break;
                }
                Err((
                    rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                    _,
                )) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => anyhow::bail!("enqueue: {e}"),
            }
        }
    }
    for d in inflight {
        d.await?.map_err(|(e, _)| e)?;
    }
    eprintln!("published {n} verdicts in {:.1?}", started.elapsed());

    let db = stack.postgres.client().await?;
    let _persist = stack.spawn_worker("persist", &["persist"], free_port())?;
    // The clock starts when the schema exists (the worker migrates at start) and stops at the last row.
    let started = loop {
        if db.query_opt("SELECT 1 FROM pg_tables WHERE tablename = 'processed_events'", &[]).await?.is_some() {
            break Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let cpu = || {
        [
            testkit::cpu_seconds(_persist.pid()),
            testkit::cpu_seconds(stack.tansu.pid()),
            testkit::tree_cpu_seconds(stack.postgres.pid()),
        ]
    };
    let cpu_before = cpu();
    let deadline = started + Duration::from_secs(1800);
    loop {
        let c: i64 = db.query_one("SELECT count(*) FROM orders", &[]).await?.get(0);
        if c as usize >= n {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "drain did not finish: {c} of {n}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let drain = started.elapsed();
    let cpu_after = cpu();
    drop(_persist);

    // The same rows, out and back in with COPY.
    let mut dumps = Vec::new();
    for (table, cols) in TABLES {
        let out = db.copy_out(&format!("COPY {table} ({cols}) TO STDOUT")).await?;
        let chunks: Vec<Bytes> = out.try_collect().await?;
        dumps.push(chunks);
    }
    db.batch_execute("TRUNCATE orders, order_items, order_status_history, processed_events").await?;
    let started = Instant::now();
    for ((table, cols), chunks) in TABLES.iter().zip(dumps) {
        let sink = db.copy_in::<_, Bytes>(&format!("COPY {table} ({cols}) FROM STDIN")).await?;
        futures_util::pin_mut!(sink);
        for c in chunks {
            sink.feed(c).await?;
        }
        sink.close().await?;
    }
    let copy = started.elapsed();
    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    println!(
        "persist: {n} events (order + 2 lines + 2 history rows + inbox row) drained in {drain:.2?}: {:.0} events/s",
        rate(drain)
    );
    println!("COPY of the same rows into the same tables: {copy:.2?}: {:.0} events/s", rate(copy));
    println!("persist / COPY = {:.2}", rate(drain) / rate(copy));
    let cores = |i: usize| (cpu_after[i] - cpu_before[i]) / drain.as_secs_f64();
    println!(
        "during the drain, cores used: persist {:.2}, Tansu {:.2}, PostgreSQL {:.2}",
        cores(0),
        cores(1),
        cores(2)
    );
    Ok(())
}
