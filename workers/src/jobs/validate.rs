//! `validate`: consumes `orders.commands`, applies the business rules, and publishes the verdict to
//! `orders.validated` (accepted and rejected alike) and, when the command carries a `reply-to` header, to the
//! replies topic for the gateway that waits on it (with the command's `correlation-id`).
//!
//! Produce, then commit: offsets are stored only after the broker acknowledged every record of the batch. A
//! crash in between redelivers the commands, and validating them again gives the very same events (the event
//! id is derived from the command's), which the persist job recognises as applied. A duplicate reply is
//! ignored by the gateway, which only listens for correlation ids it waits on.

use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::global::BoxedTracer;
use order_contract::{OrderValidated, SCHEMA_VERSION, decode_command, headers};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::FutureRecord;
use service_core::admin::Readiness;
use service_core::kafka::Renewable;
use service_core::telemetry::{self, Context, SpanKind, TraceContextExt as _};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use super::{JobMetrics, dead_letter, process_span};
use crate::config::{BatchConfig, KafkaConfig, RulesConfig};
use crate::consume::{Backoff, Source, header};
use crate::dlq::DeadLetters;
use crate::rules;

pub const JOB: &str = "validate";

pub struct ValidateJob {
    pub kafka: KafkaConfig,
    pub batch: BatchConfig,
    pub rules: RulesConfig,
    pub dead_letters: DeadLetters,
    pub readiness: Readiness,
    pub metrics: JobMetrics,
    pub tracer: BoxedTracer,
}

/// One record to publish.
struct Out<'a> {
    topic: &'a str,
    key: String,
    payload: Vec<u8>,
    /// The PRODUCER span (`send <topic>`), ended when the broker acknowledged the record.
    span: Context,
    traceparent: Option<String>,
    correlation_id: Option<String>,
}

impl ValidateJob {
    /// The idempotent producer of verdicts (`acks=all`, so an acknowledged verdict survives a broker failover),
    /// replaced when it becomes unusable.
    fn producers(&self) -> Result<Renewable<DefaultClientContext>, KafkaError> {
        let client_id = format!("workers-{JOB}");
        let config = self.kafka.idempotent_producer(&[
            ("client.id", &client_id),
            ("linger.ms", "2"),
            ("message.timeout.ms", "30000"),
        ]);
        Renewable::new("verdict", move || config.create())
    }

    /// Runs until `stop`; the batch in hand is finished or left for redelivery.
    pub async fn run(self, stop: CancellationToken) -> anyhow::Result<()> {
        let mut source = Source::new(JOB, &self.kafka.commands_topic, &self.kafka, &self.batch)?;
        self.metrics.watch_lag(JOB, source.lag.clone());
        self.metrics.start(JOB, &["accepted", "rejected", "dead_lettered"], &["kafka"]);
        let producers = self.producers()?;
        self.readiness.set("consumer", true);
        tracing::info!(topic = %self.kafka.commands_topic, "validate job consuming");
        let group = source.group.clone();
        while let Some(batch) = source.next_batch(&stop).await {
            self.metrics.batch(JOB, batch.len());
            if !source.while_working(self.process(&producers, &batch, &group, &stop)).await {
                break;
            }
            source.done(&batch);
        }
        self.readiness.set("consumer", false);
        source.commit();
        tracing::info!("validate job stopped");
        Ok(())
    }

    /// Validates and publishes a batch; `false` when stopped before every verdict was acknowledged.
    async fn process(
        &self,
        producers: &Renewable<DefaultClientContext>,
        batch: &[OwnedMessage],
        group: &str,
        stop: &CancellationToken,
    ) -> bool {
        let now = OffsetDateTime::now_utc();
        let mut out = Vec::with_capacity(batch.len());
        let mut spans = Vec::with_capacity(batch.len());
        let (mut accepted, mut rejected, mut dead) = (0, 0, 0);
        for msg in batch {
            let cx = process_span(&self.tracer, group, msg);
            let (event, payload) = match self.verdict(msg, now) {
                Ok(v) => v,
                Err(why) => {
                    if !dead_letter(&self.dead_letters, JOB, msg, &why, &cx, stop).await {
                        return false;
                    }
                    dead += 1;
                    continue;
                }
            };
            match event.verdict {
                order_contract::Verdict::Accepted => accepted += 1,
                order_contract::Verdict::Rejected { .. } => rejected += 1,
            }
            spans.push(cx.clone());
            let correlation_id = header(msg, headers::CORRELATION_ID).map(str::to_owned);
            let key = event.order_id.to_string();
            if header(msg, headers::REPLY_TO).is_some() {
                out.push(self.out(
                    &self.kafka.replies_topic,
                    &cx,
                    key.clone(),
                    payload.clone(),
                    correlation_id.clone(),
                ));
            }
            out.push(self.out(&self.kafka.validated_topic, &cx, key, payload, correlation_id));
        }
        let published = self.publish(producers, out, stop).await;
        for cx in &spans {
            telemetry::end(
                cx,
                (!published)
                    .then_some(("stopped", &"stopped before the verdict was acknowledged" as &dyn std::fmt::Display)),
            );
        }
        if !published {
            return false;
        }
        self.metrics.outcome(JOB, "accepted", accepted);
        self.metrics.outcome(JOB, "rejected", rejected);
        self.metrics.outcome(JOB, "dead_lettered", dead);
        true
    }

