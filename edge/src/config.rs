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
    pub log: LogConfig,
    pub tls: TlsConfig,
    pub upstream: UpstreamConfig,
    pub shutdown: ShutdownConfig,
    /// Socket through which a new edge process takes the listeners over on `SIGQUIT` (zero-downtime upgrade).
    pub upgrade_sock: PathBuf,
    pub policy: PolicyConfig,
    pub redirect: RedirectConfig,
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
            log: LogConfig::default(),
            tls: TlsConfig::default(),
            upstream: UpstreamConfig::default(),
            shutdown: ShutdownConfig::default(),
            upgrade_sock: PathBuf::from(".stack/edge-upgrade.sock"),
            policy: PolicyConfig::default(),
            redirect: RedirectConfig::default(),
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
    /// The gateway, as `host:port`.
    pub address: String,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self { address: "127.0.0.1:8080".into() }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// After SIGTERM/SIGINT: how long to keep serving established connections before closing down.
    pub grace_period_secs: u64,
    /// Then: how long the runtimes get to finish what is in flight.
    pub timeout_secs: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self { grace_period_secs: 2, timeout_secs: 10 }
    }
}
