//! Verification probes: the schedule that orders them (the operator's for the fleet, a
//! sidecar's own when it reads a policy file: [`Schedule`]), and in the sidecar the orders it
//! was given and the results not yet taken ([`VerifyBook`]). The control stream (or the
//! sidecar's own schedule) sets the orders and takes the results; the proxy's verifier
//! ([`crate::proxy::verify`]) sends each order once and leaves its result here. A probe touches
//! nothing of a target's health but what `/health` shows of its last probe: no breaker, no
//! tally, no spend.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::chain::Verify;
use crate::configstream::{VerifyOrder, VerifyResult};

/// The orders and results of one sidecar.
#[derive(Debug)]
pub struct VerifyBook {
    orders: watch::Sender<BTreeMap<String, VerifyOrder>>,
    results: Mutex<BTreeMap<String, VerifyResult>>,
}

impl Default for VerifyBook {
    fn default() -> VerifyBook {
        VerifyBook { orders: watch::channel(BTreeMap::new()).0, results: Mutex::default() }
    }
}

impl VerifyBook {
    /// The operator's orders now, by target identity (all of them, every time).
    pub fn set_orders(&self, orders: &BTreeMap<String, VerifyOrder>) {
        self.orders.send_if_modified(|current| {
            if current == orders {
                return false;
            }
            current.clone_from(orders);
            true
        });
    }

    /// Follows the orders.
    pub fn orders(&self) -> watch::Receiver<BTreeMap<String, VerifyOrder>> {
        self.orders.subscribe()
    }

    /// How the probe of `identity` ended.
    pub fn record(&self, identity: &str, result: VerifyResult) {
        self.results.lock().insert(identity.to_string(), result);
    }

    /// At most `limit` of the results not yet reported; the rest stay for the next call.
    pub fn take_results(&self, limit: usize) -> BTreeMap<String, VerifyResult> {
        let mut results = self.results.lock();
        if results.len() <= limit {
            return std::mem::take(&mut *results);
        }
        let first_kept = results.keys().nth(limit).cloned().unwrap_or_default();
        let keep = results.split_off(&first_kept);
        std::mem::replace(&mut *results, keep)
    }
}

/// How long after a probe's own time limit its result may still come: a report's interval and
/// the way back.
const GRACE: Duration = Duration::from_secs(5);

/// How a probe ended, as whoever ordered it heard it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Verified {
    /// When it was heard, in Unix ms.
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

impl Verified {
    /// `result`, heard at `wall`.
    pub fn of(result: &VerifyResult, wall: Timestamp) -> Verified {
        Verified {
            at_ms: wall.as_millisecond(),
            passed: result.passed,
            class: result.class.clone().filter(|_| !result.passed),
            message: result.message.clone().filter(|_| !result.passed),
            latency_ms: result.latency_ms,
        }
    }
}

/// One target's verification schedule: the operator keeps one per verified target of the
/// fleet, and a sidecar reading a policy file one per verified target of its own (the fleet
/// of one). A probe is due `every` after the last result (at once for a target never probed);
/// it is ordered from the first of the candidates in their order that has not let an order
/// lapse, and an order not answered within its time limit and [`GRACE`], or whose pod is no
/// longer a candidate, goes to the next.
#[derive(Debug)]
pub struct Schedule {
    settings: Verify,
    label: String,
    /// When the next probe is due.
    due: Instant,
    /// The order out: the pod, the probe, when it is overdue.
    order: Option<(String, VerifyOrder, Instant)>,
    /// Candidates passed over (they let an order lapse) since the first.
    offset: usize,
    last: Option<Verified>,
}

impl Schedule {
    /// A target never probed: due at once.
    pub fn new(settings: Verify, label: String, now: Instant) -> Schedule {
        Schedule { settings, label, due: now, order: None, offset: 0, last: None }
    }

    /// Takes changed settings; a shorter period brings the next probe forward.
    pub fn reconfigure(&mut self, settings: &Verify, label: &str, now: Instant) {
        if settings.every < self.settings.every {
            self.due = self.due.min(now + settings.every);
        }
        self.settings = settings.clone();
        self.label = label.to_string();
    }

