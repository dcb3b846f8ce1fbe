//! Relaying a committed upstream stream to the app as server-sent events, in the app's own
//! format, with an idle timeout between events. A failure after commit is sent as an error
//! event in the app's format and then the body is aborted, so no client mistakes a cut stream
//! for a finished one. A stream that continues on another target after a failure
//! (`midStream: continue`, see [`resume`](crate::proxy::resume)) marks the seam with an SSE
//! comment, tells its watcher, and shows the app the usage of every attempt added up.

use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt, stream};
use hyper::body::Frame;
use tokio::time::{Instant, Sleep};

use crate::health::Permit;
use crate::llm::FailureClass;
use crate::llm::{AttemptError, ChunkStream, StreamEvent};
use crate::net::body::{Body, BoxError};
use crate::proxy::resume::Seam;

/// What a committed stream brings: an event, or the seam where it continued on another target.
pub enum Relayed {
    /// An event, in the stream's format.
    Event(StreamEvent),
    /// The answer broke and continues (or, with no `to`, failed to continue) on another target.
    Resumed(Box<Seam>),
}

/// A committed stream as the relay reads it.
pub type RelayStream = Pin<Box<dyn Stream<Item = Result<Relayed, AttemptError>> + Send>>;

/// An upstream stream with no seams.
pub fn plain(rest: ChunkStream) -> RelayStream {
    Box::pin(rest.map(|item| item.map(Relayed::Event)))
}

/// One server-sent event: `event: NAME` when named, then the JSON `data` line.
pub fn encode(name: Option<&str>, data: &serde_json::Value) -> Bytes {
    let mut bytes = head(name, 256);
    // Serializing a `Value` to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut bytes, data);
    bytes.extend_from_slice(b"\n\n");
    Bytes::from(bytes)
}

/// One server-sent event whose data is JSON text as a provider sent it. Text the provider spread
/// over several lines (JSON allows line breaks only between tokens) goes as several `data:`
/// lines, which an SSE client joins back into the same text.
pub fn encode_text(name: Option<&str>, text: &str) -> Bytes {
    let mut bytes = head(name, text.len() + 16);
    let mut lines = text.split(['\n', '\r']);
    bytes.extend_from_slice(lines.next().unwrap_or_default().as_bytes());
    for line in lines {
        bytes.extend_from_slice(b"\ndata: ");
        bytes.extend_from_slice(line.as_bytes());
    }
    bytes.extend_from_slice(b"\n\n");
    Bytes::from(bytes)
}

/// An event's opening: its name if it has one, and `data: `.
fn head(name: Option<&str>, capacity: usize) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(capacity);
    if let Some(name) = name {
        bytes.extend_from_slice(b"event: ");
        bytes.extend_from_slice(name.as_bytes());
        bytes.push(b'\n');
    }
    bytes.extend_from_slice(b"data: ");
    bytes
}

/// Writes one ingress API's stream format.
pub trait StreamRenderer: Send + 'static {
    /// SSE frames for one upstream event (none, one or several).
    fn event(&mut self, event: &StreamEvent) -> Vec<Bytes>;
    /// SSE frames that close a stream that ended cleanly.
    fn finish(&mut self) -> Vec<Bytes>;
    /// An error event for a stream cut after it began.
    fn failure(&mut self, message: &str, class: Option<FailureClass>) -> Bytes;
}

/// How a committed stream ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamEnd {
    /// Cleanly.
    Finished,
    /// The upstream failed after the first token.
    Broke(FailureClass),
    /// It reached the policy's `maxStream`.
    Cut,
    /// The app went away first.
    Cancelled,
}

/// What watches a committed stream: each event as it goes by, and how the stream ends.
pub trait StreamWatch: Send {
    /// An event, as the upstream sent it.
    fn event(&mut self, event: &StreamEvent);
    /// The end (called at most once; a watcher dropped without it was cancelled).
    fn end(&mut self, end: StreamEnd);
    /// The answer broke and continues on another target (or failed to).
    fn resumed(&mut self, _seam: &Seam) {}
}

