//! Metrics: instruments are OpenTelemetry's, read by a Prometheus registry that the admin
//! port serves as text at `/metrics`. One instrumentation, whichever way users collect it.

use opentelemetry::metrics::{Meter, MeterProvider as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use prometheus::{Encoder as _, TextEncoder};

/// The process's meter provider and the Prometheus registry that reads it.
#[derive(Clone, Debug)]
pub struct Metrics {
    provider: SdkMeterProvider,
    registry: prometheus::Registry,
}

/// Why metrics could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up metrics: {0}")]
pub struct MetricsError(String);

impl Metrics {
    /// Metrics for the service named `service` (`backstop-sidecar`, `backstop-operator`).
    pub fn new(service: &'static str) -> Result<Metrics, MetricsError> {
        let registry = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .without_target_info()
            .build()
            .map_err(|e| MetricsError(e.to_string()))?;
        let provider = SdkMeterProvider::builder()
            .with_resource(Resource::builder_empty().with_service_name(service).build())
            .with_reader(exporter)
            .build();
        Ok(Metrics { provider, registry })
    }

    /// A meter for instruments.
    pub fn meter(&self, name: &'static str) -> Meter {
        self.provider.meter(name)
    }

    /// Every metric in the Prometheus text format.
    pub fn prometheus_text(&self) -> String {
        let mut out = Vec::new();
        // Encoding gathered families into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::KeyValue;

    #[test]
    fn instruments_show_as_prometheus_text() {
        let metrics = Metrics::new("backstop-test").expect("metrics");
        let meter = metrics.meter("backstop");
        meter
            .u64_counter("backstop.test.things")
            .with_description("Things")
            .build()
            .add(3, &[KeyValue::new("kind", "a")]);
        let text = metrics.prometheus_text();
        assert!(text.contains("backstop_test_things_total{kind=\"a\",otel_scope_name=\"backstop\"} 3"), "{text}");
    }
}
