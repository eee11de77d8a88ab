//! Metrics through the OpenTelemetry SDK, read out in Prometheus text format by the admin listener.
//!
//! Each service builds one [`Metrics`] at start. Instruments are created from [`Metrics::meter`]; the exporter
//! renders them into the private registry that `/metrics` encodes (names follow Prometheus conventions: a counter
//! `http.server.requests` becomes `http_server_requests_total`).

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Meter, MeterProvider as _};
use opentelemetry_sdk::Resource;
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
    pub fn new(service: &'static str) -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .build()
            .map_err(|e| MetricsError::Exporter(e.to_string()))?;
        let resource = Resource::builder()
            .with_attributes([
                KeyValue::new("service.name", service),
                KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            ])
            .build();
        let provider = SdkMeterProvider::builder().with_reader(exporter).with_resource(resource).build();
        Ok(Self { registry, provider, service })
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
    }
}
