//! Export over OTLP (HTTP/protobuf), configured only by the standard `OTEL_*` variables:
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or the per-signal `..._TRACES_`, `..._METRICS_`, `..._LOGS_`
//! endpoints), `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`, and
//! `OTEL_SDK_DISABLED`. Nothing is exported unless an endpoint is set.
//!
//! Spans and log records go through a bounded queue ([`QUEUE`] of each) to one exporting task:
//! the request path only ever `try_send`s, so a slow or absent collector never slows a request,
//! and what does not fit (or fails to export) is dropped and counted in
//! `backstop.telemetry.dropped{signal}`. Metrics are read every `OTEL_METRIC_EXPORT_INTERVAL`
//! (60 s by default) from the same instruments the Prometheus `/metrics` serves.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry::InstrumentationScope;
use opentelemetry_otlp::WithHttpConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::logs::{LogBatch, LogExporter as _, LogProcessor, SdkLogRecord};
use opentelemetry_sdk::trace::{SpanData, SpanExporter as _};
use tokio::sync::mpsc;

/// How many spans, and how many log records, may wait for export.
pub const QUEUE: usize = 4096;
/// The most sent in one export.
const BATCH: usize = 512;
/// How long a batch waits to fill before it is sent anyway.
const LINGER: Duration = Duration::from_millis(500);

/// Telemetry that could not be exported, by signal.
#[derive(Debug, Default)]
pub struct Dropped {
    /// Spans.
    pub spans: AtomicU64,
    /// Log records.
    pub logs: AtomicU64,
    /// Metric exports.
    pub metrics: AtomicU64,
}

/// Whether an environment variable is set to something.
fn set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.trim().is_empty())
}

/// Whether the environment asks for export of a signal (`TRACES`, `METRICS`, `LOGS`).
pub fn wanted(signal: &str) -> bool {
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim().eq_ignore_ascii_case("true"));
    let exporter = std::env::var(format!("OTEL_{signal}_EXPORTER")).unwrap_or_default();
    !disabled
        && exporter.trim() != "none"
        && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set(&format!("OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")))
}

