//! The fleet view: every sidecar's evidence about its targets, merged per namespace, and the
//! decisions that take a target out of rotation in every pod at once and bring it back.
//!
//! **Evidence.** Each sidecar reports, about once a second, what each fleet-scoped target did
//! since its last report: successes, counted failures (the breaker's `countOn` classes), the
//! longest `Retry-After` a provider asked for. The view keeps, per target and per pod, counts
//! over the breaker's `failureRate.window` in ten buckets, and a fleet-wide streak of failures
//! (reset by a success anywhere). Only targets of policies served to the reporting pod are
//! heard; pods of another namespace cannot touch this one's targets.
//!
//! **Opening.** A closed target opens for the whole fleet when either
//! - a provider answered a pod with 429 or 503 and a `Retry-After`: the provider says the
//!   key is out, which is true for every pod that uses the key, so one report is enough. The
//!   target stays out that long, capped at `maxOpenFor`; or
//! - the pooled evidence crosses the policy's breaker thresholds: at least `minRequests`
//!   requests in the window of which `percent` failed, or `consecutiveFailures` failures in a
//!   row across the fleet, **and** at least half of the pods that used the target in the window
//!   see it fail (their own failure share is at least `percent`). A single pod whose own
//!   network or DNS is broken, among pods for which the target works, therefore cannot take it
//!   away from them; its own breaker still keeps it away locally, at once. A pod that is the
//!   only one using a target is the whole fleet's evidence, and its report is enough.
//!
//! An opening lasts `openFor`, doubled with each reopening up to `maxOpenFor`, like a pod's
//! breaker.
//!
//! **Recovery.** When the period ends the target is half-open: `halfOpenProbes` pods, chosen by
//! rendezvous hashing among the connected pods whose policies use it (so the choice is stable
//! and spread across targets), send it one request at a time; every other pod keeps it out.
//! A success closes it for everyone; a counted failure opens it again for longer. Probers that
//! send nothing within the probe period (or disconnect) are replaced by the next pods in line;
//! with no pod left to probe, the target closes, since nobody is kept from it.
//!
//! **Spend.** Sidecars also report what their attempts at spend-limited targets have cost them
//! in the current window, whole, every second (windows are aligned to the epoch, so everyone
//! agrees on them). The view keeps each pod's latest total and adds them up; once the sum
//! reaches the target's `spendLimit`, the window is *spent* for every pod until it rolls (or the
//! limit is raised above the sum). Since every pod sends its whole total, an operator that
//! restarts or takes over the lead has the fleet's sum again within a report. Only the latest
//! window is kept per key.
//!
//! **Verification.** Targets a policy verifies are probed on a schedule by one pod each
//! ([`verify`]); the orders go out and the results come back with the decisions and reports.
//!
//! Decisions are published per namespace through a `watch` channel; each sidecar's stream sends
//! its pod the decisions about its targets. All state here is in memory, rebuilt from fresh
//! evidence after a restart; status and Events are derived from it by [`status`].

pub mod status;
pub mod verify;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use parking_lot::{Mutex, MutexGuard};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::served::{NamespacePolicies, ServedPolicies};
use crate::chain::{BreakerSettings, SpendLimit};
use crate::configstream::{TargetReport, VerifyResult, WindowSpend};
use crate::health::circuit::{self, Circuit, Counts, Phase, Verdict, Window};
use crate::health::spend;
use crate::policy::BreakerScope;
use verify::{Schedule, Verification};

/// The shortest time probers get to send a probe before others are chosen.
const MIN_PROBE_PERIOD: Duration = Duration::from_secs(10);

/// The fleet's decision on one target that is out of rotation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Open until then, or half-open.
    pub phase: DecisionPhase,
    /// Why it went out, for sidecars, status and Events.
    pub reason: String,
    /// When it went out (the first opening, kept through reopenings), for status.
    pub since: Timestamp,
    /// When the open period ends, by the wall clock, for status; `None` while half-open.
    pub until: Option<Timestamp>,
    /// The target's label, for status and logs.
    pub label: String,
}

/// Open or half-open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecisionPhase {
    /// Out for every pod until `until`.
    Open {
        /// When it becomes half-open.
        until: Instant,
    },
    /// Probed by these pods (by uid); out for every other.
    HalfOpen {
        /// The probers' pod uids.
        probers: Vec<String>,
    },
}

