"""Chaos, under steady app load: whatever happens to the control plane, an app's calls are
answered. Each case counts the calls the apps sent, had answered and saw fail (with the SDK's
retries off, so every failure shows), and how many HTTP attempts failed beneath. The documented
outcome of every case is zero failed calls, except those the primary's own failures cause that
the chain cannot absorb (none here: the backup answers) and, for a restart of the sidecar
container itself, the calls in its restart window, which the SDK's default retries absorb."""

import os
import subprocess
import time

import pytest

from support import RELEASE_NAMESPACE, ROOT, apply, get, kubectl, running_pods, until
from workload import Workload, lease_holder

CHAOS = Workload("chaos", app="chaos-bot")
NODE_DIR = os.environ.get("BACKSTOP_NODE_DIR", "")
OPERATOR = {"app.kubernetes.io/component": "operator"}


def operators_ready(count=2):
    deployment = get("deployment", "backstop", namespace=RELEASE_NAMESPACE)
    return deployment["status"].get("readyReplicas", 0) == count


def settled():
    """Operators ready, every sidecar connected, status counting them: the state between cases."""
    until("both operator replicas ready", operators_ready, timeout=120)
    until("every sidecar connected", CHAOS.sidecars_connected, timeout=90)
    until("status to count the sidecars", lambda: CHAOS.sidecars_current(2), timeout=60)


def record(facts, counted, **more):
    facts.update({k: counted[k] for k in ("sent", "answered", "failed", "attempts_failed")}, **more)


def iptables(*args, check=True):
    return subprocess.run(["iptables", *args], capture_output=True, text=True, check=check)


pytestmark = pytest.mark.usefixtures("chaos_workload")


def test_chaos_1_the_leading_operator_pod_killed(facts):
    load = CHAOS.load()
    leader = lease_holder()
    kubectl("delete", "pod", leader, "-n", RELEASE_NAMESPACE, "--grace-period=0", "--force")
    _, took = until("another replica to lead", lambda: (h := lease_holder()) and h != leader, timeout=60)
    settled()
    counted = load.after()
    record(facts, counted, new_leader_after_s=round(took, 1))
    assert counted["failed"] == 0, counted["failures"]


def test_chaos_2_both_operator_pods_gone_for_60s(facts):
    load = CHAOS.load()
    kubectl("scale", "deployment/backstop", "-n", RELEASE_NAMESPACE, "--replicas=0")
    until("no operator pod", lambda: not running_pods(RELEASE_NAMESPACE, OPERATOR), timeout=60)
    time.sleep(60)
    during = load.after(settle=0)
    kubectl("scale", "deployment/backstop", "-n", RELEASE_NAMESPACE, "--replicas=2")
    settled()
    counted = load.after()
    record(facts, counted, failed_while_gone=during["failed"])
    assert counted["sent"] > 1000 and counted["failed"] == 0, counted["failures"]


def test_chaos_3_sidecars_cut_off_from_the_operator_for_60s(facts):
    load = CHAOS.load()
    apps = [p["status"]["podIP"] for p in CHAOS.pods()]
    iptables("-N", "BSTEST-CHAOS")
    try:
        iptables("-I", "FORWARD", "1", "-j", "BSTEST-CHAOS")
        for ip in apps:
            iptables("-A", "BSTEST-CHAOS", "-s", ip, "-p", "tcp", "--dport", "7402", "-j", "DROP")
        time.sleep(60)
        during = load.after(settle=0)
    finally:
        iptables("-D", "FORWARD", "-j", "BSTEST-CHAOS", check=False)
        iptables("-F", "BSTEST-CHAOS", check=False)
        iptables("-X", "BSTEST-CHAOS", check=False)
    _, took = until("every sidecar reconnected", CHAOS.sidecars_connected, timeout=90)
    counted = load.after()
    record(facts, counted, failed_while_cut=during["failed"], reconnected_after_s=round(took, 1))
    assert counted["failed"] == 0, counted["failures"]


