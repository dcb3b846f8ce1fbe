"""What the node tests share: the cluster's CLIs (the real kubectl and helm), the test app's
and fault upstream's own HTTP endpoints (reached at their pod IPs on the node's bridge), and
step timing for the closing report."""

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "backstop"
KUBECONFIG = os.environ.get("BACKSTOP_NODE_KUBECONFIG", "")
HELM = os.environ.get("BACKSTOP_HELM", "helm")
KUBECTL = os.environ.get("BACKSTOP_KUBECTL", "kubectl")
REPORT = Path(os.environ.get("BACKSTOP_NODE_REPORT", ROOT / "target" / "node-report.json"))
RELEASE_NAMESPACE = "backstop-system"


def run(*args, check=True, stdin=None, timeout=120):
    env = dict(os.environ, KUBECONFIG=KUBECONFIG)
    result = subprocess.run(list(args), input=stdin, capture_output=True, text=True, env=env, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def kubectl(*args, **kwargs):
    return run(KUBECTL, *args, **kwargs)


def helm(*args, **kwargs):
    return run(HELM, *args, **kwargs)


def apply(manifest):
    """`kubectl apply -f -` of a YAML document (or several)."""
    if isinstance(manifest, dict):
        manifest = [manifest]
    text = manifest if isinstance(manifest, str) else yaml.safe_dump_all(manifest)
    return kubectl("apply", "-f", "-", stdin=text)


def get(kind, name=None, namespace=None, check=True):
    args = ["get", kind] + ([name] if name else []) + ["-o", "json"]
    if namespace:
        args += ["-n", namespace]
    result = kubectl(*args, check=check)
    return json.loads(result.stdout) if result.returncode == 0 else None


def until(what, check, timeout=60.0, every=0.2):
    """Polls `check` until it returns something truthy; returns it and the seconds it took."""
    started = time.monotonic()
    last = None
    while time.monotonic() - started < timeout:
        try:
            last = check()
        except (AssertionError, OSError, ValueError, KeyError, subprocess.TimeoutExpired) as error:
            last = error
        else:
            if last:
                return last, time.monotonic() - started
        time.sleep(every)
    raise AssertionError(f"gave up after {timeout}s waiting for {what}; last: {last!r}")


def http(method, url, body=None, timeout=5):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(), dict(error.headers)


def http_json(method, url, body=None, timeout=5):
    status, text, _ = http(method, url, body, timeout)
    assert status == 200, f"{method} {url}: {status} {text}"
    return json.loads(text) if text else None


def pods(namespace, selector):
    return [p for p in get("pods", namespace=namespace)["items"] if all(
        p["metadata"].get("labels", {}).get(k) == v for k, v in selector.items())]


def running_pods(namespace, selector):
    return [p for p in pods(namespace, selector)
            if p["status"].get("phase") == "Running" and p["status"].get("podIP")
            and not p["metadata"].get("deletionTimestamp")
            and all(c.get("ready") for c in p["status"].get("containerStatuses", []))]


class Steps:
    """Each step's result and time, written to REPORT and printed at the end of the run."""

    def __init__(self):
        self.rows = []
        self.facts = {}

    def record(self, name, seconds, result, **facts):
        self.rows.append({"step": name, "seconds": round(seconds, 1), "result": result, **facts})
        REPORT.parent.mkdir(parents=True, exist_ok=True)
        REPORT.write_text(json.dumps({"steps": self.rows, "facts": self.facts}, indent=2))

    def table(self):
        lines = [f"{'step':58} {'result':7} {'seconds':>8}  facts"]
        for row in self.rows:
            facts = {k: v for k, v in row.items() if k not in ("step", "seconds", "result")}
            lines.append(f"{row['step']:58} {row['result']:7} {row['seconds']:8.1f}  {json.dumps(facts) if facts else ''}")
        return "\n".join(lines)


STEPS = Steps()
