"""What a platform team does on its first day, on a real node: `helm install` the chart with the
built image, label a namespace, apply a FallbackPolicy, deploy an app that only knows the
official OpenAI SDK's base-URL variable, and then live through what production does to it: a
failing primary, the leading operator pod deleted, a rolling upgrade of the operator, a key
rotated, and the chart uninstalled. The app counts every call it makes; the goal in every
disruption is zero failed calls."""

import shutil
import time

import yaml

from support import (CHART, RELEASE_NAMESPACE, apply, get, helm, http, http_json, kubectl, pods, running_pods,
                     until)
from workload import Workload, lease_holder

SHOP = "shop"
APP = {"app": "support-bot"}
# The chart's values a release gets here: JSON logs, and the image the node imported.
RELEASE_VALUES = ["--set", "operator.logFormat=json", "--set", "image.pullPolicy=IfNotPresent"]
WORKLOAD = Workload(SHOP)


def app_stats():
    return WORKLOAD.stats()


def policy_status():
    return WORKLOAD.policy_status()


def sidecars_connected(expected):
    return WORKLOAD.sidecars_current(expected)


def set_upstream(name, mode, status=503, period_ms=2000):
    WORKLOAD.set_upstream(name, mode, status, period_ms)


def upstream_pod(name):
    return WORKLOAD.upstream_url(name)


