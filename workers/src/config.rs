//! The workers' configuration model. Defaults run the local stack; see `docs/configuration.md` for every key.
//! Environment overrides use the `WORKERS_` prefix and `__` between levels (`WORKERS_DATABASE__URL`).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use service_core::db::DatabaseConfig;
use service_core::logging::LogConfig;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Admin listener: `/healthz`, `/readyz`, `/metrics`.
    pub admin_listen: SocketAddr,
    pub log: LogConfig,
    pub database: DatabaseConfig,
    pub kafka: KafkaConfig,
    /// Jobs `workers run` starts when none is named on the command line.
    pub jobs: Vec<String>,
    pub batch: BatchConfig,
    pub rules: RulesConfig,
    pub retention: RetentionConfig,
    /// Run the pending migrations at start (else run `workers migrate` first).
    pub migrate_on_start: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            admin_listen: ([127, 0, 0, 1], 9103).into(),
            log: LogConfig::default(),
            database: DatabaseConfig::default(),
            kafka: KafkaConfig::default(),
            jobs: vec!["validate".into(), "persist".into()],
            batch: BatchConfig::default(),
            rules: RulesConfig::default(),
            retention: RetentionConfig::default(),
            migrate_on_start: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Consumer groups are `{group_prefix}.{job}`.
    pub group_prefix: String,
    pub commands_topic: String,
    pub validated_topic: String,
    pub replies_topic: String,
    pub dlq_topic: String,
    /// librdkafka's `fetch.wait.max.ms`: the latency floor of a Kafka hop (Tansu sleeps about half of it).
    pub fetch_wait_max_ms: u32,
    /// librdkafka's `session.timeout.ms`: how long a crashed member holds its partitions.
    pub session_timeout_ms: u32,
    /// How often consumer lag is refreshed (librdkafka's `statistics.interval.ms`).
    pub stats_interval_ms: u32,
    /// Extra librdkafka properties for every client (e.g. `security.protocol`, `sasl.mechanism`, `debug`);
    /// `_` in a key stands for `.`.
    #[serde(deserialize_with = "service_core::config::scalar_map")]
    pub properties: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:19092".into(),
            group_prefix: "orders".into(),
            commands_topic: order_contract::topics::COMMANDS.into(),
            validated_topic: order_contract::topics::VALIDATED.into(),
            replies_topic: order_contract::topics::REPLIES.into(),
            dlq_topic: order_contract::topics::DLQ.into(),
            fetch_wait_max_ms: 20,
            session_timeout_ms: 10_000,
            stats_interval_ms: 5_000,
            properties: BTreeMap::new(),
        }
    }
}

impl KafkaConfig {
    /// A librdkafka configuration with `bootstrap.servers` and the extra `properties`.
    pub fn client(&self) -> rdkafka::ClientConfig {
        service_core::config::kafka_client(&self.brokers, &self.properties)
    }

    /// An idempotent producer's configuration: `defaults`, then the extra `properties` (which may change e.g.
    /// `message.timeout.ms`), then what the jobs' guarantees rest on, which no property can turn off:
    /// `enable.idempotence=true` and `acks=all`.
    pub fn idempotent_producer(&self, defaults: &[(&str, &str)]) -> rdkafka::ClientConfig {
        let mut config = rdkafka::ClientConfig::new();
        for (k, v) in defaults {
            config.set(*k, *v);
        }
        for (k, v) in self.client().config_map() {
            config.set(k, v);
        }
        config.set("enable.idempotence", "true").set("acks", "all");
        config
    }
}

/// How consecutive messages are grouped into one unit of work (one transaction for `persist`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchConfig {
    /// Most messages in one batch; also the most read ahead while a batch is applied.
    pub max_messages: usize,
    /// How long to wait for more messages once the first one arrived.
    pub linger_ms: u64,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self { max_messages: 500, linger_ms: 5 }
    }
}

/// The validate job's business limits (the rules themselves are listed in the README).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RulesConfig {
    /// Accepted ISO 4217 currency codes.
    pub currencies: Vec<String>,
    /// Most lines in an order.
    pub max_items: usize,
    /// Largest order total, in cents.
    pub max_total_cents: i64,
}

impl Default for RulesConfig {
    fn default() -> Self {
        Self {
            currencies: ["EUR", "USD", "GBP", "CHF", "SEK", "NOK", "DKK", "PLN", "CZK", "JPY", "CAD", "AUD"]
                .map(String::from)
                .to_vec(),
            max_items: 100,
            max_total_cents: 10_000_000,
        }
    }
}

/// What the retention task of `persist` deletes, and how often it runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    pub interval_secs: u64,
    /// Inbox rows older than this are deleted; keep it longer than the topics' retention, or a replay from the
    /// beginning of a topic could apply old events again. 0 keeps them forever.
    pub processed_events_days: u32,
    /// Status history rows older than this are deleted (the order keeps its current status). 0 keeps them.
    pub history_days: u32,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self { interval_secs: 3600, processed_events_days: 14, history_days: 0 }
    }
}
