//! The fleet view's merge, in paused time: what opens a target for every pod, what one noisy
//! pod can and cannot do, and how probes bring it back.

use super::*;
use crate::testing::compiled;

const POLICY: &str = "apiVersion: backstop.dev/v1alpha1
kind: FallbackPolicy
metadata: {name: p, namespace: shop}
spec:
  providers:
  - {name: a, type: mock}
  - {name: b, type: mock}
  routes:
  - model: chat
    chain: [{provider: a, model: m}, {provider: b, model: m}]
  circuitBreaker: {consecutiveFailures: 5, failureRate: {percent: 50, window: 10s, minRequests: 20}, openFor: 20s, maxOpenFor: 60s}
";

struct Fixture {
    view: FleetView,
    a: String,
    b: String,
    start: Instant,
}

fn fixture(extra: &str) -> Fixture {
    let served = Arc::new(ServedPolicies::new());
    let policy = compiled(&format!("{POLICY}{extra}"));
    let targets = policy.targets();
    let (a, b) = (targets[0].identity.clone(), targets[1].identity.clone());
    let version = policy.digest();
    let _ = (policy, version);
    served.publish("shop", crate::testing::served("p", &format!("{POLICY}{extra}")));
    let view = FleetView::new(served);
    let start = Instant::now();
    for pod in ["pod-1", "pod-2", "pod-3"] {
        view.join("shop", pod, Membership::fleet(HashSet::from([a.clone(), b.clone()])), start);
    }
    Fixture { view, a, b, start }
}

impl Fixture {
    fn report(&self, pod: &str, identity: &str, successes: u64, failures: u64, at: Duration) {
        self.report_ending_in(pod, identity, successes, failures, 0, at);
    }

    /// A report whose last `trailing` failures came after its last success.
    fn report_ending_in(&self, pod: &str, identity: &str, successes: u64, failures: u64, trailing: u64, at: Duration) {
        let report = TargetReport {
            successes,
            failures,
            retry_after_ms: None,
            last_failure: (failures > 0).then(|| "serverError: 500 boom".to_string()),
            trailing_failures: trailing,
        };
        let targets = BTreeMap::from([(identity.to_string(), report)]);
        self.view.observe(
            "shop",
            pod,
            &Evidence { targets: &targets, spend: &BTreeMap::new(), verified: &BTreeMap::new() },
            self.start + at,
        );
    }

