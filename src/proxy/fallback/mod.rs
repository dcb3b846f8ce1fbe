//! The fallback loop: walk a route's chain, retry transient failures with backoff, move to
//! another key or endpoint of the same step, fall through on what the next target can fix, and
//! stop on what would fail everywhere — within the retry budget, skipping targets whose breaker
//! is open, and hedging a slow first token with the next target.
//!
//! Every attempt's outcome is classified by the provider and recorded here, in one place, in
//! order: into the request's [`RequestRecord`] and into the target's health. Streams are committed
//! only once their first content chunk has arrived, so anything that fails before it falls
//! through with nothing sent to the app.
//!
//! The loop reaches targets through a [`Transport`] and reads time from tokio's clock, and its
//! random draws come from a [`Chance`], so its tests run in paused time with scripted targets.

mod attempt;
mod controls;
mod decide;
mod outcome;
mod record;
mod walk;

#[cfg(test)]
mod tests;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use opentelemetry::trace::SpanId;
use tokio::time::Instant;

use crate::telemetry::spans::new_span_id;

pub use attempt::{Transport, Upstreams};
pub use controls::{Controls, UnknownDrillTarget};
pub use outcome::{Answered, Committed, Unanswered};
pub use record::{Attempt, Left, Outcome, RequestRecord, Skip, Stop, Why};

use attempt::{attempt, millis};
use decide::{Next, decide};
use walk::Walk;

use crate::health::Permit;
use crate::llm::FailureClass;
use crate::llm::ratelimit::Headroom;
use crate::llm::{AttemptError, ChatRequest, Operation};
use crate::snapshot::{Route, Target};

/// Where the walk's random draws (balancing picks, backoff jitter) come from.
#[derive(Clone, Copy, Debug, Default)]
pub enum Chance {
    /// The thread's generator.
    #[default]
    Random,
    /// Always this value in `[0, 1)`: deterministic picks and zero jitter in tests.
    Fixed(f64),
}

impl Chance {
    /// A draw from `[0, 1)`.
    pub fn draw(self) -> f64 {
        match self {
            Chance::Random => rand::random(),
            Chance::Fixed(value) => value,
        }
    }
}

/// Runs `request` down `route`'s chain.
pub async fn run(
    route: &Route,
    request: &ChatRequest,
    transport: &impl Transport,
    controls: Controls,
    chance: Chance,
) -> Result<Answered, Unanswered> {
    let started = Instant::now();
    // An app's own retry of a request is an extra attempt, not a new request: it earns no
    // budget, and spends some, so that SDK retries cannot multiply an outage either.
    let spends = if !controls.resume_after.is_empty() {
        Some(Stop::ResumeBudget)
    } else {
        controls.client_retry.then_some(Stop::ClientRetryBudget)
    };
    match spends {
        Some(stop) if !route.budget.withdraw(started) => {
            let record = RequestRecord { stop: Some(stop), ..RequestRecord::default() };
            return Err(Unanswered::Exhausted { record });
        }
        Some(_) => {}
        None => route.budget.deposit(started),
    }
    let deadline = started + controls.deadline.map_or(route.timeouts.total, |d| d.min(route.timeouts.total));
    let max_attempts = controls
        .max_attempts
        .map_or(route.retry.max_request_attempts, |n| n.min(route.retry.max_request_attempts))
        .max(1);
    let mut walk = Walk::new(route, request, chance, controls.drill.clone());
    walk.resume_after(&controls.resume_after);
    let mut run = Run {
        route,
        request,
        transport,
        controls,
        chance,
        deadline,
        max_attempts,
        walk,
        record: RequestRecord::default(),
        race: Race::default(),
    };
    let mut skipped = Vec::new();
    let Some((first, permit)) = run.walk.first(started, run.controls.no_fallback, &mut skipped) else {
        if skipped.iter().any(|left| matches!(left.why, Why::Skipped(Skip::ForcedOpen | Skip::SpendLimit))) {
            // Every target that could serve it is drained by an override or has spent its window.
            run.note(skipped);
            return Err(Unanswered::Exhausted { record: run.record });
        }
        return Err(Unanswered::Ineligible { reasons: std::mem::take(&mut run.walk.ineligible) });
    };
    run.note(skipped);
    run.launch(first, permit, started);
    run.until_answered().await
}

