//! The fallback loop: walk a route's chain, retry transient failures with backoff, fall through
//! on what the next target can fix, and stop on what would fail everywhere.
//!
//! Every attempt's outcome is classified by the provider and recorded here, in one place, in
//! order. Streams are committed only once their first content chunk has arrived, so anything
//! that fails before it falls through with nothing sent to the app.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{StreamExt, stream};
use serde_json::Value;
use tokio::time::Instant;

use crate::chain::{Route, Target};
use crate::chat::ChatRequest;
use crate::policy::FailureClass;
use crate::provider::openai::{is_content_chunk, millis};
use crate::provider::{AttemptError, ChunkStream, HttpClient, Reply};

/// One attempt at one target, as recorded for headers, errors and logs.
#[derive(Clone, Debug)]
pub struct Attempt {
    /// `provider/model`.
    pub target: String,
    /// `None` for the attempt that answered.
    pub class: Option<FailureClass>,
    /// The upstream's status, when it sent one.
    pub status: Option<u16>,
    /// What happened, safe to show the app.
    pub message: String,
    /// How long the attempt took.
    pub elapsed: Duration,
}

/// A committed answer: what the app will receive.
pub enum Committed {
    /// A whole completion.
    Complete(Value),
    /// A stream whose first content chunk (or clean end) has arrived.
    Stream {
        /// Chunks read while deciding whether to commit, the content chunk last.
        held: Vec<Value>,
        /// The rest of the upstream stream.
        rest: ChunkStream,
        /// The longest gap allowed between two chunks from now on.
        idle_timeout: Duration,
    },
}

/// A request the chain answered.
pub struct Answered {
    /// The target that answered.
    pub target: Arc<Target>,
    /// Its answer.
    pub reply: Committed,
    /// Every attempt, the answering one last.
    pub attempts: Vec<Attempt>,
    /// Each target left behind and the class that made the chain leave it.
    pub fell_through: Vec<(String, FailureClass)>,
}

/// A request the chain could not answer.
pub enum Unanswered {
    /// A failure `fallbackOn` does not cover, returned to the app as the provider sent it.
    Final {
        /// The target that failed.
        target: Arc<Target>,
        /// The failure.
        error: AttemptError,
        /// Every attempt, the final one last.
        attempts: Vec<Attempt>,
    },
    /// Every target failed (or the deadline ran out).
    Exhausted {
        /// Every attempt, in order.
        attempts: Vec<Attempt>,
        /// Whether the total deadline ended the walk.
        deadline_exceeded: bool,
        /// The shortest wait any upstream asked for.
        retry_after: Option<Duration>,
    },
}

/// Runs `request` down `route`'s chain.
pub async fn run(
    route: &Route,
    request: &ChatRequest,
    http: &HttpClient,
) -> Result<Answered, Unanswered> {
    let deadline = Instant::now() + route.timeouts.total;
    let mut attempts = Vec::new();
    let mut fell_through = Vec::new();
    let mut retry_after: Option<Duration> = None;
    let mut deadline_exceeded = false;

    'steps: for step in &route.steps {
        let target = step.pick(rand::random::<f64>());
        for number in 1..=route.retry.attempts {
            if Instant::now() >= deadline {
                deadline_exceeded = true;
                break 'steps;
            }
            let started = Instant::now();
            let outcome = attempt(target, route, request, http, deadline).await;
            let elapsed = started.elapsed();
            let error = match outcome {
                Ok(reply) => {
                    attempts.push(Attempt {
                        target: target.label.clone(),
                        class: None,
                        status: Some(200),
                        message: "answered".into(),
                        elapsed,
                    });
                    return Ok(Answered {
                        target: target.clone(),
                        reply,
                        attempts,
                        fell_through,
                    });
                }
                Err(error) => error,
            };
            tracing::debug!(target_label = %target.label, attempt = number, class = %error.class, status = ?error.status,
                elapsed_ms = millis(elapsed), error = %error.message, "attempt failed");
            attempts.push(Attempt {
                target: target.label.clone(),
                class: Some(error.class),
                status: error.status,
                message: error.message.clone(),
                elapsed,
            });
            if let Some(wait) = error.retry_after {
                retry_after = Some(retry_after.map_or(wait, |w| w.min(wait)));
            }
            if error.class == FailureClass::Timeout && Instant::now() >= deadline {
                deadline_exceeded = true;
                break 'steps;
            }
            let falls_through = route.fallback_on.contains(error.class);
            if error.class.is_transient() && number < route.retry.attempts {
                let backoff = route.retry.backoff(number, rand::random::<f64>());
                let asked = error.retry_after.unwrap_or_default();
                let wait = backoff.max(asked);
                // A provider that asks for more than our longest backoff is better left for
                // the next target; so is a wait the deadline cannot afford.
                let worth_waiting = asked <= route.retry.max && Instant::now() + wait < deadline;
                if worth_waiting || !falls_through && Instant::now() + wait < deadline {
                    tokio::time::sleep(wait).await;
                    continue;
                }
            }
            if falls_through {
                fell_through.push((target.label.clone(), error.class));
                continue 'steps;
            }
            return Err(Unanswered::Final {
                target: target.clone(),
                error,
                attempts,
            });
        }
    }
    Err(Unanswered::Exhausted {
        attempts,
        deadline_exceeded,
        retry_after,
    })
}

/// One attempt at one target, bounded in time. A stream is read up to its first content chunk.
async fn attempt(
    target: &Target,
    route: &Route,
    request: &ChatRequest,
    http: &HttpClient,
    deadline: Instant,
) -> Result<Committed, AttemptError> {
    let started = Instant::now();
    if !request.stream {
        let limit = (started + target.attempt_timeout).min(deadline);
        return match tokio::time::timeout_at(
            limit,
            target.provider.send(http, &target.model, request),
        )
        .await
        {
            Ok(Ok(Reply::Complete(answer))) => Ok(Committed::Complete(answer)),
            Ok(Ok(Reply::Stream(_))) => Err(AttemptError::new(
                FailureClass::ServerError,
                "upstream streamed an answer that was not asked to stream",
            )),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(AttemptError::new(
                FailureClass::Timeout,
                format!(
                    "no answer within {}ms",
                    millis(limit.saturating_duration_since(started))
                ),
            )),
        };
    }
    let first_token = route.timeouts.first_token.min(target.attempt_timeout);
    let limit = (started + first_token).min(deadline);
    let opening = async {
        let mut stream = match target.provider.send(http, &target.model, request).await? {
            Reply::Stream(stream) => stream,
            Reply::Complete(_) => {
                return Err(AttemptError::new(
                    FailureClass::ServerError,
                    "upstream did not stream the answer",
                ));
            }
        };
        let mut held = Vec::new();
        loop {
            match stream.next().await {
                Some(Ok(chunk)) => {
                    let content = is_content_chunk(&chunk);
                    held.push(chunk);
                    if content {
                        return Ok((held, stream));
                    }
                }
                Some(Err(error)) => return Err(error),
                None => return Ok((held, Box::pin(stream::empty()) as ChunkStream)),
            }
        }
    };
    match tokio::time::timeout_at(limit, opening).await {
        Ok(Ok((held, rest))) => Ok(Committed::Stream {
            held,
            rest,
            idle_timeout: target.attempt_timeout,
        }),
        Ok(Err(error)) => Err(error),
        Err(_) => Err(AttemptError::new(
            FailureClass::Timeout,
            format!(
                "no first token within {}ms",
                millis(limit.saturating_duration_since(started))
            ),
        )),
    }
}
