//! One request's spans, log records and metrics, from what the fallback walk recorded.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use opentelemetry::logs::Severity;
use opentelemetry::trace::{Event, SpanKind};
use opentelemetry::{KeyValue, Value};
use tokio::time::Instant;

use super::instruments::Recorder;
use crate::llm::{Api, ChatRequest, FailureClass, Operation};
use crate::proxy::fallback::{Answered, Attempt, Committed, Left, Outcome, RequestRecord, Unanswered, Why};
use crate::proxy::relay::StreamEnd;
use crate::proxy::resume::Seam;
use crate::snapshot::{Route, Target};
use crate::telemetry::genai::AnswerInfo;
use crate::telemetry::spans::{SpanRecord, TraceContext};

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
    /// `gen_ai.request.stream`.
    pub stream: bool,
    /// The sampling parameters the app set.
    pub parameters: Parameters,
}

/// The app's own sampling parameters, as read from its request; span attributes
/// (`gen_ai.request.*`) are made of them only for a traced request.
#[derive(Clone, Copy, Debug, Default)]
pub struct Parameters {
    max_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    frequency_penalty: Option<f64>,
    presence_penalty: Option<f64>,
    seed: Option<i64>,
}

impl Parameters {
    fn of(rest: &serde_json::Map<String, serde_json::Value>) -> Parameters {
        let float = |field: &str| rest.get(field).and_then(serde_json::Value::as_f64);
        Parameters {
            max_tokens: rest.get("max_completion_tokens").or_else(|| rest.get("max_tokens")).and_then(|v| v.as_i64()),
            temperature: float("temperature"),
            top_p: float("top_p"),
            frequency_penalty: float("frequency_penalty"),
            presence_penalty: float("presence_penalty"),
            seed: rest.get("seed").and_then(serde_json::Value::as_i64),
        }
    }

    /// The `gen_ai.request.*` attributes of the parameters set.
    fn attributes(&self) -> impl Iterator<Item = KeyValue> {
        let integers = [("gen_ai.request.max_tokens", self.max_tokens), ("gen_ai.request.seed", self.seed)];
        let floats = [
            ("gen_ai.request.temperature", self.temperature),
            ("gen_ai.request.top_p", self.top_p),
            ("gen_ai.request.frequency_penalty", self.frequency_penalty),
            ("gen_ai.request.presence_penalty", self.presence_penalty),
        ];
        let integers = integers.into_iter().filter_map(|(key, value)| Some(KeyValue::new(key, value?)));
        integers.chain(floats.into_iter().filter_map(|(key, value)| Some(KeyValue::new(key, value?))))
    }
}

impl RequestFacts {
    /// The facts of `request`.
    pub fn of(request: &ChatRequest, drill: bool) -> RequestFacts {
        let operation = match request.operation {
            Operation::Chat => "chat",
            Operation::Embeddings => "embeddings",
        };
        let parameters = Parameters::of(&request.rest);
        RequestFacts { operation, model: request.model.clone(), drill, stream: request.stream, parameters }
    }
}

/// A request's fall-throughs as (from, to, why): `to` is the target tried next, or none.
pub fn fallbacks(attempts: &[Attempt], left: &[Left], answered_by: Option<&str>) -> Vec<(String, Option<String>, Why)> {
    let mut cursor = 0;
    let mut out = Vec::new();
    for entry in left {
        let from = &entry.target;
        if let Some(last) = attempts.iter().rposition(|a| a.target == *from) {
            cursor = cursor.max(last);
        }
        let to = attempts[cursor.min(attempts.len())..]
            .iter()
            .find(|a| a.target != *from && !left_before(left, &a.target, from))
            .map(|a| a.target.clone())
            .or_else(|| answered_by.filter(|t| *t != from.as_str()).map(str::to_string));
        out.push((from.clone(), to, entry.why));
    }
    out
}

/// Whether `target` was left behind before `from` was (so it is not where `from` led).
fn left_before(left: &[Left], target: &str, from: &str) -> bool {
    let position = |label: &str| left.iter().position(|l| l.target == label);
    matches!((position(target), position(from)), (Some(t), Some(f)) if t < f)
}

