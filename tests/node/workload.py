"""An LLM app and its providers in one namespace of the node: two fault upstreams (`primary`,
`backup`) behind Services, their keys in a Secret, a FallbackPolicy over them, and an app
Deployment that only knows the official OpenAI SDK's variables and counts every call it makes.
The user flow, the chaos suite and the soak each run one."""

import base64
import time

from support import RELEASE_NAMESPACE, apply, get, http, http_json, running_pods

APP_IMAGE = "backstop.test/testbed-app:1"
UPSTREAM_IMAGE = "backstop.test/testbed-upstream:1"
LEASE = "backstop"


class Workload:
    def __init__(self, namespace, app="support-bot"):
        self.namespace = namespace
        self.app_name = app
        self.labels = {"app": app}

    def upstream(self, name, mode):
        """A fault upstream Deployment and its Service, answering as `name`."""
        labels = {"app": name}
        return [
            {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": self.namespace},
             "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                      "template": {"metadata": {"labels": labels,
                                                # The upstreams are not LLM callers: no sidecar.
                                                "annotations": {"backstop.dev/inject": "disabled"}},
                                   "spec": {"containers": [{
                                       "name": "upstream", "image": UPSTREAM_IMAGE, "imagePullPolicy": "Never",
                                       "env": [{"name": "NAME", "value": name}, {"name": "MODE", "value": mode}],
                                       "ports": [{"containerPort": 8000}],
                                       "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8000},
                                                          "periodSeconds": 1},
                                   }]}}}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": self.namespace},
             "spec": {"selector": labels, "ports": [{"port": 8000, "targetPort": 8000}]}},
        ]

    def keys_secret(self, primary_key, backup_key):
        return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "llm-keys", "namespace": self.namespace},
                "type": "Opaque",
                "data": {"primary": base64.b64encode(primary_key.encode()).decode(),
                         "backup": base64.b64encode(backup_key.encode()).decode()}}

    def policy(self, extra=""):
        ns = self.namespace
        return f"""
apiVersion: backstop.dev/v1alpha1
kind: FallbackPolicy
metadata: {{name: {self.app_name}, namespace: {ns}}}
spec:
  selector: {{matchLabels: {{app: {self.app_name}}}}}
  providers:
    - name: primary
      type: openai-compatible
      baseUrl: http://primary.{ns}.svc.cluster.local:8000/v1
      apiKey: {{secretKeyRef: {{name: llm-keys, key: primary}}}}
    - name: backup
      type: openai-compatible
      baseUrl: http://backup.{ns}.svc.cluster.local:8000/v1
      apiKey: {{secretKeyRef: {{name: llm-keys, key: backup}}}}
  routes:
    - model: chat
      chain:
        - {{provider: primary, model: primary-model}}
        - {{provider: backup, model: backup-model}}
  retry: {{attempts: 1}}
  circuitBreaker: {{consecutiveFailures: 3, openFor: 5s, maxOpenFor: 10s, scope: fleet}}
{extra}"""

    def app(self, replicas, interval="100ms"):
        return {"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": self.app_name, "namespace": self.namespace},
                "spec": {"replicas": replicas, "selector": {"matchLabels": self.labels},
                         "template": {"metadata": {"labels": self.labels},
                                      "spec": {"terminationGracePeriodSeconds": 5, "containers": [{
                                          "name": "app", "image": APP_IMAGE, "imagePullPolicy": "Never",
                                          # Only what the official SDK reads: no Backstop setting.
                                          "env": [{"name": "OPENAI_API_KEY", "value": "sk-app-own-key"},
                                                  {"name": "LOAD_INTERVAL", "value": interval}],
                                          "ports": [{"containerPort": 8080}],
                                          "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080},
                                                             "periodSeconds": 1},
                                      }]}}}}

    def deploy(self, replicas=2, interval="100ms", primary="ok"):
        """Everything at once: upstreams, keys, policy, app."""
        apply(self.upstream("primary", primary) + self.upstream("backup", "ok")
              + [self.keys_secret("sk-primary-1", "sk-backup-1")])
        apply(self.policy())
        apply(self.app(replicas, interval))

    def pods(self):
        return running_pods(self.namespace, self.labels)

    def stats(self, pods=None):
        """Every running app pod's counts (or those of `pods`), by pod name."""
        return {p["metadata"]["name"]: http_json("GET", f"http://{p['status']['podIP']}:8080/stats")
                for p in (self.pods() if pods is None else pods)}

    def pace(self, interval, retries=None):
        query = f"interval={interval}" + (f"&retries={retries}" if retries is not None else "")
        for pod in self.pods():
            status, text, _ = http("PUT", f"http://{pod['status']['podIP']}:8080/load?{query}")
            assert status == 200, text

    def load(self):
        return Load(self)

    def upstream_url(self, name):
        (pod,) = running_pods(self.namespace, {"app": name})
        return f"http://{pod['status']['podIP']}:8000"

    def set_upstream(self, name, mode, status=503, period_ms=2000):
        status_code, text, _ = http("PUT", f"{self.upstream_url(name)}/control",
                                    {"mode": mode, "status": status, "periodMs": period_ms})
        assert status_code == 200, text

    def policy_status(self):
        return get("fallbackpolicy", self.app_name, namespace=self.namespace).get("status", {})

    def sidecars_current(self, expected):
        """True once the policy's status counts `expected` sidecars serving its version; until
        then it fails naming what the status says, for `until` to report."""
        counted = self.policy_status().get("sidecars", {})
        assert counted.get("current", 0) == expected, f"status.sidecars is {counted}"
        return True

    def sidecars_connected(self):
        """Whether every app pod's sidecar has its stream to the operator up."""
        return all(http_json("GET", f"http://{p['status']['podIP']}:7401/health")["controlPlane"]["connected"]
                   for p in self.pods())


class Load:
    """The apps' counts across a disruption: what was sent and failed in between. The app pods
    are those running when it starts, reached at their addresses: counting needs no API server."""

    def __init__(self, workload):
        self.workload = workload
        self.pods = workload.pods()
        self.before = workload.stats(self.pods)

    def after(self, settle=3.0):
        time.sleep(settle)  # calls in flight finish
        now = self.workload.stats(self.pods)
        delta = lambda key: sum(now[p][key] - self.before.get(p, {}).get(key, 0) for p in now)
        failures = [f for p in now for f in (now[p]["failures"] or [])[-5:]
                    if p not in self.before or f not in (self.before[p]["failures"] or [])]
        return {"sent": delta("sent"), "answered": delta("answered"), "failed": delta("failed"),
                "attempts_failed": delta("attemptsFailed"), "failures": failures}


def lease_holder():
    lease = get("lease", LEASE, namespace=RELEASE_NAMESPACE)
    return lease["spec"].get("holderIdentity")