/// An attempt that finished: its target and permit, launch id, start, span and result.
type Finished = (Arc<Target>, Permit, u64, Instant, SpanId, Result<(Committed, Headroom), AttemptError>);
type InFlight<'a> = Pin<Box<dyn Future<Output = Finished> + Send + 'a>>;

/// The attempts in flight: one, or several while a hedge races the one it hedges.
#[derive(Default)]
struct Race<'a> {
    in_flight: FuturesUnordered<InFlight<'a>>,
    /// Attempts started and not yet finished: id, target, start and span.
    pending: Vec<(u64, Arc<Target>, Instant, SpanId)>,
    /// Failures while others were still running.
    raced: Vec<(u64, Arc<Target>, AttemptError)>,
    launches: u32,
    /// The launch the walk last moved to.
    latest: u64,
    hedges: u32,
    last_launch: Option<Instant>,
}

/// One request's walk down its route's chain.
struct Run<'r, T> {
    route: &'r Route,
    request: &'r ChatRequest,
    transport: &'r T,
    controls: Controls,
    chance: Chance,
    deadline: Instant,
    max_attempts: u32,
    walk: Walk<'r>,
    record: RequestRecord,
    race: Race<'r>,
}

impl<'r, T: Transport> Run<'r, T> {
    /// Notes targets the walk passed over.
    fn note(&mut self, skipped: Vec<Left>) {
        for left in skipped {
            self.record.leave(&left.target, left.why);
        }
    }

    /// Notes a failed attempt.
    fn failed(
        &mut self,
        target: &Arc<Target>,
        error: &AttemptError,
        started: Instant,
        span: SpanId,
        elapsed: Duration,
    ) {
        self.record.attempts.push(Attempt {
            target: target.label.clone(),
            at: target.clone(),
            span,
            started,
            elapsed,
            outcome: Outcome::Failed { class: error.class, status: error.status, message: error.message.clone() },
        });
        if let Some(wait) = error.retry_after {
            self.record.retry_after = Some(self.record.retry_after.map_or(wait, |w| w.min(wait)));
        }
    }

    /// Notes `target` left behind after its attempt failed with `error`.
    fn left(&mut self, target: &Target, error: &AttemptError) {
        self.record.leave(&target.label, Why::Failed(error.class));
    }

    /// Starts an attempt at `target`; the walk now stands there.
    fn launch(&mut self, target: Arc<Target>, permit: Permit, now: Instant) {
        let (route, request, transport, deadline) = (self.route, self.request, self.transport, self.deadline);
        let id = u64::from(self.race.launches);
        let span = new_span_id();
        self.race.pending.push((id, target.clone(), now, span));
        self.race.in_flight.push(Box::pin(async move {
            let launched = Instant::now();
            let outcome = attempt(&target, route, request, transport, deadline, span).await;
            (target, permit, id, launched, span, outcome)
        }));
        self.race.latest = id;
        self.race.launches += 1;
        self.race.last_launch = Some(now);
    }

    /// When a hedge would start, if one may.
    fn hedge_at(&self) -> Option<Instant> {
        let hedge = self.route.hedge?;
        let may = self.race.hedges < hedge.max_extra && !self.race.in_flight.is_empty() && !self.controls.no_fallback;
        may.then(|| self.race.last_launch.unwrap_or(self.deadline) + hedge.delay)
    }

