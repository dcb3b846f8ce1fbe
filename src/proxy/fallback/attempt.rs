//! One attempt at one target, bounded in time, through a [`Transport`]: a whole answer within
//! the attempt timeout, or a stream read up to its first content chunk within the first-token
//! timeout, so that the decision to fall through is made before anything reaches the app.

use std::future::Future;
use std::time::Duration;

use futures_util::{StreamExt, stream};
use opentelemetry::trace::SpanId;
use tokio::time::Instant;

use super::outcome::Committed;
use crate::llm::FailureClass;
use crate::llm::ratelimit::Headroom;
use crate::llm::{AttemptError, ChatRequest, ChunkStream, Reply};
use crate::net::client::HttpClient;
use crate::provider::{Call, Sent};
use crate::snapshot::{Route, Target};
use crate::telemetry::spans::TraceContext;

/// How an attempt reaches a target: the live upstreams in the sidecar, a scripted fake in the
/// fallback loop's tests.
pub trait Transport: Sync {
    /// Sends `request` to `target`. A `Stream` reply has answered with a 2xx but may still
    /// fail before its first chunk; the caller bounds every wait.
    /// `span` is the attempt's own span, whose id goes upstream as its `traceparent`.
    fn send(
        &self,
        target: &Target,
        request: &ChatRequest,
        span: SpanId,
    ) -> impl Future<Output = Result<Sent, AttemptError>> + Send;
}

/// The live upstreams: each target's provider, over the shared HTTP client.
#[derive(Clone)]
pub struct Upstreams {
    http: HttpClient,
}

impl Upstreams {
    /// Upstreams reached through `http`.
    pub fn new(http: HttpClient) -> Self {
        Upstreams { http }
    }

    /// The shared HTTP client.
    pub fn http(&self) -> &HttpClient {
        &self.http
    }

    /// The upstreams as one request in trace `trace` reaches them.
    pub fn traced<'a>(&'a self, trace: &'a TraceContext) -> Traced<'a> {
        Traced { http: &self.http, trace }
    }
}

/// The upstreams for one request: each attempt's `traceparent` names its span in the
/// request's trace.
pub struct Traced<'a> {
    http: &'a HttpClient,
    trace: &'a TraceContext,
}

impl Transport for Traced<'_> {
    async fn send(&self, target: &Target, request: &ChatRequest, span: SpanId) -> Result<Sent, AttemptError> {
        let trace = self.trace.upstream(span);
        target
            .provider
            .send(Call {
                http: self.http,
                model: &target.model,
                request,
                key: target.key,
                trace: &trace,
                adapt: target.adapt.as_ref(),
            })
            .await
    }
}

/// A `Duration` in whole milliseconds, for logs and messages.
pub(super) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// One attempt at one target, bounded in time. A stream is read up to its first content chunk.
pub(super) async fn attempt(
    target: &Target,
    route: &Route,
    request: &ChatRequest,
    transport: &impl Transport,
    deadline: Instant,
    span: SpanId,
) -> Result<(Committed, Headroom), AttemptError> {
    let started = Instant::now();
    if !request.stream {
        let limit = (started + target.attempt_timeout).min(deadline);
        return match tokio::time::timeout_at(limit, transport.send(target, request, span)).await {
            Ok(Ok(sent)) => match sent.reply {
                Reply::Complete(body) => Ok((Committed::Complete { body, api: sent.api }, sent.headroom)),
                Reply::Stream(_) => Err(AttemptError::new(
                    FailureClass::ServerError,
                    "upstream streamed an answer that was not asked to stream",
                )),
            },
            Ok(Err(error)) => Err(error),
            Err(_) => Err(timed_out(
                format!("no answer within {}ms", millis(limit.saturating_duration_since(started))),
                limit >= deadline,
            )),
        };
    }
    // A stream: its first progress within `firstToken` (capped by the target's own timeout),
    // then no gap longer than `idle` until its first content chunk, all within the deadline.
    let first_token = (started + route.timeouts.first_token.min(target.attempt_timeout)).min(deadline);
    let silent = |limit: Instant, progressed: bool| {
        let waited = millis(limit.saturating_duration_since(started));
        let message = if progressed {
            format!("stream stalled before its first content chunk: nothing for {}ms", millis(route.timeouts.idle))
        } else {
            format!("no first token within {waited}ms")
        };
        timed_out(message, limit >= deadline)
    };
    let sent = match tokio::time::timeout_at(first_token, transport.send(target, request, span)).await {
        Ok(sent) => sent?,
        Err(_) => return Err(silent(first_token, false)),
    };
    let mut stream = match sent.reply {
        Reply::Stream(stream) => stream,
        Reply::Complete(_) => {
            return Err(AttemptError::new(FailureClass::ServerError, "upstream did not stream the answer"));
        }
    };
    let mut held = Vec::new();
    let mut progressed = false;
    let mut limit = first_token;
    loop {
        let next = match tokio::time::timeout_at(limit, stream.next()).await {
            Ok(next) => next,
            Err(_) => return Err(silent(limit, progressed)),
        };
        match next {
            Some(Ok(event)) => {
                progressed |= event.progress;
                if progressed {
                    limit = (Instant::now() + route.timeouts.idle).min(deadline);
                }
                let commit = event.content || event.end;
                held.push(event);
                if commit {
                    break;
                }
            }
            Some(Err(error)) => return Err(error),
            None => {
                stream = Box::pin(stream::empty()) as ChunkStream;
                break;
            }
        }
    }
    let stream_deadline = route.timeouts.max_stream.map(|max| Instant::now() + max);
    let committed = Committed::Stream {
        held,
        rest: stream,
        idle_timeout: route.timeouts.idle,
        api: sent.api,
        permit: None,
        stream_deadline,
    };
    Ok((committed, sent.headroom))
}

fn timed_out(message: String, cut_by_deadline: bool) -> AttemptError {
    let mut error = AttemptError::new(FailureClass::Timeout, message);
    error.cut_by_deadline = cut_by_deadline;
    error
}
