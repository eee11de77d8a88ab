//! The operational plumbing every service of the stack shares, so that the edge, the gateway and the workers
//! are configured, observed and stopped the same way:
//!
//! - [`config`]: one typed model per service, filled from defaults, an optional TOML file and environment
//!   variables (in that order of precedence, the last winning);
//! - [`logging`]: `tracing` output as text or JSON;
//! - [`metrics`]: an OpenTelemetry meter provider exported in Prometheus text format;
//! - [`admin`]: the admin listener (`/healthz`, `/readyz`, `/metrics`), separate from the traffic port;
//! - [`shutdown`]: SIGTERM and SIGINT turned into one cancellation token;
//! - [`telemetry`]: OpenTelemetry traces exported over OTLP, and W3C trace-context propagation;
//! - [`problem`]: RFC 9457 problem details, the error body of every HTTP answer we produce;
//! - `db` (feature `postgres`): database settings and connection pools;
//! - `kafka` (feature `kafka`): when a producer must be replaced.

pub mod admin;
pub mod config;
#[cfg(feature = "postgres")]
pub mod db;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod logging;
pub mod metrics;
pub mod problem;
pub mod shutdown;
pub mod telemetry;
