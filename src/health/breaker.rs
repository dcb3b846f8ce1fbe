//! The circuit breaker of one target, as a pure state machine over explicit instants, on the
//! core it shares with the fleet view ([`super::circuit`]).
//!
//! Closed: requests flow; failures of the counted classes are tallied. It opens on N
//! consecutive failures, on a failure rate over a sliding window (once the window holds enough
//! requests), or at once when a 429/503 names a `Retry-After`. Open: requests are refused until
//! the open period ends; each opening without a recovery in between doubles the period, up to
//! a maximum. Half-open: a bounded number of probes go through; a probe's success closes it, a
//! probe's failure opens it again for longer.

use std::time::Duration;

use tokio::time::Instant;

use super::circuit::{self, Circuit, Counts, Window};
use crate::chain::BreakerSettings;
use crate::llm::FailureClass;

/// Where a breaker stands; half-open, it counts the probes in flight.
pub type Phase = circuit::Phase<u32>;

/// The breaker's answer to "may a request go to this target now?".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Closed: go ahead.
    Allowed,
    /// Half-open: go ahead as a probe; report how it went.
    Probe,
    /// Open (or out of probes): not now.
    Refused {
        /// When it opened; the chain prefers the earliest when everything is open.
        since: Instant,
        /// When it will let a probe through.
        until: Instant,
        /// What refused it.
        by: RefusedBy,
    },
}

/// What keeps a request from a target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusedBy {
    /// The pod's own breaker.
    Breaker,
    /// The fleet's decision, from the operator.
    Fleet,
    /// A `ForcedOpen` override in the policy: never tried, not even as a last resort.
    Override,
}

/// One target's breaker.
#[derive(Clone, Debug)]
pub struct Breaker {
    settings: BreakerSettings,
    circuit: Circuit<u32>,
    consecutive: u64,
    window: Window,
    /// Why it last opened.
    cause: OpenCause,
}

/// Why a breaker opened, as `/health` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenCause {
    /// Failures crossed `consecutiveFailures` or the failure rate.
    Failures,
    /// The provider answered 429 or 503 with a `Retry-After` of this long.
    RetryAfter(Duration),
    /// A half-open probe failed.
    FailedProbe,
}

const SUCCESS: Counts = Counts { successes: 1, failures: 0 };
const FAILURE: Counts = Counts { successes: 0, failures: 1 };

impl Breaker {
    /// A closed breaker.
    pub fn new(settings: BreakerSettings) -> Self {
        let window = Window::new(circuit::window_of(&settings));
        Breaker { settings, circuit: Circuit::default(), consecutive: 0, window, cause: OpenCause::Failures }
    }

    /// Replaces the settings (a policy reload), keeping the state.
    pub fn reconfigure(&mut self, settings: BreakerSettings) {
        if self.settings != settings {
            if circuit::window_of(&settings) != self.window.span() {
                self.window = Window::new(circuit::window_of(&settings));
            }
            self.settings = settings;
        }
    }

    /// The current phase, advanced to half-open if the open period is over.
    pub fn phase(&self, now: Instant) -> Phase {
        self.circuit.at(now)
    }

    /// The settings in force.
    pub fn settings(&self) -> &BreakerSettings {
        &self.settings
    }

    /// Counted consecutive failures so far.
    pub fn consecutive_failures(&self) -> u64 {
        self.consecutive
    }

    /// Whether a request would be admitted now, without taking a probe slot.
    pub fn peek(&self, now: Instant) -> Admission {
        match self.phase(now) {
            Phase::Closed => Admission::Allowed,
            Phase::HalfOpen { probing, .. } if probing < self.settings.half_open_probes => Admission::Probe,
            Phase::HalfOpen { since, .. } => Admission::Refused { since, until: now, by: RefusedBy::Breaker },
            Phase::Open { since, until } => Admission::Refused { since, until, by: RefusedBy::Breaker },
        }
    }

    /// Asks to send a request; a `Probe` holds a probe slot until its outcome is reported.
    pub fn admit(&mut self, now: Instant) -> Admission {
        self.circuit.advance(now);
        let admission = self.peek(now);
        if let (Admission::Probe, Some(probes)) = (admission, self.circuit.probing_mut()) {
            *probes += 1;
        }
        admission
    }

