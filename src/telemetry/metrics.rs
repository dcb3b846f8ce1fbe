//! Metrics: instruments are OpenTelemetry's, read by a Prometheus registry that the admin
//! port serves as text at `/metrics`, and pushed over OTLP when the `OTEL_*` settings ask for
//! it ([`super::otlp`]). One instrumentation, whichever way users collect it.

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Meter, MeterProvider as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{InstrumentKind, Pipeline, SdkMeterProvider, Temporality};
use prometheus::{Encoder as _, TextEncoder};
use std::sync::Arc;

use super::otlp::{self, Exports};

/// The process's meter provider and the Prometheus registry that reads it.
#[derive(Clone, Debug)]
pub struct Metrics {
    provider: SdkMeterProvider,
    registry: prometheus::Registry,
    resource: Resource,
    exports: Arc<Exports>,
}

/// The Prometheus exporter's reader, shared by the meter provider and the OTLP push.
#[derive(Clone, Debug)]
struct Shared(Arc<opentelemetry_prometheus::PrometheusExporter>);

impl MetricReader for Shared {
    fn register_pipeline(&self, pipeline: std::sync::Weak<Pipeline>) {
        self.0.register_pipeline(pipeline);
    }

    fn collect(&self, metrics: &mut ResourceMetrics) -> OTelSdkResult {
        self.0.collect(metrics)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: std::time::Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn temporality(&self, kind: InstrumentKind) -> Temporality {
        self.0.temporality(kind)
    }
}

/// Why metrics could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up metrics: {0}")]
pub struct MetricsError(String);

impl Metrics {
    /// Metrics for the service named `service` (`backstop-sidecar`, `backstop-operator`):
    /// Prometheus text always, OTLP when the environment asks.
    pub fn new(service: &'static str) -> Result<Metrics, MetricsError> {
        let registry = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .without_target_info()
            .build()
            .map_err(|e| MetricsError(e.to_string()))?;
        let resource = otlp::resource(service);
        let exports = Arc::new(Exports::default());
        // One reader, so one aggregation: the Prometheus endpoint and the OTLP push read the
        // same cells (a second reader would record every measurement twice).
        let reader = Shared(Arc::new(exporter));
        let mut builder = SdkMeterProvider::builder().with_resource(resource.clone()).with_reader(reader.clone());
        match otlp::metrics(exports.clone()) {
            Some(otlp::MetricsExport::Pushed(exporter)) => otlp::push_metrics(reader, *exporter, exports.clone()),
            Some(otlp::MetricsExport::OwnReader(periodic)) => builder = builder.with_reader(periodic),
            None => {}
        }
        let provider = builder.build();
        let metrics = Metrics { provider, registry, resource, exports };
        let meter = metrics.meter("backstop");
        let state = metrics.exports.clone();
        meter
            .u64_observable_counter("backstop.telemetry.dropped")
            .with_description("Telemetry not exported: spans and log records that did not fit the queue or failed to export, and failed metric exports")
            .with_callback(move |observer| {
                for signal in state.each() {
                    observer.observe(signal.dropped(), &[KeyValue::new("signal", signal.name())]);
                }
            })
            .build();
        let state = metrics.exports.clone();
        meter
            .u64_observable_gauge("backstop.telemetry.export_failing")
            .with_description(
                "1 while a signal's exports to the OTLP collector fail (absent for a signal not exported)",
            )
            .with_callback(move |gauge| {
                for signal in state.each().into_iter().filter(|s| s.on()) {
                    gauge.observe(u64::from(signal.failing()), &[KeyValue::new("signal", signal.name())]);
                }
            })
            .build();
        Ok(metrics)
    }

    /// Registers `backstop.runtime.tasks`, the tasks alive on the current tokio runtime: what a
    /// soak watches stay flat.
    pub fn runtime_tasks(&self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        self.meter("backstop")
            .u64_observable_gauge("backstop.runtime.tasks")
            .with_description("Tasks alive on the process's async runtime")
            .with_callback(move |gauge| gauge.observe(runtime.metrics().num_alive_tasks() as u64, &[]))
            .build();
    }

    /// The process's resource (service, pod, namespace).
    pub fn resource(&self) -> &Resource {
        &self.resource
    }

    /// Each signal's export state: on, failing, dropped.
    pub fn exports(&self) -> Arc<Exports> {
        self.exports.clone()
    }

    /// Exports what every signal holds now, waiting at most `timeout` ([`Exports::flush`]);
    /// whether everything was tried in time. For a process on its way out.
    pub async fn flush(&self, timeout: std::time::Duration) -> bool {
        // A reader of its own (delta temporality) exports from its own thread when flushed.
        let provider = self.provider.clone();
        let own = tokio::task::spawn_blocking(move || provider.force_flush().is_ok());
        let queued = self.exports.flush(timeout).await;
        let own = tokio::time::timeout(timeout, own).await.is_ok_and(|done| done.unwrap_or(false));
        queued && own
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
