//! What a walk down the chain ends in: an answer committed to one target, or why none answered,
//! with every attempt recorded in order.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use opentelemetry::trace::SpanId;

use crate::health::Permit;
use crate::llm::FailureClass;
use crate::llm::{Api, AttemptError, ChunkStream, StreamEvent, Whole};
use crate::provider::neutral;
use crate::snapshot::Target;

/// One attempt at one target, as recorded for headers, errors, logs and traces.
#[derive(Clone, Debug)]
pub struct Attempt {
    /// `provider/model`.
    pub target: String,
    /// The target itself.
    pub at: Arc<Target>,
    /// The attempt's span: its id went upstream in `traceparent`.
    pub span: SpanId,
    /// When it started.
    pub started: Instant,
    /// `None` for the attempt that answered, and for one cancelled because another answered.
    pub class: Option<FailureClass>,
    /// The upstream's status, when it sent one.
    pub status: Option<u16>,
    /// What happened, safe to show the app.
    pub message: String,
    /// How long the attempt took.
    pub elapsed: Duration,
}

/// A committed answer: what the app will receive, still in the answering provider's format.
pub enum Committed {
    /// A whole answer.
    Complete {
        /// The answer.
        body: Whole,
        /// Its wire format.
        api: Api,
    },
    /// A stream whose first content event (or clean end) has arrived.
    Stream {
        /// Events read while deciding whether to commit, the content event last.
        held: Vec<StreamEvent>,
        /// The rest of the upstream stream.
        rest: ChunkStream,
        /// The longest gap allowed between two events from now on.
        idle_timeout: Duration,
        /// Their wire format.
        api: Api,
        /// The target's permit: its health learns how the stream ends, and it counts as in
        /// flight until then.
        permit: Option<Permit>,
        /// When the stream must end however well it goes (`timeouts.maxStream`), if ever. The
        /// request's total deadline no longer applies: it was for finding a target.
        stream_deadline: Option<Instant>,
    },
}

impl Committed {
    /// Whether the answer has no content and no tool call (for a stream: before commit; a
    /// stream is committed at its first content event or its end).
    pub(super) fn is_empty(&self) -> bool {
        match self {
            Committed::Complete { body, api } => !neutral::has_content(*api, &body.json),
            Committed::Stream { held, .. } => !held.iter().any(|e| e.content),
        }
    }
}

/// A request the chain answered.
pub struct Answered {
    /// The target that answered.
    pub target: Arc<Target>,
    /// Its answer.
    pub reply: Committed,
    /// Every attempt, the answering one last.
    pub attempts: Vec<Attempt>,
    /// Each target left behind and why: a failure class, `circuitOpen`, `fleetOpen` or
    /// `forcedOpen` (skipped without an attempt), `ineligible`, or `hedged` (slower than the
    /// target that answered).
    pub fell_through: Vec<(String, &'static str)>,
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
    /// No target in the chain can serve this request faithfully.
    Ineligible {
        /// Each target and why it cannot.
        reasons: Vec<(String, String)>,
    },
    /// Every target failed, was open, or the deadline, budget or attempt cap ran out.
    Exhausted {
        /// Every attempt, in order.
        attempts: Vec<Attempt>,
        /// Targets skipped because their breaker was open.
        skipped: Vec<String>,
        /// Whether the total deadline ended the walk.
        deadline_exceeded: bool,
        /// Why the walk stopped early, if the retry budget or the attempt cap stopped it.
        stopped: Option<&'static str>,
        /// The shortest wait any upstream asked for.
        retry_after: Option<Duration>,
    },
}
