//! Target health in the sidecar: one circuit breaker, in-flight count, peak-EWMA latency and
//! rate-limit headroom per target, and one retry budget per route.
//!
//! State lives in a [`HealthRegistry`] that outlives policy snapshots, so a reload keeps what
//! the sidecar has learnt about targets it still uses. Every lock here guards a few arithmetic
//! steps and is never held across an `.await`; the breaker and budget themselves are pure
//! state machines ([`breaker`], on the core it shares with the operator's fleet view,
//! [`circuit`]; [`budget`]) tested with paused time. What the admin endpoint shows is typed
//! here ([`TargetView`], [`BudgetView`]) and written as JSON there.

pub mod balance;
pub mod breaker;
pub mod budget;
pub mod circuit;
pub mod gate;
pub mod spend;
pub mod verify;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::chain::{BreakerSettings, BudgetSettings, SpendLimit};
use crate::llm::FailureClass;
use crate::policy::TargetState;
use balance::{Candidate, PeakEwma};
use breaker::{Admission, Breaker, OpenCause, Phase};
use budget::RetryBudget;
use gate::{FleetState, Forced, Gates, Verdict};
use spend::SpendGuard;

#[derive(Debug, Default)]
struct Stats {
    latency: PeakEwma,
    saturated_until: Option<Instant>,
    successes: u64,
    failures: BTreeMap<FailureClass, u64>,
    last_failure: Option<String>,
}

/// What one target did since it was last reported to the operator: the evidence its fleet
/// view is made of.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Requests that succeeded.
    pub successes: u64,
    /// Requests that failed in a way that counts against the target.
    pub failures: u64,
    /// The longest wait a provider asked for with `Retry-After` on a 429 or 503.
    pub retry_after: Option<Duration>,
    /// The last counted failure, as `class: message`.
    pub last_failure: Option<String>,
    /// The failures since the last success in this tally.
    pub trailing_failures: u64,
}

impl Tally {
    fn is_empty(&self) -> bool {
        self.successes == 0 && self.failures == 0
    }
}

/// Everything the sidecar knows about one target's health.
#[derive(Debug)]
pub struct TargetHealth {
    label: String,
    breaker: Mutex<Breaker>,
    in_flight: AtomicU32,
    stats: Mutex<Stats>,
    /// Locked before `breaker` where both are needed.
    gates: Mutex<Gates>,
    tally: Mutex<Tally>,
    observer: Arc<OnceLock<Arc<dyn HealthObserver>>>,
    /// The last verification probe this pod sent it.
    verified: Mutex<Option<verify::Verified>>,
}

/// What is told of breakers opening and closing (telemetry).
pub trait HealthObserver: Send + Sync + std::fmt::Debug {
    /// `target`'s breaker opened for `period`, because `why`.
    fn opened(&self, target: &str, period: Duration, why: &str);
    /// `target`'s breaker closed.
    fn closed(&self, target: &str);
}

impl TargetHealth {
    /// A healthy target.
    pub fn new(label: String, settings: BreakerSettings) -> Self {
        TargetHealth {
            label,
            breaker: Mutex::new(Breaker::new(settings)),
            in_flight: AtomicU32::new(0),
            stats: Mutex::default(),
            gates: Mutex::default(),
            tally: Mutex::default(),
            observer: Arc::default(),
            verified: Mutex::default(),
        }
    }

    /// Whether a request would be admitted now (no probe slot is taken).
    pub fn peek(&self, now: Instant) -> Admission {
        let gates = self.gates.lock();
        let breaker = self.breaker.lock();
        match gates.verdict(now, breaker.settings().half_open_probes) {
            Verdict::Allow => Admission::Allowed,
            Verdict::Refuse { since, until, by } => Admission::Refused { since, until, by },
            Verdict::Probe | Verdict::Breaker => breaker.peek(now),
        }
    }

    /// Asks to send one request; `None` while the breaker, the fleet or an override refuses.
    pub fn admit(self: &Arc<Self>, now: Instant) -> Option<Permit> {
        let mut gates = self.gates.lock();
        let mut breaker = self.breaker.lock();
        let fleet_probe = match gates.verdict(now, breaker.settings().half_open_probes) {
            Verdict::Allow => return Some(self.permit(false, false)),
            Verdict::Refuse { .. } => return None,
            Verdict::Probe => true,
            Verdict::Breaker => false,
        };
        let probe = match breaker.admit(now) {
            Admission::Allowed => false,
            Admission::Probe => true,
            Admission::Refused { .. } => return None,
        };
        if fleet_probe {
            gates.probes += 1;
        }
        Some(self.permit(probe, fleet_probe))
    }

