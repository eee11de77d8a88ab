//! What the services that produce to Kafka share about their producers (feature `kafka`).

use rdkafka::ClientContext;
use rdkafka::client::Client;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

/// Why a producer can no longer be used, if it cannot: librdkafka declared a fatal error, or the broker refused
/// its producer id or epoch in `failed` (fenced, sequence gap). Both are final for that instance: librdkafka's
/// documentation says to create a new one, which gets a new producer id. (Tansu 0.6 answers `ProducerFenced` to
/// every later produce once librdkafka bumped the epoch after delivery timeouts, without a fatal error.)
pub fn unusable<C: ClientContext>(
    client: &Client<C>,
    failed: Option<&KafkaError>,
) -> Option<(RDKafkaErrorCode, String)> {
    let refused = failed.and_then(KafkaError::rdkafka_error_code).filter(|code| is_refusal(*code));
    client.fatal_error().or_else(|| refused.map(|c| (c, "refused by the broker".to_owned())))
}

fn is_refusal(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::ProducerFenced
            | RDKafkaErrorCode::InvalidProducerEpoch
            | RDKafkaErrorCode::OutOfOrderSequenceNumber
            | RDKafkaErrorCode::UnknownProducerId
            | RDKafkaErrorCode::InvalidProducerIdMapping
    )
}

/// Drops `value` (a producer) on a blocking thread when called on a Tokio runtime: librdkafka's destroy joins its
/// threads and waits for the broker (seconds while it is unreachable), which must not stall a worker thread.
pub fn drop_off_runtime<T: Send + 'static>(value: T) {
    match tokio::runtime::Handle::try_current() {
        Ok(h) => drop(h.spawn_blocking(move || drop(value))),
        Err(_) => drop(value),
    }
}

/// `messaging_kafka_producer_renewals_total`: producers replaced because they were [`unusable`].
pub fn producer_renewed() {
    static RENEWALS: std::sync::OnceLock<opentelemetry::metrics::Counter<u64>> = std::sync::OnceLock::new();
    RENEWALS
        .get_or_init(|| {
            opentelemetry::global::meter("messaging")
                .u64_counter("messaging.kafka.producer.renewals")
                .with_description("Kafka producers replaced after a fatal error or a refusal (fenced, sequence gap)")
                .build()
        })
        .add(1, &[]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_refusals_of_the_producer_identity_make_it_unusable() {
        assert!(is_refusal(RDKafkaErrorCode::ProducerFenced));
        assert!(is_refusal(RDKafkaErrorCode::OutOfOrderSequenceNumber));
        assert!(!is_refusal(RDKafkaErrorCode::MessageTimedOut));
        assert!(!is_refusal(RDKafkaErrorCode::NotLeaderForPartition));
    }
}
