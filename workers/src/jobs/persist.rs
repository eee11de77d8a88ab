//! `persist`: consumes order commands and writes each order, its lines and its first status to PostgreSQL.
//!
//! Delivery is at least once, the effect exactly once: the event id is recorded in `processed_events` in the
//! same transaction as the order, so a redelivered command changes nothing. The consumer's offset is stored only
//! after the transaction committed (`enable.auto.offset.store=false`); librdkafka commits stored offsets
//! periodically and once more, synchronously, at shutdown. While PostgreSQL fails, the same message is retried
//! with capped exponential backoff: nothing is skipped and no offset moves past it.

use std::time::Duration;

use deadpool_postgres::Pool;
use opentelemetry::KeyValue;
use opentelemetry::metrics::Counter;
use order_contract::{OrderCommand, decode_command, headers};
use rdkafka::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use service_core::admin::Readiness;
use tokio_postgres::error::SqlState;
use tokio_util::sync::CancellationToken;

use super::header;
use crate::config::KafkaConfig;
use crate::dlq::DeadLetters;

pub const JOB: &str = "persist";

/// What happened to one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Applied,
    Duplicate,
    DeadLettered,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Duplicate => "duplicate",
            Outcome::DeadLettered => "dead_lettered",
        }
    }
}

/// Why applying a command failed.
#[derive(Debug, thiserror::Error)]
enum ApplyError {
    /// Worth retrying: the database is down, slow, or the connection broke.
    #[error("transient database error: {0}")]
    Transient(String),
    /// No retry can fix it (a constraint or data error): the message goes to the DLQ.
    #[error("permanent error: {0}")]
    Permanent(String),
}

impl From<tokio_postgres::Error> for ApplyError {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.code() {
            Some(code) if is_permanent(code) => ApplyError::Permanent(e.to_string()),
            _ => ApplyError::Transient(e.to_string()),
        }
    }
}

impl From<deadpool_postgres::PoolError> for ApplyError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        ApplyError::Transient(e.to_string())
    }
}

/// SQLSTATE classes 22 (data exception) and 23 (integrity constraint violation) cannot heal by retrying.
fn is_permanent(code: &SqlState) -> bool {
    let c = code.code();
    c.starts_with("22") || c.starts_with("23")
}

pub struct PersistJob {
    pub pool: Pool,
    pub kafka: KafkaConfig,
    pub dead_letters: DeadLetters,
    pub readiness: Readiness,
    pub processed: Counter<u64>,
}

