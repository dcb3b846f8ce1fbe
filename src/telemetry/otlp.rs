//! Export over OTLP (HTTP/protobuf), configured only by the standard `OTEL_*` variables:
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or the per-signal `..._TRACES_`, `..._METRICS_`, `..._LOGS_`
//! endpoints), `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`, and
//! `OTEL_SDK_DISABLED`. Nothing is exported unless an endpoint is set.
//!
//! Spans and log records go through a bounded queue ([`QUEUE`] of each) to one exporting task:
//! the request path only ever `try_send`s, so a slow or absent collector never slows a request,
//! and what does not fit (or fails to export) is dropped and counted in
//! `backstop.telemetry.dropped{signal}`. Metrics are pushed every `OTEL_METRIC_EXPORT_INTERVAL`
//! (60 s by default) from the one aggregation the Prometheus `/metrics` serves.
//!
//! A failing collector is told once, not once per batch: [`Exports`] keeps each signal's state,
//! logs one warning when its exports start failing and one line when they recover, and is what
//! `/health` and `backstop.telemetry.export_failing{signal}` show.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry::InstrumentationScope;
use opentelemetry_otlp::WithHttpConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::logs::{LogBatch, LogExporter as _, LogProcessor, SdkLogRecord};
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{PeriodicReader, Temporality};
use opentelemetry_sdk::trace::{SpanData, SpanExporter as _};
use tokio::sync::mpsc;

/// How many spans, and how many log records, may wait for export.
pub const QUEUE: usize = 4096;
/// The most sent in one export.
const BATCH: usize = 512;
/// How long a batch waits to fill before it is sent anyway.
const LINGER: Duration = Duration::from_millis(500);

/// One signal's export: whether it is on, whether its last export failed, and what it dropped.
#[derive(Debug)]
pub struct SignalExport {
    name: &'static str,
    /// Where its exports go (scheme, host and port only: a URL may carry credentials).
    collector: std::sync::OnceLock<String>,
    on: AtomicBool,
    failing: AtomicBool,
    dropped: AtomicU64,
    /// What was dropped when the exports started failing, to say how much the outage cost.
    dropped_before: AtomicU64,
}

impl SignalExport {
    const fn new(name: &'static str) -> SignalExport {
        SignalExport {
            name,
            collector: std::sync::OnceLock::new(),
            on: AtomicBool::new(false),
            failing: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
            dropped_before: AtomicU64::new(0),
        }
    }

    /// The signal's name: `spans`, `logs` or `metrics`.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Whether an exporter runs for this signal.
    pub fn on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// Whether the last export failed.
    pub fn failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }

    /// Spans or log records (metric exports, for metrics) not exported since the start.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn started(&self, signal: &str) {
        let _ = self.collector.set(collector(signal));
        self.on.store(true, Ordering::Relaxed);
    }

    /// Counts `count` items that did not fit the queue.
    fn overflowed(&self, count: u64) {
        self.dropped.fetch_add(count, Ordering::Relaxed);
    }

    /// An export of `count` items failed: they are dropped. The first failure after a success
    /// says so at warning level; the ones after it only at debug.
    fn failed(&self, error: &dyn std::fmt::Display, count: u64) {
        let before = self.dropped.fetch_add(count, Ordering::Relaxed);
        if self.failing.swap(true, Ordering::Relaxed) {
            tracing::debug!(signal = self.name, %error, count, "telemetry not exported");
        } else {
            self.dropped_before.store(before, Ordering::Relaxed);
            tracing::warn!(
                signal = self.name,
                collector = self.collector.get().map_or("", String::as_str),
                %error,
                "cannot export telemetry over OTLP: dropping it until the collector answers \
                 (counted in backstop_telemetry_dropped and /health; said once)"
            );
        }
    }

    /// An export went through: the first after failures says the collector is back.
    fn succeeded(&self) {
        if self.failing.swap(false, Ordering::Relaxed) {
            let lost = self.dropped().saturating_sub(self.dropped_before.load(Ordering::Relaxed));
            tracing::info!(signal = self.name, dropped = lost, "exporting telemetry over OTLP again");
        }
    }
}

/// The export state of every signal.
#[derive(Debug)]
pub struct Exports {
    /// Spans.
    pub spans: SignalExport,
    /// Log records.
    pub logs: SignalExport,
    /// Metric exports.
    pub metrics: SignalExport,
    /// Each exporting task's channel for flush requests.
    flushes: parking_lot::Mutex<Vec<mpsc::Sender<Flush>>>,
}

