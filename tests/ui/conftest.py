"""Fixtures of the trace-UI tests: Arize Phoenix, an OpenTelemetry Collector between the sidecar
and it, and the real sidecar (the SDK tests' launcher). Every server is started here, on ports
the OS picks, and stopped by its pid."""

import importlib.util
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
ARTIFACTS = pathlib.Path(os.environ.get("BACKSTOP_ARTIFACTS", ROOT / "target" / "artifacts"))

_spec = importlib.util.spec_from_file_location("backstop_sdk_fixtures", ROOT / "tests" / "sdk" / "conftest.py")
_sdk = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_sdk)
sidecar = _sdk.sidecar


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what, check, seconds=60):
    deadline = time.monotonic() + seconds
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {seconds} s")
        time.sleep(0.2)


class Server:
    """A server process of a test: its output in `log_path`, waited for until `ready()` holds,
    stopped by its pid."""

    def __init__(self, name, command, log_path, ready, seconds, env=None):
        self.name, self.log_path = name, pathlib.Path(log_path)
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=self.log,
                                        stderr=subprocess.STDOUT)

        def answering():
            if self.process.poll() is not None:
                raise AssertionError(f"{name} exited: {self.output()[-3000:]}")
            return ready()

        try:
            wait_until(f"{name} answers", answering, seconds)
        except AssertionError:
            self.stop()
            raise

    def output(self):
        return self.log_path.read_text()

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def listening(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


class Phoenix(Server):
    """A Phoenix server: OTLP/HTTP in at `/v1/traces`, its UI and GraphQL API on the same port."""

    def __init__(self, directory):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "PHOENIX_HOST": "127.0.0.1",
            "PHOENIX_PORT": str(self.port),
            "PHOENIX_GRPC_PORT": str(free_port()),
            "PHOENIX_WORKING_DIR": str(directory),
            "PHOENIX_TELEMETRY_ENABLED": "false",
            "PHOENIX_ALLOW_EXTERNAL_RESOURCES": "false",
        }
        phoenix = pathlib.Path(sys.executable).with_name("phoenix")
        super().__init__("Phoenix", [str(phoenix), "serve"], pathlib.Path(directory) / "phoenix.log",
                         self._healthy, 120, env)

    def _healthy(self):
        try:
            return urllib.request.urlopen(f"{self.url}/healthz", timeout=2).status == 200
        except OSError:
            return False

    def graphql(self, query, **variables):
        request = urllib.request.Request(f"{self.url}/graphql", method="POST",
                                         data=json.dumps({"query": query, "variables": variables}).encode(),
                                         headers={"content-type": "application/json"})
        answer = json.load(urllib.request.urlopen(request, timeout=10))
        assert "errors" not in answer, answer
        return answer["data"]

    def project(self, name="default"):
        projects = self.graphql("query { projects { edges { node { id name } } } }")["projects"]["edges"]
        return next((p["node"]["id"] for p in projects if p["node"]["name"] == name), None)

    def trace(self, trace_id, spans):
        """The spans of a trace once `spans` of them arrived: name, status, status message and
        attributes (a nested dict, as Phoenix stores them)."""

        def arrived():
            project = self.project()
            if project is None:
                return None
            data = self.graphql(
                """query($id: ID!, $trace: ID!) { node(id: $id) { ... on Project { trace(traceId: $trace) {
                     spans(first: 50) { edges { node { name statusCode statusMessage attributes } } } } } } }""",
                id=project, trace=trace_id)
            found = data["node"]["trace"]
            edges = found["spans"]["edges"] if found else []
            return [dict(e["node"], attributes=json.loads(e["node"]["attributes"])) for e in edges] \
                if len(edges) >= spans else None

        return wait_until(f"{spans} spans of trace {trace_id} in Phoenix", arrived, 60)


@pytest.fixture(scope="module")
def phoenix():
    directory = tempfile.TemporaryDirectory()
    server = Phoenix(directory.name)
    yield server
    server.stop()
    directory.cleanup()


COLLECTOR_CONFIG = """
receivers:
  otlp:
    protocols:
      http: {{endpoint: "127.0.0.1:{receiver}"}}
processors:
  batch: {{timeout: 200ms}}
exporters:
  otlp_http/phoenix:
    endpoint: "{phoenix}"
  debug:
    verbosity: detailed
service:
  telemetry:
    metrics: {{level: none}}
  pipelines:
    traces: {{receivers: [otlp], processors: [batch], exporters: [otlp_http/phoenix]}}
    metrics: {{receivers: [otlp], processors: [batch], exporters: [debug]}}
    logs: {{receivers: [otlp], processors: [batch], exporters: [debug]}}
"""


class Collector(Server):
    """The Collector built by tests/tools/build: OTLP/HTTP in, traces to Phoenix, metrics and logs
    to its debug output (kept in `output()`)."""

    def __init__(self, binary, phoenix_url, directory):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        config = pathlib.Path(directory) / "collector.yaml"
        config.write_text(COLLECTOR_CONFIG.format(receiver=self.port, phoenix=phoenix_url))
        super().__init__("the Collector", [binary, "--config", str(config)], pathlib.Path(directory) / "collector.log",
                         lambda: listening(self.port), 30)


@pytest.fixture
def collector(phoenix):
    binary = os.environ.get("BACKSTOP_COLLECTOR") or shutil.which("otelcol-backstop")
    assert binary, "BACKSTOP_COLLECTOR names the Collector tests/tools/build collector makes"
    directory = tempfile.TemporaryDirectory()
    started = Collector(binary, phoenix.url, directory.name)
    yield started
    started.stop()
    directory.cleanup()
