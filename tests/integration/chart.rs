//! The Helm chart installed into the real test API server with the real `helm` v4 CLI, the
//! operator run as a local process under the chart's ServiceAccount, and the chart's own
//! MutatingWebhookConfiguration (pointed at that operator on loopback) making the API server
//! inject the sidecar; then the injected sidecar's own settings, run, reach the operator.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret};
use k8s_openapi::api::rbac::v1::ClusterRole;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::cluster::{Cluster, cluster};
use crate::operator::{ready, until};
use crate::operator_process::{Operator, pki};
use crate::sidecar_process::SidecarProcess;

const BIN: &str = env!("CARGO_BIN_EXE_backstop");

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The helm binary, or `None` (with why) where there is none; in CI there must be one.
fn helm() -> Option<PathBuf> {
    match std::env::var_os("BACKSTOP_HELM") {
        Some(path) => Some(path.into()),
        None => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI runs the chart tests: set BACKSTOP_HELM (tests/tools/build helm)"
            );
            eprintln!(
                "no helm for the chart tests: set BACKSTOP_HELM (tests/tools/build helm); they pass without running"
            );
            None
        }
    }
}

fn run_helm(helm: &Path, cluster: &Cluster, args: &[&str]) -> String {
    let out = Command::new(helm)
        .args(args)
        .arg("--kubeconfig")
        .arg(&cluster.kubeconfig)
        .env("HELM_CACHE_HOME", cluster.dir.join("helm-cache"))
        .env("HELM_CONFIG_HOME", cluster.dir.join("helm-config"))
        .env("HELM_DATA_HOME", cluster.dir.join("helm-data"))
        .output()
        .expect("run helm");
    assert!(out.status.success(), "helm {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn labelled_namespace(cluster: &Cluster, prefix: &str, labels: Value) -> String {
    let name = cluster.namespace(prefix).await;
    let api = Api::<Namespace>::all(cluster.client().await);
    api.patch(&name, &PatchParams::apply("backstop-tests"), &Patch::Merge(&json!({"metadata": {"labels": labels}})))
        .await
        .expect("label namespace");
    name
}

fn pod(name: &str, labels: Value, annotations: Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels, "annotations": annotations},
        "spec": {"serviceAccountName": "app", "containers": [
            {"name": "app", "image": "registry.example/support-bot:1.4.2"},
        ]},
    }))
    .expect("pod")
}

fn has_sidecar(pod: &Pod) -> bool {
    let spec = pod.spec.as_ref().expect("spec");
    spec.init_containers.iter().flatten().chain(&spec.containers).any(|c| c.name == "backstop")
}

