//! The edge's configuration model. Defaults run the local stack; see `docs/configuration.md` for every key.
//! Environment overrides use the `EDGE_` prefix and `__` between levels (`EDGE_UPSTREAM__ADDRESS`).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use service_core::logging::LogConfig;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// HTTPS listener.
    pub listen: SocketAddr,
    /// Admin listener: `/healthz`, `/readyz`, `/metrics`.
    pub admin_listen: SocketAddr,
    /// Worker threads of the proxy service.
    pub threads: usize,
    /// `false` (the default): each worker thread runs its own single-threaded runtime, and a connection stays on
    /// the thread it was given (at random), as with nginx's workers; `true`: one runtime whose threads steal each
    /// other's tasks (Pingora's default), which costs synchronisation on every wake-up: 15% more CPU per request.
    pub work_stealing: bool,
    pub log: LogConfig,
    pub tls: TlsConfig,
    pub upstream: UpstreamConfig,
    pub shutdown: ShutdownConfig,
    /// Socket through which a new edge process takes the listeners over on `SIGQUIT` (zero-downtime upgrade).
    pub upgrade_sock: PathBuf,
    pub policy: PolicyConfig,
    pub redirect: RedirectConfig,
    /// One JSON line per request on stdout: time, client, method, path, status, bytes, upstream and its time,
    /// total time, rate-limit decision, request and trace ids.
    pub access_log: bool,
    pub limits: Limits,
}

/// What one client and one connection may take (nginx's `client_max_body_size`, `large_client_header_buffers`,
/// `client_header_timeout`, `client_body_timeout`, `send_timeout`, `keepalive_timeout`, `limit_conn`,
/// `worker_connections`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest request body, in bytes, where no route says otherwise: larger gets `413`.
    pub max_body_bytes: u64,
    /// Per path prefix (the longest matching prefix wins).
    pub routes: Vec<RouteBodyLimit>,
    /// Largest request head (request line and header fields), in bytes: larger gets `431`.
    pub max_header_bytes: usize,
    /// Most header fields in a request: more gets `431`.
    pub max_headers: usize,
    /// Time a new connection has, once its TLS handshake is done, to send its first complete request head: then
    /// it is closed without an answer, as nginx does. (The handshake itself has Pingora's fixed 60 s.)
    pub header_timeout_secs: u64,
    /// Longest pause between two reads of a request body (HTTP/1.1): then `408` and the connection closed.
    /// Keep it below `upstream.read_timeout_ms`.
    pub body_timeout_secs: u64,
    /// Longest pause while writing a response to the client.
    pub send_timeout_secs: u64,
    /// How long a connection is kept open after a request for another: its next complete request head must
    /// come within it, else it is closed without an answer.
    pub keepalive_timeout_secs: u64,
    /// Requests in flight per client key (the rate limits' client address); more get `429`. 0: no limit.
    pub max_requests_per_client: u32,
    /// Open connections, TLS handshakes included; beyond it new connections are closed before TLS.
    pub max_connections: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteBodyLimit {
    pub path_prefix: String,
    pub max_body_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 1024 * 1024,
            routes: Vec::new(),
            max_header_bytes: 32 * 1024,
            max_headers: 100,
            header_timeout_secs: 60,
            body_timeout_secs: 20,
            send_timeout_secs: 60,
            keepalive_timeout_secs: 75,
            max_requests_per_client: 100,
            max_connections: 10_000,
        }
    }
}

impl Limits {
    /// The limit for `path`.
    pub fn for_path(&self, path: &str) -> u64 {
        self.routes
            .iter()
            .filter(|r| path.starts_with(&r.path_prefix))
            .max_by_key(|r| r.path_prefix.len())
            .map_or(self.max_body_bytes, |r| r.max_body_bytes)
    }
}

