//! The fleet as users see it in `kubectl`: each policy's `status.sidecars` (connected, current,
//! rejected), `status.targets` (each target's fleet state, reason, since, until, last
//! verification), `status.degraded` and the `BackupsVerified` condition, written by the leader
//! under its own field manager ([`FIELD_MANAGER`]), beside the reconciler's fields (its `Ready`
//! condition included: conditions are a map by type, so each manager owns its own); and the
//! Events `TargetEjected` and `TargetRestored` when a target leaves or rejoins the rotation,
//! `VerificationFailed` and `TargetVerified` when a target's verification changes.
//!
//! Every second the leader computes each policy's fields and writes those that changed, at most
//! once a second per policy however much the fleet churns. Events follow state transitions, not
//! writes, and the leader starts from the status the API server holds: a new leader repeats no
//! Event its predecessor recorded.
//!
//! The leader remembers what it wrote, but does not take it on trust: a replica that led a
//! moment ago may write once more after the new leader's first write (it learns it lost only at
//! its next renewal), and a person may edit the status. When the watched policy shows other
//! fleet fields than the API server answered the leader's last write with, for longer than the
//! watch can lag ([`FOREIGN_WRITE_GRACE`]), the leader reads the status afresh and writes its
//! own again. Its Events still follow what it last wrote, not the other writer's fields: a
//! rewrite announces nothing it announced before.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{DecisionPhase, Decisions, FleetView};
use crate::chain::{CompiledPolicy, unix_ms_now};
use crate::operator::leader::Leadership;
use crate::operator::served::{ServedPolicies, ServedPolicy};
use crate::operator::service::sidecars::{Sidecar, Sidecars, tally};
use crate::policy::{
    API_VERSION, FallbackPolicy, FallbackPolicyStatus, OverrideState, SidecarsStatus, TargetState, TargetStatus,
    VerifiedStatus, VerifyOutcome,
};

/// The field manager of the fleet's status fields.
pub const FIELD_MANAGER: &str = "backstop-fleet";
/// The condition that says whether every verified target answered its last probe.
pub const BACKUPS_VERIFIED: &str = "BackupsVerified";
/// How long the watched status may show other fleet fields than the leader wrote before the
/// leader takes it for someone else's write: well past how far a watch lags behind a write.
pub const FOREIGN_WRITE_GRACE: Duration = Duration::from_secs(5);

/// One policy's fleet fields.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FleetFields {
    /// `status.sidecars`.
    pub sidecars: SidecarsStatus,
    /// `status.targets`.
    pub targets: Vec<TargetStatus>,
    /// `status.degraded`.
    pub degraded: u32,
    /// The `BackupsVerified` condition, when the policy verifies any target.
    pub verified: Option<Condition>,
}

/// What a target's status shows, times aside: its name, state, reason and last verification's
/// outcome and class.
type ShownTarget<'a> = (&'a str, TargetState, Option<&'a str>, Option<(VerifyOutcome, Option<&'a str>)>);

impl FleetFields {
    /// The fleet fields `status` holds.
    pub fn held(status: &FallbackPolicyStatus) -> FleetFields {
        FleetFields {
            sidecars: status.sidecars.clone().unwrap_or_default(),
            targets: status.targets.clone().unwrap_or_default(),
            degraded: status.degraded.unwrap_or_default(),
            verified: status.conditions.iter().find(|c| c.type_ == BACKUPS_VERIFIED).cloned(),
        }
    }

    /// Whether `other` shows what these fields show, times aside: the API server keeps times
    /// to the second, these may be finer (a probe's latency and message go with its time).
    pub fn shows_the_same(&self, other: &FleetFields) -> bool {
        fn targets(f: &FleetFields) -> Vec<ShownTarget<'_>> {
            f.targets
                .iter()
                .map(|t| {
                    let verified = t.verified.as_ref().map(|v| (v.outcome, v.class.as_deref()));
                    (t.target.as_str(), t.state, t.reason.as_deref(), verified)
                })
                .collect()
        }
        let verified =
            |f: &FleetFields| f.verified.as_ref().map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()));
        self.sidecars == other.sidecars
            && self.degraded == other.degraded
            && targets(self) == targets(other)
            && verified(self) == verified(other)
    }
}