def previous_chart(tmp_path):
    """The chart as a previous release would ship it: a CRD without `spec.allowRequestOverrides`."""
    chart = tmp_path / "backstop"
    shutil.copytree(CHART, chart)
    crd_file = chart / "files" / "fallbackpolicy.yaml"
    crd = yaml.safe_load(crd_file.read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    del spec["properties"]["allowRequestOverrides"]
    crd_file.write_text(yaml.safe_dump(crd))
    return chart


POLICY_WITH_NEW_FIELD = """
apiVersion: backstop.dev/v1alpha1
kind: FallbackPolicy
metadata: {name: newer, namespace: default}
spec:
  providers: [{name: a, type: mock}]
  routes: [{model: chat, chain: [{provider: a, model: m}]}]
  allowRequestOverrides: [drill]
"""


def test_0_a_helm_upgrade_applies_a_crd_that_adds_a_field(facts, tmp_path):
    helm("install", "backstop", str(previous_chart(tmp_path)), "--namespace", RELEASE_NAMESPACE, "--create-namespace",
         *RELEASE_VALUES, "--set", "webhook.enabled=false", "--wait", "--timeout", "180s", timeout=240)
    refused = kubectl("apply", "-f", "-", stdin=POLICY_WITH_NEW_FIELD, check=False)
    assert refused.returncode != 0 and "allowRequestOverrides" in refused.stderr, refused.stderr
    helm("upgrade", "backstop", str(CHART), "--namespace", RELEASE_NAMESPACE, *RELEASE_VALUES,
         "--set", "webhook.enabled=false", "--wait", "--timeout", "180s", timeout=240)
    apply(POLICY_WITH_NEW_FIELD)
    kubectl("delete", "fallbackpolicy", "newer", "-n", "default")
    helm("uninstall", "backstop", "--namespace", RELEASE_NAMESPACE, "--wait", "--timeout", "120s", timeout=180)
    assert get("crd", "fallbackpolicies.backstop.dev", check=False) is not None, "the CRD outlives the release"


def sidecars_reconnected():
    return WORKLOAD.sidecars_connected()


def test_1_helm_install_brings_up_both_operator_replicas_the_lease_and_the_crd(facts):
    helm("install", "backstop", str(CHART), "--namespace", RELEASE_NAMESPACE, "--create-namespace", *RELEASE_VALUES,
         "--wait", "--timeout", "180s", timeout=240)
    deployment = get("deployment", "backstop", namespace=RELEASE_NAMESPACE)
    assert deployment["status"].get("readyReplicas") == 2, deployment["status"]
    operator_pods = {p["metadata"]["name"] for p in running_pods(RELEASE_NAMESPACE, {"app.kubernetes.io/component": "operator"})}
    holder, took = until("one of the replicas to hold the Lease", lambda: (h := lease_holder()) in operator_pods and h,
                         timeout=60)
    crd = get("crd", "fallbackpolicies.backstop.dev")
    assert any(c["type"] == "Established" and c["status"] == "True" for c in crd["status"]["conditions"])
    pdb = get("pdb", "backstop", namespace=RELEASE_NAMESPACE)
    assert pdb["spec"]["minAvailable"] == 1
    # The image runs as the Dockerfile says: non-root, read-only root file system.
    (pod, *_) = running_pods(RELEASE_NAMESPACE, {"app.kubernetes.io/component": "operator"})
    assert pod["spec"]["securityContext"]["runAsUser"] == 65532
    assert pod["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    facts["leader"] = holder


def test_2_a_labelled_namespace_and_a_policy_become_ready(facts):
    kubectl("create", "namespace", SHOP)
    kubectl("label", "namespace", SHOP, "backstop.dev/inject=enabled")
    apply(WORKLOAD.upstream("primary", "fail") + WORKLOAD.upstream("backup", "ok")
          + [WORKLOAD.keys_secret("sk-primary-1", "sk-backup-1")])
    apply(WORKLOAD.policy())
    ready, took = until("the policy to be Ready", lambda: any(
        c["type"] == "Ready" and c["status"] == "True" for c in policy_status().get("conditions", [])), timeout=60)
    for name in ("primary", "backup"):
        kubectl("rollout", "status", f"deployment/{name}", "-n", SHOP, "--timeout=90s", timeout=100)
    printed = kubectl("get", "fbp", "-n", SHOP).stdout
    assert "support-bot" in printed and "True" in printed, printed
    facts["ready_after_s"] = round(took, 1)


def test_3_an_app_using_only_the_sdk_variable_gets_the_sidecar_and_is_answered_by_the_backup(facts):
    apply(WORKLOAD.app(1))
    kubectl("rollout", "status", "deployment/support-bot", "-n", SHOP, "--timeout=120s", timeout=130)
    (pod,) = running_pods(SHOP, APP)
    (sidecar,) = [c for c in pod["spec"]["initContainers"] if c["name"] == "backstop"]
    assert sidecar["restartPolicy"] == "Always", "a native sidecar"
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["OPENAI_BASE_URL"] == "http://127.0.0.1:7400/v1"
    # The sidecar was started, and ready, before the app's container started.
    statuses = {s["name"]: s for s in pod["status"]["initContainerStatuses"] + pod["status"]["containerStatuses"]}
    assert statuses["backstop"]["ready"] and statuses["backstop"]["started"]
    assert statuses["backstop"]["state"]["running"]["startedAt"] <= statuses["app"]["state"]["running"]["startedAt"]
    stats, took = until("the app's calls to be answered", lambda: (
        s := app_stats()) and all(v["answered"] >= 10 for v in s.values()) and s, timeout=60)
    (only,) = stats.values()
    assert only["firstCall"].startswith("ok"), only["firstCall"]
    assert only["failed"] == 0, only["failures"]
    assert set(only["providers"]) == {"backup/backup-model"}, only["providers"]
    assert only["passthrough"] == 0
    # The policy counts the sidecar.
    until("status to count the sidecar", lambda: sidecars_connected(1), timeout=30)
    printed = kubectl("get", "fbp", "-n", SHOP).stdout
    facts["answered"], facts["failed"] = only["answered"], only["failed"]
    facts["printed"] = printed.splitlines()[-1]


def test_4_one_pod_seeing_the_primary_fail_takes_it_out_for_the_other_within_a_second(facts):
    # Two replicas, quiet; the primary is healthy again and closed everywhere.
    apply(WORKLOAD.app(2, interval="0s"))
    kubectl("rollout", "status", "deployment/support-bot", "-n", SHOP, "--timeout=120s", timeout=130)
    set_upstream("primary", "ok")
    until("status to count both sidecars", lambda: sidecars_connected(2), timeout=60)
    first, second = sorted(running_pods(SHOP, APP), key=lambda p: p["metadata"]["name"])

    def primary_at(pod):
        health = http_json("GET", f"http://{pod['status']['podIP']}:7401/health")
        return next(t for t in health["targets"] if t["target"].startswith("primary/"))

    def closed_everywhere():
        # Calls from both pods let the fleet's probes through and close the primary.
        for pod in (first, second):
            http("POST", f"http://{pod['status']['podIP']}:8080/call?n=2")
        time.sleep(0.5)
        return all(primary_at(pod)["state"] == "closed" for pod in (first, second))

    until("the primary to be closed at both pods", closed_everywhere, timeout=90, every=0.5)
    set_upstream("primary", "fail")
    started = time.monotonic()
    http("POST", f"http://{first['status']['podIP']}:8080/call?n=8")
    opened, took = until("the second pod to hold the primary open", lambda: (
        t := primary_at(second))["state"] == "open" and t, timeout=10, every=0.05)
    assert opened["openedBecause"].startswith("fleet:"), opened
    since_failures = time.monotonic() - started
    # The second pod now sends its calls to the backup without trying the primary.
    before = len(http_json("GET", f"{upstream_pod('primary')}/stats")["calls"])
    http("POST", f"http://{second['status']['podIP']}:8080/call?n=5")
    time.sleep(2)
    calls = http_json("GET", f"{upstream_pod('primary')}/stats")["calls"][before:]
    assert not [c for c in calls if c["from"] == second["status"]["podIP"]], calls
    stats = app_stats()[second["metadata"]["name"]]
    assert stats["failed"] == 0 and stats["providers"].get("backup/backup-model", 0) >= 5, stats
    targets, _ = until("status to show the primary open", lambda: [
        t for t in policy_status().get("targets", []) if t["target"].startswith("primary/") and t["state"] == "Open"],
        timeout=10)
    assert "state: Open" in kubectl("get", "fbp", "support-bot", "-n", SHOP, "-o", "yaml").stdout
    facts["second_pod_open_after_s"] = round(since_failures, 2)
    assert since_failures < 3.0, f"the second pod heard of the outage after {since_failures:.2f}s"


def test_5_deleting_the_leading_operator_pod_under_load_fails_no_app_call(facts):
    for pod in running_pods(SHOP, APP):
        http("PUT", f"http://{pod['status']['podIP']}:8080/load?interval=50ms")
    load = WORKLOAD.load()
    leader = lease_holder()
    deleted_at = time.monotonic()
    kubectl("delete", "pod", leader, "-n", RELEASE_NAMESPACE, "--wait=false")
    new_leader, took = until("another replica to lead", lambda: (h := lease_holder()) and h != leader and h,
                             timeout=60)
    facts["new_leader_after_s"] = round(took, 1)
    kubectl("rollout", "status", "deployment/backstop", "-n", RELEASE_NAMESPACE, "--timeout=120s", timeout=130)
    _, reconnected = until("every sidecar to be connected again", sidecars_reconnected, timeout=60)
    facts["sidecars_reconnected_after_s"] = round(reconnected, 1)
    until("both sidecars to be counted again", lambda: sidecars_connected(2), timeout=60)
    counted = load.after()
    facts.update(sent=counted["sent"], failed=counted["failed"], handover_s=round(time.monotonic() - deleted_at, 1))
    assert counted["sent"] > 100 and counted["failed"] == 0, counted["failures"]


def test_6_a_helm_upgrade_that_restarts_both_replicas_fails_no_app_call(facts):
    load = WORKLOAD.load()
    started = time.monotonic()
    helm("upgrade", "backstop", str(CHART), "--namespace", RELEASE_NAMESPACE, "--reuse-values",
         "--set", "operator.logFormat=text", "--wait", "--timeout", "180s", timeout=240)
    kubectl("rollout", "status", "deployment/backstop", "-n", RELEASE_NAMESPACE, "--timeout=120s", timeout=130)
    until("every sidecar to be connected again", sidecars_reconnected, timeout=90)
    until("both sidecars to be counted again", lambda: sidecars_connected(2), timeout=90)
    counted = load.after()
    facts.update(sent=counted["sent"], failed=counted["failed"], rollout_s=round(time.monotonic() - started, 1))
    assert counted["sent"] > 100 and counted["failed"] == 0, counted["failures"]


def test_7_a_rotated_key_is_used_within_seconds_without_a_restart(facts):
    set_upstream("primary", "ok")
    # The fleet closes the primary once its open period ends and a probe passes.
    until("the apps to be answered by the primary again", lambda: all(
        v["providers"].get("primary/primary-model", 0) > 0 for v in app_stats().values()), timeout=120)
    restarts = {p["metadata"]["name"]: [s["restartCount"] for s in p["status"]["initContainerStatuses"]]
                for p in running_pods(SHOP, APP)}
    load = WORKLOAD.load()
    apply([WORKLOAD.keys_secret("sk-primary-2", "sk-backup-1")])

    def keys_now():
        calls = http_json("GET", f"{upstream_pod('primary')}/stats")["calls"]
        return {c["key"] for c in calls[-10:]}

    _, took = until("the primary to see only the new key", lambda: keys_now() == {"sk-primary-2"}, timeout=60)
    counted = load.after()
    after = {p["metadata"]["name"]: [s["restartCount"] for s in p["status"]["initContainerStatuses"]]
             for p in running_pods(SHOP, APP)}
    assert after == restarts, "no container restarted"
    facts.update(sent=counted["sent"], failed=counted["failed"], new_key_after_s=round(took, 1))
    assert counted["failed"] == 0, counted["failures"]


def test_8_helm_uninstall_leaves_running_apps_answering_and_new_pods_without_the_sidecar(facts):
    load = WORKLOAD.load()
    helm("uninstall", "backstop", "--namespace", RELEASE_NAMESPACE, "--wait", "--timeout", "120s", timeout=180)
    until("the operator pods to be gone", lambda: not pods(RELEASE_NAMESPACE, {"app.kubernetes.io/component": "operator"}),
          timeout=90)
    assert get("mutatingwebhookconfiguration", "backstop", check=False) is None
    counted = load.after(settle=5.0)
    facts.update(sent=counted["sent"], failed=counted["failed"])
    assert counted["sent"] > 50 and counted["failed"] == 0, counted["failures"]
    for pod in running_pods(SHOP, APP):
        health = http_json("GET", f"http://{pod['status']['podIP']}:7401/health")
        assert health["controlPlane"]["connected"] is False and health["passthrough"]["active"] is False, health
    # A new pod starts, without the sidecar.
    kubectl("scale", "deployment/support-bot", "-n", SHOP, "--replicas=3")
    (fresh,), _ = until("a third pod", lambda: [
        p for p in running_pods(SHOP, APP) if not any(
            c["name"] == "backstop" for c in p["spec"].get("initContainers", []))], timeout=90)
    assert "OPENAI_BASE_URL" not in {e["name"] for e in fresh["spec"]["containers"][0].get("env", [])}


def test_9_a_reinstall_keeps_the_ca_so_running_sidecars_reconnect(facts):
    helm("install", "backstop", str(CHART), "--namespace", RELEASE_NAMESPACE, *RELEASE_VALUES,
         "--wait", "--timeout", "180s", timeout=240)
    injected = [p for p in running_pods(SHOP, APP)
                if any(c["name"] == "backstop" for c in p["spec"].get("initContainers", []))]
    assert len(injected) == 2, "the pods injected under the first install"

    def reconnected():
        for pod in injected:
            link = http_json("GET", f"http://{pod['status']['podIP']}:7401/health")["controlPlane"]
            if not link["connected"] or link["untrusted"]:
                return False
        return True

    _, took = until("the first install's sidecars to verify the reinstalled operator", reconnected, timeout=90)
    facts["reconnected_after_s"] = round(took, 1)