/// What became of a request, for its telemetry.
#[derive(Clone, Debug)]
pub struct Summary {
    record: RequestRecord,
    pub(super) answered_by: Option<Arc<Target>>,
    /// Why it got no answer: the failure class, or Backstop's reason.
    error: Option<&'static str>,
    /// The answer's facts, for a whole answer; for a stream, gathered as it is relayed.
    pub(super) info: AnswerInfo,
    pub(super) api: Option<Api>,
    streamed: bool,
    /// Where the stream broke and went on to another target (`midStream: continue`).
    seams: Vec<SeamFacts>,
}

/// What telemetry keeps of a seam.
#[derive(Clone, Debug)]
struct SeamFacts {
    /// The index of the broken attempt.
    attempt: usize,
    /// What that attempt's answer said of itself before it broke.
    info: AnswerInfo,
    class: FailureClass,
    chars: usize,
    at: Instant,
    from: String,
    to: Option<String>,
}

impl Summary {
    /// The summary of the fallback loop's `outcome`.
    pub fn of(outcome: &Result<Answered, Unanswered>) -> Summary {
        let answered = match outcome {
            Ok(answered) => answered,
            Err(unanswered) => {
                let error = match unanswered {
                    Unanswered::Final { error, .. } => error.class.as_str(),
                    Unanswered::Exhausted { record } if record.deadline_exceeded() => "deadline_exceeded",
                    Unanswered::Exhausted { .. } => "all_targets_failed",
                    Unanswered::Ineligible { .. } => "no_eligible_target",
                };
                return Summary {
                    record: unanswered.record(),
                    answered_by: None,
                    error: Some(error),
                    info: AnswerInfo::default(),
                    api: None,
                    streamed: false,
                    seams: Vec::new(),
                };
            }
        };
        let (info, api, streamed) = match &answered.reply {
            Committed::Complete { body, api } => (AnswerInfo::of_whole(*api, body), Some(*api), false),
            Committed::Stream { held, api, .. } => {
                let mut info = AnswerInfo::default();
                for event in held {
                    info.observe_event(*api, event);
                }
                (info, Some(*api), true)
            }
        };
        Summary {
            record: answered.record.clone(),
            answered_by: Some(answered.target.clone()),
            error: None,
            info,
            api,
            streamed,
            seams: Vec::new(),
        }
    }

    /// Notes that the stream broke at its answering attempt and went on (or failed to) as
    /// `seam` says: the continuation's attempts join the record, and the answer's facts are
    /// gathered afresh for the target that continues it.
    pub(super) fn resumed(&mut self, seam: &Seam) {
        let record = &mut self.record;
        let Some(attempt) = record.attempts.iter().rposition(|a| a.outcome == Outcome::Answered) else { return };
        self.seams.push(SeamFacts {
            attempt,
            info: seam.info.clone(),
            class: seam.class,
            chars: seam.chars,
            at: seam.at,
            from: seam.from.label.clone(),
            to: seam.to.as_ref().map(|t| t.label.clone()),
        });
        record.leave(&seam.from.label, Why::Failed(seam.class));
        record.attempts.extend(seam.record.attempts.iter().cloned());
        for left in &seam.record.left {
            record.leave(&left.target, left.why);
        }
        if seam.record.stop.is_some() {
            record.stop = seam.record.stop;
        }
        if let Some(to) = &seam.to {
            self.answered_by = Some(to.clone());
            self.info = AnswerInfo::default();
        }
    }

    /// Whether the answer is a stream still to be relayed.
    pub fn streamed(&self) -> bool {
        self.streamed
    }

    /// When the answering attempt started, if one answered.
    pub fn answer_started(&self) -> Option<Instant> {
        self.answered_by.as_ref().and(self.record.attempts.last()).map(|a| a.started)
    }
}

/// A request under observation.
#[derive(Debug)]
pub struct Observation {
    pub(super) recorder: Arc<Recorder>,
    /// The request's trace.
    pub trace: TraceContext,
    pub(super) wall: SystemTime,
    pub(super) start: Instant,
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
    /// Starts observing a request of `headers`, recording into `recorder`.
    pub fn start(recorder: &Arc<Recorder>, headers: &http::HeaderMap) -> Observation {
        Observation {
            recorder: recorder.clone(),
            trace: recorder.telemetry.trace(headers),
            wall: SystemTime::now(),
            start: Instant::now(),
        }
    }

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
        // Spans only for a sampled trace: an unsampled request records its metrics alone.
        let finishing = Finishing {
            observation: &self,
            route,
            route_kv: KeyValue::new("backstop.route", route.alias.clone()),
            request,
            summary,
            traced: self.trace.sampled,
        };
        let (mut records, total_cost) = finishing.attempts(ended, stream_end);
        let (events, outcome) = finishing.fallbacks();
        let server = finishing.request(outcome, status, total_cost, events, ended, stream_end);
        if let Some(server) = server {
            records.push(server);
            self.recorder.telemetry.export(&self.trace, records);
        }
    }
}