fn time(ms: i64) -> Option<Time> {
    Timestamp::from_millisecond(ms).ok().map(Time)
}

/// The fleet fields of `policy`, from the decisions of its namespace, its overrides (in force
/// at `now_ms`) and the sidecars it is served to; `held` is what the API server holds, whose
/// verification results stand until the fleet has newer ones (a new leader's, say).
pub fn fields(
    policy: &ServedPolicy,
    namespace: &str,
    decisions: &Decisions,
    sidecars: &[Sidecar],
    now_ms: i64,
    held: &FleetFields,
) -> FleetFields {
    let compiled: &CompiledPolicy = &policy.compiled;
    let targets: Vec<TargetStatus> = compiled
        .targets()
        .into_iter()
        .map(|target| {
            let forced =
                compiled.overrides.iter().find(|o| o.active_at(now_ms) && o.identities.contains(&target.identity));
            let decision = decisions.targets.get(&target.identity);
            let spent = target.spend_limit.as_ref().and_then(|limit| Some((limit, decisions.spent.get(&limit.key)?)));
            let (state, reason, since, until) = match (forced, decision, spent) {
                (None, _, Some((limit, spent))) => (
                    TargetState::SpendLimit,
                    Some(format!(
                        "spendLimit: ${:.2} of ${:.2} spent in this {} window",
                        spent.usd,
                        spent.limit,
                        window_name(limit.per)
                    )),
                    time(spent.until_ms.saturating_sub(i64::try_from(limit.per.as_millis()).unwrap_or(0))),
                    time(spent.until_ms),
                ),
                (Some(forced), _, _) => (
                    match forced.state {
                        OverrideState::ForcedOpen => TargetState::ForcedOpen,
                        OverrideState::ForcedClosed => TargetState::ForcedClosed,
                    },
                    Some(format!("override: {}", forced.reason)),
                    None,
                    forced.until_ms.and_then(time),
                ),
                (None, Some(decision), None) => (
                    match decision.phase {
                        DecisionPhase::Open { .. } => TargetState::Open,
                        DecisionPhase::HalfOpen { .. } => TargetState::HalfOpen,
                    },
                    Some(decision.reason.clone()),
                    Some(Time(decision.since)),
                    decision.until.map(Time),
                ),
                (None, None, None) => (TargetState::Closed, None, None, None),
            };
            let verified = target.verify.as_ref().and_then(|_| {
                let last = decisions.verify.get(&target.identity).and_then(|v| v.last.as_ref());
                match last {
                    Some(last) => Some(VerifiedStatus {
                        at: time(last.at_ms).unwrap_or(Time(Timestamp::UNIX_EPOCH)),
                        outcome: if last.passed { VerifyOutcome::Passed } else { VerifyOutcome::Failed },
                        class: last.class.clone(),
                        message: last.message.clone(),
                        latency_ms: Some(last.latency_ms),
                    }),
                    None => held.targets.iter().find(|t| t.target == target.label).and_then(|t| t.verified.clone()),
                }
            });
            TargetStatus { target: target.label.clone(), state, reason, since, until, verified }
        })
        .collect();
    let degraded = u32::try_from(targets.iter().filter(|t| !t.state.in_rotation()).count()).unwrap_or(u32::MAX);
    let verified = verified_condition(compiled, &targets, policy.generation, now_ms, held.verified.as_ref());
    FleetFields { sidecars: tally(sidecars, namespace, &policy.name, &policy.version), targets, degraded, verified }
}

