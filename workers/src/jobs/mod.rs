//! The jobs a worker process can run, each a Kafka consumer group of its own.

pub mod persist;
pub mod retention;
pub mod validate;

use opentelemetry::KeyValue;
use std::sync::{Arc, Mutex};

use opentelemetry::global::BoxedTracer;
use opentelemetry::metrics::{Counter, Histogram, Meter, ObservableGauge};
use order_contract::headers;
use rdkafka::message::{Message, OwnedMessage};
use service_core::telemetry::{self, Context, SpanKind};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::consume::{Backoff, Lag, header};
use crate::dlq::DeadLetters;

/// The instruments every job reports to (`job` is a label).
#[derive(Clone)]
pub struct JobMetrics {
    lags: Arc<Mutex<Vec<(&'static str, Lag)>>>,
    _lag_gauge: ObservableGauge<i64>,
    consumed: Counter<u64>,
    processed: Counter<u64>,
    retries: Counter<u64>,
    batch_size: Histogram<u64>,
    db_duration: Histogram<f64>,
}

impl JobMetrics {
    pub fn new(meter: &Meter) -> Self {
        let lags: Arc<Mutex<Vec<(&'static str, Lag)>>> = Arc::default();
        let watched = lags.clone();
        let lag_gauge = meter
            .i64_observable_gauge("worker.consumer.lag")
            .with_description("Messages not yet committed behind the partition's end, per job and partition")
            .with_unit("{message}")
            .with_callback(move |obs| {
                let Ok(jobs) = watched.lock() else { return };
                for (job, lag) in jobs.iter() {
                    let Ok(lag) = lag.lock() else { continue };
                    for ((topic, partition), n) in lag.iter() {
                        obs.observe(
                            *n,
                            &[
                                KeyValue::new("worker", *job),
                                KeyValue::new("topic", topic.clone()),
                                KeyValue::new("partition", i64::from(*partition)),
                            ],
                        );
                    }
                }
            })
            .build();
        Self {
            lags,
            _lag_gauge: lag_gauge,
            consumed: meter
                .u64_counter("worker.messages.consumed")
                .with_description("Messages read from Kafka")
                .build(),
            processed: meter
                .u64_counter("worker.messages.processed")
                .with_description("Messages finished by a job, by outcome")
                .build(),
            retries: meter
                .u64_counter("worker.retries")
                .with_description("Retries of a batch after a transient failure, by cause")
                .build(),
            batch_size: meter
                .u64_histogram("worker.batch.size")
                .with_description("Messages per batch")
                .with_unit("{message}")
                .with_boundaries(vec![1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0])
                .build(),
            db_duration: meter
                .f64_histogram("worker.db.duration")
                .with_description("Time of one database transaction")
                .with_unit("s")
                .with_boundaries(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0])
                .build(),
        }
    }

    /// Reports `lag` (kept up to date by the job's consumer) under `job`.
    fn watch_lag(&self, job: &'static str, lag: Lag) {
        if let Ok(mut lags) = self.lags.lock() {
            lags.push((job, lag));
        }
    }

    /// Exports every outcome and retry cause of `job` at 0 from the start, so that `rate()` and alerts on them
    /// see a series before the first event (and its absence means a job that does not run).
    fn start(&self, job: &'static str, outcomes: &[&'static str], causes: &[&'static str]) {
        for outcome in outcomes {
            self.processed.add(0, &[KeyValue::new("worker", job), KeyValue::new("outcome", *outcome)]);
        }
        for cause in causes {
            self.retries.add(0, &[KeyValue::new("worker", job), KeyValue::new("cause", *cause)]);
        }
    }

    fn batch(&self, job: &'static str, n: usize) {
        self.consumed.add(n as u64, &[KeyValue::new("worker", job)]);
        self.batch_size.record(n as u64, &[KeyValue::new("worker", job)]);
    }

    fn outcome(&self, job: &'static str, outcome: &'static str, n: u64) {
        if n > 0 {
            self.processed.add(n, &[KeyValue::new("worker", job), KeyValue::new("outcome", outcome)]);
        }
    }

    fn retry(&self, job: &'static str, cause: &'static str) {
        self.retries.add(1, &[KeyValue::new("worker", job), KeyValue::new("cause", cause)]);
    }
}

/// Sends `msg` to the dead-letter topic, retrying until the broker confirms, and ends its process span `cx` as
/// dead-lettered; `false` when stopped first.
async fn dead_letter(
    dlq: &DeadLetters,
    job: &'static str,
    msg: &impl rdkafka::Message,
    why: &str,
    cx: &Context,
    stop: &CancellationToken,
) -> bool {
    let attempt = async {
        tracing::error!(
            job,
            error = why,
            topic = msg.topic(),
            partition = msg.partition(),
            offset = msg.offset(),
            "dead-lettering a message"
        );
        let mut backoff = Backoff::new();
        loop {
            match dlq.send(job, msg, why).await {
                Ok(()) => return true,
                Err(e) => {
                    tracing::warn!(error = %e, "publishing to the DLQ failed; retrying");
                    if !backoff.wait(stop).await {
                        return false;
                    }
                }
            }
        }
    };
    let done = attempt.instrument(telemetry::log_span(cx)).await;
    telemetry::end(cx, Some(("dead_lettered", &why)));
    done
}

/// The CONSUMER span of processing one message (`process <topic>`), continuing the trace its `traceparent`
/// header names, so that one order is one trace from the edge to PostgreSQL.
fn process_span(tracer: &BoxedTracer, group: &str, msg: &OwnedMessage) -> Context {
    let parent = telemetry::from_traceparent(header(msg, headers::TRACEPARENT));
    telemetry::start(tracer, format!("process {}", msg.topic()), SpanKind::Consumer, &parent, || {
        let mut v = telemetry::kafka_attributes(
            "process",
            msg.topic(),
            &[
                ("messaging.consumer.group.name", group.to_owned()),
                ("messaging.destination.partition.id", msg.partition().to_string()),
            ],
        );
        v.push(KeyValue::new("messaging.kafka.offset", msg.offset()));
        if let Some(key) = msg.key().and_then(|k| std::str::from_utf8(k).ok()) {
            v.push(KeyValue::new("messaging.kafka.message.key", key.to_owned()));
        }
        v
    })
}
