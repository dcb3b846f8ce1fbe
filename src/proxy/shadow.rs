//! Shadow comparison: a sampled share of a route's requests that its first target answered at
//! once is sent again, in the background, to the route's shadow target, and the two answers are
//! compared in telemetry: model, latency, tokens, cost, finish reason, the ratio of their
//! lengths, and whether their tool calls or JSON output match exactly.
//!
//! The app's answer is never touched: a shadow starts once the app has its whole answer (for a
//! stream, once the stream has ended), takes a slot of the route's bounded pool or does not run,
//! and does its work (the request's copy, both answers' reading) on its own task with its own
//! timeout. It never runs while the route is under failure: when this request was not answered
//! by its first target at its first attempt, or the route spent retry budget (retries,
//! fall-throughs, hedges, the apps' own retries) within the budget's window. Stateful Responses
//! requests are never shadowed, as a second one would change the app's state at OpenAI. Its
//! outcome feeds no breaker and no fleet state. Prompt and answer text are recorded only where
//! the policy's `captureContent` says so.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use opentelemetry::KeyValue;
use opentelemetry::logs::Severity;
use opentelemetry::metrics::{Counter, Histogram, Meter};
use opentelemetry::trace::SpanKind;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::fallback::{Answered, Committed, Transport as _, Unanswered, Upstreams};
use super::relay::{StreamEnd, StreamWatch};
use crate::llm::RequestFeature;
use crate::llm::request::STATEFUL;
use crate::llm::{Api, ChatRequest, Operation, Origin, Reply, StreamEvent, Whole};
use crate::provider::neutral::{self, ToOpenAiStream};
use crate::snapshot::{Route, Shadow, Target};
use crate::telemetry::Telemetry;
use crate::telemetry::genai::AnswerInfo;
use crate::telemetry::spans::{SpanRecord, TraceContext, new_span_id};

/// What every shadow comparison needs: telemetry to record into, the comparison's
/// instruments, and the upstream connections to send the shadow request on.
pub struct Shadows {
    telemetry: Arc<Telemetry>,
    instruments: Instruments,
    upstreams: Upstreams,
}

impl Shadows {
    /// Shadow comparisons recorded into `telemetry`, sent through `upstreams`.
    pub fn new(telemetry: Arc<Telemetry>, upstreams: Upstreams) -> Shadows {
        let instruments = Instruments::new(&telemetry.metrics.meter("backstop"));
        Shadows { telemetry, instruments, upstreams }
    }
}

/// The shadow comparison's instruments.
#[derive(Debug)]
pub struct Instruments {
    requests: Counter<u64>,
    length_ratio: Histogram<f64>,
    latency_ratio: Histogram<f64>,
    matches: Counter<u64>,
    cost: Counter<f64>,
}

impl Instruments {
    /// Registers them on `meter`.
    pub fn new(meter: &Meter) -> Instruments {
        Instruments {
            requests: meter
                .u64_counter("backstop.shadow.requests")
                .with_description(
                    "Sampled shadow requests, by route, shadow target and outcome (compared, failed, busy, \
                     underFailure, ineligible)",
                )
                .build(),
            length_ratio: meter
                .f64_histogram("backstop.shadow.length_ratio")
                .with_description("The shadow answer's length over the app's answer's, per comparison")
                .with_boundaries(vec![0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0])
                .build(),
            latency_ratio: meter
                .f64_histogram("backstop.shadow.latency_ratio")
                .with_description("The shadow answer's latency over the app's answer's, per comparison")
                .with_boundaries(vec![0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0])
                .build(),
            matches: meter
                .u64_counter("backstop.shadow.matches")
                .with_description("Comparisons of tool calls or JSON output, by whether the shadow's matched exactly")
                .build(),
            cost: meter
                .f64_counter("backstop.shadow.cost")
                .with_unit("USD")
                .with_description("What shadow requests cost at the policy's prices")
                .build(),
        }
    }
}

