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

/// The hot-path instruments' types (see [`Metrics::hot_histogram`]), and their children.
pub use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec};

/// Why the metrics pipeline could not be built or read.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("building the Prometheus exporter: {0}")]
    Exporter(String),
    #[error("encoding metrics: {0}")]
    Encode(#[from] prometheus::Error),
    #[error("registering metric {0}: {1}")]
    Register(String, prometheus::Error),
}

/// A service's meter provider and the registry its `/metrics` endpoint reads.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    provider: SdkMeterProvider,
    service: &'static str,
    /// The resource's `service.name` (the `service_name` label the exporter puts on every point).
    service_name: String,
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
        let resource = crate::telemetry::resource(service);
        let service_name =
            resource.get(&Key::from_static_str("service.name")).map_or_else(|| service.to_owned(), |v| v.to_string());
        let provider = SdkMeterProvider::builder().with_reader(exporter).with_resource(resource).build();
        opentelemetry::global::set_meter_provider(provider.clone());
        let metrics = Self { registry, provider, service, service_name };
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

    /// A histogram recorded on a hot path (every request), kept out of the OpenTelemetry SDK: the SDK hashes each
    /// call's attributes with SipHash and looks them up under a lock (about a thousand instructions a call, ~3%
    /// of the edge's work per request for its three per-request instruments); here a call is a hash of the label
    /// values (FNV) and a few atomic adds. It lands in the same registry, under its full Prometheus `name` (with
    /// the unit's suffix, as the exporter would write it), with the two labels the exporter puts on every point
    /// (`otel_scope_name`, `service_name`): dashboards and alerts cannot tell the difference.
    pub fn hot_histogram(
        &self,
        name: &str,
        help: &str,
        buckets: Vec<f64>,
        labels: &[&str],
    ) -> Result<HistogramVec, MetricsError> {
        let opts = prometheus::HistogramOpts::new(name, help).const_labels(self.exporter_labels()).buckets(buckets);
        self.register(name, HistogramVec::new(opts, labels))
    }

    /// A counter for a hot path, as [`Metrics::hot_histogram`] (`name` ends in `_total`).
    pub fn hot_counter(&self, name: &str, help: &str, labels: &[&str]) -> Result<IntCounterVec, MetricsError> {
        let opts = prometheus::Opts::new(name, help).const_labels(self.exporter_labels());
        self.register(name, IntCounterVec::new(opts, labels))
    }

    /// Registers a hot-path instrument `name` just built (or the error building it).
    fn register<C>(&self, name: &str, built: Result<C, prometheus::Error>) -> Result<C, MetricsError>
    where
        C: prometheus::core::Collector + Clone + 'static,
    {
        let error = |e| MetricsError::Register(name.to_owned(), e);
        let collector = built.map_err(error)?;
        self.registry.register(Box::new(collector.clone())).map_err(error)?;
        Ok(collector)
    }

    /// The labels the OpenTelemetry exporter adds to every point of this service's meter.
    fn exporter_labels(&self) -> std::collections::HashMap<String, String> {
        std::collections::HashMap::from([
            ("otel_scope_name".to_owned(), self.service.to_owned()),
            ("service_name".to_owned(), self.service_name.clone()),
        ])
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

    /// The labels of `family`'s first sample line in `text`, without `skip`, sorted.
    fn label_names(text: &str, family: &str, skip: &[&str]) -> Vec<String> {
        let line = text.lines().find(|l| l.starts_with(&format!("{family}{{"))).expect("a sample line");
        let inner = &line[line.find('{').expect("labels") + 1..line.rfind('}').expect("labels")];
        let mut names: Vec<String> = inner
            .split("\",")
            .filter_map(|pair| pair.split_once('=').map(|(k, v)| format!("{k}={}", v.trim_matches('"'))))
            .filter(|pair| !skip.iter().any(|s| pair.starts_with(&format!("{s}="))))
            .collect();
        names.sort();
        names
    }

    #[test]
    fn hot_instruments_carry_the_labels_the_exporter_gives_every_point() {
        let metrics = Metrics::new("unit").expect("metrics");
        let sdk = metrics.meter().f64_histogram("sdk.duration").with_unit("s").build();
        sdk.record(0.2, &[KeyValue::new("route", "a")]);
        let hot = metrics
            .hot_histogram("hot_duration_seconds", "A hot histogram", vec![0.1, 0.5], &["route"])
            .expect("hot histogram");
        hot.with_label_values(&["a"]).observe(0.2);
        hot.with_label_values(&["a"]).observe(0.05);
        let counter = metrics.hot_counter("hot_events_total", "Hot events", &["outcome"]).expect("hot counter");
        counter.with_label_values(&["ok"]).inc_by(4);
        let text = metrics.render().expect("render");
        let sdk_labels = label_names(&text, "sdk_duration_seconds_count", &[]);
        assert!(sdk_labels.contains(&"service_name=unit".to_owned()), "{text}");
        assert_eq!(label_names(&text, "hot_duration_seconds_count", &[]), sdk_labels, "{text}");
        assert_eq!(
            label_names(&text, "hot_events_total", &["outcome"]),
            label_names(&text, "sdk_duration_seconds_count", &["route"])
        );
        let value = |prefix: &str, having: &str| {
            let line = text.lines().find(|l| l.starts_with(prefix) && l.contains(having));
            line.and_then(|l| l.rsplit(' ').next()).map(str::to_owned)
        };
        assert_eq!(value("hot_duration_seconds_count{", "").as_deref(), Some("2"), "{text}");
        assert_eq!(value("hot_duration_seconds_bucket{", "le=\"0.1\"").as_deref(), Some("1"), "{text}");
        assert_eq!(value("hot_events_total{", "").as_deref(), Some("4"), "{text}");
        // A second instrument of the same name is refused (as two SDK instruments would be merged).
        assert!(metrics.hot_counter("hot_events_total", "again", &["outcome"]).is_err());
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
