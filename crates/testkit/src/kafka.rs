//! Talking to the test broker directly: publishing order commands (as the gateway would) or raw messages
//! (poison), and reading a topic back.

use std::time::Duration;

use order_contract::{OrderCommand, OrderItem, OrderRequest, headers};
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};

/// A producer with the gateway's settings (idempotent, `acks=all`).
#[derive(Clone)]
pub struct Publisher {
    producer: FutureProducer,
}

impl Publisher {
    pub fn new(brokers: &str) -> anyhow::Result<Self> {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set(crate::tansu::ONE_RECORD_PER_BATCH.0, crate::tansu::ONE_RECORD_PER_BATCH.1)
            .create()?;
        Ok(Self { producer })
    }

    /// Sends one message and waits for the broker's acknowledgement.
    pub async fn send_raw(&self, topic: &str, key: &str, payload: &[u8], hdrs: &[(&str, &str)]) -> anyhow::Result<()> {
        let mut h = OwnedHeaders::new();
        for (k, v) in hdrs {
            h = h.insert(Header { key: k, value: Some(*v) });
        }
        let record = FutureRecord::to(topic).key(key).payload(payload).headers(h);
        self.producer.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| e)?;
        Ok(())
    }

    /// Publishes `command` to `orders.commands` as the gateway does (extra headers appended).
    pub async fn send_command(&self, command: &OrderCommand, extra: &[(&str, &str)]) -> anyhow::Result<()> {
        let mut hdrs = vec![(headers::EVENT_TYPE, order_contract::ORDER_CREATE), (headers::SCHEMA_VERSION, "1")];
        hdrs.extend_from_slice(extra);
        let payload = serde_json::to_vec(command)?;
        self.send_raw(order_contract::topics::COMMANDS, &command.order_id.to_string(), &payload, &hdrs).await
    }

    /// Publishes `n` valid commands concurrently (all acknowledged on return); their order ids, in order.
    pub async fn publish_orders(&self, n: usize, customer: &str) -> anyhow::Result<Vec<uuid::Uuid>> {
        let commands: Vec<OrderCommand> = (0..n).map(|i| OrderCommand::new(valid_order(customer, i))).collect();
        let mut inflight = Vec::with_capacity(n);
        for c in &commands {
            let payload = serde_json::to_vec(c)?;
            let h = OwnedHeaders::new()
                .insert(Header { key: headers::EVENT_TYPE, value: Some(order_contract::ORDER_CREATE) })
                .insert(Header { key: headers::SCHEMA_VERSION, value: Some("1") });
            let key = c.order_id.to_string();
            let record = FutureRecord::to(order_contract::topics::COMMANDS).key(&key).payload(&payload).headers(h);
            match self.producer.send_result(record) {
                Ok(d) => inflight.push(d),
                Err((e, _)) => anyhow::bail!("enqueueing command: {e}"),
            }
        }
        for d in inflight {
            d.await?.map_err(|(e, _)| e)?;
        }
        Ok(commands.into_iter().map(|c| c.order_id).collect())
    }
}

/// A valid order (two lines) for `customer`, varied by `i`.
pub fn valid_order(customer: &str, i: usize) -> OrderRequest {
    OrderRequest {
        customer_id: customer.to_owned(),
        currency: "EUR".into(),
        items: vec![
            OrderItem {
                sku: format!("SKU-{}", i % 97),
                qty: 1 + (i % 5) as i32,
                unit_price_cents: 100 + (i % 1000) as i64,
            },
            OrderItem { sku: "SKU-FIXED".into(), qty: 1, unit_price_cents: 250 },
        ],
    }
}

/// Reads `topic` from the beginning (a fresh group) until `n` messages arrived or `timeout` passed.
pub async fn read_topic(brokers: &str, topic: &str, n: usize, timeout: Duration) -> anyhow::Result<Vec<OwnedMessage>> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("test-reader-{}", uuid::Uuid::now_v7()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()?;
    consumer.subscribe(&[topic])?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < n {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(m) => out.push(m?.detach()),
            Err(_) => anyhow::bail!("read {} of {n} messages from {topic} within {timeout:?}", out.len()),
        }
    }
    Ok(out)
}

/// The value of header `key` of `msg`, as text.
pub fn header(msg: &OwnedMessage, key: &str) -> Option<String> {
    use rdkafka::message::{Headers, Message};
    msg.headers()?.iter().find(|h| h.key == key)?.value.map(|v| String::from_utf8_lossy(v).into_owned())
}

/// How many messages `topic` holds in all its partitions (the sum of the high watermarks; topics are never
/// compacted or trimmed in tests).
pub async fn topic_end(brokers: &str, topic: &str) -> anyhow::Result<i64> {
    let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer: rdkafka::consumer::BaseConsumer =
            ClientConfig::new().set("bootstrap.servers", &brokers).create()?;
        let timeout = Duration::from_secs(10);
        let metadata = consumer.fetch_metadata(Some(&topic), timeout)?;
        let mut total = 0;
        for t in metadata.topics() {
            for p in t.partitions() {
                total += consumer.fetch_watermarks(&topic, p.id(), timeout)?.1;
            }
        }
        Ok(total)
    })
    .await?
}

/// Every message of `topic` up to its current end, read by assigning all partitions (no consumer group, so a
/// broker whose group coordinator misbehaves can still be checked).
pub async fn read_all(brokers: &str, topic: &str) -> anyhow::Result<Vec<OwnedMessage>> {
    let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        use rdkafka::Message as _;
        let consumer: rdkafka::consumer::BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", "unused-assign-only")
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "10")
            .create()?;
        let timeout = Duration::from_secs(10);
        let metadata = consumer.fetch_metadata(Some(&topic), timeout)?;
        let mut tpl = rdkafka::TopicPartitionList::new();
        let mut remaining = std::collections::HashMap::new();
        for p in metadata.topics().iter().flat_map(|t| t.partitions()) {
            let (low, high) = consumer.fetch_watermarks(&topic, p.id(), timeout)?;
            tpl.add_partition_offset(&topic, p.id(), rdkafka::Offset::Beginning)?;
            if high > low {
                remaining.insert(p.id(), high);
            }
        }
        consumer.assign(&tpl)?;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut out = Vec::new();
        while !remaining.is_empty() {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "reading {topic}: partitions {remaining:?} unfinished"
            );
            let Some(m) = consumer.poll(Duration::from_millis(200)) else { continue };
            let m = m?.detach();
            if remaining.get(&m.partition()).is_some_and(|high| m.offset() + 1 >= *high) {
                remaining.remove(&m.partition());
            }
            out.push(m);
        }
        Ok(out)
    })
    .await?
}
