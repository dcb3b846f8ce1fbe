//! One sidecar's stream, operator side: send the pod its configuration and every change of it,
//! the fleet's decisions on its targets, and heartbeats; read its acknowledgements and
//! evidence. Everything sent is the latest state from a `watch` channel, so a slow sidecar
//! makes the operator hold one message for it, never a queue.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Frame;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::jiff::Timestamp;
use kube::core::{Selector, SelectorExt};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::ConfigService;
use super::auth::Identity;
use crate::configstream::{
    Fleet, FleetTarget, HEARTBEAT, Lines, MAX_REPORT_BYTES, Protocol, Report, STREAM_IDLE, ServerMessage, VerifyOrder,
    WindowSpend, line, v1, v2,
};
use crate::net::body::BoxError;
use crate::operator::fleet::{DecisionPhase, Decisions, Evidence, Membership};
use crate::operator::served::{NamespacePolicies, ServedPolicy};
use crate::policy::BreakerScope;

/// How long a message may wait for a sidecar that does not read before the stream is ended.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Configurations remembered per stream, to resolve an acknowledgement to policy versions.
const HISTORY: usize = 4;
/// Reports a sidecar may send in a burst, and per second after it; more are dropped.
const REPORT_BURST: f64 = 20.0;
const REPORTS_PER_SECOND: f64 = 5.0;

fn selects(selector: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    match selector {
        None => true,
        Some(selector) => Selector::try_from(selector.clone()).is_ok_and(|selector| selector.matches(labels)),
    }
}

/// The policies of `policies` whose selector matches `labels`, in name order.
pub fn select(policies: &NamespacePolicies, labels: &BTreeMap<String, String>) -> Vec<Arc<ServedPolicy>> {
    policies.policies.values().filter(|policy| selects(policy.selector.as_ref(), labels)).cloned().collect()
}

/// The held policies of `policies` whose selector matches `labels`, in name order.
fn select_held(policies: &NamespacePolicies, labels: &BTreeMap<String, String>) -> Vec<String> {
    policies.held.iter().filter(|(_, held)| selects(held.selector.as_ref(), labels)).map(|(n, _)| n.clone()).collect()
}

/// The fleet's decisions as one pod is to see them: about its targets, with its probe role, its
/// spent spend windows, and the verification probes it is to send.
type PodView = (BTreeMap<String, (bool, bool, String)>, BTreeMap<String, i64>, BTreeMap<String, VerifyOrder>);

/// The verification probes `decisions` order from the pod `uid`.
fn orders(decisions: &Decisions, uid: &str) -> BTreeMap<String, VerifyOrder> {
    decisions
        .verify
        .iter()
        .filter_map(|(identity, verification)| {
            let order = verification.order.as_ref().filter(|order| order.prober == uid)?;
            Some((identity.clone(), order.probe.clone()))
        })
        .collect()
}

fn pod_view(decisions: &Decisions, identities: &HashSet<String>, spend_keys: &HashSet<String>, uid: &str) -> PodView {
    let targets = decisions
        .targets
        .iter()
        .filter(|(identity, _)| identities.contains(*identity))
        .map(|(identity, decision)| {
            let (open, probe) = match &decision.phase {
                DecisionPhase::Open { .. } => (true, false),
                DecisionPhase::HalfOpen { probers } => (false, probers.iter().any(|p| p == uid)),
            };
            (identity.clone(), (open, probe, decision.reason.clone()))
        })
        .collect();
    let spent = decisions
        .spent
        .iter()
        .filter(|(key, _)| spend_keys.contains(*key))
        .map(|(key, spent)| (key.clone(), spent.window))
        .collect();
    (targets, spent, orders(decisions, uid))
}

