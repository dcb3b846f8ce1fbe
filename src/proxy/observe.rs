//! What one request leaves in telemetry, following the OpenTelemetry GenAI conventions:
//!
//! - a SERVER span (`chat {alias}`) for the app's request, continuing the app's trace, with the
//!   route, the answering target, the attempt count and the fallback reason, a
//!   `backstop.fallback` event for each fall-through (from, to, reason) and a
//!   `backstop.skipped` event for each target passed over without an attempt;
//! - a CLIENT span (`chat {model}`) for every attempt, credited to the target that made it,
//!   with its provider, models, response id, finish reasons, tokens, time to first chunk,
//!   failure class and cost; its id is the one that went upstream in `traceparent`;
//! - metrics: `gen_ai.client.operation.duration` and `gen_ai.client.token.usage` per attempt,
//!   and Backstop's own (requests, attempts per request, fallbacks, hedges, time to first
//!   chunk, cost), labelled by route and target only, so the policy bounds their cardinality;
//! - a structured log record per fall-through, in the request's trace.
//!
//! Everything is built once the request ends (for a stream, once the stream ends), from the
//! attempts the fallback loop recorded: nothing here runs while an attempt is in flight. No
//! prompt or completion text is recorded.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use opentelemetry::logs::Severity;
use opentelemetry::metrics::{Counter, Histogram};
use opentelemetry::trace::{Event, SpanKind};
use opentelemetry::{KeyValue, Value};
use tokio::time::Instant;

use super::fallback::{Answered, Attempt, Committed, Unanswered};
use super::relay::{StreamEnd, StreamWatch};
use super::shadow::{Pending, StreamGist};
use crate::health::HealthObserver;
use crate::llm::{Api, ChatRequest, Operation, StreamEvent};
use crate::snapshot::{PolicyStore, Route, Target};
use crate::telemetry::Telemetry;
use crate::telemetry::genai::AnswerInfo;
use crate::telemetry::spans::{SpanRecord, TraceContext};

/// The instruments every request records into.
#[derive(Debug)]
pub struct Instruments {
    duration: Histogram<f64>,
    tokens: Histogram<u64>,
    first_chunk: Histogram<f64>,
    requests: Counter<u64>,
    attempts: Histogram<u64>,
    fallbacks: Counter<u64>,
    hedges: Counter<u64>,
    cost: Counter<f64>,
    transitions: Counter<u64>,
    budget_exhausted: Counter<u64>,
}

/// Telemetry and the instruments, shared by every request.
#[derive(Debug)]
pub struct Recorder {
    /// The process's telemetry.
    pub telemetry: Arc<Telemetry>,
    instruments: Instruments,
    /// The shadow comparison's.
    pub(crate) shadow: super::shadow::Instruments,
}