    /// The request succeeded. Only a probe, or a request let through while open, closes an
    /// open breaker: a success from a request admitted before it opened (a long stream ending
    /// late) says nothing about the target now.
    pub fn on_success(&mut self, now: Instant, admitted_while_open: bool) {
        self.consecutive = circuit::streak_after(self.consecutive, SUCCESS, 0);
        self.window.record(now, SUCCESS);
        if admitted_while_open && !self.circuit.is_closed() {
            self.close();
        }
    }

    /// The request failed with `class`; `retry_after` is the wait the upstream asked for.
    /// Returns whether the failure counted against the target.
    pub fn on_failure(
        &mut self,
        now: Instant,
        class: FailureClass,
        retry_after: Option<Duration>,
        probe: bool,
    ) -> bool {
        if !self.settings.counts.contains(class) {
            self.release_probe(probe);
            return false;
        }
        self.consecutive = circuit::streak_after(self.consecutive, FAILURE, FAILURE.failures);
        self.window.record(now, FAILURE);
        let asked = retry_after.filter(|_| matches!(class, FailureClass::RateLimited | FailureClass::Overloaded));
        match self.phase(now) {
            Phase::HalfOpen { .. } => self.trip(now, asked, OpenCause::FailedProbe),
            Phase::Open { .. } => {
                // A late failure from before it opened; a later Retry-After still extends it.
                if let Some(wait) = asked
                    && self.circuit.extend(now, wait)
                {
                    self.cause = OpenCause::RetryAfter(wait);
                }
            }
            Phase::Closed => {
                if circuit::verdict(&self.settings, self.window.totals(), self.consecutive).is_some() {
                    self.trip(now, asked, OpenCause::Failures);
                } else if let Some(wait) = asked {
                    // The provider said when to come back: believe it, without counting it as
                    // an opening that lengthens the next one.
                    self.circuit.hold(now, wait);
                    self.cause = OpenCause::RetryAfter(wait);
                    self.consecutive = 0;
                }
            }
        }
        true
    }

    /// A probe whose request was cancelled before it had an outcome.
    pub fn on_cancel(&mut self, probe: bool) {
        self.release_probe(probe);
    }

    fn release_probe(&mut self, probe: bool) {
        if let (true, Some(probes)) = (probe, self.circuit.probing_mut()) {
            *probes = probes.saturating_sub(1);
        }
    }

    fn trip(&mut self, now: Instant, retry_after: Option<Duration>, cause: OpenCause) {
        let period = self.circuit.trip(now, &self.settings, retry_after);
        self.cause = match retry_after {
            Some(wait) if wait > period => OpenCause::RetryAfter(wait),
            _ => cause,
        };
        self.consecutive = 0;
    }

    /// Why it last opened.
    pub fn cause(&self) -> OpenCause {
        self.cause
    }

