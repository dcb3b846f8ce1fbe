//! Verified targets: the operator's schedule of verification probes, one pod per target.
//!
//! Each target a policy verifies (`spec.verify`, a target's own `verify`) is probed once per
//! `every`, whatever the fleet's size: the operator chooses one connected pod whose policies use
//! the target, by the same rendezvous order as half-open probes, and sends it an order (an id,
//! the prompt, the answer's token limit, the time limit) with the fleet's decisions. The pod
//! sends the probe through the target's own translation and key and reports how it ended with
//! the order's id; the next probe is due `every` after that. A pod that does not answer within
//! the probe's time limit (and a report's grace), or leaves, is passed over for the next pod in
//! line. A result is taken only from the pod the order went to, with the order's id.
//!
//! The schedule lives in memory: a new leader probes every target once at once, then keeps the
//! period. Status keeps the last result meanwhile.

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::{Member, rendezvous};
use crate::chain::Verify;
use crate::configstream::{VerifyOrder, VerifyResult};

/// How long after a probe's own time limit its result may still come: a report's interval and
/// the way back.
const GRACE: Duration = Duration::from_secs(5);

/// One target's verification as the fleet's decisions carry it: the order out, if any, and the
/// last result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Verification {
    /// The target's label.
    pub label: String,
    /// The probe ordered and not yet reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<Order>,
    /// How the last probe ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<Verified>,
}

/// A probe ordered from one pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Order {
    /// The pod's uid.
    pub prober: String,
    /// What it is to send.
    #[serde(flatten)]
    pub probe: VerifyOrder,
}

/// How a probe ended, as the operator heard it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Verified {
    /// When the operator heard it, in Unix ms.
    pub at_ms: i64,
    /// Whether the target answered.
    pub passed: bool,
    /// Why not, as a failure class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    /// Why not, in a line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// How long it took.
    pub latency_ms: u64,
}

/// One target's schedule.
#[derive(Debug)]
pub(super) struct Schedule {
    settings: Verify,
    label: String,
    /// When the next probe is due.
    due: Instant,
    /// The order out, and when it is overdue.
    order: Option<(Order, Instant)>,
    /// Pods passed over (they did not answer) since the rendezvous order's first.
    offset: usize,
    last: Option<Verified>,
}

impl Schedule {
    /// A target never probed: due at once.
    pub(super) fn new(settings: Verify, label: String, now: Instant) -> Schedule {
        Schedule { settings, label, due: now, order: None, offset: 0, last: None }
    }

    /// Takes changed settings; a shorter period brings the next probe forward.
    pub(super) fn reconfigure(&mut self, settings: &Verify, label: &str, now: Instant) {
        if settings.every < self.settings.every {
            self.due = self.due.min(now + settings.every);
        }
        self.settings = settings.clone();
        self.label = label.to_string();
    }

    /// Orders a probe when one is due, or passes an order nobody answered on to the next pod;
    /// whether the order changed.
    pub(super) fn advance(&mut self, identity: &str, members: &HashMap<String, Member>, now: Instant) -> bool {
        if let Some((order, overdue)) = &self.order {
            if members.contains_key(&order.prober) && now < *overdue {
                return false;
            }
            self.offset += 1;
        } else if now < self.due {
            return false;
        }
        let had_order = self.order.take().is_some();
        let candidates =
            rendezvous(identity, members.iter().filter(|(_, m)| m.targets.contains(identity)).map(|(pod, _)| pod));
        let Some(prober) = candidates.get(self.offset % candidates.len().max(1)) else {
            // Nobody can probe it now; the first pod that can will.
            return had_order;
        };
        let probe = VerifyOrder {
            id: rand::random_range(1..u64::MAX),
            prompt: self.settings.prompt.clone(),
            max_tokens: self.settings.max_tokens,
            timeout_ms: u64::try_from(self.settings.timeout.as_millis()).unwrap_or(u64::MAX),
        };
        self.order = Some((Order { prober: prober.clone(), probe }, now + self.settings.timeout + GRACE));
        true
    }

    /// Takes `pod`'s result; whether it was the one ordered.
    pub(super) fn take(&mut self, pod: &str, result: &VerifyResult, now: Instant, wall: Timestamp) -> bool {
        let ordered = self.order.as_ref().is_some_and(|(order, _)| order.prober == pod && order.probe.id == result.id);
        if !ordered {
            return false;
        }
        self.order = None;
        self.due = now + self.settings.every;
        self.last = Some(Verified {
            at_ms: wall.as_millisecond(),
            passed: result.passed,
            class: result.class.clone().filter(|_| !result.passed),
            message: result.message.clone().filter(|_| !result.passed),
            latency_ms: result.latency_ms,
        });
        true
    }

