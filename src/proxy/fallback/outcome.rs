//! What a walk down the chain ends in: an answer committed to one target, or why none answered,
//! with every attempt recorded in order.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::record::RequestRecord;
use crate::health::Permit;
use crate::llm::{Api, AttemptError, ChunkStream, StreamEvent, Whole};
use crate::provider::neutral;
use crate::snapshot::Target;

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
            Committed::Complete { body, api } => !neutral::whole_has_content(*api, body),
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
    /// What the walk did: every attempt (the answering one last) and every target left behind.
    pub record: RequestRecord,
}

/// A request the chain could not answer.
pub enum Unanswered {
    /// A failure `fallbackOn` does not cover, returned to the app as the provider sent it.
    Final {
        /// The target that failed.
        target: Arc<Target>,
        /// The failure.
        error: AttemptError,
        /// What the walk did, the final attempt last.
        record: RequestRecord,
    },
    /// No target in the chain can serve this request faithfully.
    Ineligible {
        /// Each target and why it cannot.
        reasons: Vec<(String, String)>,
    },
    /// Every target failed, was out, or the deadline, budget or attempt cap ran out.
    Exhausted {
        /// What the walk did: every attempt, every target left behind, why it stopped.
        record: RequestRecord,
    },
}

impl Unanswered {
    /// What the walk did (for a request no target could take, only the targets passed over).
    pub fn record(&self) -> RequestRecord {
        match self {
            Unanswered::Final { record, .. } | Unanswered::Exhausted { record } => record.clone(),
            Unanswered::Ineligible { reasons } => {
                let mut record = RequestRecord::default();
                for (target, _) in reasons {
                    record.leave(target, super::record::Why::Skipped(super::record::Skip::Ineligible));
                }
                record
            }
        }
    }
}