    fn close(&mut self) {
        self.circuit.close();
        self.consecutive = 0;
        self.window.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::FailureRate;
    use crate::llm::ClassSet;

    fn settings() -> BreakerSettings {
        BreakerSettings {
            consecutive_failures: 3,
            failure_rate: Some(FailureRate { percent: 50, window: Duration::from_secs(10), min_requests: 10 }),
            open_for: Duration::from_secs(30),
            max_open_for: Duration::from_secs(100),
            half_open_probes: 1,
            counts: ClassSet::breaker_default(),
            scope: crate::policy::BreakerScope::Fleet,
        }
    }

    fn fail(b: &mut Breaker, now: Instant) {
        assert_ne!(b.admit(now), Admission::Refused { since: now, until: now, by: RefusedBy::Breaker });
        b.on_failure(now, FailureClass::ServerError, None, false);
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_and_probes_after_the_open_period() {
        let mut b = Breaker::new(settings());
        let t0 = Instant::now();
        fail(&mut b, t0);
        fail(&mut b, t0);
        assert_eq!(b.admit(t0), Admission::Allowed);
        b.on_failure(t0, FailureClass::Timeout, None, false);
        assert_eq!(
            b.peek(t0),
            Admission::Refused { since: t0, until: t0 + Duration::from_secs(30), by: RefusedBy::Breaker }
        );
        let later = t0 + Duration::from_secs(29);
        assert!(matches!(b.admit(later), Admission::Refused { .. }));
        let open_over = t0 + Duration::from_secs(30);
        assert_eq!(b.admit(open_over), Admission::Probe);
        assert!(matches!(b.admit(open_over), Admission::Refused { .. }), "only one probe at a time");
        b.on_success(open_over, true);
        assert_eq!(b.admit(open_over), Admission::Allowed);
        assert_eq!(b.phase(open_over), Phase::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn repeated_openings_double_up_to_the_maximum() {
        let mut b = Breaker::new(settings());
        let mut now = Instant::now();
        for _ in 0..3 {
            fail(&mut b, now);
        }
        let mut expected = [30, 60, 100, 100].into_iter();
        let Admission::Refused { until, .. } = b.peek(now) else { panic!("open") };
        assert_eq!(until - now, Duration::from_secs(expected.next().expect("period")));
        for period in expected {
            now = match b.peek(now) {
                Admission::Refused { until, .. } => until,
                other => panic!("expected open, got {other:?}"),
            };
            assert_eq!(b.admit(now), Admission::Probe);
            b.on_failure(now, FailureClass::ServerError, None, true);
            let Admission::Refused { until, .. } = b.peek(now) else { panic!("reopened") };
            assert_eq!(until - now, Duration::from_secs(period));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_success_from_before_the_opening_leaves_it_open() {
        let mut b = Breaker::new(settings());
        let t0 = Instant::now();
        for _ in 0..3 {
            fail(&mut b, t0);
        }
        b.on_success(t0 + Duration::from_secs(1), false);
        assert!(
            matches!(b.peek(t0 + Duration::from_secs(1)), Admission::Refused { .. }),
            "a stale success changes nothing"
        );
        b.on_success(t0 + Duration::from_secs(1), true);
        assert_eq!(b.peek(t0 + Duration::from_secs(1)), Admission::Allowed);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_opens_it_exactly_that_long() {
        let mut b = Breaker::new(settings());
        let t0 = Instant::now();
        assert_eq!(b.admit(t0), Admission::Allowed);
        b.on_failure(t0, FailureClass::RateLimited, Some(Duration::from_secs(5)), false);
        assert_eq!(
            b.peek(t0),
            Admission::Refused { since: t0, until: t0 + Duration::from_secs(5), by: RefusedBy::Breaker }
        );
        assert_eq!(b.admit(t0 + Duration::from_secs(5)), Admission::Probe);
        // A 500's Retry-After does not open it.
        let mut b = Breaker::new(settings());
        b.on_failure(t0, FailureClass::ServerError, Some(Duration::from_secs(5)), false);
        assert_eq!(b.peek(t0), Admission::Allowed);
    }

    #[tokio::test(start_paused = true)]
    async fn failure_rate_opens_once_the_window_has_enough_requests() {
        let mut b = Breaker::new(BreakerSettings { consecutive_failures: 0, ..settings() });
        let t0 = Instant::now();
        for i in 0..9 {
            b.admit(t0);
            if i % 2 == 0 {
                b.on_failure(t0, FailureClass::Overloaded, None, false);
            } else {
                b.on_success(t0, false);
            }
        }
        assert_eq!(b.peek(t0), Admission::Allowed, "9 requests are below the minimum of 10");
        b.on_failure(t0, FailureClass::Overloaded, None, false);
        assert!(matches!(b.peek(t0), Admission::Refused { .. }), "6 of 10 failed");
    }

    #[tokio::test(start_paused = true)]
    async fn old_failures_leave_the_window() {
        let mut b = Breaker::new(BreakerSettings { consecutive_failures: 0, ..settings() });
        let t0 = Instant::now();
        for _ in 0..9 {
            b.on_failure(t0, FailureClass::Overloaded, None, false);
        }
        let later = t0 + Duration::from_secs(11);
        b.on_failure(later, FailureClass::Overloaded, None, false);
        assert_eq!(b.peek(later), Admission::Allowed, "the first nine are older than the window");
    }

    #[tokio::test(start_paused = true)]
    async fn uncounted_classes_never_open_it() {
        let mut b = Breaker::new(settings());
        let t0 = Instant::now();
        for _ in 0..10 {
            b.on_failure(t0, FailureClass::BadRequest, None, false);
            b.on_failure(t0, FailureClass::ContextWindowExceeded, None, false);
        }
        assert_eq!(b.peek(t0), Admission::Allowed);
        assert_eq!(b.consecutive_failures(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_probe_frees_its_slot() {
        let mut b = Breaker::new(settings());
        let t0 = Instant::now();
        for _ in 0..3 {
            fail(&mut b, t0);
        }
        let t1 = t0 + Duration::from_secs(30);
        assert_eq!(b.admit(t1), Admission::Probe);
        b.on_cancel(true);
        assert_eq!(b.admit(t1), Admission::Probe);
    }
}