    fn decision(&self, identity: &str) -> Option<Decision> {
        self.view.decisions("shop").targets.get(identity).cloned()
    }
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

#[test]
fn one_pod_that_alone_uses_a_target_opens_it_for_every_pod() {
    let f = fixture("");
    f.report("pod-1", &f.a, 0, 4, secs(1));
    assert!(f.decision(&f.a).is_none(), "4 failures are below consecutiveFailures: 5");
    f.report("pod-1", &f.a, 0, 1, secs(2));
    let decision = f.decision(&f.a).expect("open");
    assert_eq!(decision.phase, DecisionPhase::Open { until: f.start + secs(2) + secs(20) });
    assert_eq!(decision.label, "a/m");
    assert_eq!(
        decision.reason,
        "5 failures in a row across the fleet; 1 of 1 pod(s) using it see it fail (last: serverError: 500 boom)"
    );
    assert!(f.decision(&f.b).is_none());
}

#[test]
fn a_noisy_pod_among_pods_the_target_works_for_cannot_open_it_but_a_majority_can() {
    let f = fixture("");
    f.report("pod-2", &f.a, 10, 0, secs(1));
    f.report("pod-3", &f.a, 10, 0, secs(1));
    for second in 2..6 {
        f.report("pod-1", &f.a, 0, 20, secs(second));
    }
    assert!(f.decision(&f.a).is_none(), "1 of 3 pods sees it fail, however loudly");
    f.report("pod-2", &f.a, 0, 15, secs(6));
    let decision = f.decision(&f.a).expect("2 of 3 pods see it fail");
    assert!(
        decision.reason.starts_with("95 of 115 requests failed in the last 10s; 2 of 3 pod(s)"),
        "{}",
        decision.reason
    );
    // Evidence ages out of the window: the healthy pods' successes no longer count either.
    let g = fixture("");
    g.report("pod-2", &g.a, 10, 0, secs(0));
    g.report("pod-1", &g.a, 0, 4, secs(11));
    g.report("pod-1", &g.a, 0, 1, secs(12));
    assert!(g.decision(&g.a).is_some(), "pod-2's successes are older than the 10 s window");
}

#[test]
fn a_pod_failing_in_a_row_sees_the_target_fail_though_its_window_holds_earlier_successes() {
    let f = fixture("");
    // Both pods used the target well a moment ago.
    f.report("pod-1", &f.a, 10, 0, secs(1));
    f.report("pod-2", &f.a, 10, 0, secs(1));
    // Now it fails pod-1 five times in a row (its own breaker opens): 5 of its 15 requests in
    // the window, a third, yet it sees the target fail now; 1 of the 2 pods using it.
    f.report("pod-1", &f.a, 0, 4, secs(2));
    assert!(f.decision(&f.a).is_none(), "4 in a row: below consecutiveFailures");
    f.report("pod-1", &f.a, 0, 1, secs(2));
    let decision = f.decision(&f.a).expect("open for every pod");
    assert!(decision.reason.starts_with("5 failures in a row across the fleet; 1 of 2 pod(s)"), "{}", decision.reason);
    // A pod's success ends its own run: one failure more is not a run of five.
    let g = fixture("");
    g.report("pod-1", &g.a, 10, 0, secs(1));
    g.report("pod-2", &g.a, 10, 0, secs(1));
    g.report("pod-1", &g.a, 0, 4, secs(2));
    g.report("pod-1", &g.a, 1, 0, secs(2));
    g.report("pod-1", &g.a, 0, 1, secs(3));
    assert!(g.decision(&g.a).is_none());
}

#[test]
fn a_report_whose_failures_came_after_its_successes_counts_them_in_a_row() {
    let f = fixture("");
    f.report("pod-1", &f.a, 10, 0, secs(1));
    f.report("pod-2", &f.a, 10, 0, secs(1));
    // One report holds pod-1's last successes and then five failures in a row: its own
    // breaker opened, and the fleet's run is five, not zero.
    f.report_ending_in("pod-1", &f.a, 2, 5, 5, secs(2));
    let decision = f.decision(&f.a).expect("open for every pod");
    assert!(decision.reason.starts_with("5 failures in a row across the fleet; 1 of 2 pod(s)"), "{}", decision.reason);
    // The same counts with the successes last end the run.
    let g = fixture("");
    g.report("pod-1", &g.a, 10, 0, secs(1));
    g.report("pod-2", &g.a, 10, 0, secs(1));
    g.report_ending_in("pod-1", &g.a, 2, 5, 0, secs(2));
    assert!(g.decision(&g.a).is_none());
}

#[test]
fn a_retry_after_is_believed_at_once_for_the_fleet_up_to_max_open_for() {
    let f = fixture("");
    f.report("pod-2", &f.a, 50, 0, secs(0));
    let limited = TargetReport {
        successes: 3,
        failures: 1,
        retry_after_ms: Some(30_000),
        last_failure: Some("rateLimited: 429".into()),
        trailing_failures: 0,
    };
    let targets = BTreeMap::from([(f.a.clone(), limited.clone())]);
    f.view.observe(
        "shop",
        "pod-1",
        &Evidence { targets: &targets, spend: &BTreeMap::new(), verified: &BTreeMap::new() },
        f.start + secs(1),
    );
    let decision = f.decision(&f.a).expect("open on the provider's word");
    assert_eq!(decision.phase, DecisionPhase::Open { until: f.start + secs(31) });
    assert_eq!(decision.reason, "the provider asked to wait 30s (Retry-After) (last: rateLimited: 429)");
    let longer = TargetReport { retry_after_ms: Some(3_600_000), ..limited };
    let targets = BTreeMap::from([(f.a.clone(), longer)]);
    f.view.observe(
        "shop",
        "pod-3",
        &Evidence { targets: &targets, spend: &BTreeMap::new(), verified: &BTreeMap::new() },
        f.start + secs(2),
    );
    assert_eq!(
        f.decision(&f.a).expect("open").phase,
        DecisionPhase::Open { until: f.start + secs(62) },
        "extended, but never past maxOpenFor"
    );
}

#[test]
fn one_chosen_pod_probes_a_recovering_target_and_its_success_closes_it_everywhere() {
    let f = fixture("");
    f.report("pod-1", &f.a, 0, 5, secs(0));
    f.view.tick(f.start + secs(19));
    assert!(matches!(f.decision(&f.a).expect("out").phase, DecisionPhase::Open { .. }));
    f.view.tick(f.start + secs(20));
    let DecisionPhase::HalfOpen { probers } = f.decision(&f.a).expect("out").phase else { panic!("half-open") };
    assert_eq!(probers.len(), 1, "halfOpenProbes: 1");
    let prober = probers[0].clone();
    // A probe that fails reopens it for twice as long.
    f.report(&prober, &f.a, 0, 1, secs(21));
    let reopened = f.decision(&f.a).expect("reopened");
    assert_eq!(reopened.phase, DecisionPhase::Open { until: f.start + secs(21) + secs(40) });
    assert!(reopened.reason.starts_with("a probe failed"), "{}", reopened.reason);
    f.view.tick(f.start + secs(61));
    let DecisionPhase::HalfOpen { probers } = f.decision(&f.a).expect("out").phase else { panic!("half-open") };
    assert_eq!(probers, std::slice::from_ref(&prober), "the same pod, by rendezvous");
    // It left: another takes over at once.
    f.view.leave("shop", &prober, f.start + secs(62));
    let DecisionPhase::HalfOpen { probers } = f.decision(&f.a).expect("out").phase else { panic!("half-open") };
    assert_ne!(probers, std::slice::from_ref(&prober));
    let second = probers[0].clone();
    // Silent probers are replaced after the probe period (openFor, at least 10 s).
    f.view.tick(f.start + secs(62) + secs(20));
    let DecisionPhase::HalfOpen { probers } = f.decision(&f.a).expect("out").phase else { panic!("half-open") };
    assert_ne!(probers, std::slice::from_ref(&second));
    f.report(&probers[0], &f.a, 1, 0, secs(83));
    assert!(f.decision(&f.a).is_none(), "closed for everyone");
}

#[test]
fn a_pod_is_heard_only_about_its_own_policies_fleet_scoped_targets() {
    let f = fixture("");
    f.view.join("shop", "pod-4", Membership::fleet(HashSet::from([f.b.clone()])), f.start);
    f.report("pod-4", &f.a, 0, 50, secs(1));
    f.report("stranger", &f.a, 0, 50, secs(1));
    let targets = BTreeMap::from([(f.a.clone(), TargetReport { failures: 50, ..TargetReport::default() })]);
    f.view.observe(
        "other",
        "pod-1",
        &Evidence { targets: &targets, spend: &BTreeMap::new(), verified: &BTreeMap::new() },
        f.start + secs(1),
    );
    assert!(f.decision(&f.a).is_none(), "not its target, not a member, not its namespace");
    let g = fixture("");
    let local = POLICY.replace("maxOpenFor: 60s}", "maxOpenFor: 60s, scope: pod}");
    g.view.served.publish("shop", crate::testing::served("p", &local));
    g.report("pod-1", &g.a, 0, 50, secs(1));
    assert!(g.decision(&g.a).is_none(), "scope: pod keeps breakers local");
}

#[test]
fn nobody_left_to_probe_closes_the_target() {
    let f = fixture("");
    f.report("pod-1", &f.a, 0, 5, secs(0));
    for pod in ["pod-1", "pod-2", "pod-3"] {
        f.view.leave("shop", pod, f.start + secs(1));
    }
    f.view.tick(f.start + secs(20));
    assert!(f.decision(&f.a).is_none());
    assert_eq!(f.view.decisions("shop").revision, 2, "opened, then closed");
}

/// The wall clock of the spend test, in Unix ms.
static SPEND_CLOCK: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

fn spend_clock() -> i64 {
    SPEND_CLOCK.load(std::sync::atomic::Ordering::SeqCst)
}

#[tokio::test(start_paused = true)]
async fn pods_spending_a_target_add_up_to_its_limit_and_the_window_s_roll_brings_it_back() {
    use crate::configstream::WindowSpend;
    let hour = 3_600_000;
    let limited = |usd: u32| {
        POLICY.replace(
            "chain: [{provider: a, model: m}, {provider: b, model: m}]",
            &format!("chain: [{{provider: a, model: m, price: {{input: 1, output: 1}}, spendLimit: {{per: 1h, usd: {usd}}}}}, {{provider: b, model: m}}]"),
        )
    };
    let served = Arc::new(ServedPolicies::new());
    served.publish("shop", crate::testing::served("p", &limited(10)));
    let key = compiled(&limited(10)).targets()[0].spend_limit.clone().expect("a spend limit").key;
    let view = FleetView::with_clock(served.clone(), spend_clock);
    let start = Instant::now();
    for pod in ["pod-1", "pod-2", "pod-3"] {
        view.join("shop", pod, Membership::fleet(HashSet::new()), start);
    }
    SPEND_CLOCK.store(400 * hour + 60_000, std::sync::atomic::Ordering::SeqCst);
    let window = 400;
    // Each pod reports its whole spend in the window, every second.
    let report = |pod: &str, window: i64, usd: f64| {
        let spend = BTreeMap::from([(key.clone(), WindowSpend { window, usd })]);
        view.observe(
            "shop",
            pod,
            &Evidence { targets: &BTreeMap::new(), spend: &spend, verified: &BTreeMap::new() },
            start,
        );
    };
    for total in [1.2, 2.4] {
        for pod in ["pod-1", "pod-2", "pod-3"] {
            report(pod, window, total);
        }
    }
    assert!(view.decisions("shop").spent.is_empty(), "$7.20 of $10: no one pod near it");
    report("pod-1", window, 3.6);
    report("pod-2", window, 3.6);
    assert!(view.decisions("shop").spent.is_empty(), "$9.60 of $10");
    report("pod-3", window, 3.6);
    let spent = view.decisions("shop").spent.get(&key).copied().expect("$10.80: spent");
    assert_eq!((spent.window, spent.limit, spent.until_ms), (window, 10.0, 401 * hour));
    assert!((spent.usd - 10.8).abs() < 1e-9, "{spent:?}");
    // Later reports do not change the decision (no new message to every pod each second), and
    // a restarted sidecar's smaller total does not undo what its pod spent.
    let revision = view.decisions("shop").revision;
    report("pod-1", window, 4.0);
    report("pod-2", window, 0.5);
    assert_eq!(view.decisions("shop").revision, revision);
    // Reports of another window, or of a key no policy limits, count nothing.
    report("pod-2", window - 1, 50.0);
    let stranger = BTreeMap::from([("shop/p\u{1f}b/m".to_string(), WindowSpend { window, usd: 99.0 })]);
    view.observe(
        "shop",
        "pod-2",
        &Evidence { targets: &BTreeMap::new(), spend: &stranger, verified: &BTreeMap::new() },
        start,
    );
    assert_eq!(view.decisions("shop").spent.keys().collect::<Vec<_>>(), [&key]);

    // An operator that restarts has the sum again from the next reports.
    let restarted = FleetView::with_clock(served.clone(), spend_clock);
    for (pod, total) in [("pod-1", 4.0), ("pod-2", 3.6), ("pod-3", 3.6)] {
        restarted.join("shop", pod, Membership::fleet(HashSet::new()), start);
        let spend = BTreeMap::from([(key.clone(), WindowSpend { window, usd: total })]);
        restarted.observe(
            "shop",
            pod,
            &Evidence { targets: &BTreeMap::new(), spend: &spend, verified: &BTreeMap::new() },
            start,
        );
    }
    assert!(restarted.decisions("shop").spent.contains_key(&key), "$11.20 again, from one report of each pod");

    // A limit raised above the sum takes the target back at once.
    served.publish("shop", crate::testing::served("p", &limited(20)));
    view.tick(start + Duration::from_secs(1));
    assert!(view.decisions("shop").spent.is_empty(), "$11.20 of $20");
    served.publish("shop", crate::testing::served("p", &limited(10)));
    view.tick(start + Duration::from_secs(2));
    assert!(view.decisions("shop").spent.contains_key(&key), "and lowered again, out again");

    // The window rolls: the target is back for every pod, and the new window counts afresh.
    SPEND_CLOCK.store(401 * hour, std::sync::atomic::Ordering::SeqCst);
    view.tick(start + Duration::from_secs(3));
    assert!(view.decisions("shop").spent.is_empty(), "a new window");
    report("pod-1", window + 1, 9.0);
    assert!(view.decisions("shop").spent.is_empty(), "$9 of the new window's $10");
}

#[tokio::test(start_paused = true)]
async fn one_pod_is_ordered_to_verify_each_target_and_its_result_is_published_and_forwarded() {
    use crate::configstream::VerifyResult;
    let f = fixture("  verify: {every: 1m}\n");
    let (sink, mut forwarded) = mpsc::channel(16);
    f.view.tick(f.start);
    let decisions = f.view.decisions("shop");
    assert_eq!(decisions.verify.len(), 2, "both targets");
    let order = decisions.verify[&f.b].order.clone().expect("b is ordered at once");
    assert_eq!(decisions.verify[&f.b].label, "b/m");
    assert_eq!((order.probe.prompt.as_str(), order.probe.max_tokens), ("Reply with OK.", 1));
    let orders_for =
        |pod: &str| decisions.verify.values().filter(|v| v.order.as_ref().is_some_and(|o| o.prober == pod)).count();
    assert_eq!(orders_for("pod-1") + orders_for("pod-2") + orders_for("pod-3"), 2, "one pod per target");
    // Followers' pods answer through the leader: the result is forwarded.
    f.view.follow(sink);
    let result = VerifyResult { id: order.probe.id, passed: true, class: None, message: None, latency_ms: 40 };
    let verified = BTreeMap::from([(f.b.clone(), result.clone())]);
    let evidence = Evidence { targets: &BTreeMap::new(), spend: &BTreeMap::new(), verified: &verified };
    f.view.observe("shop", &order.prober, &evidence, f.start + secs(1));
    let mut saw = None;
    while let Ok(message) = forwarded.try_recv() {
        if let Forwarded::Observe { verified, .. } = message {
            saw = Some(verified);
        }
    }
    assert_eq!(saw, Some(verified.clone()), "forwarded to the leader");
    f.view.unfollow();
    let decisions = f.view.decisions("shop");
    let b = &decisions.verify[&f.b];
    assert_eq!(b.order, None, "answered");
    assert_eq!(b.last.as_ref().map(|l| (l.passed, l.latency_ms)), Some((true, 40)));
    assert_eq!(f.view.verified(), [("shop".to_string(), "b/m".to_string(), true)]);
    // A stranger's word, or the same result again, changes nothing.
    f.view.observe("shop", "pod-9", &evidence, f.start + secs(2));
    assert_eq!(f.view.decisions("shop").verify[&f.b], *b);
    // The next probe is due a period after the result.
    f.view.tick(f.start + secs(60));
    assert_eq!(f.view.decisions("shop").verify[&f.b].order, None);
    f.view.tick(f.start + secs(61));
    assert!(f.view.decisions("shop").verify[&f.b].order.is_some());
}

#[tokio::test(start_paused = true)]
async fn a_follower_orders_no_probe_of_its_own_and_keeps_the_leader_s_schedule_when_it_takes_over() {
    use crate::configstream::VerifyOrder;
    use verify::{Order, Verification, Verified};
    let f = fixture("  verify: {every: 1m}\n");
    let (sink, _forwarded) = mpsc::channel(64);
    f.view.follow(sink);
    f.view.tick(f.start);
    // The leader probed b 10 s ago and has ordered a from pod-2.
    let heard = Verified { at_ms: spend::unix_ms() - 10_000, passed: true, class: None, message: None, latency_ms: 9 };
    let order = Order { prober: "pod-2".into(), probe: VerifyOrder { id: 42, ..VerifyOrder::default() } };
    let leaders = Decisions {
        verify: BTreeMap::from([
            (f.a.clone(), Verification { label: "a/m".into(), order: Some(order.clone()), last: None }),
            (f.b.clone(), Verification { label: "b/m".into(), order: None, last: Some(heard.clone()) }),
        ]),
        ..Decisions::default()
    };
    f.view.adopt("shop", leaders.clone());
    assert_eq!(f.view.decisions("shop").verify, leaders.verify, "the leader's orders reach this replica's pods");
    f.view.tick(f.start + secs(1));
    assert_eq!(f.view.decisions("shop").verify, leaders.verify, "and no order of its own");
    // The leader is gone: this replica orders a at once, and b a period after the leader heard it.
    f.view.unfollow();
    f.view.tick(f.start + secs(2));
    let own = f.view.decisions("shop");
    assert!(own.verify[&f.a].order.as_ref().is_some_and(|o| o.probe.id != 42), "a new order of its own");
    assert_eq!((own.verify[&f.b].order.as_ref(), own.verify[&f.b].last.as_ref()), (None, Some(&heard)));
    f.view.tick(f.start + secs(45));
    assert_eq!(f.view.decisions("shop").verify[&f.b].order, None);
    f.view.tick(f.start + secs(52));
    assert!(f.view.decisions("shop").verify[&f.b].order.is_some(), "due 60 s after the leader heard it");
}
