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

/// Keeps the log writer thread; dropping it flushes what is queued. Hold it until `main` returns.
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    _writer: Option<tracing_appender::non_blocking::WorkerGuard>,
}

/// How log lines reach stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writer {
    /// From a thread of their own (tracing-appender's non-blocking writer): a request never waits for the
    /// write(2) of its line, which cost about a third of the gateway's CPU per order when done inline. The queue
    /// holds 128k lines; when full, writers wait rather than drop lines. Lines still queued when the process
    /// exits without dropping the guard are lost.
    Background,
    /// Written by the thread that logs: for a process that ends with `process::exit` (Pingora's server).
    Inline,
}

/// Installs the global subscriber. Call once, first thing in `main`, and keep the guard until `main` returns.
pub fn init(config: &LogConfig, writer: Writer) -> LogGuard {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: a log file or a collector gets plain text (searchable `trace_id=...`).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let (writer, guard) = match writer {
        Writer::Background => {
            let (w, g) =
                tracing_appender::non_blocking::NonBlockingBuilder::default().lossy(false).finish(std::io::stdout());
            (tracing_subscriber::fmt::writer::BoxMakeWriter::new(w), Some(g))
        }
        Writer::Inline => (tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::io::stdout), None),
    };
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_target(true).with_ansi(ansi).with_writer(writer);
    // A second init (tests that start a service twice in one process) keeps the first subscriber.
    let installed = match config.format {
        // The current span's fields (`trace_id`, `span_id` while handling a request or a message) go in `span`.
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).with_span_list(false).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    LogGuard { _writer: guard.filter(|_| installed.is_ok()) }
}