/// What a comparison reads of an answer: its length, its tool calls and its JSON, never kept
/// as text unless content capture is on.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Gist {
    /// Characters of text.
    pub chars: usize,
    /// Tool calls: name and parsed arguments.
    pub calls: Vec<(String, Value)>,
    /// The text, when captured.
    pub text: Option<String>,
    /// The text parsed as JSON (or as it is, when it is not JSON), when the request asked for
    /// JSON output.
    pub json: Option<Value>,
}

impl Gist {
    /// The gist of an OpenAI `chat.completion`'s first choice.
    pub fn of_completion(completion: &Value, capture: bool, structured: bool) -> Gist {
        let message = &completion["choices"][0]["message"];
        let text = match &message["content"] {
            Value::String(text) => text.clone(),
            Value::Array(parts) => parts.iter().filter_map(|p| p["text"].as_str()).collect(),
            _ => String::new(),
        };
        let calls = message["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|call| {
                let name = call["function"]["name"].as_str().unwrap_or_default();
                (name.to_string(), arguments(call["function"]["arguments"].as_str().unwrap_or_default()))
            })
            .collect();
        Gist::of(text, calls, capture, structured)
    }

    fn of(text: String, calls: Vec<(String, Value)>, capture: bool, structured: bool) -> Gist {
        Gist {
            chars: text.chars().count(),
            calls,
            json: structured.then(|| serde_json::from_str(&text).unwrap_or_else(|_| Value::String(text.clone()))),
            text: capture.then_some(text),
        }
    }

    /// Whether both answers called the same tools with the same arguments and gave the same
    /// JSON; `None` when the first is neither tool calls nor JSON output.
    fn exact_match(&self, other: &Gist) -> Option<bool> {
        (!self.calls.is_empty() || self.json.is_some()).then(|| self.calls == other.calls && self.json == other.json)
    }
}

