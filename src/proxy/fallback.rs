//! The fallback loop: walk a route's chain, retry transient failures with backoff, move to
//! another key or endpoint of the same step, fall through on what the next target can fix, and
//! stop on what would fail everywhere — within the retry budget, skipping targets whose breaker
//! is open, and hedging a slow first token with the next target.
//!
//! Every attempt's outcome is classified by the provider and recorded here, in one place, in
//! order: into the request's attempt log and into the target's health. Streams are committed
//! only once their first content chunk has arrived, so anything that fails before it falls
//! through with nothing sent to the app.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::{StreamExt, stream};
use serde_json::Value;
use tokio::time::Instant;

use crate::chain::{Route, Step, Target};
use crate::chat::{ChatRequest, Operation};
use crate::health::breaker::Admission;
use crate::health::{Permit, pick};
use crate::policy::FailureClass;
use crate::provider::convert;
use crate::provider::{Api, AttemptError, ChunkStream, Headroom, HttpClient, Reply, StreamEvent};

/// Per-request controls from headers, already limited to what the policy allows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Controls {
    /// Try only the first step.
    pub no_fallback: bool,
    /// At most this many attempts (never more than the policy's cap).
    pub max_attempts: Option<u32>,
    /// A shorter total deadline.
    pub deadline: Option<Duration>,
}

/// One attempt at one target, as recorded for headers, errors and logs.
#[derive(Clone, Debug)]
pub struct Attempt {
    /// `provider/model`.
    pub target: String,
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
        body: Value,
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
        /// The request's total deadline, which a committed stream keeps too.
        deadline: Instant,
    },
}

