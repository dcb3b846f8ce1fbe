//! Trace context: the W3C `traceparent` an app sends is continued, each attempt gets a span of
//! its own whose id goes upstream in the provider request's `traceparent`, and the spans are
//! built once the request (or its stream) ends, with the times the attempts had. Sampling
//! follows `OTEL_TRACES_SAMPLER` (`parentbased_always_on` by default).

use std::borrow::Cow;
use std::time::SystemTime;

use http::{HeaderMap, HeaderValue};
use opentelemetry::trace::{Event, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
use rand::Rng as _;

/// How traces are sampled, from `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sampler {
    /// Every trace.
    AlwaysOn,
    /// None.
    AlwaysOff,
    /// This share of traces, by trace id.
    Ratio(f64),
    /// As the app's `traceparent` says; when it sends none, the inner rule.
    ParentBased(Root),
}

/// A parent-based sampler's rule for traces that start here.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Root {
    /// Every one.
    AlwaysOn,
    /// None.
    AlwaysOff,
    /// This share.
    Ratio(f64),
}

impl Sampler {
    /// The sampler the environment names.
    pub fn from_env() -> Sampler {
        let ratio = || {
            std::env::var("OTEL_TRACES_SAMPLER_ARG")
                .ok()
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|r| (0.0..=1.0).contains(r))
                .unwrap_or(1.0)
        };
        match std::env::var("OTEL_TRACES_SAMPLER").unwrap_or_default().trim() {
            "always_on" => Sampler::AlwaysOn,
            "always_off" => Sampler::AlwaysOff,
            "traceidratio" => Sampler::Ratio(ratio()),
            "parentbased_always_off" => Sampler::ParentBased(Root::AlwaysOff),
            "parentbased_traceidratio" => Sampler::ParentBased(Root::Ratio(ratio())),
            _ => Sampler::ParentBased(Root::AlwaysOn),
        }
    }

    fn decide(self, trace: TraceId, parent: Option<bool>) -> bool {
        let by_ratio = |ratio: f64| {
            // The trace id's low 8 bytes against the ratio, as the SDK's TraceIdRatioBased does.
            let low = u64::from_be_bytes(trace.to_bytes()[8..].try_into().unwrap_or([0; 8])) >> 1;
            (low as f64) < ratio * (u64::MAX >> 1) as f64
        };
        match (self, parent) {
            (Sampler::AlwaysOn, _) => true,
            (Sampler::AlwaysOff, _) => false,
            (Sampler::Ratio(ratio), _) => by_ratio(ratio),
            (Sampler::ParentBased(_), Some(sampled)) => sampled,
            (Sampler::ParentBased(Root::AlwaysOn), None) => true,
            (Sampler::ParentBased(Root::AlwaysOff), None) => false,
            (Sampler::ParentBased(Root::Ratio(ratio)), None) => by_ratio(ratio),
        }
    }
}

/// A request's place in a trace.
#[derive(Clone, Debug)]
pub struct TraceContext {
    /// The trace: the app's, or a new one.
    pub trace_id: TraceId,
    /// The app's span, when it sent a `traceparent`.
    pub parent: Option<SpanId>,
    /// The request's own (SERVER) span.
    pub server: SpanId,
    /// Whether the trace is recorded and exported.
    pub sampled: bool,
    /// The app's `tracestate`, passed on.
    pub state: Option<String>,
    /// The app's `traceparent` as it came, passed on as is when this trace is not recorded.
    incoming: Option<String>,
}

/// A random, valid span id.
pub fn new_span_id() -> SpanId {
    SpanId::from_bytes(rand::rng().random_range(1..=u64::MAX).to_be_bytes())
}

/// Parses a W3C `traceparent` (version 00): trace id, parent span id, sampled flag.
fn parse(traceparent: &str) -> Option<(TraceId, SpanId, bool)> {
    let mut parts = traceparent.trim().split('-');
    let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2 || version == "ff" || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    if version == "00" && parts.next().is_some() {
        return None;
    }
    let hex = |s: &str| s.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase());
    if !hex(trace) || !hex(span) || !hex(flags) {
        return None;
    }
    let trace = TraceId::from_hex(trace).ok().filter(|t| *t != TraceId::INVALID)?;
    let span = SpanId::from_hex(span).ok().filter(|s| *s != SpanId::INVALID)?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some((trace, span, flags & 1 == 1))
}

impl TraceContext {
    /// The context of a request with `headers`, sampled by `sampler`; `recording` says whether
    /// anything is exported at all.
    pub fn start(headers: &HeaderMap, sampler: Sampler, recording: bool) -> TraceContext {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let incoming = text("traceparent");
        let parsed = incoming.as_deref().and_then(parse);
        let trace_id =
            parsed.map_or_else(|| TraceId::from_bytes(rand::rng().random::<u128>().max(1).to_be_bytes()), |p| p.0);
        TraceContext {
            trace_id,
            parent: parsed.map(|p| p.1),
            server: new_span_id(),
            sampled: recording && sampler.decide(trace_id, parsed.map(|p| p.2)),
            state: text("tracestate").filter(|s| s.len() <= 512),
            incoming: incoming.filter(|_| parsed.is_some()),
        }
    }