    /// Sends one request even while the breaker or the fleet refuses: every target is out and
    /// this one went out earliest, which beats failing without trying. (Targets an override
    /// drains are never chosen for this.)
    pub fn admit_forced(self: &Arc<Self>, now: Instant) -> Permit {
        let (probe, forced) = match self.breaker.lock().admit(now) {
            Admission::Probe => (true, false),
            Admission::Allowed => (false, false),
            Admission::Refused { .. } => (false, true),
        };
        let mut permit = self.permit(probe, false);
        permit.forced = forced;
        permit
    }

    fn permit(self: &Arc<Self>, probe: bool, fleet_probe: bool) -> Permit {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Permit { health: self.clone(), probe, fleet_probe, forced: false, done: false }
    }

    /// Applies the policy's override for this target (`None`: there is none).
    pub fn set_forced(&self, forced: Option<Forced>) {
        self.gates.lock().set_forced(forced);
    }

    /// Applies the fleet's decision for this target (`None`: the fleet leaves it to the pod).
    pub fn set_fleet(&self, state: Option<FleetState>) {
        self.gates.lock().set_fleet(state);
    }

    /// Changes the breaker with `change` and tells the observer when it opened or closed.
    fn breaker_change<T>(&self, now: Instant, change: impl FnOnce(&mut Breaker) -> T) -> T {
        let (result, before, after, cause) = {
            let mut breaker = self.breaker.lock();
            let before = std::mem::discriminant(&breaker.phase(now));
            let result = change(&mut breaker);
            let after = breaker.phase(now);
            (result, before, after, breaker.cause())
        };
        if before != std::mem::discriminant(&after)
            && let Some(observer) = self.observer.get()
        {
            match after {
                Phase::Open { until, .. } => {
                    let why = match cause {
                        OpenCause::Failures => "failures crossed the breaker's threshold".to_string(),
                        OpenCause::FailedProbe => "a probe failed".to_string(),
                        OpenCause::RetryAfter(wait) => {
                            format!("the provider asked to wait {}s", wait.as_secs_f64().ceil())
                        }
                    };
                    observer.opened(&self.label, until.saturating_duration_since(now), &why);
                }
                Phase::Closed => observer.closed(&self.label),
                Phase::HalfOpen { .. } => {}
            }
        }
        result
    }

    /// Whether the fleet's evidence counts for this target (`circuitBreaker.scope: fleet`).
    fn fleet_scoped(&self) -> bool {
        self.breaker.lock().settings().scope == crate::policy::BreakerScope::Fleet
    }

    /// What this target did since the last call, and forgets it.
    fn take_tally(&self) -> Tally {
        std::mem::take(&mut *self.tally.lock())
    }

    fn count_success(&self) {
        let mut tally = self.tally.lock();
        tally.successes += 1;
        tally.trailing_failures = 0;
    }

    fn count_failure(&self, retry_after: Option<Duration>, failure: String) {
        let mut tally = self.tally.lock();
        tally.failures += 1;
        tally.trailing_failures += 1;
        tally.retry_after = tally.retry_after.max(retry_after);
        tally.last_failure = Some(failure);
    }

    /// The balancer's view of this target.
    pub fn candidate(&self, weight: u32, now: Instant) -> Candidate {
        let stats = self.stats.lock();
        let in_flight = f64::from(self.in_flight.load(Ordering::Relaxed));
        Candidate {
            weight,
            cost: stats.latency.seconds() * (in_flight + 1.0),
            saturated: stats.saturated_until.is_some_and(|until| until > now),
        }
    }

    /// Notes the provider's rate-limit headroom: out of requests or tokens for `for_how_long`.
    pub fn note_saturation(&self, now: Instant, for_how_long: Option<Duration>) {
        if let Some(wait) = for_how_long {
            self.stats.lock().saturated_until = Some(now + wait);
        }
    }