/// Two watchers of one stream, each seeing every event and the end, the first first.
impl<A: StreamWatch, B: StreamWatch> StreamWatch for (A, B) {
    fn event(&mut self, event: &StreamEvent) {
        self.0.event(event);
        self.1.event(event);
    }

    fn end(&mut self, end: StreamEnd) {
        self.0.end(end);
        self.1.end(end);
    }

    fn resumed(&mut self, seam: &Seam) {
        self.0.resumed(seam);
        self.1.resumed(seam);
    }
}

/// A watcher that may not be there.
impl<W: StreamWatch> StreamWatch for Option<W> {
    fn event(&mut self, event: &StreamEvent) {
        if let Some(watch) = self {
            watch.event(event);
        }
    }

    fn end(&mut self, end: StreamEnd) {
        if let Some(watch) = self {
            watch.end(end);
        }
    }

    fn resumed(&mut self, seam: &Seam) {
        if let Some(watch) = self {
            watch.resumed(seam);
        }
    }
}

/// What rides along with a committed stream: the target's permit (its health learns how the
/// stream ends) and the request's watcher (its telemetry is recorded then).
#[derive(Default)]
pub struct Tail {
    /// The answering target's permit.
    pub permit: Option<Permit>,
    /// The watcher.
    pub watch: Option<Box<dyn StreamWatch>>,
}

impl Tail {
    fn event(&mut self, event: &StreamEvent) {
        if let Some(watch) = &mut self.watch {
            watch.event(event);
        }
    }

    fn resumed(&mut self, seam: &Seam) {
        if let Some(watch) = &mut self.watch {
            watch.resumed(seam);
        }
    }

    fn end(&mut self, end: StreamEnd, message: &str) {
        let now = Instant::now();
        match (self.permit.take(), end) {
            (Some(permit), StreamEnd::Finished) => permit.finished(now),
            (Some(permit), StreamEnd::Broke(class)) => permit.broke(now, class, message),
            // Cut by the request's own limit: the target is not to blame; its permit counts nothing.
            (permit, _) => drop(permit),
        }
        if let Some(watch) = &mut self.watch {
            watch.end(end);
        }
    }
}

enum State<R> {
    Live {
        pending: std::vec::IntoIter<Bytes>,
        held: std::vec::IntoIter<StreamEvent>,
        rest: RelayStream,
        renderer: R,
        tail: Tail,
        /// The usage of the attempts before each seam, added to the usage the app is shown.
        carried: Usage,
        /// One timer for the stream's life, moved on at each event: moving a timer later is a
        /// store, where a timeout made per event registers a timer and removes it again.
        timer: Option<Pin<Box<Sleep>>>,
    },
    Closing(std::vec::IntoIter<Bytes>),
    Failing(BoxError),
    Done,
}

/// How long a committed stream may run: `idle` between two events, and until `deadline` when
/// the policy caps a stream's length (`timeouts.maxStream`).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The longest gap between two events; none when the stream bounds its own gaps (a stream
    /// that continues on another target after one).
    pub idle: Option<Duration>,
    /// When the stream must end, if ever.
    pub deadline: Option<Instant>,
}