impl PersistJob {
    fn consumer(&self) -> Result<StreamConsumer, KafkaError> {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.kafka.brokers)
            .set("group.id", format!("{}.{JOB}", self.kafka.group_prefix))
            .set("client.id", format!("workers-{JOB}"))
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", self.kafka.fetch_wait_max_ms.to_string())
            .set("session.timeout.ms", "10000")
            .create()?;
        consumer.subscribe(&[&self.kafka.commands_topic])?;
        Ok(consumer)
    }

    /// Runs until `stop`; the message in hand is finished (or left for redelivery) before returning.
    pub async fn run(self, stop: CancellationToken) -> anyhow::Result<()> {
        let consumer = self.consumer()?;
        self.readiness.set("consumer", true);
        tracing::info!(topic = %self.kafka.commands_topic, "persist job consuming");
        loop {
            let msg = tokio::select! {
                _ = stop.cancelled() => break,
                m = consumer.recv() => m,
            };
            let msg = match msg {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "Kafka consume error");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let Some(outcome) = self.handle(&msg, &stop).await else {
                break; // stopped while retrying: the message stays unacknowledged and is redelivered later
            };
            self.processed.add(1, &[KeyValue::new("job", JOB), KeyValue::new("outcome", outcome.label())]);
            if let Err(e) = consumer.store_offset_from_message(&msg) {
                tracing::warn!(error = %e, "storing the offset failed; the message may be redelivered");
            }
        }
        self.readiness.set("consumer", false);
        // Commit what was stored, synchronously, before leaving the group.
        match consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) | Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => {
                tracing::warn!(error = %e, "final offset commit failed; uncommitted messages will be redelivered")
            }
        }
        tracing::info!("persist job stopped");
        Ok(())
    }

    /// Applies one message, retrying transient failures; `None` when stopped before it could be applied.
    async fn handle(&self, msg: &BorrowedMessage<'_>, stop: &CancellationToken) -> Option<Outcome> {
        let command = match decode_command(
            header(msg, headers::EVENT_TYPE),
            header(msg, headers::SCHEMA_VERSION),
            msg.payload().unwrap_or_default(),
        ) {
            Ok(c) => c,
            Err(e) => return self.dead_letter(msg, &format!("undecodable: {e}"), stop).await,
        };
        let mut backoff = Backoff::new();
        loop {
            match apply(&self.pool, &command).await {
                Ok(applied) => {
                    self.readiness.set("database", true);
                    return Some(if applied { Outcome::Applied } else { Outcome::Duplicate });
                }
                Err(ApplyError::Permanent(e)) => return self.dead_letter(msg, &e, stop).await,
                Err(ApplyError::Transient(e)) => {
                    self.readiness.set("database", false);
                    let wait = backoff.next_delay();
                    tracing::warn!(error = %e, order_id = %command.order_id, ?wait, "database unavailable; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return None,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    async fn dead_letter(&self, msg: &BorrowedMessage<'_>, why: &str, stop: &CancellationToken) -> Option<Outcome> {
        tracing::error!(error = why, partition = msg.partition(), offset = msg.offset(), "dead-lettering a message");
        let mut backoff = Backoff::new();
        loop {
            match self.dead_letters.send(JOB, msg, why).await {
                Ok(()) => return Some(Outcome::DeadLettered),
                Err(e) => {
                    tracing::warn!(error = %e, "publishing to the DLQ failed; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return None,
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
            }
        }
    }
}

/// Writes the order in one transaction; `Ok(false)` when this event was applied before.
async fn apply(pool: &Pool, cmd: &OrderCommand) -> Result<bool, ApplyError> {
    let total = cmd.total_cents().ok_or_else(|| ApplyError::Permanent("order total overflows".into()))?;
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let fresh = tx
        .execute(
            "INSERT INTO processed_events (consumer, event_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&JOB, &cmd.event_id],
        )
        .await?;
    if fresh == 0 {
        tx.rollback().await?;
        return Ok(false);
    }
    tx.execute(
        "INSERT INTO orders (id, customer_id, currency, total_cents, status, received_at)
         VALUES ($1, $2, $3, $4, 'received', $5)",
        &[&cmd.order_id, &cmd.order.customer_id, &cmd.order.currency, &total, &cmd.received_at],
    )
    .await?;
    let lines: Vec<i32> = (1..).take(cmd.order.items.len()).collect();
    let skus: Vec<&str> = cmd.order.items.iter().map(|i| i.sku.as_str()).collect();
    let qtys: Vec<i32> = cmd.order.items.iter().map(|i| i.qty).collect();
    let prices: Vec<i64> = cmd.order.items.iter().map(|i| i.unit_price_cents).collect();
    tx.execute(
        "INSERT INTO order_items (order_id, line, sku, qty, unit_price_cents)
         SELECT $1, * FROM unnest($2::int[], $3::text[], $4::int[], $5::bigint[])",
        &[&cmd.order_id, &lines, &skus, &qtys, &prices],
    )
    .await?;
    tx.execute(
        "INSERT INTO order_status_history (order_id, status, event_id) VALUES ($1, 'received', $2)",
        &[&cmd.order_id, &cmd.event_id],
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// Capped exponential backoff with "equal jitter" (half fixed, half random): 100 ms doubling up to 10 s.
struct Backoff {
    attempt: u32,
}

impl Backoff {
    fn new() -> Self {
        Self { attempt: 0 }
    }

    fn next_delay(&mut self) -> Duration {
        let cap_ms = (100u64 << self.attempt.min(7)).min(10_000);
        self.attempt = self.attempt.saturating_add(1);
        // Jitter from the clock's sub-second nanoseconds: cheap, and enough to spread replicas apart.
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        Duration::from_millis(cap_ms / 2 + u64::from(nanos) % (cap_ms / 2 + 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let mut b = Backoff::new();
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100), "{first:?}");
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(d <= Duration::from_secs(10), "{d:?}");
        }
        assert!(b.next_delay() >= Duration::from_secs(5));
    }

    #[test]
    fn constraint_and_data_errors_are_permanent() {
        assert!(is_permanent(&SqlState::UNIQUE_VIOLATION));
        assert!(is_permanent(&SqlState::NUMERIC_VALUE_OUT_OF_RANGE));
        assert!(!is_permanent(&SqlState::CONNECTION_FAILURE));
        assert!(!is_permanent(&SqlState::T_R_SERIALIZATION_FAILURE));
    }
}
