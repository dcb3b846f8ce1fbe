"""A fallback, as a user looks at it: the sidecar's trace of a request that fell back twice,
opened in Phoenix's trace UI in a real browser (Debian's chromium, driven by Playwright), and
asserted through the text the page shows; then the same trace through an OpenTelemetry
Collector, as most clusters run one. The screenshot is written to target/artifacts."""

import json
import os
import shutil
import urllib.request

from conftest import ARTIFACTS, wait_until
from playwright.sync_api import expect, sync_playwright

POLICY = """
apiVersion: backstop.dev/v1alpha1
kind: FallbackPolicy
metadata: {name: support-bot, namespace: shop}
spec:
  providers:
    - {name: openai, type: mock, mock: {failureRate: 1, failureStatus: 429, latency: 40ms}}
    - {name: anthropic, type: mock, mock: {failureRate: 1, failureStatus: 503, latency: 60ms}}
    - {name: backup, type: mock, mock: {reply: "Refunds are accepted within 30 days.", latency: 120ms}}
  routes:
    - model: chat
      chain:
        - {provider: openai, model: gpt-4o}
        - {provider: anthropic, model: claude-sonnet-4-5}
        - {provider: backup, model: backup-model, price: {input: 2.5, output: 10}}
  retry: {attempts: 1}
"""

REASON = "openai/gpt-4o=rateLimited, anthropic/claude-sonnet-4-5=overloaded"