fn fleet_message(
    decisions: &Decisions,
    identities: &HashSet<String>,
    spend_keys: &HashSet<String>,
    uid: &str,
    now: Instant,
) -> Fleet {
    let targets = decisions
        .targets
        .iter()
        .filter(|(identity, _)| identities.contains(*identity))
        .map(|(identity, decision)| {
            let target = match &decision.phase {
                DecisionPhase::Open { until } => FleetTarget::Open {
                    retry_in_ms: u64::try_from(until.saturating_duration_since(now).as_millis()).unwrap_or(u64::MAX),
                    reason: decision.reason.clone(),
                },
                DecisionPhase::HalfOpen { probers } => {
                    FleetTarget::HalfOpen { probe: probers.iter().any(|p| p == uid), reason: decision.reason.clone() }
                }
            };
            (identity.clone(), target)
        })
        .collect();
    let spent = decisions
        .spent
        .iter()
        .filter(|(key, _)| spend_keys.contains(*key))
        .map(|(key, spent)| (key.clone(), WindowSpend { window: spent.window, usd: spent.usd }))
        .collect();
    Fleet { targets, spent, verify: orders(decisions, uid) }
}

/// A token bucket for a sidecar's reports.
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn take(&mut self, now: Instant) -> bool {
        self.tokens =
            (self.tokens + now.saturating_duration_since(self.at).as_secs_f64() * REPORTS_PER_SECOND).min(REPORT_BURST);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return true;
        }
        false
    }
}

/// One sidecar's stream.
pub struct Session {
    service: Arc<ConfigService>,
    identity: Identity,
    session: u64,
    protocol: Protocol,
    tx: mpsc::Sender<Result<Frame<Bytes>, BoxError>>,
    /// Configurations sent, newest last: version and policy versions.
    history: VecDeque<(String, BTreeMap<String, String>)>,
    /// The fleet-scoped targets of the pod's policies.
    identities: HashSet<String>,
    /// Every target of the pod's policies, when it sends verification probes: what it may
    /// verify.
    targets: HashSet<String>,
    /// Whether the sidecar sends verification probes (it said so when it connected).
    verifies: bool,
    /// The spend keys of the pod's policies' spend-limited targets.
    spend_keys: HashSet<String>,
    /// The fleet view last sent.
    fleet_sent: Option<PodView>,
    /// The last refusal logged.
    rejection_logged: Option<String>,
    reports: Bucket,
    /// The version the sidecar serves, as it said when it connected; used up by the first
    /// configuration sent.
    resume: Option<String>,
}

impl Session {
    /// A session for `identity` speaking `protocol`, writing to `tx`.
    pub fn new(
        service: Arc<ConfigService>,
        identity: Identity,
        session: u64,
        protocol: Protocol,
        tx: mpsc::Sender<Result<Frame<Bytes>, BoxError>>,
    ) -> Session {
        Session {
            service,
            identity,
            session,
            protocol,
            tx,
            history: VecDeque::new(),
            identities: HashSet::new(),
            targets: HashSet::new(),
            verifies: false,
            spend_keys: HashSet::new(),
            fleet_sent: None,
            rejection_logged: None,
            reports: Bucket { tokens: REPORT_BURST, at: Instant::now() },
            resume: None,
        }
    }

    /// The session of a sidecar that sends verification probes (or not).
    pub fn verifying(mut self, verifies: bool) -> Session {
        self.verifies = verifies;
        self
    }

    async fn send(&self, message: &ServerMessage<impl serde::Serialize>) -> bool {
        matches!(tokio::time::timeout(SEND_TIMEOUT, self.tx.send(Ok(Frame::data(line(message))))).await, Ok(Ok(())))
    }

    /// A message without a configuration, the same in every protocol version.
    async fn say(&self, message: ServerMessage<v2::Config>) -> bool {
        self.send(&message).await
    }

