//! Metrics through the OpenTelemetry SDK, read out in Prometheus text format by the admin listener.
//!
//! Each service builds one [`Metrics`] at start. Instruments are created from [`Metrics::meter`]; the exporter
//! renders them into the private registry that `/metrics` encodes (names follow Prometheus conventions: a counter
//! `http.server.requests` becomes `http_server_requests_total`).

use std::collections::HashSet;
use std::sync::OnceLock;

use opentelemetry::metrics::{Counter, Meter, MeterProvider as _};
use opentelemetry::{Key, KeyValue};
use opentelemetry_prometheus::ResourceSelector;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use prometheus::{Encoder, Registry, TextEncoder};

/// Why the metrics pipeline could not be built or read.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("building the Prometheus exporter: {0}")]
    Exporter(String),
    #[error("encoding metrics: {0}")]
    Encode(#[from] prometheus::Error),
}

/// A service's meter provider and the registry its `/metrics` endpoint reads.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    provider: SdkMeterProvider,
    service: &'static str,
}

impl Metrics {
    /// Builds the pipeline for `service` (used as the meter name and the `service.name` resource attribute).
    /// Builds the pipeline for `service` (the meter name; also the `service.name` resource attribute unless
    /// `OTEL_SERVICE_NAME` says otherwise). Every point carries a `service_name` label, so that dashboards and
    /// alerts can tell the services apart however Prometheus names its scrape jobs. The provider also becomes
    /// the global one, for instruments shared by several services (database statements, messages sent).
    pub fn new(service: &'static str) -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .with_resource_selector(ResourceSelector::KeyAllowList(HashSet::from([Key::from("service.name")])))
            .build()
            .map_err(|e| MetricsError::Exporter(e.to_string()))?;
        let provider = SdkMeterProvider::builder()
            .with_reader(exporter)
            .with_resource(crate::telemetry::resource(service))
            .build();
        opentelemetry::global::set_meter_provider(provider.clone());
        let metrics = Self { registry, provider, service };
        metrics.observe_process();
        Ok(metrics)
    }

    /// `process.cpu.time` (seconds of CPU, user and system) and `process.memory.usage` (resident bytes), read
    /// from `/proc/self/stat` at each scrape: CPU and memory per service on the dashboards.
    fn observe_process(&self) {
        let meter = self.meter();
        meter
            .f64_observable_counter("process.cpu.time")
            .with_unit("s")
            .with_description("CPU time used by the process")
            .with_callback(|obs| {
                if let Some(stat) = ProcStat::read() {
                    obs.observe(stat.user_secs, &[KeyValue::new("cpu.mode", "user")]);
                    obs.observe(stat.system_secs, &[KeyValue::new("cpu.mode", "system")]);
                }
            })
            .build();
        meter
            .i64_observable_gauge("process.memory.usage")
            .with_unit("By")
            .with_description("Resident memory of the process")
            .with_callback(|obs| {
                if let Some(stat) = ProcStat::read() {
                    obs.observe(stat.rss_bytes, &[]);
                }
            })
            .build();
    }

    /// `service.readiness{check}`: 1 while a readiness check passes, 0 while it fails.
    pub fn observe_readiness(&self, readiness: &crate::admin::Readiness) {
        let readiness = readiness.clone();
        self.meter()
            .i64_observable_gauge("service.readiness")
            .with_description("1 while the readiness check passes")
            .with_callback(move |obs| {
                for (check, ok) in readiness.checks() {
                    obs.observe(i64::from(ok), &[KeyValue::new("check", check)]);
                }
            })
            .build();
    }

    /// The meter that a service's instruments come from.
    pub fn meter(&self) -> Meter {
        self.provider.meter(self.service)
    }

    /// The current values in Prometheus text exposition format.
    pub fn render(&self) -> Result<String, MetricsError> {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

/// Counts from `/proc/self/stat` (Linux); `None` elsewhere.
struct ProcStat {
    user_secs: f64,
    system_secs: f64,
    rss_bytes: i64,
}

impl ProcStat {
    fn read() -> Option<Self> {
        let text = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The command name (field 2) may hold spaces: the fields after it follow the last ')'.
        let rest = &text[text.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // Fields 14, 15 (utime, stime in clock ticks) and 24 (rss in pages), counted from 1 with pid and comm.
        let (utime, stime, rss) = (fields.get(11)?, fields.get(12)?, fields.get(21)?);
        // SAFETY: sysconf only reads system constants.
        let (ticks, page) = unsafe { (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE)) };
        if ticks <= 0 || page <= 0 {
            return None;
        }
        Some(Self {
            user_secs: utime.parse::<f64>().ok()? / ticks as f64,
            system_secs: stime.parse::<f64>().ok()? / ticks as f64,
            rss_bytes: rss.parse::<i64>().ok()?.saturating_mul(page),
        })
    }
}

/// `messaging.client.sent.messages{messaging.destination.name, error.type}`: a message produced to a topic, or
/// the failure to do so (the broker did not acknowledge it).
pub fn message_sent(topic: &str, error: Option<&'static str>) {
    static SENT: OnceLock<Counter<u64>> = OnceLock::new();
    let counter = SENT.get_or_init(|| {
        opentelemetry::global::meter("messaging")
            .u64_counter("messaging.client.sent.messages")
            .with_description("Messages produced to Kafka, per topic")
            .with_unit("{message}")
            .build()
    });
    let mut attrs =
        vec![KeyValue::new("messaging.system", "kafka"), KeyValue::new("messaging.destination.name", topic.to_owned())];
    if let Some(e) = error {
        attrs.push(KeyValue::new("error.type", e));
    }
    counter.add(1, &attrs);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_counter_appears_with_prometheus_naming() {
        let metrics = Metrics::new("unit").expect("metrics");
        let counter = metrics.meter().u64_counter("orders.accepted").build();
        counter.add(3, &[KeyValue::new("outcome", "ok")]);
        let text = metrics.render().expect("render");
        assert!(text.contains("orders_accepted_total{"), "{text}");
        assert!(text.contains("outcome=\"ok\""), "{text}");
        assert!(text.lines().any(|l| l.starts_with("orders_accepted_total") && l.ends_with(" 3")), "{text}");
        assert!(text.contains("service_name=\"unit\""), "every point names its service: {text}");
        let cpu = text.lines().find(|l| l.starts_with("process_cpu_time_seconds_total{") && l.contains("user"));
        assert!(cpu.is_some_and(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).is_some()), "{text}");
        let rss = text.lines().find(|l| l.starts_with("process_memory_usage_bytes{"));
        assert!(rss.and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).is_some_and(|b| b > 1e6), "{text}");
    }

    #[test]
    fn readiness_is_a_gauge_per_check() {
        let metrics = Metrics::new("unit").expect("metrics");
        let readiness = crate::admin::Readiness::new(&["database", "kafka"]);
        metrics.observe_readiness(&readiness);
        readiness.set("kafka", true);
        let text = metrics.render().expect("render");
        let value = |check: &str| {
            text.lines()
                .find(|l| l.starts_with("service_readiness{") && l.contains(&format!("check=\"{check}\"")))
                .and_then(|l| l.rsplit(' ').next())
                .map(str::to_owned)
        };
        assert_eq!(value("kafka").as_deref(), Some("1"), "{text}");
        assert_eq!(value("database").as_deref(), Some("0"), "{text}");
    }
}
