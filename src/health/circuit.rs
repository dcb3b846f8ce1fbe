//! The breaker core that a pod's target health ([`super::breaker`]) and the operator's fleet
//! view (`operator::fleet`) both run on: evidence over a sliding window, the verdict the
//! policy's thresholds give on it, and the circuit's phases with open periods that double with
//! each reopening. Pure, over explicit instants: tested in paused time, with no clock of its own.
//!
//! The two users differ only in what they feed it and what half-open means to them: a pod
//! counts its own requests and lets a few probes through; the fleet pools every pod's reports,
//! asks that most pods see the failures, and names which pods probe.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::chain::BreakerSettings;

/// Successes and counted failures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Requests that succeeded.
    pub successes: u64,
    /// Requests that failed with a counted class.
    pub failures: u64,
}

impl Counts {
    /// Every request counted.
    pub fn total(&self) -> u64 {
        self.successes + self.failures
    }

    /// Whether at least `percent` of them failed (and at least one did).
    pub fn failing(&self, percent: u32) -> bool {
        self.failures > 0 && self.failures * 100 >= self.total() * u64::from(percent)
    }
}

impl std::ops::Add for Counts {
    type Output = Counts;

    fn add(self, other: Counts) -> Counts {
        Counts { successes: self.successes + other.successes, failures: self.failures + other.failures }
    }
}

/// Counts over a sliding window, in buckets of a tenth of it (at least 10 ms).
#[derive(Clone, Debug)]
pub struct Window {
    span: Duration,
    bucket: Duration,
    buckets: VecDeque<(Instant, Counts)>,
}

/// The window of the failure-rate rule in `settings` (30 s when it has none).
pub fn window_of(settings: &BreakerSettings) -> Duration {
    settings.failure_rate.map_or(Duration::from_secs(30), |rate| rate.window)
}

impl Window {
    /// An empty window reaching `span` back.
    pub fn new(span: Duration) -> Window {
        Window { span, bucket: (span / 10).max(Duration::from_millis(10)), buckets: VecDeque::new() }
    }

    /// How far back it reaches.
    pub fn span(&self) -> Duration {
        self.span
    }

    /// Adds `counts` at `now`, forgetting what has left the window.
    pub fn record(&mut self, now: Instant, counts: Counts) {
        self.expire(now);
        match self.buckets.back_mut() {
            Some((start, bucket)) if now.saturating_duration_since(*start) < self.bucket => *bucket = *bucket + counts,
            _ => self.buckets.push_back((now, counts)),
        }
    }

    /// Forgets what has left the window by `now`.
    pub fn expire(&mut self, now: Instant) {
        while self.buckets.front().is_some_and(|(start, _)| now.saturating_duration_since(*start) >= self.span) {
            self.buckets.pop_front();
        }
    }

    /// Everything still in the window.
    pub fn totals(&self) -> Counts {
        self.buckets.iter().fold(Counts::default(), |sum, (_, counts)| sum + *counts)
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        self.buckets.clear();
    }
}

/// Why evidence condemns a target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The failure rate crossed `failureRate.percent` over enough requests.
    Rate {
        /// Counted failures in the window.
        failures: u64,
        /// Requests in the window.
        total: u64,
        /// The window.
        window: Duration,
    },
    /// `consecutiveFailures` counted failures in a row.
    Streak(u64),
}

/// What `settings`' thresholds say of `counts` in the window and a `streak` of failures in a
/// row: the failure-rate rule first, then the streak.
pub fn verdict(settings: &BreakerSettings, counts: Counts, streak: u64) -> Option<Verdict> {
    if let Some(rate) = settings.failure_rate {
        let total = counts.total();
        if total >= u64::from(rate.min_requests.max(1)) && counts.failures * 100 >= total * u64::from(rate.percent) {
            return Some(Verdict::Rate { failures: counts.failures, total, window: rate.window });
        }
    }
    (settings.consecutive_failures > 0 && streak >= u64::from(settings.consecutive_failures))
        .then_some(Verdict::Streak(streak))
}

