//! Cross-provider fallback over real sockets: an OpenAI-format request falls back from a
//! failing OpenAI target to Anthropic and Gemini targets, an Anthropic-format request falls back
//! to OpenAI, each upstream speaking its real wire format and checking what it receives.

use serde_json::{Value, json};

use crate::support::*;

fn policy(providers: &str, chain: &str, extra: &str) -> String {
    format!(
        r#"apiVersion: backstop.dev/v1alpha1
kind: FallbackPolicy
metadata: {{name: cross, namespace: tests}}
spec:
  providers:
{providers}
  routes:
    - model: chat
      chain: {chain}
  retry: {{attempts: 1}}
  timeouts: {{attempt: 2s, firstToken: 2s, total: 10s}}
{extra}"#
    )
}

fn messages_request(stream: bool) -> Value {
    json!({"model": "chat", "max_tokens": 64, "stream": stream, "system": "Be brief.",
           "messages": [{"role": "user", "content": "hello"}]})
}

/// Reads a Messages stream's named events.
fn event_names(answer: &Streamed) -> Vec<String> {
    answer
        .events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| v["type"].as_str().map(str::to_string))
        .collect()
}

fn messages_text(answer: &Streamed) -> String {
    answer
        .events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter(|v| v["type"] == "content_block_delta")
        .filter_map(|v| v.pointer("/delta/text").and_then(Value::as_str).map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_request_falls_back_from_openai_to_anthropic() {
    let openai = Upstream::start(Fault::status(500)).await;
    let anthropic = Upstream::speaking(Wire::Anthropic, vec![], Fault::Ok).await;
    let providers = format!(
        "    - {{name: oai, type: openai-compatible, baseUrl: \"{}\"}}\n    - {{name: claude, type: anthropic, baseUrl: \"http://{}\", apiKey: {{value: sk-ant-test}}, defaultMaxTokens: 777}}",
        openai.base_url(),
        anthropic.addr
    );
    let sidecar = TestSidecar::start(&policy(
        &providers,
        "[{provider: oai, model: gpt-4o}, {provider: claude, model: claude-sonnet-4-5}]",
        "",
    ))
    .await;
    let url = sidecar.url("/v1/chat/completions");
    let body = json!({"model": "chat", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}], "temperature": 0.5});

    let answer = post(&url, &body).await;
    assert_eq!(answer.status, 200, "{}", String::from_utf8_lossy(&answer.body));
    assert_eq!(answer.text(), "from anthropic");
    assert_eq!(answer.json()["object"], "chat.completion");
    assert_eq!(answer.json()["usage"]["prompt_tokens"], 11);
    assert_eq!(answer.header("x-backstop-fallback-reason"), Some("oai/gpt-4o=serverError"));

    let streamed = post_stream(&url, &json!({"model": "chat", "messages": [{"role": "user", "content": "hello"}], "stream": true, "stream_options": {"include_usage": true}})).await;
    assert!(streamed.done(), "{streamed:?}");
    assert_eq!(streamed.text(), "from anthropic");
    let last_chunk: Value = serde_json::from_str(&streamed.events[streamed.events.len() - 2]).expect("usage chunk");
    assert_eq!(last_chunk["usage"]["completion_tokens"], 3, "{last_chunk}");

    let received = anthropic.received();
    assert_eq!(received.len(), 2);
    let first = &received[0];
    assert_eq!(first.path, "/v1/messages");
    assert_eq!(first.headers.get("x-api-key").and_then(|v| v.to_str().ok()), Some("sk-ant-test"));
    assert_eq!(first.headers.get("anthropic-version").and_then(|v| v.to_str().ok()), Some("2023-06-01"));
    assert!(first.headers.get("authorization").is_none());
    assert_eq!(first.body["model"], "claude-sonnet-4-5");
    assert_eq!(first.body["system"], "Be brief.", "the system prompt is lifted out of the messages");
    assert_eq!(first.body["messages"], json!([{"role": "user", "content": [{"type": "text", "text": "hello"}]}]));
    assert_eq!(first.body["max_tokens"], 777, "the policy's default fills max_tokens");
    assert_eq!(first.body["temperature"], 0.5);
    assert_eq!(received[1].body["stream"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_request_falls_back_from_anthropic_to_openai() {
    let overloaded = Fault::Status {
        status: 529,
        body: json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
        headers: vec![],
    };
    let anthropic = Upstream::speaking(Wire::Anthropic, vec![], overloaded).await;
    let openai = Upstream::start(Fault::Ok).await;
    let providers = format!(
        "    - {{name: claude, type: anthropic, baseUrl: \"http://{}\", apiKey: {{value: sk-ant}}}}\n    - {{name: oai, type: openai-compatible, baseUrl: \"{}\", apiKey: {{value: sk-oai}}}}",
        anthropic.addr,
        openai.base_url()
    );
    let sidecar = TestSidecar::start(&policy(
        &providers,
        "[{provider: claude, model: claude-sonnet-4-5}, {provider: oai, model: gpt-4o}]",
        "",
    ))
    .await;
    let url = sidecar.url("/v1/messages");

    let answer = post(&url, &messages_request(false)).await;
    assert_eq!(answer.status, 200, "{}", String::from_utf8_lossy(&answer.body));
    let message = answer.json();
    assert_eq!(message["type"], "message");
    assert_eq!(message["content"], json!([{"type": "text", "text": "from upstream"}]));
    assert_eq!(message["stop_reason"], "end_turn");
    assert_eq!(message["usage"], json!({"input_tokens": 3, "output_tokens": 2}));
    assert_eq!(answer.header("x-backstop-fallback-reason"), Some("claude/claude-sonnet-4-5=overloaded"));

    let streamed = post_stream(&url, &messages_request(true)).await;
    assert!(streamed.broken.is_none());
    assert_eq!(messages_text(&streamed), "from upstream");
    let names = event_names(&streamed);
    assert_eq!(names.first().map(String::as_str), Some("message_start"));
    assert_eq!(names.last().map(String::as_str), Some("message_stop"));
    assert!(
        names.contains(&"content_block_stop".to_string()) && names.contains(&"message_delta".to_string()),
        "{names:?}"
    );

    let sent = &openai.received()[0].body;
    assert_eq!(sent["model"], "gpt-4o");
    assert_eq!(
        sent["messages"],
        json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}])
    );
    assert_eq!(sent["max_completion_tokens"], 64);
    assert_eq!(openai.received()[1].body["stream_options"], json!({"include_usage": true}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_to_anthropic_passes_unknown_fields_and_answers_untouched() {
    let anthropic = Upstream::speaking(Wire::Anthropic, vec![], Fault::Ok).await;
    let providers = format!(
        "    - {{name: claude, type: anthropic, baseUrl: \"http://{}\", apiKey: {{value: sk-ant}}, apiVersion: \"2023-06-01\"}}",
        anthropic.addr
    );
    let sidecar = TestSidecar::start(&policy(&providers, "[{provider: claude, model: claude-opus-4-1}]", "")).await;
    let mut body = messages_request(false);
    body["thinking"] = json!({"type": "enabled", "budget_tokens": 1024});
    body["top_k"] = json!(5);
    body["messages"][0]["content"] = json!([{"type": "text", "text": "hello", "cache_control": {"type": "ephemeral"}}]);
    let answer =
        post_raw(&sidecar.url("/v1/messages"), body.to_string(), &[("anthropic-beta", "context-1m-2025-08-07")]).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.json()["vendor_extra"], "kept", "same API: the answer is passed through untouched");
    let beta = anthropic.received()[0].headers.get("anthropic-beta").and_then(|v| v.to_str().ok()).map(str::to_string);
    assert_eq!(beta.as_deref(), Some("context-1m-2025-08-07"), "the app's beta header reaches an Anthropic target");
    let mut expected = body.clone();
    expected["model"] = json!("claude-opus-4-1");
    assert_eq!(anthropic.received()[0].body, expected, "same API: the request is passed through but for the model");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_request_is_answered_by_gemini() {
    let gemini = Upstream::speaking(Wire::Gemini, vec![], Fault::Ok).await;
    let providers = format!(
        "    - {{name: g, type: gemini, baseUrl: \"http://{}/v1beta\", apiKey: {{value: g-key}}}}",
        gemini.addr
    );
    let sidecar = TestSidecar::start(&policy(&providers, "[{provider: g, model: gemini-2.5-flash}]", "")).await;
    let url = sidecar.url("/v1/chat/completions");
    let answer =
        post(&url, &json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20})).await;
    assert_eq!(answer.status, 200, "{}", String::from_utf8_lossy(&answer.body));
    assert_eq!(answer.text(), "from gemini");
    let streamed = post_stream(&url, &chat(true)).await;
    assert!(streamed.done());
    assert_eq!(streamed.text(), "from gemini");
    let received = gemini.received();
    assert_eq!(received[0].path, "/v1beta/models/gemini-2.5-flash:generateContent");
    assert_eq!(received[1].path, "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse");
    assert_eq!(received[0].headers.get("x-goog-api-key").and_then(|v| v.to_str().ok()), Some("g-key"));
    assert_eq!(received[0].body["contents"], json!([{"role": "user", "parts": [{"text": "hi"}]}]));
    assert_eq!(received[0].body["generationConfig"]["maxOutputTokens"], 20);
    // And through the Anthropic ingress too.
    let streamed = post_stream(&sidecar.url("/v1/messages"), &messages_request(true)).await;
    assert_eq!(messages_text(&streamed), "from gemini");
    assert_eq!(received[0].body.get("model"), None, "Gemini names the model in the URL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_openai_uses_deployment_urls_and_api_key() {
    let azure = Upstream::start(Fault::Ok).await;
    let providers = format!(
        "    - {{name: az, type: azure-openai, baseUrl: \"http://{}\", apiKey: {{value: az-key}}, apiVersion: \"2024-10-21\"}}",
        azure.addr
    );
    let sidecar = TestSidecar::start(&policy(&providers, "[{provider: az, model: gpt-4o-prod}]", "")).await;
    let answer = post(&sidecar.url("/v1/chat/completions"), &chat(false)).await;
    assert_eq!(answer.status, 200);
    let received = &azure.received()[0];
    assert_eq!(received.path, "/openai/deployments/gpt-4o-prod/chat/completions?api-version=2024-10-21");
    assert_eq!(received.headers.get("api-key").and_then(|v| v.to_str().ok()), Some("az-key"));
    assert!(received.headers.get("authorization").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_content_filter_falls_to_the_on_content_filtered_chain() {
    let filtered = Fault::Status {
        status: 400,
        body: json!({"error": {"code": "content_filter", "message": "The response was filtered due to the prompt triggering Azure OpenAI's content management policy.",
                               "innererror": {"code": "ResponsibleAIPolicyViolation"}}}),
        headers: vec![],
    };
    let azure = Upstream::start(filtered).await;
    let providers = format!(
        "    - {{name: az, type: azure-openai, baseUrl: \"http://{}\", apiKey: {{value: k}}}}\n    - {{name: m, type: mock, mock: {{reply: unfiltered}}}}",
        azure.addr
    );
    let chain = "[{provider: az, model: gpt-4o}]\n      onContentFiltered: [{provider: m, model: other}]";
    let sidecar = TestSidecar::start(&policy(&providers, chain, "")).await;
    let answer = post(&sidecar.url("/v1/chat/completions"), &chat(false)).await;
    assert_eq!((answer.status, answer.text().as_str()), (200, "unfiltered"));
    assert_eq!(answer.header("x-backstop-fallback-reason"), Some("az/gpt-4o=contentFiltered"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_the_output_filter_emptied_falls_to_the_on_content_filtered_chain() {
    // Azure's output filter answers 200 with a `content_filter` finish and nothing to show.
    let emptied = json!({"id": "chatcmpl-f", "object": "chat.completion", "created": 1, "model": "gpt-4o",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": null}, "finish_reason": "content_filter"}]});
    let shown = json!({"id": "chatcmpl-s", "object": "chat.completion", "created": 1, "model": "gpt-4o",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "partly shown"}, "finish_reason": "content_filter"}]});
    for (body, answered) in [(emptied, "unfiltered"), (shown, "partly shown")] {
        let upstream = Upstream::start(Fault::Status { status: 200, body, headers: vec![] }).await;
        let providers = format!(
            "    - {{name: az, type: openai-compatible, baseUrl: \"{}\"}}\n    - {{name: m, type: mock, mock: {{reply: unfiltered}}}}",
            upstream.base_url()
        );
        let chain = "[{provider: az, model: gpt-4o}]\n      onContentFiltered: [{provider: m, model: other}]";
        let sidecar = TestSidecar::start(&policy(&providers, chain, "")).await;
        let answer = post(&sidecar.url("/v1/chat/completions"), &chat(false)).await;
        assert_eq!((answer.status, answer.text().as_str()), (200, answered));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_that_cannot_express_a_request_are_skipped() {
    let anthropic = Upstream::speaking(Wire::Anthropic, vec![], Fault::Ok).await;
    let openai = Upstream::start(Fault::Ok).await;
    let providers = format!(
        "    - {{name: claude, type: anthropic, baseUrl: \"http://{}\"}}\n    - {{name: oai, type: openai-compatible, baseUrl: \"{}\"}}",
        anthropic.addr,
        openai.base_url()
    );
    let sidecar = TestSidecar::start(&policy(
        &providers,
        "[{provider: claude, model: c}, {provider: oai, model: o, skipFor: [tools]}]",
        "",
    ))
    .await;
    let url = sidecar.url("/v1/chat/completions");
    let logprobs = json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}], "logprobs": true});
    let answer = post(&url, &logprobs).await;
    assert_eq!(answer.header("x-backstop-provider"), Some("oai"));
    assert_eq!(answer.header("x-backstop-fallback-reason"), Some("claude/c=ineligible"));
    assert_eq!(answer.header("x-backstop-attempts"), Some("1"), "skipping is not an attempt");
    assert_eq!(anthropic.count(), 0);

    let both = json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}], "logprobs": true,
                      "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]});
    let answer = post(&url, &both).await;
    assert_eq!(answer.status, 400);
    let message = answer.json()["error"]["message"].as_str().unwrap_or_default().to_string();
    assert_eq!(answer.json()["error"]["code"], "no_eligible_target");
    assert!(
        message.contains("claude/c: `logprobs`") && message.contains("oai/o: `skipFor` excludes requests with tools"),
        "{message}"
    );
    assert_eq!(openai.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_reach_anthropic_apps_in_their_own_format() {
    let openai = Upstream::start(Fault::status(400)).await;
    let providers = format!("    - {{name: oai, type: openai-compatible, baseUrl: \"{}\"}}", openai.base_url());
    let sidecar = TestSidecar::start(&policy(&providers, "[{provider: oai, model: o}]", "")).await;
    let answer = post(&sidecar.url("/v1/messages"), &messages_request(false)).await;
    assert_eq!(answer.status, 400);
    let error = answer.json();
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["type"], "invalid_request_error");
    assert!(error["error"]["message"].as_str().is_some_and(|m| m.contains("upstream says 400")), "{error}");

    let limited = Upstream::start(Fault::status(429)).await;
    let providers = format!("    - {{name: oai, type: openai-compatible, baseUrl: \"{}\"}}", limited.base_url());
    let sidecar = TestSidecar::start(&policy(&providers, "[{provider: oai, model: o}]", "")).await;
    let answer = post(&sidecar.url("/v1/messages"), &messages_request(false)).await;
    assert_eq!((answer.status, answer.json()["error"]["type"].as_str()), (429, Some("rate_limit_error")));
    let missing = post(&sidecar.url("/v1/messages"), &json!({"model": "chat", "messages": []})).await;
    assert_eq!((missing.status, missing.json()["error"]["type"].as_str()), (400, Some("invalid_request_error")));
    assert_eq!(limited.count(), 1, "the malformed request never reached the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_fall_back_across_targets_that_serve_the_same_model() {
    let down = Upstream::start(Fault::status(503)).await;
    let gemini = Upstream::speaking(Wire::Gemini, vec![], Fault::Ok).await;
    let openai = Upstream::start(Fault::Ok).await;
    let providers = format!(
        "    - {{name: claude, type: anthropic, baseUrl: \"http://{}\"}}\n    - {{name: down, type: openai-compatible, baseUrl: \"{}\"}}\n    - {{name: g, type: gemini, baseUrl: \"http://{}/v1beta\"}}\n    - {{name: oai, type: openai-compatible, baseUrl: \"{}\"}}\n    - {{name: m, type: mock}}",
        down.addr,
        down.base_url(),
        gemini.addr,
        openai.base_url()
    );
    let chain = "[{provider: claude, model: c}, {provider: down, model: text-embedding-3-small}, {provider: g, model: gemini-embedding-001}, {provider: oai, model: text-embedding-3-small}]";
    let sidecar = TestSidecar::start(&policy(&providers, chain, "")).await;
    let url = sidecar.url("/v1/embeddings");
    let answer = post(&url, &json!({"model": "chat", "input": ["first", "second"], "dimensions": 2})).await;
    assert_eq!(answer.status, 200, "{}", String::from_utf8_lossy(&answer.body));
    assert_eq!(answer.header("x-backstop-provider"), Some("g"));
    assert_eq!(
        answer.header("x-backstop-fallback-reason"),
        Some("claude/c=ineligible, down/text-embedding-3-small=overloaded")
    );
    let list = answer.json();
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"].as_array().map(Vec::len), Some(2));
    assert_eq!(list["data"][1]["embedding"], json!([0.25, 1.0]));
    let sent = &gemini.received()[0];
    assert_eq!(sent.path, "/v1beta/models/gemini-embedding-001:batchEmbedContents");
    assert_eq!(
        sent.body["requests"][1],
        json!({"model": "models/gemini-embedding-001", "content": {"parts": [{"text": "second"}]}, "outputDimensionality": 2})
    );
    assert_eq!(down.received()[0].path, "/v1/embeddings");
    assert_eq!(
        down.received()[0].body,
        json!({"model": "text-embedding-3-small", "input": ["first", "second"], "dimensions": 2})
    );

    // Token input: Gemini cannot take it, the OpenAI target can.
    let tokens = post(&url, &json!({"model": "chat", "input": [[1, 2, 3]]})).await;
    assert_eq!(tokens.header("x-backstop-provider"), Some("oai"), "{}", String::from_utf8_lossy(&tokens.body));
    assert!(
        tokens.header("x-backstop-fallback-reason").is_some_and(|r| r.contains("g/gemini-embedding-001=ineligible"))
    );

    let bad = post(&url, &json!({"model": "chat", "input": []})).await;
    assert_eq!((bad.status, bad.json()["error"]["param"].as_str()), (400, Some("input")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stateful_responses_requests_go_only_to_openai_and_pass_through() {
    let anthropic = Upstream::speaking(Wire::Anthropic, vec![], Fault::Ok).await;
    let openai = Upstream::start(Fault::Ok).await;
    let providers = format!(
        "    - {{name: claude, type: anthropic, baseUrl: \"http://{}\"}}\n    - {{name: oai, type: openai, baseUrl: \"{}\", apiKey: {{value: sk-oai}}}}",
        anthropic.addr,
        openai.base_url()
    );
    let sidecar =
        TestSidecar::start(&policy(&providers, "[{provider: claude, model: c}, {provider: oai, model: gpt-4o}]", ""))
            .await;
    let body = json!({"model": "chat", "input": "hello", "previous_response_id": "resp_earlier", "include": ["reasoning.encrypted_content"]});
    let answer = post(&sidecar.url("/v1/responses"), &body).await;
    assert_eq!(answer.status, 200, "{}", String::from_utf8_lossy(&answer.body));
    assert_eq!(answer.json()["vendor_extra"], "kept", "OpenAI's own answer, untouched");
    assert_eq!(answer.header("x-backstop-fallback-reason"), Some("claude/c=ineligible"));
    assert_eq!(anthropic.count(), 0);
    let sent = &openai.received()[0];
    assert_eq!(sent.path, "/v1/responses");
    let mut expected = body.clone();
    expected["model"] = json!("gpt-4o");
    assert_eq!(sent.body, expected, "the app's own request, but for the model");

    let streamed =
        post_stream(&sidecar.url("/v1/responses"), &json!({"model": "chat", "input": "hi", "stream": true})).await;
    let kinds: Vec<String> = streamed
        .events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| v["type"].as_str().map(str::to_string))
        .collect();
    assert_eq!(kinds, ["response.created", "response.output_text.delta", "response.completed"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stateless_responses_requests_fall_back_across_providers() {
    let openai = Upstream::start(Fault::status(500)).await;
    let anthropic = Upstream::speaking(Wire::Anthropic, vec![], Fault::Ok).await;
    let providers = format!(
        "    - {{name: oai, type: openai, baseUrl: \"{}\"}}\n    - {{name: claude, type: anthropic, baseUrl: \"http://{}\"}}",
        openai.base_url(),
        anthropic.addr
    );
    let sidecar =
        TestSidecar::start(&policy(&providers, "[{provider: oai, model: gpt-4o}, {provider: claude, model: c}]", ""))
            .await;
    let body = json!({"model": "chat", "store": false, "instructions": "Be brief.", "max_output_tokens": 50,
                      "input": [{"role": "user", "content": [{"type": "input_text", "text": "hello"}]}]});
    let answer = post(&sidecar.url("/v1/responses"), &body).await;
    assert_eq!(answer.status, 200, "{}", String::from_utf8_lossy(&answer.body));
    let response = answer.json();
    assert_eq!(response["object"], "response");
    assert_eq!(response["status"], "completed");
    assert_eq!(
        response["output"][0]["content"][0],
        json!({"type": "output_text", "text": "from anthropic", "annotations": []})
    );
    assert_eq!(answer.header("x-backstop-fallback-reason"), Some("oai/gpt-4o=serverError"));
    assert_eq!(openai.received()[0].path, "/v1/responses", "the OpenAI target got the app's own request");
    let sent = &anthropic.received()[0].body;
    assert_eq!(sent["system"], "Be brief.");
    assert_eq!(sent["max_tokens"], 50);
    assert_eq!(sent["messages"], json!([{"role": "user", "content": [{"type": "text", "text": "hello"}]}]));

    let mut streaming = body.clone();
    streaming["stream"] = json!(true);
    let streamed = post_stream(&sidecar.url("/v1/responses"), &streaming).await;
    let events: Vec<Value> = streamed.events.iter().filter_map(|e| serde_json::from_str(e).ok()).collect();
    let text: String = events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .filter_map(|e| e["delta"].as_str())
        .collect();
    assert_eq!(text, "from anthropic");
    let last = events.last().expect("events");
    assert_eq!(last["type"], "response.completed");
    assert_eq!(last["response"]["output"][0]["content"][0]["text"], "from anthropic");
    let sequence: Vec<u64> = events.iter().filter_map(|e| e["sequence_number"].as_u64()).collect();
    assert!(sequence.windows(2).all(|w| w[1] == w[0] + 1), "{sequence:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_target_receives_its_adaptation_in_its_own_api_from_apps_of_either_api() {
    let openai = Upstream::start(Fault::status(500)).await;
    let anthropic = Upstream::speaking(Wire::Anthropic, vec![], Fault::Ok).await;
    let providers = format!(
        "    - {{name: oai, type: openai-compatible, baseUrl: \"{}\"}}\n    - {{name: claude, type: anthropic, baseUrl: \"http://{}\", apiKey: {{value: sk-ant-test}}}}",
        openai.base_url(),
        anthropic.addr
    );
    let chain = "\n        - {provider: oai, model: llama, adapt: {set: {topK: 20, temperature: 0.1}, cap: {maxTokens: 32}, systemPrompt: {prefix: For llama.}}}\n        - {provider: claude, model: claude-sonnet-4-5, adapt: {cap: {temperature: 0.5, maxTokens: 48}, remove: [topP], systemPrompt: {suffix: For claude.}}}";
    let sidecar = TestSidecar::start(&policy(&providers, chain, "")).await;

    // An OpenAI app: the OpenAI-compatible target gets Chat Completions, Anthropic Messages.
    let body = json!({"model": "chat", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}],
                      "temperature": 0.9, "top_p": 0.5, "max_tokens": 500});
    let answer = post(&sidecar.url("/v1/chat/completions"), &body).await;
    assert_eq!(answer.status, 200, "{}", String::from_utf8_lossy(&answer.body));
    let to_llama = &openai.received()[0].body;
    assert_eq!((to_llama["top_k"].clone(), to_llama["temperature"].clone()), (json!(20), json!(0.1)));
    assert_eq!(to_llama["max_tokens"], 32, "capped in the field the app used: {to_llama}");
    assert_eq!(to_llama["messages"][0], json!({"role": "system", "content": "For llama.\n\nBe brief."}));
    let to_claude = &anthropic.received()[0].body;
    assert_eq!((to_claude["temperature"].clone(), to_claude["max_tokens"].clone()), (json!(0.5), json!(48)));
    assert!(to_claude.get("top_p").is_none(), "removed: {to_claude}");
    assert_eq!(to_claude["system"], "Be brief.\n\nFor claude.");

    // An Anthropic app: the same adaptations, the other way round.
    let answer = post(&sidecar.url("/v1/messages"), &messages_request(false)).await;
    assert_eq!(answer.status, 200, "{}", String::from_utf8_lossy(&answer.body));
    let to_llama = &openai.received()[1].body;
    assert_eq!(to_llama["top_k"], 20);
    assert_eq!(to_llama["max_completion_tokens"], 32, "{to_llama}");
    assert_eq!(to_llama["messages"][0], json!({"role": "system", "content": "For llama.\n\nBe brief."}));
    let to_claude = &anthropic.received()[1].body;
    assert_eq!(to_claude["max_tokens"], 48, "the app's 64, capped: {to_claude}");
    assert_eq!(to_claude["system"], "Be brief.\n\nFor claude.");
    assert_eq!(to_claude["messages"], messages_request(false)["messages"], "nothing else changed");

    // `/config` shows each target's adaptation.
    let config = get(&sidecar.admin_url("/config")).await;
    assert!(String::from_utf8_lossy(&config.body).contains("For claude."), "{:?}", config.body);
}