/// A request to export what a task holds now, answered once the export was tried.
type Flush = tokio::sync::oneshot::Sender<()>;

impl Default for Exports {
    fn default() -> Exports {
        Exports {
            spans: SignalExport::new("spans"),
            logs: SignalExport::new("logs"),
            metrics: SignalExport::new("metrics"),
            flushes: parking_lot::Mutex::default(),
        }
    }
}

impl Exports {
    /// Each signal in turn.
    pub fn each(&self) -> [&SignalExport; 3] {
        [&self.spans, &self.logs, &self.metrics]
    }

    /// The channel an exporting task hears flush requests on.
    fn flush_requests(&self) -> mpsc::Receiver<Flush> {
        let (tx, rx) = mpsc::channel(1);
        self.flushes.lock().push(tx);
        rx
    }

    /// Has every exporting task export what it holds now (queued spans and log records, the
    /// metrics since the last push), waiting at most `timeout` for all of them; whether they all
    /// finished in time. A process calls it on its way out, so that the end of its life (the
    /// requests it drained, the last interval's metrics) is not lost.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let tasks = self.flushes.lock().clone();
        let flushed = async {
            let mut done = Vec::with_capacity(tasks.len());
            for task in tasks {
                let (ask, answer) = tokio::sync::oneshot::channel();
                if task.send(ask).await.is_ok() {
                    done.push(answer);
                }
            }
            for answer in done {
                let _ = answer.await;
            }
        };
        tokio::time::timeout(timeout, flushed).await.is_ok()
    }
}

/// Where a signal (`TRACES`, `METRICS`, `LOGS`) is exported, as [`scheme_host_port`] says it.
fn collector(signal: &str) -> String {
    let endpoint = std::env::var(format!("OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"))
        .ok()
        .filter(|v| !v.trim().is_empty())
        .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok())
        .unwrap_or_default();
    scheme_host_port(&endpoint)
}

/// An endpoint's scheme, host and port: what a log line may say of it (its user information,
/// path and query may carry credentials).
fn scheme_host_port(endpoint: &str) -> String {
    let Ok(uri) = endpoint.trim().parse::<http::Uri>() else { return "an endpoint that is no URL".to_string() };
    match (uri.scheme_str(), uri.host(), uri.port_u16()) {
        (Some(scheme), Some(host), Some(port)) => format!("{scheme}://{host}:{port}"),
        (Some(scheme), Some(host), None) => format!("{scheme}://{host}"),
        _ => "an endpoint that is no URL".to_string(),
    }
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
    exports: Arc<Exports>,
}

impl SpanSink {
    /// Queues spans for export; what does not fit is counted and dropped.
    pub fn send(&self, spans: Vec<SpanData>) {
        for span in spans {
            if self.queue.try_send(span).is_err() {
                self.exports.spans.overflowed(1);
            }
        }
    }

    /// A sink whose spans land in `queue`, for tests.
    pub fn to(queue: mpsc::Sender<SpanData>, exports: Arc<Exports>) -> SpanSink {
        SpanSink { queue, exports }
    }
}

/// Starts exporting spans over OTLP; `None` when the environment asks for none.
pub fn spans(resource: &Resource, exports: Arc<Exports>) -> Option<SpanSink> {
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
    exports.spans.started("TRACES");
    let state = exports.clone();
    let mut flushes = exports.flush_requests();
    tokio::spawn(async move {
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            let mut flush = None;
            tokio::select! {
                first = rx.recv() => match first {
                    Some(span) => batch.push(span),
                    None => return,
                },
                Some(ask) = flushes.recv() => flush = Some(ask),
            }
            let linger = tokio::time::sleep(LINGER);
            tokio::pin!(linger);
            while flush.is_none() && batch.len() < BATCH {
                tokio::select! {
                    next = rx.recv() => match next {
                        Some(span) => batch.push(span),
                        None => break,
                    },
                    Some(ask) = flushes.recv() => flush = Some(ask),
                    () = &mut linger => break,
                }
            }
            // A flush takes everything queued, in batches.
            loop {
                if flush.is_some() {
                    while batch.len() < BATCH {
                        let Ok(span) = rx.try_recv() else { break };
                        batch.push(span);
                    }
                }
                if batch.is_empty() {
                    break;
                }
                let count = batch.len() as u64;
                match exporter.export(std::mem::take(&mut batch)).await {
                    Ok(()) => state.spans.succeeded(),
                    Err(error) => state.spans.failed(&error, count),
                }
                if flush.is_none() {
                    break;
                }
            }
            if let Some(ask) = flush {
                let _ = ask.send(());
            }
        }
    });
    Some(SpanSink { queue, exports })
}