    /// Orders a probe from one of the candidates when one is due, or passes an order nobody
    /// answered on to the next; whether the order changed. `is_candidate` says whether a pod
    /// still is one, and `candidates` lists them in order, asked only when an order is made.
    pub fn advance(
        &mut self,
        now: Instant,
        is_candidate: impl Fn(&str) -> bool,
        candidates: impl FnOnce() -> Vec<String>,
    ) -> bool {
        if let Some((prober, _, overdue)) = &self.order {
            let still = is_candidate(prober);
            if still && now < *overdue {
                return false;
            }
            // A pod that let the order lapse is passed over; one that left is gone from the
            // candidates already, so the same place in line is the next pod.
            if still {
                self.offset += 1;
            }
        } else if now < self.due {
            return false;
        }
        let had_order = self.order.take().is_some();
        let candidates = candidates();
        let Some(prober) = candidates.get(self.offset % candidates.len().max(1)) else {
            // Nobody can probe it now; the first that can will.
            return had_order;
        };
        let probe = VerifyOrder {
            id: rand::random_range(1..u64::MAX),
            prompt: self.settings.prompt.clone(),
            max_tokens: self.settings.max_tokens,
            timeout_ms: u64::try_from(self.settings.timeout.as_millis()).unwrap_or(u64::MAX),
        };
        self.order = Some((prober.clone(), probe, now + self.settings.timeout + GRACE));
        true
    }

    /// Takes `prober`'s result; whether it answered the order out.
    pub fn take(&mut self, prober: &str, result: &VerifyResult, now: Instant, wall: Timestamp) -> bool {
        let ordered = self.order.as_ref().is_some_and(|(pod, order, _)| pod == prober && order.id == result.id);
        if !ordered {
            return false;
        }
        self.order = None;
        self.due = now + self.settings.every;
        self.last = Some(Verified::of(result, wall));
        true
    }

    /// Withdraws the order out, if any (another replica orders meanwhile); whether there was one.
    pub fn withdraw(&mut self) -> bool {
        self.order.take().is_some()
    }

    /// Takes a result someone else heard (the leader's, on a follower), if it is newer than the
    /// last: the next probe is then due a period after it, by the wall clock `now_ms`.
    pub fn heard(&mut self, verified: &Verified, now: Instant, now_ms: i64) {
        if self.last.as_ref().is_some_and(|last| last.at_ms >= verified.at_ms) {
            return;
        }
        let age = Duration::from_millis(u64::try_from(now_ms.saturating_sub(verified.at_ms)).unwrap_or(0));
        self.due = now + self.settings.every.saturating_sub(age);
        self.last = Some(verified.clone());
    }

    /// The settings.
    pub fn settings(&self) -> &Verify {
        &self.settings
    }

    /// The order out: who is to probe, and what.
    pub fn order(&self) -> Option<(&str, &VerifyOrder)> {
        self.order.as_ref().map(|(prober, order, _)| (prober.as_str(), order))
    }

    /// How the last probe ended.
    pub fn last(&self) -> Option<&Verified> {
        self.last.as_ref()
    }