/// The response body for a committed stream: `held` events first, then the rest. The `tail`
/// learns how the stream ends; if the app goes away first, it is dropped (the permit uncounted,
/// the watcher told the stream was cancelled).
pub fn sse_body<R: StreamRenderer>(
    held: Vec<StreamEvent>,
    rest: RelayStream,
    limits: Limits,
    renderer: R,
    tail: Tail,
) -> Body {
    let Limits { idle, deadline } = limits;
    let start = State::Live {
        pending: Vec::new().into_iter(),
        held: held.into_iter(),
        rest,
        renderer,
        tail,
        carried: Usage::default(),
        timer: None,
    };
    let frames = stream::unfold(start, move |state| async move {
        let mut state = state;
        loop {
            match state {
                State::Live { mut pending, mut held, mut rest, mut renderer, mut tail, mut carried, mut timer } => {
                    if let Some(frame) = pending.next() {
                        let live = State::Live { pending, held, rest, renderer, tail, carried, timer };
                        return Some((Ok(Frame::data(frame)), live));
                    }
                    let next = match held.next() {
                        Some(event) => Ok(Some(Ok(Relayed::Event(event)))),
                        None => {
                            let idle_until = idle.map(|idle| Instant::now() + idle);
                            match idle_until.into_iter().chain(deadline).min() {
                                Some(until) => {
                                    let sleep = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
                                    sleep.as_mut().reset(until);
                                    tokio::select! {
                                        biased;
                                        next = rest.next() => Ok(next),
                                        () = sleep.as_mut() => Err(()),
                                    }
                                }
                                None => Ok(rest.next().await),
                            }
                        }
                    };
                    state = match next {
                        Ok(Some(Ok(Relayed::Event(mut event)))) => {
                            tail.event(&event);
                            carried.add_to(&mut event);
                            let pending = renderer.event(&event).into_iter();
                            State::Live { pending, held, rest, renderer, tail, carried, timer }
                        }
                        Ok(Some(Ok(Relayed::Resumed(seam)))) => {
                            tail.resumed(&seam);
                            carried.add(&seam.info);
                            let pending = seam.comment().into_iter().collect::<Vec<_>>().into_iter();
                            State::Live { pending, held, rest, renderer, tail, carried, timer }
                        }
                        Ok(None) => {
                            tail.end(StreamEnd::Finished, "");
                            State::Closing(renderer.finish().into_iter())
                        }
                        Ok(Some(Err(error))) => {
                            tracing::warn!(class = %error.class, error = %error.message, "stream failed after its first token");
                            tail.end(StreamEnd::Broke(error.class), &error.message);
                            let message = format!("stream interrupted after it began: {}", error.message);
                            let last = renderer.failure(&message, Some(error.class));
                            return Some((Ok(Frame::data(last)), State::Failing(message.into())));
                        }
                        Err(_) if deadline.is_some_and(|d| Instant::now() >= d) => {
                            let message =
                                "stream interrupted after it began: it reached the policy's `maxStream`".to_string();
                            tracing::warn!(error = %message, "stream cut at its maximum length");
                            // The request ran out of time, not the target: its permit counts nothing.
                            tail.end(StreamEnd::Cut, &message);
                            let last = renderer.failure(&message, None);
                            return Some((Ok(Frame::data(last)), State::Failing(message.into())));
                        }
                        Err(_) => {
                            let message = format!(
                                "stream interrupted after it began: upstream sent nothing for {}ms",
                                idle.unwrap_or_default().as_millis()
                            );
                            tracing::warn!(error = %message, "stream stalled after its first token");
                            tail.end(StreamEnd::Broke(FailureClass::Timeout), &message);
                            let last = renderer.failure(&message, None);
                            return Some((Ok(Frame::data(last)), State::Failing(message.into())));
                        }
                    };
                }
                State::Closing(mut frames) => {
                    return frames.next().map(|frame| (Ok(Frame::data(frame)), State::Closing(frames)));
                }
                State::Failing(error) => {
                    // Give the connection a moment to flush the error event: an aborted body
                    // discards whatever is still buffered.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    return Some((Err(error), State::Done));
                }
                State::Done => return None,
            }
        }
    });
    Body::new(http_body_util::StreamBody::new(frames))
}

/// Tokens the attempts before a seam used, which the app's usage (in the neutral shape a
/// continuing stream is relayed in) adds: the app pays for every attempt of its answer.
#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    input: u64,
    output: u64,
}

impl Usage {
    fn add(&mut self, info: &crate::telemetry::genai::AnswerInfo) {
        self.input += info.input_tokens.unwrap_or(0);
        self.output += info.output_tokens.unwrap_or(0);
    }