/// The failures-in-a-row count after `counts`, of whose failures the last `trailing` came after
/// their last success: a success in them ends the run before it and starts one of the failures
/// that follow it; with none, their failures add to the run.
pub fn streak_after(streak: u64, counts: Counts, trailing: u64) -> u64 {
    if counts.successes > 0 { trailing.min(counts.failures) } else { streak + counts.failures }
}

/// Where a circuit stands. What half-open holds (`P`) is the user's: probes in flight for a
/// pod, the chosen probers for the fleet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase<P> {
    /// Requests flow.
    Closed,
    /// Out until `until`.
    Open {
        /// When it opened.
        since: Instant,
        /// When it becomes half-open.
        until: Instant,
    },
    /// Being probed.
    HalfOpen {
        /// When it opened.
        since: Instant,
        /// Who probes, or how many do.
        probing: P,
    },
}

/// A circuit: its phase, and the openings since it last closed, which double the next open
/// period up to `maxOpenFor`.
#[derive(Clone, Debug)]
pub struct Circuit<P> {
    phase: Phase<P>,
    openings: u32,
}

impl<P> Default for Circuit<P> {
    fn default() -> Self {
        Circuit { phase: Phase::Closed, openings: 0 }
    }
}

impl<P: Clone + Default> Circuit<P> {
    /// The phase as it stands at `now`: an open period that has ended reads as half-open.
    pub fn at(&self, now: Instant) -> Phase<P> {
        match &self.phase {
            Phase::Open { since, until } if now >= *until => Phase::HalfOpen { since: *since, probing: P::default() },
            phase => phase.clone(),
        }
    }

    /// Moves to half-open if the open period has ended; returns whether it did.
    pub fn advance(&mut self, now: Instant) -> bool {
        match self.phase {
            Phase::Open { since, until } if now >= until => {
                self.phase = Phase::HalfOpen { since, probing: P::default() };
                true
            }
            _ => false,
        }
    }
}

impl<P> Circuit<P> {
    /// The phase as last moved (see [`Circuit::at`] for the phase at an instant).
    pub fn phase(&self) -> &Phase<P> {
        &self.phase
    }

    /// What half-open holds, to change it; `None` in another phase.
    pub fn probing_mut(&mut self) -> Option<&mut P> {
        match &mut self.phase {
            Phase::HalfOpen { probing, .. } => Some(probing),
            _ => None,
        }
    }

    /// Whether it is closed.
    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    /// Opens it for the next period of `settings`' doubling (`openFor`, then twice as long
    /// with each opening since it last closed, up to `maxOpenFor`), or for `at_least` when
    /// that is longer. Returns the doubling's period.
    pub fn trip(&mut self, now: Instant, settings: &BreakerSettings, at_least: Option<Duration>) -> Duration {
        self.openings = self.openings.saturating_add(1);
        let period = Backoff::new(settings.open_for, settings.max_open_for).nth(self.openings);
        self.phase = Phase::Open { since: now, until: now + period.max(at_least.unwrap_or_default()) };
        period
    }

    /// Opens it for exactly `wait`, as a provider asked, without counting an opening that
    /// would lengthen the next one.
    pub fn hold(&mut self, now: Instant, wait: Duration) {
        self.phase = Phase::Open { since: now, until: now + wait };
    }

    /// While open, keeps it open for `wait` from `now` if that is later than planned; returns
    /// whether it did.
    pub fn extend(&mut self, now: Instant, wait: Duration) -> bool {
        match &mut self.phase {
            Phase::Open { until, .. } if now + wait > *until => {
                *until = now + wait;
                true
            }
            _ => false,
        }
    }

