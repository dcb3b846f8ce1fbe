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
use k8s_openapi::jiff::Timestamp;
use kube::core::{Selector, SelectorExt};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::ConfigService;
use super::auth::Identity;
use crate::control::protocol::{
    Config, Fleet, FleetTarget, HEARTBEAT, Lines, Report, STREAM_IDLE, ServerMessage, line,
};
use crate::operator::fleet::{DecisionPhase, Decisions};
use crate::operator::served::{NamespacePolicies, ServedPolicy};
use crate::policy::BreakerScope;
use crate::server::BoxError;

/// How long a message may wait for a sidecar that does not read before the stream is ended.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Configurations remembered per stream, to resolve an acknowledgement to policy versions.
const HISTORY: usize = 4;
/// Reports a sidecar may send in a burst, and per second after it; more are dropped.
const REPORT_BURST: f64 = 20.0;
const REPORTS_PER_SECOND: f64 = 5.0;

/// The policies of `policies` whose selector matches `labels`, in name order.
pub fn select(policies: &NamespacePolicies, labels: &BTreeMap<String, String>) -> Vec<Arc<ServedPolicy>> {
    policies
        .policies
        .values()
        .filter(|policy| match &policy.selector {
            None => true,
            Some(selector) => Selector::try_from(selector.clone()).is_ok_and(|selector| selector.matches(labels)),
        })
        .cloned()
        .collect()
}

/// The fleet's decisions as one pod is to see them: about its targets, with its probe role.
fn pod_view(decisions: &Decisions, identities: &HashSet<String>, uid: &str) -> BTreeMap<String, (bool, bool, String)> {
    decisions
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
        .collect()
}

fn fleet_message(decisions: &Decisions, identities: &HashSet<String>, uid: &str, now: Instant) -> Fleet {
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
    Fleet { targets }
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
    tx: mpsc::Sender<Result<Frame<Bytes>, BoxError>>,
    /// Configurations sent, newest last: version and policy versions.
    history: VecDeque<(String, BTreeMap<String, String>)>,
    /// The fleet-scoped targets of the pod's policies.
    identities: HashSet<String>,
    /// The fleet view last sent.
    fleet_sent: Option<BTreeMap<String, (bool, bool, String)>>,
    /// The last refusal logged.
    rejection_logged: Option<String>,
    reports: Bucket,
}

impl Session {
    /// A session for `identity`, writing to `tx`.
    pub fn new(
        service: Arc<ConfigService>,
        identity: Identity,
        session: u64,
        tx: mpsc::Sender<Result<Frame<Bytes>, BoxError>>,
    ) -> Session {
        Session {
            service,
            identity,
            session,
            tx,
            history: VecDeque::new(),
            identities: HashSet::new(),
            fleet_sent: None,
            rejection_logged: None,
            reports: Bucket { tokens: REPORT_BURST, at: Instant::now() },
        }
    }

    async fn send(&self, message: &ServerMessage) -> bool {
        matches!(tokio::time::timeout(SEND_TIMEOUT, self.tx.send(Ok(Frame::data(line(message))))).await, Ok(Ok(())))
    }

    /// Sends the pod's configuration if it changed; `resume` is the version the sidecar says it
    /// serves, on a reconnect.
    async fn send_config(&mut self, policies: &NamespacePolicies, resume: Option<&str>) -> bool {
        let selected = select(policies, &self.identity.labels);
        let versions: BTreeMap<String, String> = selected.iter().map(|p| (p.name.clone(), p.version.clone())).collect();
        let config = Config::new(
            &self.identity.namespace,
            &self.identity.pod,
            selected.iter().map(|p| p.compiled.clone()).collect(),
        );
        if self.history.back().is_some_and(|(version, _)| *version == config.version) {
            return true;
        }
        self.history.push_back((config.version.clone(), versions.clone()));
        if self.history.len() > HISTORY {
            self.history.pop_front();
        }
        self.service.sidecars.update(&self.identity.uid, self.session, |sidecar| sidecar.sent = versions);
        self.identities = config
            .policies
            .iter()
            .filter(|policy| policy.breaker.scope == BreakerScope::Fleet)
            .flat_map(|policy| policy.targets().into_iter().map(|t| t.identity.clone()))
            .collect();
        self.service.fleet.join(&self.identity.namespace, &self.identity.uid, self.identities.clone(), Instant::now());
        let message = match resume {
            Some(version) if version == config.version => ServerMessage::Unchanged { version: config.version },
            _ => ServerMessage::Config(config),
        };
        self.send(&message).await
    }

