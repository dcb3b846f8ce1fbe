//! Do no harm: whatever the control plane does, the real operator and sidecar binaries against a
//! real API server keep an app's calls answered: an operator that restarts while a policy's
//! Secret is gone sends sidecars nothing less than they have; a pod that no policy selects, or
//! whose sidecar reaches no operator, passes its calls through with its own credentials; a
//! sidecar that can no longer verify the operator says so and keeps its configuration; Secrets
//! are read only as far as the operator is allowed.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams};
use serde_json::json;
use tokio::time::Instant;

use crate::cluster::{Cluster, cluster};
use crate::operator::{put_secret, ready, until};
use crate::operator_process::{Operator, operator_identity, pki};
use crate::sidecar_process::SidecarProcess;
use crate::support::{Fault, Upstream, prometheus_sample};

const AUDIENCE: &str = "backstop";

/// A policy whose primary is a mock answering `reply` and whose key comes from Secret
/// `llm-keys` (so that deleting the Secret makes the policy uncompilable).
fn keyed_policy(namespace: &str, reply: &str) -> String {
    format!(
        "apiVersion: backstop.dev/v1alpha1\nkind: FallbackPolicy\nmetadata: {{name: chat, namespace: {namespace}}}\nspec:\n  providers:\n    - {{name: primary, type: mock, mock: {{reply: '{reply}'}}}}\n    - {{name: keyed, type: openai-compatible, baseUrl: 'http://127.0.0.1:9/v1', apiKey: {{secretKeyRef: {{name: llm-keys, key: openai}}}}}}\n  routes:\n    - model: chat\n      chain: [{{provider: primary, model: m}}, {{provider: keyed, model: m}}]\n"
    )
}

/// A policy whose primary is a mock answering `reply`, with no key at all.
fn open_policy(namespace: &str, reply: &str) -> String {
    keyed_policy(namespace, reply).replace(", apiKey: {secretKeyRef: {name: llm-keys, key: openai}}", "")
}

struct Setup {
    cluster: std::sync::Arc<Cluster>,
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
    Some(Setup { cluster, namespace, operator_ns, kubeconfig, dir: tempfile::tempdir().expect("dir") })
}

impl Setup {
    async fn operator_on(&self, identity: &str, listen: &str, extra: &[String]) -> Operator {
        Operator::start_on(&self.kubeconfig, identity, &self.operator_ns, &[&self.namespace], listen, extra).await
    }

    async fn token(&self, name: &str) -> String {
        self.cluster.pod_with_token(&self.namespace, "app", name, &[("app", "web")], AUDIENCE).await.1
    }

    async fn sidecar(&self, config: std::net::SocketAddr, name: &str, extra: &[&str]) -> SidecarProcess {
        let token = self.token(name).await;
        SidecarProcess::start(config, &pki().ca(), &token, &self.dir.path().join(name), extra).await
    }
}