def test_chaos_4_the_injected_sidecar_container_restarted(facts):
    # An app with the SDK's default retries (2), as most apps run.
    CHAOS.pace("50ms", retries=2)
    try:
        load = CHAOS.load()
        (pod, *_) = CHAOS.pods()
        (status,) = [s for s in pod["status"]["initContainerStatuses"] if s["name"] == "backstop"]
        container = status["containerID"].split("://", 1)[1]
        restarts = status["restartCount"]
        # As the kubelet stops a container it restarts: SIGTERM, the sidecar drains what is in
        # flight and exits, and the kubelet starts it again.
        subprocess.run(["ctr", "--address", f"{NODE_DIR}/containerd.sock", "-n", "k8s.io", "tasks", "kill",
                        "-s", "SIGTERM", container], check=True, capture_output=True)

        def restarted():
            fresh = get("pod", pod["metadata"]["name"], namespace=CHAOS.namespace)
            (now,) = [s for s in fresh["status"]["initContainerStatuses"] if s["name"] == "backstop"]
            return now["restartCount"] > restarts and now["ready"]

        _, took = until("the sidecar to be back", restarted, timeout=60)
        counted = load.after()
    finally:
        CHAOS.pace("50ms", retries=0)
    record(facts, counted, back_after_s=round(took, 1))
    assert counted["failed"] == 0, counted["failures"]


def test_chaos_5_the_primary_flapping_every_2s(facts):
    load = CHAOS.load()
    CHAOS.set_upstream("primary", "flap", status=503, period_ms=2000)
    time.sleep(30)
    CHAOS.set_upstream("primary", "ok")
    counted = load.after()
    record(facts, counted)
    assert counted["failed"] == 0, counted["failures"]


def test_chaos_6_a_secret_deleted_and_restored(facts):
    load = CHAOS.load()
    kubectl("delete", "secret", "llm-keys", "-n", CHAOS.namespace)
    until("the policy to say its Secret is missing", lambda: any(
        c["type"] == "Ready" and c["reason"] == "SecretNotFound" for c in CHAOS.policy_status().get("conditions", [])),
        timeout=30)
    time.sleep(15)
    apply([CHAOS.keys_secret("sk-primary-1", "sk-backup-1")])
    until("the policy to be Ready again", lambda: any(
        c["type"] == "Ready" and c["status"] == "True" for c in CHAOS.policy_status().get("conditions", [])),
        timeout=30)
    counted = load.after()
    record(facts, counted)
    assert counted["failed"] == 0, counted["failures"]


def test_chaos_7_a_policy_replaced_by_an_invalid_one_and_back(facts):
    load = CHAOS.load()
    apply(CHAOS.policy().replace("{provider: backup, model: backup-model}", "{provider: nope, model: backup-model}"))
    until("the policy to be refused", lambda: any(
        c["type"] == "Ready" and c["reason"] == "InvalidPolicy" for c in CHAOS.policy_status().get("conditions", [])),
        timeout=30)
    time.sleep(15)
    apply(CHAOS.policy())
    until("the policy to be Ready again", lambda: any(
        c["type"] == "Ready" and c["status"] == "True" for c in CHAOS.policy_status().get("conditions", [])),
        timeout=30)
    counted = load.after()
    record(facts, counted)
    assert counted["failed"] == 0, counted["failures"]


def test_chaos_8_the_api_server_unavailable_for_30s(facts):
    assert NODE_DIR, "BACKSTOP_NODE_DIR names the cluster's directory"
    load = CHAOS.load()
    subprocess.run([str(ROOT / "tests" / "cluster"), "stop", NODE_DIR, "kube-apiserver"], check=True,
                   capture_output=True)
    try:
        time.sleep(30)
        during = load.after(settle=0)
    finally:
        subprocess.run([str(ROOT / "tests" / "cluster"), "start", NODE_DIR, "kube-apiserver"], check=True,
                       capture_output=True)
    until("the API server to answer", lambda: kubectl("get", "--raw", "/readyz", check=False).returncode == 0,
          timeout=90)
    settled()
    counted = load.after()
    record(facts, counted, failed_while_down=during["failed"])
    assert counted["failed"] == 0, counted["failures"]
