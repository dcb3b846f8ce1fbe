//! Target health in the sidecar: one circuit breaker, in-flight count, peak-EWMA latency and
//! rate-limit headroom per target, and one retry budget per route.
//!
//! State lives in a [`HealthRegistry`] that outlives policy snapshots, so a reload keeps what
//! the sidecar has learnt about targets it still uses. Every lock here guards a few arithmetic
//! steps and is never held across an `.await`; the breaker and budget themselves are pure
//! state machines ([`breaker`], [`budget`]) tested with paused time.

pub mod balance;
pub mod breaker;
pub mod budget;
pub mod gate;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;

use crate::chain::{BreakerSettings, BudgetSettings};
use crate::llm::FailureClass;
use balance::{Candidate, PeakEwma};
use breaker::{Admission, Breaker, OpenCause, Phase};
use budget::RetryBudget;
use gate::{FleetState, Forced, Gates, Verdict};

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks cannot leave the state half-updated in a way
    // that matters more than losing the health data, so keep going.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

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
        }
    }

    /// Whether a request would be admitted now (no probe slot is taken).
    pub fn peek(&self, now: Instant) -> Admission {
        let gates = lock(&self.gates);
        let breaker = lock(&self.breaker);
        match gates.verdict(now, breaker.settings().half_open_probes) {
            Verdict::Allow => Admission::Allowed,
            Verdict::Refuse { since, until, by } => Admission::Refused { since, until, by },
            Verdict::Probe | Verdict::Breaker => breaker.peek(now),
        }
    }

    /// Asks to send one request; `None` while the breaker, the fleet or an override refuses.
    pub fn admit(self: &Arc<Self>, now: Instant) -> Option<Permit> {
        let mut gates = lock(&self.gates);
        let mut breaker = lock(&self.breaker);
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
        let (probe, forced) = match lock(&self.breaker).admit(now) {
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
        lock(&self.gates).set_forced(forced);
    }

    /// Applies the fleet's decision for this target (`None`: the fleet leaves it to the pod).
    pub fn set_fleet(&self, state: Option<FleetState>) {
        lock(&self.gates).set_fleet(state);
    }

    /// Changes the breaker with `change` and tells the observer when it opened or closed.
    fn breaker_change<T>(&self, now: Instant, change: impl FnOnce(&mut Breaker) -> T) -> T {
        let (result, before, after, cause) = {
            let mut breaker = lock(&self.breaker);
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
        lock(&self.breaker).settings().scope == crate::policy::BreakerScope::Fleet
    }

    /// What this target did since the last call, and forgets it.
    fn take_tally(&self) -> Tally {
        std::mem::take(&mut *lock(&self.tally))
    }

    fn count_success(&self) {
        lock(&self.tally).successes += 1;
    }

    fn count_failure(&self, retry_after: Option<Duration>, failure: String) {
        let mut tally = lock(&self.tally);
        tally.failures += 1;
        tally.retry_after = tally.retry_after.max(retry_after);
        tally.last_failure = Some(failure);
    }

    /// The balancer's view of this target.
    pub fn candidate(&self, weight: u32, now: Instant) -> Candidate {
        let stats = lock(&self.stats);
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
            lock(&self.stats).saturated_until = Some(now + wait);
        }
    }

    fn reconfigure(&self, settings: BreakerSettings) {
        lock(&self.breaker).reconfigure(settings);
    }

    /// This target's state as shown by the admin `/health` endpoint.
    pub fn report(&self, now: Instant) -> Value {
        let gates = lock(&self.gates).clone();
        let breaker = lock(&self.breaker);
        let stats = lock(&self.stats);
        let (state, retry_in) = match breaker.phase(now) {
            Phase::Closed => ("closed", None),
            Phase::Open { until, .. } => ("open", Some(until.saturating_duration_since(now))),
            Phase::HalfOpen { .. } => ("halfOpen", Some(Duration::ZERO)),
        };
        let failures: serde_json::Map<String, Value> =
            stats.failures.iter().map(|(c, n)| (c.as_str().to_string(), json!(n))).collect();
        let opened_because = (state != "closed").then(|| match breaker.cause() {
            OpenCause::Failures => "failures crossed the breaker's threshold".to_string(),
            OpenCause::FailedProbe => "a probe failed after it was open".to_string(),
            OpenCause::RetryAfter(wait) => {
                format!("the provider asked to wait {}s (Retry-After)", wait.as_secs_f64().ceil())
            }
        });
        let (state, retry_in, opened_because) = match (gates.forced_at(now), gates.fleet_at(now)) {
            (Some(forced), _) => (
                if forced.open { "forcedOpen" } else { "forcedClosed" },
                forced.until.filter(|_| forced.open).map(|until| until.saturating_duration_since(now)),
                Some(format!("override: {}", forced.reason)),
            ),
            (None, Some(FleetState::Open { until, reason, .. })) => {
                ("open", Some(until.saturating_duration_since(now)), Some(format!("fleet: {reason}")))
            }
            (None, Some(FleetState::HalfOpen { reason, probe, .. })) => (
                "halfOpen",
                None,
                Some(format!("fleet: {reason}; {}", if *probe { "this pod probes it" } else { "other pods probe it" })),
            ),
            (None, None) => (state, retry_in, opened_because),
        };
        json!({
            "target": self.label,
            "state": state,
            "retryInMs": retry_in.map(|d| d.as_millis() as u64),
            "openedBecause": opened_because,
            "consecutiveFailures": breaker.consecutive_failures(),
            "inFlight": self.in_flight.load(Ordering::Relaxed),
            "latencyMs": (stats.latency.seconds() * 1000.0 * 10.0).round() / 10.0,
            "successes": stats.successes,
            "failures": failures,
            "lastFailure": stats.last_failure,
            // Out of quota per its rate-limit headers (steered away from, not open).
            "rateLimitedForMs": stats.saturated_until.map(|u| u.saturating_duration_since(now).as_millis() as u64).filter(|ms| *ms > 0),
        })
    }
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
        let mut stats = lock(&self.health.stats);
        stats.successes += 1;
        stats.latency.observe(now, latency);
    }

    /// A stream's first token came after `latency`; its outcome is reported when it ends.
    pub fn first_token(&mut self, now: Instant, latency: Duration) {
        lock(&self.health.stats).latency.observe(now, latency);
    }

    /// A stream ended cleanly.
    pub fn finished(mut self, now: Instant) {
        self.done = true;
        self.health.breaker_change(now, |b| b.on_success(now, self.probe || self.forced));
        self.health.count_success();
        lock(&self.health.stats).successes += 1;
    }

    /// A stream broke after its first token: it counts against the target like any failure,
    /// without a latency sample.
    pub fn broke(mut self, now: Instant, class: FailureClass, message: &str) {
        self.done = true;
        let failure = format!("{class} after the first token: {message}");
        if self.health.breaker_change(now, |b| b.on_failure(now, class, None, self.probe)) {
            self.health.count_failure(None, failure.clone());
        }
        let mut stats = lock(&self.health.stats);
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
        let mut stats = lock(&self.health.stats);
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
            let mut gates = lock(&self.health.gates);
            gates.probes = gates.probes.saturating_sub(1);
        }
        if !self.done {
            lock(&self.health.breaker).on_cancel(self.probe);
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
        lock(&self.budget).deposit(now);
    }

    /// Asks for one extra attempt (retry, fall-through or hedge).
    pub fn withdraw(&self, now: Instant) -> bool {
        lock(&self.budget).withdraw(now)
    }

    /// Whether the route has retried, fallen through or hedged within the budget's window:
    /// a route under failure, where nothing optional (a shadow) should add load.
    pub fn strained(&self, now: Instant) -> bool {
        lock(&self.budget).spent(now)
    }

    fn report(&self, now: Instant) -> Value {
        let mut budget = lock(&self.budget);
        let available = budget.available(now).max(0.0).floor();
        let (requests, extra) = budget.totals();
        json!({"route": self.route, "requests": requests, "extraAttempts": extra, "available": available})
    }
}