/// Tool-call arguments as JSON, or as the string they were when they are not JSON.
fn arguments(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

/// Gathers a relayed stream's gist as its events pass.
pub struct StreamGist {
    translate: ToOpenAiStream,
    text: String,
    calls: BTreeMap<u64, (String, String)>,
}

impl StreamGist {
    /// For a stream of events in `api`'s format.
    pub fn new(api: Api) -> StreamGist {
        StreamGist { translate: ToOpenAiStream::new(api, false), text: String::new(), calls: BTreeMap::new() }
    }

    /// Reads one event.
    pub fn push(&mut self, event: &StreamEvent) {
        for chunk in self.translate.push(event) {
            let delta = &chunk["choices"][0]["delta"];
            if let Some(text) = delta["content"].as_str() {
                self.text.push_str(text);
            }
            for call in delta["tool_calls"].as_array().into_iter().flatten() {
                let entry = self.calls.entry(call["index"].as_u64().unwrap_or(0)).or_default();
                if let Some(name) = call["function"]["name"].as_str() {
                    entry.0.push_str(name);
                }
                if let Some(arguments) = call["function"]["arguments"].as_str() {
                    entry.1.push_str(arguments);
                }
            }
        }
    }

    fn finish(self, capture: bool, structured: bool) -> Gist {
        let calls = self.calls.into_values().map(|(name, args)| (name, arguments(&args))).collect();
        Gist::of(self.text, calls, capture, structured)
    }
}

/// One side of a comparison.
#[derive(Clone, Debug)]
pub struct Side {
    /// The target's label.
    pub target: String,
    /// What the answer says of itself (model, finish reason, tokens).
    pub info: AnswerInfo,
    /// From the attempt's start to the answer's end.
    pub latency: Duration,
    /// At the target's price, if the policy names one.
    pub cost: Option<f64>,
    /// Its gist.
    pub gist: Gist,
}

impl Side {
    fn attributes(&self, prefix: &str, into: &mut Vec<KeyValue>) {
        into.push(KeyValue::new(format!("{prefix}.target"), self.target.clone()));
        if let Some(model) = &self.info.model {
            into.push(KeyValue::new(format!("{prefix}.model"), model.clone()));
        }
        into.push(KeyValue::new(format!("{prefix}.latency"), self.latency.as_secs_f64()));
        for (name, tokens) in [("input_tokens", self.info.input_tokens), ("output_tokens", self.info.output_tokens)] {
            if let Some(tokens) = tokens {
                into.push(KeyValue::new(format!("{prefix}.{name}"), tokens as i64));
            }
        }
        if let Some(cost) = self.cost {
            into.push(KeyValue::new(format!("{prefix}.cost"), cost));
        }
        if let Some(reason) = self.info.finish_reasons.first() {
            into.push(KeyValue::new(format!("{prefix}.finish_reason"), reason.clone()));
        }
        into.push(KeyValue::new(format!("{prefix}.chars"), self.gist.chars as i64));
        if !self.gist.calls.is_empty() {
            into.push(KeyValue::new(format!("{prefix}.tool_calls"), self.gist.calls.len() as i64));
        }
        if let Some(text) = &self.gist.text {
            into.push(KeyValue::new(format!("{prefix}.text"), text.clone()));
        }
    }
}

/// A request chosen for shadowing. The app's request reaches it once the app's response is
/// built (the shadow's copy is made on the shadow's own task).
pub struct Pending {
    shadow: Arc<Shadow>,
    alias: String,
    target: Arc<Target>,
    request: oneshot::Receiver<ChatRequest>,
    structured: bool,
    trace: TraceContext,
    shadows: Arc<Shadows>,
}

/// The app's answer, as the comparison receives it.
pub enum Primary {
    /// A whole answer, read on the shadow's task.
    Whole {
        /// The target that answered.
        target: Arc<Target>,
        /// Its wire format.
        api: Api,
        /// The answer (its bytes, when it has them: a reference, not a copy).
        body: Whole,
        /// How long its attempt took.
        latency: Duration,
    },
    /// A stream, already read as it was relayed.
    Read(Side),
}

/// Notes why a sampled request was not shadowed.
fn skipped(shadows: &Shadows, alias: &str, target: &str, why: &'static str) {
    shadows.instruments.requests.add(1, &labels(alias, target, why));
    tracing::debug!(route = alias, target_label = target, reason = why, "shadow skipped");
}

fn labels(alias: &str, target: &str, outcome: &'static str) -> [KeyValue; 3] {
    [
        KeyValue::new("backstop.route", alias.to_string()),
        KeyValue::new("backstop.shadow.target", target.to_string()),
        KeyValue::new("backstop.shadow.outcome", outcome),
    ]
}

/// Chooses whether `request`, answered by `outcome` on `route`, is shadowed: a sampled share of
/// the requests its first target answered at once, while the route is not under failure, when
/// the shadow target can take the request. The sender takes the app's request once its
/// response is built.
pub fn sample(
    shadows: &Arc<Shadows>,
    route: &Route,
    request: &ChatRequest,
    outcome: &Result<Answered, Unanswered>,
    trace: &TraceContext,
) -> Option<(Pending, oneshot::Sender<ChatRequest>)> {
    let shadow = route.shadow.as_ref().filter(|s| !s.targets.is_empty())?;
    let Ok(answered) = outcome else { return None };
    if request.operation != Operation::Chat || rand::random::<f64>() >= shadow.share {
        return None;
    }
    let target = shadow.targets[rand::random_range(0..shadow.targets.len())].clone();
    let alias = route.alias.as_str();
    let record = &answered.record;
    if record.attempts.len() != 1 || !record.left.is_empty() || route.budget.strained(Instant::now()) {
        skipped(shadows, alias, &target.label, "underFailure");
        return None;
    }
    let stateful = request.origin.as_ref().is_some_and(|o| o.unportable.iter().any(|f| f == STATEFUL));
    if stateful || target.provider.unsupported(request).or_else(|| target.skip_for(request)).is_some() {
        skipped(shadows, alias, &target.label, "ineligible");
        return None;
    }
    let (send, receive) = oneshot::channel();
    let pending = Pending {
        shadow: shadow.clone(),
        alias: route.alias.clone(),
        structured: request.uses(RequestFeature::StructuredOutput),
        target,
        request: receive,
        trace: trace.clone(),
        shadows: shadows.clone(),
    };
    Some((pending, send))
}

/// The same request, asking for a whole answer.
fn non_streamed(request: &ChatRequest) -> ChatRequest {
    let mut copy = request.clone();
    copy.stream = false;
    copy.rest.remove("stream_options");
    if let Some(origin) = &request.origin {
        let mut body = origin.body.clone();
        body.remove("stream");
        copy.origin = Some(Arc::new(Origin { body, ..Origin::clone(origin) }));
    }
    copy
}

fn last_user_text(request: &ChatRequest) -> String {
    let Some(message) = request.messages.iter().rev().find(|m| m.role == "user") else { return String::new() };
    match &message.content {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => parts.iter().filter_map(|p| p["text"].as_str()).collect(),
        _ => String::new(),
    }
}

impl Primary {
    /// A whole answer, for the comparison to read later; `None` for a stream.
    pub fn of(answered: &Answered) -> Option<Primary> {
        let Committed::Complete { body, api } = &answered.reply else { return None };
        // The bytes alone, when there are bytes: decoded, if ever, when the comparison reads them.
        let body = body.raw.clone().map_or_else(|| body.clone(), Whole::undecoded);
        let latency = answered.record.attempts.last()?.elapsed;
        Some(Primary::Whole { target: answered.target.clone(), api: *api, body, latency })
    }

    fn read(self, capture: bool, structured: bool) -> Side {
        match self {
            Primary::Read(side) => side,
            Primary::Whole { target, api, body, latency } => {
                let info = AnswerInfo::of_whole(api, &body);
                let json = body.into_json();
                let completion = neutral::into_openai_completion(api, json);
                Side {
                    target: target.label.clone(),
                    cost: info.cost(target.price.as_ref()),
                    info,
                    latency,
                    gist: Gist::of_completion(&completion, capture, structured),
                }
            }
        }
    }
}

impl Pending {
    /// Sends the shadow request on its own task, if a slot of the pool is free, and records
    /// the comparison with `primary`.
    pub fn launch(self, primary: Primary) {
        let Ok(slot) = self.shadow.slots.clone().try_acquire_owned() else {
            skipped(&self.shadows, &self.alias, &self.target.label, "busy");
            return;
        };
        tokio::spawn(async move {
            // The app's answer is on its way first.
            tokio::task::yield_now().await;
            self.run(primary).await;
            drop(slot);
        });
    }

    async fn run(mut self, primary: Primary) {
        let Ok(request) = (&mut self.request).await else { return };
        let request = non_streamed(&request);
        let prompt = self.shadow.capture_content.then(|| last_user_text(&request));
        let primary = primary.read(self.shadow.capture_content, self.structured);
        let span = new_span_id();
        let (wall, started) = (SystemTime::now(), Instant::now());
        let transport = self.shadows.upstreams.traced(&self.trace);
        let sent = tokio::time::timeout(self.shadow.timeout, transport.send(&self.target, &request, span)).await;
        let latency = started.elapsed();
        let shadow = match sent {
            Ok(Ok(sent)) => match sent.reply {
                Reply::Complete(whole) => {
                    let info = AnswerInfo::of_whole(sent.api, &whole);
                    let completion = neutral::to_openai_completion(sent.api, whole.json());
                    Ok(Side {
                        target: self.target.label.clone(),
                        cost: info.cost(self.target.price.as_ref()),
                        info,
                        latency,
                        gist: Gist::of_completion(&completion, self.shadow.capture_content, self.structured),
                    })
                }
                Reply::Stream(_) => Err("serverError".to_string()),
            },
            Ok(Err(error)) => Err(error.class.as_str().to_string()),
            Err(_) => Err("timeout".to_string()),
        };
        self.record(&primary, shadow, prompt, span, wall, wall + latency);
    }

    fn record(
        &self,
        primary: &Side,
        shadow: Result<Side, String>,
        prompt: Option<String>,
        span: opentelemetry::trace::SpanId,
        start: SystemTime,
        end: SystemTime,
    ) {
        let instruments = &self.shadows.instruments;
        let alias = self.alias.as_str();
        let mut attributes = vec![KeyValue::new("backstop.route", self.alias.clone())];
        primary.attributes("backstop.shadow.primary", &mut attributes);
        if let Some(prompt) = prompt {
            attributes.push(KeyValue::new("backstop.shadow.prompt", prompt));
        }
        let error = match &shadow {
            Ok(side) => {
                side.attributes("backstop.shadow", &mut attributes);
                let length_ratio = ratio(side.gist.chars as f64, primary.gist.chars as f64);
                let latency_ratio = ratio(side.latency.as_secs_f64(), primary.latency.as_secs_f64());
                attributes.push(KeyValue::new("backstop.shadow.length_ratio", length_ratio));
                attributes.push(KeyValue::new("backstop.shadow.latency_ratio", latency_ratio));
                let route_target = [
                    KeyValue::new("backstop.route", self.alias.clone()),
                    KeyValue::new("backstop.shadow.target", side.target.clone()),
                ];
                instruments.length_ratio.record(length_ratio, &route_target);
                instruments.latency_ratio.record(latency_ratio, &route_target);
                if let Some(matched) = primary.gist.exact_match(&side.gist) {
                    attributes.push(KeyValue::new("backstop.shadow.exact_match", matched));
                    let mut labels = route_target.to_vec();
                    labels.push(KeyValue::new("backstop.shadow.match", matched));
                    instruments.matches.add(1, &labels);
                }
                if let Some(cost) = side.cost {
                    instruments.cost.add(cost, &route_target);
                }
                instruments.requests.add(1, &labels(alias, &side.target, "compared"));
                None
            }
            Err(class) => {
                attributes.push(KeyValue::new("backstop.shadow.target", self.target.label.clone()));
                attributes.push(KeyValue::new("error.type", class.clone()));
                instruments.requests.add(1, &labels(alias, &self.target.label, "failed"));
                Some(format!("{}: {class}", self.target.label))
            }
        };
        tracing::debug!(route = alias, target_label = %self.target.label, failed = error.is_some(), "shadow compared");
        self.shadows.telemetry.log(Some((&self.trace, span)), Severity::Info, "shadow comparison", attributes.clone());
        if self.trace.sampled {
            let record = SpanRecord {
                id: span,
                parent: Some(self.trace.server),
                remote_parent: false,
                kind: SpanKind::Client,
                name: format!("shadow {}", self.target.model),
                start,
                end,
                attributes,
                events: Vec::new(),
                error,
            };
            self.shadows.telemetry.export(&self.trace, vec![record]);
        }
    }
}

/// A shadow comparison waiting for the app's stream to end: the stream's gist and facts are
/// gathered as it is relayed, and the shadow request starts once it has ended well.
pub struct StreamShadow {
    pending: Option<Pending>,
    target: Arc<Target>,
    api: Api,
    started: Instant,
    info: AnswerInfo,
    gist: StreamGist,
}

impl StreamShadow {
    /// Waits for the end of the stream `answered` committed to; `None` when it is not a stream.
    pub fn new(pending: Pending, answered: &Answered) -> Option<StreamShadow> {
        let Committed::Stream { api, .. } = &answered.reply else { return None };
        let started = answered.record.attempts.last()?.started;
        Some(StreamShadow {
            pending: Some(pending),
            target: answered.target.clone(),
            api: *api,
            started,
            info: AnswerInfo::default(),
            gist: StreamGist::new(*api),
        })
    }
}

impl StreamWatch for StreamShadow {
    fn event(&mut self, event: &StreamEvent) {
        self.info.observe_event(self.api, event);
        self.gist.push(event);
    }

    fn end(&mut self, end: StreamEnd) {
        let Some(pending) = self.pending.take() else { return };
        if end != StreamEnd::Finished {
            return;
        }
        let info = std::mem::take(&mut self.info);
        let gist = std::mem::replace(&mut self.gist, StreamGist::new(self.api));
        let primary = Primary::Read(Side {
            target: self.target.label.clone(),
            cost: info.cost(self.target.price.as_ref()),
            info,
            latency: self.started.elapsed(),
            gist: gist.finish(pending.shadow.capture_content, pending.structured),
        });
        pending.launch(primary);
    }
}

/// `a / b`, 1 when both are zero and `a` when only `b` is (rather than infinity).
fn ratio(a: f64, b: f64) -> f64 {
    match (a, b) {
        (0.0, 0.0) => 1.0,
        (a, 0.0) => a,
        (a, b) => a / b,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn completion(content: Value, calls: Value) -> Value {
        json!({"choices": [{"message": {"role": "assistant", "content": content, "tool_calls": calls}}]})
    }

    #[test]
    fn tool_calls_and_json_match_by_meaning_not_by_bytes() {
        let call = |args: &str| json!([{"function": {"name": "get_weather", "arguments": args}}]);
        let a =
            Gist::of_completion(&completion(Value::Null, call("{\"city\": \"Paris\", \"unit\": \"c\"}")), false, false);
        let b =
            Gist::of_completion(&completion(Value::Null, call("{\"unit\":\"c\",\"city\":\"Paris\"}")), false, false);
        let c = Gist::of_completion(&completion(Value::Null, call("{\"city\":\"Lyon\"}")), false, false);
        assert_eq!((a.exact_match(&b), a.exact_match(&c)), (Some(true), Some(false)));

        let json_a = Gist::of_completion(&completion(json!("{\"ok\": true, \"n\": 1}"), Value::Null), false, true);
        let json_b = Gist::of_completion(&completion(json!("{\"n\":1,\"ok\":true}"), Value::Null), false, true);
        assert_eq!(json_a.exact_match(&json_b), Some(true));
        let prose_a = Gist::of_completion(&completion(json!("not json"), Value::Null), false, true);
        let prose_b = Gist::of_completion(&completion(json!("other prose"), Value::Null), false, true);
        assert_eq!(prose_a.exact_match(&prose_b), Some(false), "two answers that are not JSON do not match");

        let text = Gist::of_completion(&completion(json!("héllo"), Value::Null), false, false);
        assert_eq!(
            (text.chars, text.exact_match(&prose_a), text.text),
            (5, None, None),
            "prose is compared by length only"
        );
        assert_eq!(Gist::of_completion(&completion(json!("hi"), Value::Null), true, false).text.as_deref(), Some("hi"));
    }

    #[test]
    fn a_stream_s_gist_is_its_text_and_its_assembled_tool_calls() {
        let mut gist = StreamGist::new(Api::OpenAi);
        let chunk =
            |delta: Value| StreamEvent::new(json!({"choices": [{"index": 0, "delta": delta}]}), true, true, false);
        gist.push(&chunk(json!({"content": "Hel"})));
        gist.push(&chunk(json!({"content": "lo"})));
        gist.push(&chunk(json!({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": "{\"a\""}}]})));
        gist.push(&chunk(json!({"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]})));
        let gist = gist.finish(true, false);
        assert_eq!(gist.text.as_deref(), Some("Hello"));
        assert_eq!(gist.calls, [("f".to_string(), json!({"a": 1}))]);
    }

    #[test]
    fn ratios_stay_finite() {
        assert_eq!((ratio(2.0, 4.0), ratio(0.0, 0.0), ratio(3.0, 0.0)), (0.5, 1.0, 3.0));
    }
}