/// Every decision of one namespace, at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decisions {
    /// Increases with every change.
    pub revision: u64,
    /// The targets out of rotation, by identity; every other target is closed.
    pub targets: BTreeMap<String, Decision>,
    /// The spend-limited targets whose current window is spent, by spend key.
    pub spent: BTreeMap<String, SpentWindow>,
    /// The verified targets' probes ordered and last results, by identity.
    pub verify: BTreeMap<String, Verification>,
}

/// A spend-limited target's window that the fleet has spent.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SpentWindow {
    /// The window (Unix ms divided by its length).
    pub window: i64,
    /// What the fleet had spent in it when it reached the limit.
    pub usd: f64,
    /// The limit.
    pub limit: f64,
    /// When the window ends, in Unix ms.
    pub until_ms: i64,
}

/// What the fleet spent on one spend-limited target in its latest window.
#[derive(Clone, Debug, Default, PartialEq)]
struct SpendFleet {
    window: i64,
    /// Each pod's total in the window (a pod that left still spent it).
    pods: HashMap<String, f64>,
    /// The sum when it reached the limit, kept so that the decision does not change with
    /// every later report.
    spent: Option<f64>,
}

impl SpendFleet {
    fn sum(&self) -> f64 {
        self.pods.values().sum()
    }
}

/// What the view needs to know of a target to judge it: the breaker settings and label of the
/// first policy (in name order) that uses it with `scope: fleet`.
#[derive(Clone, Debug)]
struct Rule {
    settings: BreakerSettings,
    label: String,
}

/// Who probes a half-open target, and until when before others are chosen.
#[derive(Clone, Debug, Default)]
struct Probing {
    probers: Vec<String>,
    deadline: Option<Instant>,
    offset: usize,
}

/// The fleet's state of one target.
#[derive(Debug)]
struct TargetFleet {
    rule: Rule,
    /// Each pod's counts over the window.
    pods: HashMap<String, Window>,
    /// Each pod's own failures in a row.
    pod_streaks: HashMap<String, u64>,
    /// Failures in a row across the fleet.
    streak: u64,
    circuit: Circuit<Probing>,
    reason: String,
    since: Timestamp,
    until: Timestamp,
    last_failure: Option<String>,
}

impl TargetFleet {
    fn new(rule: Rule) -> Self {
        TargetFleet {
            rule,
            pods: HashMap::new(),
            pod_streaks: HashMap::new(),
            streak: 0,
            circuit: Circuit::default(),
            reason: String::new(),
            since: Timestamp::UNIX_EPOCH,
            until: Timestamp::UNIX_EPOCH,
            last_failure: None,
        }
    }

    fn expire(&mut self, now: Instant) {
        self.pods.retain(|_, pod| {
            pod.expire(now);
            !pod.is_empty()
        });
        let pods = &self.pods;
        self.pod_streaks.retain(|pod, _| pods.contains_key(pod));
    }

    /// Pods that used the target in the window, and those that see it failing: by their own
    /// failure share in the window, or by their own failures in a row since their last success
    /// (`consecutiveFailures`, which opens their own breaker), so that a pod whose window still
    /// holds the successes of a minute ago counts once the target fails it now.
    fn pods_failing(&self) -> (usize, usize) {
        let percent = self.rule.settings.failure_rate.map_or(50, |rate| rate.percent);
        let in_a_row = u64::from(self.rule.settings.consecutive_failures);
        let failing = self
            .pods
            .iter()
            .filter(|(name, pod)| {
                pod.totals().failing(percent)
                    || (in_a_row > 0 && self.pod_streaks.get(*name).is_some_and(|streak| *streak >= in_a_row))
            })
            .count();
        (self.pods.len(), failing)
    }

    /// Why the pooled evidence condemns the target, if it does.
    fn condemned(&self) -> Option<String> {
        let (pods, failing) = self.pods_failing();
        if failing == 0 || failing * 2 < pods {
            return None;
        }
        let pooled = self.pods.values().fold(Counts::default(), |sum, pod| sum + pod.totals());
        let of_pods = format!("{failing} of {pods} pod(s) using it see it fail");
        match circuit::verdict(&self.rule.settings, pooled, self.streak)? {
            Verdict::Rate { failures, total, window } => {
                Some(format!("{failures} of {total} requests failed in the last {}s; {of_pods}", window.as_secs()))
            }
            Verdict::Streak(streak) => Some(format!("{streak} failures in a row across the fleet; {of_pods}")),
        }
    }