    /// Notes how a verification probe this pod sent ended, for `/health`; nothing else.
    pub fn note_verified(&self, verified: verify::Verified) {
        *self.verified.lock() = Some(verified);
    }

    fn reconfigure(&self, settings: BreakerSettings) {
        self.breaker.lock().reconfigure(settings);
    }

    /// This target's health now, as the admin `/health` endpoint shows it.
    pub fn view(&self, now: Instant) -> TargetView {
        let gates = self.gates.lock().clone();
        let breaker = self.breaker.lock();
        let stats = self.stats.lock();
        let phase = breaker.phase(now);
        let (state, retry_in) = match phase {
            Phase::Closed => (TargetState::Closed, None),
            Phase::Open { until, .. } => (TargetState::Open, Some(until.saturating_duration_since(now))),
            Phase::HalfOpen { .. } => (TargetState::HalfOpen, Some(Duration::ZERO)),
        };
        let out_because = (phase != Phase::Closed).then(|| OutBecause::Breaker(breaker.cause()));
        let (state, retry_in, out_because) = match (gates.forced_at(now), gates.fleet_at(now)) {
            (Some(forced), _) => (
                if forced.open { TargetState::ForcedOpen } else { TargetState::ForcedClosed },
                forced.until.filter(|_| forced.open).map(|until| until.saturating_duration_since(now)),
                Some(OutBecause::Override(forced.reason.clone())),
            ),
            (None, Some(FleetState::Open { until, reason, .. })) => (
                TargetState::Open,
                Some(until.saturating_duration_since(now)),
                Some(OutBecause::Fleet { reason: reason.clone(), probe: None }),
            ),
            (None, Some(FleetState::HalfOpen { reason, probe, .. })) => {
                (TargetState::HalfOpen, None, Some(OutBecause::Fleet { reason: reason.clone(), probe: Some(*probe) }))
            }
            (None, None) => (state, retry_in, out_because),
        };
        TargetView {
            target: self.label.clone(),
            state,
            retry_in,
            out_because,
            consecutive_failures: breaker.consecutive_failures(),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            latency: stats.latency.seconds(),
            successes: stats.successes,
            failures: stats.failures.clone(),
            last_failure: stats.last_failure.clone(),
            rate_limited_for: stats.saturated_until.map(|until| until.saturating_duration_since(now)),
            verified: self.verified.lock().clone(),
        }
    }
}

/// One target's health, as the admin endpoint shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct TargetView {
    /// Its label.
    pub target: String,
    /// Where it stands: its own breaker, unless the fleet or an override decides.
    pub state: TargetState,
    /// When it will be tried again, if it is out.
    pub retry_in: Option<Duration>,
    /// Why it is out (or forced).
    pub out_because: Option<OutBecause>,
    /// Counted failures in a row.
    pub consecutive_failures: u64,
    /// Requests in flight.
    pub in_flight: u32,
    /// Its latency (peak EWMA), in seconds.
    pub latency: f64,
    /// Requests that succeeded.
    pub successes: u64,
    /// Failures, by class.
    pub failures: BTreeMap<FailureClass, u64>,
    /// The last failure, as `class: message`.
    pub last_failure: Option<String>,
    /// How long its rate-limit headers say it is out of quota (steered away from, not open).
    pub rate_limited_for: Option<Duration>,
    /// The last verification probe this pod sent it.
    pub verified: Option<verify::Verified>,
}

/// Why a target is out of rotation, or forced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutBecause {
    /// The pod's own breaker opened.
    Breaker(OpenCause),
    /// An override.
    Override(String),
    /// The fleet's decision; half-open, whether this pod is one of its probers.
    Fleet {
        /// The fleet's reason.
        reason: String,
        /// Half-open: whether this pod probes it.
        probe: Option<bool>,
    },
}

/// Permission to send one request to a target; report its outcome through it. Dropped without
/// an outcome (the request was cancelled), it frees its probe slot and counts nothing.
#[derive(Debug)]
pub struct Permit {
    health: Arc<TargetHealth>,
    probe: bool,
    /// Holds one of the fleet's probe slots at this pod.
    fleet_probe: bool,
    /// Let through while the breaker was open (every target was).
    forced: bool,
    done: bool,
}

