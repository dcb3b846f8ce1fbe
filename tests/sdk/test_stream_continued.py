"""`midStream: continue` through the official SDKs: a stream cut mid-answer is finished by the
next target, and each SDK reads one clean stream whose text is the whole answer, the seam's SSE
comment included."""

import anthropic
import httpx
import openai
import pytest

SENTENCE = "The quick brown fox jumps over the lazy dog."

POLICY = """
apiVersion: backstop.dev/v1alpha1
kind: FallbackPolicy
metadata: {{name: sdk-continued, namespace: tests}}
spec:
  providers:
    - {{name: cut, type: mock, mock: {{reply: "{sentence}", chunks: 6, streamCutAfter: 3}}}}
    - {{name: whole, type: mock, mock: {{reply: "{sentence}", chunks: 4}}}}
  routes:
    - model: chat
      midStream: {mid_stream}
      chain:
        - {{provider: cut, model: gpt-4o}}
        - {{provider: whole, model: claude-sonnet-4-5}}
"""


def policy(mid_stream="continue"):
    return POLICY.format(sentence=SENTENCE, mid_stream=mid_stream)


def test_the_openai_sdk_reads_one_whole_answer(sidecar):
    s = sidecar(policy())
    client = openai.OpenAI(base_url=s.base_url, api_key="unused", max_retries=0, timeout=20)
    stream = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "a pangram"}], stream=True,
        stream_options={"include_usage": True})
    text, usage, finish = "", None, None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    assert text == SENTENCE
    assert finish == "stop"
    assert usage is not None and usage.completion_tokens > 0


def test_the_anthropic_sdk_reads_one_whole_answer(sidecar):
    s = sidecar(policy())
    client = anthropic.Anthropic(base_url=f"http://{s.llm}", api_key="unused", max_retries=0, timeout=20)
    with client.messages.stream(model="chat", max_tokens=64,
                                messages=[{"role": "user", "content": "a pangram"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == SENTENCE
    assert final.content[0].text == SENTENCE
    assert final.stop_reason == "end_turn"


def test_without_the_option_the_sdk_raises_at_the_cut(sidecar):
    s = sidecar(policy(mid_stream="fail"))
    client = openai.OpenAI(base_url=s.base_url, api_key="unused", max_retries=0, timeout=20)
    stream = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "a pangram"}], stream=True)
    text = ""
    with pytest.raises((openai.APIError, httpx.HTTPError)) as caught:
        for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
    assert "interrupted" in str(caught.value), "a cut stream is never a silently truncated answer"
    assert SENTENCE.startswith(text) and text != SENTENCE
