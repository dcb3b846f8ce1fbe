//! The circuit breaker of one target, as a pure state machine over explicit instants.
//!
//! Closed: requests flow; failures of the counted classes are tallied. It opens on N
//! consecutive failures, on a failure rate over a sliding window (once the window holds enough
//! requests), or at once when a 429/503 names a `Retry-After`. Open: requests are refused until
//! the open period ends; each opening without a recovery in between doubles the period, up to
//! a maximum. Half-open: a bounded number of probes go through; a probe's success closes it, a
//! probe's failure opens it again for longer.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::chain::BreakerSettings;
use crate::llm::FailureClass;

/// Where a breaker stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Requests flow.
    Closed,
    /// Requests are refused until `until`.
    Open {
        /// When it opened.
        since: Instant,
        /// When it becomes half-open.
        until: Instant,
    },
    /// Probes are let through.
    HalfOpen {
        /// When it first opened, for "earliest opened" ordering.
        since: Instant,
        /// Probes in flight now.
        probes: u32,
    },
}

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
    phase: Phase,
    consecutive: u32,
    openings: u32,
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

impl Breaker {
    /// A closed breaker.
    pub fn new(settings: BreakerSettings) -> Self {
        let window = Window::new(settings.failure_rate.map_or(Duration::from_secs(30), |r| r.window));
        Breaker { settings, phase: Phase::Closed, consecutive: 0, openings: 0, window, cause: OpenCause::Failures }
    }

    /// Replaces the settings (a policy reload), keeping the state.
    pub fn reconfigure(&mut self, settings: BreakerSettings) {
        if self.settings != settings {
            if settings.failure_rate.map(|r| r.window) != self.settings.failure_rate.map(|r| r.window) {
                self.window = Window::new(settings.failure_rate.map_or(Duration::from_secs(30), |r| r.window));
            }
            self.settings = settings;
        }
    }

    /// The current phase, advanced to half-open if the open period is over.
    pub fn phase(&self, now: Instant) -> Phase {
        match self.phase {
            Phase::Open { since, until } if now >= until => Phase::HalfOpen { since, probes: 0 },
            phase => phase,
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> &BreakerSettings {
        &self.settings
    }

    /// Counted consecutive failures so far.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive
    }

    /// Whether a request would be admitted now, without taking a probe slot.
    pub fn peek(&self, now: Instant) -> Admission {
        match self.phase(now) {
            Phase::Closed => Admission::Allowed,
            Phase::HalfOpen { probes, .. } if probes < self.settings.half_open_probes => Admission::Probe,
            Phase::HalfOpen { since, .. } => Admission::Refused { since, until: now, by: RefusedBy::Breaker },
            Phase::Open { since, until } => Admission::Refused { since, until, by: RefusedBy::Breaker },
        }
    }

    /// Asks to send a request; a `Probe` holds a probe slot until its outcome is reported.
    pub fn admit(&mut self, now: Instant) -> Admission {
        self.phase = self.phase(now);
        let admission = self.peek(now);
        if let (Admission::Probe, Phase::HalfOpen { probes, .. }) = (admission, &mut self.phase) {
            *probes += 1;
        }
        admission
    }

    /// The request succeeded. Only a probe, or a request let through while open, closes an
    /// open breaker: a success from a request admitted before it opened (a long stream ending
    /// late) says nothing about the target now.
    pub fn on_success(&mut self, now: Instant, admitted_while_open: bool) {
        self.consecutive = 0;
        self.window.record(now, false);
        match self.phase {
            Phase::HalfOpen { .. } | Phase::Open { .. } if admitted_while_open => self.close(),
            Phase::HalfOpen { .. } | Phase::Open { .. } | Phase::Closed => {}
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
        self.consecutive += 1;
        self.window.record(now, true);
        let asked = retry_after.filter(|_| matches!(class, FailureClass::RateLimited | FailureClass::Overloaded));
        match self.phase(now) {
            Phase::HalfOpen { .. } => self.trip(now, asked, OpenCause::FailedProbe),
            Phase::Open { since, until } => {
                // A late failure from before it opened; a later Retry-After still extends it.
                if let Some(wait) = asked
                    && now + wait > until
                {
                    self.phase = Phase::Open { since, until: now + wait };
                    self.cause = OpenCause::RetryAfter(wait);
                }
            }
            Phase::Closed => {
                if self.threshold_reached() {
                    self.trip(now, asked, OpenCause::Failures);
                } else if let Some(wait) = asked {
                    // The provider said when to come back: believe it, without counting it as
                    // an opening that lengthens the next one.
                    self.phase = Phase::Open { since: now, until: now + wait };
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
        if let (true, Phase::HalfOpen { probes, .. }) = (probe, &mut self.phase) {
            *probes = probes.saturating_sub(1);
        }
    }

    fn threshold_reached(&self) -> bool {
        let consecutive =
            self.settings.consecutive_failures > 0 && self.consecutive >= self.settings.consecutive_failures;
        let rate = self.settings.failure_rate.is_some_and(|rule| {
            let (total, failed) = self.window.totals();
            total >= u64::from(rule.min_requests.max(1)) && failed * 100 >= total * u64::from(rule.percent)
        });
        consecutive || rate
    }

    fn trip(&mut self, now: Instant, retry_after: Option<Duration>, cause: OpenCause) {
        self.openings = self.openings.saturating_add(1);
        let doubled = self.settings.open_for.saturating_mul(1 << (self.openings - 1).min(16));
        let period = doubled.min(self.settings.max_open_for);
        self.cause = match retry_after {
            Some(wait) if wait > period => OpenCause::RetryAfter(wait),
            _ => cause,
        };
        self.phase = Phase::Open { since: now, until: now + period.max(retry_after.unwrap_or_default()) };
        self.consecutive = 0;
    }

    /// Why it last opened.
    pub fn cause(&self) -> OpenCause {
        self.cause
    }

    fn close(&mut self) {
        self.phase = Phase::Closed;
        self.openings = 0;
        self.consecutive = 0;
        self.window.clear();
    }
}

/// Request and failure counts over a sliding window, in ten buckets.
#[derive(Clone, Debug)]
struct Window {
    span: Duration,
    bucket: Duration,
    buckets: VecDeque<(Instant, u64, u64)>,
}

impl Window {
    fn new(span: Duration) -> Self {
        let bucket = (span / 10).max(Duration::from_millis(10));
        Window { span, bucket, buckets: VecDeque::new() }
    }

    fn record(&mut self, now: Instant, failed: bool) {
        while self.buckets.front().is_some_and(|(start, _, _)| now.saturating_duration_since(*start) >= self.span) {
            self.buckets.pop_front();
        }
        match self.buckets.back_mut() {
            Some((start, total, failures)) if now.saturating_duration_since(*start) < self.bucket => {
                *total += 1;
                *failures += u64::from(failed);
            }
            _ => self.buckets.push_back((now, 1, u64::from(failed))),
        }
    }

    fn totals(&self) -> (u64, u64) {
        self.buckets.iter().fold((0, 0), |(t, f), (_, total, failed)| (t + total, f + failed))
    }

    fn clear(&mut self) {
        self.buckets.clear();
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
