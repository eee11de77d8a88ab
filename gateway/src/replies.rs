//! The replies side of `POST /v1/orders`: every gateway replica reads all of `orders.replies` (no consumer group,
//! every partition assigned, from the end at start) and hands each reply to the request that waits on its
//! `correlation-id`, if that request is in this replica. Replies for other replicas, and late replies for
//! requests that timed out, are dropped. A waiting request never outlives its timeout, whatever happens to its
//! reply.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use order_contract::{OrderValidated, decode_validated, headers};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use service_core::admin::Readiness;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::config::KafkaConfig;

type Pending = Mutex<HashMap<String, oneshot::Sender<OrderValidated>>>;

/// The requests of this replica that wait for a reply, by correlation id.
pub struct Replies {
    pending: Pending,
    pub topic: String,
}

/// A registered wait; dropping it (answered or timed out) forgets the correlation id.
pub struct Waiter {
    replies: Arc<Replies>,
    id: String,
    rx: oneshot::Receiver<OrderValidated>,
}

impl Waiter {
    /// The reply, or `None` after `timeout`.
    pub async fn wait(mut self, timeout: Duration) -> Option<OrderValidated> {
        tokio::time::timeout(timeout, &mut self.rx).await.ok()?.ok()
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if let Ok(mut p) = self.replies.pending.lock() {
            p.remove(&self.id);
        }
    }
}

impl Replies {
    /// Starts reading the replies topic; readiness `replies` turns true once every partition is assigned.
    pub fn start(kafka: &KafkaConfig, readiness: Readiness, stop: CancellationToken) -> Result<Arc<Self>, KafkaError> {
        let consumer: StreamConsumer = kafka
            .client()
            .set("client.id", format!("{}-replies", kafka.client_id))
            // Required by librdkafka; no group is joined (partitions are assigned, offsets never committed).
            .set("group.id", format!("{}-replies-{}", kafka.client_id, uuid::Uuid::now_v7()))
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", kafka.reply_fetch_wait_ms.to_string())
            .create()?;
        let replies = Arc::new(Self { pending: Mutex::new(HashMap::new()), topic: kafka.replies_topic.clone() });
        tokio::spawn(Arc::clone(&replies).listen(consumer, readiness, stop));
        Ok(replies)
    }

    /// Registers a wait for `correlation_id`; call before publishing the command.
    pub fn register(self: &Arc<Self>, correlation_id: &str) -> Waiter {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut p) = self.pending.lock() {
            p.insert(correlation_id.to_owned(), tx);
        }
        Waiter { replies: Arc::clone(self), id: correlation_id.to_owned(), rx }
    }

    async fn listen(self: Arc<Self>, consumer: StreamConsumer, readiness: Readiness, stop: CancellationToken) {
        // Assign every partition at its current end, retrying until the broker answers.
        loop {
            match tokio::task::block_in_place(|| assign_at_end(&consumer, &self.topic)) {
                Ok(n) => {
                    tracing::info!(topic = %self.topic, partitions = n, "listening for replies");
                    readiness.set("replies", true);
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, topic = %self.topic, "cannot assign the replies topic yet");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
        loop {
            let msg = tokio::select! {
                _ = stop.cancelled() => return,
                m = consumer.recv() => m,
            };
            let msg = match msg {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "reading replies failed");
                    continue;
                }
            };
            let header = |key: &str| {
                msg.headers()?.iter().filter(|h| h.key == key).last()?.value.and_then(|v| std::str::from_utf8(v).ok())
            };
            let Some(id) = header(headers::CORRELATION_ID) else { continue };
            let waiting = self.pending.lock().ok().and_then(|mut p| p.remove(id));
            let Some(tx) = waiting else { continue }; // another replica's, or too late
            match decode_validated(
                header(headers::EVENT_TYPE),
                header(headers::SCHEMA_VERSION),
                msg.payload().unwrap_or_default(),
            ) {
                Ok(reply) => {
                    let _ = tx.send(reply); // the request may have given up meanwhile
                }
                Err(e) => tracing::warn!(error = %e, correlation_id = id, "undecodable reply dropped"),
            }
        }
    }
}

fn assign_at_end(consumer: &StreamConsumer, topic: &str) -> Result<usize, KafkaError> {
    let timeout = Duration::from_secs(5);
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(KafkaError::MetadataFetch(rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition));
    }
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        // The explicit end offset (not `Offset::End`, resolved later): a reply published after this point is
        // never missed, even if it arrives before the first fetch.
        let (_, high) = consumer.fetch_watermarks(topic, *p, timeout)?;
        tpl.add_partition_offset(topic, *p, Offset::Offset(high))?;
    }
    consumer.assign(&tpl)?;
    Ok(partitions.len())
}
