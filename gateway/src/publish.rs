//! Publishing order commands to Kafka. A command counts as accepted only once the broker acknowledged it
//! (idempotent producer, `acks=all`), so an answer of `202` means the order is durably in the log.

use std::time::Duration;

use order_contract::{ORDER_CREATE, OrderCommand, SCHEMA_VERSION, headers};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use opentelemetry::global::BoxedTracer;
use service_core::telemetry::{self, Context, KeyValue, SpanKind, TraceContextExt as _};

use crate::config::KafkaConfig;

/// Why a command was not published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("creating the Kafka producer: {0}")]
    Create(KafkaError),
    #[error("encoding the command: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("the broker did not confirm delivery: {0}")]
    Delivery(KafkaError),
}

/// The gateway's producer of order commands.
#[derive(Clone)]
pub struct Publisher {
    producer: FutureProducer,
    topic: String,
    timeout: Duration,
    tracer: std::sync::Arc<BoxedTracer>,
}

impl Publisher {
    pub fn new(config: &KafkaConfig) -> Result<Self, PublishError> {
        let producer: FutureProducer = config
            .client()
            .set("client.id", &config.client_id)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("message.timeout.ms", config.delivery_timeout_ms.to_string())
            .create()
            .map_err(PublishError::Create)?;
        Ok(Self {
            producer,
            topic: config.commands_topic.clone(),
            timeout: Duration::from_millis(config.delivery_timeout_ms),
            tracer: std::sync::Arc::new(telemetry::tracer("gateway")),
        })
    }

    /// Checks that the broker answers and knows the commands topic (readiness). Blocks: call off the runtime.
    pub fn probe(&self) -> Result<(), KafkaError> {
        let md = self.producer.client().fetch_metadata(Some(&self.topic), Duration::from_secs(5))?;
        match md.topics().first() {
            Some(t) if t.error().is_none() && !t.partitions().is_empty() => Ok(()),
            _ => Err(KafkaError::MetadataFetch(rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition)),
        }
    }

    /// Publishes `command` keyed by its order id and waits for the broker's acknowledgement.
    /// With `reply`, (reply topic, correlation id): the validate job answers there.
    pub async fn publish(
        &self,
        command: &OrderCommand,
        parent: &Context,
        reply: Option<(&str, &str)>,
    ) -> Result<(), PublishError> {
        let payload = serde_json::to_vec(command)?;
        let key = command.order_id.to_string();
        // The PRODUCER span; its context travels in the message's `traceparent` to the consumers.
        let cx = telemetry::start(&self.tracer, format!("send {}", self.topic), SpanKind::Producer, parent, || {
            telemetry::kafka_attributes(
                "send",
                &self.topic,
                &[("messaging.kafka.message.key", key.clone()), ("messaging.message.id", command.event_id.to_string())],
            )
        });
        let traceparent = telemetry::traceparent(&cx);
        let version = SCHEMA_VERSION.to_string();
        let mut hdrs = OwnedHeaders::new()
            .insert(Header { key: headers::EVENT_TYPE, value: Some(ORDER_CREATE) })
            .insert(Header { key: headers::SCHEMA_VERSION, value: Some(version.as_str()) });
        if let Some(tp) = traceparent.as_deref() {
            hdrs = hdrs.insert(Header { key: headers::TRACEPARENT, value: Some(tp) });
        }
        if let Some((topic, correlation_id)) = reply {
            hdrs = hdrs
                .insert(Header { key: headers::REPLY_TO, value: Some(topic) })
                .insert(Header { key: headers::CORRELATION_ID, value: Some(correlation_id) });
        }
        let record = FutureRecord::to(&self.topic).key(&key).payload(&payload).headers(hdrs);
        match self.producer.send(record, self.timeout).await {
            Ok(delivery) => {
                let span = cx.span();
                if span.is_recording() {
                    span.set_attribute(KeyValue::new(
                        "messaging.destination.partition.id",
                        delivery.partition.to_string(),
                    ));
                    span.set_attribute(KeyValue::new("messaging.kafka.offset", delivery.offset));
                }
                telemetry::end(&cx, None);
                service_core::metrics::message_sent(&self.topic, None);
                Ok(())
            }
            Err((e, _)) => {
                telemetry::end(&cx, Some(("delivery", &e)));
                service_core::metrics::message_sent(&self.topic, Some("delivery"));
                Err(PublishError::Delivery(e))
            }
        }
    }

    /// Waits for queued messages to be delivered (shutdown). Blocks: call off the runtime.
    pub fn flush(&self, timeout: Duration) {
        if let Err(e) = self.producer.flush(timeout) {
            tracing::warn!(error = %e, "producer flush at shutdown incomplete");
        }
    }
}
