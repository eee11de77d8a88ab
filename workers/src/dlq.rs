//! The dead-letter topic: where a message that no retry can fix goes, with its original key, payload and
//! headers, plus why it failed and where it came from, so that an operator can inspect and replay it.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::config::KafkaConfig;
use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};

#[derive(Clone)]
pub struct DeadLetters {
    /// Replaced when it becomes unusable (see [`service_core::kafka::unusable`]).
    producer: Arc<RwLock<FutureProducer>>,
    config: ClientConfig,
    topic: String,
}

impl DeadLetters {
    pub fn new(kafka: &KafkaConfig, topic: &str) -> Result<Self, KafkaError> {
        let config = kafka.idempotent_producer(&[("message.timeout.ms", "30000")]);
        let producer = Arc::new(RwLock::new(config.create()?));
        Ok(Self { producer, config, topic: topic.to_owned() })
    }

    fn producer(&self) -> FutureProducer {
        self.producer.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Replaces `used` if it is unusable after `failed` (and nobody replaced it meanwhile). The replaced producer
    /// is dropped off the runtime: dropping one joins its polling thread and may wait for the broker.
    fn renew_if_unusable(&self, used: FutureProducer, failed: &KafkaError) {
        let Some((code, reason)) = service_core::kafka::unusable(used.client(), Some(failed)) else {
            service_core::kafka::drop_off_runtime(used);
            return;
        };
        let current_ptr = self.producer.read().unwrap_or_else(std::sync::PoisonError::into_inner).client().native_ptr();
        if !std::ptr::eq(current_ptr, used.client().native_ptr()) {
            service_core::kafka::drop_off_runtime(used); // another task replaced it already
            return;
        }
        let fresh = match self.config.create::<FutureProducer>() {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "the dead-letter producer is unusable and could not be replaced");
                return;
            }
        };
        let replaced = {
            let mut current = self.producer.write().unwrap_or_else(std::sync::PoisonError::into_inner);
            if std::ptr::eq(current.client().native_ptr(), used.client().native_ptr()) {
                Some(std::mem::replace(&mut *current, fresh))
            } else {
                service_core::kafka::drop_off_runtime(fresh);
                None
            }
        };
        if let Some(old) = replaced {
            tracing::error!(error = %code, reason, "the dead-letter producer is unusable; replaced it");
            service_core::kafka::producer_renewed();
            service_core::kafka::drop_off_runtime(old);
        }
        service_core::kafka::drop_off_runtime(used);
    }

    /// Publishes `msg` to the DLQ with `error` and its origin in headers; returns once the broker confirmed.
    pub async fn send(&self, job: &str, msg: &impl Message, error: &str) -> Result<(), KafkaError> {
        let mut headers = OwnedHeaders::new();
        if let Some(h) = msg.headers() {
            for h in h.iter() {
                headers = headers.insert(Header { key: h.key, value: h.value });
            }
        }
        let partition = msg.partition().to_string();
        let offset = msg.offset().to_string();
        headers = headers
            .insert(Header { key: "dlq-error", value: Some(error) })
            .insert(Header { key: "dlq-job", value: Some(job) })
            .insert(Header { key: "dlq-origin-topic", value: Some(msg.topic()) })
            .insert(Header { key: "dlq-origin-partition", value: Some(partition.as_str()) })
            .insert(Header { key: "dlq-origin-offset", value: Some(offset.as_str()) });
        let mut record = FutureRecord::<[u8], [u8]>::to(&self.topic).headers(headers);
        if let Some(k) = msg.key() {
            record = record.key(k);
        }
        if let Some(p) = msg.payload() {
            record = record.payload(p);
        }
        let producer = self.producer();
        match producer.send(record, Duration::from_secs(30)).await {
            Ok(_) => {
                service_core::metrics::message_sent(&self.topic, None);
                Ok(())
            }
            Err((e, _)) => {
                service_core::metrics::message_sent(&self.topic, Some("delivery"));
                self.renew_if_unusable(producer, &e);
                Err(e)
            }
        }
    }
}
