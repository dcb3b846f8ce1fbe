"""Telemetry as a GenAI-aware backend reads it: every `gen_ai.*` name the sidecar exports on its
spans and metrics is one the OpenTelemetry GenAI semantic conventions define (the registry as
`opentelemetry-semantic-conventions` ships it) and none is one they replaced; the other standard
names are the stable registry's. The app is the official OpenAI SDK; its request falls back once
to an OpenAI-compatible upstream that reports cached input tokens."""

import ast
import inspect
import json
import pathlib
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.semconv import attributes as stable_attributes
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes
from opentelemetry.semconv._incubating.metrics import gen_ai_metrics


def registry(module):
    """{name: docstring} of a semantic-conventions module's constants."""
    tree = ast.parse(inspect.getsource(module))
    names, body = {}, tree.body
    for node, after in zip(body, body[1:] + [None]):
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(getattr(node, "value", None), ast.Constant):
            value = node.value.value
            doc = after.value.value if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) else ""
            if isinstance(value, str):
                names[value] = doc if isinstance(doc, str) else ""
    return names


GEN_AI = {**registry(gen_ai_attributes), **registry(gen_ai_metrics)}
STABLE = {
    name
    for path in pathlib.Path(stable_attributes.__file__).parent.glob("*_attributes.py")
    for name in registry(__import__(f"opentelemetry.semconv.attributes.{path.stem}", fromlist=["_"]))
}


class Collector(BaseHTTPRequestHandler):
    """An OTLP/HTTP receiver: keeps every export's path and body."""

    received = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        Collector.received.append((self.path, body))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