    /// The `traceparent` (and `tracestate`) an attempt whose span is `span` sends upstream: its
    /// own span when the trace is recorded; the app's as it came when it is not.
    pub fn upstream(&self, span: SpanId) -> Vec<(&'static str, HeaderValue)> {
        let parent =
            if self.sampled { Some(format!("00-{}-{}-01", self.trace_id, span)) } else { self.incoming.clone() };
        let mut headers = Vec::with_capacity(2);
        if let Some(value) = parent.and_then(|p| HeaderValue::from_str(&p).ok()) {
            headers.push(("traceparent", value));
            if let Some(state) = self.state.as_deref().and_then(|s| HeaderValue::from_str(s).ok()) {
                headers.push(("tracestate", state));
            }
        }
        headers
    }

    fn span_context(&self, span: SpanId) -> SpanContext {
        let state = self.state.as_deref().and_then(|s| s.parse::<TraceState>().ok()).unwrap_or_default();
        SpanContext::new(self.trace_id, span, TraceFlags::SAMPLED, false, state)
    }
}

/// One span to export, as built after the fact.
pub struct SpanRecord {
    /// Its id.
    pub id: SpanId,
    /// Its parent's, if any.
    pub parent: Option<SpanId>,
    /// Whether the parent is the app's (remote).
    pub remote_parent: bool,
    /// SERVER or CLIENT.
    pub kind: SpanKind,
    /// Its name.
    pub name: String,
    /// When it started.
    pub start: SystemTime,
    /// When it ended.
    pub end: SystemTime,
    /// Its attributes.
    pub attributes: Vec<KeyValue>,
    /// Its events.
    pub events: Vec<Event>,
    /// Its error, if it failed.
    pub error: Option<String>,
}

impl SpanRecord {
    /// The exportable span, in `context`'s trace.
    pub fn into_data(self, context: &TraceContext, scope: &InstrumentationScope) -> SpanData {
        let mut events = SpanEvents::default();
        events.events = self.events;
        SpanData {
            span_context: context.span_context(self.id),
            parent_span_id: self.parent.unwrap_or(SpanId::INVALID),
            parent_span_is_remote: self.remote_parent,
            span_kind: self.kind,
            name: Cow::Owned(self.name),
            start_time: self.start,
            end_time: self.end,
            attributes: self.attributes,
            dropped_attributes_count: 0,
            events,
            links: SpanLinks::default(),
            status: self.error.map_or(Status::Unset, Status::error),
            instrumentation_scope: scope.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(traceparent: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("traceparent", HeaderValue::from_str(traceparent).expect("header"));
        headers.insert("tracestate", HeaderValue::from_static("vendor=abc"));
        headers
    }

    #[test]
    fn an_app_s_trace_is_continued_and_its_sampling_decision_kept() {
        let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let context = TraceContext::start(&headers(incoming), Sampler::from_env(), true);
        assert_eq!(context.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(context.parent.map(|p| p.to_string()).as_deref(), Some("00f067aa0ba902b7"));
        assert!(context.sampled);
        let span = new_span_id();
        let upstream = context.upstream(span);
        assert_eq!(
            upstream[0].1.to_str().ok(),
            Some(format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{span}-01").as_str())
        );
        assert_eq!(upstream[1].1.to_str().ok(), Some("vendor=abc"));
        // Not sampled by the app: not recorded here, and its traceparent goes on as it came.
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        let context = TraceContext::start(&headers(unsampled), Sampler::ParentBased(Root::AlwaysOn), true);
        assert!(!context.sampled);
        assert_eq!(context.upstream(span)[0].1.to_str().ok(), Some(unsampled));
        // Nothing exported: the same.
        let context = TraceContext::start(&headers(incoming), Sampler::AlwaysOn, false);
        assert_eq!(context.upstream(span)[0].1.to_str().ok(), Some(incoming));
    }

    #[test]
    fn malformed_traceparents_start_a_new_trace() {
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "garbage",
        ] {
            let context = TraceContext::start(&headers(bad), Sampler::AlwaysOn, true);
            assert!(context.parent.is_none(), "{bad}");
            assert_ne!(context.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736", "{bad}");
        }
        let none = TraceContext::start(&HeaderMap::new(), Sampler::AlwaysOn, false);
        assert!(none.upstream(new_span_id()).is_empty(), "no trace, nothing recorded: no header");
    }

    #[test]
    fn ratio_sampling_keeps_about_its_share() {
        let kept = (0..10_000)
            .filter(|_| {
                let id = TraceId::from_bytes(rand::rng().random::<u128>().to_be_bytes());
                Sampler::Ratio(0.25).decide(id, None)
            })
            .count();
        assert!((2_000..3_000).contains(&kept), "{kept}");
        assert!(!Sampler::ParentBased(Root::AlwaysOn).decide(TraceId::from_bytes([1; 16]), Some(false)));
    }
}
