//! `persist`: consumes `orders.validated` and writes each order, its lines and its status history (received,
//! then accepted or rejected with the failed rules) to PostgreSQL.
//!
//! Delivery is at least once, the effect exactly once: each event id is recorded in `processed_events` in the
//! same transaction as the rows it produced, so a redelivered event changes nothing. A batch holds consecutive
//! messages; each partition's share of it is one transaction (partitions run concurrently, each on its own
//! connection), with one array per column (`unnest`) rather than a statement per row. Offsets are stored only
//! after every transaction of the batch committed.
//!
//! PostgreSQL down or slow: the batch is retried with capped, jittered backoff; the consumer reads at most four
//! batches ahead (the rest waits in librdkafka's bounded queue and in Kafka) and pauses its partitions once a
//! batch has been stuck for a second, so the backlog waits in Kafka. Nothing is skipped and no offset
//! moves past an unapplied message. A batch that fails on a constraint or data error is split: its events are
//! applied one by one and only the ones that still fail go to the dead-letter topic.

use std::collections::{BTreeMap, HashSet};
use std::time::Instant;

use deadpool_postgres::Pool;
use opentelemetry::KeyValue;
use opentelemetry::global::BoxedTracer;
use order_contract::{OrderValidated, Verdict, decode_validated, headers};
use rdkafka::message::{Message, OwnedMessage};
use service_core::admin::Readiness;
use service_core::db::trace::Scope;
use service_core::telemetry::{self, Context, TraceContextExt as _};
use tokio_postgres::error::SqlState;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{JobMetrics, dead_letter, process_span};
use crate::config::{BatchConfig, KafkaConfig};
use crate::consume::{Backoff, Source, header};
use crate::dlq::DeadLetters;

pub const JOB: &str = "persist";

/// Why applying events failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Worth retrying: the database is down, slow, or the connection broke.
    #[error("transient database error: {0}")]
    Transient(String),
    /// No retry can fix it (a constraint or data error): the message goes to the DLQ.
    #[error("permanent error: {0}")]
    Permanent(String),
}

impl From<tokio_postgres::Error> for ApplyError {
    fn from(e: tokio_postgres::Error) -> Self {
        // `{:#}` is not implemented; the source carries the server's message.
        let text = match std::error::Error::source(&e) {
            Some(src) => format!("{e}: {src}"),
            None => e.to_string(),
        };
        match e.code() {
            Some(code) if is_permanent(code) => ApplyError::Permanent(text),
            _ => ApplyError::Transient(text),
        }
    }
}

impl From<deadpool_postgres::PoolError> for ApplyError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        ApplyError::Transient(e.to_string())
    }
}

/// SQLSTATE classes 22 (data exception) and 23 (integrity constraint violation) cannot heal by retrying;
/// everything else (connection loss, serialization failure 40001, deadlock 40P01, admin shutdown) can.
fn is_permanent(code: &SqlState) -> bool {
    let c = code.code();
    c.starts_with("22") || c.starts_with("23")
}

pub struct PersistJob {
    pub pool: Pool,
    pub kafka: KafkaConfig,
    pub batch: BatchConfig,
    pub dead_letters: DeadLetters,
    pub readiness: Readiness,
    pub metrics: JobMetrics,
    pub tracer: BoxedTracer,
    /// The database name (`db.namespace` of the statements' spans).
    pub db_name: String,
}

/// An event in hand with the span of its processing.
type Event<'a> = (&'a OwnedMessage, OrderValidated, Context);

const STOPPED: &str = "stopped before the event was applied";

/// Ends the process spans of `events`, with `error` when they were not applied.
fn end_spans(events: &[Event<'_>], error: Option<(&str, &dyn std::fmt::Display)>) {
    for (_, _, cx) in events {
        telemetry::end(cx, error);
    }
}

/// Counts from applying events.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub applied: u64,
    pub duplicates: u64,
}

impl PersistJob {
    /// Runs until `stop`; the batch in hand is finished or left for redelivery.
    pub async fn run(self, stop: CancellationToken) -> anyhow::Result<()> {
        let mut source = Source::new(JOB, &self.kafka.validated_topic, &self.kafka, &self.batch)?;
        self.metrics.watch_lag(JOB, source.lag.clone());
        self.metrics.start(JOB, &["applied", "duplicate", "dead_lettered"], &["database"]);
        self.readiness.set("consumer", true);
        tracing::info!(topic = %self.kafka.validated_topic, "persist job consuming");
        let group = source.group.clone();
        while let Some(batch) = source.next_batch(&stop).await {
            self.metrics.batch(JOB, batch.len());
            if !source.while_working(self.process(&batch, &group, &stop)).await {
                break;
            }
            source.done(&batch);
        }
        self.readiness.set("consumer", false);
        source.commit();
        tracing::info!("persist job stopped");
        Ok(())
    }

