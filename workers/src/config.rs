//! The workers' configuration model. Defaults run the local stack; see `docs/configuration.md` for every key.
//! Environment overrides use the `WORKERS_` prefix and `__` between levels (`WORKERS_DATABASE__URL`).

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
    pub dlq_topic: String,
    /// librdkafka's `fetch.wait.max.ms`: the latency floor of a Kafka hop (Tansu sleeps about half of it).
    pub fetch_wait_max_ms: u32,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:19092".into(),
            group_prefix: "orders".into(),
            commands_topic: order_contract::topics::COMMANDS.into(),
            dlq_topic: order_contract::topics::DLQ.into(),
            fetch_wait_max_ms: 20,
        }
    }
}