    /// The verdict on one command and its encoding, or why the message can only be dead-lettered.
    fn verdict(&self, msg: &OwnedMessage, now: OffsetDateTime) -> Result<(OrderValidated, Vec<u8>), String> {
        let command = decode_command(
            header(msg, headers::EVENT_TYPE),
            header(msg, headers::SCHEMA_VERSION),
            msg.payload().unwrap_or_default(),
        )
        .map_err(|e| format!("undecodable: {e}"))?;
        let verdict = rules::validate(&command, &self.rules);
        let event = OrderValidated::new(command, verdict, now);
        // Encoding cannot fail with these types; if it did, no retry could fix it.
        let payload = serde_json::to_vec(&event).map_err(|e| format!("encoding the verdict: {e}"))?;
        Ok((event, payload))
    }

    /// A verdict to publish under the message's process span `parent`.
    fn out<'a>(
        &self,
        topic: &'a str,
        parent: &Context,
        key: String,
        payload: Vec<u8>,
        correlation_id: Option<String>,
    ) -> Out<'a> {
        let span = telemetry::start(&self.tracer, format!("send {topic}"), SpanKind::Producer, parent, || {
            telemetry::kafka_attributes("send", topic, &[("messaging.kafka.message.key", key.clone())])
        });
        let traceparent = telemetry::traceparent(&span);
        Out { topic, key, payload, span, traceparent, correlation_id }
    }

    /// Publishes every record, retrying the failed ones with backoff until all are acknowledged or `stop`. A
    /// producer that became unusable (fenced by the broker, a fatal error) is replaced, so that the retry goes out
    /// on a new one: the old one would fail every later record.
    async fn publish(
        &self,
        producers: &Renewable<DefaultClientContext>,
        mut pending: Vec<Out<'_>>,
        stop: &CancellationToken,
    ) -> bool {
        let mut backoff = Backoff::new();
        let version = SCHEMA_VERSION.to_string();
        loop {
            let (generation, producer) = producers.get();
            let mut inflight = Vec::with_capacity(pending.len());
            let mut failed = Vec::new();
            for out in pending {
                let headers = OwnedHeaders::new_with_capacity(4)
                    .insert(Header { key: headers::EVENT_TYPE, value: Some(order_contract::ORDER_VALIDATED) })
                    .insert(Header { key: headers::SCHEMA_VERSION, value: Some(&version) });
                let headers = match &out.traceparent {
                    Some(t) => headers.insert(Header { key: headers::TRACEPARENT, value: Some(t) }),
                    None => headers,
                };
                let headers = match &out.correlation_id {
                    Some(c) => headers.insert(Header { key: headers::CORRELATION_ID, value: Some(c) }),
                    None => headers,
                };
                let record = FutureRecord::to(out.topic).key(&out.key).payload(&out.payload).headers(headers);
                match producer.send_result(record) {
                    Ok(delivery) => inflight.push((delivery, out)),
                    Err((e, _)) => {
                        tracing::debug!(error = %e, "enqueueing a verdict failed");
                        producers.renew_if_unusable(generation, &producer, Some(&e));
                        failed.push(out);
                    }
                }
            }
            for (delivery, out) in inflight {
                match delivery.await {
                    Ok(Ok(d)) => {
                        let span = out.span.span();
                        if span.is_recording() {
                            span.set_attribute(KeyValue::new(
                                "messaging.destination.partition.id",
                                d.partition.to_string(),
                            ));
                            span.set_attribute(KeyValue::new("messaging.kafka.offset", d.offset));
                        }
                        telemetry::end(&out.span, None);
                        service_core::metrics::message_sent(out.topic, None);
                    }
                    Ok(Err((e, _))) => {
                        tracing::warn!(error = %e, topic = %out.topic, "publishing a verdict failed; retrying");
                        producers.renew_if_unusable(generation, &producer, Some(&e));
                        service_core::metrics::message_sent(out.topic, Some("delivery"));
                        failed.push(out);
                    }
                    Err(_) => failed.push(out), // the producer was dropped: cannot happen while we hold it
                }
            }
            producers.release(generation, producer);
            if failed.is_empty() {
                return true;
            }
            self.metrics.retry(JOB, "kafka");
            if !backoff.wait(stop).await {
                for out in &failed {
                    telemetry::end(&out.span, Some(("stopped", &"stopped before the broker acknowledged")));
                }
                return false;
            }
            // Give librdkafka a moment to refresh metadata before resending.
            tokio::time::sleep(Duration::from_millis(10)).await;
            pending = failed;
        }
    }
}