/// The `BackupsVerified` condition of a policy whose target statuses are `targets`: `True` when
/// every verified target answered its last probe, `False` naming those that did not, `Unknown`
/// until each has been probed; none when the policy verifies nothing. Its transition time is
/// `held`'s while its status stays.
fn verified_condition(
    compiled: &CompiledPolicy,
    targets: &[TargetStatus],
    generation: i64,
    now_ms: i64,
    held: Option<&Condition>,
) -> Option<Condition> {
    let verified: Vec<(&TargetStatus, &crate::chain::Verify)> = compiled
        .targets()
        .into_iter()
        .zip(targets)
        .filter_map(|(compiled, status)| Some((status, compiled.verify.as_ref()?)))
        .collect();
    if verified.is_empty() {
        return None;
    }
    // A result older than two periods and a probe's time (and a minute's slack) says nothing
    // of the target now: nobody has been able to probe it (no pod can, or none answers).
    let stale: Vec<&str> = verified
        .iter()
        .filter(|(t, verify)| {
            let Some(last) = &t.verified else { return false };
            let age = now_ms.saturating_sub(last.at.0.as_millisecond());
            let limit = 2 * verify.every + verify.timeout + std::time::Duration::from_secs(60);
            i64::try_from(limit.as_millis()).is_ok_and(|limit| age > limit)
        })
        .map(|(t, _)| t.target.as_str())
        .collect();
    let verified: Vec<&TargetStatus> = verified.into_iter().map(|(t, _)| t).collect();
    let failed: Vec<String> = verified
        .iter()
        .filter_map(|t| {
            let last = t.verified.as_ref().filter(|v| v.outcome == VerifyOutcome::Failed)?;
            let why = [last.class.as_deref(), last.message.as_deref()].into_iter().flatten().collect::<Vec<_>>();
            Some(format!("{} ({})", t.target, why.join(": ")))
        })
        .collect();
    let pending: Vec<&str> = verified.iter().filter(|t| t.verified.is_none()).map(|t| t.target.as_str()).collect();
    let (status, reason, message) = if !failed.is_empty() {
        ("False", "VerificationFailed", format!("failed its last verification probe: {}", failed.join("; ")))
    } else if !stale.is_empty() {
        let mut message = format!("no recent verification probe: {}", stale.join(", "));
        if !pending.is_empty() {
            message.push_str(&format!("; not probed yet: {}", pending.join(", ")));
        }
        ("Unknown", "Stale", message)
    } else if !pending.is_empty() {
        ("Unknown", "Pending", format!("not probed yet: {}", pending.join(", ")))
    } else {
        ("True", "Verified", format!("{} target(s) answered their last verification probe", verified.len()))
    };
    let last_transition_time = match held {
        Some(held) if held.status == status => held.last_transition_time.clone(),
        _ => time(now_ms).unwrap_or(Time(Timestamp::UNIX_EPOCH)),
    };
    Some(Condition {
        type_: BACKUPS_VERIFIED.into(),
        status: status.into(),
        reason: reason.into(),
        message: cut(&message, 32 * 1024),
        observed_generation: Some(generation),
        last_transition_time,
    })
}

