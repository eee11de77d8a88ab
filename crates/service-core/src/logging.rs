//! Structured logs with `tracing`: human-readable text by default, one JSON object per line when asked
//! (what a log pipeline in Kubernetes wants). The filter follows `RUST_LOG` when set, else the configured level.

use serde::{Deserialize, Serialize};
use tracing_subscriber::EnvFilter;

/// Output format of the logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Logging settings, embedded in each service's configuration as `[log]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter directive such as `info` or `info,gateway=debug`; `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { format: LogFormat::Text, level: "info".into() }
    }
}

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init(config: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: a log file or a collector gets plain text (searchable `trace_id=...`).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(true).with_ansi(ansi);
    // A second init (tests that start a service twice in one process) keeps the first subscriber.
    let _ = match config.format {
        // The current span's fields (`trace_id`, `span_id` while handling a request or a message) go in `span`.
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).with_span_list(false).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
