//! What one walk down the chain did, as types: every attempt and its outcome, every target left
//! behind and why, and why the walk stopped. Headers, error bodies, logs, spans and metrics all
//! read this one [`RequestRecord`]; strings are made only where those encode it.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::trace::SpanId;
use tokio::time::Instant;

use crate::llm::FailureClass;
use crate::snapshot::Target;

/// Why a target was passed over without an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// Its own breaker is open.
    CircuitOpen,
    /// The fleet holds it open.
    FleetOpen,
    /// An override drains it.
    ForcedOpen,
    /// It cannot serve this request faithfully, or the policy keeps such requests away.
    Ineligible,
    /// A fallback drill (`x-backstop-drill`) skips it.
    Drill,
    /// Its `spendLimit` window is spent, in this pod or across the fleet.
    SpendLimit,
}

impl Skip {
    /// As headers, spans and metrics name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::CircuitOpen => "circuitOpen",
            Skip::FleetOpen => "fleetOpen",
            Skip::ForcedOpen => "forcedOpen",
            Skip::Ineligible => "ineligible",
            Skip::Drill => "drill",
            Skip::SpendLimit => "spendLimit",
        }
    }

    /// Whether the target is out of rotation (a breaker, the fleet, an override), as opposed to
    /// unable to take this one request.
    pub fn out_of_rotation(self) -> bool {
        matches!(self, Skip::CircuitOpen | Skip::FleetOpen | Skip::ForcedOpen | Skip::SpendLimit)
    }
}

/// Why the walk left a target behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// An attempt failed with this class, and the walk moved on.
    Failed(FailureClass),
    /// It was passed over without an attempt.
    Skipped(Skip),
    /// It was still running when another target answered first.
    Hedged,
}

impl Why {
    /// As headers, spans and metrics name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Why::Failed(class) => class.as_str(),
            Why::Skipped(skip) => skip.as_str(),
            Why::Hedged => "hedged",
        }
    }

    /// Whether the target was passed over without an attempt.
    pub fn is_skip(self) -> bool {
        matches!(self, Why::Skipped(_))
    }
}

/// One target left behind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Left {
    /// Its label (`provider/model`).
    pub target: String,
    /// Why.
    pub why: Why,
}

/// Why the walk stopped before it ran out of targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The request's total deadline ran out.
    Deadline,
    /// The route's retry budget is spent.
    RetryBudget,
    /// The route's retry budget is spent, and the request is the app's own retry.
    ClientRetryBudget,
    /// The per-request attempt cap was reached.
    AttemptCap,
    /// The route's retry budget is spent, and the request continues a broken stream.
    ResumeBudget,
}

impl Stop {
    /// Why, in the words the app's error and the span's event use.
    pub fn describe(self) -> &'static str {
        match self {
            Stop::Deadline => "the request's deadline ran out",
            Stop::RetryBudget => "the route's retry budget is spent",
            Stop::ClientRetryBudget => "the route's retry budget is spent, and this is the app's own retry",
            Stop::AttemptCap => "the per-request attempt cap was reached",
            Stop::ResumeBudget => "the route's retry budget is spent, and this continues a broken stream",
        }
    }

    /// Whether the retry budget stopped it.
    pub fn is_budget(self) -> bool {
        matches!(self, Stop::RetryBudget | Stop::ClientRetryBudget | Stop::ResumeBudget)
    }
}

/// How one attempt ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It answered (a stream: its first content arrived).
    Answered,
    /// It failed.
    Failed {
        /// How.
        class: FailureClass,
        /// The upstream's status, when it sent one.
        status: Option<u16>,
        /// What happened, safe to show the app.
        message: String,
    },
    /// Another target answered first while it was still running.
    Cancelled,
}

/// One attempt at one target.
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
    /// How long it took.
    pub elapsed: Duration,
    /// How it ended.
    pub outcome: Outcome,
}

impl Attempt {
    /// Its failure class, if it failed.
    pub fn class(&self) -> Option<FailureClass> {
        match &self.outcome {
            Outcome::Failed { class, .. } => Some(*class),
            _ => None,
        }
    }

    /// The upstream's status: 200 for the answer, the failure's own if it sent one.
    pub fn status(&self) -> Option<u16> {
        match &self.outcome {
            Outcome::Answered => Some(200),
            Outcome::Failed { status, .. } => *status,
            Outcome::Cancelled => None,
        }
    }

    /// What happened, safe to show the app.
    pub fn message(&self) -> &str {
        match &self.outcome {
            Outcome::Answered => "answered",
            Outcome::Failed { message, .. } => message,
            Outcome::Cancelled => "cancelled: another target answered first",
        }
    }
}

/// What one walk did.
#[derive(Clone, Debug, Default)]
pub struct RequestRecord {
    /// Every attempt, in the order it started (an answer last).
    pub attempts: Vec<Attempt>,
    /// Every target left behind, once each, in order.
    pub left: Vec<Left>,
    /// Why the walk stopped early, if it did.
    pub stop: Option<Stop>,
    /// The shortest wait any upstream asked for.
    pub retry_after: Option<Duration>,
}

impl RequestRecord {
    /// Notes `target` left behind for `why` (once: a target can be passed over on two passes).
    pub fn leave(&mut self, target: &str, why: Why) {
        if !self.left.iter().any(|l| l.target == target && l.why == why) {
            self.left.push(Left { target: target.to_string(), why });
        }
    }

    /// Whether the total deadline ended the walk.
    pub fn deadline_exceeded(&self) -> bool {
        self.stop == Some(Stop::Deadline)
    }

    /// Why the walk stopped short of trying on, for the app's error (the deadline has its own
    /// status and wording).
    pub fn stopped(&self) -> Option<&'static str> {
        self.stop.filter(|stop| *stop != Stop::Deadline).map(Stop::describe)
    }

    /// The targets passed over because they were out of rotation, once each.
    pub fn out_of_rotation(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for left in &self.left {
            if matches!(left.why, Why::Skipped(skip) if skip.out_of_rotation()) && !names.contains(&left.target) {
                names.push(left.target.clone());
            }
        }
        names
    }

    /// `target=why, ...`, as the `x-backstop-fallback-reason` header and span attribute say it.
    pub fn fallback_reason(&self) -> String {
        self.left.iter().map(|l| format!("{}={}", l.target, l.why.as_str())).collect::<Vec<_>>().join(", ")
    }

    /// Whether the walk left a target behind for anything but an open breaker or a request it
    /// could not take: whether it fell through.
    pub fn fell_through(&self) -> bool {
        self.left.iter().any(|l| !l.why.is_skip())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_render_only_at_the_edge_and_each_target_is_left_once_per_reason() {
        let mut record = RequestRecord::default();
        record.leave("a/m", Why::Skipped(Skip::FleetOpen));
        record.leave("a/m", Why::Skipped(Skip::FleetOpen));
        record.leave("b/m", Why::Failed(FailureClass::RateLimited));
        record.leave("c/m", Why::Skipped(Skip::Drill));
        assert_eq!(record.fallback_reason(), "a/m=fleetOpen, b/m=rateLimited, c/m=drill");
        assert_eq!(record.out_of_rotation(), ["a/m"], "a drill is no reason a target is out");
        assert!(record.fell_through());
        record.stop = Some(Stop::RetryBudget);
        assert_eq!(record.stopped(), Some("the route's retry budget is spent"));
        assert!(Stop::ClientRetryBudget.is_budget() && !Stop::AttemptCap.is_budget());
        record.stop = Some(Stop::Deadline);
        assert!(record.deadline_exceeded() && record.stopped().is_none());
    }
}
