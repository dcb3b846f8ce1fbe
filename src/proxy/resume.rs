//! Continuing a committed stream on another target when it breaks (`midStream: continue`).
//!
//! Once a stream's first chunk has reached the app, a failure can no longer fall through
//! unseen: by default the app's stream ends with an error event. A route with
//! `midStream: continue` instead sends the conversation and the text already streamed to the
//! next target whose provider can continue an answer (an assistant prefill), and relays the
//! rest in the same response. The stream is relayed in the neutral shape (OpenAI chunks) so
//! that answers from targets of different APIs join into one stream in the app's format, with
//! nothing repeated or lost at the seam: trailing whitespace a prefill may not end with is
//! left out of it, and the continuation's leading whitespace already sent is not sent twice.
//!
//! Only text is continued: a request for JSON output, with `n` above 1, with Anthropic
//! `thinking` or from the Responses API is never armed, nor one an Anthropic app sent to an
//! Anthropic target (its events carry more than the neutral shape: server tools, citations,
//! every stop reason), nor one sent with `x-backstop-no-fallback`; a stream that has shown a
//! tool call or a refusal, or had already finished, fails as it would without the option. Each continuation is a walk of its
//! own, starting at the broken target's step and passing over every target that broke, within
//! the idle timeout and spending the route's retry budget.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{StreamExt, stream};
use serde_json::{Map, Value};
use tokio::time::Instant;

use super::fallback::{self, Answered, Chance, Committed, Controls, RequestRecord, Unanswered, Upstreams};
use super::relay::{RelayStream, Relayed};
use crate::health::Permit;
use crate::llm::{Api, AttemptError, ChatRequest, ChunkStream, FailureClass, Message, Operation, StreamEvent};
use crate::policy::MidStream;
use crate::provider::neutral::ToOpenAiStream;
use crate::provider::openai::stream::chunk_event;
use crate::snapshot::{Route, Target};
use crate::telemetry::genai::AnswerInfo;
use crate::telemetry::spans::TraceContext;

/// Where a stream broke, and where it went on.
#[derive(Debug)]
pub struct Seam {
    /// The target whose stream broke.
    pub from: Arc<Target>,
    /// The target that continues it; none when no target could.
    pub to: Option<Arc<Target>>,
    /// How it broke.
    pub class: FailureClass,
    /// What broke it.
    pub message: String,
    /// Characters of answer the app had before the seam.
    pub chars: usize,
    /// When it broke.
    pub at: Instant,
    /// The broken attempt's answer facts: its id, model and the tokens it reported.
    pub info: AnswerInfo,
    /// The continuation's walk: its attempts, the continuing one last, and the targets it
    /// passed over.
    pub record: RequestRecord,
}

impl Seam {
    /// The SSE comment that marks the seam in the app's stream (every SSE client ignores it).
    pub fn comment(&self) -> Option<Bytes> {
        let to = self.to.as_ref()?;
        Some(Bytes::from(format!(
            ": backstop resumed: {} broke ({}) after {} characters; continued by {}\n\n",
            self.from.label, self.class, self.chars, to.label
        )))
    }
}

/// A continuation that answered: its seam, and the new segment's held events, rest, permit
/// and idle timeout.
struct Continued {
    seam: Box<Seam>,
    held: Vec<StreamEvent>,
    rest: ChunkStream,
    permit: Option<Permit>,
    idle: Duration,
}

/// Why a request's stream is not continued when it breaks, if it is not.
pub fn not_continuable(request: &ChatRequest, ingress: Api) -> Option<&'static str> {
    if request.operation != Operation::Chat || !request.stream {
        return Some("not a streamed chat");
    }
    if !matches!(ingress, Api::OpenAi | Api::Anthropic) {
        return Some("the Responses API's streams are not continued");
    }
    let rest = &request.rest;
    if rest.get("response_format").and_then(|f| f.get("type")).and_then(Value::as_str).is_some_and(|t| t != "text") {
        return Some("JSON output is not continued");
    }
    if rest.get("n").and_then(Value::as_u64).is_some_and(|n| n > 1) {
        return Some("several choices are not continued");
    }
    if let Some(origin) = &request.origin
        && ["thinking", "output_format", "output_config"].iter().any(|field| origin.body.contains_key(*field))
    {
        return Some("thinking and structured output cannot be prefilled");
    }
    let prefill = request.messages.last().filter(|m| m.role == "assistant");
    if prefill.is_some_and(|m| !m.content.as_ref().is_none_or(Value::is_string)) {
        return Some("the app's own prefill is not plain text");
    }
    None
}

