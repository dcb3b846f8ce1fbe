//! Relaying a committed upstream stream to the app as server-sent events, in the app's own
//! format, with an idle timeout between events. A failure after commit is sent as an error
//! event in the app's format and then the body is aborted, so no client mistakes a cut stream
//! for a finished one.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{StreamExt, stream};
use hyper::body::Frame;
use tokio::time::Instant;

use super::body::{Body, BoxError};
use crate::health::Permit;
use crate::llm::{ChunkStream, StreamEvent};
use crate::policy::FailureClass;

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

enum State<R> {
    Live {
        pending: std::vec::IntoIter<Bytes>,
        held: std::vec::IntoIter<StreamEvent>,
        rest: ChunkStream,
        renderer: R,
        permit: Option<Permit>,
    },
    Closing(std::vec::IntoIter<Bytes>),
    Failing(BoxError),
    Done,
}

/// How long a committed stream may run: `idle` between two events, and until the request's
/// total `deadline`.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The longest gap between two events.
    pub idle: Duration,
    /// The request's total deadline.
    pub deadline: Instant,
}

/// The response body for a committed stream: `held` events first, then the rest. The target's
/// `permit` learns how the stream ends; if the app goes away first, it is dropped uncounted.
pub fn sse_body<R: StreamRenderer>(
    held: Vec<StreamEvent>,
    rest: ChunkStream,
    limits: Limits,
    renderer: R,
    permit: Option<Permit>,
) -> Body {
    let Limits { idle, deadline } = limits;
    let start = State::Live { pending: Vec::new().into_iter(), held: held.into_iter(), rest, renderer, permit };
    let frames = stream::unfold(start, move |state| async move {
        let mut state = state;
        loop {
            match state {
                State::Live { mut pending, mut held, mut rest, mut renderer, mut permit } => {
                    if let Some(frame) = pending.next() {
                        return Some((Ok(Frame::data(frame)), State::Live { pending, held, rest, renderer, permit }));
                    }
                    let next = match held.next() {
                        Some(event) => Ok(Some(Ok(event))),
                        None => tokio::time::timeout_at((Instant::now() + idle).min(deadline), rest.next()).await,
                    };
                    state = match next {
                        Ok(Some(Ok(event))) => {
                            let pending = renderer.event(&event).into_iter();
                            State::Live { pending, held, rest, renderer, permit }
                        }
                        Ok(None) => {
                            if let Some(permit) = permit.take() {
                                permit.finished(Instant::now());
                            }
                            State::Closing(renderer.finish().into_iter())
                        }
                        Ok(Some(Err(error))) => {
                            tracing::warn!(class = %error.class, error = %error.message, "stream failed after its first token");
                            if let Some(permit) = permit.take() {
                                permit.broke(Instant::now(), error.class, &error.message);
                            }
                            let message = format!("stream interrupted after it began: {}", error.message);
                            let last = renderer.failure(&message, Some(error.class));
                            return Some((Ok(Frame::data(last)), State::Failing(message.into())));
                        }
                        Err(_) if Instant::now() >= deadline => {
                            let message =
                                "stream interrupted after it began: the request's deadline ran out".to_string();
                            tracing::warn!(error = %message, "stream cut at the request's deadline");
                            // The request ran out of time, not the target: its permit counts nothing.
                            drop(permit);
                            let last = renderer.failure(&message, None);
                            return Some((Ok(Frame::data(last)), State::Failing(message.into())));
                        }
                        Err(_) => {
                            let message = format!(
                                "stream interrupted after it began: upstream sent nothing for {}ms",
                                idle.as_millis()
                            );
                            tracing::warn!(error = %message, "stream stalled after its first token");
                            if let Some(permit) = permit.take() {
                                permit.broke(Instant::now(), FailureClass::Timeout, &message);
                            }
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