    /// Closes it, and forgets its openings.
    pub fn close(&mut self) {
        self.phase = Phase::Closed;
        self.openings = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::FailureRate;
    use crate::llm::ClassSet;
    use crate::policy::BreakerScope;

    fn settings(consecutive: u32, rate: Option<(u32, u32)>) -> BreakerSettings {
        BreakerSettings {
            consecutive_failures: consecutive,
            failure_rate: rate.map(|(percent, min_requests)| FailureRate {
                percent,
                window: Duration::from_secs(10),
                min_requests,
            }),
            open_for: Duration::from_secs(5),
            max_open_for: Duration::from_secs(30),
            half_open_probes: 1,
            counts: ClassSet::breaker_default(),
            scope: BreakerScope::Pod,
        }
    }

    fn counts(successes: u64, failures: u64) -> Counts {
        Counts { successes, failures }
    }

    #[tokio::test(start_paused = true)]
    async fn a_window_forgets_what_leaves_it_bucket_by_bucket() {
        let mut window = Window::new(Duration::from_secs(10));
        let start = Instant::now();
        window.record(start, counts(1, 0));
        window.record(start + Duration::from_millis(500), counts(0, 2));
        window.record(start + Duration::from_secs(3), counts(4, 1));
        assert_eq!(window.totals(), counts(5, 3));
        window.expire(start + Duration::from_secs(10));
        assert_eq!(window.totals(), counts(4, 1), "the first bucket (both early records) left together");
        window.expire(start + Duration::from_secs(13));
        assert!(window.is_empty());
    }

    #[test]
    fn the_rate_rule_needs_its_minimum_and_the_streak_its_length() {
        let both = settings(3, Some((50, 4)));
        assert_eq!(verdict(&both, counts(1, 2), 2), None, "3 requests are fewer than the 4 the rate rule needs");
        assert_eq!(
            verdict(&both, counts(2, 2), 2),
            Some(Verdict::Rate { failures: 2, total: 4, window: Duration::from_secs(10) })
        );
        assert_eq!(verdict(&both, counts(9, 3), 3), Some(Verdict::Streak(3)));
        assert_eq!(verdict(&settings(0, None), counts(0, 100), 100), None, "0 turns the streak rule off");
        assert_eq!((streak_after(4, counts(0, 2), 0), streak_after(4, counts(1, 2), 0)), (6, 0));
        assert!(counts(1, 1).failing(50) && !counts(3, 1).failing(50) && !counts(0, 0).failing(0));
    }

    #[tokio::test(start_paused = true)]
    async fn open_periods_double_until_it_closes_and_a_named_wait_counts_no_opening() {
        let settings = settings(1, None);
        let mut circuit = Circuit::<u32>::default();
        let now = Instant::now();
        let periods: Vec<u64> = (0..4).map(|_| circuit.trip(now, &settings, None).as_secs()).collect();
        assert_eq!(periods, [5, 10, 20, 30]);
        circuit.close();
        assert_eq!(circuit.trip(now, &settings, Some(Duration::from_secs(60))), Duration::from_secs(5));
        assert_eq!(circuit.at(now), Phase::Open { since: now, until: now + Duration::from_secs(60) });
        assert!(!circuit.extend(now, Duration::from_secs(30)) && circuit.extend(now, Duration::from_secs(90)));
        circuit.close();
        circuit.hold(now, Duration::from_secs(7));
        assert_eq!(circuit.trip(now, &settings, None), Duration::from_secs(5), "the hold was not an opening");
    }

    #[tokio::test(start_paused = true)]
    async fn an_ended_open_period_reads_as_half_open_and_advances_once() {
        let mut circuit = Circuit::<u32>::default();
        let now = Instant::now();
        circuit.trip(now, &settings(1, None), None);
        let later = now + Duration::from_secs(5);
        assert_eq!(circuit.at(later), Phase::HalfOpen { since: now, probing: 0 });
        assert!(matches!(circuit.phase(), Phase::Open { .. }), "reading does not move it");
        assert!(circuit.advance(later) && !circuit.advance(later));
        *circuit.probing_mut().expect("half-open") += 1;
        assert_eq!(circuit.at(later), Phase::HalfOpen { since: now, probing: 1 });
    }
}
