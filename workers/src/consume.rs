//! What every job shares: a consumer in its own group that hands out batches of consecutive messages, reads
//! ahead (bounded) while a batch is worked on, stores offsets only for finished batches, and reports its lag.
//!
//! Offsets are stored (`enable.auto.offset.store=false`) only after a batch's effect is durable; librdkafka
//! commits stored offsets every second, before a rebalance takes partitions away and once more at shutdown. A
//! crash therefore redelivers at most the batches since the last commit, which the jobs make harmless.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::Offset;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::config::{BatchConfig, KafkaConfig};

/// Read-ahead, in batches, before a job pauses its partitions.
const AHEAD_BATCHES: usize = 4;

/// How long a batch's work may take before the job pauses its partitions (see [`Source::while_working`]).
const STALL: Duration = Duration::from_secs(1);

/// How long a job waits for a message before checking that it is not stranded without partitions.
const IDLE_CHECK: Duration = Duration::from_secs(10);

/// Consumer lag per (topic, partition) of one job, from librdkafka's statistics.
pub type Lag = Arc<Mutex<BTreeMap<(String, i32), i64>>>;

/// Logs rebalances, counts them, and keeps the latest lag figures.
pub struct JobContext {
    job: &'static str,
    lag: Lag,
    rebalances: AtomicU64,
}

impl ClientContext for JobContext {
    fn stats(&self, stats: Statistics) {
        let mut fresh = BTreeMap::new();
        for (topic, t) in stats.topics {
            for (partition, p) in t.partitions {
                // Partition -1 is librdkafka's internal UA partition; negative offsets mean "unknown". Before the
                // group's first commit on a partition, everything from the low watermark on is lag.
                let done = if p.committed_offset >= 0 { p.committed_offset } else { p.lo_offset };
                if partition >= 0 && p.hi_offset >= 0 && done >= 0 {
                    fresh.insert((topic.clone(), partition), (p.hi_offset - done).max(0));
                }
            }
        }
        if let Ok(mut lag) = self.lag.lock() {
            *lag = fresh;
        }
    }
}

impl ConsumerContext for JobContext {
    fn post_rebalance(&self, _: &rdkafka::consumer::BaseConsumer<Self>, _: &Rebalance<'_>) {
        self.rebalances.fetch_add(1, Ordering::SeqCst);
    }

    fn pre_rebalance(&self, _: &rdkafka::consumer::BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => tracing::info!(job = self.job, partitions = %describe(tpl), "partitions revoked"),
            Rebalance::Assign(tpl) => {
                tracing::info!(job = self.job, partitions = %describe(tpl), "partitions assigned")
            }
            Rebalance::Error(e) => tracing::warn!(job = self.job, error = %e, "rebalance error"),
        }
    }
}

fn describe(tpl: &TopicPartitionList) -> String {
    tpl.elements().iter().map(|e| format!("{}[{}]", e.topic(), e.partition())).collect::<Vec<_>>().join(",")
}

/// A job's consumer and its read-ahead buffer.
///
/// The position of each partition is tracked here, not left to librdkafka: the offset after the last message
/// received is where a paused partition is sought to on resume, and a message below it (a re-fetch) is dropped.
/// A rebalance forgets the read-ahead: its offsets were not stored, so the partition's owner (us again, or
/// another member) starts over from the committed offset.
pub struct Source {
    consumer: StreamConsumer<JobContext>,
    topic: String,
    /// The consumer group, `{group_prefix}.{job}`.
    pub group: String,
    /// The lagging partitions we do not hold and their progress, as last seen while idle.
    idle_snapshot: Option<Vec<(i32, i64, i64)>>,
    ahead: VecDeque<OwnedMessage>,
    next: HashMap<(String, i32), i64>,
    rebalances: u64,
    max: usize,
    linger: Duration,
    paused: bool,
    pub lag: Lag,
}

impl Source {
    /// A consumer in group `{group_prefix}.{job}` subscribed to `topic`.
    pub fn new(job: &'static str, topic: &str, kafka: &KafkaConfig, batch: &BatchConfig) -> Result<Self, KafkaError> {
        let lag = Lag::default();
        let group = format!("{}.{job}", kafka.group_prefix);
        let consumer: StreamConsumer<JobContext> = kafka
            .client()
            .set("group.id", &group)
            .set("client.id", format!("workers-{job}"))
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", kafka.fetch_wait_max_ms.to_string())
            .set("session.timeout.ms", kafka.session_timeout_ms.to_string())
            .set("statistics.interval.ms", kafka.stats_interval_ms.to_string())
            // Bound what librdkafka prefetches (the read-ahead here is bounded separately, see `AHEAD_BATCHES`).
            .set("queued.max.messages.kbytes", "4096")
            .create_with_context(JobContext { job, lag: lag.clone(), rebalances: AtomicU64::new(0) })?;
        consumer.subscribe(&[topic])?;
        Ok(Self {
            consumer,
            topic: topic.to_owned(),
            group,
            idle_snapshot: None,
            ahead: VecDeque::new(),
            next: HashMap::new(),
            rebalances: 0,
            max: batch.max_messages.max(1),
            linger: Duration::from_millis(batch.linger_ms),
            paused: false,
            lag,
        })
    }

