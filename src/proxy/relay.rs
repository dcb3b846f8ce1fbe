//! Relaying a committed upstream stream to the app as server-sent events, in the app's own
//! format, with an idle timeout between events. A failure after commit is sent as an error
//! event in the app's format and then the body is aborted, so no client mistakes a cut stream
//! for a finished one.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{StreamExt, stream};
use hyper::body::Frame;
use tokio::time::Instant;

use crate::health::Permit;
use crate::llm::FailureClass;
use crate::llm::{ChunkStream, StreamEvent};
use crate::net::body::{Body, BoxError};

/// One server-sent event: `event: NAME` when named, then the JSON `data` line.
pub fn encode(name: Option<&str>, data: &serde_json::Value) -> Bytes {
    let mut bytes = Vec::with_capacity(256);
    if let Some(name) = name {
        bytes.extend_from_slice(b"event: ");
        bytes.extend_from_slice(name.as_bytes());
        bytes.push(b'\n');
    }
    bytes.extend_from_slice(b"data: ");
    // Serializing a `Value` to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut bytes, data);
    bytes.extend_from_slice(b"\n\n");
    Bytes::from(bytes)
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
        rest: ChunkStream,
        renderer: R,
        tail: Tail,
    },
    Closing(std::vec::IntoIter<Bytes>),
    Failing(BoxError),
    Done,
}

/// How long a committed stream may run: `idle` between two events, and until `deadline` when
/// the policy caps a stream's length (`timeouts.maxStream`).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The longest gap between two events.
    pub idle: Duration,
    /// When the stream must end, if ever.
    pub deadline: Option<Instant>,
}

/// The response body for a committed stream: `held` events first, then the rest. The `tail`
/// learns how the stream ends; if the app goes away first, it is dropped (the permit uncounted,
/// the watcher told the stream was cancelled).
pub fn sse_body<R: StreamRenderer>(
    held: Vec<StreamEvent>,
    rest: ChunkStream,
    limits: Limits,
    renderer: R,
    tail: Tail,
) -> Body {
    let Limits { idle, deadline } = limits;
    let start = State::Live { pending: Vec::new().into_iter(), held: held.into_iter(), rest, renderer, tail };
    let frames = stream::unfold(start, move |state| async move {
        let mut state = state;
        loop {
            match state {
                State::Live { mut pending, mut held, mut rest, mut renderer, mut tail } => {
                    if let Some(frame) = pending.next() {
                        return Some((Ok(Frame::data(frame)), State::Live { pending, held, rest, renderer, tail }));
                    }
                    let next = match held.next() {
                        Some(event) => Ok(Some(Ok(event))),
                        None => {
                            let idle_until = Instant::now() + idle;
                            let until = deadline.map_or(idle_until, |d| idle_until.min(d));
                            tokio::time::timeout_at(until, rest.next()).await
                        }
                    };
                    state = match next {
                        Ok(Some(Ok(event))) => {
                            tail.event(&event);
                            let pending = renderer.event(&event).into_iter();
                            State::Live { pending, held, rest, renderer, tail }
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
                                idle.as_millis()
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
        let limits = Limits { idle: crate::chain::defaults::IDLE_TIMEOUT, deadline: None };
        let started = Instant::now();
        let body =
            sse_body(Vec::new(), upstream(Duration::from_secs(1), 180, false), limits, renderer(), Tail::default());
        let (frames, broken) = read(body).await;
        assert!(!broken, "a healthy stream is never cut: {:?}", frames.last());
        assert_eq!(frames.len(), 181, "180 chunks and [DONE]");
        assert_eq!(Instant::now() - started, Duration::from_secs(180));
    }

    #[tokio::test(start_paused = true)]
    async fn a_committed_stream_that_stalls_is_ended_with_an_error_after_idle() {
        let limits = Limits { idle: Duration::from_secs(60), deadline: None };
        let started = Instant::now();
        let body = sse_body(Vec::new(), upstream(Duration::from_secs(1), 3, true), limits, renderer(), Tail::default());
        let (frames, broken) = read(body).await;
        assert!(broken, "the app's SDK sees an error, not a clean end");
        assert!(frames.last().is_some_and(|f| f.contains("upstream sent nothing for 60000ms")), "{frames:?}");
        // The stall is timed from its last chunk, and the 10 ms flush before the abort.
        assert_eq!(Instant::now() - started, Duration::from_secs(63) + Duration::from_millis(10));
    }

    #[tokio::test(start_paused = true)]
    async fn max_stream_caps_a_stream_that_asks_for_one() {
        let started = Instant::now();
        let limits = Limits { idle: Duration::from_secs(60), deadline: Some(started + Duration::from_secs(30)) };
        let body =
            sse_body(Vec::new(), upstream(Duration::from_secs(1), 180, false), limits, renderer(), Tail::default());
        let (frames, broken) = read(body).await;
        assert!(broken);
        assert!(frames.last().is_some_and(|f| f.contains("maxStream")), "{frames:?}");
        assert_eq!(frames.len(), 30 + 1, "30 chunks, then the error event");
    }
}
