//! The dead-letter topic: where a message that no retry can fix goes, with its original key, payload and
//! headers, plus why it failed and where it came from, so that an operator can inspect and replay it.

use std::sync::Arc;
use std::time::Duration;

use crate::config::KafkaConfig;
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use service_core::kafka::Renewable;

#[derive(Clone)]
pub struct DeadLetters {
    producers: Arc<Renewable<DefaultClientContext>>,
    topic: String,
}

impl DeadLetters {
    pub fn new(kafka: &KafkaConfig, topic: &str) -> Result<Self, KafkaError> {
        let config = kafka.idempotent_producer(&[("message.timeout.ms", "30000")]);
        let producers = Renewable::new("dead-letter", move || config.create())?;
        Ok(Self { producers: Arc::new(producers), topic: topic.to_owned() })
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
        let (generation, producer) = self.producers.get();
        let result = match producer.send(record, Duration::from_secs(30)).await {
            Ok(_) => {
                service_core::metrics::message_sent(&self.topic, None);
                Ok(())
            }
            Err((e, _)) => {
                service_core::metrics::message_sent(&self.topic, Some("delivery"));
                self.producers.renew_if_unusable(generation, &producer, Some(&e));
                Err(e)
            }
        };
        self.producers.release(generation, producer);
        result
    }
}