/// All health state, keyed so that it survives policy reloads.
#[derive(Debug, Default)]
pub struct HealthRegistry {
    targets: Mutex<HashMap<String, Arc<TargetHealth>>>,
    budgets: Mutex<HashMap<String, Arc<SharedBudget>>>,
    observer: Arc<OnceLock<Arc<dyn HealthObserver>>>,
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
        lock(&self.targets)
            .entry(key.to_string())
            .or_insert_with(|| {
                let mut target = TargetHealth::new(label.to_string(), settings.clone());
                target.observer = self.observer.clone();
                Arc::new(target)
            })
            .clone()
    }

    /// Sets who is told of breakers opening and closing (once; later calls change nothing).
    pub fn observe(&self, observer: Arc<dyn HealthObserver>) {
        let _ = self.observer.set(observer);
    }

    /// Each target's breaker state now (`closed`, `open`, `halfOpen`), by label.
    pub fn states(&self, now: Instant) -> Vec<(String, &'static str)> {
        lock(&self.targets)
            .values()
            .map(|t| {
                let state = match lock(&t.breaker).phase(now) {
                    Phase::Closed => "closed",
                    Phase::Open { .. } => "open",
                    Phase::HalfOpen { .. } => "halfOpen",
                };
                (t.label.clone(), state)
            })
            .collect()
    }

    /// Each route's retry budget now: extra attempts still allowed, by route.
    pub fn budgets(&self, now: Instant) -> Vec<(String, f64)> {
        lock(&self.budgets).values().map(|b| (b.route.clone(), lock(&b.budget).available(now).max(0.0))).collect()
    }

    /// The retry budget of a route, created if new.
    pub fn budget(&self, route: &str, settings: BudgetSettings) -> Arc<SharedBudget> {
        lock(&self.budgets)
            .entry(route.to_string())
            .or_insert_with(|| {
                Arc::new(SharedBudget { route: route.to_string(), budget: Mutex::new(RetryBudget::new(settings)) })
            })
            .clone()
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
            lock(&shared.budget).reconfigure(budget);
        }
        self.prune();
    }

    /// What every fleet-scoped target did since the last call, by identity; targets that did
    /// nothing are left out.
    pub fn take_tallies(&self) -> BTreeMap<String, Tally> {
        lock(&self.targets)
            .iter()
            .filter(|(_, target)| target.fleet_scoped())
            .map(|(identity, target)| (identity.clone(), target.take_tally()))
            .filter(|(_, tally)| !tally.is_empty())
            .collect()
    }

    /// Applies the fleet's decisions: `decide` gives each target's, by identity (`None`: the
    /// fleet leaves it to the pod).
    pub fn apply_fleet(&self, decide: impl Fn(&str) -> Option<FleetState>) {
        for (identity, target) in lock(&self.targets).iter() {
            target.set_fleet(decide(identity).filter(|_| target.fleet_scoped()));
        }
    }

    /// Drops state that only the registry still holds.
    fn prune(&self) {
        lock(&self.targets).retain(|_, target| Arc::strong_count(target) > 1);
        lock(&self.budgets).retain(|_, budget| Arc::strong_count(budget) > 1);
    }

    /// Every target's and route's state, for the admin `/health` endpoint.
    pub fn report(&self, now: Instant) -> Value {
        let mut targets: Vec<Value> = lock(&self.targets).values().map(|t| t.report(now)).collect();
        targets.sort_by(|a, b| a["target"].as_str().cmp(&b["target"].as_str()));
        let mut budgets: Vec<Value> = lock(&self.budgets).values().map(|b| b.report(now)).collect();
        budgets.sort_by(|a, b| a["route"].as_str().cmp(&b["route"].as_str()));
        json!({"targets": targets, "retryBudgets": budgets})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default)]
    struct Seen(Mutex<Vec<String>>);

    impl HealthObserver for Seen {
        fn opened(&self, target: &str, period: Duration, why: &str) {
            lock(&self.0).push(format!("{target} opened for {}s: {why}", period.as_secs()));
        }

        fn closed(&self, target: &str) {
            lock(&self.0).push(format!("{target} closed"));
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
        assert_eq!(*lock(&seen.0), ["a/m opened for 5s: failures crossed the breaker's threshold", "a/m closed"]);
        assert_eq!(registry.states(later), [("a/m".to_string(), "closed")]);
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
        assert_eq!(health.report(later)["state"], "closed");
    }
}