/// A committed stream armed to continue on another target when it breaks.
pub struct Resume {
    route: Arc<Route>,
    /// The app's request, as the continuations build on it.
    request: ChatRequest,
    upstreams: Upstreams,
    trace: TraceContext,
    /// The target streaming now, and what its events say.
    target: Arc<Target>,
    api: Api,
    translate: ToOpenAiStream,
    info: AnswerInfo,
    /// The answer's text the app has been sent.
    text: String,
    /// A tool call or refusal was streamed: the answer is not text alone, and never continued.
    not_text: bool,
    /// A finish reason was streamed: the answer is whole, and never continued.
    finished: bool,
    /// A drill's selectors, which continuations skip too.
    drill: Vec<String>,
    /// Whitespace the app already has that a continuation may begin with again.
    owed_whitespace: String,
    /// The first chunk's `id` and `created`, which the continuations' chunks carry too.
    identity: Option<(Value, Value)>,
    /// The targets whose stream broke, the latest last.
    broken: Vec<String>,
}

/// Arms a committed stream to continue on another target when it breaks, when its route asks
/// and the request can be continued: its held events are turned into the neutral shape, which
/// the rest of the stream is relayed in. Returns the state the relay needs to continue it.
pub fn arm(
    outcome: &mut Result<Answered, Unanswered>,
    route: &Arc<Route>,
    request: &ChatRequest,
    ingress: Api,
    controls: &Controls,
    through: (&Upstreams, &TraceContext),
) -> Option<Box<Resume>> {
    if route.mid_stream != MidStream::Continue {
        return None;
    }
    let Ok(Answered { target, reply: Committed::Stream { held, api, .. }, .. }) = outcome else { return None };
    let why = match not_continuable(request, ingress) {
        None if controls.no_fallback => Some("`x-backstop-no-fallback` keeps it on its first target"),
        None if ingress == Api::Anthropic && *api == Api::Anthropic => {
            Some("an Anthropic target's events reach an Anthropic app as they are")
        }
        why => why,
    };
    if let Some(why) = why {
        tracing::debug!(route = %route.alias, why, "this stream would not be continued if it broke");
        return None;
    }
    let (upstreams, trace) = through;
    let mut resume = Box::new(Resume {
        route: route.clone(),
        request: request.clone(),
        upstreams: upstreams.clone(),
        trace: trace.clone(),
        target: target.clone(),
        api: *api,
        translate: ToOpenAiStream::new(*api, true),
        info: AnswerInfo::default(),
        text: String::new(),
        not_text: false,
        finished: false,
        drill: controls.drill.clone(),
        owed_whitespace: String::new(),
        identity: None,
        broken: Vec::new(),
    });
    let raw = std::mem::take(held);
    for event in &raw {
        resume.info.observe_event(resume.api, event);
        let chunks = resume.translate.push(event);
        held.extend(resume.neutral(chunks));
    }
    *api = Api::OpenAi;
    Some(resume)
}

/// The segment of the stream being relayed.
struct Live {
    resume: Box<Resume>,
    /// Held events of a continuation, read before its rest.
    queued: VecDeque<StreamEvent>,
    rest: ChunkStream,
    permit: Option<Permit>,
    idle: Duration,
    out: VecDeque<Relayed>,
}

/// Where the relayed stream stands.
enum Phase {
    Live(Box<Live>),
    /// The last items: the end's chunks, or a failed continuation's seam and the error.
    Ending(std::vec::IntoIter<Result<Relayed, AttemptError>>),
}

impl Phase {
    fn ending(items: Vec<Result<Relayed, AttemptError>>) -> Option<(Result<Relayed, AttemptError>, Phase)> {
        let mut items = items.into_iter();
        items.next().map(|first| (first, Phase::Ending(items)))
    }
}