impl Committed {
    /// Whether the answer has no content and no tool call (for a stream: before commit; a
    /// stream is committed at its first content event or its end).
    fn is_empty(&self) -> bool {
        match self {
            Committed::Complete { body, api } => !convert::has_content(*api, body),
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
    /// Each target left behind and why: a failure class, `circuitOpen` (skipped without an
    /// attempt) or `hedged` (slower than the target that answered).
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

type Outcome = (Arc<Target>, Permit, u64, Instant, Result<(Committed, Headroom), AttemptError>);
type InFlight<'a> = Pin<Box<dyn Future<Output = Outcome> + Send + 'a>>;

/// Where the walk stands in the chain.
#[derive(Clone)]
struct Walk<'r> {
    request: &'r ChatRequest,
    chain: &'r [Step],
    switched: bool,
    step: usize,
    tried: Vec<usize>,
    attempts_here: u32,
    /// Targets that cannot serve this request, and why; filled as steps are reached.
    ineligible: Vec<(String, String)>,
}

impl<'r> Walk<'r> {
    fn new(route: &'r Route, request: &'r ChatRequest) -> Self {
        Walk {
            request,
            chain: &route.steps,
            switched: false,
            step: 0,
            tried: Vec::new(),
            attempts_here: 0,
            ineligible: Vec::new(),
        }
    }

    /// Whether a target can serve the request faithfully; notes why not, once.
    fn eligible(&mut self, target: &Target) -> bool {
        if self.ineligible.iter().any(|(label, _)| *label == target.label) {
            return false;
        }
        match target.provider.unsupported(self.request).or_else(|| target.skip_for(self.request)) {
            None => true,
            Some(reason) => {
                self.ineligible.push((target.label.clone(), reason));
                false
            }
        }
    }

    fn skip_reason(&self, label: &str) -> &'static str {
        if self.ineligible.iter().any(|(l, _)| l == label) { "ineligible" } else { "circuitOpen" }
    }

    /// Picks and admits an untried, eligible member of the current step: weighted power of two
    /// choices over the members whose breaker lets a request through.
    fn admit_member(&mut self, now: Instant) -> Option<(Arc<Target>, Permit)> {
        let step = self.chain.get(self.step)?;
        let mut excluded = self.tried.clone();
        for (i, member) in step.members.iter().enumerate() {
            if !self.eligible(member) {
                excluded.push(i);
            }
        }
        loop {
            let open: Vec<usize> = (0..step.members.len())
                .filter(|i| !excluded.contains(i))
                .filter(|&i| !matches!(step.members[i].health.peek(now), Admission::Refused { .. }))
                .collect();
            let candidates: Vec<_> =
                open.iter().map(|&i| step.members[i].health.candidate(step.members[i].weight, now)).collect();
            let chosen = open[pick(&candidates, (rand::random(), rand::random()))?];
            let member = &step.members[chosen];
            match member.health.admit(now) {
                Some(permit) => {
                    self.tried.push(chosen);
                    self.attempts_here = 1;
                    return Some((member.clone(), permit));
                }
                // Lost a race for the last probe slot.
                None => excluded.push(chosen),
            }
        }
    }

    fn note_skipped(&self, step: &Step, skipped: &mut Vec<(String, &'static str)>) {
        skipped.extend(step.members.iter().map(|m| (m.label.clone(), self.skip_reason(&m.label))));
    }

    /// Moves to the next step that has an admitted member, noting the steps skipped.
    fn advance(&mut self, now: Instant, skipped: &mut Vec<(String, &'static str)>) -> Option<(Arc<Target>, Permit)> {
        loop {
            self.step += 1;
            self.tried.clear();
            let step = self.chain.get(self.step)?;
            if let Some(admitted) = self.admit_member(now) {
                return Some(admitted);
            }
            self.note_skipped(step, skipped);
        }
    }

    /// The first target: the first admitted one in chain order, or, when every eligible target
    /// is open, the one whose breaker opened earliest (better than failing without trying).
    /// `None` when no target can serve the request at all.
    fn first(
        &mut self,
        now: Instant,
        no_fallback: bool,
        skipped: &mut Vec<(String, &'static str)>,
    ) -> Option<(Arc<Target>, Permit)> {
        self.step = 0;
        if let Some(admitted) = self.admit_member(now) {
            return Some(admitted);
        }
        self.note_skipped(&self.chain[0], skipped);
        if !no_fallback && let Some(admitted) = self.advance(now, skipped) {
            return Some(admitted);
        }
        let eligible: Vec<(usize, usize)> = self
            .chain
            .iter()
            .enumerate()
            .take(if no_fallback { 1 } else { usize::MAX })
            .flat_map(|(s, step)| (0..step.members.len()).map(move |m| (s, m)))
            .filter(|&(s, m)| !self.ineligible.iter().any(|(l, _)| *l == self.chain[s].members[m].label))
            .collect();
        let (step, member) =
            eligible.into_iter().min_by_key(|&(s, m)| match self.chain[s].members[m].health.peek(now) {
                Admission::Refused { since, .. } => since,
                _ => now,
            })?;
        self.step = step;
        self.tried = vec![member];
        let target = self.chain[step].members[member].clone();
        skipped.retain(|(label, _)| *label != target.label);
        self.attempts_here = 1;
        let permit = target.health.admit_forced(now);
        Some((target, permit))
    }

    /// Switches to a special-purpose chain (`onContextWindowExceeded`, `onContentFiltered`).
    fn switch(
        &mut self,
        chain: &'r [Step],
        now: Instant,
        skipped: &mut Vec<(String, &'static str)>,
    ) -> Option<(Arc<Target>, Permit)> {
        self.chain = chain;
        self.switched = true;
        self.step = 0;
        self.tried.clear();
        if let Some(admitted) = self.admit_member(now) {
            return Some(admitted);
        }
        self.note_skipped(chain.first()?, skipped);
        self.advance(now, skipped)
    }
}

/// What to do after the attempt at the current target failed, with nothing else in flight.
enum Next {
    /// Wait, then try the same target again.
    Retry(Duration),
    /// Try this target (another member of the step, the next step, or a special chain).
    Launch(Arc<Target>, Permit, Option<&'static str>),
    /// Return this failure to the app.
    Final,
    /// Nothing left to try.
    Exhausted,
}

/// Runs `request` down `route`'s chain.
pub async fn run(
    route: &Route,
    request: &ChatRequest,
    http: &HttpClient,
    controls: Controls,
) -> Result<Answered, Unanswered> {
    let started = Instant::now();
    let total = controls.deadline.map_or(route.timeouts.total, |d| d.min(route.timeouts.total));
    let deadline = started + total;
    let max_attempts = controls
        .max_attempts
        .map_or(route.retry.max_request_attempts, |n| n.min(route.retry.max_request_attempts))
        .max(1);
    route.budget.deposit(started);

    let mut attempts: Vec<Attempt> = Vec::new();
    let mut fell_through: Vec<(String, &'static str)> = Vec::new();
    let mut skipped: Vec<(String, &'static str)> = Vec::new();
    let mut retry_after: Option<Duration> = None;
    let mut deadline_exceeded = false;
    let mut stopped: Option<&'static str> = None;
    let mut walk = Walk::new(route, request);
    let mut in_flight: FuturesUnordered<InFlight<'_>> = FuturesUnordered::new();
    let mut pending: Vec<(u64, String, Instant)> = Vec::new();
    let mut launches: u32 = 0;
    // Failures while a hedge race was still on, and the launch the walk last moved to.
    let mut raced: Vec<(u64, Arc<Target>, AttemptError)> = Vec::new();
    let mut latest: u64 = 0;
    let mut hedges: u32 = 0;
    let mut last_launch = started;

    let launch = |target: Arc<Target>, permit: Permit, id: u64| -> InFlight<'_> {
        Box::pin(async move {
            let launched = Instant::now();
            let outcome = attempt(&target, route, request, http, deadline).await;
            (target, permit, id, launched, outcome)
        })
    };

    let Some((first, permit)) = walk.first(started, controls.no_fallback, &mut skipped) else {
        return Err(Unanswered::Ineligible { reasons: walk.ineligible });
    };
    for (label, why) in skipped.drain(..) {
        fell_through.push((label, why));
    }
    pending.push((launches.into(), first.label.clone(), started));
    in_flight.push(launch(first, permit, launches.into()));
    launches += 1;

    loop {
        let hedge_at = match route.hedge {
            Some(hedge) if hedges < hedge.max_extra && !in_flight.is_empty() && !controls.no_fallback => {
                Some(last_launch + hedge.delay)
            }
            _ => None,
        };
        let finished = tokio::select! {
            finished = in_flight.next(), if !in_flight.is_empty() => finished,
            () = sleep_until_opt(hedge_at), if hedge_at.is_some() => {
                let now = Instant::now();
                let Some(hedge) = route.hedge else { continue };
                if now >= deadline || launches >= max_attempts {
                    // No hedge this time; the attempts in flight carry on.
                    hedges = hedge.max_extra;
                    continue;
                }
                // Advance a copy: if nothing can be hedged to, the walk stays where it is.
                let mut trial = walk.clone();
                let mut trial_skipped = Vec::new();
                match trial.advance(now, &mut trial_skipped) {
                    Some((target, permit)) if route.budget.withdraw(now) => {
                        walk = trial;
                        skipped.extend(trial_skipped);
                        tracing::debug!(route = %route.alias, target_label = %target.label, "hedging a slow first token");
                        for (label, why) in skipped.drain(..) {
                            fell_through.push((label, why));
                        }
                        pending.push((launches.into(), target.label.clone(), now));
                        in_flight.push(launch(target, permit, launches.into()));
                        latest = launches.into();
                        launches += 1;
                        hedges += 1;
                        last_launch = now;
                    }
                    // Nothing to hedge to, or no budget for it: the permit, if any, is dropped.
                    _ => hedges = hedge.max_extra,
                }
                continue;
            }
            else => None,
        };
        let Some((target, permit, id, launched, outcome)) = finished else { break };
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(launched);
        pending.retain(|(p, _, _)| *p != id);
        let outcome = outcome.and_then(|(committed, headroom)| {
            target.health.note_saturation(now, headroom.exhausted_for());
            if route.fallback_on.contains(FailureClass::EmptyCompletion)
                && request.operation == Operation::Chat
                && committed.is_empty()
            {
                Err(AttemptError::new(FailureClass::EmptyCompletion, "the answer had no content"))
            } else {
                Ok(committed)
            }
        });
        let error = match outcome {
            Ok(mut reply) => {
                match &mut reply {
                    Committed::Complete { .. } => permit.succeeded(now, elapsed),
                    Committed::Stream { permit: slot, .. } => {
                        let mut permit = permit;
                        permit.first_token(now, elapsed);
                        *slot = Some(permit);
                    }
                }
                attempts.push(Attempt {
                    target: target.label.clone(),
                    class: None,
                    status: Some(200),
                    message: "answered".into(),
                    elapsed,
                });
                for (_, label, since) in pending.drain(..) {
                    attempts.push(Attempt {
                        target: label.clone(),
                        class: None,
                        status: None,
                        message: "cancelled: another target answered first".into(),
                        elapsed: now.saturating_duration_since(since),
                    });
                    fell_through.push((label, "hedged"));
                }
                return Ok(Answered { target, reply, attempts, fell_through: distinct(fell_through) });
            }
            Err(error) => error,
        };
        if error.cut_by_deadline {
            // The request ran out of time, not the target: count nothing against it.
            drop(permit);
        } else {
            permit.failed(now, elapsed, error.class, error.retry_after, &error.message);
        }
        target.health.note_saturation(now, error.saturated_for);
        tracing::debug!(target_label = %target.label, class = %error.class, status = ?error.status,
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
        if !in_flight.is_empty() {
            // A hedge race is still on; whoever is left may yet answer.
            raced.push((id, target, error));
            continue;
        }
        // The walk stands where the latest launch put it: decide from that attempt's failure,
        // and note the others of the race as left behind.
        let (target, error) = match raced.iter().position(|(raced_id, _, _)| *raced_id == latest) {
            Some(at) if id != latest => {
                let (_, latest_target, latest_error) = raced.remove(at);
                fell_through.push((target.label.clone(), error.class.as_str()));
                (latest_target, latest_error)
            }
            _ => (target, error),
        };
        for (_, other, other_error) in raced.drain(..) {
            fell_through.push((other.label.clone(), other_error.class.as_str()));
        }
        if error.class == FailureClass::Timeout && now >= deadline {
            deadline_exceeded = true;
            break;
        }
        let next = decide(&mut walk, route, &error, controls, now, deadline, &mut skipped);
        for (label, why) in skipped.drain(..) {
            fell_through.push((label, why));
        }
        let (target, permit) = match next {
            Next::Final => return Err(Unanswered::Final { target, error, attempts }),
            Next::Exhausted => break,
            Next::Retry(wait) => {
                if launches >= max_attempts {
                    stopped = Some("the per-request attempt cap was reached");
                    break;
                }
                if !route.budget.withdraw(now) {
                    stopped = Some("the route's retry budget is spent");
                    break;
                }
                tokio::time::sleep(wait).await;
                let now = Instant::now();
                match target.health.admit(now) {
                    Some(permit) => {
                        walk.attempts_here += 1;
                        (target, permit)
                    }
                    // Its breaker opened meanwhile: move on as a fall-through would.
                    None if route.fallback_on.contains(error.class) && !controls.no_fallback => {
                        fell_through.push((target.label.clone(), error.class.as_str()));
                        match walk.advance(now, &mut skipped) {
                            Some(admitted) => admitted,
                            None => break,
                        }
                    }
                    None => return Err(Unanswered::Final { target, error, attempts }),
                }
            }
            Next::Launch(next, permit, reason) => {
                if launches >= max_attempts {
                    stopped = Some("the per-request attempt cap was reached");
                    break;
                }
                if !route.budget.withdraw(now) {
                    stopped = Some("the route's retry budget is spent");
                    break;
                }
                if let Some(reason) = reason {
                    fell_through.push((target.label.clone(), reason));
                }
                (next, permit)
            }
        };
        for (label, why) in skipped.drain(..) {
            fell_through.push((label, why));
        }
        let now = Instant::now();
        if now >= deadline {
            deadline_exceeded = true;
            break;
        }
        pending.push((launches.into(), target.label.clone(), now));
        in_flight.push(launch(target, permit, launches.into()));
        latest = launches.into();
        launches += 1;
        last_launch = now;
    }
    let skipped_targets =
        distinct(fell_through).into_iter().filter(|(_, why)| *why == "circuitOpen").map(|(t, _)| t).collect();
    Err(Unanswered::Exhausted { attempts, skipped: skipped_targets, deadline_exceeded, stopped, retry_after })
}

/// A `Duration` in whole milliseconds, for logs and messages.
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The entries in order, each once (a target can be noted as skipped on two passes).
fn distinct(entries: Vec<(String, &'static str)>) -> Vec<(String, &'static str)> {
    let mut seen = Vec::with_capacity(entries.len());
    for entry in entries {
        if !seen.contains(&entry) {
            seen.push(entry);
        }
    }
    seen
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The decision after a failure at the current target: the whole retry and fall-through policy
/// in one place.
#[allow(clippy::too_many_arguments)]
fn decide<'r>(
    walk: &mut Walk<'r>,
    route: &'r Route,
    error: &AttemptError,
    controls: Controls,
    now: Instant,
    deadline: Instant,
    skipped: &mut Vec<(String, &'static str)>,
) -> Next {
    let class = error.class;
    let falls_through = route.fallback_on.contains(class) && !controls.no_fallback;
    let reason = Some(class.as_str());
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
        let backoff = route.retry.backoff(walk.attempts_here, rand::random::<f64>());
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

/// One attempt at one target, bounded in time. A stream is read up to its first content chunk.
async fn attempt(
    target: &Target,
    route: &Route,
    request: &ChatRequest,
    http: &HttpClient,
    deadline: Instant,
) -> Result<(Committed, Headroom), AttemptError> {
    let started = Instant::now();
    if !request.stream {
        let limit = (started + target.attempt_timeout).min(deadline);
        return match tokio::time::timeout_at(limit, target.provider.send(http, &target.model, request, target.key))
            .await
        {
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
        let sent = target.provider.send(http, &target.model, request, target.key).await?;
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