    /// Notes that the target went out (or out again) at `wall` for `period`, for `reason`.
    fn went_out(&mut self, was_closed: bool, wall: Timestamp, period: Duration, reason: String) {
        if was_closed {
            self.since = wall;
        }
        let last = self.last_failure.as_deref().map(|f| format!(" (last: {f})")).unwrap_or_default();
        self.reason = format!("{reason}{last}");
        self.until = wall_after(wall, period);
        self.streak = 0;
    }

    fn trip(&mut self, now: Instant, wall: Timestamp, reason: String) {
        let was_closed = self.circuit.is_closed();
        let period = self.circuit.trip(now, &self.rule.settings, None);
        self.went_out(was_closed, wall, period, reason);
    }

    fn close(&mut self) {
        self.circuit.close();
        self.streak = 0;
        self.pods.clear();
        self.pod_streaks.clear();
    }

    /// Takes one pod's report; returns whether the decision changed.
    fn observe(&mut self, pod: &str, report: &TargetReport, now: Instant, wall: Timestamp) -> bool {
        if report.failures > 0 && report.last_failure.is_some() {
            self.last_failure.clone_from(&report.last_failure);
        }
        let retry_after = report.retry_after_ms.filter(|ms| *ms > 0).map(Duration::from_millis);
        let max_open = self.rule.settings.max_open_for;
        let counts = Counts { successes: report.successes, failures: report.failures };
        match self.circuit.phase() {
            Phase::Closed => {
                let window = circuit::window_of(&self.rule.settings);
                self.pods.entry(pod.to_string()).or_insert_with(|| Window::new(window)).record(now, counts);
                let own = self.pod_streaks.entry(pod.to_string()).or_default();
                *own = circuit::streak_after(*own, counts, report.trailing_failures);
                self.streak = circuit::streak_after(self.streak, counts, report.trailing_failures);
                self.expire(now);
                if let Some(wait) = retry_after {
                    let wait = wait.min(max_open);
                    let reason = format!("the provider asked to wait {}s (Retry-After)", wait.as_secs_f64().ceil());
                    self.circuit.hold(now, wait);
                    self.went_out(true, wall, wait, reason);
                    return true;
                }
                match self.condemned() {
                    Some(reason) => {
                        self.trip(now, wall, reason);
                        true
                    }
                    None => false,
                }
            }
            Phase::Open { .. } => {
                // A longer Retry-After extends it; nothing else reaches an open target but
                // requests admitted before it opened, which say nothing about it now.
                match retry_after.map(|wait| wait.min(max_open)) {
                    Some(wait) if self.circuit.extend(now, wait) => {
                        self.until = wall_after(wall, wait);
                        true
                    }
                    _ => false,
                }
            }
            Phase::HalfOpen { .. } if report.failures > 0 => {
                self.trip(now, wall, "a probe failed".to_string());
                true
            }
            Phase::HalfOpen { .. } if report.successes > 0 => {
                self.close();
                true
            }
            Phase::HalfOpen { .. } => false,
        }
    }

    /// The decision sidecars are sent, if the target is out.
    fn decision(&self) -> Option<Decision> {
        let (phase, until) = match self.circuit.phase() {
            Phase::Closed => return None,
            Phase::Open { until, .. } => (DecisionPhase::Open { until: *until }, Some(self.until)),
            Phase::HalfOpen { probing, .. } => (DecisionPhase::HalfOpen { probers: probing.probers.clone() }, None),
        };
        Some(Decision { phase, reason: self.reason.clone(), since: self.since, until, label: self.rule.label.clone() })
    }
}

/// A connected pod of the namespace: who may probe what.
#[derive(Debug, Default)]
struct Member {
    /// The fleet-scoped targets of its policies: what it reports on and half-open probes.
    identities: HashSet<String>,
    /// Every target of its policies: what it may verify.
    targets: HashSet<String>,
    /// Connected to this replica (not reported by another).
    local: bool,
}

/// What a joining pod's policies use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Membership {
    /// Their fleet-scoped targets, by identity.
    pub identities: HashSet<String>,
    /// All their targets, by identity.
    pub targets: HashSet<String>,
}

impl Membership {
    /// Policies whose targets, `identities`, are all fleet-scoped.
    pub fn fleet(identities: HashSet<String>) -> Membership {
        Membership { targets: identities.clone(), identities }
    }
}