    /// The target's label.
    pub fn label(&self) -> &str {
        &self.label
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pods(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
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

    /// Advances `schedule` with `candidates`.
    fn among(schedule: &mut Schedule, candidates: &[String], now: Instant) -> bool {
        schedule.advance(now, |pod| candidates.iter().any(|c| c == pod), || candidates.to_vec())
    }

    fn prober(schedule: &Schedule) -> (String, u64) {
        let (prober, order) = schedule.order().expect("ordered");
        (prober.to_string(), order.id)
    }

    #[tokio::test(start_paused = true)]
    async fn one_pod_probes_each_period_and_a_silent_pod_is_passed_over() {
        let start = Instant::now();
        let wall: Timestamp = "2026-12-07T06:00:00Z".parse().expect("time");
        let candidates = pods(&["pod-2", "pod-3", "pod-1"]);
        let mut schedule = Schedule::new(settings(60), "b/m".into(), start);
        assert!(among(&mut schedule, &candidates, start), "due at once");
        let (first, id) = prober(&schedule);
        assert_eq!(first, "pod-2", "the first candidate");
        assert!(!among(&mut schedule, &candidates, start + Duration::from_secs(1)), "one order at a time");
        // Only the pod the order went to, with its id, is heard.
        assert!(!schedule.take("pod-3", &result(id, true), start, wall));
        assert!(!schedule.take(&first, &result(id + 1, true), start, wall));
        assert!(schedule.take(&first, &result(id, false), start + Duration::from_secs(2), wall));
        let last = schedule.last().expect("a result");
        assert_eq!((last.passed, last.class.as_deref(), last.at_ms), (false, Some("authError"), wall.as_millisecond()));
        assert_eq!(schedule.order(), None);
        // Nothing until the period has passed since the result.
        assert!(!among(&mut schedule, &candidates, start + Duration::from_secs(61)));
        assert!(among(&mut schedule, &candidates, start + Duration::from_secs(62)));
        let (second, second_id) = prober(&schedule);
        assert_eq!(second, first, "the same pod");
        assert_ne!(second_id, id);
        // It never answers: after the probe's time limit and the grace, the next pod.
        assert!(!among(&mut schedule, &candidates, start + Duration::from_secs(62 + 14)));
        assert!(among(&mut schedule, &candidates, start + Duration::from_secs(62 + 15)));
        assert_eq!(prober(&schedule).0, "pod-3");
        assert!(!schedule.take(&first, &result(second_id, true), start, wall), "too late");
    }

    #[tokio::test(start_paused = true)]
    async fn a_departed_prober_is_replaced_and_nobody_left_means_no_order() {
        let start = Instant::now();
        let mut schedule = Schedule::new(settings(60), "b/m".into(), start);
        assert!(among(&mut schedule, &pods(&["pod-1", "pod-2", "pod-3"]), start));
        assert_eq!(prober(&schedule).0, "pod-1");
        assert!(among(&mut schedule, &pods(&["pod-2", "pod-3"]), start + Duration::from_secs(1)), "pod-1 left");
        assert_eq!(prober(&schedule).0, "pod-2", "the next in line, none skipped");
        assert!(among(&mut schedule, &[], start + Duration::from_secs(2)), "the order is withdrawn");
        assert_eq!(schedule.order(), None);
        assert!(!among(&mut schedule, &[], start + Duration::from_secs(3)));
        // A shorter period brings the next probe forward.
        let mut done = Schedule::new(settings(3600), "b/m".into(), start);
        let one = pods(&["pod-1"]);
        among(&mut done, &one, start);
        let (_, id) = prober(&done);
        done.take("pod-1", &result(id, true), start, Timestamp::now());
        assert!(!among(&mut done, &one, start + Duration::from_secs(100)));
        done.reconfigure(&settings(60), "b/m", start + Duration::from_secs(100));
        assert!(among(&mut done, &one, start + Duration::from_secs(160)));
        assert!(done.withdraw() && !done.withdraw(), "withdrawn once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_result_heard_elsewhere_sets_the_next_due_time_and_results_go_out_in_bounded_batches() {
        let start = Instant::now();
        let mut schedule = Schedule::new(settings(60), "b/m".into(), start);
        let heard = Verified { at_ms: 1_000_000, passed: true, class: None, message: None, latency_ms: 5 };
        // Heard 20 s ago by the wall clock: due 40 s from now.
        schedule.heard(&heard, start, 1_020_000);
        assert_eq!(schedule.last(), Some(&heard));
        assert!(!among(&mut schedule, &pods(&["pod-1"]), start + Duration::from_secs(39)));
        assert!(among(&mut schedule, &pods(&["pod-1"]), start + Duration::from_secs(40)));
        // An older result changes nothing.
        schedule.heard(&Verified { at_ms: 999_000, ..heard.clone() }, start, 1_020_000);
        assert_eq!(schedule.last(), Some(&heard));

        let book = VerifyBook::default();
        for i in 0..5 {
            book.record(&format!("t{i}"), result(i, true));
        }
        assert_eq!(book.take_results(2).into_keys().collect::<Vec<_>>(), ["t0", "t1"]);
        assert_eq!(book.take_results(2).into_keys().collect::<Vec<_>>(), ["t2", "t3"]);
        assert_eq!(book.take_results(2).into_keys().collect::<Vec<_>>(), ["t4"]);
        assert!(book.take_results(2).is_empty());
    }
}
