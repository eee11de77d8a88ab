//! What the services that produce to Kafka share about their producers (feature `kafka`).

use std::sync::{PoisonError, RwLock};

use rdkafka::ClientContext;
use rdkafka::client::Client;
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::producer::{FutureProducer, Producer as _};
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

/// A producer shared by the tasks that send with it, replaced when it becomes [`unusable`]. Each replacement is
/// a new generation; a task that saw a failure names the generation it used, so that several tasks failing on
/// the same producer replace it once.
pub struct Renewable<C: ClientContext + 'static> {
    /// What the producer sends, for logs ("verdict", "dead-letter", ...).
    what: &'static str,
    current: RwLock<(u64, FutureProducer<C>)>,
    make: Box<dyn Fn() -> KafkaResult<FutureProducer<C>> + Send + Sync>,
}

impl<C: ClientContext + 'static> Renewable<C> {
    /// A first producer from `make`, which also makes its replacements.
    pub fn new(
        what: &'static str,
        make: impl Fn() -> KafkaResult<FutureProducer<C>> + Send + Sync + 'static,
    ) -> KafkaResult<Self> {
        let first = make()?;
        Ok(Self { what, current: RwLock::new((0, first)), make: Box::new(make) })
    }

    /// The producer in use and its generation.
    pub fn get(&self) -> (u64, FutureProducer<C>) {
        let c = self.current.read().unwrap_or_else(PoisonError::into_inner);
        (c.0, c.1.clone())
    }

    fn generation(&self) -> u64 {
        self.current.read().unwrap_or_else(PoisonError::into_inner).0
    }

    /// Replaces the producer of `generation` if `used` (that producer) is unusable after `failed`, unless another
    /// task replaced it already. If no new one can be made, the old one stays and the next failure tries again.
    pub fn renew_if_unusable(&self, generation: u64, used: &FutureProducer<C>, failed: Option<&KafkaError>) {
        let Some((code, reason)) = unusable(used.client(), failed) else { return };
        if self.generation() != generation {
            return;
        }
        let fresh = match (self.make)() {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "the {} producer is unusable and could not be replaced", self.what);
                return;
            }
        };
        let old = {
            let mut c = self.current.write().unwrap_or_else(PoisonError::into_inner);
            if c.0 != generation {
                drop(c);
                drop_off_runtime(fresh);
                return;
            }
            c.0 += 1;
            std::mem::replace(&mut c.1, fresh)
        };
        tracing::error!(error = %code, reason, "the {} producer is unusable; replaced it", self.what);
        producer_renewed();
        drop_off_runtime(old);
    }

    /// Lets go of a handle from [`Renewable::get`]. The last handle on a replaced producer is dropped off the
    /// runtime (see [`drop_off_runtime`]).
    pub fn release(&self, generation: u64, handle: FutureProducer<C>) {
        if self.generation() != generation {
            drop_off_runtime(handle);
        }
    }
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
