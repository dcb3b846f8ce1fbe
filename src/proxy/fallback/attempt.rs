//! One attempt at one target, bounded in time, through a [`Transport`]: a whole answer within
//! the attempt timeout, or a stream read up to its first content chunk within the first-token
//! timeout, so that the decision to fall through is made before anything reaches the app.

use std::future::Future;
use std::time::Duration;

use futures_util::{StreamExt, stream};
use tokio::time::Instant;

use super::outcome::Committed;
use crate::llm::ratelimit::Headroom;
use crate::llm::{AttemptError, ChatRequest, ChunkStream, Reply};
use crate::policy::FailureClass;
use crate::provider::{Call, HttpClient, Sent};
use crate::snapshot::{Route, Target};

/// How an attempt reaches a target: the live upstreams in the sidecar, a scripted fake in the
/// fallback loop's tests.
pub trait Transport: Sync {
    /// Sends `request` to `target`. A `Stream` reply has answered with a 2xx but may still
    /// fail before its first chunk; the caller bounds every wait.
    fn send(&self, target: &Target, request: &ChatRequest) -> impl Future<Output = Result<Sent, AttemptError>> + Send;
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
}

impl Transport for Upstreams {
    async fn send(&self, target: &Target, request: &ChatRequest) -> Result<Sent, AttemptError> {
        target.provider.send(Call { http: &self.http, model: &target.model, request, key: target.key }).await
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
) -> Result<(Committed, Headroom), AttemptError> {
    let started = Instant::now();
    if !request.stream {
        let limit = (started + target.attempt_timeout).min(deadline);
        return match tokio::time::timeout_at(limit, transport.send(target, request)).await {
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
    let first_token = route.timeouts.first_token.min(target.attempt_timeout);
    let limit = (started + first_token).min(deadline);
    let opening = async {
        let sent = transport.send(target, request).await?;
        let mut stream = match sent.reply {
            Reply::Stream(stream) => stream,
            Reply::Complete(_) => {
                return Err(AttemptError::new(FailureClass::ServerError, "upstream did not stream the answer"));
            }
        };
        let mut held = Vec::new();
        loop {
            match stream.next().await {
                Some(Ok(event)) => {
                    let commit = event.content || event.end;
                    held.push(event);
                    if commit {
                        return Ok((held, stream, sent.headroom, sent.api));
                    }
                }
                Some(Err(error)) => return Err(error),
                None => return Ok((held, Box::pin(stream::empty()) as ChunkStream, sent.headroom, sent.api)),
            }
        }
    };
    match tokio::time::timeout_at(limit, opening).await {
        Ok(Ok((held, rest, headroom, api))) => Ok((
            Committed::Stream { held, rest, idle_timeout: target.attempt_timeout, api, permit: None, deadline },
            headroom,
        )),
        Ok(Err(error)) => Err(error),
        Err(_) => Err(timed_out(
            format!("no first token within {}ms", millis(limit.saturating_duration_since(started))),
            limit >= deadline,
        )),
    }
}

fn timed_out(message: String, cut_by_deadline: bool) -> AttemptError {
    let mut error = AttemptError::new(FailureClass::Timeout, message);
    error.cut_by_deadline = cut_by_deadline;
    error
}