    /// Sends the pod's configuration if it changed (or `Unchanged` when it is the version the
    /// sidecar said it serves as it reconnected). Nothing is sent while the namespace is
    /// incomplete (this replica has not yet reconciled every policy there): the sidecar keeps
    /// what it has.
    async fn send_config(&mut self, policies: &NamespacePolicies) -> bool {
        if !policies.complete {
            return true;
        }
        let selected = select(policies, &self.identity.labels);
        let held = select_held(policies, &self.identity.labels);
        let versions: BTreeMap<String, String> = selected.iter().map(|p| (p.name.clone(), p.version.clone())).collect();
        let (namespace, pod) = (&self.identity.namespace, &self.identity.pod);
        let (version, message) = match self.protocol {
            Protocol::V2 => {
                let version = v2::Config::version_of(versions.iter().map(|(n, v)| (n.as_str(), v.as_str())), &held);
                let note = (policies.unwatched)
                    .then(|| format!("the operator does not serve namespace `{namespace}` (its `--namespaces`)"));
                let config = v2::Config {
                    version: version.clone(),
                    namespace: namespace.clone(),
                    pod: pod.clone(),
                    policies: selected.iter().map(|p| p.wire.clone()).collect(),
                    held,
                    note,
                };
                (version, line(&ServerMessage::Config(config)))
            }
            Protocol::V1 => {
                if !held.is_empty() {
                    // Protocol 1 cannot say "keep yours": send nothing rather than less.
                    tracing::debug!(%namespace, %pod, held = ?held, "holding back a configuration a protocol-1 sidecar would lose policies by");
                    return true;
                }
                let config = v1::Config::new(namespace, pod, selected.iter().map(|p| p.compiled.clone()).collect());
                (config.version.clone(), line(&ServerMessage::Config(config)))
            }
        };
        if self.history.back().is_some_and(|(sent, _)| *sent == version) {
            return true;
        }
        self.history.push_back((version.clone(), versions.clone()));
        if self.history.len() > HISTORY {
            self.history.pop_front();
        }
        self.service.sidecars.update(&self.identity.uid, self.session, |sidecar| sidecar.sent = versions);
        self.identities = selected
            .iter()
            .filter(|policy| policy.compiled.breaker.scope == BreakerScope::Fleet)
            .flat_map(|policy| policy.compiled.targets().into_iter().map(|t| t.identity.clone()))
            .collect();
        self.targets = selected
            .iter()
            .filter(|_| self.verifies)
            .flat_map(|policy| policy.compiled.targets().into_iter().map(|t| t.identity.clone()))
            .collect();
        self.spend_keys = selected
            .iter()
            .flat_map(|policy| {
                policy.compiled.targets().into_iter().filter_map(|t| Some(t.spend_limit.as_ref()?.key.clone()))
            })
            .collect();
        let member = Membership { identities: self.identities.clone(), targets: self.targets.clone() };
        self.service.fleet.join(&self.identity.namespace, &self.identity.uid, member, Instant::now());
        if self.resume.take().as_deref() == Some(version.as_str()) {
            return self.say(ServerMessage::Unchanged { version }).await;
        }
        matches!(tokio::time::timeout(SEND_TIMEOUT, self.tx.send(Ok(Frame::data(message)))).await, Ok(Ok(())))
    }

    /// Sends the fleet's decisions on the pod's targets if they changed for it.
    async fn send_fleet(&mut self, decisions: &Decisions) -> bool {
        let view = pod_view(decisions, &self.identities, &self.spend_keys, &self.identity.uid);
        if self.fleet_sent.as_ref() == Some(&view) {
            return true;
        }
        self.fleet_sent = Some(view);
        let message = fleet_message(decisions, &self.identities, &self.spend_keys, &self.identity.uid, Instant::now());
        self.say(ServerMessage::Fleet(message)).await
    }

    fn policies_of(&self, version: &str) -> Option<BTreeMap<String, String>> {
        self.history.iter().rev().find(|(v, _)| v == version).map(|(_, policies)| policies.clone())
    }