/// One namespace's fleet.
#[derive(Debug, Default)]
struct Namespace {
    targets: HashMap<String, TargetFleet>,
    members: HashMap<String, Member>,
    rules: HashMap<String, Rule>,
    /// The spend limits of the namespace's policies, by spend key.
    limits: HashMap<String, SpendLimit>,
    spends: HashMap<String, SpendFleet>,
    /// The verified targets' schedules, by identity.
    schedules: HashMap<String, Schedule>,
    rules_revision: Option<u64>,
    decisions: Option<watch::Sender<Arc<Decisions>>>,
}

/// Marks `spend` spent when its sum reached `limit` (keeping the sum it reached it at), or not
/// spent when a raised limit is above it again; whether that changed.
fn settle_spend(spend: &mut SpendFleet, limit: &SpendLimit) -> bool {
    let reached = spend.sum() >= limit.usd;
    match (reached, spend.spent) {
        (true, None) => spend.spent = Some(spend.sum()),
        (false, Some(_)) => spend.spent = None,
        _ => return false,
    }
    true
}

/// `wall` plus `period`, saturating.
fn wall_after(wall: Timestamp, period: Duration) -> Timestamp {
    k8s_openapi::jiff::SignedDuration::try_from(period)
        .ok()
        .and_then(|period| wall.checked_add(period).ok())
        .unwrap_or(Timestamp::MAX)
}

/// The rendezvous order of `pods` for `identity`: stable, and different for each target.
fn rendezvous<'a>(identity: &str, pods: impl Iterator<Item = &'a String>) -> Vec<String> {
    let mut ranked: Vec<(u64, &String)> = pods
        .map(|pod| {
            let digest = ring::digest::digest(&ring::digest::SHA256, format!("{identity}\u{1f}{pod}").as_bytes());
            let mut first = [0u8; 8];
            first.copy_from_slice(&digest.as_ref()[..8]);
            (u64::from_be_bytes(first), pod)
        })
        .collect();
    ranked.sort_unstable();
    ranked.into_iter().map(|(_, pod)| pod.clone()).collect()
}

impl Namespace {
    fn sender(&mut self) -> &watch::Sender<Arc<Decisions>> {
        self.decisions.get_or_insert_with(|| watch::channel(Arc::default()).0)
    }

    /// Refreshes the rules from the namespace's served policies when they changed.
    fn refresh_rules(&mut self, policies: &NamespacePolicies) {
        if self.rules_revision == Some(policies.revision) {
            return;
        }
        let mut rules = HashMap::new();
        let mut limits = HashMap::new();
        let mut verified = HashMap::new();
        for served in policies.policies.values() {
            let settings = &served.compiled.breaker;
            for target in served.compiled.targets() {
                rules
                    .entry(target.identity.clone())
                    .or_insert_with(|| Rule { settings: settings.clone(), label: target.label.clone() });
                if let Some(limit) = &target.spend_limit {
                    limits.entry(limit.key.clone()).or_insert_with(|| limit.clone());
                }
                if let Some(verify) = &target.verify {
                    verified.entry(target.identity.clone()).or_insert((verify, target.label.as_str()));
                }
            }
        }
        let now = Instant::now();
        self.schedules.retain(|identity, _| verified.contains_key(identity));
        for (identity, (verify, label)) in verified {
            match self.schedules.get_mut(&identity) {
                Some(schedule) => schedule.reconfigure(verify, label, now),
                None => {
                    self.schedules.insert(identity, Schedule::new(verify.clone(), label.to_string(), now));
                }
            }
        }
        self.spends.retain(|key, _| limits.contains_key(key));
        for (key, spend) in &mut self.spends {
            if let Some(limit) = limits.get(key) {
                settle_spend(spend, limit);
            }
        }
        self.limits = limits;
        rules.retain(|_, rule: &mut Rule| rule.settings.scope == BreakerScope::Fleet);
        for (identity, target) in &mut self.targets {
            if let Some(rule) = rules.get(identity) {
                target.rule = rule.clone();
            }
        }
        self.targets.retain(|identity, _| rules.contains_key(identity));
        self.rules = rules;
        self.rules_revision = Some(policies.revision);
    }