    /// As the decisions carry it.
    pub(super) fn published(&self) -> Verification {
        Verification {
            label: self.label.clone(),
            order: self.order.as_ref().map(|(order, _)| order.clone()),
            last: self.last.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn members(pods: &[&str], identity: &str) -> HashMap<String, Member> {
        pods.iter()
            .map(|pod| {
                let member =
                    Member { identities: HashSet::new(), targets: HashSet::from([identity.to_string()]), local: true };
                (pod.to_string(), member)
            })
            .collect()
    }

    fn settings(every: u64) -> Verify {
        Verify { every: Duration::from_secs(every), timeout: Duration::from_secs(10), ..Verify::default() }
    }

    fn result(id: u64, passed: bool) -> VerifyResult {
        VerifyResult {
            id,
            passed,
            class: (!passed).then(|| "authError".into()),
            message: (!passed).then(|| "401".into()),
            latency_ms: 20,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn one_pod_probes_each_period_and_a_silent_pod_is_passed_over() {
        let start = Instant::now();
        let wall: Timestamp = "2026-12-07T06:00:00Z".parse().expect("time");
        let pods = members(&["pod-1", "pod-2", "pod-3"], "t");
        let mut schedule = Schedule::new(settings(60), "b/m".into(), start);
        assert!(schedule.advance("t", &pods, start), "due at once");
        let first = schedule.published().order.expect("ordered");
        assert!(!schedule.advance("t", &pods, start + Duration::from_secs(1)), "one order at a time");
        // Only the pod the order went to, with its id, is heard.
        let other = pods.keys().find(|p| **p != first.prober).expect("another pod");
        assert!(!schedule.take(other, &result(first.probe.id, true), start, wall));
        assert!(!schedule.take(&first.prober, &result(first.probe.id + 1, true), start, wall));
        assert!(schedule.take(&first.prober, &result(first.probe.id, false), start + Duration::from_secs(2), wall));
        let last = schedule.published().last.expect("a result");
        assert_eq!((last.passed, last.class.as_deref(), last.at_ms), (false, Some("authError"), wall.as_millisecond()));
        assert_eq!(schedule.published().order, None);
        // Nothing until the period has passed since the result.
        assert!(!schedule.advance("t", &pods, start + Duration::from_secs(61)));
        assert!(schedule.advance("t", &pods, start + Duration::from_secs(62)));
        let second = schedule.published().order.expect("ordered");
        assert_eq!(second.prober, first.prober, "the same pod, by rendezvous");
        assert_ne!(second.probe.id, first.probe.id);
        // It never answers: after the probe's time limit and the grace, the next pod.
        assert!(!schedule.advance("t", &pods, start + Duration::from_secs(62 + 14)));
        assert!(schedule.advance("t", &pods, start + Duration::from_secs(62 + 15)));
        let third = schedule.published().order.expect("ordered");
        assert_ne!(third.prober, first.prober);
        assert!(!schedule.take(&first.prober, &result(second.probe.id, true), start, wall), "too late");
    }

    #[tokio::test(start_paused = true)]
    async fn a_departed_prober_is_replaced_and_nobody_left_means_no_order() {
        let start = Instant::now();
        let mut pods = members(&["pod-1", "pod-2"], "t");
        let mut schedule = Schedule::new(settings(60), "b/m".into(), start);
        assert!(schedule.advance("t", &pods, start));
        let first = schedule.published().order.expect("ordered").prober;
        pods.remove(&first);
        assert!(schedule.advance("t", &pods, start + Duration::from_secs(1)));
        let second = schedule.published().order.expect("ordered").prober;
        assert_ne!(second, first);
        pods.clear();
        assert!(schedule.advance("t", &pods, start + Duration::from_secs(2)), "the order is withdrawn");
        assert_eq!(schedule.published().order, None);
        assert!(!schedule.advance("t", &pods, start + Duration::from_secs(3)));
        // A pod that does not use the target is never chosen.
        let strangers = members(&["pod-9"], "another");
        assert!(!schedule.advance("t", &strangers, start + Duration::from_secs(4)));
        // A shorter period brings the next probe forward.
        let mut done = Schedule::new(settings(3600), "b/m".into(), start);
        let pods = members(&["pod-1"], "t");
        done.advance("t", &pods, start);
        let id = done.published().order.expect("ordered").probe.id;
        done.take("pod-1", &result(id, true), start, Timestamp::now());
        assert!(!done.advance("t", &pods, start + Duration::from_secs(100)));
        done.reconfigure(&settings(60), "b/m", start + Duration::from_secs(100));
        assert!(done.advance("t", &pods, start + Duration::from_secs(160)));
    }
}