impl Permit {
    /// The request succeeded after `latency`.
    pub fn succeeded(mut self, now: Instant, latency: Duration) {
        self.done = true;
        self.health.breaker_change(now, |b| b.on_success(now, self.probe || self.forced));
        self.health.count_success();
        let mut stats = self.health.stats.lock();
        stats.successes += 1;
        stats.latency.observe(now, latency);
    }

    /// A stream's first token came after `latency`; its outcome is reported when it ends.
    pub fn first_token(&mut self, now: Instant, latency: Duration) {
        self.health.stats.lock().latency.observe(now, latency);
    }

    /// A stream ended cleanly.
    pub fn finished(mut self, now: Instant) {
        self.done = true;
        self.health.breaker_change(now, |b| b.on_success(now, self.probe || self.forced));
        self.health.count_success();
        self.health.stats.lock().successes += 1;
    }

    /// A stream broke after its first token: it counts against the target like any failure,
    /// without a latency sample.
    pub fn broke(mut self, now: Instant, class: FailureClass, message: &str) {
        self.done = true;
        let failure = format!("{class} after the first token: {message}");
        if self.health.breaker_change(now, |b| b.on_failure(now, class, None, self.probe)) {
            self.health.count_failure(None, failure.clone());
        }
        let mut stats = self.health.stats.lock();
        *stats.failures.entry(class).or_default() += 1;
        stats.last_failure = Some(failure);
    }

    /// The request failed.
    pub fn failed(
        mut self,
        now: Instant,
        latency: Duration,
        class: FailureClass,
        retry_after: Option<Duration>,
        message: &str,
    ) {
        self.done = true;
        let failure = format!("{class}: {message}");
        if self.health.breaker_change(now, |b| b.on_failure(now, class, retry_after, self.probe)) {
            let asked = retry_after.filter(|_| matches!(class, FailureClass::RateLimited | FailureClass::Overloaded));
            self.health.count_failure(asked, failure.clone());
        }
        let mut stats = self.health.stats.lock();
        *stats.failures.entry(class).or_default() += 1;
        stats.last_failure = Some(failure);
        // A timeout says the target is at least this slow.
        if class == FailureClass::Timeout {
            stats.latency.observe(now, latency);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.fleet_probe {
            let mut gates = self.health.gates.lock();
            gates.probes = gates.probes.saturating_sub(1);
        }
        if !self.done {
            self.health.breaker.lock().on_cancel(self.probe);
        }
        self.health.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A route's retry budget, shared by its requests.
#[derive(Debug)]
pub struct SharedBudget {
    route: String,
    budget: Mutex<RetryBudget>,
}

impl SharedBudget {
    /// A request arrived.
    pub fn deposit(&self, now: Instant) {
        self.budget.lock().deposit(now);
    }

    /// Asks for one extra attempt (retry, fall-through or hedge).
    pub fn withdraw(&self, now: Instant) -> bool {
        self.budget.lock().withdraw(now)
    }

    /// Whether the route has retried, fallen through or hedged within the budget's window:
    /// a route under failure, where nothing optional (a shadow) should add load.
    pub fn strained(&self, now: Instant) -> bool {
        self.budget.lock().spent(now)
    }

    fn view(&self, now: Instant) -> BudgetView {
        let mut budget = self.budget.lock();
        let available = budget.available(now).max(0.0).floor();
        let (requests, extra_attempts) = budget.totals();
        BudgetView { route: self.route.clone(), requests, extra_attempts, available }
    }
}

/// One route's retry budget, as the admin endpoint shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct BudgetView {
    /// The route.
    pub route: String,
    /// Requests in the budget's window.
    pub requests: u64,
    /// Extra attempts (retries, fall-throughs, hedges) in the window.
    pub extra_attempts: u64,
    /// Extra attempts still allowed now.
    pub available: f64,
}

/// All health state, keyed so that it survives policy reloads.
#[derive(Debug, Default)]
pub struct HealthRegistry {
    targets: Mutex<HashMap<String, Arc<TargetHealth>>>,
    budgets: Mutex<HashMap<String, Arc<SharedBudget>>>,
    spends: Mutex<HashMap<String, Arc<SpendGuard>>>,
    observer: Arc<OnceLock<Arc<dyn HealthObserver>>>,
    verify: verify::VerifyBook,
}

impl HealthRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        HealthRegistry::default()
    }