impl Resume {
    /// The relayed stream: `rest` of the committed stream from `permit`'s target, each gap
    /// bounded by `idle`, continued on another target whenever it breaks and can be.
    pub fn relay(self: Box<Self>, rest: ChunkStream, permit: Option<Permit>, idle: Duration) -> RelayStream {
        let live = Live { resume: self, queued: VecDeque::new(), rest, permit, idle, out: VecDeque::new() };
        Box::pin(stream::unfold(Phase::Live(Box::new(live)), |phase| async move {
            let mut live = match phase {
                Phase::Ending(mut items) => return items.next().map(|item| (item, Phase::Ending(items))),
                Phase::Live(live) => live,
            };
            loop {
                if let Some(item) = live.out.pop_front() {
                    return Some((Ok(item), Phase::Live(live)));
                }
                let next = match live.queued.pop_front() {
                    Some(event) => Some(Ok(event)),
                    None => match tokio::time::timeout(live.idle, live.rest.next()).await {
                        Ok(next) => next,
                        Err(_) => Some(Err(AttemptError::new(
                            FailureClass::Timeout,
                            format!("upstream sent nothing for {}ms", live.idle.as_millis()),
                        ))),
                    },
                };
                match next {
                    Some(Ok(event)) => {
                        let chunks = live.resume.translate.push(&event);
                        live.resume.info.observe_event(live.resume.api, &event);
                        let neutral = live.resume.neutral(chunks);
                        live.out.extend(neutral.into_iter().map(Relayed::Event));
                    }
                    None => {
                        if let Some(permit) = live.permit.take() {
                            permit.finished(Instant::now());
                        }
                        let chunks = live.resume.translate.finish();
                        let last = live.resume.neutral(chunks);
                        return Phase::ending(last.into_iter().map(|event| Ok(Relayed::Event(event))).collect());
                    }
                    Some(Err(error)) => {
                        let now = Instant::now();
                        if let Some(permit) = live.permit.take() {
                            permit.broke(now, error.class, &error.message);
                        }
                        match live.resume.continue_after(error, now, live.idle).await {
                            Ok(Continued { seam, held, rest, permit, idle }) => {
                                live.queued = held.into();
                                live.rest = rest;
                                live.permit = permit;
                                live.idle = idle;
                                live.out.push_back(Relayed::Resumed(seam));
                            }
                            Err((seam, error)) => {
                                let seam = seam.map(|seam| Ok(Relayed::Resumed(seam)));
                                return Phase::ending(seam.into_iter().chain([Err(error)]).collect());
                            }
                        }
                    }
                }
            }
        }))
    }

    /// Chunks of the segment streaming now, as the app is sent them: the first chunk's
    /// identity kept across seams, a continuation's role and repeated whitespace left out, and
    /// what the answer holds noted.
    fn neutral(&mut self, chunks: Vec<Value>) -> Vec<StreamEvent> {
        let continuation = !self.broken.is_empty();
        let mut out = Vec::with_capacity(chunks.len());
        for mut chunk in chunks {
            match &self.identity {
                None => self.identity = Some((chunk["id"].clone(), chunk["created"].clone())),
                Some((id, created)) => {
                    chunk["id"] = id.clone();
                    chunk["created"] = created.clone();
                }
            }
            if chunk.pointer("/choices/0/finish_reason").is_some_and(|f| !f.is_null()) {
                self.finished = true;
            }
            if let Some(delta) = chunk.pointer_mut("/choices/0/delta").and_then(Value::as_object_mut) {
                if continuation {
                    delta.remove("role");
                }
                if delta.get("tool_calls").is_some() || delta.get("refusal").is_some_and(|r| !r.is_null()) {
                    self.not_text = true;
                }
                if let Some(Value::String(text)) = delta.get_mut("content") {
                    while let Some(owed) = self.owed_whitespace.chars().next() {
                        match text.chars().next() {
                            Some(first) if first == owed => {
                                text.remove(0);
                                self.owed_whitespace.remove(0);
                            }
                            Some(_) => self.owed_whitespace.clear(),
                            None => break,
                        }
                    }
                    self.text.push_str(text);
                }
                if continuation && delta.get("content").and_then(Value::as_str) == Some("") {
                    delta.remove("content");
                }
            }
            let says_nothing = chunk["usage"].is_null()
                && chunk["choices"].as_array().is_some_and(|choices| {
                    choices
                        .iter()
                        .all(|c| c["finish_reason"].is_null() && c["delta"].as_object().is_none_or(Map::is_empty))
                });
            if !(continuation && says_nothing) {
                out.push(chunk_event(chunk));
            }
        }
        out
    }

