//! The operator against a real API server: the CRD and its CEL rules, `kubectl explain` and
//! `kubectl get`, and the real `backstop operator` binary, running under a ServiceAccount token
//! bound to the RBAC in `deploy/`, turning policies Ready (or not) as users see them.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::time::Instant;

use crate::cluster::{Cluster, cluster};
use crate::operator_process::{Operator, operator_identity};
use backstop::policy::FallbackPolicy;

pub(crate) const CANARY: &str = "sk-canary-8c1f0e5b7a2d4f6e";

fn policy(namespace: &str, name: &str, extra: &str) -> String {
    format!(
        "apiVersion: backstop.dev/v1alpha1\nkind: FallbackPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  providers:\n    - {{name: primary, type: openai, apiKey: {{secretKeyRef: {{name: llm-keys, key: openai}}}}}}\n    - {{name: spare, type: mock}}\n  routes:\n    - model: chat\n      chain: [{{provider: primary, model: gpt-4o}}, {{provider: spare, model: m}}]\n{extra}"
    )
}

pub(crate) async fn put_secret(cluster: &Cluster, namespace: &str, key: &str) {
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "llm-keys", "namespace": namespace},
        "stringData": {"openai": key},
    }))
    .expect("secret");
    Api::<Secret>::namespaced(cluster.client().await, namespace)
        .patch("llm-keys", &PatchParams::apply("backstop-tests").force(), &Patch::Apply(&secret))
        .await
        .expect("apply secret");
}

