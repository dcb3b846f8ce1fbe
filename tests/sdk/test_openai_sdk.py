"""The official OpenAI Python SDK and LangChain's ChatOpenAI, pointed at a real sidecar."""

import httpx
import openai
import pytest

REPLY = "Answered by the fallback target."

POLICY = """
apiVersion: backstop.dev/v1alpha1
kind: FallbackPolicy
metadata: {{name: sdk, namespace: tests}}
spec:
  providers:
    - {{name: primary, type: {primary}}}
    - {{name: fallback, type: mock, mock: {{reply: "{reply}", chunks: 5{fallback_extra}}}}}
  routes:
    - model: chat
      chain:
        - {{provider: primary, model: gpt-4o}}
        - {{provider: fallback, model: claude-sonnet-4-5}}
  timeouts: {{attempt: 2s, firstToken: 2s, total: 10s}}
"""

RATE_LIMITED = "mock, mock: {failureRate: 1, failureStatus: 429, retryAfter: 30}"


def policy(primary=RATE_LIMITED, fallback_extra=""):
    return POLICY.format(primary=primary, reply=REPLY, fallback_extra=fallback_extra)


def client(s):
    # The app's own key is a placeholder: the sidecar holds the real ones.
    return openai.OpenAI(base_url=s.base_url, api_key="unused", max_retries=0, timeout=20)


def test_non_streaming_falls_back_and_says_why(sidecar):
    s = sidecar(policy())
    raw = client(s).chat.completions.with_raw_response.create(
        model="chat", messages=[{"role": "user", "content": "hello"}], temperature=0.1)
    assert raw.headers["x-backstop-provider"] == "fallback"
    assert raw.headers["x-backstop-model"] == "claude-sonnet-4-5"
    assert raw.headers["x-backstop-fallback-reason"] == "primary/gpt-4o=rateLimited"
    completion = raw.parse()
    assert completion.choices[0].message.content == REPLY
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.total_tokens > 0


def test_streaming_falls_back_with_usage(sidecar):
    s = sidecar(policy())
    stream = client(s).chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hello"}], stream=True,
        stream_options={"include_usage": True})
    text, usage = "", None
    for event in stream:
        if event.choices:
            text += event.choices[0].delta.content or ""
        if event.usage:
            usage = event.usage
    assert text == REPLY
    assert usage is not None and usage.completion_tokens > 0


def test_models_lists_route_aliases(sidecar):
    s = sidecar(policy())
    assert [m.id for m in client(s).models.list()] == ["chat"]


def test_every_target_rate_limited_raises_rate_limit_error(sidecar):
    s = sidecar(policy(fallback_extra=", failureRate: 1, failureStatus: 429"))
    with pytest.raises(openai.RateLimitError) as caught:
        client(s).chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 429
    assert caught.value.response.headers["retry-after"] == "30"
    # the fallback sent no Retry-After, so it was retried once after a backoff
    assert [a["class"] for a in caught.value.body["attempts"]] == ["rateLimited"] * 3


def test_every_target_failing_raises_api_status_error(sidecar):
    s = sidecar(policy(primary="mock, mock: {failureRate: 1, failureStatus: 500}",
                       fallback_extra=", failureRate: 1, failureStatus: 401"))
    with pytest.raises(openai.APIStatusError) as caught:
        client(s).chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 502
    assert "authError" in caught.value.message


def test_malformed_requests_raise_bad_request_error(sidecar):
    s = sidecar(policy())
    with pytest.raises(openai.BadRequestError) as caught:
        client(s).chat.completions.create(model="chat", messages=[])
    assert "messages" in caught.value.message


def test_unknown_model_raises_not_found_error(sidecar):
    s = sidecar(policy())
    with pytest.raises(openai.NotFoundError):
        client(s).chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])


def test_a_stream_cut_after_its_first_token_raises(sidecar, cutting_upstream):
    s = sidecar(policy(primary=f'openai-compatible, baseUrl: "{cutting_upstream}"'))
    stream = client(s).chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hi"}], stream=True)
    text = ""
    with pytest.raises((openai.APIError, httpx.HTTPError)) as caught:
        for event in stream:
            if event.choices:
                text += event.choices[0].delta.content or ""
    assert text == "partial", "the first chunk reached the app before the cut"
    assert "interrupted" in str(caught.value)