async fn text_of(sidecar: &SidecarProcess) -> (u16, String, Option<String>) {
    let answer = sidecar.chat("chat").await;
    let text = serde_json::from_slice::<serde_json::Value>(&answer.body)
        .ok()
        .and_then(|v| v.pointer("/choices/0/message/content").and_then(|c| c.as_str().map(str::to_string)))
        .unwrap_or_default();
    (answer.status, text, answer.header("x-backstop-passthrough").map(str::to_string))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_restarted_while_a_policy_cannot_compile_sends_the_sidecar_nothing_less() {
    let Some(s) = setup("bs-held").await else { return };
    put_secret(&s.cluster, &s.namespace, "sk-held-1").await;
    let mut operator = s.operator_on("held", "127.0.0.1:0", &[]).await;
    let config = operator.config;
    s.cluster.apply_yaml(&keyed_policy(&s.namespace, "one")).await;
    let sidecar = s.sidecar(config, "web-1", &[]).await;
    sidecar.until(Duration::from_secs(20), "serving the policy", || async { text_of(&sidecar).await.1 == "one" }).await;

    // The Secret goes: status says sidecars keep the last good version.
    Api::<Secret>::namespaced(s.cluster.client().await, &s.namespace)
        .delete("llm-keys", &DeleteParams::default())
        .await
        .expect("delete the Secret");
    let waiting = until(&s.cluster, &s.namespace, "chat", Duration::from_secs(20), |p| {
        ready(p).is_some_and(|r| r.1 == "SecretNotFound")
    })
    .await;
    assert!(ready(&waiting).is_some_and(|r| r.2.contains("sidecars keep version")), "{:?}", waiting.status);

    // The operator restarts: it has no good version of the policy any more.
    operator.signal("-KILL").await;
    let restarted = s.operator_on("held", &config.to_string(), &[]).await;
    let (code, _) = restarted.get("/readyz").await;
    let ready_after = Instant::now();
    loop {
        if restarted.get("/readyz").await.0 == 200 {
            break;
        }
        assert!(ready_after.elapsed() < Duration::from_secs(20), "the operator never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("restarted operator: /readyz {code} at first, ready after {:?}", ready_after.elapsed());
    sidecar
        .until(Duration::from_secs(20), "told to hold its copy", || async {
            sidecar.log().contains("the operator holds a policy")
                || sidecar.log().contains("unchanged since the last connection")
        })
        .await;
    for _ in 0..10 {
        let (status, text, passthrough) = text_of(&sidecar).await;
        assert_eq!((status, text.as_str(), passthrough), (200, "one", None), "the sidecar kept the policy");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let health = sidecar.admin("/health").await.json();
    assert_eq!(health["passthrough"]["active"], false, "{health}");
    assert_eq!(health["controlPlane"]["connected"], true, "{health}");

    // The Secret comes back: the policy is served again, and a change reaches the sidecar.
    put_secret(&s.cluster, &s.namespace, "sk-held-2").await;
    s.cluster.apply_yaml(&keyed_policy(&s.namespace, "two")).await;
    sidecar.until(Duration::from_secs(20), "the new version", || async { text_of(&sidecar).await.1 == "two" }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_no_policy_selects_passes_its_calls_through_with_its_own_credentials() {
    let Some(s) = setup("bs-through").await else { return };
    let origin = Upstream::start(Fault::Ok).await;
    let operator = s.operator_on("through", "127.0.0.1:0", &[]).await;
    let passthrough = origin.base_url();
    let token = s.token("web-1").await;
    let sidecar = SidecarProcess::from_command({
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_backstop"));
        command
            .args(["sidecar", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .arg("--control-plane")
            .arg(format!("https://{}", operator.config))
            .arg("--control-plane-ca")
            .arg(pki().ca())
            .arg("--token-file")
            .arg({
                let path = s.dir.path().join("token");
                std::fs::write(&path, &token).expect("token");
                path
            })
            .env("BACKSTOP_PASSTHROUGH_OPENAI", &passthrough);
        command
    })
    .await;
    sidecar.until(Duration::from_secs(10), "ready", || async { sidecar.admin("/readyz").await.status == 200 }).await;

    // No policy: the app's call goes where it would have gone, with the app's own key.
    let answer = crate::support::post_raw(
        &format!("http://{}/v1/chat/completions", sidecar.llm),
        serde_json::to_vec(&crate::support::chat(false)).expect("json"),
        &[("authorization", "Bearer sk-the-apps-own-key")],
    )
    .await;
    assert_eq!((answer.status, answer.header("x-backstop-passthrough")), (200, Some("true")));
    assert_eq!(answer.json()["choices"][0]["message"]["content"], "from upstream", "the origin's own answer");
    let received = origin.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].path, "/v1/chat/completions");
    assert_eq!(received[0].headers["authorization"], "Bearer sk-the-apps-own-key");
    let health = sidecar.admin("/health").await.json();
    assert_eq!(health["passthrough"]["active"], true);
    let reason = health["passthrough"]["reason"].as_str().unwrap_or_default().to_string();
    assert!(
        reason.contains(&format!("no FallbackPolicy in namespace `{}` selects pod `web-1`", s.namespace)),
        "{reason}"
    );
    let metrics = String::from_utf8_lossy(&sidecar.admin("/metrics").await.body).into_owned();
    assert_eq!(prometheus_sample(&metrics, "backstop_passthrough_active"), 1.0, "{metrics}");

    // A policy selecting the pod arrives: served by it. Deleted again: passed through again.
    s.cluster.apply_yaml(&open_policy(&s.namespace, "policy")).await;
    sidecar
        .until(Duration::from_secs(20), "served by the policy", || async { text_of(&sidecar).await.1 == "policy" })
        .await;
    let before = origin.count();
    for _ in 0..3 {
        assert_eq!(text_of(&sidecar).await, (200, "policy".to_string(), None));
    }
    assert_eq!(origin.count(), before, "nothing passes through while a policy applies");
    Api::<backstop::policy::FallbackPolicy>::namespaced(s.cluster.client().await, &s.namespace)
        .delete("chat", &DeleteParams::default())
        .await
        .expect("delete the policy");
    sidecar
        .until(Duration::from_secs(20), "passing through again", || async {
            text_of(&sidecar).await.2.as_deref() == Some("true")
        })
        .await;
    assert!(origin.count() > before, "passed through again once the policy was deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_pod_starts_without_any_operator_and_takes_its_policy_when_one_answers() {
    let Some(s) = setup("bs-start").await else { return };
    s.cluster.apply_yaml(&open_policy(&s.namespace, "late")).await;
    let free = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let config = free.local_addr().expect("address");
    drop(free);
    let started = Instant::now();
    let sidecar = s.sidecar(config, "web-new", &["--startup-timeout", "1s"]).await;
    let took = sidecar
        .until(Duration::from_secs(5), "ready without an operator", || async {
            sidecar.admin("/readyz").await.status == 200
        })
        .await;
    eprintln!("a sidecar with no operator was ready {:?} after start ({took:?} after listening)", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(4), "bounded by the start-up timeout");
    let readiness = String::from_utf8_lossy(&sidecar.admin("/readyz").await.body).into_owned();
    assert!(readiness.contains("passing calls through: waiting for the operator"), "{readiness}");
    assert_eq!(text_of(&sidecar).await.2.as_deref(), Some("true"), "passing calls through meanwhile");
    let _operator = s.operator_on("start", &config.to_string(), &[]).await;
    sidecar
        .until(Duration::from_secs(40), "the policy applied", || async { text_of(&sidecar).await.1 == "late" })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_that_cannot_verify_the_operator_says_so_loudly_and_keeps_its_configuration() {
    let Some(s) = setup("bs-ca").await else { return };
    let mut operator = s.operator_on("ca", "127.0.0.1:0", &[]).await;
    let config = operator.config;
    s.cluster.apply_yaml(&open_policy(&s.namespace, "kept")).await;
    let sidecar = s.sidecar(config, "web-1", &[]).await;
    sidecar.until(Duration::from_secs(20), "serving", || async { text_of(&sidecar).await.1 == "kept" }).await;

    // The operator comes back with a certificate of another CA: a reinstall that generated one.
    operator.signal("-KILL").await;
    let other = other_pki();
    let extra = vec![
        "--tls-cert-file".to_string(),
        other.join("tls.crt").display().to_string(),
        "--tls-key-file".to_string(),
        other.join("tls.key").display().to_string(),
    ];
    let _replaced = s.operator_on("ca", &config.to_string(), &extra).await;
    sidecar
        .until(Duration::from_secs(40), "reports the untrusted certificate", || async {
            sidecar.admin("/health").await.json()["controlPlane"]["untrusted"] == true
        })
        .await;
    let metrics = String::from_utf8_lossy(&sidecar.admin("/metrics").await.body).into_owned();
    assert_eq!(prometheus_sample(&metrics, "backstop_control_plane_untrusted"), 1.0, "{metrics}");
    assert!(
        metrics.lines().any(|l| l.starts_with("backstop_control_plane_connected") && l.ends_with(" 0")),
        "{metrics}"
    );
    let log = sidecar.log();
    assert_eq!(log.matches("cannot verify the operator's certificate").count(), 1, "once, loudly:\n{log}");
    assert!(log.contains("\"level\":\"ERROR\""), "{log}");
    assert_eq!(text_of(&sidecar).await, (200, "kept".to_string(), None), "the last configuration stays");
}

/// A CA and a certificate for 127.0.0.1 unrelated to the tests' own.
fn other_pki() -> std::path::PathBuf {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let dir = tempfile::Builder::new().prefix("backstop-other-pki-").tempdir().expect("dir").keep();
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().expect("key");
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .expect("params")
        .signed_by(&key, &Issuer::new(ca_params, ca_key))
        .expect("cert");
    std::fs::write(dir.join("tls.crt"), cert.pem()).expect("write");
    std::fs::write(dir.join("tls.key"), key.serialize_pem()).expect("write");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_credentials_label_required_only_labelled_secrets_are_read_and_inline_keys_are_refused() {
    let Some(s) = setup("bs-label").await else { return };
    let _operator = s.operator_on("label", "127.0.0.1:0", &["--require-credentials-label".to_string()]).await;
    put_secret(&s.cluster, &s.namespace, "sk-unlabelled").await;
    s.cluster.apply_yaml(&keyed_policy(&s.namespace, "x")).await;
    let refused = until(&s.cluster, &s.namespace, "chat", Duration::from_secs(20), |p| ready(p).is_some()).await;
    let (status, reason, message) = ready(&refused).expect("condition");
    assert_eq!((status.as_str(), reason.as_str()), ("False", "SecretNotLabelled"), "{message}");
    assert!(message.contains("Secret `llm-keys` is not labelled `backstop.dev/credentials=true`"), "{message}");
    assert!(!message.contains("sk-unlabelled"));
    // Labelled: read, and Ready.
    let labelled: Secret = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "llm-keys", "namespace": s.namespace, "labels": {"backstop.dev/credentials": "true"}}}))
    .expect("secret");
    Api::<Secret>::namespaced(s.cluster.client().await, &s.namespace)
        .patch("llm-keys", &PatchParams::apply("backstop-label-test").force(), &Patch::Apply(&labelled))
        .await
        .expect("label");
    until(&s.cluster, &s.namespace, "chat", Duration::from_secs(20), |p| ready(p).is_some_and(|r| r.0 == "True")).await;
    // An inline key in a cluster: refused, with a reason that says what to do.
    let inline = keyed_policy(&s.namespace, "x")
        .replace("name: chat", "name: inline")
        .replace("{secretKeyRef: {name: llm-keys, key: openai}}", "{value: sk-inline-canary}");
    s.cluster.apply_yaml(&inline).await;
    let refused = until(&s.cluster, &s.namespace, "inline", Duration::from_secs(20), |p| ready(p).is_some()).await;
    let (_, reason, message) = ready(&refused).expect("condition");
    assert_eq!(reason, "InlineKeyRefused", "{message}");
    assert!(message.contains("put it in a Secret and use `secretKeyRef`"), "{message}");
    assert!(!message.contains("sk-inline-canary"), "{message}");
}