    /// Starts the next target beside the slow one, if the walk can move on and the budget
    /// allows; otherwise no more hedges for this request.
    fn hedge(&mut self, now: Instant) {
        let Some(hedge) = self.route.hedge else { return };
        if now >= self.deadline || self.race.launches >= self.max_attempts {
            self.race.hedges = hedge.max_extra;
            return;
        }
        // Advance a copy: if nothing can be hedged to, the walk stays where it is.
        let mut trial = self.walk.clone();
        let mut skipped = Vec::new();
        match trial.advance(now, &mut skipped) {
            Some((target, permit)) if self.route.budget.withdraw(now) => {
                tracing::debug!(route = %self.route.alias, target_label = %target.label, "hedging a slow first token");
                self.walk = trial;
                self.note(skipped);
                self.race.hedges += 1;
                self.launch(target, permit, now);
            }
            // Nothing to hedge to, or no budget for it: the permit, if any, is dropped.
            _ => self.race.hedges = hedge.max_extra,
        }
    }

    /// Waits for attempts and acts on each outcome until one answers or the walk ends.
    async fn until_answered(mut self) -> Result<Answered, Unanswered> {
        loop {
            let hedge_at = self.hedge_at();
            let finished = tokio::select! {
                finished = self.race.in_flight.next(), if !self.race.in_flight.is_empty() => finished,
                () = sleep_until(hedge_at), if hedge_at.is_some() => {
                    self.hedge(Instant::now());
                    continue;
                }
                else => None,
            };
            let Some((target, permit, id, launched, span, outcome)) = finished else { break };
            let now = Instant::now();
            let elapsed = now.saturating_duration_since(launched);
            self.race.pending.retain(|(pending, _, _, _)| *pending != id);
            let error = match self.check(&target, outcome, now) {
                Ok(reply) => return Ok(self.answered(target, permit, reply, now, launched, span)),
                Err(error) => error,
            };
            if error.cut_by_deadline {
                // The request ran out of time, not the target: count nothing against it.
                drop(permit);
            } else {
                permit.failed(now, elapsed, error.class, error.retry_after, &error.message);
            }
            target.health.note_saturation(now, error.saturated_for);
            tracing::debug!(target_label = %target.label, class = %error.class, status = error.status.unwrap_or_default(),
                elapsed_ms = millis(elapsed), error = %error.message, "attempt failed");
            self.failed(&target, &error, launched, span, elapsed);
            if !self.race.in_flight.is_empty() {
                // A hedge race is still on; whoever is left may yet answer.
                self.race.raced.push((id, target, error));
                continue;
            }
            let (target, error) = self.settle_race(id, target, error);
            if error.class == FailureClass::Timeout && now >= self.deadline {
                self.record.stop = Some(Stop::Deadline);
                break;
            }
            match self.next_after(target, error, now).await {
                Ok(Some((target, permit))) => {
                    let now = Instant::now();
                    if now >= self.deadline {
                        self.record.stop = Some(Stop::Deadline);
                        break;
                    }
                    self.launch(target, permit, now);
                }
                Ok(None) => break,
                Err(unanswered) => return Err(unanswered),
            }
        }
        Err(Unanswered::Exhausted { record: self.record })
    }

    /// An attempt's outcome, with the target's rate-limit headroom noted and an empty answer
    /// failed where the policy falls through on it.
    fn check(
        &self,
        target: &Target,
        outcome: Result<(Committed, Headroom), AttemptError>,
        now: Instant,
    ) -> Result<Committed, AttemptError> {
        let (committed, headroom) = outcome?;
        target.health.note_saturation(now, headroom.exhausted_for());
        if self.route.fallback_on.contains(FailureClass::EmptyCompletion)
            && self.request.operation == Operation::Chat
            && committed.is_empty()
        {
            return Err(AttemptError::new(FailureClass::EmptyCompletion, "the answer had no content"));
        }
        Ok(committed)
    }