    /// The request that continues the answer: the app's, with the text so far as the final
    /// assistant message (added to the app's own prefill, if it sent one), without the trailing
    /// whitespace a prefill may not end with.
    fn continuation(&mut self) -> ChatRequest {
        let mut next = self.request.clone();
        let prefilled = next.messages.last().filter(|m| m.role == "assistant").is_some();
        if !prefilled {
            next.messages.push(Message {
                role: "assistant".into(),
                content: Some(Value::String(String::new())),
                rest: Map::new(),
            });
        }
        let mut begun =
            next.messages.last().and_then(|m| m.content.as_ref()).and_then(Value::as_str).unwrap_or("").to_string();
        begun.push_str(&self.text);
        let trimmed = begun.trim_end().len();
        self.owed_whitespace = begun[trimmed..].to_string();
        begun.truncate(trimmed);
        if let Some(last) = next.messages.last_mut() {
            last.content = Some(Value::String(begun.clone()));
        }
        if let Some(origin) = &self.request.origin
            && origin.api == Api::Anthropic
        {
            let mut origin = (**origin).clone();
            if let Some(Value::Array(messages)) = origin.body.get_mut("messages") {
                if messages.last().is_some_and(|m| m["role"] == "assistant") {
                    messages.pop();
                }
                messages.push(serde_json::json!({"role": "assistant", "content": begun}));
            }
            next.origin = Some(Arc::new(origin));
        }
        next.continues = true;
        next
    }

    /// Continues the answer after the segment streaming now broke with `error`: a walk of its
    /// own, within one idle timeout. The new segment's seam, held events, rest, permit and idle
    /// timeout; or why not, with the seam of a continuation that was tried and failed.
    async fn continue_after(
        &mut self,
        error: AttemptError,
        now: Instant,
        idle: Duration,
    ) -> Result<Continued, (Option<Box<Seam>>, AttemptError)> {
        let chars = self.text.chars().count();
        let info = std::mem::take(&mut self.info);
        let from = self.target.clone();
        let in_main_chain = self.route.steps.iter().any(|step| step.members.iter().any(|m| m.label == from.label));
        let why_not = if self.not_text {
            Some("it holds a tool call or refusal")
        } else if self.finished {
            Some("it had already finished")
        } else if !in_main_chain {
            Some("it came from a special-purpose chain (`onContextWindowExceeded`, `onContentFiltered`)")
        } else {
            None
        };
        if let Some(why) = why_not {
            tracing::info!(route = %self.route.alias, target_label = %from.label, class = %error.class, why,
                "a stream broke mid-answer and is not continued");
            return Err((None, error));
        }
        self.broken.push(from.label.clone());
        let request = self.continuation();
        let controls = Controls {
            deadline: Some(idle),
            resume_after: self.broken.clone(),
            drill: self.drill.clone(),
            ..Controls::default()
        };
        let outcome = {
            let transport = self.upstreams.traced(&self.trace);
            fallback::run(&self.route, &request, &transport, controls, Chance::Random).await
        };
        let seam = |to: Option<Arc<Target>>, record: RequestRecord| {
            let mut record = record;
            // The broken target is passed over by construction: that is the seam, not a skip.
            record.left.retain(|left| !self.broken.contains(&left.target));
            Box::new(Seam {
                from: from.clone(),
                to,
                class: error.class,
                message: error.message.clone(),
                chars,
                at: now,
                info: info.clone(),
                record,
            })
        };
        match outcome {
            Ok(Answered { target, reply: Committed::Stream { held, rest, idle_timeout, api, permit, .. }, record }) => {
                tracing::info!(route = %self.route.alias, from = %from.label, to = %target.label, class = %error.class,
                    chars, "stream broke mid-answer and continues on another target");
                let seam = seam(Some(target.clone()), record);
                self.target = target;
                self.api = api;
                self.translate = ToOpenAiStream::new(api, true);
                Ok(Continued { seam, held, rest, permit, idle: idle_timeout })
            }
            Ok(Answered { record, .. }) => {
                let error =
                    AttemptError::new(error.class, format!("{}; its continuation was not a stream", error.message));
                Err((Some(seam(None, record)), error))
            }
            Err(unanswered) => {
                let record = unanswered.record();
                let why = match &unanswered {
                    Unanswered::Ineligible { .. } => "no other target can continue an answer".to_string(),
                    _ if record.attempts.is_empty() => {
                        record.stopped().unwrap_or("no target that can continue it is in rotation").to_string()
                    }
                    _ => format!("{} continuation attempt(s) failed", record.attempts.len()),
                };
                tracing::warn!(route = %self.route.alias, from = %from.label, class = %error.class, why = %why,
                    "stream broke mid-answer and could not be continued");
                let error = AttemptError::new(error.class, format!("{}; not continued: {why}", error.message));
                Err((Some(seam(None, record)), error))
            }
        }
    }
}