/// The resource of this process: the service (`OTEL_SERVICE_NAME` over `default`), the pod and
/// namespace when known, and `OTEL_RESOURCE_ATTRIBUTES`.
pub fn resource(default: &'static str) -> Resource {
    use opentelemetry::KeyValue;
    let mut attributes = Vec::new();
    for (variable, key) in
        [("POD_NAME", "k8s.pod.name"), ("POD_NAMESPACE", "k8s.namespace.name"), ("POD_UID", "k8s.pod.uid")]
    {
        if let Ok(value) = std::env::var(variable)
            && !value.is_empty()
        {
            attributes.push(KeyValue::new(key, value));
        }
    }
    attributes.push(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    let builder = Resource::builder().with_attributes(attributes);
    let builder = if set("OTEL_SERVICE_NAME") { builder } else { builder.with_service_name(default) };
    builder.build()
}

/// The HTTP client exports go through: hyper over rustls (the Mozilla roots), bounded by
/// `OTEL_EXPORTER_OTLP_TIMEOUT` (10 s by default).
fn http_client() -> opentelemetry_http::hyper::HyperClient<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
> {
    let timeout = std::env::var("OTEL_EXPORTER_OTLP_TIMEOUT")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(Duration::from_secs(10), Duration::from_millis);
    let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
        .unwrap_or_else(|_| {
            rustls::ClientConfig::builder().with_root_certificates(rustls::RootCertStore::empty()).with_no_client_auth()
        });
    let https = crate::net::client::https_connector(tls, Duration::from_secs(5));
    opentelemetry_http::hyper::HyperClient::new(https, timeout, None)
}

/// Where finished spans go.
#[derive(Clone, Debug)]
pub struct SpanSink {
    queue: mpsc::Sender<SpanData>,
    dropped: Arc<Dropped>,
}

impl SpanSink {
    /// Queues spans for export; what does not fit is counted and dropped.
    pub fn send(&self, spans: Vec<SpanData>) {
        for span in spans {
            if self.queue.try_send(span).is_err() {
                self.dropped.spans.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A sink whose spans land in `queue`, for tests.
    pub fn to(queue: mpsc::Sender<SpanData>, dropped: Arc<Dropped>) -> SpanSink {
        SpanSink { queue, dropped }
    }
}

/// Starts exporting spans over OTLP; `None` when the environment asks for none.
pub fn spans(resource: &Resource, dropped: Arc<Dropped>) -> Option<SpanSink> {
    if !wanted("TRACES") {
        return None;
    }
    let mut exporter =
        match opentelemetry_otlp::SpanExporter::builder().with_http().with_http_client(http_client()).build() {
            Ok(exporter) => exporter,
            Err(error) => {
                tracing::warn!(%error, "cannot export traces; check the OTEL_EXPORTER_OTLP_* settings");
                return None;
            }
        };
    exporter.set_resource(resource);
    let (queue, mut rx) = mpsc::channel::<SpanData>(QUEUE);
    let counter = dropped.clone();
    tokio::spawn(async move {
        let mut batch = Vec::with_capacity(BATCH);
        while let Some(first) = rx.recv().await {
            batch.push(first);
            let linger = tokio::time::sleep(LINGER);
            tokio::pin!(linger);
            while batch.len() < BATCH {
                tokio::select! {
                    next = rx.recv() => match next {
                        Some(span) => batch.push(span),
                        None => break,
                    },
                    () = &mut linger => break,
                }
            }
            let count = batch.len() as u64;
            if let Err(error) = exporter.export(std::mem::take(&mut batch)).await {
                counter.spans.fetch_add(count, Ordering::Relaxed);
                tracing::debug!(%error, count, "spans not exported");
            }
        }
    });
    Some(SpanSink { queue, dropped })
}

/// A log processor with a bounded queue, exporting from one task.
#[derive(Debug)]
pub struct QueuedLogs {
    queue: mpsc::Sender<(SdkLogRecord, InstrumentationScope)>,
    dropped: Arc<Dropped>,
}

impl LogProcessor for QueuedLogs {
    fn emit(&self, record: &mut SdkLogRecord, scope: &InstrumentationScope) {
        if self.queue.try_send((record.clone(), scope.clone())).is_err() {
            self.dropped.logs.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }
}

/// Starts exporting log records over OTLP; `None` when the environment asks for none.
pub fn logs(resource: &Resource, dropped: Arc<Dropped>) -> Option<QueuedLogs> {
    if !wanted("LOGS") {
        return None;
    }
    let mut exporter =
        match opentelemetry_otlp::LogExporter::builder().with_http().with_http_client(http_client()).build() {
            Ok(exporter) => exporter,
            Err(error) => {
                tracing::warn!(%error, "cannot export logs; check the OTEL_EXPORTER_OTLP_* settings");
                return None;
            }
        };
    exporter.set_resource(resource);
    let (queue, mut rx) = mpsc::channel::<(SdkLogRecord, InstrumentationScope)>(QUEUE);
    let counter = dropped.clone();
    tokio::spawn(async move {
        let mut batch = Vec::with_capacity(BATCH);
        while let Some(first) = rx.recv().await {
            batch.push(first);
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(record) => batch.push(record),
                    Err(_) => break,
                }
            }
            let refs: Vec<(&SdkLogRecord, &InstrumentationScope)> = batch.iter().map(|(r, s)| (r, s)).collect();
            if let Err(error) = exporter.export(LogBatch::new(&refs)).await {
                counter.logs.fetch_add(batch.len() as u64, Ordering::Relaxed);
                tracing::debug!(%error, count = batch.len(), "log records not exported");
            }
            batch.clear();
        }
    });
    Some(QueuedLogs { queue, dropped })
}

/// An OTLP metric exporter that counts failed exports, or `None`.
pub fn metrics(dropped: Arc<Dropped>) -> Option<CountingMetrics> {
    if !wanted("METRICS") {
        return None;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::warn!("cannot export metrics outside the async runtime");
        return None;
    };
    match opentelemetry_otlp::MetricExporter::builder().with_http().with_http_client(http_client()).build() {
        Ok(inner) => Some(CountingMetrics { inner, dropped, runtime }),
        Err(error) => {
            tracing::warn!(%error, "cannot export metrics; check the OTEL_EXPORTER_OTLP_* settings");
            None
        }
    }
}

/// A future polled inside `runtime`'s context (from a thread of the SDK's own).
struct InRuntime<'a, T> {
    runtime: &'a tokio::runtime::Handle,
    future: std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>,
}

impl<T> std::future::Future for InRuntime<'_, T> {
    type Output = T;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<T> {
        let _entered = self.runtime.enter();
        self.future.as_mut().poll(cx)
    }
}

/// The OTLP metric exporter, counting the exports that fail.
#[derive(Debug)]
pub struct CountingMetrics {
    inner: opentelemetry_otlp::MetricExporter,
    dropped: Arc<Dropped>,
    /// The SDK's reader exports from a thread of its own; the HTTP client needs the runtime.
    runtime: tokio::runtime::Handle,
}

impl opentelemetry_sdk::metrics::exporter::PushMetricExporter for CountingMetrics {
    async fn export(&self, metrics: &opentelemetry_sdk::metrics::data::ResourceMetrics) -> OTelSdkResult {
        let result = InRuntime { runtime: &self.runtime, future: Box::pin(self.inner.export(metrics)) }.await;
        if result.is_err() {
            self.dropped.metrics.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn temporality(&self) -> opentelemetry_sdk::metrics::Temporality {
        self.inner.temporality()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let dropped = Arc::new(Dropped::default());
        let (tx, _rx) = mpsc::channel(2);
        let sink = SpanSink::to(tx, dropped.clone());
        let span = crate::testing::span_data();
        sink.send(vec![span.clone(), span.clone(), span.clone(), span]);
        assert_eq!(dropped.spans.load(Ordering::Relaxed), 2);
    }
}
