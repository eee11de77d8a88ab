//! The broker stops answering under async load: the gateway stops accepting orders within one delivery timeout,
//! answers `503` + `Retry-After` at once from then on instead of letting clients time out, reports `kafka` not
//! ready, and takes orders again when the broker is back. Every order it acknowledged (`202`) is in the log.
//! Then the broker goes away for good (connection refused): `503` within a second.
//!
//! The outage is a frozen broker (SIGSTOP/SIGCONT: open connections, no answers, like a partition or a stalled
//! host), not a restart: Tansu 0.6's durable store does not survive a stop with an idempotent producer in flight
//! (it panics on restart, `lite.rs:503 more or less than one row`), and its memory store loses the log.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use testkit::{Stack, StackOptions, eventually};

#[derive(Debug)]
struct Outcome {
    started: Instant,
    took: Duration,
    status: u16,
    retry_after: bool,
    id: Option<String>,
}

const DELIVERY_TIMEOUT_MS: u64 = 3000;

/// Four clients in a loop, each request a new order, 20 ms apart, until `stop`.
fn spawn_clients(
    url: &str,
    token: &str,
    stop: &Arc<AtomicBool>,
    tag: &'static str,
) -> Vec<tokio::task::JoinHandle<anyhow::Result<Vec<Outcome>>>> {
    (0..4)
        .map(|c| {
            let (url, token, stop) = (url.to_owned(), token.to_owned(), stop.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
                let mut out = Vec::new();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let body = json!({"customer_id": format!("{tag}-{c}-{i}"), "currency": "EUR",
                                      "items": [{"sku": "S", "qty": 1, "unit_price_cents": 100}]});
                    let started = Instant::now();
                    let r = http.post(&url).bearer_auth(&token).json(&body).send().await?;
                    let (status, retry_after) = (r.status().as_u16(), r.headers().contains_key("retry-after"));
                    let v: serde_json::Value = r.json().await?;
                    let id = v["id"].as_str().map(str::to_owned);
                    out.push(Outcome { started, took: started.elapsed(), status, retry_after, id });
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                anyhow::Ok(out)
            })
        })
        .collect()
}

async fn collect(clients: Vec<tokio::task::JoinHandle<anyhow::Result<Vec<Outcome>>>>) -> anyhow::Result<Vec<Outcome>> {
    let mut outcomes = Vec::new();
    for c in clients {
        outcomes.extend(c.await??);
    }
    Ok(outcomes)
}

/// Waits until `/readyz` names the `kafka` check; returns when that was seen.
async fn wait_kafka_unready(http: &reqwest::Client, readyz: &str) -> anyhow::Result<Instant> {
    eventually(Duration::from_secs(20), "the gateway to report kafka not ready", || async {
        let text = http.get(readyz).send().await.ok()?.text().await.ok()?;
        text.contains("kafka").then(Instant::now)
    })
    .await
}