    /// Applies a batch; `false` when stopped before all of it was applied.
    async fn process(&self, batch: &[OwnedMessage], group: &str, stop: &CancellationToken) -> bool {
        let mut by_partition: BTreeMap<i32, Vec<Event<'_>>> = BTreeMap::new();
        for msg in batch {
            let cx = process_span(&self.tracer, group, msg);
            match decode_validated(
                header(msg, headers::EVENT_TYPE),
                header(msg, headers::SCHEMA_VERSION),
                msg.payload().unwrap_or_default(),
            ) {
                Ok(ev) => by_partition.entry(msg.partition()).or_default().push((msg, ev, cx)),
                Err(e) => {
                    if !dead_letter(&self.dead_letters, JOB, msg, &format!("undecodable: {e}"), &cx, stop).await {
                        return false;
                    }
                    self.metrics.outcome(JOB, "dead_lettered", 1);
                }
            }
        }
        let parts = by_partition.into_values().map(|events| self.apply_partition(events, stop));
        futures_util::future::join_all(parts).await.into_iter().all(|done| done)
    }

    /// One partition's events in one transaction, retried while the failure is transient; split into single
    /// events when it is permanent. `false` when stopped first.
    ///
    /// The transaction's statement spans are children of one event's process span (the first sampled one): a span
    /// has one parent, and with ratio sampling a batch rarely holds two sampled events.
    async fn apply_partition(&self, events: Vec<Event<'_>>, stop: &CancellationToken) -> bool {
        let all: Vec<&OrderValidated> = events.iter().map(|(_, e, _)| e).collect();
        let Some(first) = events.first() else { return true };
        let db_parent =
            events.iter().map(|(_, _, cx)| cx).find(|cx| cx.span().span_context().is_sampled()).unwrap_or(&first.2);
        match self.apply_retrying(&all, db_parent, stop).await {
            Some(Ok(n)) => {
                self.count(n);
                end_spans(&events, None);
                true
            }
            None => {
                end_spans(&events, Some(("stopped", &STOPPED)));
                false
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, events = all.len(), "batch refused; applying its events one by one");
                for (i, (msg, ev, cx)) in events.iter().enumerate() {
                    match self.apply_retrying(&[ev], cx, stop).await {
                        None => {
                            end_spans(&events[i..], Some(("stopped", &STOPPED)));
                            return false;
                        }
                        Some(Ok(n)) => {
                            self.count(n);
                            telemetry::end(cx, None);
                        }
                        Some(Err(e)) => {
                            if !dead_letter(&self.dead_letters, JOB, *msg, &e, cx, stop).await {
                                end_spans(&events[i + 1..], Some(("stopped", &STOPPED)));
                                return false;
                            }
                            self.metrics.outcome(JOB, "dead_lettered", 1);
                        }
                    }
                }
                true
            }
        }
    }

    fn count(&self, n: Applied) {
        self.metrics.outcome(JOB, "applied", n.applied);
        self.metrics.outcome(JOB, "duplicate", n.duplicates);
    }

    /// `Some(Ok)` once applied, `Some(Err(why))` when no retry can help, `None` when stopped while retrying.
    async fn apply_retrying(
        &self,
        events: &[&OrderValidated],
        parent: &Context,
        stop: &CancellationToken,
    ) -> Option<Result<Applied, String>> {
        let mut backoff = Backoff::new();
        let scope = Scope { tracer: &self.tracer, parent, namespace: &self.db_name };
        loop {
            let started = Instant::now();
            let result = apply(&self.pool, events, &scope).await;
            let outcome = if result.is_ok() { "commit" } else { "rollback" };
            self.metrics.db_duration.record(
                started.elapsed().as_secs_f64(),
                &[KeyValue::new("worker", JOB), KeyValue::new("outcome", outcome)],
            );
            match result {
                Ok(n) => {
                    self.readiness.set("database", true);
                    return Some(Ok(n));
                }
                Err(ApplyError::Permanent(e)) => return Some(Err(e)),
                Err(ApplyError::Transient(e)) => {
                    self.readiness.set("database", false);
                    self.metrics.retry(JOB, "database");
                    tracing::warn!(error = %e, events = events.len(), "database unavailable; retrying the batch");
                    if !backoff.wait(stop).await {
                        return None;
                    }
                }
            }
        }
    }
}

const INBOX: &str = "INSERT INTO processed_events (consumer, event_id) SELECT $1, unnest($2::uuid[])
             ON CONFLICT DO NOTHING RETURNING event_id";
const ORDERS: &str = "INSERT INTO orders (id, customer_id, currency, total_cents, status, received_at, validated_at)
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bigint[], $5::text[],
                                  $6::timestamptz[], $7::timestamptz[])";
const ITEMS: &str = "INSERT INTO order_items (order_id, line, sku, qty, unit_price_cents)
             SELECT * FROM unnest($1::uuid[], $2::int[], $3::text[], $4::int[], $5::bigint[])";