/// A log processor with a bounded queue, exporting from one task.
#[derive(Debug)]
pub struct QueuedLogs {
    queue: mpsc::Sender<(SdkLogRecord, InstrumentationScope)>,
    exports: Arc<Exports>,
}

impl LogProcessor for QueuedLogs {
    fn emit(&self, record: &mut SdkLogRecord, scope: &InstrumentationScope) {
        if self.queue.try_send((record.clone(), scope.clone())).is_err() {
            self.exports.logs.overflowed(1);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }
}

/// Starts exporting log records over OTLP; `None` when the environment asks for none.
pub fn logs(resource: &Resource, exports: Arc<Exports>) -> Option<QueuedLogs> {
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
    exports.logs.started("LOGS");
    let state = exports.clone();
    let mut flushes = exports.flush_requests();
    tokio::spawn(async move {
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            // Records are sent as soon as they come: a flush only has to take what is queued.
            let flush = tokio::select! {
                first = rx.recv() => match first {
                    Some(record) => {
                        batch.push(record);
                        None
                    }
                    None => return,
                },
                Some(ask) = flushes.recv() => Some(ask),
            };
            loop {
                while batch.len() < BATCH {
                    match rx.try_recv() {
                        Ok(record) => batch.push(record),
                        Err(_) => break,
                    }
                }
                if batch.is_empty() {
                    break;
                }
                let refs: Vec<(&SdkLogRecord, &InstrumentationScope)> = batch.iter().map(|(r, s)| (r, s)).collect();
                match exporter.export(LogBatch::new(&refs)).await {
                    Ok(()) => state.logs.succeeded(),
                    Err(error) => state.logs.failed(&error, batch.len() as u64),
                }
                batch.clear();
                if flush.is_none() {
                    break;
                }
            }
            if let Some(ask) = flush {
                let _ = ask.send(());
            }
        }
    });
    Some(QueuedLogs { queue, exports })
}

/// A duration in milliseconds from the environment variable `name`; `None` when unset, not a
/// number, or 0.
fn millis(name: &str) -> Option<Duration> {
    let value = std::env::var(name).ok()?.trim().parse::<u64>().ok()?;
    (value > 0).then(|| Duration::from_millis(value))
}

/// How metrics leave over OTLP.
#[derive(Debug)]
pub enum MetricsExport {
    /// Cumulative (the default): [`push_metrics`] sends what the Prometheus reader aggregated,
    /// so a measurement is recorded once, however many ways metrics leave.
    Pushed(Box<opentelemetry_otlp::MetricExporter>),
    /// Delta or low-memory, as `OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE` asked: a
    /// reader of its own, since Prometheus reads cumulative sums (every measurement is then
    /// aggregated twice).
    OwnReader(PeriodicReader<CountingMetrics>),
}

/// The OTLP metric export the environment asks for, if any.
pub fn metrics(exports: Arc<Exports>) -> Option<MetricsExport> {
    if !wanted("METRICS") {
        return None;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::warn!("cannot export metrics outside the async runtime");
        return None;
    };
    let exporter =
        match opentelemetry_otlp::MetricExporter::builder().with_http().with_http_client(http_client()).build() {
            Ok(exporter) => exporter,
            Err(error) => {
                tracing::warn!(%error, "cannot export metrics; check the OTEL_EXPORTER_OTLP_* settings");
                return None;
            }
        };
    exports.metrics.started("METRICS");
    if exporter.temporality() == Temporality::Cumulative {
        return Some(MetricsExport::Pushed(Box::new(exporter)));
    }
    let counting = CountingMetrics { inner: exporter, exports, runtime };
    Some(MetricsExport::OwnReader(PeriodicReader::builder(counting).build()))
}