    /// Takes one report; `Err` says why the sidecar is cut off (it exceeds what a sidecar may
    /// send).
    fn take(&mut self, mut report: Report) -> Result<(), &'static str> {
        report.check_bounds()?;
        report.bound_reasons();
        let (uid, session) = (self.identity.uid.clone(), self.session);
        let refused: Vec<String> = report.rejected.as_ref().map(|r| r.policies.clone()).unwrap_or_default();
        if let Some(mut applied) = report.applied.as_deref().and_then(|version| self.policies_of(version)) {
            applied.retain(|name, _| !refused.contains(name));
            self.service.sidecars.update(&uid, session, |sidecar| {
                if sidecar.rejected.as_ref().is_some_and(|(rejected, _)| *rejected == applied) {
                    sidecar.rejected = None;
                }
                sidecar.applied = Some(applied);
            });
        }
        if let Some(rejected) = report.rejected {
            if self.rejection_logged.as_deref() != Some(rejected.version.as_str()) {
                tracing::warn!(namespace = %self.identity.namespace, pod = %self.identity.pod, version = %rejected.version,
                    reason = %rejected.reason, "a sidecar refused its configuration and keeps serving its last good one");
                self.rejection_logged = Some(rejected.version.clone());
            }
            if let Some(mut policies) = self.policies_of(&rejected.version) {
                if !refused.is_empty() {
                    policies.retain(|name, _| refused.contains(name));
                }
                self.service
                    .sidecars
                    .update(&uid, session, |sidecar| sidecar.rejected = Some((policies, rejected.reason)));
            }
        }
        // Evidence only about the targets of the pod's own policies counts.
        report.targets.retain(|identity, _| self.identities.contains(identity));
        report.spend.retain(|key, _| self.spend_keys.contains(key));
        report.verified.retain(|identity, _| self.targets.contains(identity));
        if !report.targets.is_empty() || !report.spend.is_empty() || !report.verified.is_empty() {
            let now = Instant::now();
            // Spend is a running count that a dropped report would lose, and a probe's result
            // answers one order: a flood is cut off by the bucket for its health evidence,
            // never for those.
            if !self.reports.take(now) {
                report.targets.clear();
            }
            let evidence = Evidence { targets: &report.targets, spend: &report.spend, verified: &report.verified };
            self.service.fleet.observe(&self.identity.namespace, &uid, &evidence, now);
        }
        Ok(())
    }

    /// Runs the stream until the sidecar goes, a newer stream replaces it, its token expires or
    /// the operator shuts down.
    pub async fn run<B>(mut self, mut body: B, resume: Option<String>, mut replaced: watch::Receiver<bool>)
    where
        B: http_body::Body<Data = Bytes> + Unpin,
    {
        let namespace = self.identity.namespace.clone();
        let mut policies = self.service.served.subscribe(&namespace);
        let mut decisions = self.service.fleet.subscribe(&namespace);
        let mut shutdown = self.service.shutdown.clone();
        let expires = self.identity.expires.map(|at| {
            let left = at.duration_since(Timestamp::now()).as_secs_f64().max(0.0);
            Instant::now() + Duration::from_secs_f64(left)
        });
        let mut heartbeat = tokio::time::interval_at(Instant::now() + HEARTBEAT, HEARTBEAT);
        let mut heard = Instant::now();
        let mut lines = Lines::new(MAX_REPORT_BYTES);
        self.resume = resume;
        let current = policies.borrow_and_update().clone();
        let mut open = self.send_config(&current).await;
        if open {
            let current = decisions.borrow_and_update().clone();
            open = self.send_fleet(&current).await;
        }
        let goodbye = loop {
            if !open {
                break None;
            }
            tokio::select! {
                _ = replaced.changed() => break Some("a newer stream of this pod replaced this one"),
                _ = shutdown.changed() => break Some("the operator is shutting down"),
                () = sleep_until(expires) => break Some("the token expired; reconnect with the current one"),
                Ok(()) = policies.changed() => {
                    let current = policies.borrow_and_update().clone();
                    open = self.send_config(&current).await;
                    if open {
                        let current = decisions.borrow_and_update().clone();
                        open = self.send_fleet(&current).await;
                    }
                }
                Ok(()) = decisions.changed() => {
                    let current = decisions.borrow_and_update().clone();
                    open = self.send_fleet(&current).await;
                }
                frame = body.frame() => match frame {
                    Some(Ok(frame)) => {
                        let Some(data) = frame.data_ref() else { continue };
                        heard = Instant::now();
                        let complete = match lines.push(data) {
                            Ok(complete) => complete,
                            Err(_) => break Some(self.cut_off("a report was longer than the protocol allows")),
                        };
                        let mut cut = None;
                        for text in complete {
                            let taken = serde_json::from_slice::<Report>(&text)
                                .map_err(|_| "a report was not one the protocol defines")
                                .and_then(|report| self.take(report));
                            if let Err(why) = taken {
                                cut = Some(self.cut_off(why));
                                break;
                            }
                        }
                        if cut.is_some() {
                            break cut;
                        }
                    }
                    Some(Err(_)) | None => break None,
                },
                _ = heartbeat.tick() => {
                    if heard.elapsed() > STREAM_IDLE {
                        tracing::debug!(pod = %self.identity.pod, "no report for {}s; ending the stream", STREAM_IDLE.as_secs());
                        break None;
                    }
                    open = self.say(ServerMessage::Heartbeat).await;
                }
            }
        };
        if let Some(reason) = goodbye {
            let _ = self.say(ServerMessage::Goodbye { reason: reason.to_string() }).await;
        }
        if self.service.sidecars.disconnect(&self.identity.uid, self.session) {
            self.service.fleet.leave(&namespace, &self.identity.uid, Instant::now());
        }
        tracing::debug!(namespace = %namespace, pod = %self.identity.pod, "sidecar stream ended");
    }
}