/// Waits until `check` holds for the policy, returning it; fails after `within`.
pub(crate) async fn until(
    cluster: &Cluster,
    namespace: &str,
    name: &str,
    within: Duration,
    check: impl Fn(&FallbackPolicy) -> bool,
) -> FallbackPolicy {
    let api = Api::<FallbackPolicy>::namespaced(cluster.client().await, namespace);
    let deadline = Instant::now() + within;
    loop {
        let policy = api.get(name).await.expect("the policy");
        if check(&policy) {
            return policy;
        }
        assert!(
            Instant::now() < deadline,
            "policy {namespace}/{name} never reached the state; status: {:?}",
            policy.status
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) fn ready(policy: &FallbackPolicy) -> Option<(String, String, String)> {
    let condition = policy.status.as_ref()?.conditions.iter().find(|c| c.type_ == "Ready")?;
    Some((condition.status.clone(), condition.reason.clone(), condition.message.clone()))
}

pub(crate) fn version(policy: &FallbackPolicy) -> Option<String> {
    policy.status.as_ref()?.compiled_version.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_crd_is_accepted_and_its_rules_refuse_broken_policies_with_their_messages() {
    let Some(cluster) = cluster().await else { return };
    cluster.install_crd().await;
    let namespace = cluster.namespace("bs-crd").await;
    // Sent as written, not through the Rust types, so that the API server is what refuses it.
    let resource = ApiResource::erase::<FallbackPolicy>(&());
    let api = Api::<DynamicObject>::namespaced_with(cluster.client().await, &namespace, &resource);
    let create = |yaml: String| {
        let api = api.clone();
        async move {
            let object: DynamicObject = serde_yaml_ng::from_str(&yaml).expect("test document parses");
            api.create(&PostParams::default(), &object).await.map_err(|e| e.to_string())
        }
    };
    create(policy(&namespace, "good", "")).await.expect("a valid policy is stored");
    let base = policy(&namespace, "bad", "");
    let cases = [
        (base.replace("{name: spare, type: mock}", "{name: primary, type: mock}"), "Duplicate value"),
        (
            base.replace("{secretKeyRef: {name: llm-keys, key: openai}}", "{value: a, env: B}"),
            "set exactly one of `value`, `env` or `secretKeyRef`",
        ),
        (base.replace("model: gpt-4o}", "model: gpt-4o, timeout: 0s}"), "must be greater than zero"),
        (base.replace("model: gpt-4o}", "model: gpt-4o, timeout: soon}"), "should match"),
        (
            base.replace(
                "{provider: spare, model: m}",
                "{provider: spare, model: m, group: [{provider: spare, model: m}]}",
            ),
            "set either `group`, or `provider` and `model`",
        ),
        (
            base.replace("{provider: spare, model: m}", "{group: [{provider: spare, model: m, weight: 0}]}"),
            "should be greater than or equal to 1",
        ),
        (base.replace("type: mock", "type: openia"), "Unsupported value"),
        (base.replace("{name: spare, type: mock}", "{name: spare, type: openai-compatible}"), "`baseUrl` is required"),
        (
            base.replace(
                "      chain: [{provider: primary, model: gpt-4o}, {provider: spare, model: m}]\n",
                "      chain: []\n",
            ),
            "should have at least 1 items",
        ),
        (base.clone() + "  retry: {backoff: {base: 2s, max: 1s}}\n", "`max` must not be shorter than `base`"),
        (
            base.replace(
                "{provider: spare, model: m}",
                "{group: [{provider: spare, model: m}], adapt: {set: {seed: 1}}}",
            ),
            "set either `group`, or `provider` and `model`",
        ),
        (
            base.replace("{provider: spare, model: m}", "{provider: spare, model: m, adapt: {remove: [topQ]}}"),
            "Unsupported value",
        ),
        (
            base.replace("{provider: spare, model: m}", "{provider: spare, model: m, adapt: {set: {temperature: 3}}}"),
            "should be less than or equal to 2",
        ),
        (
            base.replace("{provider: spare, model: m}", "{group: [{provider: spare, model: m}], verify: {}}"),
            "set either `group`, or `provider` and `model`",
        ),
        (base.clone() + "  verify: {every: 48h}\n", "must be at most 24h"),
        (base.clone() + "  verify: {every: 5s}\n", "must be at least 10s"),
        (
            base.replace("{provider: spare, model: m}", "{provider: spare, model: m, verify: {maxTokens: 0}}"),
            "should be greater than or equal to 1",
        ),
    ];
    for (yaml, expected) in cases {
        let error = create(yaml).await.expect_err(expected);
        assert!(error.contains(expected), "expected {expected:?} in {error}");
    }
    let explained = cluster.kubectl(&["explain", "fallbackpolicy.spec.routes"]).expect("kubectl explain");
    assert!(explained.contains("Model aliases the app may send"), "{explained}");
    assert!(explained.contains("onContextWindowExceeded"), "{explained}");
    // kubectl wraps descriptions: compare with the whitespace folded.
    let explain = |path: &str| {
        let text = cluster.kubectl(&["explain", path]).expect("kubectl explain");
        text.split_whitespace().collect::<Vec<_>>().join(" ")
    };
    let adapt = explain("fallbackpolicy.spec.routes.chain.adapt");
    assert!(adapt.contains("after they are translated into its API") && adapt.contains("systemPrompt"), "{adapt}");
    let shadow = explain("fallbackpolicy.spec.routes.shadow");
    assert!(shadow.contains("never delayed or changed") && shadow.contains("captureContent"), "{shadow}");
    let listed = cluster.kubectl(&["get", "fbp", "-n", &namespace]).expect("kubectl get");
    let header: Vec<&str> = listed.lines().next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(header, ["NAME", "READY", "REASON", "ROUTES", "SIDECARS", "DEGRADED", "VERIFIED", "AGE"], "{listed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_compiles_policies_into_status_keeps_the_last_good_one_and_follows_secrets() {
    let Some(cluster) = cluster().await else { return };
    cluster.install_crd().await;
    let (operator_ns, kubeconfig) = operator_identity(&cluster).await;
    let namespace = cluster.namespace("bs-policies").await;
    let operator = Operator::start(&kubeconfig, "solo", &operator_ns, &[&namespace]).await;
    let long = Duration::from_secs(20);

    // A policy whose Secret does not exist yet: not ready, and why.
    cluster.apply_yaml(&policy(&namespace, "chat", "")).await;
    let waiting = until(&cluster, &namespace, "chat", long, |p| ready(p).is_some()).await;
    let (status, reason, message) = ready(&waiting).expect("condition");
    assert_eq!((status.as_str(), reason.as_str()), ("False", "SecretNotFound"), "{message}");
    assert!(message.contains("`spec.providers[0].apiKey`: Secret `llm-keys` not found"), "{message}");
    assert_eq!(version(&waiting), None, "nothing good to serve yet");

    // The Secret appears: Ready within seconds, at this generation.
    let applied = Instant::now();
    put_secret(&cluster, &namespace, CANARY).await;
    let good = until(&cluster, &namespace, "chat", long, |p| ready(p).is_some_and(|r| r.0 == "True")).await;
    eprintln!("Secret created -> Ready in {:?}", applied.elapsed());
    let status = good.status.clone().expect("status");
    assert_eq!(status.observed_generation, good.metadata.generation);
    assert_eq!(status.routes, Some(1));
    assert_eq!(ready(&good).map(|r| r.1), Some("Compiled".to_string()));
    let first = version(&good).expect("a compiled version");

    // An invalid generation: not ready, with the field path; the last good version stays.
    cluster
        .apply_yaml(
            &policy(&namespace, "chat", "").replace("{provider: spare, model: m}", "{provider: nope, model: m}"),
        )
        .await;
    let bad = until(&cluster, &namespace, "chat", long, |p| {
        p.status.as_ref().and_then(|s| s.observed_generation) == p.metadata.generation
            && ready(p).is_some_and(|r| r.0 == "False")
    })
    .await;
    let (_, reason, message) = ready(&bad).expect("condition");
    assert_eq!(reason, "InvalidPolicy");
    assert!(
        message.contains("`spec.routes[0].chain[1].provider`: `nope` is not defined in `spec.providers`"),
        "{message}"
    );
    assert!(message.contains(&format!("sidecars keep version {first}")), "{message}");
    assert_eq!(version(&bad).as_deref(), Some(first.as_str()), "the last good version is still the one served");

    // Fixed again, then the key rotated: a new compiled version.
    cluster.apply_yaml(&policy(&namespace, "chat", "")).await;
    until(&cluster, &namespace, "chat", long, |p| ready(p).is_some_and(|r| r.0 == "True")).await;
    put_secret(&cluster, &namespace, "sk-rotated-key-0000").await;
    let rotated = until(&cluster, &namespace, "chat", long, |p| version(p).is_some_and(|v| v != first)).await;
    assert_eq!(ready(&rotated).map(|r| r.0), Some("True".to_string()));

    // Events say what happened, once each; no key anywhere users can see.
    let events = Api::<Event>::namespaced(cluster.client().await, &namespace)
        .list(&ListParams::default())
        .await
        .expect("events");
    let reasons: Vec<String> = events.items.iter().filter_map(|e| e.reason.clone()).collect();
    for expected in ["SecretMissing", "Compiled", "Rejected"] {
        assert!(reasons.iter().any(|r| r == expected), "no {expected} event in {reasons:?}");
    }
    let (code, metrics) = operator.get("/metrics").await;
    assert_eq!(code, 200);
    assert!(metrics.contains("backstop_operator_reconciles_total{result=\"compiled\""), "{metrics}");
    assert!(metrics.contains("backstop_operator_leader{") && metrics.contains("} 1"), "{metrics}");
    assert_eq!(operator.get("/readyz").await.0, 200);
    let status = serde_json::to_string(&rotated.status).expect("status");
    let events = serde_json::to_string(&events.items).expect("events");
    for (place, text) in [("status", status), ("events", events), ("log", operator.log()), ("metrics", metrics)] {
        assert!(!text.contains(CANARY), "the key leaked into the {place}:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_operators_only_the_leader_writes_and_a_standby_takes_over_within_the_lease() {
    let Some(cluster) = cluster().await else { return };
    cluster.install_crd().await;
    let (operator_ns, kubeconfig) = operator_identity(&cluster).await;
    let namespace = cluster.namespace("bs-leader").await;
    put_secret(&cluster, &namespace, CANARY).await;
    let mut first = Operator::start(&kubeconfig, "first", &operator_ns, &[&namespace]).await;
    let leases = Api::<Lease>::namespaced(cluster.client().await, &operator_ns);
    let holder =
        || async { leases.get_opt("backstop-operator").await.expect("lease").and_then(|l| l.spec?.holder_identity) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while holder().await.as_deref() != Some("first") {
        assert!(Instant::now() < deadline, "the first operator never took the lease");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let second = Operator::start(&kubeconfig, "second", &operator_ns, &[&namespace]).await;
    cluster.apply_yaml(&policy(&namespace, "a", "")).await;
    until(&cluster, &namespace, "a", Duration::from_secs(20), |p| ready(p).is_some_and(|r| r.0 == "True")).await;
    // Both reconcile it, but only the leader writes: its status write is in its log alone. (The
    // API server can show the status before the leader has logged that its write returned.)
    let deadline = Instant::now() + Duration::from_secs(10);
    while !second.log().contains("serving a new compiled version") || !first.log().contains("status written") {
        assert!(
            Instant::now() < deadline,
            "the standby never compiled the policy, or the leader never wrote its status:\n{}\n{}",
            second.log(),
            first.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!second.log().contains("status written"), "a standby wrote status:\n{}", second.log());
    assert!(
        second.get("/metrics").await.1.contains("backstop_operator_leader{otel_scope_name=\"backstop-operator\"} 0")
    );

    // The leader dies without releasing the lease; the standby takes over within its 3 s.
    let killed = Instant::now();
    first.signal("-KILL").await;
    let deadline = killed + Duration::from_secs(3) + Duration::from_secs(3);
    while holder().await.as_deref() != Some("second") {
        assert!(Instant::now() < deadline, "no takeover in time:\n{}", second.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("leader killed -> standby holds the lease in {:?}", killed.elapsed());
    // And keeps status written: a new policy becomes Ready through the new leader.
    cluster.apply_yaml(&policy(&namespace, "b", "")).await;
    until(&cluster, &namespace, "b", Duration::from_secs(20), |p| ready(p).is_some_and(|r| r.0 == "True")).await;
    // Its log line follows the write the watch already saw.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !second.log().contains("status written") {
        assert!(
            Instant::now() < deadline,
            "the new leader logged no status write:
{}",
            second.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_serves_only_the_namespaces_it_is_given() {
    let Some(cluster) = cluster().await else { return };
    cluster.install_crd().await;
    let (operator_ns, kubeconfig) = operator_identity(&cluster).await;
    let (watched, other) = (cluster.namespace("bs-watched").await, cluster.namespace("bs-other").await);
    for namespace in [&watched, &other] {
        put_secret(&cluster, namespace, CANARY).await;
        cluster.apply_yaml(&policy(namespace, "p", "")).await;
    }
    let _operator = Operator::start(&kubeconfig, "scoped", &operator_ns, &[&watched]).await;
    until(&cluster, &watched, "p", Duration::from_secs(20), |p| ready(p).is_some_and(|r| r.0 == "True")).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let untouched = Api::<FallbackPolicy>::namespaced(cluster.client().await, &other).get("p").await.expect("policy");
    assert!(untouched.status.is_none(), "a namespace outside the scope was reconciled: {:?}", untouched.status);
}
