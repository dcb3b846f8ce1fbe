"""The Helm chart with the real helm v4 CLI: strict lint, renders validated against the
Kubernetes 1.33 and 1.36 schemas, values.schema.json refusing wrong values, and the files kept
in step with it (the chart's CRD, deploy/backstop.yaml, deploy/operator/rbac.yaml, the flags the
operator binary takes). The Dockerfile is linted here too."""

import base64
import os
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "backstop"
HELM = os.environ.get("BACKSTOP_HELM", "helm")
BIN = os.environ.get("BACKSTOP_BIN", str(ROOT / "target" / "debug" / "backstop"))
# Kinds of other projects' CRDs, which Kubernetes' schemas do not hold.
FOREIGN = {("cert-manager.io/v1", "Issuer"), ("cert-manager.io/v1", "Certificate"), ("monitoring.coreos.com/v1", "ServiceMonitor")}
EVERYTHING_ON = [
    "--set", "tls.certManager.enabled=true",
    "--set", "metrics.serviceMonitor.enabled=true",
    "--set", "networkPolicy.enabled=true",
    "--set", "networkPolicy.apiServer[0].ipBlock.cidr=10.0.0.0/24",
    "--set", "operator.requireCredentialsLabel=true",
    "--set", "networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.name=monitoring",
    "--set", "openTelemetry.endpoint=http://otel-collector.observability:4318",
    "--set", "openTelemetry.samplerArg=0.5",
    "--set", "operator.namespaces={shop,support}",
    "--set", "sidecar.mode=container",
    "--set", "sidecar.env[0].name=BACKSTOP_LOG",
    "--set", "sidecar.env[0].value=debug",
    "--set", "imagePullSecrets[0].name=registry",
]


def helm(*args, check=True):
    return subprocess.run([HELM, *args], capture_output=True, text=True, check=check)