    /// The health of the target identified by `key` (provider, endpoint, model and key),
    /// created with `settings` if new. Settings of an existing target change only through
    /// [`HealthRegistry::apply`], once the whole policy is known to be valid.
    pub fn target(&self, key: &str, label: &str, settings: &BreakerSettings) -> Arc<TargetHealth> {
        self.targets
            .lock()
            .entry(key.to_string())
            .or_insert_with(|| {
                let mut target = TargetHealth::new(label.to_string(), settings.clone());
                target.observer = self.observer.clone();
                Arc::new(target)
            })
            .clone()
    }

    /// The verification probes ordered from this pod, and their results.
    pub fn verify(&self) -> &verify::VerifyBook {
        &self.verify
    }

    /// Sets who is told of breakers opening and closing (once; later calls change nothing).
    pub fn observe(&self, observer: Arc<dyn HealthObserver>) {
        let _ = self.observer.set(observer);
    }

    /// Each target's own breaker state now, by label.
    pub fn states(&self, now: Instant) -> Vec<(String, TargetState)> {
        self.targets
            .lock()
            .values()
            .map(|t| {
                let state = match t.breaker.lock().phase(now) {
                    Phase::Closed => TargetState::Closed,
                    Phase::Open { .. } => TargetState::Open,
                    Phase::HalfOpen { .. } => TargetState::HalfOpen,
                };
                (t.label.clone(), state)
            })
            .collect()
    }

    /// Each route's retry budget now: extra attempts still allowed, by route.
    pub fn budgets(&self, now: Instant) -> Vec<(String, f64)> {
        self.budgets.lock().values().map(|b| (b.route.clone(), b.budget.lock().available(now).max(0.0))).collect()
    }

    /// The retry budget of a route, created if new.
    pub fn budget(&self, route: &str, settings: BudgetSettings) -> Arc<SharedBudget> {
        self.budgets
            .lock()
            .entry(route.to_string())
            .or_insert_with(|| {
                Arc::new(SharedBudget { route: route.to_string(), budget: Mutex::new(RetryBudget::new(settings)) })
            })
            .clone()
    }

    /// The spend guard of the target `limit` is counted under, created with `limit` if new
    /// (an existing one takes a changed limit through [`SpendGuard::reconfigure`], once the
    /// whole policy is known to be valid).
    pub fn spend(&self, limit: &SpendLimit) -> Arc<SpendGuard> {
        self.spends.lock().entry(limit.key.clone()).or_insert_with(|| Arc::new(SpendGuard::new(limit.clone()))).clone()
    }

    /// What this pod has spent on each limited target in the window `at` (Unix ms) falls in, as
    /// `(window, usd)` by spend key; targets that spent nothing are left out.
    pub fn spend_reports(&self, at: i64) -> BTreeMap<String, (i64, f64)> {
        self.spends.lock().iter().filter_map(|(key, guard)| Some((key.clone(), guard.report(at)?))).collect()
    }

    /// Applies the fleet's word on spent windows: `spent` gives each spend key's, as
    /// `(window, usd)` (`None`: the fleet says nothing).
    pub fn apply_fleet_spend(&self, at: i64, spent: impl Fn(&str) -> Option<(i64, f64)>) {
        for (key, guard) in self.spends.lock().iter() {
            guard.set_fleet(at, spent(key));
        }
    }

    /// Applies a valid policy's settings to the state it uses, and forgets state no snapshot
    /// uses any more.
    pub fn apply(
        &self,
        targets: &[(Arc<TargetHealth>, Option<Forced>)],
        breaker: &BreakerSettings,
        budgets: &[Arc<SharedBudget>],
        budget: BudgetSettings,
    ) {
        for (target, forced) in targets {
            target.reconfigure(breaker.clone());
            target.set_forced(forced.clone());
        }
        for shared in budgets {
            shared.budget.lock().reconfigure(budget);
        }
        self.prune();
    }

    /// What every fleet-scoped target did since the last call, by identity; targets that did
    /// nothing are left out.
    pub fn take_tallies(&self) -> BTreeMap<String, Tally> {
        self.targets
            .lock()
            .iter()
            .filter(|(_, target)| target.fleet_scoped())
            .map(|(identity, target)| (identity.clone(), target.take_tally()))
            .filter(|(_, tally)| !tally.is_empty())
            .collect()
    }