    /// The next batch: waits for a first message, then up to `linger` for more, at most `max_messages`.
    /// `None` once `stop` is cancelled.
    pub async fn next_batch(&mut self, stop: &CancellationToken) -> Option<Vec<OwnedMessage>> {
        while self.ahead.is_empty() {
            tokio::select! {
                _ = stop.cancelled() => return None,
                m = self.consumer.recv() => {
                    let m = m.map(|m| m.detach());
                    self.keep(m);
                }
                _ = tokio::time::sleep(IDLE_CHECK) => self.check_idle(),
            }
        }
        let deadline = tokio::time::Instant::now() + self.linger;
        while self.ahead.len() < self.max {
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = tokio::time::sleep_until(deadline) => break,
                m = self.consumer.recv() => {
                    let m = m.map(|m| m.detach());
                    self.keep(m);
                }
            }
        }
        let n = self.ahead.len().min(self.max);
        let batch: Vec<OwnedMessage> = self.ahead.drain(..n).collect();
        if self.paused && self.ahead.len() < self.max * AHEAD_BATCHES / 2 {
            self.set_paused(false);
        }
        Some(batch)
    }

    /// Drives `work` to completion while reading ahead up to `AHEAD_BATCHES` batches. With the read-ahead full,
    /// messages wait in librdkafka's bounded queue (nothing is received, nothing is dropped); only when `work` is
    /// stuck (longer than [`STALL`]: the database is down) is the assignment paused, so that the consumer can be
    /// polled and stay in its group however long `work` takes. Pausing drops librdkafka's prefetched messages,
    /// which are fetched again on resume: pausing on every full read-ahead made a backlog drain fetch much of it
    /// twice, so it is kept for stalls.
    pub async fn while_working<F: Future>(&mut self, work: F) -> F::Output {
        tokio::pin!(work);
        let stall = tokio::time::sleep(STALL);
        tokio::pin!(stall);
        let mut stalled = false;
        loop {
            let full = self.ahead.len() >= self.max * AHEAD_BATCHES;
            if full && stalled && !self.paused {
                self.set_paused(true);
            }
            tokio::select! {
                biased;
                out = &mut work => return out,
                _ = &mut stall, if !stalled => stalled = true,
                // Stalled, the consumer is polled even if pausing failed (the pause is retried each message).
                m = self.consumer.recv(), if !full || self.paused || stalled => {
                    let m = m.map(|m| m.detach());
                    self.keep(m);
                }
            }
        }
    }

    fn keep(&mut self, m: Result<OwnedMessage, KafkaError>) {
        let m = match m {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "Kafka consume error");
                return;
            }
        };
        let rebalances = self.consumer.context().rebalances.load(Ordering::SeqCst);
        if rebalances != self.rebalances {
            self.rebalances = rebalances;
            self.ahead.clear();
            self.next.clear();
            self.paused = false; // a new assignment starts unpaused
        }
        let key = (m.topic().to_owned(), m.partition());
        match self.next.get(&key) {
            Some(&next) if m.offset() < next => return, // fetched again after a seek: we have it
            Some(&next) if m.offset() > next => {
                // Legitimate on compacted or transactional topics, not on ours: a broker that skipped records.
                tracing::warn!(topic = %key.0, partition = key.1, expected = next, got = m.offset(), "offset gap");
            }
            _ => {}
        }
        self.next.insert(key, m.offset() + 1);
        self.ahead.push_back(m);
    }

    /// Called when no message came for [`IDLE_CHECK`]. A member with nothing to do while a partition it does not
    /// hold has lag that did not move since the last check rejoins the group: Tansu 0.6 can leave a restarted
    /// member with an empty or partial assignment while the partitions of members that died stay with nobody, and
    /// nothing else would ever wake it up. A partition held by a live member that works moves on, so healthy
    /// groups see no rejoin. (Not while paused: then this member is the one that cannot progress.)
    fn check_idle(&mut self) {
        if self.paused {
            self.idle_snapshot = None;
            return;
        }
        let held: HashSet<i32> = match self.consumer.assignment() {
            Ok(a) => a.elements_for_topic(&self.topic).iter().map(|e| e.partition()).collect(),
            Err(_) => return,
        };
        let Some(snapshot) = tokio::task::block_in_place(|| self.group_progress()) else { return };
        let stuck: Vec<(i32, i64, i64)> =
            snapshot.into_iter().filter(|(p, committed, high)| committed < high && !held.contains(p)).collect();
        if !stuck.is_empty() && self.idle_snapshot.as_ref() == Some(&stuck) {
            tracing::warn!(topic = %self.topic, ?stuck, held = ?held, "partitions of other members make no progress while this one idles; rejoining");
            self.consumer.unsubscribe();
            if let Err(e) = self.consumer.subscribe(&[&self.topic]) {
                tracing::error!(error = %e, "resubscribing failed");
            }
            self.idle_snapshot = None;
        } else {
            self.idle_snapshot = Some(stuck);
        }
    }

    /// (partition, committed offset of the group, high watermark) for every partition of the topic.
    fn group_progress(&self) -> Option<Vec<(i32, i64, i64)>> {
        let timeout = Duration::from_secs(2);
        let metadata = self.consumer.fetch_metadata(Some(&self.topic), timeout).ok()?;
        let partitions: Vec<i32> =
            metadata.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
        let mut tpl = TopicPartitionList::new();
        for p in &partitions {
            tpl.add_partition(&self.topic, *p);
        }
        let committed = self.consumer.committed_offsets(tpl, timeout).ok()?;
        let mut out = Vec::with_capacity(partitions.len());
        for p in partitions {
            let (low, high) = self.consumer.fetch_watermarks(&self.topic, p, timeout).ok()?;
            let done = match committed.find_partition(&self.topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                _ => low,
            };
            out.push((p, done, high));
        }
        Some(out)
    }

    fn set_paused(&mut self, pause: bool) {
        let Ok(assignment) = self.consumer.assignment() else { return };
        let result = if pause { self.consumer.pause(&assignment) } else { self.consumer.resume(&assignment) };
        if let Err(e) = result {
            tracing::warn!(error = %e, pause, "pausing/resuming the assignment failed");
            return;
        }
        self.paused = pause;
        if !pause {
            // Resume exactly after the last message received, whatever librdkafka dropped from its queue.
            for ((topic, partition), next) in &self.next {
                if let Err(e) = self.consumer.seek(topic, *partition, Offset::Offset(*next), Duration::ZERO) {
                    tracing::debug!(error = %e, topic, partition, "seek on resume failed");
                }
            }
        }
    }

    /// Marks every message of `batch` as done: the next commit moves past them.
    pub fn done(&self, batch: &[OwnedMessage]) {
        let mut last: HashMap<(&str, i32), i64> = HashMap::new();
        for m in batch {
            let e = last.entry((m.topic(), m.partition())).or_insert(m.offset());
            *e = (*e).max(m.offset());
        }
        for ((topic, partition), offset) in last {
            // Fails when the partition was revoked meanwhile; its new owner redelivers, which is harmless.
            if let Err(e) = self.consumer.store_offset(topic, partition, offset) {
                tracing::debug!(error = %e, topic, partition, offset, "offset not stored");
            }
        }
    }

    /// Commits the stored offsets synchronously (at shutdown, before leaving the group).
    pub fn commit(&self) {
        match self.consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) | Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => {
                tracing::warn!(error = %e, "final offset commit failed; uncommitted messages will be redelivered")
            }
        }
    }
}

/// Capped exponential backoff with "equal jitter" (half fixed, half random): 100 ms doubling up to 10 s.
pub struct Backoff {
    attempt: u32,
}

impl Backoff {
    pub fn new() -> Self {
        Self { attempt: 0 }
    }

    pub fn next_delay(&mut self) -> Duration {
        let cap_ms = (100u64 << self.attempt.min(7)).min(10_000);
        self.attempt = self.attempt.saturating_add(1);
        // Jitter from the clock's sub-second nanoseconds: cheap, and enough to spread replicas apart.
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        Duration::from_millis(cap_ms / 2 + u64::from(nanos) % (cap_ms / 2 + 1))
    }

    /// Sleeps the next delay; `false` when `stop` came first.
    pub async fn wait(&mut self, stop: &CancellationToken) -> bool {
        let delay = self.next_delay();
        tokio::select! {
            _ = stop.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}

/// The value of header `key` in `msg`, if present and UTF-8 (the last one wins when repeated).
pub fn header<'a>(msg: &'a impl Message, key: &str) -> Option<&'a str> {
    use rdkafka::message::Headers;
    msg.headers()?.iter().filter(|h| h.key == key).last()?.value.and_then(|v| std::str::from_utf8(v).ok())
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
}
