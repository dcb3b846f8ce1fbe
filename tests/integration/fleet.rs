//! The config stream and fleet health end to end: the real `backstop operator` on a real API
//! server, and real `backstop sidecar` processes whose tokens are pod-bound ServiceAccount
//! tokens that API server issued for Pod objects it holds.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use serde_json::Value;

use crate::cluster::{Cluster, cluster};
use crate::operator::{CANARY, put_secret, ready, until, version};
use crate::operator_process::{Operator, operator_identity, pki};
use crate::sidecar_process::SidecarProcess;
use crate::support::{Fault, Upstream};
use backstop::policy::{FallbackPolicy, TargetState};

const AUDIENCE: &str = "backstop";

/// A policy `name` with a mock `primary` answering `reply` and a mock `backup`.
fn policy(namespace: &str, name: &str, reply: &str, extra: &str) -> String {
    format!(
        "apiVersion: backstop.dev/v1alpha1\nkind: FallbackPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  providers:\n    - {{name: primary, type: mock, mock: {{reply: '{reply}'}}}}\n    - {{name: backup, type: mock, mock: {{reply: backup}}}}\n  routes:\n    - model: chat\n      chain: [{{provider: primary, model: m}}, {{provider: backup, model: m}}]\n{extra}"
    )
}

/// An upstream that fails three times and then answers, and a policy `chat` in `namespace` that
/// falls from it (`flaky/m`) to a mock `backup`, its breaker opening after three failures for
/// `open_for`.
async fn flaky_policy(namespace: &str, open_for: &str) -> (Upstream, String) {
    let upstream =
        Upstream::scripted(vec![Fault::status(500), Fault::status(500), Fault::status(500)], Fault::Ok).await;
    let yaml = format!(
        "apiVersion: backstop.dev/v1alpha1\nkind: FallbackPolicy\nmetadata: {{name: chat, namespace: {namespace}}}\nspec:\n  providers:\n    - {{name: flaky, type: openai-compatible, baseUrl: '{}'}}\n    - {{name: backup, type: mock, mock: {{reply: backup}}}}\n  routes:\n    - model: chat\n      chain: [{{provider: flaky, model: m}}, {{provider: backup, model: m}}]\n  retry: {{attempts: 1}}\n  circuitBreaker: {{consecutiveFailures: 3, openFor: {open_for}}}\n",
        upstream.base_url()
    );
    (upstream, yaml)
}

struct Setup {
    cluster: Arc<Cluster>,
    namespace: String,
    operator_ns: String,
    kubeconfig: std::path::PathBuf,
    dir: tempfile::TempDir,
}

async fn setup(prefix: &str) -> Option<Setup> {
    let cluster = cluster().await?;
    cluster.install_crd().await;
    let (operator_ns, kubeconfig) = operator_identity(&cluster).await;
    let namespace = cluster.namespace(prefix).await;
    let dir = tempfile::tempdir().expect("dir");
    Some(Setup { cluster, namespace, operator_ns, kubeconfig, dir })
}

impl Setup {
    async fn operator(&self, identity: &str) -> Operator {
        Operator::start(&self.kubeconfig, identity, &self.operator_ns, &[&self.namespace]).await
    }

    /// A pod `name` labelled `app=web` and its sidecar, streaming from `config`.
    async fn sidecar(&self, config: SocketAddr, name: &str) -> SidecarProcess {
        let (_, token) = self.cluster.pod_with_token(&self.namespace, "app", name, &[("app", "web")], AUDIENCE).await;
        SidecarProcess::start(config, &pki().ca(), &token, &self.dir.path().join(name), &[]).await
    }

    async fn apply(&self, yaml: &str) -> Instant {
        let path = self.dir.path().join("policy.yaml");
        std::fs::write(&path, yaml).expect("write");
        let applied = Instant::now();
        match self.cluster.kubectl(&["apply", "--server-side", "--force-conflicts", "-f", &path.to_string_lossy()]) {
            Ok(_) => {}
            // Without kubectl in the assets, the same server-side apply through the API.
            Err(error) if error.starts_with("cannot run kubectl") => self.cluster.apply_yaml(yaml).await,
            Err(error) => panic!("kubectl apply: {error}"),
        }
        applied
    }

    async fn policy_until(
        &self,
        name: &str,
        within: Duration,
        check: impl Fn(&FallbackPolicy) -> bool,
    ) -> FallbackPolicy {
        until(&self.cluster, &self.namespace, name, within, check).await
    }

    async fn events(&self) -> Vec<Event> {
        Api::<Event>::namespaced(self.cluster.client().await, &self.namespace)
            .list(&ListParams::default())
            .await
            .expect("events")
            .items
    }
}