/// One request being recorded.
struct Finishing<'a> {
    observation: &'a Observation,
    route: &'a Route,
    route_kv: KeyValue,
    request: &'a RequestFacts,
    summary: &'a Summary,
    traced: bool,
}

impl Finishing<'_> {
    fn wall_at(&self, at: Instant) -> SystemTime {
        wall_at(self.observation.wall, self.observation.start, at)
    }

    /// Each attempt's CLIENT span (when traced) and metrics; the answer's total cost.
    fn attempts(&self, ended: Instant, stream_end: Option<&StreamEnd>) -> (Vec<SpanRecord>, Option<f64>) {
        let (summary, traced) = (self.summary, self.traced);
        let instruments = &self.observation.recorder.instruments;
        let operation = self.request.operation;
        let attempts = &summary.record.attempts;
        let mut records = Vec::with_capacity(if traced { attempts.len() + 1 } else { 0 });
        let mut total_cost = None::<f64>;
        let last = attempts.iter().rposition(|a| a.outcome == Outcome::Answered);
        for (index, attempt) in attempts.iter().enumerate() {
            let target = &attempt.at;
            let seam = summary.seams.iter().find(|seam| seam.attempt == index);
            let answering = seam.is_none() && Some(index) == last && summary.answered_by.is_some();
            let end = match seam {
                Some(seam) => seam.at,
                None if answering && summary.streamed => ended,
                None => attempt.started + attempt.elapsed,
            };
            let outcome = match (&attempt.outcome, answering) {
                _ if seam.is_some() => "broke",
                (_, true) => match stream_end {
                    Some(StreamEnd::Finished) | None => "answered",
                    Some(StreamEnd::Broke(_)) => "broke",
                    Some(StreamEnd::Cut) | Some(StreamEnd::Cancelled) => "cancelled",
                },
                (Outcome::Failed { .. }, false) => "failed",
                (_, false) => "hedged",
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
                    KeyValue::new("gen_ai.request.stream", self.request.stream),
                ]
            });
            if let Some((host, port)) = &target.provider.server {
                attributes.add(|| KeyValue::new("server.address", host.clone()));
                attributes.add(|| KeyValue::new("server.port", i64::from(*port)));
            }
            if let Some(status) = attempt.status().filter(|_| !answering || stream_end.is_none()) {
                attributes.add(|| KeyValue::new("http.response.status_code", i64::from(status)));
            }
            let error = match (attempt.class(), stream_end, answering) {
                _ if seam.is_some() => seam.map(|seam| seam.class.as_str().to_string()),
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
                self.route_kv.clone(),
            ];
            if let Some(error) = &error {
                metric.push(KeyValue::new("error.type", error.clone()));
            }
            instruments.duration.record(seconds(end.saturating_duration_since(attempt.started)), &metric);
            let info = match seam {
                Some(seam) => Some(&seam.info),
                None => answering.then_some(&summary.info),
            };
            if let Some(info) = info {
                let cost = self.answer(target, attempt, info, &metric, &mut attributes);
                if let Some(cost) = cost {
                    total_cost = Some(total_cost.unwrap_or(0.0) + cost);
                }
            }
            if traced {
                records.push(SpanRecord {
                    id: attempt.span,
                    parent: Some(self.observation.trace.server),
                    remote_parent: false,
                    kind: SpanKind::Client,
                    name: format!("{operation} {}", target.model),
                    start: self.wall_at(attempt.started),
                    end: self.wall_at(end),
                    attributes: attributes.list,
                    events: Vec::new(),
                    error: error.filter(|e| e != "cancelled").map(|e| format!("{}: {e}", target.label)),
                });
            }
        }
        (records, total_cost)
    }

    /// The answering attempt's facts (response, tokens, time to first chunk, cost), as span
    /// attributes and metrics labelled `metric`; its cost.
    fn answer(
        &self,
        target: &Target,
        attempt: &Attempt,
        info: &AnswerInfo,
        metric: &[KeyValue],
        attributes: &mut Attributes,
    ) -> Option<f64> {
        let instruments = &self.observation.recorder.instruments;
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
                let mut labels = metric.to_vec();
                labels.push(KeyValue::new("gen_ai.token.type", kind));
                instruments.tokens.record(tokens, &labels);
            }
        }
        for (tokens, key) in [
            (info.cached_tokens, "gen_ai.usage.cache_read.input_tokens"),
            (info.cache_written_tokens, "gen_ai.usage.cache_creation.input_tokens"),
        ] {
            if let Some(tokens) = tokens {
                attributes.add(|| KeyValue::new(key, tokens as i64));
            }
        }
        if self.summary.streamed {
            attributes.add(|| KeyValue::new("gen_ai.response.time_to_first_chunk", seconds(attempt.elapsed)));
            instruments.first_chunk.record(seconds(attempt.elapsed), metric);
        }
        let cost = info.cost(target.price.as_ref())?;
        if let Some(spend) = &target.spend {
            spend.charge(crate::health::spend::unix_ms(), cost);
        }
        attributes.add(|| KeyValue::new("backstop.cost", cost));
        instruments.cost.add(cost, &[self.route_kv.clone(), KeyValue::new("backstop.target", target.label.clone())]);
        Some(cost)
    }

    /// Every target left behind as a span event (when traced), a metric and, for a
    /// fall-through, a log record; the stop, if the walk stopped short. Returns the events and
    /// the request's outcome.
    fn fallbacks(&self) -> (Vec<Event>, &'static str) {
        let (summary, traced) = (self.summary, self.traced);
        let recorder = &self.observation.recorder;
        let instruments = &recorder.instruments;
        let (trace, wall) = (&self.observation.trace, self.observation.wall);
        let alias = self.route.alias.as_str();
        let attempts = &summary.record.attempts;
        let answered_by = summary.answered_by.as_ref();
        let fallbacks = fallbacks(attempts, &summary.record.left, answered_by.map(|t| t.label.as_str()));
        let mut events = Vec::new();
        for (from, to, why) in &fallbacks {
            let (skipped, reason) = (why.is_skip(), why.as_str());
            if traced {
                let mut attributes = vec![
                    KeyValue::new(if skipped { "backstop.target" } else { "backstop.fallback.from" }, from.clone()),
                    KeyValue::new(if skipped { "backstop.skip.reason" } else { "backstop.fallback.reason" }, reason),
                ];
                if let Some(to) = to.as_ref().filter(|_| !skipped) {
                    attributes.push(KeyValue::new("backstop.fallback.to", to.clone()));
                }
                let name = if skipped { "backstop.skipped" } else { "backstop.fallback" };
                events.push(Event::new(name, wall, attributes, 0));
            }
            let labels = [
                self.route_kv.clone(),
                KeyValue::new("backstop.fallback.from", from.clone()),
                KeyValue::new("backstop.fallback.reason", reason),
                KeyValue::new("backstop.fallback.to", to.clone().unwrap_or_default()),
            ];
            instruments.fallbacks.add(1, &labels);
            if *why == Why::Hedged {
                instruments.hedges.add(1, std::slice::from_ref(&self.route_kv));
            }
            if skipped {
                // A target out of rotation is passed over by every request until it returns:
                // its breaker's opening and closing are logged once each, not every pass.
                tracing::debug!(route = alias, target_label = %from, reason, "passed over");
                continue;
            }
            tracing::info!(route = alias, from = %from, to = %to.as_deref().unwrap_or("-"), reason, "fallback");
            recorder.telemetry.log(Some((trace, trace.server)), Severity::Info, "fallback", labels.to_vec());
        }
        for seam in &summary.seams {
            let mut labels = vec![
                self.route_kv.clone(),
                KeyValue::new("backstop.resume.from", seam.from.clone()),
                KeyValue::new("backstop.resume.to", seam.to.clone().unwrap_or_default()),
            ];
            instruments.resumes.add(1, &labels);
            if traced {
                labels.remove(0);
                labels.push(KeyValue::new("backstop.resume.reason", seam.class.as_str()));
                labels.push(KeyValue::new("backstop.resume.chars", seam.chars as i64));
                labels.push(KeyValue::new("backstop.resume.continued", seam.to.is_some()));
                events.push(Event::new("backstop.stream_resumed", self.wall_at(seam.at), labels, 0));
            }
        }
        if let Some(stop) = summary.record.stop.filter(|_| summary.record.stopped().is_some()) {
            if stop.is_budget() {
                instruments.budget_exhausted.add(1, std::slice::from_ref(&self.route_kv));
            }
            if traced {
                let reason = vec![KeyValue::new("backstop.stop.reason", stop.describe())];
                events.push(Event::new("backstop.stopped", wall, reason, 0));
            }
        }
        let outcome = match (answered_by, fallbacks.iter().any(|(_, _, why)| *why != Why::Hedged)) {
            (Some(_), false) => "answered",
            (Some(_), true) => "fell_through",
            (None, _) if attempts.is_empty() => "refused",
            (None, _) => "failed",
        };
        (events, outcome)
    }

    /// The request's metrics and, when traced, its SERVER span.
    fn request(
        &self,
        outcome: &'static str,
        status: u16,
        total_cost: Option<f64>,
        events: Vec<Event>,
        ended: Instant,
        stream_end: Option<&StreamEnd>,
    ) -> Option<SpanRecord> {
        let (summary, request, trace) = (self.summary, self.request, &self.observation.trace);
        let instruments = &self.observation.recorder.instruments;
        let attempts = summary.record.attempts.len();
        let mut labels = vec![self.route_kv.clone(), KeyValue::new("backstop.outcome", outcome)];
        if request.drill {
            // Drill traffic falls back on purpose: kept apart from the real fallback rate.
            labels.push(KeyValue::new("backstop.drill", true));
        }
        instruments.requests.add(1, &labels);
        instruments.attempts.record(attempts as u64, std::slice::from_ref(&self.route_kv));
        if !self.traced {
            return None;
        }
        let mut attributes = vec![
            KeyValue::new("gen_ai.operation.name", request.operation),
            KeyValue::new("gen_ai.request.model", request.model.clone()),
            self.route_kv.clone(),
            KeyValue::new("backstop.attempts", attempts as i64),
            KeyValue::new("backstop.outcome", outcome),
            KeyValue::new("http.response.status_code", i64::from(status)),
            KeyValue::new("gen_ai.request.stream", request.stream),
        ];
        attributes.extend(request.parameters.attributes());
        if request.drill {
            attributes.push(KeyValue::new("backstop.drill", true));
        }
        if let Some(target) = &summary.answered_by {
            attributes.push(KeyValue::new("backstop.target", target.label.clone()));
            attributes.push(KeyValue::new("gen_ai.provider.name", provider_name(target)));
            if let Some(model) = &summary.info.model {
                attributes.push(KeyValue::new("gen_ai.response.model", model.clone()));
            }
            // Every attempt of the answer counts, those before a seam included.
            let sum = |tokens: fn(&AnswerInfo) -> Option<u64>| {
                summary.seams.iter().map(|s| &s.info).chain([&summary.info]).filter_map(tokens).reduce(|a, b| a + b)
            };
            for (tokens, key) in [
                (sum(|info| info.input_tokens), "gen_ai.usage.input_tokens"),
                (sum(|info| info.output_tokens), "gen_ai.usage.output_tokens"),
            ] {
                if let Some(tokens) = tokens {
                    attributes.push(KeyValue::new(key, tokens as i64));
                }
            }
        }
        if !summary.record.left.is_empty() {
            attributes.push(KeyValue::new("backstop.fallback_reason", summary.record.fallback_reason()));
        }
        if let Some(cost) = total_cost {
            attributes.push(KeyValue::new("backstop.cost", cost));
        }
        let error = summary.error.or_else(|| match stream_end {
            Some(StreamEnd::Broke(class)) => Some(class.as_str()),
            _ => None,
        });
        if let Some(error) = error {
            attributes.push(KeyValue::new("error.type", error));
        }
        Some(SpanRecord {
            id: trace.server,
            parent: trace.parent,
            remote_parent: trace.parent.is_some(),
            kind: SpanKind::Server,
            name: format!("{} {}", request.operation, request.model),
            start: self.observation.wall,
            end: self.wall_at(ended),
            attributes,
            events,
            error: error.map(str::to_string),
        })
    }
}
