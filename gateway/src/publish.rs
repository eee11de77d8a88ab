//! Publishing order commands to Kafka. A command counts as accepted only once the broker acknowledged it
//! (idempotent producer, `acks=all`), so an answer of `202` means the order is durably in the log.

use std::sync::Arc;
use std::time::Duration;

use order_contract::{ORDER_CREATE, OrderCommand, SCHEMA_VERSION, headers};
use rdkafka::ClientContext;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use service_core::admin::Readiness;
use service_core::kafka::Renewable;

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
    #[error("the broker did not confirm delivery within {0:?}")]
    Unconfirmed(Duration),
}

/// Turns the `kafka` readiness check off the moment librdkafka loses every broker connection, or a delivery times
/// out (a broker that accepts connections but does not answer), so that new orders get `503` at once instead of
/// each waiting for a delivery timeout; the probe turns it on again.
pub struct BrokerWatch {
    readiness: Readiness,
}

impl BrokerWatch {
    fn broker_down(&self) {
        self.readiness.set("kafka", false);
    }
}

impl ClientContext for BrokerWatch {
    fn error(&self, error: KafkaError, reason: &str) {
        match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::AllBrokersDown) => {
                self.broker_down();
                // Repeated at every reconnect attempt; the readiness change and the probe say it once.
                tracing::debug!(error = %error, reason, "Kafka client error");
            }
            Some(RDKafkaErrorCode::BrokerTransportFailure) => {
                tracing::debug!(error = %error, reason, "Kafka client error")
            }
            _ => tracing::warn!(error = %error, reason, "Kafka client error"),
        }
    }
}

/// The gateway's producer of order commands.
#[derive(Clone)]
pub struct Publisher {
    producers: Arc<Renewable<BrokerWatch>>,
    readiness: Readiness,
    topic: String,
    timeout: Duration,
    tracer: Arc<BoxedTracer>,
}

impl Publisher {
    pub fn new(config: &KafkaConfig, readiness: Readiness) -> Result<Self, PublishError> {
        let mut settings = config.client();
        settings
            .set("client.id", &config.client_id)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("message.timeout.ms", config.delivery_timeout_ms.to_string());
        let watch = readiness.clone();
        let producers = Renewable::new("order command", move || {
            settings.create_with_context(BrokerWatch { readiness: watch.clone() })
        })
        .map_err(PublishError::Create)?;
        Ok(Self {
            producers: Arc::new(producers),
            readiness,
            topic: config.commands_topic.clone(),
            timeout: Duration::from_millis(config.delivery_timeout_ms),
            tracer: Arc::new(telemetry::tracer("gateway")),
        })
    }

    /// Checks that the broker answers and knows the commands topic (readiness). Blocks: call off the runtime.
    pub fn probe(&self) -> Result<(), KafkaError> {
        let (generation, producer) = self.producers.get();
        self.producers.renew_if_unusable(generation, &producer, None);
        if let Some((code, _)) = producer.client().fatal_error() {
            return Err(KafkaError::MetadataFetch(code));
        }
        let md = producer.client().fetch_metadata(Some(&self.topic), Duration::from_secs(5))?;
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
        let (generation, producer) = self.producers.get();
        // librdkafka can hold a message that was in flight when the broker went away past `message.timeout.ms`
        // (seen in CI: 9.4 s with a 3 s timeout, the broker stopped): the client gets its answer within the
        // delivery timeout regardless (the message may still be delivered, as after a timed-out delivery).
        let bound = self.timeout + Duration::from_secs(1);
        let result = match tokio::time::timeout(bound, producer.send(record, self.timeout)).await {
            Err(_) => {
                self.readiness.set("kafka", false);
                let e = PublishError::Unconfirmed(bound);
                telemetry::end(&cx, Some(("delivery", &e)));
                service_core::metrics::message_sent(&self.topic, Some("delivery"));
                Err(e)
            }
            Ok(Ok(delivery)) => {
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
            Ok(Err((e, _))) => {
                if e.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageTimedOut) {
                    self.readiness.set("kafka", false);
                }
                self.producers.renew_if_unusable(generation, &producer, Some(&e));
                telemetry::end(&cx, Some(("delivery", &e)));
                service_core::metrics::message_sent(&self.topic, Some("delivery"));
                Err(PublishError::Delivery(e))
            }
        };
        // This may be the last handle on a replaced producer: destroying it waits on librdkafka's threads.
        self.producers.release(generation, producer);
        result
    }

    /// Waits for queued messages to be delivered (shutdown). Blocks: call off the runtime.
    pub fn flush(&self, timeout: Duration) {
        if let Err(e) = self.producers.get().1.flush(timeout) {
            tracing::warn!(error = %e, "producer flush at shutdown incomplete");
        }
    }
}