def test_langchain_chat_openai(sidecar):
    from langchain_openai import ChatOpenAI

    s = sidecar(policy())
    llm = ChatOpenAI(model="chat", base_url=s.base_url, api_key="unused", max_retries=0)
    assert llm.invoke("hello").content == REPLY
    assert "".join(part.content for part in llm.stream("hello")) == REPLY


EMBED_POLICY = """
apiVersion: backstop.dev/v1alpha1
kind: FallbackPolicy
metadata: {name: embed, namespace: tests}
spec:
  providers:
    - {name: down, type: mock, mock: {failureRate: 1, failureStatus: 503}}
    - {name: up, type: mock}
  routes:
    - model: embed
      chain: [{provider: down, model: e1}, {provider: up, model: e2}]
  retry: {attempts: 1}
"""


def test_embeddings_fall_back(sidecar):
    s = sidecar(EMBED_POLICY)
    raw = client(s).embeddings.with_raw_response.create(model="embed", input=["alpha", "beta"], dimensions=4)
    assert raw.headers["x-backstop-provider"] == "up"
    result = raw.parse()
    assert [d.index for d in result.data] == [0, 1]
    assert all(len(d.embedding) == 4 for d in result.data)
    again = client(s).embeddings.create(model="embed", input="alpha", dimensions=4)
    assert again.data[0].embedding == result.data[0].embedding, "the same text embeds the same way"


def test_stateless_responses_fall_back(sidecar):
    s = sidecar(policy())
    raw = client(s).responses.with_raw_response.create(
        model="chat", input="hello", instructions="Be brief.", store=False)
    assert raw.headers["x-backstop-fallback-reason"] == "primary/gpt-4o=rateLimited"
    response = raw.parse()
    assert response.status == "completed"
    assert response.output_text == REPLY
    assert response.usage.output_tokens > 0


def test_streamed_responses_with_the_sdk_helper(sidecar):
    s = sidecar(policy())
    deltas = []
    with client(s).responses.stream(model="chat", input="hello", store=False) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    assert "".join(deltas) == REPLY
    assert final.output_text == REPLY


def test_stateful_responses_need_an_openai_target(sidecar):
    s = sidecar(policy())
    with pytest.raises(openai.BadRequestError) as caught:
        client(s).responses.create(model="chat", input="hello")  # store defaults to true
    assert caught.value.code == "no_eligible_target"
    assert "stateful" in caught.value.message


def upstream_attempts(s):
    """Every attempt the sidecar made at any target, from its admin /health."""
    import json
    import urllib.request
    with urllib.request.urlopen(f"http://{s.admin}/health", timeout=5) as answer:
        health = json.load(answer)
    return sum(t["successes"] + sum(t["failures"].values()) for t in health["targets"])


def test_the_sdks_own_retries_do_not_walk_a_failed_chain_again(sidecar):
    # Both targets fail with errors the SDK would retry itself (5xx): at its default settings
    # (2 retries) it would send the whole chain three times. Backstop says not to.
    s = sidecar(policy(primary="mock, mock: {failureRate: 1, failureStatus: 500}",
                       fallback_extra=", failureRate: 1, failureStatus: 503"))
    default_sdk = openai.OpenAI(base_url=s.base_url, api_key="unused", timeout=20)
    with pytest.raises(openai.APIStatusError) as caught:
        default_sdk.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert caught.value.request.headers["x-stainless-retry-count"] == "0", "the SDK did not retry"
    walked = len(caught.value.body["attempts"])
    assert upstream_attempts(s) == walked, "one app call, one walk down the chain"


def test_the_sdk_retries_a_rate_limited_chain_after_the_wait_asked_for(sidecar):
    s = sidecar(policy(primary="mock, mock: {failureRate: 1, failureStatus: 429, retryAfter: 1}",
                       fallback_extra=", failureRate: 1, failureStatus: 429, retryAfter: 1"))
    default_sdk = openai.OpenAI(base_url=s.base_url, api_key="unused", timeout=20)
    with pytest.raises(openai.RateLimitError) as caught:
        default_sdk.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
    headers = caught.value.response.headers
    assert headers["x-should-retry"] == "true" and headers["retry-after"] == "1"
    # Every target asked for a second: the SDK's own two retries come after it. The first walk
    # tried each target twice; each retry finds them open or half-open and probes what the
    # breakers let through, never the whole chain again.
    assert caught.value.request.headers["x-stainless-retry-count"] == "2"
    attempts = upstream_attempts(s)
    assert 4 + 2 <= attempts < 3 * 4, attempts