impl Session {
    /// Ends a sidecar's stream for what it sent, and counts it; every other stream goes on.
    fn cut_off(&self, why: &'static str) -> &'static str {
        tracing::warn!(namespace = %self.identity.namespace, pod = %self.identity.pod, reason = why,
            "cut off a sidecar's stream for what it sent");
        self.service.refusals.add(1, &[opentelemetry::KeyValue::new("reason", why)]);
        why
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use http_body_util::StreamBody;

    use super::*;
    use crate::configstream::TargetReport;
    use crate::operator::fleet::FleetView;
    use crate::operator::served::ServedPolicies;
    use crate::operator::service::sidecars::Sidecars;
    use crate::testing::{CLUSTER_POLICY, served};

    type Up = mpsc::Sender<Result<Frame<Bytes>, std::convert::Infallible>>;
    type Down = mpsc::Receiver<Result<Frame<Bytes>, BoxError>>;

    struct Harness {
        service: Arc<ConfigService>,
        shutdown: watch::Sender<bool>,
    }

    /// A service whose namespace `shop` is listed and serves `chat`.
    fn harness() -> Harness {
        let harness = empty_harness();
        harness.service.served.listed(None, [("shop".to_string(), "chat".to_string())]);
        harness.service.served.publish("shop", served("chat", CLUSTER_POLICY));
        harness
    }

    /// A service that has listed nothing yet: a replica just started.
    fn empty_harness() -> Harness {
        let served = Arc::new(ServedPolicies::new());
        let client =
            kube::Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().expect("url"))).expect("client");
        let (shutdown, stopped) = watch::channel(false);
        let fleet = Arc::new(FleetView::new(served.clone()));
        let (_, leader) = watch::channel(true);
        let service = Arc::new(ConfigService::new(
            client,
            crate::operator::service::Shared { served, fleet, sidecars: Arc::new(Sidecars::default()), leader },
            "/nonexistent".into(),
            &crate::telemetry::Metrics::new("backstop-test").expect("metrics"),
            stopped,
        ));
        Harness { service, shutdown }
    }

    fn identity(expires_in: Option<Duration>) -> Identity {
        Identity {
            namespace: "shop".into(),
            pod: "web-1".into(),
            uid: "uid-1".into(),
            labels: BTreeMap::new(),
            expires: expires_in.map(|d| Timestamp::now() + k8s_openapi::jiff::SignedDuration::try_from(d).expect("d")),
        }
    }

    /// Starts a session; returns the sidecar's ends: its reports and the operator's messages.
    fn open(h: &Harness, identity: Identity, resume: Option<&str>) -> (Up, Down) {
        open_with(h, identity, resume, Protocol::V2)
    }