fn check_answers(outcomes: &[Outcome]) {
    for o in outcomes {
        assert!(matches!(o.status, 202 | 503), "unexpected {o:?}");
        assert!(o.status != 503 || o.retry_after, "503 without Retry-After: {o:?}");
        assert!(o.took < Duration::from_millis(DELIVERY_TIMEOUT_MS + 1500), "a request hung: {o:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unresponsive_broker_gives_fast_503s_and_loses_nothing_acknowledged() -> anyhow::Result<()> {
    let mut stack = Stack::start(StackOptions {
        edge: false,
        // Tansu 0.6's group coordinator does not reassign partitions after the members' sessions timed out
        // while it was frozen, so the jobs would not resume; this test is about the gateway.
        workers: false,
        env: vec![("gateway", "GATEWAY_KAFKA__DELIVERY_TIMEOUT_MS".into(), DELIVERY_TIMEOUT_MS.to_string())],
        ..StackOptions::default()
    })
    .await?;
    let url = format!("http://127.0.0.1:{}/v1/orders/async", stack.ports.gateway);
    let readyz = stack.admin_url(stack.ports.gateway_admin, "/readyz");
    let token = stack.token();
    let http = reqwest::Client::new();

    // 1. Frozen broker for 10 s, then back.
    let stop = Arc::new(AtomicBool::new(false));
    let clients = spawn_clients(&url, &token, &stop, "frozen");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let frozen_at = Instant::now();
    stack.tansu.freeze()?;
    let unready_at = wait_kafka_unready(&http, &readyz).await?;
    tokio::time::sleep((frozen_at + Duration::from_secs(10)).saturating_duration_since(Instant::now())).await;
    let thawed_at = Instant::now();
    stack.tansu.thaw()?;
    testkit::wait_admin_ready("gateway", stack.ports.gateway_admin).await?;
    let ready_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let outcomes = collect(clients).await?;

    let during: Vec<&Outcome> = outcomes.iter().filter(|o| o.started >= unready_at && o.started < thawed_at).collect();
    let acknowledged: BTreeSet<String> =
        outcomes.iter().filter(|o| o.status == 202).filter_map(|o| o.id.clone()).collect();
    let after = outcomes.iter().filter(|o| o.started > ready_at && o.status == 202).count();
    println!(
        "frozen: {} requests, {} acknowledged; unready {:?} after the freeze; {} during the outage; ready {:?} after the thaw; {after} accepted after",
        outcomes.len(),
        acknowledged.len(),
        unready_at - frozen_at,
        during.len(),
        ready_at - thawed_at,
    );
    check_answers(&outcomes);
    assert!(
        unready_at - frozen_at < Duration::from_millis(DELIVERY_TIMEOUT_MS + 2000),
        "noticed within a delivery timeout"
    );
    assert!(during.len() >= 20, "the clients kept sending during the outage: {}", during.len());
    for o in &during {
        assert_eq!(o.status, 503, "{o:?}");
        assert!(o.took < Duration::from_millis(500), "a 503 during the outage was slow: {o:?}");
    }
    assert!(after > 0, "orders are accepted again after the broker is back");

    // Every acknowledged order is in the log (a 503 after a delivery timeout may be there too: the answer says
    // so, and a retry with an Idempotency-Key would not duplicate it).
    let logged: BTreeSet<String> = testkit::kafka::read_all(&stack.tansu.brokers(), order_contract::topics::COMMANDS)
        .await?
        .iter()
        .filter_map(|m| serde_json::from_slice::<order_contract::OrderCommand>(rdkafka_payload(m)).ok())
        .map(|c| c.order_id.to_string())
        .collect();
    let missing: Vec<&String> = acknowledged.difference(&logged).collect();
    assert!(missing.is_empty(), "{} of {} acknowledged orders are not in the log", missing.len(), acknowledged.len());

    // 2. The broker is gone (connection refused): librdkafka reports all brokers down, 503 within a second.
    let stop = Arc::new(AtomicBool::new(false));
    let clients = spawn_clients(&url, &token, &stop, "gone");
    tokio::time::sleep(Duration::from_secs(1)).await;
    stack.tansu.stop()?;
    let gone_at = Instant::now();
    let unready_at = wait_kafka_unready(&http, &readyz).await?;
    // Long enough for a request caught in flight by the stop to be answered (within the delivery timeout + 1 s)
    // and its client to send more: with a 2 s wait, four clients all caught in flight sent nothing late.
    tokio::time::sleep(Duration::from_millis(DELIVERY_TIMEOUT_MS + 2000)).await;
    stop.store(true, Ordering::Relaxed);
    let outcomes = collect(clients).await?;
    println!("gone: unready {:?} after the broker exited", unready_at.saturating_duration_since(gone_at));
    check_answers(&outcomes);
    assert!(unready_at.saturating_duration_since(gone_at) < Duration::from_secs(2));
    let late: Vec<&Outcome> = outcomes.iter().filter(|o| o.started > unready_at).collect();
    assert!(late.len() >= 10);
    assert!(late.iter().all(|o| o.status == 503 && o.took < Duration::from_millis(500)), "{late:?}");
    Ok(())
}

fn rdkafka_payload(m: &rdkafka::message::OwnedMessage) -> &[u8] {
    use rdkafka::Message as _;
    m.payload().unwrap_or_default()
}
