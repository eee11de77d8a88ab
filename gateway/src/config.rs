//! The gateway's configuration model. Defaults run the local stack; see `docs/configuration.md` for every key.
//! Environment overrides use the `GATEWAY_` prefix and `__` between levels (`GATEWAY_KAFKA__BROKERS`).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use service_core::db::DatabaseConfig;
use service_core::logging::LogConfig;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Traffic listener (HTTP; TLS ends at the edge).
    pub listen: SocketAddr,
    /// Admin listener: `/healthz`, `/readyz`, `/metrics`.
    pub admin_listen: SocketAddr,
    /// How long in-flight requests may take to finish after SIGTERM/SIGINT.
    pub shutdown_timeout_secs: u64,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
    pub log: LogConfig,
    pub auth: AuthConfig,
    pub kafka: KafkaConfig,
    /// The read side: `GET /v1/orders/{id}` (sessions are read-only).
    pub database: DatabaseConfig,
    pub sync: SyncConfig,
    /// Most order requests (publish, and for sync requests the wait) handled at once; beyond, `503` at once.
    pub max_in_flight: usize,
    pub idempotency: IdempotencyConfig,
}

/// `POST /v1/orders`: how long a request waits for the validation result.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyncConfig {
    /// After this, `504` with the order's id and `Location` (the order still goes on).
    pub timeout_ms: u64,
}

impl Default for SyncConfig {
    fn default() -> Self {
        Self { timeout_ms: 5_000 }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: ([127, 0, 0, 1], 8080).into(),
            admin_listen: ([127, 0, 0, 1], 9102).into(),
            shutdown_timeout_secs: 20,
            max_body_bytes: 64 * 1024,
            log: LogConfig::default(),
            auth: AuthConfig::default(),
            kafka: KafkaConfig::default(),
            database: DatabaseConfig::default(),
            sync: SyncConfig::default(),
            max_in_flight: 1024,
            idempotency: Default::default(),
        }
    }
}

/// `[idempotency]` in the gateway's configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdempotencyConfig {
    /// Honour `Idempotency-Key` (the table comes with the workers' migrations).
    pub enabled: bool,
    /// How long a key and its answer are kept; after that the same key starts a new order.
    pub ttl_secs: u64,
    /// Connections of the read-write pool that records keys (same `database.url` as the read side).
    pub pool_size: usize,
    /// How often expired keys are deleted.
    pub purge_interval_secs: u64,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        Self { enabled: true, ttl_secs: 24 * 3600, pool_size: 4, purge_interval_secs: 300 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Expected `iss` claim.
    pub issuer: String,
    /// Expected `aud` claim.
    pub audience: String,
    /// JWKS from a file (the local stack) ...
    pub jwks_file: Option<PathBuf>,
    /// ... or from a URL (Keycloak: `{issuer}/protocol/openid-connect/certs`). The URL wins over the others.
    pub jwks_url: Option<String>,
    /// ... or from the `jwks_uri` of the issuer's OIDC discovery document (`{issuer}/.well-known/openid-configuration`,
    /// whose `issuer` must equal `issuer`). Wins over `jwks_file`.
    pub discovery: bool,
    /// How often the key set is reloaded.
    pub jwks_refresh_secs: u64,
    /// A token signed by an unknown key reloads the set at once, but at most once per this many seconds.
    pub jwks_min_refresh_secs: u64,
    /// Clock skew tolerated on `exp` and `nbf`.
    pub leeway_secs: u64,
    /// Verified tokens remembered (until their `exp`, for the key set they were verified with); 0 turns it off.
    pub token_cache_size: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            issuer: "http://127.0.0.1:8080/dev-realm".into(),
            audience: "orders-api".into(),
            jwks_file: Some(PathBuf::from(".stack/jwks.json")),
            jwks_url: None,
            discovery: false,
            jwks_refresh_secs: 300,
            jwks_min_refresh_secs: 10,
            leeway_secs: 30,
            token_cache_size: 10_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    pub commands_topic: String,
    /// Where the validate job answers sync requests; every replica reads all of it.
    pub replies_topic: String,
    /// librdkafka `fetch.wait.max.ms` of the replies reader: the floor of a sync request's latency on Tansu.
    pub reply_fetch_wait_ms: u32,
    /// How long a publish may wait for the broker's acknowledgement before the request fails with 503.
    pub delivery_timeout_ms: u64,
    pub client_id: String,
    /// Extra librdkafka properties for the producer (e.g. `security.protocol`); `_` in a key stands for `.`.
    #[serde(deserialize_with = "service_core::config::scalar_map")]
    pub properties: std::collections::BTreeMap<String, String>,
}

impl KafkaConfig {
    /// A librdkafka configuration with `bootstrap.servers` and the extra `properties`.
    pub fn client(&self) -> rdkafka::ClientConfig {
        service_core::config::kafka_client(&self.brokers, &self.properties)
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:19092".into(),
            commands_topic: order_contract::topics::COMMANDS.into(),
            replies_topic: order_contract::topics::REPLIES.into(),
            reply_fetch_wait_ms: 10,
            delivery_timeout_ms: 10_000,
            client_id: "gateway".into(),
            properties: Default::default(),
        }
    }
}