    /// The answer: the target's health learns of it (a stream's permit rides along until the
    /// stream ends), and attempts still racing are cancelled as hedged.
    fn answered(
        mut self,
        target: Arc<Target>,
        mut permit: Permit,
        mut reply: Committed,
        now: Instant,
        launched: Instant,
        span: SpanId,
    ) -> Answered {
        let elapsed = now.saturating_duration_since(launched);
        match &mut reply {
            Committed::Complete { .. } => permit.succeeded(now, elapsed),
            Committed::Stream { permit: slot, .. } => {
                permit.first_token(now, elapsed);
                *slot = Some(permit);
            }
        }
        let record = &mut self.record;
        record.attempts.push(Attempt {
            target: target.label.clone(),
            at: target.clone(),
            span,
            started: launched,
            elapsed,
            outcome: Outcome::Answered,
        });
        for (_, other, since, span) in self.race.pending.drain(..) {
            record.attempts.push(Attempt {
                target: other.label.clone(),
                at: other.clone(),
                span,
                started: since,
                elapsed: now.saturating_duration_since(since),
                outcome: Outcome::Cancelled,
            });
            record.leave(&other.label, Why::Hedged);
        }
        Answered { target, reply, record: std::mem::take(&mut self.record) }
    }

    /// Once a race is over, the walk stands where the latest launch put it: decide from that
    /// attempt's failure, and note the others of the race as left behind.
    fn settle_race(&mut self, id: u64, target: Arc<Target>, error: AttemptError) -> (Arc<Target>, AttemptError) {
        let latest = self.race.latest;
        let settled = match self.race.raced.iter().position(|(raced_id, _, _)| *raced_id == latest) {
            Some(at) if id != latest => {
                let (_, latest_target, latest_error) = self.race.raced.remove(at);
                self.left(&target, &error);
                (latest_target, latest_error)
            }
            _ => (target, error),
        };
        for (_, other, other_error) in std::mem::take(&mut self.race.raced) {
            self.left(&other, &other_error);
        }
        settled
    }

    /// What to try after `target` failed with `error` and nothing else is in flight: the target
    /// again after a backoff, another one, nothing (`None`), or the failure as the answer.
    async fn next_after(
        &mut self,
        target: Arc<Target>,
        error: AttemptError,
        now: Instant,
    ) -> Result<Option<(Arc<Target>, Permit)>, Unanswered> {
        let mut skipped = Vec::new();
        let next =
            decide(&mut self.walk, self.route, &error, &self.controls, now, self.deadline, &mut skipped, self.chance);
        self.note(std::mem::take(&mut skipped));
        let chosen = match next {
            Next::Final => return Err(self.finally(target, error)),
            Next::Exhausted => return Ok(None),
            Next::Retry(wait) => {
                if !self.may_add_attempt(now) {
                    return Ok(None);
                }
                tokio::time::sleep(wait).await;
                let now = Instant::now();
                match target.health.admit(now) {
                    Some(permit) => {
                        self.walk.attempts_here += 1;
                        (target, permit)
                    }
                    // Its breaker opened meanwhile: move on as a fall-through would.
                    None if self.route.fallback_on.contains(error.class) && !self.controls.no_fallback => {
                        self.left(&target, &error);
                        let moved = self.walk.advance(now, &mut skipped);
                        self.note(skipped);
                        match moved {
                            Some(admitted) => admitted,
                            None => return Ok(None),
                        }
                    }
                    None => return Err(self.finally(target, error)),
                }
            }
            Next::Launch(next, permit, reason) => {
                if !self.may_add_attempt(now) {
                    return Ok(None);
                }
                if let Some(why) = reason {
                    self.record.leave(&target.label, why);
                }
                (next, permit)
            }
        };
        Ok(Some(chosen))
    }

    /// Whether one more attempt fits the per-request cap and the route's retry budget; notes
    /// which one stopped the walk when not.
    fn may_add_attempt(&mut self, now: Instant) -> bool {
        if self.race.launches >= self.max_attempts {
            self.record.stop = Some(Stop::AttemptCap);
            return false;
        }
        if !self.route.budget.withdraw(now) {
            self.record.stop = Some(Stop::RetryBudget);
            return false;
        }
        true
    }

    /// `error` at `target` is what the app gets.
    fn finally(&mut self, target: Arc<Target>, error: AttemptError) -> Unanswered {
        Unanswered::Final { target, error, record: std::mem::take(&mut self.record) }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