class CachedUpstream(BaseHTTPRequestHandler):
    """An OpenAI-compatible server whose answers say 100 of their 120 input tokens were cached."""

    protocol_version = "HTTP/1.1"

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
        usage = {"prompt_tokens": 120, "completion_tokens": 8, "total_tokens": 128,
                 "prompt_tokens_details": {"cached_tokens": 100}}
        base = {"id": "chatcmpl-cached", "created": 1, "model": "backup-model-2026"}
        if request.get("stream"):
            events = [
                {**base, "object": "chat.completion.chunk",
                 "choices": [{"index": 0, "delta": {"role": "assistant", "content": "From the cache."}, "finish_reason": None}]},
                {**base, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
                {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage},
            ]
            body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
            kind = "text/event-stream"
        else:
            body = json.dumps({**base, "object": "chat.completion", "usage": usage, "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "From the cache."}, "finish_reason": "stop"}]})
            kind = "application/json"
        data = body.encode()
        self.send_response(200)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def servers():
    started = [ThreadingHTTPServer(("127.0.0.1", 0), handler) for handler in (Collector, CachedUpstream)]
    for server in started:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    Collector.received = []
    yield [f"127.0.0.1:{s.server_address[1]}" for s in started]
    for server in started:
        server.shutdown()
        server.server_close()


POLICY = """
apiVersion: backstop.dev/v1alpha1
kind: FallbackPolicy
metadata: {{name: conventions, namespace: tests}}
spec:
  providers:
    - {{name: primary, type: mock, mock: {{failureRate: 1, failureStatus: 500}}}}
    - {{name: backup, type: openai-compatible, baseUrl: "http://{upstream}/v1"}}
  routes:
    - model: chat
      chain: [{{provider: primary, model: gpt-4o}}, {{provider: backup, model: backup-model}}]
  retry: {{attempts: 1}}
"""


def exported(path, message):
    decoded = []
    for p, body in list(Collector.received):
        if p == path:
            request = message()
            request.ParseFromString(body)
            decoded.append(request)
    return decoded


def value(any_value):
    return getattr(any_value, any_value.WhichOneof("value")) if any_value.WhichOneof("value") else None


def test_every_gen_ai_name_is_the_conventions_own(sidecar, servers):
    collector, upstream = servers
    s = sidecar(POLICY.format(upstream=upstream), env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{collector}",
        "OTEL_METRIC_EXPORT_INTERVAL": "200",
    })
    app = openai.OpenAI(base_url=s.base_url, api_key="unused", max_retries=0, timeout=20)
    answer = app.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=32, temperature=0.3, seed=7)
    assert answer.choices[0].message.content == "From the cache."
    stream = app.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}], stream=True)
    assert "".join(e.choices[0].delta.content or "" for e in stream if e.choices) == "From the cache."

    deadline = time.monotonic() + 20
    while True:
        spans = [span for request in exported("/v1/traces", ExportTraceServiceRequest)
                 for resource in request.resource_spans for scope in resource.scope_spans for span in scope.spans]
        metrics = [metric for request in exported("/v1/metrics", ExportMetricsServiceRequest)
                   for resource in request.resource_metrics for scope in resource.scope_metrics
                   for metric in scope.metrics]
        names = {m.name for m in metrics}
        if len(spans) >= 6 and "gen_ai.client.operation.time_to_first_chunk" in names:
            break
        assert time.monotonic() < deadline, f"{len(spans)} spans and metrics {sorted(names)} arrived"
        time.sleep(0.1)

    # Every attribute key on spans, their events and metric points.
    keys = set()
    for span in spans:
        keys |= {kv.key for kv in span.attributes}
        keys |= {kv.key for event in span.events for kv in event.attributes}
    # Backstop's own metrics carry their own labels (`signal`, `mode`); the GenAI ones carry the
    # conventions' attributes.
    for metric in metrics:
        points = getattr(metric, metric.WhichOneof("data")).data_points
        labels = {kv.key for point in points for kv in point.attributes}
        keys |= labels if metric.name.startswith("gen_ai.") else {k for k in labels if k.startswith("gen_ai.")}
    gen_ai = sorted(k for k in keys | names if k.startswith("gen_ai."))
    unknown = [k for k in gen_ai if k not in GEN_AI]
    assert not unknown, f"not in the GenAI conventions: {unknown}"
    replaced = {k: GEN_AI[k] for k in gen_ai if "Replaced by" in GEN_AI[k]}
    assert not replaced, f"names the conventions replaced: {replaced}"
    standard = sorted(k for k in keys if not k.startswith(("gen_ai.", "backstop.")))
    assert [k for k in standard if k not in STABLE] == [], standard

    # What a backend shows without custom mapping: the operation, provider, models, tokens
    # (cached ones too), the app's parameters, the failure class and the first chunk's time.
    clients = [span for span in spans if span.kind == span.SPAN_KIND_CLIENT]
    answered = [{kv.key: value(kv.value) for kv in span.attributes} for span in clients
                if any(kv.key == "backstop.outcome" and value(kv.value) == "answered" for kv in span.attributes)]
    assert len(answered) == 2, answered
    for attrs in answered:
        assert attrs["gen_ai.operation.name"] == "chat"
        assert attrs["gen_ai.provider.name"] == "openai"
        assert attrs["gen_ai.request.model"] == "backup-model"
        assert attrs["gen_ai.response.model"] == "backup-model-2026"
        assert (attrs["gen_ai.usage.input_tokens"], attrs["gen_ai.usage.output_tokens"]) == (120, 8)
        assert attrs["gen_ai.usage.cache_read.input_tokens"] == 100
    assert sorted(a["gen_ai.request.stream"] for a in answered) == [False, True]
    assert [a for a in answered if a["gen_ai.request.stream"]][0]["gen_ai.response.time_to_first_chunk"] >= 0
    failed = [{kv.key: value(kv.value) for kv in span.attributes} for span in clients
              if any(kv.key == "error.type" for kv in span.attributes)]
    assert {a["error.type"] for a in failed} == {"serverError"}
    request = next({kv.key: value(kv.value) for kv in span.attributes} for span in spans
                   if span.kind == span.SPAN_KIND_SERVER
                   and any(kv.key == "gen_ai.request.max_tokens" for kv in span.attributes))
    assert (request["gen_ai.request.max_tokens"], request["gen_ai.request.temperature"],
            request["gen_ai.request.seed"]) == (32, 0.3, 7)
    assert {"gen_ai.client.operation.duration", "gen_ai.client.token.usage",
            "gen_ai.client.operation.time_to_first_chunk"} <= names