fn env_of(pod: &Pod, container: &str) -> BTreeMap<String, String> {
    let spec = pod.spec.as_ref().expect("spec");
    let found =
        spec.init_containers.iter().flatten().chain(&spec.containers).find(|c| c.name == container).expect("container");
    found.env.iter().flatten().filter_map(|e| Some((e.name.clone(), e.value.clone()?))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_installs_everything_the_operator_runs_under_it_and_the_api_server_injects_the_sidecar() {
    let Some(cluster) = cluster().await else { return };
    let Some(helm) = helm() else { return };
    cluster.install_crd().await;
    let release_ns = cluster.namespace("bs-helm").await;
    let release = format!("bs{}", std::process::id());
    let fullname = format!("{release}-backstop");
    let chart = repo("charts/backstop");
    run_helm(
        &helm,
        &cluster,
        // The CRD is the test cluster's, shared by every test: the release leaves it alone.
        &[
            "install",
            &release,
            &chart.to_string_lossy(),
            "--namespace",
            &release_ns,
            "--wait=false",
            "--set",
            "crds.install=false",
        ],
    );

    // Every object the chart makes is there.
    let client = cluster.client().await;
    let deployment =
        Api::<Deployment>::namespaced(client.clone(), &release_ns).get(&fullname).await.expect("deployment");
    assert_eq!(deployment.spec.and_then(|s| s.replicas), Some(2));
    let secret = Api::<Secret>::namespaced(client.clone(), &release_ns)
        .get(&format!("{fullname}-tls"))
        .await
        .expect("tls secret");
    assert!(secret.data.is_some_and(|d| d.contains_key("ca.crt") && d.contains_key("tls.key")));
    let injection = Api::<ConfigMap>::namespaced(client.clone(), &release_ns)
        .get(&format!("{fullname}-injection"))
        .await
        .expect("configmap");
    Api::<ClusterRole>::all(client.clone()).get(&fullname).await.expect("cluster role");
    let webhooks = Api::<MutatingWebhookConfiguration>::all(client.clone());
    webhooks.get(&fullname).await.expect("webhook configuration");
    for name in [format!("{fullname}-config"), format!("{fullname}-webhook")] {
        Api::<k8s_openapi::api::core::v1::Service>::namespaced(client.clone(), &release_ns)
            .get(&name)
            .await
            .expect("service");
    }

    // An upgrade keeps the generated CA (sidecars and the webhook trust it).
    let ca_before = Api::<Secret>::namespaced(client.clone(), &release_ns)
        .get(&format!("{fullname}-tls"))
        .await
        .expect("secret")
        .data;
    run_helm(
        &helm,
        &cluster,
        &[
            "upgrade",
            &release,
            &chart.to_string_lossy(),
            "--namespace",
            &release_ns,
            "--set",
            "operator.replicas=3",
            "--set",
            "crds.install=false",
        ],
    );
    let after = Api::<Secret>::namespaced(client.clone(), &release_ns)
        .get(&format!("{fullname}-tls"))
        .await
        .expect("secret")
        .data;
    assert_eq!(after, ca_before, "helm upgrade regenerated the certificate");
    let scaled = Api::<Deployment>::namespaced(client.clone(), &release_ns).get(&fullname).await.expect("deployment");
    assert_eq!(scaled.spec.and_then(|s| s.replicas), Some(3));

    // The operator as a local process, under the chart's ServiceAccount and RBAC, with the
    // chart's injection settings (pointed at this operator on loopback).
    let kubeconfig = cluster.service_account_kubeconfig(&release_ns, &fullname).await;
    let dir = tempfile::tempdir().expect("dir");
    let config_port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port").port();
    let mut settings: Value =
        serde_yaml_ng::from_str(&injection.data.expect("data")["config.yaml"]).expect("the chart's injection settings");
    settings["controlPlane"] = json!(format!("https://127.0.0.1:{config_port}"));
    settings["caFile"] = json!(pki().ca().display().to_string());
    let settings_file = dir.path().join("injection.yaml");
    std::fs::write(&settings_file, serde_yaml_ng::to_string(&settings).expect("yaml")).expect("write");
    let extra: Vec<String> = [
        "--webhook-listen",
        "127.0.0.1:0",
        "--injection-config",
        &settings_file.display().to_string(),
        "--lease-name",
        &fullname,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let policy_ns = labelled_namespace(&cluster, "bs-injected", json!({"backstop.dev/inject": "enabled"})).await;
    let operator = Operator::start_on(
        &kubeconfig,
        "chart",
        &release_ns,
        &[&policy_ns],
        &format!("127.0.0.1:{config_port}"),
        &extra,
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while operator.get("/readyz").await.0 != 200 {
        assert!(tokio::time::Instant::now() < deadline, "the operator never became ready:\n{}", operator.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster
        .apply_yaml(&format!(
            "apiVersion: backstop.dev/v1alpha1\nkind: FallbackPolicy\nmetadata: {{name: chat, namespace: {policy_ns}}}\nspec:\n  providers: [{{name: mock, type: mock, mock: {{reply: injected}}}}]\n  routes: [{{model: chat, chain: [{{provider: mock, model: m}}]}}]\n"
        ))
        .await;
    until(&cluster, &policy_ns, "chat", Duration::from_secs(20), |p| ready(p).is_some_and(|r| r.0 == "True")).await;

    // The chart's webhook configuration, pointed at the operator on loopback.
    let webhook = operator.webhook.expect("the webhook listens");
    let ca = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, std::fs::read(pki().ca()).expect("ca"));
    let mut configuration = webhooks.get(&fullname).await.expect("webhook configuration");
    for hook in configuration.webhooks.iter_mut().flatten() {
        hook.client_config.service = None;
        hook.client_config.url = Some(format!("https://127.0.0.1:{}/inject", webhook.port()));
        hook.client_config.ca_bundle = Some(k8s_openapi::ByteString(
            base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &ca).expect("b64"),
        ));
        hook.failure_policy = Some("Fail".into());
    }
    webhooks
        .replace(&fullname, &PostParams::default(), &configuration)
        .await
        .expect("point the webhook at the operator");

    let plain_ns = cluster.namespace("bs-plain").await;
    for namespace in [&policy_ns, &plain_ns] {
        cluster.pod_with_token(namespace, "app", "token-holder", &[], "backstop").await;
    }
    let create = |namespace: String, pod: Pod| {
        let client = client.clone();
        async move {
            Api::<Pod>::namespaced(client, &namespace).create(&PostParams::default(), &pod).await.expect("pod created")
        }
    };
    // Injected: a pod of the labelled namespace, and a labelled pod elsewhere.
    let injected = create(policy_ns.clone(), pod("web", json!({"app": "web"}), json!({}))).await;
    assert!(has_sidecar(&injected), "{:?}", injected.spec);
    let labelled =
        create(plain_ns.clone(), pod("labelled", json!({"backstop.dev/inject": "enabled"}), json!({}))).await;
    assert!(has_sidecar(&labelled));
    // Left alone: opted out, unlabelled, already injected.
    let opted_out =
        create(policy_ns.clone(), pod("opted-out", json!({}), json!({"backstop.dev/inject": "disabled"}))).await;
    assert!(!has_sidecar(&opted_out));
    let plain = create(plain_ns.clone(), pod("plain", json!({}), json!({}))).await;
    assert!(!has_sidecar(&plain));
    let mut again: Pod = serde_json::from_value(serde_json::to_value(&injected).expect("json")).expect("pod");
    again.metadata = kube::api::ObjectMeta {
        name: Some("again".into()),
        annotations: injected.metadata.annotations.clone(),
        ..Default::default()
    };
    let again = create(policy_ns.clone(), again).await;
    let count = |pod: &Pod| {
        let spec = pod.spec.as_ref().expect("spec");
        spec.init_containers.iter().flatten().chain(&spec.containers).filter(|c| c.name == "backstop").count()
    };
    assert_eq!(count(&again), 1, "injecting an injected pod adds nothing");
    assert!(operator.log().contains("injected the sidecar"), "{}", operator.log());

    // What was injected runs: the sidecar, with exactly its injected settings (its token and
    // state directory are files here, its listeners on free ports), is served the policy.
    let env = env_of(&injected, "backstop");
    let app = env_of(&injected, "app");
    assert_eq!(app.get("OPENAI_BASE_URL").map(String::as_str), Some("http://127.0.0.1:7400/v1"));
    let token = {
        // The injected pod's own bound token, as the kubelet would project it.
        let accounts = Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(client.clone(), &policy_ns);
        let request: k8s_openapi::api::authentication::v1::TokenRequest = serde_json::from_value(json!({"spec": {
            "audiences": ["backstop"], "expirationSeconds": 3600,
            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "web", "uid": injected.metadata.uid.clone()},
        }}))
        .expect("token request");
        accounts
            .create_token_request("app", &PostParams::default(), &request)
            .await
            .expect("token")
            .status
            .expect("status")
            .token
    };
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token).expect("write");
    let mut sidecar = tokio::process::Command::new(BIN);
    sidecar
        .arg("sidecar")
        .envs(&env)
        .env("BACKSTOP_TOKEN_FILE", &token_file)
        .env("BACKSTOP_STATE_DIR", dir.path().join("state"))
        .env("BACKSTOP_LISTEN", "127.0.0.1:0")
        .env("BACKSTOP_ADMIN", "127.0.0.1:0");
    let sidecar = SidecarProcess::from_command(sidecar).await;
    sidecar
        .until(Duration::from_secs(15), "served by the operator", || async {
            sidecar.chat("chat").await.text() == "injected"
        })
        .await;

    // helm uninstall removes what it made, but the CRD (and so every policy) and the serving
    // CA, which the sidecars it injected trust: a reinstall serves them again.
    run_helm(&helm, &cluster, &["uninstall", &release, "--namespace", &release_ns, "--wait"]);
    assert!(
        Api::<Deployment>::namespaced(client.clone(), &release_ns).get_opt(&fullname).await.expect("get").is_none()
    );
    assert!(webhooks.get_opt(&fullname).await.expect("get").is_none());
    assert!(Api::<ClusterRole>::all(client.clone()).get_opt(&fullname).await.expect("get").is_none());
    let kept = Api::<Secret>::namespaced(client.clone(), &release_ns).get_opt(&format!("{fullname}-tls")).await;
    assert_eq!(kept.expect("get").and_then(|s| s.data), after, "the CA outlives the release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_policy_passes_check_and_the_api_server_s_validation() {
    let Some(cluster) = cluster().await else { return };
    cluster.install_crd().await;
    let mut checked = 0;
    for entry in std::fs::read_dir(repo("deploy/examples")).expect("examples") {
        let path = entry.expect("entry").path();
        let out = Command::new(BIN)
            .arg("check")
            .arg(&path)
            .envs(
                [
                    "OPENAI_API_KEY",
                    "ANTHROPIC_API_KEY_1",
                    "ANTHROPIC_API_KEY_2",
                    "GEMINI_API_KEY",
                    "AZURE_OPENAI_API_KEY",
                ]
                .map(|n| (n, "k")),
            )
            .output()
            .expect("check");
        assert!(out.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
        let document: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(&path).expect("read")).expect("yaml");
        let namespace = document["metadata"]["namespace"].as_str().expect("namespace");
        let ns = Api::<Namespace>::all(cluster.client().await);
        if ns.get_opt(namespace).await.expect("namespaces").is_none() {
            let _ = ns
                .create(
                    &PostParams::default(),
                    &serde_json::from_value(json!({"metadata": {"name": namespace}})).expect("ns"),
                )
                .await;
        }
        let dry_run = cluster.kubectl(&["apply", "--dry-run=server", "-f", &path.to_string_lossy()]);
        assert!(dry_run.is_ok(), "{}: {dry_run:?}", path.display());
        checked += 1;
    }
    assert!(checked >= 5, "every example: {checked}");
}
