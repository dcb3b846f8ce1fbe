//! Telemetry: logs to stderr ([`logs`]); metrics through OpenTelemetry, served as Prometheus
//! text on the admin port and pushed over OTLP ([`metrics`]); traces that follow the GenAI
//! semantic conventions ([`spans`], [`genai`]) and structured log records, exported over OTLP
//! ([`otlp`]). [`Telemetry`] is the handle the request path records through.

pub mod genai;
pub mod logs;
pub mod metrics;
pub mod otlp;
pub mod spans;

use opentelemetry::logs::{AnyValue, LogRecord as _, Logger as _, LoggerProvider as _, Severity};
use opentelemetry::trace::{SpanId, TraceFlags};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::logs::{SdkLogger, SdkLoggerProvider};

pub use logs::{LogFormat, init_logging};
pub use metrics::Metrics;
use otlp::{QueuedLogs, SpanSink};
use spans::{Sampler, SpanRecord, TraceContext};

fn any_value(value: opentelemetry::Value) -> AnyValue {
    match value {
        opentelemetry::Value::Bool(b) => AnyValue::Boolean(b),
        opentelemetry::Value::I64(i) => AnyValue::Int(i),
        opentelemetry::Value::F64(f) => AnyValue::Double(f),
        other => AnyValue::String(other.to_string().into()),
    }
}

/// The instrumentation scope of everything Backstop records.
pub const SCOPE: &str = "backstop";

/// What the request path records through: metrics always, spans and log records when the
/// `OTEL_*` settings name a collector.
#[derive(Debug)]
pub struct Telemetry {
    /// The metrics.
    pub metrics: Metrics,
    sampler: Sampler,
    spans: Option<SpanSink>,
    logger: Option<SdkLogger>,
    _logs: Option<SdkLoggerProvider>,
    scope: InstrumentationScope,
}

impl Telemetry {
    /// Telemetry for `metrics`' service, exporting as the environment says.
    pub fn from_env(metrics: Metrics) -> Telemetry {
        let spans = otlp::spans(metrics.resource(), metrics.exports());
        let logs = otlp::logs(metrics.resource(), metrics.exports());
        if spans.is_some() || logs.is_some() {
            tracing::info!(traces = spans.is_some(), logs = logs.is_some(), "exporting telemetry over OTLP");
        }
        Telemetry::with(metrics, Sampler::from_env(), spans, logs)
    }

    /// Telemetry with these sinks (tests send to an in-process receiver).
    pub fn with(metrics: Metrics, sampler: Sampler, spans: Option<SpanSink>, logs: Option<QueuedLogs>) -> Telemetry {
        let provider = logs.map(|logs| {
            SdkLoggerProvider::builder().with_resource(metrics.resource().clone()).with_log_processor(logs).build()
        });
        let scope = InstrumentationScope::builder(SCOPE).with_version(env!("CARGO_PKG_VERSION")).build();
        Telemetry {
            logger: provider.as_ref().map(|p| p.logger_with_scope(scope.clone())),
            _logs: provider,
            metrics,
            sampler,
            spans,
            scope,
        }
    }

    /// Metrics only: nothing exported over OTLP.
    pub fn local(metrics: Metrics) -> Telemetry {
        Telemetry::with(metrics, Sampler::AlwaysOff, None, None)
    }

    /// The trace context of a request with `headers`.
    pub fn trace(&self, headers: &http::HeaderMap) -> TraceContext {
        TraceContext::start(headers, self.sampler, self.spans.is_some())
    }

    /// Exports a request's spans, if its trace is recorded.
    pub fn export(&self, context: &TraceContext, records: Vec<SpanRecord>) {
        if let (true, Some(sink)) = (context.sampled, &self.spans) {
            sink.send(records.into_iter().map(|r| r.into_data(context, &self.scope)).collect());
        }
    }

    /// Emits a structured log record over OTLP, in `span`'s trace when given (the stderr line
    /// is the caller's `tracing` event).
    pub fn log(
        &self,
        span: Option<(&TraceContext, SpanId)>,
        severity: Severity,
        body: &str,
        attributes: Vec<KeyValue>,
    ) {
        let Some(logger) = &self.logger else { return };
        let mut record = logger.create_log_record();
        record.set_severity_number(severity);
        record.set_severity_text(severity.name());
        record.set_body(AnyValue::from(body.to_string()));
        record.set_timestamp(std::time::SystemTime::now());
        record.add_attributes(attributes.into_iter().map(|kv| (kv.key, any_value(kv.value))));
        if let Some((context, span)) = span.filter(|(c, _)| c.sampled) {
            record.set_trace_context(context.trace_id, span, Some(TraceFlags::SAMPLED));
        }
        logger.emit(record);
    }
}