    /// Applies the fleet's decisions: `decide` gives each target's, by identity (`None`: the
    /// fleet leaves it to the pod).
    pub fn apply_fleet(&self, decide: impl Fn(&str) -> Option<FleetState>) {
        for (identity, target) in self.targets.lock().iter() {
            target.set_fleet(decide(identity).filter(|_| target.fleet_scoped()));
        }
    }

    /// Drops state that only the registry still holds.
    fn prune(&self) {
        self.targets.lock().retain(|_, target| Arc::strong_count(target) > 1);
        self.budgets.lock().retain(|_, budget| Arc::strong_count(budget) > 1);
        self.spends.lock().retain(|_, spend| Arc::strong_count(spend) > 1);
    }

    /// Every target's and route's state now, in label and route order, for the admin
    /// `/health` endpoint.
    pub fn view(&self, now: Instant) -> (Vec<TargetView>, Vec<BudgetView>) {
        let mut targets: Vec<TargetView> = self.targets.lock().values().map(|t| t.view(now)).collect();
        targets.sort_by(|a, b| a.target.cmp(&b.target));
        let mut budgets: Vec<BudgetView> = self.budgets.lock().values().map(|b| b.view(now)).collect();
        budgets.sort_by(|a, b| a.route.cmp(&b.route));
        (targets, budgets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default)]
    struct Seen(Mutex<Vec<String>>);

    impl HealthObserver for Seen {
        fn opened(&self, target: &str, period: Duration, why: &str) {
            self.0.lock().push(format!("{target} opened for {}s: {why}", period.as_secs()));
        }

        fn closed(&self, target: &str) {
            self.0.lock().push(format!("{target} closed"));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_observer_hears_each_opening_and_closing_once() {
        let registry = HealthRegistry::new();
        let seen = Arc::new(Seen::default());
        registry.observe(seen.clone());
        let settings = BreakerSettings {
            consecutive_failures: 2,
            failure_rate: None,
            open_for: Duration::from_secs(5),
            max_open_for: Duration::from_secs(5),
            half_open_probes: 1,
            counts: crate::llm::ClassSet::breaker_default(),
            scope: crate::policy::BreakerScope::Fleet,
        };
        let target = registry.target("id", "a/m", &settings);
        let now = Instant::now();
        for _ in 0..3 {
            if let Some(permit) = target.admit(now) {
                permit.failed(now, Duration::ZERO, FailureClass::ServerError, None, "boom");
            }
        }
        let later = now + Duration::from_secs(5);
        target.admit(later).expect("a probe").succeeded(later, Duration::from_millis(1));
        assert_eq!(*seen.0.lock(), ["a/m opened for 5s: failures crossed the breaker's threshold", "a/m closed"]);
        assert_eq!(registry.states(later), [("a/m".to_string(), TargetState::Closed)]);
    }

    #[tokio::test(start_paused = true)]
    async fn permits_count_in_flight_and_free_probe_slots_when_dropped() {
        let settings = BreakerSettings {
            consecutive_failures: 1,
            failure_rate: None,
            open_for: Duration::from_secs(1),
            max_open_for: Duration::from_secs(1),
            half_open_probes: 1,
            counts: crate::llm::ClassSet::breaker_default(),
            scope: crate::policy::BreakerScope::Fleet,
        };
        let health = Arc::new(TargetHealth::new("p/m".into(), settings));
        let now = Instant::now();
        let permit = health.admit(now).expect("closed");
        assert_eq!(health.in_flight.load(Ordering::Relaxed), 1);
        permit.failed(now, Duration::from_millis(5), FailureClass::ServerError, None, "boom");
        assert_eq!(health.in_flight.load(Ordering::Relaxed), 0);
        assert!(health.admit(now).is_none(), "open");
        drop(health.admit_forced(now));
        assert_eq!(health.in_flight.load(Ordering::Relaxed), 0);
        let later = now + Duration::from_secs(1);
        let probe = health.admit(later).expect("half-open probe");
        assert!(health.admit(later).is_none(), "one probe at a time");
        drop(probe);
        let probe = health.admit(later).expect("the cancelled probe's slot is free again");
        probe.succeeded(later, Duration::from_millis(3));
        assert_eq!(health.view(later).state, TargetState::Closed);
    }
}