    /// Takes one pod's spend totals; returns whether a window became spent or unspent.
    fn spend(&mut self, pod: &str, reports: &BTreeMap<String, WindowSpend>, now_ms: i64) -> bool {
        let mut changed = false;
        for (key, report) in reports {
            let Some(limit) = self.limits.get(key) else { continue };
            let current = spend::window_of(now_ms, limit.per);
            // A report of a window that is over, or not yet begun by the operator's clock (a
            // pod's clock far ahead), says nothing about the current one.
            if report.window != current || !(report.usd.is_finite() && report.usd >= 0.0) {
                continue;
            }
            let spend = self.spends.entry(key.clone()).or_default();
            if spend.window != current {
                *spend = SpendFleet { window: current, ..SpendFleet::default() };
            }
            // A pod's total only grows within a window; a restarted sidecar's smaller one
            // does not undo what it spent before.
            let total = spend.pods.entry(pod.to_string()).or_insert(0.0);
            *total = total.max(report.usd);
            changed |= settle_spend(spend, limit);
        }
        changed
    }

    /// The spent windows, as of `now_ms`.
    fn spent(&self, now_ms: i64) -> BTreeMap<String, SpentWindow> {
        self.spends
            .iter()
            .filter_map(|(key, spend)| {
                let limit = self.limits.get(key)?;
                let current = spend::window_of(now_ms, limit.per) == spend.window;
                let usd = spend.spent.filter(|_| current && spend.sum() >= limit.usd)?;
                let until_ms = spend::window_end(spend.window, limit.per);
                Some((key.clone(), SpentWindow { window: spend.window, usd, limit: limit.usd, until_ms }))
            })
            .collect()
    }

    /// Takes one pod's verification results; returns whether any was one ordered from it.
    fn verified(&mut self, pod: &str, results: &BTreeMap<String, VerifyResult>, now: Instant, wall: Timestamp) -> bool {
        let mut changed = false;
        for (identity, result) in results {
            if let Some(schedule) = self.schedules.get_mut(identity) {
                changed |= schedule.take(pod, result, now, wall);
            }
        }
        changed
    }

    fn observe(&mut self, pod: &str, reports: &BTreeMap<String, TargetReport>, now: Instant, wall: Timestamp) -> bool {
        let allowed = self.members.get(pod).map(|m| &m.identities);
        let mut changed = false;
        for (identity, report) in reports {
            // A pod is heard only about targets of its own policies.
            if !allowed.is_some_and(|ids| ids.contains(identity)) {
                continue;
            }
            let Some(rule) = self.rules.get(identity) else { continue };
            let target = self.targets.entry(identity.clone()).or_insert_with(|| TargetFleet::new(rule.clone()));
            changed |= target.observe(pod, report, now, wall);
        }
        if changed {
            self.settle(now);
        }
        changed
    }

    /// Moves targets whose open period ended to half-open, replaces probers that did not
    /// probe, and forgets evidence older than its window. Returns whether a decision changed.
    fn tick(&mut self, now: Instant, now_ms: i64, following: bool) -> bool {
        let mut changed = false;
        for target in self.targets.values_mut() {
            target.expire(now);
            changed |= target.circuit.advance(now);
        }
        changed |= self.settle(now);
        let members = &self.members;
        for (identity, schedule) in &mut self.schedules {
            // While the leader orders, an order of this replica's would be a second probe.
            if following {
                changed |= schedule.withdraw();
                continue;
            }
            let is_candidate = |pod: &str| members.get(pod).is_some_and(|m| m.targets.contains(identity));
            let candidates = || {
                rendezvous(identity, members.iter().filter(|(_, m)| m.targets.contains(identity)).map(|(pod, _)| pod))
            };
            changed |= schedule.advance(now, is_candidate, candidates);
        }
        self.targets.retain(|_, target| !target.circuit.is_closed() || !target.pods.is_empty());
        // A spent window that rolled is forgotten; the next is counted from its first report.
        let limits = &self.limits;
        let before = self.spends.len();
        self.spends
            .retain(|key, spend| limits.get(key).is_some_and(|l| spend::window_of(now_ms, l.per) == spend.window));
        changed | (self.spends.len() != before)
    }

