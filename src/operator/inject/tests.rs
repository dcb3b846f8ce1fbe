//! Injection on real AdmissionReview JSON: the review a ReplicaSet controller's pod create
//! sends, answered by the webhook's own code, and the patch applied as the API server does.

use std::path::Path;

use serde_json::{Value, json};

use super::webhook::Webhook;
use super::*;

const REVIEW: &str = include_str!("../../../tests/fixtures/admission/pod-create.json");
const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIBtest\n-----END CERTIFICATE-----\n";

fn webhook(dir: &Path, mode: &str) -> Webhook {
    std::fs::write(dir.join("ca.crt"), CA).expect("ca");
    let settings = format!(
        "image: ghcr.io/backstop/backstop:0.1.0\nimagePullPolicy: IfNotPresent\ncontrolPlane: https://backstop-config.backstop-system.svc:7402\ncaFile: {}\nmode: {mode}\nresources: {{requests: {{cpu: 50m, memory: 32Mi}}, limits: {{memory: 128Mi}}}}\nenv: [{{name: OTEL_EXPORTER_OTLP_ENDPOINT, value: 'http://otel-collector.observability:4318'}}]\n",
        dir.join("ca.crt").display()
    );
    std::fs::write(dir.join("config.yaml"), settings).expect("settings");
    Webhook { settings_file: dir.join("config.yaml"), release: "0.1.0".into() }
}

/// The pod of a review, with the webhook's patch applied as the API server applies it.
fn answered(webhook: &Webhook, review: &Value) -> (Value, Value) {
    let response = webhook.review(review.to_string().as_bytes());
    let answer = response["response"].clone();
    let mut pod = review["request"]["object"].clone();
    if let Some(patch) = answer["patch"].as_str() {
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD.decode(patch).expect("base64 patch");
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).expect("a JSON patch");
        json_patch::patch(&mut pod, &patch).expect("the patch applies");
    }
    (answer, pod)
}

fn review_of(pod: &Value) -> Value {
    let mut review: Value = serde_json::from_str(REVIEW).expect("fixture");
    review["request"]["object"] = pod.clone();
    review
}

fn env_of<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"].as_array()?.iter().find(|e| e["name"] == name)
}

