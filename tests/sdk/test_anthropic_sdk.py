"""The official Anthropic Python SDK, pointed at a real sidecar's Messages endpoint."""

import anthropic
import pytest

REPLY = "Answered by the fallback target."

POLICY = """
apiVersion: backstop.dev/v1alpha1
kind: FallbackPolicy
metadata: {{name: sdk, namespace: tests}}
spec:
  providers:
    - {{name: primary, type: mock, mock: {{failureRate: 1, failureStatus: {status}}}}}
    - {{name: fallback, type: mock, mock: {{reply: "{reply}", chunks: 4{fallback_extra}}}}}
  routes:
    - model: claude
      chain:
        - {{provider: primary, model: claude-sonnet-4-5}}
        - {{provider: fallback, model: gpt-4o}}
  retry: {{attempts: 1}}
"""


def policy(status=529, fallback_extra=""):
    return POLICY.format(status=status, reply=REPLY, fallback_extra=fallback_extra)


def client(s):
    # ANTHROPIC_BASE_URL points at the sidecar; the key lives in the policy.
    return anthropic.Anthropic(base_url=f"http://{s.llm}", api_key="unused", max_retries=0, timeout=20)


def test_messages_fall_back_and_say_why(sidecar):
    s = sidecar(policy())
    raw = client(s).messages.with_raw_response.create(
        model="claude", max_tokens=64, system="Be brief.", messages=[{"role": "user", "content": "hello"}])
    assert raw.headers["x-backstop-provider"] == "fallback"
    assert raw.headers["x-backstop-fallback-reason"] == "primary/claude-sonnet-4-5=overloaded"
    message = raw.parse()
    assert message.content[0].type == "text"
    assert message.content[0].text == REPLY
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens > 0


def test_streaming_with_the_sdk_helper(sidecar):
    s = sidecar(policy())
    with client(s).messages.stream(model="claude", max_tokens=64,
                                   messages=[{"role": "user", "content": "hello"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == REPLY
    assert final.content[0].text == REPLY
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens > 0


def test_every_target_overloaded_raises_overloaded_error(sidecar):
    s = sidecar(policy(fallback_extra=", failureRate: 1, failureStatus: 503"))
    with pytest.raises(anthropic.OverloadedError) as caught:
        client(s).messages.create(model="claude", max_tokens=16, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 529
    assert caught.value.body["error"]["type"] == "overloaded_error"


def test_rate_limits_raise_rate_limit_error(sidecar):
    s = sidecar(policy(status=429, fallback_extra=", failureRate: 1, failureStatus: 429"))
    with pytest.raises(anthropic.RateLimitError):
        client(s).messages.create(model="claude", max_tokens=16, messages=[{"role": "user", "content": "hi"}])


def test_malformed_requests_raise_bad_request_error(sidecar):
    s = sidecar(policy())
    with pytest.raises(anthropic.BadRequestError) as caught:
        client(s).messages.create(model="claude", max_tokens=16, messages=[])
    assert caught.value.body["error"]["type"] == "invalid_request_error"


def test_unknown_model_raises_not_found_error(sidecar):
    s = sidecar(policy())
    with pytest.raises(anthropic.NotFoundError):
        client(s).messages.create(model="nope", max_tokens=16, messages=[{"role": "user", "content": "hi"}])