/// An optional plain-HTTP listener that only redirects to HTTPS (nginx's `return 301 https://$host$request_uri`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedirectConfig {
    /// Where to listen for plain HTTP; unset: no such listener.
    pub listen: Option<SocketAddr>,
    /// The public HTTPS port put in `Location` (left out when 443, or when unset).
    pub https_port: Option<u16>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// Directory of `*.toml` rate-limit policy files.
    pub dir: PathBuf,
    /// How often the files are checked for changes (SIGHUP reloads at once).
    pub reload_interval_secs: u64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self { dir: PathBuf::from("policies"), reload_interval_secs: 2 }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: ([127, 0, 0, 1], 8443).into(),
            admin_listen: ([127, 0, 0, 1], 9101).into(),
            threads: 2,
            work_stealing: false,
            log: LogConfig::default(),
            tls: TlsConfig::default(),
            upstream: UpstreamConfig::default(),
            shutdown: ShutdownConfig::default(),
            upgrade_sock: PathBuf::from(".stack/edge-upgrade.sock"),
            policy: PolicyConfig::default(),
            redirect: RedirectConfig::default(),
            access_log: true,
            limits: Limits::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain (leaf first). When unset, a self-signed development certificate is used.
    pub cert_path: Option<PathBuf>,
    /// PEM private key of `cert_path`.
    pub key_path: Option<PathBuf>,
    /// Where the development certificate is generated (once) when no certificate is configured.
    pub dev_cert_dir: PathBuf,
    /// How often the certificate and key files are checked for changes (SIGHUP reloads at once).
    pub reload_interval_secs: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self { cert_path: None, key_path: None, dev_cert_dir: PathBuf::from(".stack/tls"), reload_interval_secs: 10 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// The gateway, as `host:port`, when `servers` is empty.
    pub address: String,
    /// The gateway instances, `host:port` each (a list, or one string separated by commas); names are resolved
    /// again every `resolve_interval_secs` (a Kubernetes headless Service).
    #[serde(deserialize_with = "string_list")]
    pub servers: Vec<String>,
    pub resolve_interval_secs: u64,
    pub balance: edge::upstream::Balance,
    pub health: edge::upstream::HealthConfig,
    /// Failures in a row (connect errors, resets, timeouts) that eject an instance ...
    pub max_fails: u32,
    /// ... for this long (or until an active check passes after it went unhealthy).
    pub fail_timeout_secs: u64,
    /// Instances a request may be tried on: a retry happens only when the request never reached the instance
    /// (connection failed) or its method is idempotent.
    pub max_tries: usize,
    pub connect_timeout_ms: u64,
    /// Longest wait for the upstream between two reads (a sync order waits up to the gateway's `sync.timeout_ms`).
    pub read_timeout_ms: u64,
    /// How long an idle keep-alive connection to an instance is kept for reuse.
    pub idle_timeout_secs: u64,
}

impl UpstreamConfig {
    /// `servers`, or `address` alone.
    pub fn server_list(&self) -> Vec<String> {
        if self.servers.is_empty() { vec![self.address.clone()] } else { self.servers.clone() }
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            address: "127.0.0.1:8080".into(),
            servers: Vec::new(),
            resolve_interval_secs: 5,
            balance: edge::upstream::Balance::default(),
            health: edge::upstream::HealthConfig::default(),
            max_fails: 3,
            fail_timeout_secs: 10,
            max_tries: 2,
            connect_timeout_ms: 1000,
            read_timeout_ms: 30_000,
            idle_timeout_secs: 60,
        }
    }
}

/// A list of strings from a TOML array or from one comma-separated string (an environment variable).
fn string_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        List(Vec<String>),
        One(String),
    }
    Ok(match Either::deserialize(d)? {
        Either::List(v) => v,
        Either::One(s) => s.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect(),
    })
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// After SIGTERM/SIGINT: how long requests in flight get to finish (keep it above the longest request: a
    /// sync order waits up to the gateway's `sync.timeout_ms`). Pingora cuts what still runs after it.
    pub grace_period_secs: u64,
    /// Then: how long the runtimes get to stop.
    pub timeout_secs: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self { grace_period_secs: 10, timeout_secs: 5 }
    }
}