def ask(sidecar, trace_id):
    """One app call in the app's own trace; the answer and what it was billed."""
    request = urllib.request.Request(
        f"{sidecar.base_url}/chat/completions", method="POST",
        data=json.dumps({"model": "chat", "max_tokens": 64,
                         "messages": [{"role": "user", "content": "What is the refund policy?"}]}).encode(),
        headers={"content-type": "application/json", "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    with urllib.request.urlopen(request, timeout=20) as answer:
        assert answer.headers["x-backstop-fallback-reason"] == REASON
        body = json.load(answer)
    usage = body["usage"]
    return body, (usage["prompt_tokens"] * 2.5 + usage["completion_tokens"] * 10) / 1e6


def browser(playwright):
    executable = os.environ.get("BACKSTOP_CHROMIUM") or shutil.which("chromium")
    assert executable, "the trace-UI test needs Debian's chromium (apt-get install chromium)"
    # Root in CI needs --no-sandbox; every host but loopback fails to resolve, so the page
    # reaches nothing but the Phoenix under test.
    return playwright.chromium.launch(
        executable_path=executable,
        args=["--no-sandbox", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"])


def shown_attributes(page):
    """The open span's attributes as its table shows them: {key: value text}."""
    panel = page.get_by_role("tabpanel", name="Attributes")
    if not panel.is_visible():
        return {}
    rows = panel.evaluate("""panel => Array.from(panel.querySelectorAll('[role=row], tr'))
        .map(row => Array.from(row.querySelectorAll('[role=cell], td')).map(cell => cell.innerText.trim()))""")
    return {cells[0]: cells[1] for cells in rows if len(cells) == 2}


def open_span(page, name, target):
    """Opens span `name` from the trace tree on its attributes (those of the span that names
    `target`); returns them as the page shows them."""
    page.get_by_test_id("trace-tree").get_by_text(name, exact=True).click()
    page.get_by_role("tab", name="Attributes").click()
    return wait_until(f"the attributes of {name}",
                      lambda: (shown := shown_attributes(page)).get("backstop.target") == target and shown, 15)


def test_phoenix_shows_the_fallback_trace_with_each_attempt_and_why(sidecar, phoenix):
    s = sidecar(POLICY, env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": phoenix.url,
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
        "OTEL_SERVICE_NAME": "support-bot",
    })
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    body, cost = ask(s, trace_id)
    assert body["model"] == "backup-model"
    phoenix.trace(trace_id, 4)

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        chromium = browser(playwright)
        page = chromium.new_page(viewport={"width": 1920, "height": 1080})
        page.goto(f"{phoenix.url}/projects/{phoenix.project()}/traces/{trace_id}")

        # The trace tree: the request and its three attempts, the two failed ones marked.
        tree = page.get_by_test_id("trace-tree")
        for name in ("chat chat", "chat gpt-4o", "chat claude-sonnet-4-5", "chat backup-model"):
            expect(tree.get_by_text(name, exact=True)).to_be_visible(timeout=30_000)

        # The request: who answered, why it fell back (each failure class) and what it cost.
        shown = open_span(page, "chat chat", "backup/backup-model")
        expect(page.get_by_text("Error", exact=True)).to_have_count(0)  # the request itself answered
        assert shown["backstop.fallback_reason"] == REASON
        assert shown["backstop.outcome"] == "fell_through"
        assert shown["backstop.attempts"] == "3"
        assert abs(float(shown["backstop.cost"]) - cost) < 1e-12, shown["backstop.cost"]
        assert shown["gen_ai.response.model"] == "backup-model"
        page.screenshot(path=str(ARTIFACTS / "phoenix-fallback-trace.png"))

        # Each failed attempt: marked an error, with its failure class and the provider's status.
        for name, target, failure, status in (("chat gpt-4o", "openai/gpt-4o", "rateLimited", "429"),
                                              ("chat claude-sonnet-4-5", "anthropic/claude-sonnet-4-5", "overloaded",
                                               "503")):
            shown = open_span(page, name, target)
            expect(page.get_by_text("Error", exact=True)).to_have_count(1)  # this span's status
            assert (shown["error.type"], shown["http.response.status_code"]) == (failure, status)
            assert shown["backstop.outcome"] == "failed"

        # The answering attempt: its tokens, as the GenAI conventions name them, and its cost.
        shown = open_span(page, "chat backup-model", "backup/backup-model")
        assert shown["backstop.outcome"] == "answered"
        assert shown["gen_ai.usage.input_tokens"] == str(body["usage"]["prompt_tokens"])
        assert shown["gen_ai.usage.output_tokens"] == str(body["usage"]["completion_tokens"])
        assert abs(float(shown["backstop.cost"]) - cost) < 1e-12
        chromium.close()


def test_the_same_trace_arrives_through_a_collector(sidecar, phoenix, collector):
    s = sidecar(POLICY, env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
        "OTEL_METRIC_EXPORT_INTERVAL": "300",
        "OTEL_SERVICE_NAME": "support-bot",
    })
    trace_id = "5bf92f3577b34da6a3ce929d0e0e4737"
    ask(s, trace_id)
    spans = {span["name"]: span for span in phoenix.trace(trace_id, 4)}
    assert sorted(spans) == ["chat backup-model", "chat chat", "chat claude-sonnet-4-5", "chat gpt-4o"]
    request = spans["chat chat"]["attributes"]
    assert request["backstop"]["fallback_reason"] == REASON
    assert request["backstop"]["target"] == "backup/backup-model"
    for name, failure in (("chat gpt-4o", "rateLimited"), ("chat claude-sonnet-4-5", "overloaded")):
        assert spans[name]["statusCode"] == "ERROR"
        assert spans[name]["attributes"]["error"]["type"] == failure
    assert spans["chat backup-model"]["attributes"]["gen_ai"]["usage"]["output_tokens"] > 0

    # Metrics and log records went through the same Collector; the sidecar says nothing failed.
    wait_until("the sidecar's metrics and fall-through log records in the Collector's output",
               lambda: "gen_ai.client.operation.duration" in collector.output()
               and "Body: Str(fallback)" in collector.output(), 30)
    with urllib.request.urlopen(f"http://{s.admin}/health", timeout=5) as answer:
        exports = json.load(answer)["telemetry"]["otlp"]
    assert exports == {signal: {"failing": False, "dropped": 0} for signal in ("spans", "logs", "metrics")}, exports
