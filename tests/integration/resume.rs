//! `midStream: continue`: a stream cut mid-sentence after its first chunk continues on the
//! next target that can continue it, in the same response, in both ingress formats, with the
//! text at the seam neither repeated nor lost; a tool-call stream never continues.

use serde_json::{Value, json};

use crate::support::{Fault, Upstream, Wire, post_stream, post_stream_with, text_of};

const SENTENCE: &str = "The quick brown fox jumps over the lazy dog.";
const BEGUN: &str = "The quick brown ";

/// A `chat` route from `first` to `second`, continuing broken streams unless `mid_stream` says
/// otherwise.
fn policy(first: &str, second: &str, mid_stream: &str) -> String {
    format!(
        r#"apiVersion: backstop.dev/v1alpha1
kind: FallbackPolicy
metadata: {{name: resume, namespace: tests}}
spec:
  providers:
    - {first}
    - {second}
  routes:
    - model: chat
      midStream: {mid_stream}
      chain:
        - {{provider: first, model: m1}}
        - {{provider: second, model: m2}}
  timeouts: {{attempt: 2s, firstToken: 2s, idle: 2s, total: 10s}}
"#
    )
}

fn openai_compatible(name: &str, upstream: &Upstream, continuation: &str) -> String {
    format!(r#"{{name: {name}, type: openai-compatible, baseUrl: "http://{}/v1"{continuation}}}"#, upstream.addr)
}

fn anthropic(name: &str, upstream: &Upstream) -> String {
    format!(r#"{{name: {name}, type: anthropic, baseUrl: "http://{}", apiKey: {{value: sk-ant-test}}}}"#, upstream.addr)
}

/// The text of an Anthropic Messages stream's `data` payloads.
fn messages_text(events: &[String]) -> String {
    events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter(|e| e["type"] == "content_block_delta")
        .filter_map(|e| e["delta"]["text"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test]
async fn an_openai_app_s_stream_cut_mid_sentence_is_finished_by_the_next_target_exactly_once() {
    let first = Upstream::speaking(Wire::Anthropic, vec![], Fault::CutMidStream(BEGUN)).await;
    let second = Upstream::speaking(Wire::Anthropic, vec![], Fault::Continue(SENTENCE)).await;
    let sidecar = crate::support::TestSidecar::start(&policy(
        &anthropic("first", &first),
        &anthropic("second", &second),
        "continue",
    ))
    .await;
    let mut request = crate::support::chat(true);
    request["stream_options"] = json!({"include_usage": true});
    let streamed = post_stream(&sidecar.url("/v1/chat/completions"), &request).await;

    assert_eq!(streamed.status, 200);
    assert!(streamed.broken.is_none(), "one clean stream: {:?}\n{}", streamed.broken, streamed.raw);
    assert!(streamed.done(), "it ends with [DONE]: {:?}", streamed.events);
    assert_eq!(streamed.text(), SENTENCE, "the prefix and the continuation, nothing repeated or lost");
    let comment = format!(
        ": backstop resumed: first/m1 broke (serverError) after {} characters; continued by second/m2",
        BEGUN.len()
    );
    assert!(streamed.raw.contains(&comment), "the seam is marked: {}", streamed.raw);
    let before_seam = streamed.raw.split(&comment).next().unwrap_or_default();
    assert!(before_seam.contains("brown "), "the comment sits at the seam: {}", streamed.raw);

    let sent = second.received();
    assert_eq!(sent.len(), 1);
    let last = sent[0].body["messages"].as_array().and_then(|m| m.last()).cloned().unwrap_or_default();
    assert_eq!(last["role"], "assistant", "{last}");
    assert_eq!(text_of(&last["content"]), "The quick brown", "a prefill without trailing space");
    let ids: Vec<Value> = streamed
        .events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .map(|chunk| chunk["id"].clone())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "one completion id throughout: {ids:?}");
    let usage =
        streamed.events.iter().filter_map(|e| serde_json::from_str::<Value>(e).ok()).find(|c| c["usage"].is_object());
    let usage = usage.expect("a usage chunk")["usage"].clone();
    assert_eq!(
        (usage["prompt_tokens"].as_u64(), usage["completion_tokens"].as_u64()),
        (Some(11 + 20), Some(1 + 4)),
        "both attempts' usage"
    );
    assert_eq!(streamed.header("x-backstop-provider"), Some("first"), "the headers went out with the first target");
}

#[tokio::test]
async fn an_anthropic_app_s_stream_cut_mid_sentence_continues_on_a_vllm_server() {
    let first = Upstream::start(Fault::CutMidStream(BEGUN)).await;
    let second = Upstream::start(Fault::Continue(SENTENCE)).await;
    let sidecar = crate::support::TestSidecar::start(&policy(
        &openai_compatible("first", &first, ""),
        &openai_compatible("second", &second, ", continuation: continueFinalMessage"),
        "continue",
    ))
    .await;
    let request = json!({"model": "chat", "max_tokens": 64, "stream": true,
                         "messages": [{"role": "user", "content": "a pangram, please"}]});
    let streamed =
        post_stream_with(&sidecar.url("/v1/messages"), &request, &[("anthropic-version", "2023-06-01")]).await;

    assert_eq!(streamed.status, 200);
    assert!(streamed.broken.is_none(), "one clean stream: {:?}\n{}", streamed.broken, streamed.raw);
    assert_eq!(messages_text(&streamed.events), SENTENCE);
    let kinds: Vec<String> = streamed
        .events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|e| e["type"].as_str().map(str::to_string))
        .collect();
    assert_eq!(kinds.iter().filter(|k| *k == "message_start").count(), 1, "{kinds:?}");
    assert_eq!(kinds.last().map(String::as_str), Some("message_stop"), "{kinds:?}");
    let delta = streamed
        .events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .find(|e| e["type"] == "message_delta")
        .expect("message_delta");
    assert_eq!(delta["usage"]["output_tokens"], 4, "the continuing attempt's (the cut one reported none): {delta}");

    let sent = second.received();
    assert_eq!(sent.len(), 1);
    let body = &sent[0].body;
    assert_eq!(
        (body["continue_final_message"].clone(), body["add_generation_prompt"].clone()),
        (json!(true), json!(false))
    );
    let last = body["messages"].as_array().and_then(|m| m.last()).cloned().unwrap_or_default();
    assert_eq!(last, json!({"role": "assistant", "content": "The quick brown"}));
}

#[tokio::test]
async fn a_tool_call_cut_mid_arguments_still_errors_and_nothing_is_continued() {
    let first = Upstream::start(Fault::CutMidToolCall).await;
    let second = Upstream::speaking(Wire::Anthropic, vec![], Fault::Continue(SENTENCE)).await;
    let sidecar = crate::support::TestSidecar::start(&policy(
        &openai_compatible("first", &first, ""),
        &anthropic("second", &second),
        "continue",
    ))
    .await;
    let mut request = crate::support::chat(true);
    request["tools"] = json!([{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]);
    let streamed = post_stream(&sidecar.url("/v1/chat/completions"), &request).await;

    assert!(streamed.broken.is_some(), "the app's SDK sees the cut: {}", streamed.raw);
    let error =
        streamed.events.iter().filter_map(|e| serde_json::from_str::<Value>(e).ok()).find(|e| e["error"].is_object());
    let error = error.expect("an error event");
    assert_eq!(error["error"]["code"], "stream_interrupted", "{error}");
    assert!(second.received().is_empty(), "a tool call is never continued");
}

#[tokio::test]
async fn without_a_target_that_can_continue_or_without_the_option_the_stream_fails_as_before() {
    // The next target speaks OpenAI's own API, which cannot continue an answer.
    let first = Upstream::start(Fault::CutMidStream(BEGUN)).await;
    let second = Upstream::start(Fault::Continue(SENTENCE)).await;
    let openai =
        format!(r#"{{name: second, type: openai, baseUrl: "http://{}/v1", apiKey: {{value: sk-test}}}}"#, second.addr);
    let sidecar =
        crate::support::TestSidecar::start(&policy(&openai_compatible("first", &first, ""), &openai, "continue")).await;
    let streamed = post_stream(&sidecar.url("/v1/chat/completions"), &crate::support::chat(true)).await;
    assert!(streamed.broken.is_some());
    assert_eq!(streamed.text(), BEGUN, "the text before the cut, and no more");
    assert!(streamed.raw.contains("not continued: no other target can continue an answer"), "{}", streamed.raw);
    assert!(second.received().is_empty());

    // The default, `fail`, never continues even where a target could.
    let first = Upstream::start(Fault::CutMidStream(BEGUN)).await;
    let second = Upstream::speaking(Wire::Anthropic, vec![], Fault::Continue(SENTENCE)).await;
    let sidecar = crate::support::TestSidecar::start(&policy(
        &openai_compatible("first", &first, ""),
        &anthropic("second", &second),
        "fail",
    ))
    .await;
    let streamed = post_stream(&sidecar.url("/v1/chat/completions"), &crate::support::chat(true)).await;
    assert!(streamed.broken.is_some());
    assert!(!streamed.raw.contains("backstop resumed"));
    assert!(second.received().is_empty());

    // An answer whose finish was already streamed is whole: a cut after it is not continued.
    let first = Upstream::start(Fault::CutAfterFinish(SENTENCE)).await;
    let second = Upstream::speaking(Wire::Anthropic, vec![], Fault::Continue(SENTENCE)).await;
    let sidecar = crate::support::TestSidecar::start(&policy(
        &openai_compatible("first", &first, ""),
        &anthropic("second", &second),
        "continue",
    ))
    .await;
    let streamed = post_stream(&sidecar.url("/v1/chat/completions"), &crate::support::chat(true)).await;
    assert_eq!(streamed.text(), SENTENCE, "once");
    assert!(second.received().is_empty(), "a finished answer is never continued");

    // An Anthropic app's stream from an Anthropic target is relayed as it is, so not armed.
    let first = Upstream::speaking(Wire::Anthropic, vec![], Fault::CutMidStream(BEGUN)).await;
    let second = Upstream::speaking(Wire::Anthropic, vec![], Fault::Continue(SENTENCE)).await;
    let sidecar = crate::support::TestSidecar::start(&policy(
        &anthropic("first", &first),
        &anthropic("second", &second),
        "continue",
    ))
    .await;
    let request =
        json!({"model": "chat", "max_tokens": 64, "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let streamed =
        post_stream_with(&sidecar.url("/v1/messages"), &request, &[("anthropic-version", "2023-06-01")]).await;
    assert!(streamed.broken.is_some(), "{}", streamed.raw);
    assert_eq!(messages_text(&streamed.events), BEGUN);
    assert!(second.received().is_empty());
}