impl Recorder {
    /// The recorder of `telemetry`, its instruments registered.
    pub fn new(telemetry: Arc<Telemetry>) -> Recorder {
        let meter = telemetry.metrics.meter("backstop");
        let instruments = Instruments {
            duration: meter
                .f64_histogram("gen_ai.client.operation.duration")
                .with_unit("s")
                .with_description("GenAI operation duration, per attempt, credited to the target that made it")
                .with_boundaries(vec![
                    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
                ])
                .build(),
            tokens: meter
                .u64_histogram("gen_ai.client.token.usage")
                .with_unit("{token}")
                .with_description("Input and output tokens, per attempt")
                .with_boundaries(vec![
                    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
                ])
                .build(),
            first_chunk: meter
                .f64_histogram("backstop.attempt.time_to_first_chunk")
                .with_unit("s")
                .with_description("Time to a stream's first content chunk, per answering attempt")
                .with_boundaries(vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0])
                .build(),
            requests: meter
                .u64_counter("backstop.requests")
                .with_description("App requests, by route and outcome (answered, fell_through, failed, refused)")
                .build(),
            attempts: meter
                .u64_histogram("backstop.request.attempts")
                .with_unit("{attempt}")
                .with_description("Attempts per app request")
                .with_boundaries(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 20.0])
                .build(),
            fallbacks: meter
                .u64_counter("backstop.fallbacks")
                .with_description("Targets left behind, by route, from, to and reason")
                .build(),
            hedges: meter.u64_counter("backstop.hedges").with_description("Hedged attempts, by route").build(),
            cost: meter
                .f64_counter("backstop.cost")
                .with_unit("USD")
                .with_description("What attempts cost at the policy's prices, billed failures included")
                .build(),
            transitions: meter
                .u64_counter("backstop.breaker.transitions")
                .with_description("Circuit breakers opening and closing, by target and the state entered")
                .build(),
            budget_exhausted: meter
                .u64_counter("backstop.retry_budget.exhausted")
                .with_description("Requests that stopped short because the route's retry budget was spent")
                .build(),
        };
        let shadow = super::shadow::Instruments::new(&meter);
        Recorder { telemetry, instruments, shadow }
    }

    /// Watches `store`'s health: breaker states and retry budgets as gauges, and each breaker
    /// opening and closing as a metric and a log record.
    pub fn watch(self: &Arc<Self>, store: &Arc<PolicyStore>) {
        let meter = self.telemetry.metrics.meter("backstop");
        let states = store.clone();
        meter
            .u64_observable_gauge("backstop.breaker.state")
            .with_description("Each target's circuit breaker: 0 closed, 1 half-open, 2 open")
            .with_callback(move |gauge| {
                for (target, state) in states.health().states(Instant::now()) {
                    let value = match state {
                        "open" => 2,
                        "halfOpen" => 1,
                        _ => 0,
                    };
                    gauge.observe(value, &[KeyValue::new("backstop.target", target)]);
                }
            })
            .build();
        let budgets = store.clone();
        meter
            .f64_observable_gauge("backstop.retry_budget.available")
            .with_description("Extra attempts (retries, fall-throughs, hedges) each route may still add now")
            .with_callback(move |gauge| {
                for (route, available) in budgets.health().budgets(Instant::now()) {
                    gauge.observe(available, &[KeyValue::new("backstop.route", route)]);
                }
            })
            .build();
        store.health().observe(self.clone());
    }

    /// Starts observing a request of `headers`.
    pub fn start(self: &Arc<Self>, headers: &http::HeaderMap) -> Observation {
        Observation {
            recorder: self.clone(),
            trace: self.telemetry.trace(headers),
            wall: SystemTime::now(),
            start: Instant::now(),
        }
    }
}

impl HealthObserver for Recorder {
    fn opened(&self, target: &str, period: Duration, why: &str) {
        self.instruments.transitions.add(
            1,
            &[KeyValue::new("backstop.target", target.to_string()), KeyValue::new("backstop.breaker.state", "open")],
        );
        tracing::warn!(
            target_label = target,
            open_for_ms = period.as_millis() as u64,
            reason = why,
            "circuit breaker opened"
        );
        self.telemetry.log(
            None,
            Severity::Warn,
            "circuit breaker opened",
            vec![
                KeyValue::new("backstop.target", target.to_string()),
                KeyValue::new("backstop.breaker.state", "open"),
                KeyValue::new("backstop.breaker.reason", why.to_string()),
                KeyValue::new("backstop.breaker.open_for", period.as_secs_f64()),
            ],
        );
    }

    fn closed(&self, target: &str) {
        self.instruments.transitions.add(
            1,
            &[KeyValue::new("backstop.target", target.to_string()), KeyValue::new("backstop.breaker.state", "closed")],
        );
        tracing::info!(target_label = target, "circuit breaker closed");
        self.telemetry.log(
            None,
            Severity::Info,
            "circuit breaker closed",
            vec![
                KeyValue::new("backstop.target", target.to_string()),
                KeyValue::new("backstop.breaker.state", "closed"),
            ],
        );
    }
}

/// The semantic-convention name of a provider type.
fn provider_name(target: &Target) -> &'static str {
    target.provider.system
}

/// What telemetry keeps of the app's request: never its messages.
#[derive(Clone, Debug)]
pub struct RequestFacts {
    /// `gen_ai.operation.name`.
    pub operation: &'static str,
    /// The model the app asked for (a route alias).
    pub model: String,
    /// Whether it was a fallback drill (`x-backstop-drill`).
    pub drill: bool,
}

impl RequestFacts {
    /// The facts of `request`.
    pub fn of(request: &ChatRequest, drill: bool) -> RequestFacts {
        let operation = match request.operation {
            Operation::Chat => "chat",
            Operation::Embeddings => "embeddings",
        };
        RequestFacts { operation, model: request.model.clone(), drill }
    }
}