const HISTORY: &str = "INSERT INTO order_status_history (order_id, status, event_id, at, detail)
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::timestamptz[], $5::jsonb[])";

/// Writes `events` in one transaction, skipping those applied before (or repeated within `events`). Each
/// statement is a span in `scope`.
pub async fn apply(pool: &Pool, events: &[&OrderValidated], scope: &Scope<'_>) -> Result<Applied, ApplyError> {
    let mut client = pool.get().await?;
    let tx = scope.run("BEGIN", "BEGIN", client.transaction()).await?;
    let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
    let inserted = scope
        .run("INSERT processed_events", INBOX, async {
            let inbox = tx.prepare_cached(INBOX).await?;
            tx.query(&inbox, &[&JOB, &ids]).await
        })
        .await?;
    let mut fresh: HashSet<Uuid> = inserted.iter().map(|r| r.get(0)).collect();
    // `remove` keeps only the first of two copies of one event in the same batch.
    let new: Vec<&OrderValidated> = events.iter().copied().filter(|e| fresh.remove(&e.event_id)).collect();
    let result = Applied { applied: new.len() as u64, duplicates: (events.len() - new.len()) as u64 };
    if new.is_empty() {
        scope.run("COMMIT", "COMMIT", tx.commit()).await?;
        return Ok(result);
    }

    let order_ids: Vec<Uuid> = new.iter().map(|e| e.order_id).collect();
    let customers: Vec<&str> = new.iter().map(|e| e.order.customer_id.as_str()).collect();
    let currencies: Vec<&str> = new.iter().map(|e| e.order.currency.as_str()).collect();
    let totals: Vec<Option<i64>> = new.iter().map(|e| e.total_cents).collect();
    let statuses: Vec<&str> = new.iter().map(|e| e.verdict.status()).collect();
    let received: Vec<time::OffsetDateTime> = new.iter().map(|e| e.received_at).collect();
    let validated: Vec<time::OffsetDateTime> = new.iter().map(|e| e.validated_at).collect();
    scope
        .run("INSERT orders", ORDERS, async {
            let orders = tx.prepare_cached(ORDERS).await?;
            tx.execute(&orders, &[&order_ids, &customers, &currencies, &totals, &statuses, &received, &validated]).await
        })
        .await?;

    let lines = new.iter().map(|e| e.order.items.len()).sum();
    let (mut item_orders, mut line_nos, mut skus, mut qtys, mut prices) = (
        Vec::with_capacity(lines),
        Vec::with_capacity(lines),
        Vec::with_capacity(lines),
        Vec::with_capacity(lines),
        Vec::with_capacity(lines),
    );
    for e in &new {
        for (i, item) in e.order.items.iter().enumerate() {
            item_orders.push(e.order_id);
            line_nos.push(i as i32 + 1);
            skus.push(item.sku.as_str());
            qtys.push(item.qty);
            prices.push(item.unit_price_cents);
        }
    }
    scope
        .run("INSERT order_items", ITEMS, async {
            let items = tx.prepare_cached(ITEMS).await?;
            tx.execute(&items, &[&item_orders, &line_nos, &skus, &qtys, &prices]).await
        })
        .await?;

    // Two history rows per order: received (the command), then the verdict (this event).
    let n = new.len() * 2;
    let (mut h_orders, mut h_status, mut h_events, mut h_at, mut h_detail) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for e in &new {
        h_orders.extend([e.order_id, e.order_id]);
        h_status.extend(["received", e.verdict.status()]);
        h_events.extend([e.command_event_id, e.event_id]);
        h_at.extend([e.received_at, e.validated_at]);
        let detail = match &e.verdict {
            Verdict::Accepted => None,
            Verdict::Rejected { failures } => serde_json::to_value(failures).ok(),
        };
        h_detail.extend([None, detail]);
    }
    scope
        .run("INSERT order_status_history", HISTORY, async {
            let history = tx.prepare_cached(HISTORY).await?;
            tx.execute(&history, &[&h_orders, &h_status, &h_events, &h_at, &h_detail]).await
        })
        .await?;
    scope.run("COMMIT", "COMMIT", tx.commit()).await?;
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constraint_and_data_errors_are_permanent() {
        assert!(is_permanent(&SqlState::UNIQUE_VIOLATION));
        assert!(is_permanent(&SqlState::NUMERIC_VALUE_OUT_OF_RANGE));
        assert!(!is_permanent(&SqlState::CONNECTION_FAILURE));
        assert!(!is_permanent(&SqlState::T_R_SERIALIZATION_FAILURE));
        assert!(!is_permanent(&SqlState::T_R_DEADLOCK_DETECTED));
        assert!(!is_permanent(&SqlState::ADMIN_SHUTDOWN));
    }
}