#[test]
fn a_pod_gets_a_native_sidecar_first_its_apps_point_at_it_and_an_app_that_chose_a_url_keeps_it() {
    let dir = tempfile::tempdir().expect("dir");
    let webhook = webhook(dir.path(), "native");
    let review: Value = serde_json::from_str(REVIEW).expect("fixture");
    let (answer, pod) = answered(&webhook, &review);
    assert_eq!(answer["uid"], review["request"]["uid"], "the answer names the request");
    assert_eq!(answer["allowed"], true);
    assert_eq!(answer["patchType"], "JSONPatch");

    let init = pod["spec"]["initContainers"].as_array().expect("init containers");
    assert_eq!(init.len(), 2);
    let sidecar = &init[0];
    assert_eq!(sidecar["name"], "backstop", "first, so it serves before the other init containers run");
    assert_eq!(sidecar["restartPolicy"], "Always");
    assert_eq!(sidecar["image"], "ghcr.io/backstop/backstop:0.1.0");
    assert_eq!(sidecar["args"], json!(["sidecar"]));
    assert_eq!(sidecar["startupProbe"]["httpGet"], json!({"path": "/readyz", "port": 7401}));
    assert_eq!(sidecar["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(
        sidecar["securityContext"],
        json!({"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}, "privileged": false,
               "readOnlyRootFilesystem": true, "runAsGroup": 65532, "runAsNonRoot": true, "runAsUser": 65532,
               "seccompProfile": {"type": "RuntimeDefault"}})
    );
    assert_eq!(
        sidecar["resources"],
        json!({"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}})
    );
    for (name, value) in [
        ("BACKSTOP_CONTROL_PLANE", "https://backstop-config.backstop-system.svc:7402"),
        ("BACKSTOP_CONTROL_PLANE_CA_DATA", CA),
        ("BACKSTOP_TOKEN_FILE", "/var/run/secrets/backstop/token"),
        ("BACKSTOP_STATE_DIR", "/var/lib/backstop"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel-collector.observability:4318"),
        ("OTEL_SERVICE_NAME", "backstop-sidecar"),
    ] {
        assert_eq!(env_of(sidecar, name).map(|e| &e["value"]), Some(&json!(value)), "{name}");
    }
    assert_eq!(
        env_of(sidecar, "POD_NAME").map(|e| &e["valueFrom"]["fieldRef"]["fieldPath"]),
        Some(&json!("metadata.name"))
    );

    let volumes = pod["spec"]["volumes"].as_array().expect("volumes");
    let token = volumes.iter().find(|v| v["name"] == "backstop-token").expect("token volume");
    assert_eq!(
        token["projected"]["sources"][0]["serviceAccountToken"],
        json!({"audience": "backstop", "expirationSeconds": 3600, "path": "token"})
    );
    let state = volumes.iter().find(|v| v["name"] == "backstop-state").expect("state volume");
    assert_eq!(state["emptyDir"], json!({"medium": "Memory", "sizeLimit": "16Mi"}));
    assert!(volumes.iter().any(|v| v["name"] == "kube-api-access-x2b9k"), "the pod's own volumes stay");

    let app = &pod["spec"]["containers"][0];
    assert_eq!(env_of(app, "OPENAI_BASE_URL").map(|e| &e["value"]), Some(&json!("http://127.0.0.1:7400/v1")));
    assert_eq!(env_of(app, "ANTHROPIC_BASE_URL").map(|e| &e["value"]), Some(&json!("http://127.0.0.1:7400")));
    assert_eq!(env_of(app, "LOG_LEVEL").map(|e| &e["value"]), Some(&json!("info")));
    let worker = &pod["spec"]["containers"][1];
    assert_eq!(
        env_of(worker, "OPENAI_BASE_URL").map(|e| &e["value"]),
        Some(&json!("https://gateway.example/v1")),
        "an app that chose its base URL keeps it"
    );
    assert_eq!(env_of(&init[1], "OPENAI_BASE_URL").map(|e| &e["value"]), Some(&json!("http://127.0.0.1:7400/v1")));
    assert_eq!(pod["metadata"]["annotations"][INJECTED], "0.1.0");

    // Injecting again changes nothing.
    let (again, same) = answered(&webhook, &review_of(&pod));
    assert_eq!(again["patch"], Value::Null);
    assert_eq!(same, pod);
}

#[test]
fn the_base_urls_an_app_had_become_where_the_sidecar_passes_calls_through() {
    let dir = tempfile::tempdir().expect("dir");
    let webhook = webhook(dir.path(), "native");
    let mut pod: Value = serde_json::from_str::<Value>(REVIEW).expect("fixture")["request"]["object"].clone();
    pod["spec"]["containers"][0]["env"] = json!([
        {"name": "OPENAI_BASE_URL", "value": "https://gateway.example/v1"},
        {"name": "ANTHROPIC_BASE_URL", "valueFrom": {"configMapKeyRef": {"name": "llm", "key": "anthropic"}}},
    ]);
    let (answer, injected) = answered(&webhook, &review_of(&pod));
    let app = &injected["spec"]["containers"][0];
    assert_eq!(
        env_of(app, "OPENAI_BASE_URL"),
        Some(&json!({"name": "OPENAI_BASE_URL", "value": "http://127.0.0.1:7400/v1"}))
    );
    assert_eq!(
        env_of(app, "ANTHROPIC_BASE_URL"),
        Some(&json!({"name": "ANTHROPIC_BASE_URL", "value": "http://127.0.0.1:7400"}))
    );
    let sidecar = &injected["spec"]["initContainers"][0];
    assert_eq!(
        env_of(sidecar, "BACKSTOP_PASSTHROUGH_OPENAI").map(|e| &e["value"]),
        Some(&json!("https://gateway.example/v1"))
    );
    assert_eq!(
        env_of(sidecar, "BACKSTOP_PASSTHROUGH_ANTHROPIC").map(|e| &e["valueFrom"]),
        Some(&json!({"configMapKeyRef": {"name": "llm", "key": "anthropic"}})),
        "a value from a ConfigMap is read by the kubelet for the sidecar too"
    );
    // The worker sets the same gateway: pointed at the sidecar. Its Anthropic setting (none)
    // differs from the first container's: it keeps calling Anthropic directly, and says so.
    let worker = &injected["spec"]["containers"][1];
    assert_eq!(env_of(worker, "OPENAI_BASE_URL").map(|e| &e["value"]), Some(&json!("http://127.0.0.1:7400/v1")));
    assert_eq!(env_of(worker, "ANTHROPIC_BASE_URL"), None);
    let warnings: Vec<&str> =
        answer["warnings"].as_array().expect("warnings").iter().filter_map(Value::as_str).collect();
    assert!(
        warnings.iter().any(|w| w.contains("`worker` sets ANTHROPIC_BASE_URL to another URL than container `app`")),
        "{warnings:?}"
    );

    // An app with no base URL of its own: nothing to pass through to but the providers'.
    let (_, plain) = answered(&webhook, &serde_json::from_str(REVIEW).expect("fixture"));
    let sidecar = &plain["spec"]["initContainers"][0];
    assert_eq!(env_of(sidecar, "BACKSTOP_PASSTHROUGH_OPENAI"), None);
    assert_eq!(env_of(sidecar, "BACKSTOP_PASSTHROUGH_ANTHROPIC"), None);
}

#[test]
fn opted_out_host_network_and_hand_made_sidecar_pods_are_left_alone() {
    let dir = tempfile::tempdir().expect("dir");
    let webhook = webhook(dir.path(), "native");
    let original: Value = serde_json::from_str::<Value>(REVIEW).expect("fixture")["request"]["object"].clone();
    let mut opted_out = original.clone();
    opted_out["metadata"]["annotations"] = json!({"backstop.dev/inject": "disabled"});
    let mut host = original.clone();
    host["spec"]["hostNetwork"] = json!(true);
    let mut hand_made = original.clone();
    hand_made["spec"]["containers"][1]["name"] = json!("backstop");
    for pod in [opted_out, host, hand_made] {
        let (answer, after) = answered(&webhook, &review_of(&pod));
        assert_eq!((answer["allowed"].clone(), answer["patch"].clone()), (json!(true), Value::Null));
        assert_eq!(after, pod);
    }
}

#[test]
fn older_clusters_get_a_first_container_and_annotations_override_image_and_resources() {
    let dir = tempfile::tempdir().expect("dir");
    let webhook = webhook(dir.path(), "container");
    let mut pod = serde_json::from_str::<Value>(REVIEW).expect("fixture")["request"]["object"].clone();
    pod["metadata"]["annotations"] = json!({
        "backstop.dev/sidecar-image": "mirror.example/backstop:0.1.0",
        "backstop.dev/sidecar-memory-limit": "256Mi",
        "backstop.dev/sidecar-cpu-request": "lots",
    });
    let (answer, pod) = answered(&webhook, &review_of(&pod));
    let sidecar = &pod["spec"]["containers"][0];
    assert_eq!(sidecar["name"], "backstop");
    assert_eq!(sidecar["restartPolicy"], Value::Null);
    assert_eq!(sidecar["image"], "mirror.example/backstop:0.1.0");
    assert_eq!(
        sidecar["resources"],
        json!({"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"memory": "256Mi"}})
    );
    assert_eq!(pod["spec"]["initContainers"].as_array().map(Vec::len), Some(1), "the app's init container only");
    assert_eq!(
        answer["warnings"],
        json!([
            "container `worker` sets OPENAI_BASE_URL to another URL than container `app`: it keeps its own and bypasses Backstop",
            "backstop.dev/sidecar-cpu-request: `lots` is not a quantity such as 100m or 64Mi; the default applies"
        ])
    );
}

#[test]
fn settings_it_cannot_read_let_the_pod_through_with_a_warning() {
    let dir = tempfile::tempdir().expect("dir");
    let webhook = Webhook { settings_file: dir.path().join("missing.yaml"), release: "0.1.0".into() };
    let review: Value = serde_json::from_str(REVIEW).expect("fixture");
    let (answer, pod) = answered(&webhook, &review);
    assert_eq!(answer["allowed"], true, "never blocks a pod");
    assert_eq!(pod, review["request"]["object"]);
    assert!(answer["warnings"][0].as_str().unwrap_or_default().contains("missing.yaml"), "{answer}");
    let garbage = webhook.review(b"{\"kind\": \"AdmissionReview\"");
    assert_eq!(garbage["response"]["allowed"], false, "unreadable: there is no pod to let through");
}

#[test]
fn quantities_are_recognised_as_kubernetes_writes_them() {
    for good in ["100m", "64Mi", "1", "1.5", "2e3", "1E", "0.5Gi", "128974848", "129e6", "123Mi"] {
        assert!(is_quantity(good), "{good}");
    }
    for bad in ["lots", "", "-1", "1.2.3", "Mi", "1e", "1x", "1 Mi"] {
        assert!(!is_quantity(bad), "{bad}");
    }
}