    /// Adds the carried tokens to a chunk's `usage`, if it has one.
    fn add_to(&self, chunk: &mut StreamEvent) {
        if (self.input == 0 && self.output == 0) || chunk.data().get("usage").is_none_or(|u| !u.is_object()) {
            return;
        }
        chunk.edit(|chunk| {
            let Some(usage) = chunk.get_mut("usage").and_then(serde_json::Value::as_object_mut) else { return };
            let mut bump = |field: &str, by: u64| {
                if let Some(n) = usage.get(field).and_then(serde_json::Value::as_u64) {
                    usage.insert(field.to_string(), serde_json::Value::from(n + by));
                }
            };
            bump("prompt_tokens", self.input);
            bump("completion_tokens", self.output);
            bump("total_tokens", self.input + self.output);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::{Api, AttemptError};
    use crate::provider::openai::stream::chunk_event;
    use crate::proxy::ingress::Dialect as _;
    use crate::proxy::ingress::openai::OpenAiDialect;
    use http_body_util::BodyExt;
    use serde_json::json;

    /// Content every `every` for `count` events, the last one finishing the answer; then the
    /// stream either ends or, with `stall`, goes silent.
    fn upstream(every: Duration, count: usize, stall: bool) -> ChunkStream {
        Box::pin(stream::unfold(0, move |n| async move {
            if n == count {
                if stall {
                    std::future::pending::<()>().await;
                }
                return None;
            }
            tokio::time::sleep(every).await;
            let finish = if n + 1 == count && !stall { json!("stop") } else { json!(null) };
            let chunk = json!({"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": finish}]});
            Some((Ok::<StreamEvent, AttemptError>(chunk_event(chunk)), n + 1))
        }))
    }

    /// Reads the whole body: the frames, and whether it ended with an error.
    async fn read(body: Body) -> (Vec<String>, bool) {
        let mut body = body;
        let mut frames = Vec::new();
        loop {
            match body.frame().await {
                Some(Ok(frame)) => {
                    frames.extend(frame.into_data().ok().map(|d| String::from_utf8_lossy(&d).into_owned()))
                }
                Some(Err(_)) => return (frames, true),
                None => return (frames, false),
            }
        }
    }

    fn renderer() -> <OpenAiDialect as crate::proxy::ingress::Dialect>::Renderer {
        let request = crate::proxy::ingress::openai::parse_chat(
            br#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream":true}"#,
        )
        .expect("request");
        OpenAiDialect::renderer(Api::OpenAi, &request)
    }

    #[tokio::test(start_paused = true)]
    async fn a_three_minute_stream_is_relayed_whole_under_the_defaults() {
        let limits = Limits { idle: Some(crate::chain::defaults::IDLE_TIMEOUT), deadline: None };
        let started = Instant::now();
        let body = sse_body(
            Vec::new(),
            plain(upstream(Duration::from_secs(1), 180, false)),
            limits,
            renderer(),
            Tail::default(),
        );
        let (frames, broken) = read(body).await;
        assert!(!broken, "a healthy stream is never cut: {:?}", frames.last());
        assert_eq!(frames.len(), 181, "180 chunks and [DONE]");
        assert_eq!(Instant::now() - started, Duration::from_secs(180));
    }

    #[tokio::test(start_paused = true)]
    async fn a_committed_stream_that_stalls_is_ended_with_an_error_after_idle() {
        let limits = Limits { idle: Some(Duration::from_secs(60)), deadline: None };
        let started = Instant::now();
        let body =
            sse_body(Vec::new(), plain(upstream(Duration::from_secs(1), 3, true)), limits, renderer(), Tail::default());
        let (frames, broken) = read(body).await;
        assert!(broken, "the app's SDK sees an error, not a clean end");
        assert!(frames.last().is_some_and(|f| f.contains("upstream sent nothing for 60000ms")), "{frames:?}");
        // The stall is timed from its last chunk, and the 10 ms flush before the abort.
        assert_eq!(Instant::now() - started, Duration::from_secs(63) + Duration::from_millis(10));
    }

    #[tokio::test(start_paused = true)]
    async fn max_stream_caps_a_stream_that_asks_for_one() {
        let started = Instant::now();
        let limits = Limits { idle: Some(Duration::from_secs(60)), deadline: Some(started + Duration::from_secs(30)) };
        let body = sse_body(
            Vec::new(),
            plain(upstream(Duration::from_secs(1), 180, false)),
            limits,
            renderer(),
            Tail::default(),
        );
        let (frames, broken) = read(body).await;
        assert!(broken);
        assert!(frames.last().is_some_and(|f| f.contains("maxStream")), "{frames:?}");
        assert_eq!(frames.len(), 30 + 1, "30 chunks, then the error event");
    }
}