    fn open_with(h: &Harness, identity: Identity, resume: Option<&str>, protocol: Protocol) -> (Up, Down) {
        let (session, replaced) = h.service.sidecars.connect(&identity.uid, &identity.namespace, &identity.pod);
        let (tx, rx) = mpsc::channel(2);
        let (up, up_rx) = mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(8);
        let body = StreamBody::new(Box::pin(futures_util::stream::unfold(up_rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        })));
        let run = Session::new(h.service.clone(), identity, session, protocol, tx).run(
            body,
            resume.map(str::to_string),
            replaced,
        );
        tokio::spawn(run);
        (up, rx)
    }

    async fn next(down: &mut Down) -> Option<ServerMessage<v2::Config>> {
        let frame = down.recv().await?.ok()?;
        let data = frame.into_data().ok()?;
        Some(serde_json::from_slice(&data).expect("a message"))
    }

    async fn report(up: &Up, report: &Report) {
        up.send(Ok(Frame::data(line(report)))).await.expect("open");
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_sends_the_config_takes_acks_and_ends_when_the_token_expires() {
        let h = harness();
        let (up, mut down) = open(&h, identity(Some(Duration::from_secs(30))), None);
        let Some(ServerMessage::Config(config)) = next(&mut down).await else { panic!("the configuration first") };
        assert_eq!(config.policies.len(), 1);
        assert!(matches!(next(&mut down).await, Some(ServerMessage::Fleet(_))));
        report(&up, &Report { applied: Some(config.version.clone()), ..Report::default() }).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        let sidecar = h.service.sidecars.all().remove(0);
        assert_eq!(sidecar.applied.as_ref().map(|a| a.len()), Some(1), "the acknowledgement counts");
        // Heartbeats while nothing changes; the sidecar's reports keep the stream alive.
        for _ in 0..2 {
            assert_eq!(next(&mut down).await, Some(ServerMessage::Heartbeat));
            report(&up, &Report::default()).await;
        }
        let targets = BTreeMap::from([(
            config.policies[0].compile("shop").expect("compiles").targets()[0].identity.clone(),
            TargetReport { failures: 9, ..TargetReport::default() },
        )]);
        report(&up, &Report { targets, ..Report::default() }).await;
        let Some(ServerMessage::Fleet(fleet)) = next(&mut down).await else { panic!("the fleet's decision") };
        assert_eq!(fleet.targets.len(), 1, "its own report took the target out");
        let mut last = None;
        while let Some(message) = next(&mut down).await {
            last = Some(message);
        }
        assert_eq!(
            last,
            Some(ServerMessage::Goodbye { reason: "the token expired; reconnect with the current one".into() })
        );
        assert!(h.service.sidecars.is_empty(), "gone from the registry");
    }

    #[tokio::test(start_paused = true)]
    async fn a_resumed_session_sends_no_resend_a_newer_one_replaces_it_and_a_silent_one_ends() {
        let h = harness();
        let chat = served("chat", CLUSTER_POLICY);
        let version = v2::Config::version_of([("chat", chat.version.as_str())], &[]);
        let (_up, mut first) = open(&h, identity(None), Some(&version));
        assert_eq!(next(&mut first).await, Some(ServerMessage::Unchanged { version: version.clone() }));
        let (up, mut second) = open(&h, identity(None), None);
        assert!(matches!(next(&mut second).await, Some(ServerMessage::Config(_))));
        let mut last = None;
        while let Some(message) = next(&mut first).await {
            last = Some(message);
        }
        assert_eq!(
            last,
            Some(ServerMessage::Goodbye { reason: "a newer stream of this pod replaced this one".into() })
        );
        // The newer one never reports: it is called dead after STREAM_IDLE.
        let started = Instant::now();
        while next(&mut second).await.is_some() {}
        assert!(started.elapsed() >= STREAM_IDLE && started.elapsed() < STREAM_IDLE + HEARTBEAT * 2);
        drop(up);
        h.shutdown.send_replace(true);
    }

    #[tokio::test(start_paused = true)]
    async fn a_fresh_replica_sends_nothing_until_the_namespace_is_complete_then_holds_what_it_cannot_serve() {
        let h = empty_harness();
        let (up, mut down) = open(&h, identity(None), Some("v-the-sidecar-serves"));
        // Not listed yet: no configuration (the sidecar keeps its own), only the fleet view.
        assert!(matches!(next(&mut down).await, Some(ServerMessage::Fleet(_))));
        let served_store = h.service.served.clone();
        served_store.listed(None, [("shop".to_string(), "chat".to_string()), ("shop".to_string(), "gone".to_string())]);
        served_store.publish("shop", served("chat", CLUSTER_POLICY));
        tokio::time::sleep(Duration::from_millis(10)).await;
        report(&up, &Report::default()).await;
        assert!(
            tokio::time::timeout(Duration::from_secs(1), next(&mut down)).await.is_err(),
            "still incomplete: `gone` is not reconciled"
        );
        // `gone` cannot be compiled (its Secret was deleted before this replica started).
        served_store.hold("shop", "gone", None, "Secret `llm-keys` not found");
        let Some(ServerMessage::Config(config)) = next(&mut down).await else { panic!("the configuration") };
        assert_eq!(config.held, ["gone"], "the sidecar is told to keep its copy");
        assert_eq!(config.policies.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["chat"]);
        drop(up);
        h.shutdown.send_replace(true);
    }

    #[tokio::test(start_paused = true)]
    async fn a_sidecar_of_the_previous_release_gets_protocol_1_and_never_a_configuration_with_less() {
        let h = harness();
        let (up, mut down) = open_with(&h, identity(None), None, Protocol::V1);
        let frame = down.recv().await.expect("a message").expect("data");
        let text = frame.into_data().expect("data");
        let Ok(ServerMessage::Config(config)) = serde_json::from_slice::<ServerMessage<v1::Config>>(&text) else {
            panic!("a protocol-1 configuration: {}", String::from_utf8_lossy(&text))
        };
        assert_eq!(config.policies.len(), 1);
        assert_eq!(config.policies[0].source, "shop/chat");
        assert!(matches!(next(&mut down).await, Some(ServerMessage::Fleet(_))));
        // A policy becomes held: protocol 1 cannot say "keep yours", so nothing is sent.
        h.service.served.hold("shop", "other", None, "Secret gone");
        report(&up, &Report::default()).await;
        assert!(tokio::time::timeout(Duration::from_secs(1), next(&mut down)).await.is_err());
        drop(up);
        h.shutdown.send_replace(true);
    }

    #[tokio::test(start_paused = true)]
    async fn a_sidecar_sending_garbage_or_oversized_reports_is_cut_off_and_the_others_go_on() {
        let h = harness();
        let (bad, mut bad_down) = open(&h, identity(None), None);
        let mut other = identity(None);
        (other.pod, other.uid) = ("web-2".into(), "uid-2".into());
        let (good, mut good_down) = open(&h, other, None);
        for down in [&mut bad_down, &mut good_down] {
            assert!(matches!(next(down).await, Some(ServerMessage::Config(_))));
            assert!(matches!(next(down).await, Some(ServerMessage::Fleet(_))));
        }
        bad.send(Ok(Frame::data(Bytes::from_static(b"{not json}\n")))).await.expect("open");
        let mut last = None;
        while let Some(message) = next(&mut bad_down).await {
            last = Some(message);
        }
        assert_eq!(last, Some(ServerMessage::Goodbye { reason: "a report was not one the protocol defines".into() }));
        // Another pod's stream is unaffected.
        report(&good, &Report::default()).await;
        assert_eq!(next(&mut good_down).await, Some(ServerMessage::Heartbeat));
        // One line longer than a report may be: cut off too.
        let (huge, mut huge_down) = open(&h, identity(None), None);
        assert!(matches!(next(&mut huge_down).await, Some(ServerMessage::Config(_))));
        let long = vec![b'x'; crate::configstream::MAX_REPORT_BYTES + 1];
        let _ = huge.send(Ok(Frame::data(Bytes::from(long)))).await;
        let mut last = None;
        while let Some(message) = next(&mut huge_down).await {
            last = Some(message);
        }
        assert_eq!(
            last,
            Some(ServerMessage::Goodbye { reason: "a report was longer than the protocol allows".into() })
        );
        drop(good);
        h.shutdown.send_replace(true);
    }
}