/// `text` cut to at most `max` bytes, on a character boundary.
fn cut(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// A window's length as policies write it: `1h`, `30m`, `24h`.
fn window_name(per: std::time::Duration) -> String {
    let seconds = per.as_secs();
    match seconds {
        s if s > 0 && s % 3_600 == 0 => format!("{}h", s / 3_600),
        s if s > 0 && s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// The Events a change of `before` into `after` calls for: (type, reason, note).
pub fn transitions(before: &[TargetStatus], after: &[TargetStatus]) -> Vec<(EventType, &'static str, String)> {
    let previous: HashMap<&str, &TargetStatus> = before.iter().map(|t| (t.target.as_str(), t)).collect();
    let mut events = Vec::new();
    for target in after {
        let was = previous.get(target.target.as_str()).map_or(TargetState::Closed, |t| t.state);
        let reason = target.reason.as_deref().unwrap_or_default();
        match (was.in_rotation(), target.state.in_rotation()) {
            (true, false) => {
                events.push((
                    EventType::Warning,
                    "TargetEjected",
                    format!("{} is out of rotation: {reason}", target.target),
                ));
            }
            (false, true) => {
                let how = match (was, target.state) {
                    (TargetState::ForcedOpen, _) => "its override ended".to_string(),
                    (TargetState::SpendLimit, _) => "its spend window rolled".to_string(),
                    (_, TargetState::ForcedClosed) => format!("forced closed: {reason}"),
                    _ => "a probe succeeded".to_string(),
                };
                events.push((
                    EventType::Normal,
                    "TargetRestored",
                    format!("{} is back in rotation: {how}", target.target),
                ));
            }
            _ => {}
        }
        let outcome = |t: &TargetStatus| t.verified.as_ref().map(|v| v.outcome);
        let before = previous.get(target.target.as_str()).and_then(|t| outcome(t));
        match (before, target.verified.as_ref()) {
            (Some(VerifyOutcome::Passed) | None, Some(v)) if v.outcome == VerifyOutcome::Failed => {
                let why = [v.class.as_deref(), v.message.as_deref()].into_iter().flatten().collect::<Vec<_>>();
                events.push((
                    EventType::Warning,
                    "VerificationFailed",
                    format!("{} failed its verification probe: {}", target.target, why.join(": ")),
                ));
            }
            (Some(VerifyOutcome::Failed) | None, Some(v)) if v.outcome == VerifyOutcome::Passed => {
                events.push((
                    EventType::Normal,
                    "TargetVerified",
                    format!(
                        "{} answered its verification probe in {} ms",
                        target.target,
                        v.latency_ms.unwrap_or_default()
                    ),
                ));
            }
            _ => {}
        }
    }
    events
}

/// Writes the fleet fields of every served policy while this replica leads.
pub struct FleetStatus {
    client: Client,
    served: Arc<ServedPolicies>,
    fleet: Arc<FleetView>,
    sidecars: Arc<Sidecars>,
    recorder: Recorder,
    leader: Leadership,
    /// The policies as watched, status included: what the API server holds, a moment late.
    watched: Vec<Store<FallbackPolicy>>,
    /// What this leader last wrote to each `namespace/name`, or read when it began leading.
    written: HashMap<(String, String), Written>,
    /// What this leader wrote (and announced in Events) before another writer's fields made it
    /// read a policy's status afresh, until it writes its own again.
    announced: HashMap<(String, String), FleetFields>,
}

/// One policy's fleet fields as this leader wrote them.
struct Written {
    /// The fields written: the next write is made only when they change.
    fields: FleetFields,
    /// What the API server answered the write with (or held when read): what the watched policy
    /// shows once the watch catches up. Another manager's entries, which this leader's write
    /// cannot remove, are part of it.
    held: FleetFields,
    /// Since when the watched policy shows other fleet fields than `held`.
    differs_since: Option<Instant>,
}

impl Written {
    /// Fields just written (or read) as `fields`, which the API server holds as `held`.
    fn new(fields: FleetFields, held: FleetFields) -> Written {
        Written { fields, held, differs_since: None }
    }
}

impl FleetStatus {
    /// A writer for the fleet of `fleet` and `sidecars`, checking what it wrote against the
    /// policies `watched`.
    pub fn new(
        client: Client,
        served: Arc<ServedPolicies>,
        fleet: Arc<FleetView>,
        sidecars: Arc<Sidecars>,
        recorder: Recorder,
        leader: Leadership,
        watched: Vec<Store<FallbackPolicy>>,
    ) -> Self {
        FleetStatus {
            client,
            served,
            fleet,
            sidecars,
            recorder,
            leader,
            watched,
            written: HashMap::new(),
            announced: HashMap::new(),
        }
    }

    /// Writes every `every` while leading, until `shutdown`.
    pub async fn run(mut self, every: Duration, mut shutdown: watch::Receiver<bool>) {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = ticks.tick() => {
                    if *self.leader.borrow() {
                        self.sync().await;
                    } else {
                        // Another replica writes meanwhile: read afresh when leading again.
                        self.written.clear();
                        self.announced.clear();
                    }
                }
            }
        }
    }

    /// One pass over every served policy.
    pub async fn sync(&mut self) {
        let sidecars = self.sidecars.all();
        let now_ms = unix_ms_now();
        let mut seen = Vec::new();
        for namespace in self.served.namespaces() {
            let policies = self.served.subscribe(&namespace).borrow().clone();
            let decisions = self.fleet.decisions(&namespace);
            for policy in policies.policies.values() {
                let key = (namespace.clone(), policy.name.clone());
                seen.push(key.clone());
                if let Err(error) = self.write(&key, policy, &decisions, &sidecars, now_ms).await {
                    tracing::warn!(policy = %format!("{namespace}/{}", policy.name), %error, "cannot write the fleet status");
                }
            }
        }
        self.written.retain(|key, _| seen.contains(key));
        self.announced.retain(|key, _| seen.contains(key));
    }

    /// Forgets what was written to `key` when the watched status has shown something else for
    /// longer than [`FOREIGN_WRITE_GRACE`], so that the status is read afresh.
    fn forget_if_overwritten(&mut self, key: &(String, String)) {
        let Some(written) = self.written.get_mut(key) else { return };
        let reference = ObjectRef::<FallbackPolicy>::new(&key.1).within(&key.0);
        let watched = self.watched.iter().find_map(|store| store.get(&reference));
        let differs = watched.is_some_and(|policy| {
            !policy.status.as_ref().map(FleetFields::held).unwrap_or_default().shows_the_same(&written.held)
        });
        if !differs {
            written.differs_since = None;
            return;
        }
        if written.differs_since.get_or_insert_with(Instant::now).elapsed() >= FOREIGN_WRITE_GRACE {
            tracing::info!(policy = %format!("{}/{}", key.0, key.1),
                "the fleet status shows another writer's fields (a replica that led before, or an edit): writing it again");
            if let Some(written) = self.written.remove(key) {
                self.announced.insert(key.clone(), written.fields);
            }
        }
    }

    async fn write(
        &mut self,
        key: &(String, String),
        policy: &ServedPolicy,
        decisions: &Decisions,
        sidecars: &[Sidecar],
        now_ms: i64,
    ) -> kube::Result<()> {
        let api = Api::<FallbackPolicy>::namespaced(self.client.clone(), &key.0);
        self.forget_if_overwritten(key);
        if !self.written.contains_key(key) {
            let Some(current) = api.get_opt(&key.1).await? else { return Ok(()) };
            let held = FleetFields::held(&current.status.unwrap_or_default());
            self.written.insert(key.clone(), Written::new(held.clone(), held));
        }
        let before = self.written.get(key).map(|w| w.fields.clone()).unwrap_or_default();
        let desired = fields(policy, &key.0, decisions, sidecars, now_ms, &before);
        if before == desired {
            self.announced.remove(key);
            return Ok(());
        }
        // Only the condition this manager owns: the reconciler's `Ready` is its own.
        let conditions: Vec<&Condition> = desired.verified.iter().collect();
        let patch = json!({
            "apiVersion": API_VERSION,
            "kind": "FallbackPolicy",
            "status": {
                "sidecars": desired.sidecars,
                "targets": desired.targets,
                "degraded": desired.degraded,
                "conditions": conditions,
            },
        });
        let answered =
            api.patch_status(&key.1, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
        let reference = ObjectReference {
            api_version: Some(API_VERSION.into()),
            kind: Some("FallbackPolicy".into()),
            name: Some(key.1.clone()),
            namespace: Some(key.0.clone()),
            uid: Some(policy.uid.clone()).filter(|uid| !uid.is_empty()),
            ..ObjectReference::default()
        };
        // Transitions from what this leader announced last, when another writer's fields came
        // in between: their states were never this leader's to announce.
        let announced = self.announced.remove(key);
        let from = announced.as_ref().unwrap_or(&before);
        for (type_, reason, note) in transitions(&from.targets, &desired.targets) {
            tracing::info!(policy = %format!("{}/{}", key.0, key.1), reason, %note, "fleet");
            let event =
                Event { type_, reason: reason.into(), note: Some(note), action: "Failover".into(), secondary: None };
            if let Err(error) = self.recorder.publish(&event, &reference).await {
                tracing::warn!(%error, "cannot record an event");
            }
        }
        let held = FleetFields::held(&answered.status.unwrap_or_default());
        self.written.insert(key.clone(), Written::new(desired, held));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::operator::fleet::Decision;

    #[test]
    fn fleet_fields_read_back_from_the_api_server_show_the_same_times_aside() {
        let at = |text: &str| Some(Time(text.parse::<Timestamp>().expect("time")));
        let target = |state, since| TargetStatus {
            target: "a/m".into(),
            state,
            reason: Some("5 failures".into()),
            since,
            until: None,
            verified: None,
        };
        let written = FleetFields {
            sidecars: SidecarsStatus { connected: 2, current: 2, rejected: 0 },
            targets: vec![target(TargetState::Open, at("2026-12-07T10:00:00.123Z"))],
            degraded: 1,
            verified: None,
        };
        // What a write reads back as: its times to the second.
        let status = FallbackPolicyStatus {
            sidecars: Some(written.sidecars.clone()),
            targets: Some(vec![target(TargetState::Open, at("2026-12-07T10:00:00Z"))]),
            degraded: Some(1),
            ..FallbackPolicyStatus::default()
        };
        let held = FleetFields::held(&status);
        assert_ne!(held, written);
        assert!(held.shows_the_same(&written));
        // Another writer's count, or state, is not the same.
        let fewer = FallbackPolicyStatus {
            sidecars: Some(SidecarsStatus { connected: 1, current: 1, rejected: 0 }),
            ..status.clone()
        };
        assert!(!FleetFields::held(&fewer).shows_the_same(&written));
        let closed = FallbackPolicyStatus { targets: Some(vec![target(TargetState::Closed, None)]), ..status.clone() };
        assert!(!FleetFields::held(&closed).shows_the_same(&written));
        // Nor is another verification outcome, though the probe's time and latency do not count.
        let probed = |outcome, at_ms: &str, latency_ms| {
            let mut shown = target(TargetState::Open, at("2026-12-07T10:00:00Z"));
            shown.verified = Some(VerifiedStatus {
                at: Time(at_ms.parse::<Timestamp>().expect("time")),
                outcome,
                class: None,
                message: None,
                latency_ms: Some(latency_ms),
            });
            FallbackPolicyStatus { targets: Some(vec![shown]), ..status.clone() }
        };
        let passed = FleetFields::held(&probed(VerifyOutcome::Passed, "2026-12-07T10:00:01.250Z", 120));
        assert!(FleetFields::held(&probed(VerifyOutcome::Passed, "2026-12-07T10:00:01Z", 90)).shows_the_same(&passed));
        assert!(
            !FleetFields::held(&probed(VerifyOutcome::Failed, "2026-12-07T10:00:01Z", 120)).shows_the_same(&passed)
        );
    }

    #[test]
    fn targets_show_overrides_over_the_fleet_and_transitions_make_one_event_each() {
        let yaml = "apiVersion: backstop.dev/v1alpha1
kind: FallbackPolicy
metadata: {name: p, namespace: shop}
spec:
  providers: [{name: a, type: mock}, {name: b, type: mock}, {name: c, type: mock}]
  routes: [{model: chat, chain: [{provider: a, model: m}, {provider: b, model: m}, {provider: c, model: m}]}]
  overrides: [{target: c, state: ForcedOpen, until: '2126-01-01T00:00:00Z', reason: drill}]
";
        let policy = crate::testing::served("p", yaml);
        let a = policy.compiled.targets()[0].identity.clone();
        let since: Timestamp = "2026-11-27T10:00:00Z".parse().expect("time");
        let decisions = Decisions {
            revision: 1,
            targets: BTreeMap::from([(
                a,
                Decision {
                    phase: DecisionPhase::Open { until: tokio::time::Instant::now() },
                    reason: "the provider asked to wait 30s (Retry-After)".into(),
                    since,
                    until: Some(since),
                    label: "a/m".into(),
                },
            )]),
            spent: BTreeMap::new(),
            verify: BTreeMap::new(),
        };
        let now_ms = since.as_millisecond();
        let out = fields(&policy, "shop", &decisions, &[], now_ms, &FleetFields::default());
        let states: Vec<(&str, TargetState)> = out.targets.iter().map(|t| (t.target.as_str(), t.state)).collect();
        assert_eq!(
            states,
            [("a/m", TargetState::Open), ("b/m", TargetState::Closed), ("c/m", TargetState::ForcedOpen)]
        );
        assert_eq!(out.degraded, 2);
        assert_eq!(out.targets[2].reason.as_deref(), Some("override: drill"));
        let events = transitions(&[], &out.targets);
        let reasons: Vec<(&str, &str)> = events.iter().map(|(_, r, n)| (*r, n.as_str())).collect();
        assert_eq!(
            reasons,
            [
                ("TargetEjected", "a/m is out of rotation: the provider asked to wait 30s (Retry-After)"),
                ("TargetEjected", "c/m is out of rotation: override: drill"),
            ]
        );
        assert!(transitions(&out.targets, &out.targets).is_empty(), "nothing changed, nothing repeated");
        // The override ended and the fleet closed a/m.
        let later = fields(&policy, "shop", &Decisions::default(), &[], 4_922_899_200_000, &out);
        let back: Vec<String> = transitions(&out.targets, &later.targets).into_iter().map(|(_, _, n)| n).collect();
        assert_eq!(back, ["a/m is back in rotation: a probe succeeded", "c/m is back in rotation: its override ended"]);
        assert_eq!(later.degraded, 0);
    }

    #[test]
    fn a_spent_window_shows_in_status_with_its_amounts_and_is_told_as_it_starts_and_ends() {
        let yaml = "apiVersion: backstop.dev/v1alpha1
kind: FallbackPolicy
metadata: {name: p, namespace: shop}
spec:
  providers:
  - {name: a, type: mock}
  - {name: b, type: mock}
  routes:
  - model: chat
    chain: [{provider: a, model: m, price: {input: 3, output: 15}, spendLimit: {per: 1h, usd: 50}}, {provider: b, model: m}]
";
        let policy = crate::testing::served("p", yaml);
        let key = policy.compiled.targets()[0].spend_limit.clone().expect("limit").key;
        let hour = 3_600_000;
        let spent =
            crate::operator::fleet::SpentWindow { window: 493_000, usd: 50.4, limit: 50.0, until_ms: 493_001 * hour };
        let decisions = Decisions { spent: BTreeMap::from([(key, spent)]), ..Decisions::default() };
        let out = fields(&policy, "shop", &decisions, &[], 493_000 * hour + 1_000, &FleetFields::default());
        let a = &out.targets[0];
        assert_eq!((a.target.as_str(), a.state), ("a/m", TargetState::SpendLimit));
        assert_eq!(a.reason.as_deref(), Some("spendLimit: $50.40 of $50.00 spent in this 1h window"));
        assert_eq!(a.until.as_ref().map(|t| t.0.as_millisecond()), Some(493_001 * hour), "back when the window rolls");
        assert_eq!(out.degraded, 1);
        let ejected: Vec<String> = transitions(&[], &out.targets).into_iter().map(|(_, _, n)| n).collect();
        assert_eq!(ejected, ["a/m is out of rotation: spendLimit: $50.40 of $50.00 spent in this 1h window"]);
        let rolled = fields(&policy, "shop", &Decisions::default(), &[], 493_001 * hour, &out);
        let back: Vec<String> = transitions(&out.targets, &rolled.targets).into_iter().map(|(_, _, n)| n).collect();
        assert_eq!(back, ["a/m is back in rotation: its spend window rolled"]);
    }

    #[test]
    fn verification_shows_per_target_in_one_condition_and_is_told_as_it_changes() {
        use crate::operator::fleet::verify::{Verification, Verified};
        let yaml = "apiVersion: backstop.dev/v1alpha1
kind: FallbackPolicy
metadata: {name: p, namespace: shop}
spec:
  providers: [{name: a, type: mock}, {name: b, type: mock}, {name: c, type: mock}]
  routes: [{model: chat, chain: [{provider: a, model: m, verify: {enabled: false}}, {provider: b, model: m}, {provider: c, model: m}]}]
  verify: {every: 15m}
";
        let policy = crate::testing::served("p", yaml);
        let identity = |i: usize| policy.compiled.targets()[i].identity.clone();
        let result = |label: &str, passed: bool| Verification {
            label: label.into(),
            order: None,
            last: Some(Verified {
                at_ms: 1_796_000_000_000,
                passed,
                class: (!passed).then(|| "authError".into()),
                message: (!passed).then(|| "the provider refused the key (401)".into()),
                latency_ms: 87,
            }),
        };
        let now_ms = 1_796_000_001_000;
        // Nothing probed yet: Unknown, naming what is pending; the unverified primary has no entry.
        let pending = fields(&policy, "shop", &Decisions::default(), &[], now_ms, &FleetFields::default());
        let condition = pending.verified.clone().expect("a condition");
        assert_eq!((condition.status.as_str(), condition.reason.as_str()), ("Unknown", "Pending"));
        assert_eq!(condition.message, "not probed yet: b/m, c/m");
        assert!(pending.targets.iter().all(|t| t.verified.is_none()));
        // b's key is refused, c answers.
        let decisions = Decisions {
            verify: BTreeMap::from([(identity(1), result("b/m", false)), (identity(2), result("c/m", true))]),
            ..Decisions::default()
        };
        let failing = fields(&policy, "shop", &decisions, &[], now_ms, &pending);
        let condition = failing.verified.clone().expect("a condition");
        assert_eq!((condition.status.as_str(), condition.reason.as_str()), ("False", "VerificationFailed"));
        assert_eq!(
            condition.message,
            "failed its last verification probe: b/m (authError: the provider refused the key (401))"
        );
        let b = failing.targets[1].verified.clone().expect("verified");
        assert_eq!((b.outcome, b.class.as_deref(), b.latency_ms), (VerifyOutcome::Failed, Some("authError"), Some(87)));
        assert_eq!(failing.targets[0].verified, None, "a target left out has no verification");
        assert_eq!(failing.degraded, 0, "a failed probe takes nothing out of rotation");
        let told: Vec<(&str, String)> =
            transitions(&pending.targets, &failing.targets).into_iter().map(|(_, r, n)| (r, n)).collect();
        assert_eq!(
            told,
            [
                (
                    "VerificationFailed",
                    "b/m failed its verification probe: authError: the provider refused the key (401)".into()
                ),
                ("TargetVerified", "c/m answered its verification probe in 87 ms".into()),
            ]
        );
        // The key is fixed: True, one Event for b, and the condition's transition time moves.
        let decisions = Decisions {
            verify: BTreeMap::from([(identity(1), result("b/m", true)), (identity(2), result("c/m", true))]),
            ..Decisions::default()
        };
        let passing = fields(&policy, "shop", &decisions, &[], now_ms + 60_000, &failing);
        let condition = passing.verified.clone().expect("a condition");
        assert_eq!(
            (condition.status.as_str(), condition.message.as_str()),
            ("True", "2 target(s) answered their last verification probe")
        );
        assert_eq!(condition.last_transition_time.0.as_millisecond(), now_ms + 60_000);
        let told: Vec<String> =
            transitions(&failing.targets, &passing.targets).into_iter().map(|(_, _, n)| n).collect();
        assert_eq!(told, ["b/m answered its verification probe in 87 ms"]);
        // A new leader, whose fleet has probed nothing yet, keeps what status holds.
        let later = fields(&policy, "shop", &Decisions::default(), &[], now_ms + 120_000, &passing);
        assert_eq!(later, passing, "nothing to write, nothing told");
        // Nobody has probed for over two periods (15 m each) and a probe's time: Unknown.
        let stale = fields(&policy, "shop", &Decisions::default(), &[], 1_796_000_000_000 + 32 * 60_000, &passing);
        let condition = stale.verified.clone().expect("a condition");
        assert_eq!((condition.status.as_str(), condition.reason.as_str()), ("Unknown", "Stale"));
        assert_eq!(condition.message, "no recent verification probe: b/m, c/m");
        // A policy that verifies nothing has no condition.
        let plain = crate::testing::served("p", &yaml.replace("  verify: {every: 15m}\n", ""));
        assert_eq!(fields(&plain, "shop", &decisions, &[], now_ms, &passing).verified, None);
    }
}