def render(*args):
    out = helm("template", "backstop", str(CHART), "--namespace", "backstop-system", *args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(docs, kind):
    return [doc for doc in docs if doc["kind"] == kind]


def test_strict_lint_is_clean():
    result = helm("lint", "--strict", str(CHART), check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


@pytest.mark.parametrize("version", ["1.33.0", "1.36.0"])
@pytest.mark.parametrize("values", [[], EVERYTHING_ON], ids=["defaults", "everything-on"])
def test_every_rendered_object_passes_the_kubernetes_schema(version, values):
    docs = render(*values)
    kinds = {(doc["apiVersion"], doc["kind"]) for doc in docs}
    assert ("apps/v1", "Deployment") in kinds and ("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration") in kinds
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in FOREIGN:
            continue
        kubernetes_validate.validate(doc, version, strict=True)
    if values:
        assert FOREIGN <= kinds, "every optional feature rendered"


def test_the_generated_ca_is_the_webhook_s_and_the_certificate_names_both_services():
    docs = render()
    secret = by_kind(docs, "Secret")[0]
    webhook = by_kind(docs, "MutatingWebhookConfiguration")[0]
    assert [w["clientConfig"]["caBundle"] for w in webhook["webhooks"]] == [secret["data"]["ca.crt"]] * 2
    cert = base64.b64decode(secret["data"]["tls.crt"])
    openssl = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName"], input=cert, capture_output=True, check=True)
    names = openssl.stdout.decode()
    for name in ["backstop-config.backstop-system.svc", "backstop-webhook.backstop-system.svc"]:
        assert f"DNS:{name}," in names or names.rstrip().endswith(f"DNS:{name}") or f"DNS:{name}\n" in names, names
    selectors = [(w["name"], w.get("namespaceSelector"), w.get("objectSelector")) for w in webhook["webhooks"]]
    assert selectors[0][1] == {"matchLabels": {"backstop.dev/inject": "enabled"}}
    assert selectors[1][2] == {"matchLabels": {"backstop.dev/inject": "enabled"}}
    assert all(w["failurePolicy"] == "Ignore" and w["sideEffects"] == "None" for w in webhook["webhooks"])


def test_the_operator_is_spread_guarded_and_restricted():
    docs = render()
    deployment = by_kind(docs, "Deployment")[0]
    spec = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 2
    assert spec["affinity"]["podAntiAffinity"], "replicas are spread across nodes"
    assert by_kind(docs, "PodDisruptionBudget")[0]["spec"]["minAvailable"] == 1
    container = spec["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["OTEL_SDK_DISABLED"] == "true", "no endpoint: nothing exported"
    otel = {e["name"]: e.get("value") for e in by_kind(render(*EVERYTHING_ON), "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert otel["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability:4318"
    assert otel["OTEL_TRACES_SAMPLER_ARG"] == "0.5"
    assert "OTEL_SDK_DISABLED" not in otel


def test_every_flag_the_chart_passes_is_one_the_operator_takes():
    docs = render(*EVERYTHING_ON)
    args = by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[0] == "operator"
    usage = subprocess.run([BIN, "operator", "--help"], capture_output=True, text=True, check=True).stdout
    for arg in args[1:]:
        flag = arg.split("=", 1)[0]
        assert f"{flag} " in usage or f"{flag}\n" in usage, f"{flag} is not an operator flag"


def test_the_injection_settings_name_the_config_service_and_pass_telemetry_on():
    docs = render(*EVERYTHING_ON)
    settings = yaml.safe_load(by_kind(docs, "ConfigMap")[0]["data"]["config.yaml"])
    assert settings["controlPlane"] == "https://backstop-config.backstop-system.svc:7402"
    assert settings["mode"] == "container"
    assert settings["image"] == "ghcr.io/backstop/backstop:0.1.0"
    names = [e["name"] for e in settings["env"]]
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" in names and "BACKSTOP_LOG" in names


@pytest.mark.parametrize(
    "setting, message",
    [
        ("sidecar.mode=sidecar", "at '/sidecar/mode': value must be one of 'native', 'container'"),
        ("operator.replicas=0", "at '/operator/replicas': minimum: got 0, want 1"),
        ("webhook.failurePolicy=fail", "at '/webhook/failurePolicy': value must be one of 'Ignore', 'Fail'"),
        ("openTelemetry.endpoint=collector:4318", "at '/openTelemetry/endpoint'"),
        ("imagee.tag=x", "additional properties 'imagee' not allowed"),
    ],
)
def test_values_schema_refuses_a_wrong_value_with_where_and_why(setting, message):
    result = helm("template", "backstop", str(CHART), "--set", setting, check=False)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_every_value_is_documented():
    import json

    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(node, path):
        for name, child in node.get("properties", {}).items():
            here = f"{path}.{name}".lstrip(".")
            if child.get("type") != "object" or "description" in child:
                assert child.get("description"), f"{here} has no description in values.schema.json"
            walk(child, here)

    walk(schema, "")
    # And in values.yaml, every leaf has its `# --` comment.
    lines = (CHART / "values.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not stripped.endswith(":") and not line.startswith("    "):
            above = lines[i - 1].strip()
            assert above.startswith("#"), f"values.yaml line {i + 1} ({stripped}) has no comment"


def test_the_chart_s_crd_is_the_repository_s():
    assert (CHART / "files" / "fallbackpolicy.yaml").read_bytes() == (ROOT / "crds" / "fallbackpolicy.yaml").read_bytes()


def test_deploy_manifests_are_the_chart_rendered():
    rendered = subprocess.run(
        [HELM, "template", "backstop", str(CHART), "--namespace", "backstop-system", "--set", "tls.certManager.enabled=true",
         "--set", "crds.install=false"],
        capture_output=True, text=True, check=True,
    ).stdout
    expected = "# Rendered from charts/backstop by deploy/render; do not edit.\n" + rendered
    assert (ROOT / "deploy" / "backstop.yaml").read_text() == expected, "deploy/backstop.yaml drifted: run deploy/render"


def test_the_tested_rbac_is_the_chart_s():
    tested = [doc for doc in yaml.safe_load_all((ROOT / "deploy" / "operator" / "rbac.yaml").read_text()) if doc]
    chart = render()
    for kind in ["ClusterRole", "Role"]:
        assert by_kind(tested, kind)[0]["rules"] == [
            {**rule, "resourceNames": ["backstop-operator"]} if "resourceNames" in rule else rule
            for rule in by_kind(chart, kind)[0]["rules"]
        ], f"the chart's {kind} differs from deploy/operator/rbac.yaml"


def test_the_crd_is_a_template_an_upgrade_applies_and_an_uninstall_keeps():
    (crd,) = by_kind(render(), "CustomResourceDefinition")
    shipped = yaml.safe_load((ROOT / "crds" / "fallbackpolicy.yaml").read_text())
    assert crd["spec"] == shipped["spec"], "the schema `backstop crd` generates"
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert not (CHART / "crds").exists(), "not in crds/, which helm never upgrades"
    assert not by_kind(render("--set", "crds.install=false"), "CustomResourceDefinition")


def test_with_namespaces_set_secrets_are_readable_in_those_namespaces_only():
    everywhere = render()
    (cluster_role,) = by_kind(everywhere, "ClusterRole")
    assert any("secrets" in rule["resources"] for rule in cluster_role["rules"])
    assert not [r for r in by_kind(everywhere, "Role") if r["metadata"]["name"].endswith("-secrets")]
    scoped = render("--set", "operator.namespaces={shop,support}")
    (cluster_role,) = by_kind(scoped, "ClusterRole")
    assert not any("secrets" in rule["resources"] for rule in cluster_role["rules"]), "no cluster-wide Secret access"
    roles = {r["metadata"]["namespace"]: r for r in by_kind(scoped, "Role") if r["metadata"]["name"].endswith("-secrets")}
    assert set(roles) == {"shop", "support"}
    assert roles["shop"]["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch"]}]
    bindings = {b["metadata"]["namespace"]: b for b in by_kind(scoped, "RoleBinding") if b["metadata"]["name"].endswith("-secrets")}
    assert bindings["support"]["subjects"] == [{"kind": "ServiceAccount", "name": "backstop", "namespace": "backstop-system"}]


def test_the_network_policy_admits_the_webhook_from_the_api_server_only_and_the_config_port_from_pods():
    refused = helm("template", "backstop", str(CHART), "--set", "networkPolicy.enabled=true", check=False)
    assert refused.returncode != 0 and "apiServer" in refused.stderr, refused.stderr
    docs = render("--set", "networkPolicy.enabled=true", "--set", "networkPolicy.apiServer[0].ipBlock.cidr=10.0.0.0/24")
    (policy,) = by_kind(docs, "NetworkPolicy")
    rules = {rule["ports"][0]["port"]: rule for rule in policy["spec"]["ingress"]}
    assert rules["webhook"]["from"] == [{"ipBlock": {"cidr": "10.0.0.0/24"}}]
    assert rules["config"]["from"] == [{"namespaceSelector": {}}], "pods of any namespace, no host addresses"
    operator = by_kind(render("--set", "operator.requireCredentialsLabel=true"), "Deployment")[0]
    assert "--require-credentials-label" in operator["spec"]["template"]["spec"]["containers"][0]["args"]


CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIBnew\n-----END CERTIFICATE-----\n"
OLD_CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIBold\n-----END CERTIFICATE-----\n"


def webhook_ca(docs):
    (webhook,) = by_kind(docs, "MutatingWebhookConfiguration")
    bundles = {base64.b64decode(hook["clientConfig"]["caBundle"]).decode() for hook in webhook["webhooks"]}
    assert len(bundles) == 1
    return bundles.pop()


def test_the_generated_ca_is_kept_on_uninstall_and_joined_by_additional_trusted_cas():
    docs = render("--set-string", f"tls.additionalTrustedCAs={OLD_CA_PEM}")
    (secret,) = by_kind(docs, "Secret")
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep", "a reinstall finds the same CA"
    signing = base64.b64decode(secret["data"]["signing-ca.crt"]).decode()
    bundle = base64.b64decode(secret["data"]["ca.crt"]).decode()
    assert bundle == signing + OLD_CA_PEM, "sidecars trust the serving CA and the additional one"
    assert webhook_ca(docs) == bundle, "and so does the API server"


def test_an_existing_secret_replaces_the_generated_one_for_gitops():
    refused = helm("template", "backstop", str(CHART), "--set", "tls.existingSecret=mine", check=False)
    assert refused.returncode != 0 and "tls.caBundle" in refused.stderr, refused.stderr
    docs = render("--set", "tls.existingSecret=mine", "--set-string", f"tls.caBundle={CA_PEM}",
                  "--set-string", f"tls.additionalTrustedCAs={OLD_CA_PEM}")
    assert not by_kind(docs, "Secret"), "no generated Secret: renders are the same every time"
    assert webhook_ca(docs) == CA_PEM + OLD_CA_PEM
    (deployment,) = by_kind(docs, "Deployment")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "mine"
    assert render("--set", "tls.existingSecret=mine", "--set-string", f"tls.caBundle={CA_PEM}") == render(
        "--set", "tls.existingSecret=mine", "--set-string", f"tls.caBundle={CA_PEM}"), "GitOps renders are stable"


def test_the_dockerfile_passes_hadolint():
    result = subprocess.run(["hadolint", "--failure-threshold", "info", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