/// A request's fall-throughs as (from, to, reason): `to` is the target tried next, or none.
pub fn fallbacks(
    attempts: &[Attempt],
    fell_through: &[(String, &'static str)],
    answered_by: Option<&str>,
) -> Vec<(String, Option<String>, &'static str)> {
    let mut cursor = 0;
    let mut out = Vec::new();
    for (from, reason) in fell_through {
        if let Some(last) = attempts.iter().rposition(|a| a.target == *from) {
            cursor = cursor.max(last);
        }
        let to = attempts[cursor.min(attempts.len())..]
            .iter()
            .find(|a| a.target != *from && !fell_through_before(fell_through, &a.target, from))
            .map(|a| a.target.clone())
            .or_else(|| answered_by.filter(|t| *t != from.as_str()).map(str::to_string));
        out.push((from.clone(), to, *reason));
    }
    out
}

/// Whether `reason` passed a target over without an attempt (out of rotation, or unable to
/// take the request), as opposed to an attempt that failed.
pub fn passed_over(reason: &str) -> bool {
    matches!(reason, "circuitOpen" | "fleetOpen" | "forcedOpen" | "ineligible" | "drill")
}

/// Whether `target` was left behind before `from` was (so it is not where `from` led).
fn fell_through_before(fell_through: &[(String, &'static str)], target: &str, from: &str) -> bool {
    let position = |label: &str| fell_through.iter().position(|(l, _)| l == label);
    matches!((position(target), position(from)), (Some(t), Some(f)) if t < f)
}

/// What became of a request, for its telemetry.
#[derive(Clone, Debug)]
pub struct Summary {
    attempts: Vec<Attempt>,
    fell_through: Vec<(String, &'static str)>,
    answered_by: Option<Arc<Target>>,
    /// Why it got no answer: the failure class, or Backstop's reason.
    error: Option<String>,
    stopped: Option<&'static str>,
    /// The answer's facts, for a whole answer.
    info: AnswerInfo,
    api: Option<Api>,
    streamed: bool,
}

impl Summary {
    /// The summary of the fallback loop's `outcome`.
    pub fn of(outcome: &Result<Answered, Unanswered>) -> Summary {
        match outcome {
            Ok(answered) => {
                let (info, api, streamed) = match &answered.reply {
                    Committed::Complete { body, api } => (AnswerInfo::of_complete(*api, &body.json), Some(*api), false),
                    Committed::Stream { held, api, .. } => {
                        let mut info = AnswerInfo::default();
                        for event in held {
                            info.observe(*api, &event.data);
                        }
                        (info, Some(*api), true)
                    }
                };
                Summary {
                    attempts: answered.attempts.clone(),
                    fell_through: answered.fell_through.clone(),
                    answered_by: Some(answered.target.clone()),
                    error: None,
                    stopped: None,
                    info,
                    api,
                    streamed,
                }
            }
            Err(Unanswered::Final { error, attempts, .. }) => Summary {
                attempts: attempts.clone(),
                fell_through: Vec::new(),
                answered_by: None,
                error: Some(error.class.as_str().to_string()),
                stopped: None,
                info: AnswerInfo::default(),
                api: None,
                streamed: false,
            },
            Err(Unanswered::Exhausted { attempts, skipped, stopped, deadline_exceeded, .. }) => Summary {
                attempts: attempts.clone(),
                fell_through: skipped.iter().map(|s| (s.clone(), "circuitOpen")).collect(),
                answered_by: None,
                error: Some(if *deadline_exceeded { "deadline_exceeded".into() } else { "all_targets_failed".into() }),
                stopped: *stopped,
                info: AnswerInfo::default(),
                api: None,
                streamed: false,
            },
            Err(Unanswered::Ineligible { reasons }) => Summary {
                attempts: Vec::new(),
                fell_through: reasons.iter().map(|(t, _)| (t.clone(), "ineligible")).collect(),
                answered_by: None,
                error: Some("no_eligible_target".into()),
                stopped: None,
                info: AnswerInfo::default(),
                api: None,
                streamed: false,
            },
        }
    }

    /// Whether the answer is a stream still to be relayed.
    pub fn streamed(&self) -> bool {
        self.streamed
    }
}

/// A request under observation.
#[derive(Debug)]
pub struct Observation {
    recorder: Arc<Recorder>,
    /// The request's trace.
    pub trace: TraceContext,
    wall: SystemTime,
    start: Instant,
}

fn wall_at(wall: SystemTime, start: Instant, at: Instant) -> SystemTime {
    wall + at.saturating_duration_since(start)
}

fn seconds(duration: Duration) -> f64 {
    duration.as_secs_f64()
}

/// A span's attributes, made only when the span will be exported.
struct Attributes {
    traced: bool,
    list: Vec<KeyValue>,
}

impl Attributes {
    fn new(traced: bool, first: impl FnOnce() -> Vec<KeyValue>) -> Attributes {
        Attributes { traced, list: if traced { first() } else { Vec::new() } }
    }

    fn add(&mut self, attribute: impl FnOnce() -> KeyValue) {
        if self.traced {
            self.list.push(attribute());
        }
    }
}

impl Observation {
    /// Records the request: `route` answered `request` with `status`; `ended` is when (for a
    /// stream, its end), `stream_end` how a relayed stream ended.
    pub fn finish(
        self,
        route: &Route,
        request: &RequestFacts,
        summary: &Summary,
        status: u16,
        ended: Instant,
        stream_end: Option<&StreamEnd>,
    ) {
        let recorder = &self.recorder;
        let instruments = &recorder.instruments;
        let operation = request.operation;
        let alias = route.alias.as_str();
        let route_kv = KeyValue::new("backstop.route", route.alias.clone());
        // Spans only for a sampled trace: an unsampled request records its metrics alone.
        let traced = self.trace.sampled;
        let mut records = Vec::with_capacity(if traced { summary.attempts.len() + 1 } else { 0 });
        let mut total_cost = None::<f64>;
        let last = summary.attempts.iter().rposition(|a| a.class.is_none() && a.status == Some(200));
        for (index, attempt) in summary.attempts.iter().enumerate() {
            let target = &attempt.at;
            let answering = Some(index) == last && summary.answered_by.is_some();
            let end = if answering && summary.streamed { ended } else { attempt.started + attempt.elapsed };
            let outcome = match (&attempt.class, answering) {
                (_, true) => match stream_end {
                    Some(StreamEnd::Finished) | None => "answered",
                    Some(StreamEnd::Broke(_)) => "broke",
                    Some(StreamEnd::Cut) | Some(StreamEnd::Cancelled) => "cancelled",
                },
                (Some(_), false) => "failed",
                (None, false) => "hedged",
            };
            let provider = provider_name(target);
            let mut attributes = Attributes::new(traced, || {
                vec![
                    KeyValue::new("gen_ai.operation.name", operation),
                    KeyValue::new("gen_ai.provider.name", provider),
                    KeyValue::new("gen_ai.request.model", target.model.clone()),
                    KeyValue::new("backstop.target", target.label.clone()),
                    KeyValue::new("backstop.attempt", (index + 1) as i64),
                    KeyValue::new("backstop.outcome", outcome),
                ]
            });
            if let Some((host, port)) = &target.provider.server {
                attributes.add(|| KeyValue::new("server.address", host.clone()));
                attributes.add(|| KeyValue::new("server.port", i64::from(*port)));
            }
            if let Some(status) = attempt.status.filter(|_| !answering || stream_end.is_none()) {
                attributes.add(|| KeyValue::new("http.response.status_code", i64::from(status)));
            }
            let error = match (&attempt.class, stream_end, answering) {
                (Some(class), _, _) => Some(class.as_str().to_string()),
                (None, Some(StreamEnd::Broke(class)), true) => Some(class.as_str().to_string()),
                (None, _, false) => Some("cancelled".to_string()),
                _ => None,
            };
            if let Some(error) = &error {
                attributes.add(|| KeyValue::new("error.type", error.clone()));
            }
            let mut metric = vec![
                KeyValue::new("gen_ai.operation.name", operation),
                KeyValue::new("gen_ai.provider.name", provider),
                KeyValue::new("gen_ai.request.model", target.model.clone()),
                KeyValue::new("backstop.target", target.label.clone()),
                route_kv.clone(),
            ];
            if let Some(error) = &error {
                metric.push(KeyValue::new("error.type", error.clone()));
            }
            instruments.duration.record(seconds(end.saturating_duration_since(attempt.started)), &metric);
            if answering {
                let info = &summary.info;
                if let Some(id) = &info.id {
                    attributes.add(|| KeyValue::new("gen_ai.response.id", id.clone()));
                }
                if let Some(model) = &info.model {
                    attributes.add(|| KeyValue::new("gen_ai.response.model", model.clone()));
                }
                if !info.finish_reasons.is_empty() {
                    attributes.add(|| {
                        let reasons: Vec<opentelemetry::StringValue> =
                            info.finish_reasons.iter().map(|r| r.clone().into()).collect();
                        KeyValue::new("gen_ai.response.finish_reasons", Value::Array(reasons.into()))
                    });
                }
                for (kind, tokens, key) in [
                    ("input", info.input_tokens, "gen_ai.usage.input_tokens"),
                    ("output", info.output_tokens, "gen_ai.usage.output_tokens"),
                ] {
                    if let Some(tokens) = tokens {
                        attributes.add(|| KeyValue::new(key, tokens as i64));
                        let mut labels = metric.clone();
                        labels.push(KeyValue::new("gen_ai.token.type", kind));
                        instruments.tokens.record(tokens, &labels);
                    }
                }
                if summary.streamed {
                    attributes.add(|| KeyValue::new("backstop.time_to_first_chunk", seconds(attempt.elapsed)));
                    instruments.first_chunk.record(seconds(attempt.elapsed), &metric);
                }
                if let Some(cost) = info.cost(target.price.as_ref()) {
                    attributes.add(|| KeyValue::new("backstop.cost", cost));
                    instruments
                        .cost
                        .add(cost, &[route_kv.clone(), KeyValue::new("backstop.target", target.label.clone())]);
                    total_cost = Some(total_cost.unwrap_or(0.0) + cost);
                }
            }
            if traced {
                records.push(SpanRecord {
                    id: attempt.span,
                    parent: Some(self.trace.server),
                    remote_parent: false,
                    kind: SpanKind::Client,
                    name: format!("{operation} {}", target.model),
                    start: wall_at(self.wall, self.start, attempt.started),
                    end: wall_at(self.wall, self.start, end),
                    attributes: attributes.list,
                    events: Vec::new(),
                    error: error.filter(|e| e != "cancelled").map(|e| format!("{}: {e}", target.label)),
                });
            }
        }

        // The request itself.
        let answered_by = summary.answered_by.as_ref();
        let fallbacks = fallbacks(&summary.attempts, &summary.fell_through, answered_by.map(|t| t.label.as_str()));
        let mut events = Vec::new();
        for (from, to, reason) in &fallbacks {
            let skipped = passed_over(reason);
            if traced {
                let mut attributes = vec![
                    KeyValue::new(if skipped { "backstop.target" } else { "backstop.fallback.from" }, from.clone()),
                    KeyValue::new(if skipped { "backstop.skip.reason" } else { "backstop.fallback.reason" }, *reason),
                ];
                if let Some(to) = to.as_ref().filter(|_| !skipped) {
                    attributes.push(KeyValue::new("backstop.fallback.to", to.clone()));
                }
                let name = if skipped { "backstop.skipped" } else { "backstop.fallback" };
                events.push(Event::new(name, self.wall, attributes, 0));
            }
            let mut labels = vec![
                route_kv.clone(),
                KeyValue::new("backstop.fallback.from", from.clone()),
                KeyValue::new("backstop.fallback.reason", *reason),
            ];
            labels.push(KeyValue::new("backstop.fallback.to", to.clone().unwrap_or_default()));
            instruments.fallbacks.add(1, &labels);
            if *reason == "hedged" {
                instruments.hedges.add(1, std::slice::from_ref(&route_kv));
            }
            if skipped {
                // A target out of rotation is passed over by every request until it returns:
                // its breaker's opening and closing are logged once each, not every pass.
                tracing::debug!(route = alias, target_label = %from, reason, "passed over");
                continue;
            }
            tracing::info!(route = alias, from = %from, to = %to.as_deref().unwrap_or("-"), reason, "fallback");
            self.recorder.telemetry.log(
                Some((&self.trace, self.trace.server)),
                Severity::Info,
                "fallback",
                vec![
                    route_kv.clone(),
                    KeyValue::new("backstop.fallback.from", from.clone()),
                    KeyValue::new("backstop.fallback.to", to.clone().unwrap_or_default()),
                    KeyValue::new("backstop.fallback.reason", *reason),
                ],
            );
        }
        if let Some(stopped) = summary.stopped {
            if stopped.contains("budget") {
                instruments.budget_exhausted.add(1, std::slice::from_ref(&route_kv));
            }
            if traced {
                events.push(Event::new(
                    "backstop.stopped",
                    self.wall,
                    vec![KeyValue::new("backstop.stop.reason", stopped)],
                    0,
                ));
            }
        }
        let outcome = match (answered_by, fallbacks.iter().any(|(_, _, r)| *r != "hedged")) {
            (Some(_), false) => "answered",
            (Some(_), true) => "fell_through",
            (None, _) if summary.attempts.is_empty() => "refused",
            (None, _) => "failed",
        };
        let mut labels = vec![route_kv.clone(), KeyValue::new("backstop.outcome", outcome)];
        if request.drill {
            // Drill traffic falls back on purpose: kept apart from the real fallback rate.
            labels.push(KeyValue::new("backstop.drill", true));
        }
        instruments.requests.add(1, &labels);
        instruments.attempts.record(summary.attempts.len() as u64, std::slice::from_ref(&route_kv));
        if !traced {
            return;
        }
        let mut attributes = vec![
            KeyValue::new("gen_ai.operation.name", operation),
            KeyValue::new("gen_ai.request.model", request.model.clone()),
            route_kv,
            KeyValue::new("backstop.attempts", summary.attempts.len() as i64),
            KeyValue::new("backstop.outcome", outcome),
            KeyValue::new("http.response.status_code", i64::from(status)),
        ];
        if request.drill {
            attributes.push(KeyValue::new("backstop.drill", true));
        }
        if let Some(target) = answered_by {
            attributes.push(KeyValue::new("backstop.target", target.label.clone()));
            attributes.push(KeyValue::new("gen_ai.provider.name", provider_name(target)));
            if let Some(model) = &summary.info.model {
                attributes.push(KeyValue::new("gen_ai.response.model", model.clone()));
            }
            for (tokens, key) in [
                (summary.info.input_tokens, "gen_ai.usage.input_tokens"),
                (summary.info.output_tokens, "gen_ai.usage.output_tokens"),
            ] {
                if let Some(tokens) = tokens {
                    attributes.push(KeyValue::new(key, tokens as i64));
                }
            }
        }
        let reason: Vec<String> = summary.fell_through.iter().map(|(target, why)| format!("{target}={why}")).collect();
        if !reason.is_empty() {
            attributes.push(KeyValue::new("backstop.fallback_reason", reason.join(", ")));
        }
        if let Some(cost) = total_cost {
            attributes.push(KeyValue::new("backstop.cost", cost));
        }
        let error = summary.error.clone().or_else(|| match stream_end {
            Some(StreamEnd::Broke(class)) => Some(class.as_str().to_string()),
            _ => None,
        });
        if let Some(error) = &error {
            attributes.push(KeyValue::new("error.type", error.clone()));
        }
        records.push(SpanRecord {
            id: self.trace.server,
            parent: self.trace.parent,
            remote_parent: self.trace.parent.is_some(),
            kind: SpanKind::Server,
            name: format!("{operation} {}", request.model),
            start: self.wall,
            end: wall_at(self.wall, self.start, ended),
            attributes,
            events,
            error,
        });
        self.recorder.telemetry.export(&self.trace, records);
    }
}

/// A committed stream under observation: its events' usage and finish are gathered, and the
/// request is recorded when it ends, however it ends (the app going away included).
pub struct StreamObserver {
    observation: Option<Observation>,
    route: Arc<Route>,
    request: RequestFacts,
    summary: Summary,
    /// A shadow comparison waiting for the stream's end, and the stream's gist so far.
    shadow: Option<(Pending, StreamGist)>,
}

impl StreamObserver {
    /// Observes the stream `summary` describes; a `shadow` starts once it has ended well.
    pub fn new(
        observation: Observation,
        route: Arc<Route>,
        request: RequestFacts,
        summary: Summary,
        shadow: Option<Pending>,
    ) -> Self {
        let shadow = shadow.zip(summary.api).map(|(pending, api)| (pending, StreamGist::new(api)));
        StreamObserver { observation: Some(observation), route, request, summary, shadow }
    }

    fn end_with(&mut self, end: StreamEnd) {
        let now = Instant::now();
        if let (Some((pending, gist)), StreamEnd::Finished) = (self.shadow.take(), &end)
            && let (Some(target), Some(attempt)) = (&self.summary.answered_by, self.summary.attempts.last())
        {
            let latency = now.saturating_duration_since(attempt.started);
            let primary = pending.primary_of_stream(target, self.summary.info.clone(), latency, gist);
            pending.launch(primary);
        }
        if let Some(observation) = self.observation.take() {
            observation.finish(&self.route, &self.request, &self.summary, 200, now, Some(&end));
        }
    }
}

impl StreamWatch for StreamObserver {
    fn event(&mut self, event: &StreamEvent) {
        if let Some(api) = self.summary.api {
            self.summary.info.observe(api, &event.data);
        }
        if let Some((_, gist)) = &mut self.shadow {
            gist.push(event);
        }
    }

    fn end(&mut self, end: StreamEnd) {
        self.end_with(end);
    }
}

impl Drop for StreamObserver {
    fn drop(&mut self) {
        self.end_with(StreamEnd::Cancelled);
    }
}
