//! The decision after a failed attempt, with nothing else in flight: the whole retry and
//! fall-through policy in one pure function of the failure, the walk and the clock.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::Chance;
use super::controls::Controls;
use super::record::{Left, Why};
use super::walk::Walk;
use crate::health::Permit;
use crate::llm::AttemptError;
use crate::llm::FailureClass;
use crate::snapshot::{Route, Target};

/// What to do after the attempt at the current target failed, with nothing else in flight.
pub(super) enum Next {
    /// Wait, then try the same target again.
    Retry(Duration),
    /// Try this target (another member of the step, the next step, or a special chain).
    Launch(Arc<Target>, Permit, Option<Why>),
    /// Return this failure to the app.
    Final,
    /// Nothing left to try.
    Exhausted,
}

/// The decision after a failure at the current target: the whole retry and fall-through policy
/// in one place.
#[allow(clippy::too_many_arguments)]
pub(super) fn decide<'r>(
    walk: &mut Walk<'r>,
    route: &'r Route,
    error: &AttemptError,
    controls: &Controls,
    now: Instant,
    deadline: Instant,
    skipped: &mut Vec<Left>,
    chance: Chance,
) -> Next {
    let class = error.class;
    let falls_through = route.fallback_on.contains(class) && !controls.no_fallback;
    let reason = Some(Why::Failed(class));
    if !falls_through && !class.is_transient() {
        let special = match class {
            FailureClass::ContextWindowExceeded => &route.on_context_window_exceeded,
            FailureClass::ContentFiltered => &route.on_content_filtered,
            _ => return Next::Final,
        };
        if special.is_empty() || walk.switched || controls.no_fallback {
            return Next::Final;
        }
        return match walk.switch(special, now, skipped) {
            Some((target, permit)) => Next::Launch(target, permit, reason),
            None => Next::Exhausted,
        };
    }
    // Another key or endpoint of the same step first: it shares the model, not the failure.
    if (falls_through || class.is_transient())
        && let Some((target, permit)) = walk.admit_member(now)
    {
        return Next::Launch(target, permit, reason);
    }
    if class.is_transient() && walk.attempts_here < route.retry.attempts {
        let backoff = route.retry.backoff(walk.attempts_here, chance.draw());
        let asked = error.retry_after.unwrap_or_default();
        let wait = backoff.max(asked);
        let fits = now + wait < deadline;
        // A provider that asks for more than our longest backoff is better left for the next
        // target; so is a wait the deadline cannot afford.
        if fits && (asked <= route.retry.max || !falls_through) {
            return Next::Retry(wait);
        }
    }
    if falls_through {
        return match walk.advance(now, skipped) {
            Some((target, permit)) => Next::Launch(target, permit, reason),
            None => Next::Exhausted,
        };
    }
    Next::Final
}