    /// Sends the fleet's decisions on the pod's targets if they changed for it.
    async fn send_fleet(&mut self, decisions: &Decisions) -> bool {
        let view = pod_view(decisions, &self.identities, &self.identity.uid);
        if self.fleet_sent.as_ref() == Some(&view) {
            return true;
        }
        self.fleet_sent = Some(view);
        let message = fleet_message(decisions, &self.identities, &self.identity.uid, Instant::now());
        self.send(&ServerMessage::Fleet(message)).await
    }

    fn policies_of(&self, version: &str) -> Option<BTreeMap<String, String>> {
        self.history.iter().rev().find(|(v, _)| v == version).map(|(_, policies)| policies.clone())
    }

    fn take(&mut self, report: Report) {
        let (uid, session) = (self.identity.uid.clone(), self.session);
        if let Some(applied) = report.applied.as_deref().and_then(|version| self.policies_of(version)) {
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
            if let Some(policies) = self.policies_of(&rejected.version) {
                self.service
                    .sidecars
                    .update(&uid, session, |sidecar| sidecar.rejected = Some((policies, rejected.reason)));
            }
        }
        if !report.targets.is_empty() {
            let now = Instant::now();
            if self.reports.take(now) {
                self.service.fleet.observe(&self.identity.namespace, &uid, &report.targets, now);
            }
        }
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
        let mut lines = Lines::default();
        let current = policies.borrow_and_update().clone();
        let mut open = self.send_config(&current, resume.as_deref()).await;
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
                    open = self.send_config(&current, None).await;
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
                        match lines.push(data) {
                            Ok(complete) => {
                                for text in complete {
                                    match serde_json::from_slice::<Report>(&text) {
                                        Ok(report) => self.take(report),
                                        Err(error) => tracing::debug!(pod = %self.identity.pod, %error, "unreadable report"),
                                    }
                                }
                            }
                            Err(_) => break Some("a report was longer than the protocol allows"),
                        }
                    }
                    Some(Err(_)) | None => break None,
                },
                _ = heartbeat.tick() => {
                    if heard.elapsed() > STREAM_IDLE {
                        tracing::debug!(pod = %self.identity.pod, "no report for {}s; ending the stream", STREAM_IDLE.as_secs());
                        break None;
                    }
                    open = self.send(&ServerMessage::Heartbeat).await;
                }
            }
        };
        if let Some(reason) = goodbye {
            let _ = self.send(&ServerMessage::Goodbye { reason: reason.to_string() }).await;
        }
        if self.service.sidecars.disconnect(&self.identity.uid, self.session) {
            self.service.fleet.leave(&namespace, &self.identity.uid, Instant::now());
        }
        tracing::debug!(namespace = %namespace, pod = %self.identity.pod, "sidecar stream ended");
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
    use crate::control::protocol::TargetReport;
    use crate::operator::config::sidecars::Sidecars;
    use crate::operator::fleet::FleetView;
    use crate::operator::served::{ServedPolicies, ServedPolicy};
    use crate::testing::{DEMO_POLICY, compiled};

    type Up = mpsc::Sender<Result<Frame<Bytes>, std::convert::Infallible>>;
    type Down = mpsc::Receiver<Result<Frame<Bytes>, BoxError>>;

    struct Harness {
        service: Arc<ConfigService>,
        shutdown: watch::Sender<bool>,
    }

    fn harness() -> Harness {
        let served = Arc::new(ServedPolicies::new());
        let policy = compiled(DEMO_POLICY);
        let version = policy.digest();
        served.publish(
            "shop",
            ServedPolicy {
                name: "demo".into(),
                selector: None,
                compiled: policy,
                version,
                generation: 1,
                uid: "u".into(),
            },
        );
        let client =
            kube::Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().expect("url"))).expect("client");
        let (shutdown, stopped) = watch::channel(false);
        let fleet = Arc::new(FleetView::new(served.clone()));
        let (_, leader) = watch::channel(true);
        let service = Arc::new(ConfigService::new(
            client,
            served,
            fleet,
            Arc::new(Sidecars::default()),
            leader,
            "/nonexistent".into(),
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
        let (session, replaced) = h.service.sidecars.connect(&identity.uid, &identity.namespace, &identity.pod);
        let (tx, rx) = mpsc::channel(2);
        let (up, up_rx) = mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(8);
        let body = StreamBody::new(Box::pin(futures_util::stream::unfold(up_rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        })));
        let run =
            Session::new(h.service.clone(), identity, session, tx).run(body, resume.map(str::to_string), replaced);
        tokio::spawn(run);
        (up, rx)
    }

    async fn next(down: &mut Down) -> Option<ServerMessage> {
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
            config.policies[0].targets()[0].identity.clone(),
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
        let version = Config::version_of(&[compiled(DEMO_POLICY)]);
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
}