    /// Chooses probers where they are missing, gone or overdue; closes targets nobody can
    /// probe. Returns whether anything changed.
    fn settle(&mut self, now: Instant) -> bool {
        let mut changed = false;
        for (identity, target) in &mut self.targets {
            let (probes, open_for) = (target.rule.settings.half_open_probes, target.rule.settings.open_for);
            let Some(probing) = target.circuit.probing_mut() else { continue };
            let gone = probing.probers.iter().any(|pod| !self.members.contains_key(pod));
            if !probing.probers.is_empty() && !gone && probing.deadline.is_some_and(|deadline| now < deadline) {
                continue;
            }
            let candidates = rendezvous(
                identity,
                self.members.iter().filter(|(_, m)| m.identities.contains(identity)).map(|(pod, _)| pod),
            );
            if candidates.is_empty() {
                target.close();
                changed = true;
                continue;
            }
            if !probing.probers.is_empty() {
                probing.offset += probing.probers.len();
            }
            let count = (probes.max(1) as usize).min(candidates.len());
            let chosen: Vec<String> =
                (0..count).map(|i| candidates[(probing.offset + i) % candidates.len()].clone()).collect();
            probing.deadline = Some(now + open_for.max(MIN_PROBE_PERIOD));
            if probing.probers != chosen {
                probing.probers = chosen;
                changed = true;
            }
        }
        changed
    }

    /// Publishes `decisions` as the namespace's if they differ (whatever their revision);
    /// returns whether they did.
    fn publish_decisions(&mut self, decisions: Decisions) -> bool {
        self.sender().send_if_modified(|current| {
            if current.targets == decisions.targets
                && current.spent == decisions.spent
                && current.verify == decisions.verify
            {
                return false;
            }
            *current = Arc::new(Decisions { revision: current.revision + 1, ..decisions });
            true
        })
    }

    /// The decisions of this replica's own view.
    fn local_decisions(&self, now_ms: i64) -> Decisions {
        let targets = self.targets.iter().filter_map(|(id, t)| t.decision().map(|d| (id.clone(), d))).collect();
        let verify = self.schedules.iter().map(|(id, schedule)| (id.clone(), Verification::of(schedule))).collect();
        Decisions { revision: 0, targets, spent: self.spent(now_ms), verify }
    }
}

/// One pod's report, as the view takes it.
#[derive(Clone, Copy, Debug)]
pub struct Evidence<'a> {
    /// What its fleet-scoped targets did, by identity.
    pub targets: &'a BTreeMap<String, TargetReport>,
    /// What its spend-limited targets cost, by spend key.
    pub spend: &'a BTreeMap<String, WindowSpend>,
    /// How the verification probes it was ordered to send ended, by identity.
    pub verified: &'a BTreeMap<String, VerifyResult>,
}

impl Evidence<'_> {
    fn is_empty(&self) -> bool {
        self.targets.is_empty() && self.spend.is_empty() && self.verified.is_empty()
    }
}

/// The fleet view of every namespace.
///
/// On the leader (or a lone replica) it decides from every pod's evidence: its own sidecars'
/// and what the other replicas forward. On another replica it *follows*: its sidecars'
/// evidence is forwarded to the leader ([`FleetView::follow`]) and the leader's decisions are
/// published instead of its own ([`FleetView::adopt`]); it keeps judging its own evidence all
/// along, so that if the leader cannot be reached its pods are still protected by what it sees.
#[derive(Debug)]
pub struct FleetView {
    served: Arc<ServedPolicies>,
    namespaces: Mutex<HashMap<String, Namespace>>,
    /// Where this replica's evidence goes while it follows the leader.
    forward: Mutex<Option<mpsc::Sender<Forwarded>>>,
    /// Bumped whenever any namespace's decisions change.
    changes: watch::Sender<u64>,
    /// The wall clock, in Unix ms, which spend windows are counted by.
    clock: fn() -> i64,
}

/// Evidence a replica forwards to the leader.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Forwarded {
    /// A pod connected, or its configuration changed.
    Join {
        /// Its namespace.
        namespace: String,
        /// Its uid.
        pod: String,
        /// The fleet-scoped targets of its policies.
        identities: Vec<String>,
        /// All the targets of its policies (absent from a replica of an earlier release: its
        /// pods verify nothing).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        targets: Vec<String>,
    },
    /// A pod disconnected.
    Leave {
        /// Its namespace.
        namespace: String,
        /// Its uid.
        pod: String,
    },
    /// A pod's report.
    Observe {
        /// Its namespace.
        namespace: String,
        /// Its uid.
        pod: String,
        /// What its targets did.
        targets: BTreeMap<String, TargetReport>,
        /// What its spend-limited targets cost.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        spend: BTreeMap<String, WindowSpend>,
        /// How its verification probes ended.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        verified: BTreeMap<String, VerifyResult>,
    },
}