/// Pushes what `reader` collects to `exporter` every `OTEL_METRIC_EXPORT_INTERVAL` (60 s by
/// default), each export bounded by `OTEL_METRIC_EXPORT_TIMEOUT` (30 s; 0 for none).
pub fn push_metrics<R: MetricReader>(reader: R, exporter: opentelemetry_otlp::MetricExporter, exports: Arc<Exports>) {
    let every = millis("OTEL_METRIC_EXPORT_INTERVAL").unwrap_or(Duration::from_secs(60));
    let timeout = match std::env::var("OTEL_METRIC_EXPORT_TIMEOUT") {
        Ok(value) if value.trim() == "0" => None,
        _ => Some(millis("OTEL_METRIC_EXPORT_TIMEOUT").unwrap_or(Duration::from_secs(30))),
    };
    // Unowned on purpose: it pushes for as long as the meter provider lives (the process), and
    // stops when the reader says it was shut down. A flush pushes at once, so the process's
    // exit does not lose the last interval.
    let mut flushes = exports.flush_requests();
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let flush = tokio::select! {
                _ = ticks.tick() => None,
                Some(ask) = flushes.recv() => Some(ask),
            };
            let mut metrics = ResourceMetrics::default();
            if let Err(error) = reader.collect(&mut metrics) {
                tracing::debug!(%error, "the meter provider is shut down: no more metric pushes");
                return;
            }
            let exported = match timeout {
                Some(limit) => match tokio::time::timeout(limit, exporter.export(&metrics)).await {
                    Ok(result) => result.map_err(|e| e.to_string()),
                    Err(_) => Err(format!("no answer within {limit:?} (OTEL_METRIC_EXPORT_TIMEOUT)")),
                },
                None => exporter.export(&metrics).await.map_err(|e| e.to_string()),
            };
            match exported {
                Ok(()) => exports.metrics.succeeded(),
                Err(error) => exports.metrics.failed(&error, 1),
            }
            if let Some(ask) = flush {
                let _ = ask.send(());
            }
        }
    });
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

/// The OTLP metric exporter of a reader of its own, reporting into the signal's export state.
#[derive(Debug)]
pub struct CountingMetrics {
    inner: opentelemetry_otlp::MetricExporter,
    exports: Arc<Exports>,
    /// The SDK's reader exports from a thread of its own; the HTTP client needs the runtime.
    runtime: tokio::runtime::Handle,
}

impl PushMetricExporter for CountingMetrics {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        let result = InRuntime { runtime: &self.runtime, future: Box::pin(self.inner.export(metrics)) }.await;
        match &result {
            Ok(()) => self.exports.metrics.succeeded(),
            Err(error) => self.exports.metrics.failed(error, 1),
        }
        result
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn temporality(&self) -> Temporality {
        self.inner.temporality()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let exports = Arc::new(Exports::default());
        let (tx, _rx) = mpsc::channel(2);
        let sink = SpanSink::to(tx, exports.clone());
        let span = crate::testing::span_data();
        sink.send(vec![span.clone(), span.clone(), span.clone(), span]);
        assert_eq!(exports.spans.dropped(), 2);
        assert!(!exports.spans.failing(), "a full queue is not a failing collector");
    }

    #[test]
    fn a_log_line_names_the_collector_without_its_credentials() {
        assert_eq!(
            scheme_host_port("https://user:s3cret@otel.example.com:4318/v1/traces?api_key=k"),
            "https://otel.example.com:4318"
        );
        assert_eq!(scheme_host_port(" http://collector.observability.svc "), "http://collector.observability.svc");
        assert_eq!(scheme_host_port("collector:4318"), "an endpoint that is no URL");
    }

    #[test]
    fn a_failing_export_is_said_once_and_its_recovery_once() {
        let exports = Exports::default();
        exports.spans.overflowed(3);
        let ((), text) = crate::testing::logged(|| {
            for _ in 0..5 {
                exports.spans.failed(&"connection refused", 10);
            }
            assert!(exports.spans.failing());
            exports.spans.succeeded();
            exports.spans.succeeded();
        });
        assert!(!exports.spans.failing());
        assert_eq!(exports.spans.dropped(), 53);
        let warnings: Vec<_> = text.lines().filter(|l| l.contains("WARN")).collect();
        assert_eq!(warnings.len(), 1, "{text}");
        assert!(warnings[0].contains("cannot export telemetry over OTLP") && warnings[0].contains("signal=\"spans\""));
        assert!(warnings[0].contains("connection refused"), "the warning names the error: {text}");
        assert_eq!(text.matches("exporting telemetry over OTLP again").count(), 1, "{text}");
        assert!(text.contains("dropped=50"), "the recovery says what the outage cost: {text}");
        let ((), again) = crate::testing::logged(|| exports.spans.failed(&"connection refused", 1));
        assert!(
            again.contains("WARN") && again.contains("cannot export telemetry"),
            "a new outage is said again: {again}"
        );
    }
}