fn target_state(policy: &FallbackPolicy, label: &str) -> Option<TargetState> {
    policy.status.as_ref()?.targets.as_ref()?.iter().find(|t| t.target == label).map(|t| t.state)
}

fn sidecars(policy: &FallbackPolicy) -> (u32, u32, u32) {
    let s = policy.status.as_ref().and_then(|s| s.sidecars.clone()).unwrap_or_default();
    (s.connected, s.current, s.rejected)
}

async fn text_of(sidecar: &SidecarProcess) -> String {
    let answer = sidecar.chat("chat").await;
    if answer.status == 200 {
        answer.text()
    } else {
        format!("{} {}", answer.status, String::from_utf8_lossy(&answer.body))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sidecar_applies_a_policy_change_and_an_invalid_change_leaves_them_serving_the_last_good_one() {
    let Some(s) = setup("bs-stream").await else { return };
    let operator = s.operator("stream").await;
    let mut pods = Vec::new();
    for name in ["web-1", "web-2", "web-3"] {
        pods.push(s.sidecar(operator.config, name).await);
    }
    // Connected, but no policy selects the pods yet: ready, and calls pass through (here to a
    // port where nothing listens), saying why.
    for pod in &pods {
        pod.until(Duration::from_secs(10), "connected", || async { pod.admin("/readyz").await.status == 200 }).await;
        let answer = pod.chat("chat").await;
        assert_eq!((answer.status, answer.header("x-backstop-passthrough")), (502, Some("true")));
        let message = answer.json()["error"]["message"].as_str().unwrap_or_default().to_string();
        assert!(
            message.contains(&format!("no FallbackPolicy in namespace `{}` selects pod `web-", s.namespace)),
            "{message}"
        );
    }

    for reply in ["first", "second"] {
        let applied = s.apply(&policy(&s.namespace, "chat", reply, "")).await;
        let served = s
            .policy_until("chat", Duration::from_secs(15), |p| {
                ready(p).is_some_and(|r| r.0 == "True") && sidecars(p) == (3, 3, 0)
            })
            .await;
        eprintln!("kubectl apply -> all 3 sidecars acknowledged `{reply}` in {:?}", applied.elapsed());
        assert!(version(&served).is_some());
        for pod in &pods {
            assert_eq!(text_of(pod).await, reply);
            let config = pod.admin("/config").await.json();
            assert_eq!(config["source"], format!("{}/chat", s.namespace));
            assert_ne!(config["digest"], Value::Null);
        }
    }

    // Invalid: refused with the field path; the sidecars keep the last good version.
    s.apply(
        &policy(&s.namespace, "chat", "third", "")
            .replace("{provider: backup, model: m}", "{provider: nope, model: m}"),
    )
    .await;
    let refused = s.policy_until("chat", Duration::from_secs(15), |p| ready(p).is_some_and(|r| r.0 == "False")).await;
    assert!(ready(&refused).expect("ready").2.contains("`nope` is not defined"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for pod in &pods {
        assert_eq!(text_of(pod).await, "second", "the last good policy is still served");
    }
    assert_eq!(sidecars(&refused).0, 3);
    let listed = s.cluster.kubectl(&["get", "fbp", "-n", &s.namespace]).unwrap_or_default();
    eprintln!("{listed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_failing_at_one_sidecar_is_avoided_by_every_sidecar_and_comes_back_after_recovery() {
    let Some(s) = setup("bs-fleet").await else { return };
    let (upstream, yaml) = flaky_policy(&s.namespace, "3s").await;
    s.apply(&yaml).await;
    let operator = s.operator("fleet").await;
    let (a, b, c) = (
        s.sidecar(operator.config, "web-a").await,
        s.sidecar(operator.config, "web-b").await,
        s.sidecar(operator.config, "web-c").await,
    );
    s.policy_until("chat", Duration::from_secs(15), |p| sidecars(p) == (3, 3, 0)).await;

    // Only `a` meets the failures.
    for _ in 0..3 {
        assert_eq!(text_of(&a).await, "backup");
    }
    let failed = Instant::now();
    let ejected = s
        .policy_until("chat", Duration::from_secs(10), |p| target_state(p, "flaky/m") == Some(TargetState::Open))
        .await;
    eprintln!("third failure at one sidecar -> Open in status in {:?}", failed.elapsed());
    let degraded = ejected.status.as_ref().and_then(|s| s.degraded);
    assert_eq!(degraded, Some(1));
    let reason = ejected.status.as_ref().and_then(|s| s.targets.as_ref()).and_then(|t| t[0].reason.clone());
    assert!(reason.as_deref().unwrap_or_default().contains("3 failures in a row"), "{reason:?}");
    // The others never send it a request while it is out: they skip it for the fleet.
    let seen = upstream.count();
    for pod in [&b, &c] {
        let answer = pod.chat("chat").await;
        assert_eq!(answer.text(), "backup");
        assert_eq!(answer.header("x-backstop-fallback-reason"), Some("flaky/m=fleetOpen"));
    }
    assert_eq!(upstream.count(), seen, "no request reached the ejected target");
    let events = s.events().await;
    let ejection = events.iter().find(|e| e.reason.as_deref() == Some("TargetEjected")).expect("a TargetEjected event");
    assert!(
        ejection.note.as_deref().unwrap_or_default().starts_with("flaky/m is out of rotation: 3 failures in a row")
    );

    // After openFor, one pod probes; the healthy upstream closes it for all.
    let restored = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for pod in [&a, &b, &c] {
            let _ = pod.chat("chat").await;
        }
        let current = s.cluster.client().await;
        let policy = Api::<FallbackPolicy>::namespaced(current, &s.namespace).get("chat").await.expect("policy");
        if target_state(&policy, "flaky/m") == Some(TargetState::Closed) {
            break;
        }
        assert!(Instant::now() < deadline, "never restored: {:?}\n{}", policy.status, operator.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("open -> closed again in {:?}", restored.elapsed());
    for pod in [&a, &b, &c] {
        pod.until(Duration::from_secs(5), "answers from the recovered target", || async {
            text_of(pod).await == "from upstream"
        })
        .await;
    }
    let events = s.events().await;
    assert_eq!(events.iter().filter(|e| e.reason.as_deref() == Some("TargetEjected")).count(), 1, "not repeated");
    assert!(events.iter().any(|e| e.reason.as_deref() == Some("TargetRestored")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_override_drains_a_target_in_every_pod_and_ends_on_time() {
    let Some(s) = setup("bs-drain").await else { return };
    let operator = s.operator("drain").await;
    let (a, b) = (s.sidecar(operator.config, "web-a").await, s.sidecar(operator.config, "web-b").await);
    s.apply(&policy(&s.namespace, "chat", "primary", "")).await;
    s.policy_until("chat", Duration::from_secs(15), |p| sidecars(p) == (2, 2, 0)).await;
    for pod in [&a, &b] {
        assert_eq!(text_of(pod).await, "primary");
    }
    let until_time = k8s_openapi::jiff::Timestamp::now() + Duration::from_secs(6);
    let drain = format!(
        "  overrides:\n    - {{target: primary/m, state: ForcedOpen, until: '{until_time}', reason: incident 42}}\n"
    );
    let applied = s.apply(&policy(&s.namespace, "chat", "primary", &drain)).await;
    for pod in [&a, &b] {
        pod.until(Duration::from_secs(5), "drained", || async { text_of(pod).await == "backup" }).await;
    }
    eprintln!("override applied -> drained in every pod in {:?}", applied.elapsed());
    let answer = a.chat("chat").await;
    assert_eq!(answer.header("x-backstop-fallback-reason"), Some("primary/m=forcedOpen"));
    let drained = s
        .policy_until("chat", Duration::from_secs(5), |p| target_state(p, "primary/m") == Some(TargetState::ForcedOpen))
        .await;
    let entry = drained.status.and_then(|s| s.targets).expect("targets")[0].clone();
    assert_eq!(entry.reason.as_deref(), Some("override: incident 42"));
    // It ends at `until` by each sidecar's clock, with nothing else applied.
    for pod in [&a, &b] {
        pod.until(Duration::from_secs(12), "the override ended", || async { text_of(pod).await == "primary" }).await;
    }
    let late = k8s_openapi::jiff::Timestamp::now().duration_since(until_time).as_secs_f64();
    eprintln!("override until -> both pods back on primary {late:.2}s after it");
    assert!((0.0..2.0).contains(&late), "ended {late}s after its time");
    s.policy_until("chat", Duration::from_secs(5), |p| target_state(p, "primary/m") == Some(TargetState::Closed)).await;
    let events = s.events().await;
    assert!(events.iter().any(|e| e.reason.as_deref() == Some("TargetRestored")
        && e.note.as_deref() == Some("primary/m is back in rotation: its override ended")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_ride_out_an_operator_outage_and_converge_when_it_returns() {
    let Some(s) = setup("bs-outage").await else { return };
    let mut operator = s.operator("outage").await;
    let config = operator.config;
    let a = s.sidecar(config, "web-a").await;
    let b = s.sidecar(config, "web-b").await;
    s.apply(&policy(&s.namespace, "chat", "one", "")).await;
    s.policy_until("chat", Duration::from_secs(15), |p| sidecars(p) == (2, 2, 0)).await;

    operator.signal("-KILL").await;
    assert_eq!(text_of(&a).await, "one", "serving on without the operator");
    // `b` restarts while the operator is down: it serves what it had persisted.
    let (token_file, state_dir) = (b.token_file.clone(), b.state_dir.clone());
    b.kill().await;
    let b = SidecarProcess::start_with_files(config, &pki().ca(), &token_file, &state_dir, &[]).await;
    assert_eq!(b.admin("/readyz").await.status, 200, "ready from the persisted configuration");
    assert_eq!(text_of(&b).await, "one");
    assert!(b.log().contains("serving the persisted configuration"), "{}", b.log());
    // A new pod with nothing persisted and no policy file: not ready, saying why, until the
    // start-up bound (default 10 s) passes; ready then, passing calls through.
    let c = s.sidecar(config, "web-c").await;
    c.until(Duration::from_secs(10), "says why it is not ready", || async {
        let answer = c.admin("/readyz").await;
        answer.status == 503
            && String::from_utf8_lossy(&answer.body).contains(&format!("waiting for the operator at https://{config}"))
    })
    .await;
    let passed = c.chat("chat").await;
    assert_eq!((passed.status, passed.header("x-backstop-passthrough")), (502, Some("true")));
    assert!(String::from_utf8_lossy(&passed.body).contains("waiting for the operator"));

    // A change made while the operator is down reaches everyone when it returns.
    s.apply(&policy(&s.namespace, "chat", "two", "")).await;
    let restarted = Instant::now();
    let _operator =
        Operator::start_on(&s.kubeconfig, "outage", &s.operator_ns, &[&s.namespace], &config.to_string(), &[]).await;
    for pod in [&a, &b, &c] {
        pod.until(Duration::from_secs(30), "converged", || async { text_of(pod).await == "two" }).await;
    }
    eprintln!("operator back -> all 3 sidecars on the new policy in {:?}", restarted.elapsed());
    s.policy_until("chat", Duration::from_secs(10), |p| sidecars(p) == (3, 3, 0)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_gets_only_its_own_namespace_and_selection_wrong_tokens_get_401_and_no_key_leaks() {
    let Some(s) = setup("bs-tenant-a").await else { return };
    let other = s.cluster.namespace("bs-tenant-b").await;
    put_secret(&s.cluster, &s.namespace, CANARY).await;
    let secret_policy = policy(&s.namespace, "chat", "tenant a", "").replace(
        "{name: backup, type: mock, mock: {reply: backup}}",
        "{name: backup, type: openai, apiKey: {secretKeyRef: {name: llm-keys, key: openai}}}",
    );
    s.apply(&secret_policy).await;
    s.apply(
        &policy(&s.namespace, "other-app", "not for web", "  selector: {matchLabels: {app: billing}}\n")
            .replace("model: chat", "model: billing"),
    )
    .await;
    s.apply(&policy(&other, "chat", "tenant b", "")).await;
    let operator = Operator::start(&s.kubeconfig, "tenants", &s.operator_ns, &[&s.namespace, &other]).await;
    let a = s.sidecar(operator.config, "web-a").await;
    let (_, token_b) = s.cluster.pod_with_token(&other, "app", "web-b", &[("app", "web")], AUDIENCE).await;
    let b = SidecarProcess::start(operator.config, &pki().ca(), &token_b, &s.dir.path().join("b"), &[]).await;
    for (pod, reply) in [(&a, "tenant a"), (&b, "tenant b")] {
        pod.until(Duration::from_secs(15), "served its own policy", || async { text_of(pod).await == reply }).await;
    }
    let config = b.admin("/config").await.json();
    assert_eq!(config["source"], format!("{other}/chat"), "only its own namespace's policy: {config}");
    let config = a.admin("/config").await.json();
    assert_eq!(config["source"], format!("{}/chat", s.namespace), "the billing policy selects other pods: {config}");
    assert_eq!(a.chat("billing").await.status, 404);

    // Tokens the operator must refuse: another audience, bound to no pod, none at all.
    let (_, wrong_audience) = s
        .cluster
        .pod_with_token(&s.namespace, "app", "web-x", &[("app", "web")], "https://kubernetes.default.svc")
        .await;
    let unbound = s.cluster.unbound_token(&s.namespace, "app", AUDIENCE).await;
    for (name, token, expected) in
        [("x", wrong_audience.as_str(), "401"), ("y", unbound.as_str(), "403"), ("z", "", "401")]
    {
        let pod = SidecarProcess::start(operator.config, &pki().ca(), token, &s.dir.path().join(name), &[]).await;
        // Why, in `/health` (`/readyz` says so too until the start-up bound passes).
        pod.until(Duration::from_secs(10), "refused", || async {
            let health = pod.admin("/health").await.json();
            health["controlPlane"]["lastError"]
                .as_str()
                .is_some_and(|error| error.contains(&format!("refused the stream ({expected}")))
        })
        .await;
        let passed = pod.chat("chat").await;
        assert_eq!(
            (passed.status, passed.header("x-backstop-passthrough")),
            (502, Some("true")),
            "a refused sidecar has no policy: it passes calls through"
        );
        if name == "z" {
            // The kubelet writes the pod's token: the sidecar reads the file again at its next
            // attempt and is served.
            let (_, token) = s.cluster.pod_with_token(&s.namespace, "app", "web-z", &[("app", "web")], AUDIENCE).await;
            std::fs::write(&pod.token_file, token).expect("write");
            pod.until(Duration::from_secs(40), "served with the new token", || async {
                text_of(&pod).await == "tenant a"
            })
            .await;
        }
    }

    // The key went to the pod that uses it, and nowhere anyone can read.
    let (_, metrics) = operator.get("/metrics").await;
    let status =
        serde_json::to_string(&s.policy_until("chat", Duration::from_secs(5), |_| true).await.status).expect("json");
    let events = serde_json::to_string(&s.events().await).expect("json");
    let a_config = String::from_utf8_lossy(&a.admin("/config").await.body).into_owned();
    let a_health = String::from_utf8_lossy(&a.admin("/health").await.body).into_owned();
    for (place, text) in [
        ("operator log", operator.log()),
        ("operator metrics", metrics),
        ("status", status),
        ("events", events),
        ("sidecar log", a.log()),
        ("sidecar /config", a_config),
        ("sidecar /health", a_health),
        ("other tenant's config", String::from_utf8_lossy(&b.admin("/config").await.body).into_owned()),
    ] {
        assert!(!text.contains(CANARY), "the key leaked into the {place}:\n{text}");
    }
    let persisted = std::fs::read_to_string(a.state_dir.join("config.json")).expect("persisted");
    assert!(persisted.contains(CANARY), "the pod that uses the key keeps it to serve without the operator");
    let b_persisted = std::fs::read_to_string(b.state_dir.join("config.json")).expect("persisted");
    assert!(!b_persisted.contains(CANARY), "another namespace's pod never receives it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_fleet_view_and_only_the_leader_writes_status() {
    let Some(s) = setup("bs-replicas").await else { return };
    let (upstream, yaml) = flaky_policy(&s.namespace, "60s").await;
    s.apply(&yaml).await;
    // Both replicas run as the operator's ServiceAccount, each with its own token for peers.
    let account = format!("backstop-operator-{}", s.operator_ns);
    let token = s.cluster.unbound_token(&s.operator_ns, &account, AUDIENCE).await;
    let token_file = s.dir.path().join("operator-token");
    std::fs::write(&token_file, token).expect("write");
    let extra = ["--peer-token-file".to_string(), token_file.display().to_string()];
    let start = |identity: &'static str| {
        let (kubeconfig, lease_ns, namespace, extra) =
            (s.kubeconfig.clone(), s.operator_ns.clone(), s.namespace.clone(), extra.clone());
        async move { Operator::start_on(&kubeconfig, identity, &lease_ns, &[&namespace], "127.0.0.1:0", &extra).await }
    };
    let leader = start("leader").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !leader.log().contains("\"leads\":true") {
        assert!(Instant::now() < deadline, "the first replica never led:\n{}", leader.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let follower = start("follower").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !follower.log().contains("forwarding this replica's sidecars' evidence to the leader") {
        assert!(Instant::now() < deadline, "the second replica never linked to the leader:\n{}", follower.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let a = s.sidecar(leader.config, "web-a").await;
    let b = s.sidecar(follower.config, "web-b").await;
    // The leader's status counts the follower's sidecar too.
    s.policy_until("chat", Duration::from_secs(15), |p| sidecars(p) == (2, 2, 0)).await;

    // The failures happen at the follower's pod; the leader's pod avoids the target.
    for _ in 0..3 {
        assert_eq!(text_of(&b).await, "backup");
    }
    s.policy_until("chat", Duration::from_secs(10), |p| target_state(p, "flaky/m") == Some(TargetState::Open)).await;
    let seen = upstream.count();
    let answer = a.chat("chat").await;
    assert_eq!(answer.text(), "backup");
    assert_eq!(answer.header("x-backstop-fallback-reason"), Some("flaky/m=fleetOpen"));
    assert_eq!(upstream.count(), seen);
    // One writer: the leader recorded the ejection; the follower wrote nothing.
    assert!(leader.log().contains("TargetEjected"), "{}", leader.log());
    assert!(
        !follower.log().contains("TargetEjected") && !follower.log().contains("status written"),
        "{}",
        follower.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_writes_its_fleet_status_again_over_a_write_of_a_replica_that_led_before() {
    let Some(s) = setup("bs-overwrite").await else { return };
    let (_upstream, yaml) = flaky_policy(&s.namespace, "120s").await;
    s.apply(&yaml).await;
    let operator = s.operator("overwrite").await;
    let pod = s.sidecar(operator.config, "web-1").await;
    s.policy_until("chat", Duration::from_secs(15), |p| sidecars(p) == (1, 1, 0)).await;
    for _ in 0..3 {
        assert_eq!(text_of(&pod).await, "backup");
    }
    s.policy_until("chat", Duration::from_secs(10), |p| target_state(p, "flaky/m") == Some(TargetState::Open)).await;
    let ejections = || operator.log().matches("TargetEjected").count();
    assert_eq!(ejections(), 1, "{}", operator.log());

    // A replica that led until a moment ago writes once more, after the leader's last write,
    // under the same field manager: the fleet as it saw it, without this pod's sidecar or its
    // evidence.
    let api = Api::<FallbackPolicy>::namespaced(s.cluster.client().await, &s.namespace);
    let stale = serde_json::json!({
        "apiVersion": "backstop.dev/v1alpha1",
        "kind": "FallbackPolicy",
        "status": {
            "sidecars": {"connected": 0, "current": 0, "rejected": 0},
            "targets": [{"target": "flaky/m", "state": "Closed"}, {"target": "backup/m", "state": "Closed"}],
            "degraded": 0,
            "conditions": [],
        },
    });
    api.patch_status("chat", &PatchParams::apply("backstop-fleet").force(), &Patch::Apply(&stale))
        .await
        .expect("the stale write");
    let overwritten = Instant::now();
    assert_eq!(sidecars(&api.get("chat").await.expect("policy")), (0, 0, 0));
    // Nothing in the fleet changes, so only checking the status it holds brings it back.
    let fixed = s
        .policy_until("chat", Duration::from_secs(20), |p| {
            sidecars(p) == (1, 1, 0) && target_state(p, "flaky/m") == Some(TargetState::Open)
        })
        .await;
    let took = overwritten.elapsed();
    assert_eq!(fixed.status.as_ref().and_then(|s| s.degraded), Some(1));
    assert!(took >= Duration::from_secs(4), "not before the watch could have lagged: {took:?}");
    assert!(operator.log().contains("the fleet status shows another writer's fields"), "{}", operator.log());
    // The ejection was announced once: the other writer's `Closed` was never this leader's.
    assert_eq!(ejections(), 1, "{}", operator.log());
    assert!(!operator.log().contains("TargetRestored"), "{}", operator.log());

    // Its own writes, read back, are not taken for another writer's: no second rewrite.
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(operator.log().matches("the fleet status shows another writer's fields").count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_stops_at_a_target_s_spend_limit_within_a_report_and_takes_it_back_when_the_window_rolls() {
    let Some(s) = setup("bs-spend").await else { return };
    // Each answer of `primary` is 3 output tokens at $100,000 per million: $0.30. The limit,
    // $3 per 20 s window, is 10 answers across the fleet, fewer than 4 at any one pod.
    let window = Duration::from_secs(20);
    let yaml = policy(&s.namespace, "chat", "one two three", "").replace(
        "chain: [{provider: primary, model: m}, {provider: backup, model: m}]",
        "chain: [{provider: primary, model: m, price: {input: 0, output: 100000}, spendLimit: {per: 20s, usd: 3}}, {provider: backup, model: m}]",
    );
    s.apply(&yaml).await;
    let operator = s.operator("spend").await;
    let pods = [
        s.sidecar(operator.config, "web-a").await,
        s.sidecar(operator.config, "web-b").await,
        s.sidecar(operator.config, "web-c").await,
    ];
    s.policy_until("chat", Duration::from_secs(15), |p| sidecars(p) == (3, 3, 0)).await;

    // Start at the beginning of a window, so that it does not roll mid-test.
    let period = window.as_millis() as u64;
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as u64;
    tokio::time::sleep(Duration::from_millis(period - now_ms % period + 200)).await;
    let started = Instant::now();

    // Round-robin, 10 requests a second, until every pod has passed `primary` over.
    let mut answered: Vec<Instant> = Vec::new();
    let mut passed_over = [false; 3];
    let mut sent = 0;
    while !passed_over.iter().all(|p| *p) {
        assert!(
            started.elapsed() < Duration::from_secs(12),
            "the fleet never stopped: {} answers from primary\n{}",
            answered.len(),
            operator.log()
        );
        let i = sent % 3;
        let answer = pods[i].chat("chat").await;
        assert_eq!(answer.status, 200);
        match answer.header("x-backstop-provider") {
            Some("primary") => answered.push(Instant::now()),
            _ => {
                assert_eq!(answer.header("x-backstop-fallback-reason"), Some("primary/m=spendLimit"));
                passed_over[i] = true;
            }
        }
        sent += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stopped = started.elapsed();
    assert!(answered.len() >= 10, "the limit was reached: {} answers", answered.len());
    // Overshoot: answers after the one that reached $3, all within a report interval (1 s) and
    // the operator's word reaching the pods.
    let reached = answered[9];
    let overshoot = answered.len() - 10;
    let late = answered.last().expect("answers").duration_since(reached);
    eprintln!(
        "spend limit: {} answers from primary ($0.30 each against $3), {overshoot} after the limit, the last {late:?} after it; every pod stopped {stopped:?} into the window",
        answered.len()
    );
    assert!(late <= Duration::from_millis(2_500), "the fleet overshot for {late:?} ({overshoot} answers)");

    let out = s
        .policy_until("chat", Duration::from_secs(10), |p| {
            target_state(p, "primary/m") == Some(TargetState::SpendLimit)
        })
        .await;
    let reason =
        out.status.as_ref().and_then(|s| s.targets.as_ref()).and_then(|t| t[0].reason.clone()).unwrap_or_default();
    assert!(reason.starts_with("spendLimit: $") && reason.ends_with("of $3.00 spent in this 20s window"), "{reason}");
    let events = s.events().await;
    assert!(events.iter().any(|e| e.reason.as_deref() == Some("TargetEjected")
        && e.note.as_deref().unwrap_or_default().starts_with("primary/m is out of rotation: spendLimit")));

    // The window rolls: every pod takes `primary` back by its own clock.
    for pod in &pods {
        pod.until(window + Duration::from_secs(5), "primary answers in the next window", || async {
            pod.chat("chat").await.header("x-backstop-provider") == Some("primary")
        })
        .await;
    }
    eprintln!("the next window: primary answers again {:?} after the first pod stopped", started.elapsed() - stopped);
    s.policy_until("chat", Duration::from_secs(10), |p| target_state(p, "primary/m") == Some(TargetState::Closed))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_are_verified_once_per_period_fleet_wide_shown_in_status_and_never_open_a_breaker() {
    let Some(s) = setup("bs-verify").await else { return };
    let receiver = crate::otlp::Receiver::start().await;
    // The backup's key is refused twice, then it answers: a key rotated back into service.
    let backup = Upstream::scripted(vec![Fault::status(401), Fault::status(401)], Fault::Ok).await;
    put_secret(&s.cluster, &s.namespace, "sk-backup-SECRET").await;
    let yaml = format!(
        "apiVersion: backstop.dev/v1alpha1\nkind: FallbackPolicy\nmetadata: {{name: chat, namespace: {}}}\nspec:\n  providers:\n    - {{name: primary, type: mock, mock: {{reply: primary}}}}\n    - {{name: backup, type: openai-compatible, baseUrl: '{}', apiKey: {{secretKeyRef: {{name: llm-keys, key: openai}}}}}}\n  routes:\n    - model: chat\n      chain: [{{provider: primary, model: m, verify: {{enabled: false}}}}, {{provider: backup, model: up-model}}]\n  circuitBreaker: {{consecutiveFailures: 1}}\n  verify: {{every: 10s, prompt: Reply with OK., maxTokens: 1}}\n",
        s.namespace,
        backup.base_url()
    );
    s.apply(&yaml).await;
    let operator = s.operator("verify").await;
    // Two pods, both exporting telemetry: whichever the operator chooses sends the probe.
    let mut pods = Vec::new();
    for name in ["web-a", "web-b"] {
        let (_, token) = s.cluster.pod_with_token(&s.namespace, "app", name, &[("app", "web")], AUDIENCE).await;
        let dir = s.dir.path().join(name);
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("token"), &token).expect("token");
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_backstop"));
        command
            .args(["sidecar", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .arg("--control-plane")
            .arg(format!("https://{}", operator.config))
            .arg("--control-plane-ca")
            .arg(pki().ca())
            .arg("--token-file")
            .arg(dir.join("token"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{}", receiver.addr))
            .env("OTEL_METRIC_EXPORT_INTERVAL", "60000");
        pods.push(SidecarProcess::from_command(command).await);
    }
    s.policy_until("chat", Duration::from_secs(15), |p| sidecars(p) == (2, 2, 0)).await;

    let verification = |p: &FallbackPolicy| {
        let targets = p.status.as_ref()?.targets.clone()?;
        let condition = p.status.as_ref()?.conditions.iter().find(|c| c.type_ == "BackupsVerified").cloned()?;
        Some((targets, condition))
    };
    let failed = s
        .policy_until("chat", Duration::from_secs(30), |p| verification(p).is_some_and(|(_, c)| c.status == "False"))
        .await;
    let (targets, condition) = verification(&failed).expect("verification");
    assert_eq!(condition.reason, "VerificationFailed");
    assert!(condition.message.contains("backup/up-model (authError"), "{}", condition.message);
    assert_eq!(targets[0].verified, None, "the primary is left out");
    let verified = targets[1].verified.clone().expect("the backup is verified");
    assert_eq!(verified.class.as_deref(), Some("authError"));
    // The refused probes opened nothing, though one counted failure would open its breaker.
    assert_eq!(targets[1].state, TargetState::Closed);
    for pod in &pods {
        let health = crate::support::get(&format!("http://{}/health", pod.admin)).await.json();
        let backup_health =
            health["targets"].as_array().expect("targets").iter().find(|t| t["target"] == "backup/up-model").cloned();
        let backup_health = backup_health.expect("the backup in /health");
        assert_eq!(
            (backup_health["state"].as_str(), &backup_health["failures"]),
            (Some("closed"), &serde_json::json!({})),
            "{backup_health}"
        );
    }
    let events = s.events().await;
    assert!(events.iter().any(|e| {
        e.reason.as_deref() == Some("VerificationFailed")
            && e.note
                .as_deref()
                .unwrap_or_default()
                .starts_with("backup/up-model failed its verification probe: authError")
    }));
    let metrics = operator.get("/metrics").await.1;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("backstop_target_verified{") && l.contains("backup/up-model") && l.ends_with(" 0")),
        "{metrics}"
    );

    // The third probe, two periods after the first, passes.
    let passed = s
        .policy_until("chat", Duration::from_secs(40), |p| verification(p).is_some_and(|(_, c)| c.status == "True"))
        .await;
    let (targets, _) = verification(&passed).expect("verification");
    assert_eq!(targets[1].verified.as_ref().map(|v| v.outcome), Some(backstop::policy::VerifyOutcome::Passed));
    if let Ok(listed) = s.cluster.kubectl(&["get", "fbp", "chat", "-n", &s.namespace]) {
        let rows: Vec<Vec<&str>> = listed.lines().map(|l| l.split_whitespace().collect()).collect();
        let column = rows[0].iter().position(|c| *c == "VERIFIED").expect("a Verified column");
        assert_eq!(rows[1].get(column), Some(&"True"), "{listed}");
    }
    let events = s.events().await;
    assert!(events.iter().any(|e| e.reason.as_deref() == Some("TargetVerified")
        && e.note.as_deref().unwrap_or_default().starts_with("backup/up-model answered its verification probe")));

    // One probe per period for the whole fleet, each a real request with the pod's key.
    let received = backup.received();
    assert_eq!(
        received.len(),
        3,
        "two pods, one probe per period: {:?}",
        received.iter().map(|r| r.at).collect::<Vec<_>>()
    );
    let spacing = received[2].at.duration_since(received[0].at);
    assert!(spacing >= Duration::from_secs(19), "a probe every 10 s, not one per pod: {spacing:?}");
    eprintln!("verification: probes {:?} apart over two periods, from two pods", spacing);
    for probe in &received {
        assert_eq!(probe.body["messages"], serde_json::json!([{"role": "user", "content": "Reply with OK."}]));
        assert_eq!((probe.body["max_tokens"].as_u64(), probe.body["model"].as_str()), (Some(1), Some("up-model")));
        assert_eq!(probe.headers.get("authorization").and_then(|v| v.to_str().ok()), Some("Bearer sk-backup-SECRET"));
    }
    // Marked in telemetry, and no key anywhere a user looks.
    let deadline = Instant::now() + Duration::from_secs(10);
    let span = loop {
        let found = receiver.spans().into_iter().find(|span| span.name == "verify up-model");
        if let Some(span) = found {
            break span;
        }
        assert!(Instant::now() < deadline, "no verification span reached the collector");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let attributes = crate::otlp::attributes(&span.attributes);
    assert_eq!(attributes.get("backstop.verify").map(String::as_str), Some("true"), "{attributes:?}");
    assert_eq!(attributes.get("backstop.target").map(String::as_str), Some("backup/up-model"));
    let shown = format!("{}{}{}", serde_json::to_string(&passed.status).expect("json"), metrics, operator.log());
    assert!(!shown.contains("sk-backup-SECRET"), "a key leaked");
    for pod in &pods {
        assert!(!pod.log().contains("sk-backup-SECRET"), "a key leaked into a sidecar's log");
    }
}