impl FleetView {
    /// An empty view, judging targets by the breaker settings of `served`'s policies.
    pub fn new(served: Arc<ServedPolicies>) -> Self {
        FleetView::with_clock(served, spend::unix_ms)
    }

    /// An empty view whose spend windows follow `clock` (Unix ms).
    pub fn with_clock(served: Arc<ServedPolicies>, clock: fn() -> i64) -> Self {
        FleetView {
            served,
            namespaces: Mutex::default(),
            forward: Mutex::default(),
            changes: watch::channel(0).0,
            clock,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Namespace>> {
        self.namespaces.lock()
    }

    fn following(&self) -> bool {
        self.forward.lock().is_some()
    }

    fn forward(&self, evidence: Forwarded) {
        if let Some(sink) = self.forward.lock().as_ref() {
            // A full sink (the leader is slow) loses evidence rather than stalling sidecars.
            let _ = sink.try_send(evidence);
        }
    }

    /// Publishes `ns`'s own decisions unless this replica follows the leader.
    fn publish(&self, ns: &mut Namespace, following: bool) {
        let decisions = ns.local_decisions((self.clock)());
        if !following && ns.publish_decisions(decisions) {
            self.changes.send_modify(|n| *n += 1);
        }
    }

    /// Follows `namespace`'s decisions.
    pub fn subscribe(&self, namespace: &str) -> watch::Receiver<Arc<Decisions>> {
        self.lock().entry(namespace.to_string()).or_default().sender().subscribe()
    }

    /// Follows changes of any namespace's decisions.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The current decisions of `namespace`.
    pub fn decisions(&self, namespace: &str) -> Arc<Decisions> {
        self.lock()
            .get(namespace)
            .and_then(|ns| ns.decisions.as_ref().map(|tx| tx.borrow().clone()))
            .unwrap_or_default()
    }

    /// The current decisions of every namespace.
    pub fn all_decisions(&self) -> Vec<(String, Arc<Decisions>)> {
        self.lock()
            .iter()
            .filter_map(|(name, ns)| ns.decisions.as_ref().map(|tx| (name.clone(), tx.borrow().clone())))
            .collect()
    }

    /// Every verified target's last result: namespace, label, whether it passed.
    pub fn verified(&self) -> Vec<(String, String, bool)> {
        self.all_decisions()
            .into_iter()
            .flat_map(|(namespace, decisions)| {
                decisions
                    .verify
                    .values()
                    .filter_map(|v| Some((namespace.clone(), v.label.clone(), v.last.as_ref()?.passed)))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn join_as(&self, namespace: &str, pod: &str, membership: Membership, local: bool, now: Instant) {
        let following = self.following();
        let mut namespaces = self.lock();
        let ns = namespaces.entry(namespace.to_string()).or_default();
        let Membership { identities, targets } = membership;
        ns.members.insert(pod.to_string(), Member { identities, targets, local });
        if ns.settle(now) {
            self.publish(ns, following);
        }
    }

    /// A pod connected to this replica, or its configuration changed: it may now probe (and
    /// report on) the fleet-scoped targets of `membership`, and verify all of them.
    pub fn join(&self, namespace: &str, pod: &str, membership: Membership, now: Instant) {
        self.forward(Forwarded::Join {
            namespace: namespace.into(),
            pod: pod.into(),
            identities: membership.identities.iter().cloned().collect(),
            targets: membership.targets.iter().cloned().collect(),
        });
        self.join_as(namespace, pod, membership, true, now);
    }

    fn leave_as(&self, namespace: &str, pod: &str, now: Instant) {
        let following = self.following();
        let mut namespaces = self.lock();
        let Some(ns) = namespaces.get_mut(namespace) else { return };
        ns.members.remove(pod);
        if ns.settle(now) {
            self.publish(ns, following);
        }
    }

    /// A pod disconnected from this replica; probes it was chosen for go to others.
    pub fn leave(&self, namespace: &str, pod: &str, now: Instant) {
        self.forward(Forwarded::Leave { namespace: namespace.into(), pod: pod.into() });
        self.leave_as(namespace, pod, now);
    }

    fn observe_as(&self, namespace: &str, pod: &str, report: &Evidence<'_>, now: Instant) {
        if report.is_empty() {
            return;
        }
        let following = self.following();
        let policies = self.served.subscribe(namespace).borrow().clone();
        let mut namespaces = self.lock();
        let ns = namespaces.entry(namespace.to_string()).or_default();
        ns.refresh_rules(&policies);
        let spent = ns.spend(pod, report.spend, (self.clock)());
        let verified = ns.verified(pod, report.verified, now, Timestamp::now());
        if ns.observe(pod, report.targets, now, Timestamp::now()) || spent || verified {
            self.publish(ns, following);
        }
    }

    /// Takes one report of a pod connected to this replica: what its fleet-scoped targets did,
    /// and what its spend-limited targets cost.
    pub fn observe(&self, namespace: &str, pod: &str, report: &Evidence<'_>, now: Instant) {
        if !report.is_empty() {
            self.forward(Forwarded::Observe {
                namespace: namespace.into(),
                pod: pod.into(),
                targets: report.targets.clone(),
                spend: report.spend.clone(),
                verified: report.verified.clone(),
            });
        }
        self.observe_as(namespace, pod, report, now);
    }

    /// Takes evidence another replica forwarded (on the leader).
    pub fn take_forwarded(&self, evidence: Forwarded, now: Instant) {
        match evidence {
            Forwarded::Join { namespace, pod, identities, targets } => {
                let membership =
                    Membership { identities: identities.into_iter().collect(), targets: targets.into_iter().collect() };
                self.join_as(&namespace, &pod, membership, false, now);
            }
            Forwarded::Leave { namespace, pod } => self.leave_as(&namespace, &pod, now),
            Forwarded::Observe { namespace, pod, targets, spend, verified } => {
                let evidence = Evidence { targets: &targets, spend: &spend, verified: &verified };
                self.observe_as(&namespace, &pod, &evidence, now);
            }
        }
    }

    /// Starts following the leader: this replica's evidence goes to `sink` from now on,
    /// starting with every pod connected here.
    pub fn follow(&self, sink: mpsc::Sender<Forwarded>) {
        for (namespace, ns) in self.lock().iter() {
            for (pod, member) in ns.members.iter().filter(|(_, m)| m.local) {
                let _ = sink.try_send(Forwarded::Join {
                    namespace: namespace.clone(),
                    pod: pod.clone(),
                    identities: member.identities.iter().cloned().collect(),
                    targets: member.targets.iter().cloned().collect(),
                });
            }
        }
        *self.forward.lock() = Some(sink);
    }

    /// Stops following (the leader is gone or this replica leads): its own decisions stand.
    pub fn unfollow(&self) {
        *self.forward.lock() = None;
        for ns in self.lock().values_mut() {
            self.publish(ns, false);
        }
    }

    /// Publishes the leader's decisions for `namespace` (while following).
    pub fn adopt(&self, namespace: &str, decisions: Decisions) {
        if !self.following() {
            return;
        }
        let mut namespaces = self.lock();
        let ns = namespaces.entry(namespace.to_string()).or_default();
        // What the leader heard sets this replica's schedule, should it lead next.
        let (now, now_ms) = (Instant::now(), (self.clock)());
        for (identity, verification) in &decisions.verify {
            if let (Some(schedule), Some(last)) = (ns.schedules.get_mut(identity), &verification.last) {
                schedule.heard(last, now, now_ms);
            }
        }
        if ns.publish_decisions(decisions) {
            self.changes.send_modify(|n| *n += 1);
        }
    }

    /// Advances every namespace's timers; call every few hundred milliseconds.
    pub fn tick(&self, now: Instant) {
        let following = self.following();
        let namespaces: Vec<String> = self.lock().keys().cloned().collect();
        for namespace in namespaces {
            let policies = self.served.subscribe(&namespace).borrow().clone();
            let mut all = self.lock();
            let Some(ns) = all.get_mut(&namespace) else { continue };
            ns.refresh_rules(&policies);
            // Published whenever the decisions differ: a changed limit or a rolled window
            // changes the spent ones without a report.
            ns.tick(now, (self.clock)(), following);
            self.publish(ns, following);
        }
    }

    /// Runs [`FleetView::tick`] every `every` until `shutdown`.
    pub async fn run(self: Arc<Self>, every: Duration, mut shutdown: watch::Receiver<bool>) {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = ticks.tick() => self.tick(Instant::now()),
            }
        }
    }
}

#[cfg(test)]
mod tests;
