"""The soak: mixed streaming and whole calls from two app pods (every third call streams) for
BACKSTOP_SOAK_SECONDS (600 by default), a policy change every 10 s and a leader handover every
2 minutes (the Lease handed to the standby, as a rolling update does, with both processes living
on), with every app call answered. The operators' and a sidecar's memory, file descriptors,
threads and runtime tasks are read at the start and the end: flat is the goal."""

import json
import os
import time
from pathlib import Path

import pytest

from support import RELEASE_NAMESPACE, REPORT, apply, http, kubectl, running_pods, until
from test_3_chaos import CHAOS, OPERATOR, settled
from workload import LEASE, lease_holder

pytestmark = pytest.mark.usefixtures("chaos_workload")

SECONDS = int(os.environ.get("BACKSTOP_SOAK_SECONDS", "600"))


def process_of(pod_name, role):
    """The host pid of the backstop process (`operator` or `sidecar`) of `pod_name`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[:2] == [b"/usr/local/bin/backstop", role.encode()] and f"POD_NAME={pod_name}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no {role} process of pod {pod_name}")


def runtime_tasks(url):
    _, text, _ = http("GET", url)
    for line in text.splitlines():
        if line.startswith("backstop_runtime_tasks"):
            return int(float(line.rsplit(" ", 1)[1]))
    raise AssertionError(f"no backstop_runtime_tasks at {url}")


def sample(pid, metrics_url):
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {"rss_kib": int(status["VmRSS"].split()[0]), "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": int(status["Threads"]), "tasks": runtime_tasks(metrics_url)}


def samples():
    operators = {p["metadata"]["name"]: p for p in running_pods(RELEASE_NAMESPACE, OPERATOR)}
    sidecar_pod = sorted(CHAOS.pods(), key=lambda p: p["metadata"]["name"])[0]
    taken = {name: sample(process_of(name, "operator"), f"http://{pod['status']['podIP']}:7403/metrics")
             for name, pod in operators.items()}
    taken["sidecar"] = sample(process_of(sidecar_pod["metadata"]["name"], "sidecar"),
                              f"http://{sidecar_pod['status']['podIP']}:7401/metrics")
    return taken


def hand_over():
    """Gives the Lease to the replica that does not hold it, as a leader-transfer does."""
    holder = lease_holder()
    (other,) = [p["metadata"]["name"] for p in running_pods(RELEASE_NAMESPACE, OPERATOR)
                if p["metadata"]["name"] != holder]
    patch = {"spec": {"holderIdentity": other, "acquireTime": None}}
    kubectl("patch", "lease", LEASE, "-n", RELEASE_NAMESPACE, "--type=merge", "-p", json.dumps(patch))
    until("the other replica to lead", lambda: lease_holder() == other, timeout=30)
    return other


def test_soak(facts):
    settled()
    CHAOS.set_upstream("primary", "ok")
    CHAOS.pace("50ms", retries=0)
    start = samples()
    load = CHAOS.load()
    began = time.monotonic()
    changes = handovers = 0
    next_change, next_handover = began + 10, began + 120
    while time.monotonic() < began + SECONDS:
        now = time.monotonic()
        if now >= next_handover:
            hand_over()
            handovers += 1
            next_handover += 120
        if now >= next_change:
            # A real change each time: a new compiled version every sidecar applies.
            timeout = 30 + changes % 2
            apply(CHAOS.policy(extra=f"  timeouts: {{attempt: {timeout}s}}"))
            changes += 1
            next_change += 10
        time.sleep(max(0.0, min(next_change, next_handover) - time.monotonic()))
    counted = load.after()
    settled()
    end = samples()
    facts.update(soak_s=SECONDS, sent=counted["sent"], failed=counted["failed"], policy_changes=changes,
                 handovers=handovers)
    report = json.loads(REPORT.read_text()) if REPORT.exists() else {"steps": [], "facts": {}}
    report["facts"]["soak"] = {"start": start, "end": end, **facts}
    REPORT.write_text(json.dumps(report, indent=2))
    print(json.dumps({"start": start, "end": end}, indent=2))
    assert counted["failed"] == 0, counted["failures"]
    assert counted["sent"] > SECONDS * 30, "two pods at 20 calls a second each"
    status = CHAOS.policy_status()
    assert status["sidecars"]["current"] == 2, status
    for name in start:
        if name not in end:
            continue
        before, after = start[name], end[name]
        # Flat: what a leak would grow with calls, changes and handovers.
        assert after["fds"] <= before["fds"] + 16, (name, before, after)
        assert after["tasks"] <= before["tasks"] + 32, (name, before, after)
        assert after["rss_kib"] <= before["rss_kib"] * 1.5 + 16 * 1024, (name, before, after)
