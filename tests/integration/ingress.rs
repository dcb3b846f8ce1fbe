//! The OpenAI ingress: what is rejected before any upstream call, what passes through, and
//! what the app's SDK sees.

use serde_json::{Value, json};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_400_and_no_upstream_call() {
    let upstream = Upstream::start(Fault::Ok).await;
    let sidecar = TestSidecar::start(&two_target_policy(&upstream.base_url(), "")).await;
    let url = sidecar.url("/v1/chat/completions");
    let cases: [(&str, &str, Option<&str>); 4] = [
        ("{not json", "not valid JSON", None),
        (r#"{"messages":[{"role":"user","content":"hi"}]}"#, "`model` is missing", Some("model")),
        (r#"{"model":"chat"}"#, "`messages` is missing", Some("messages")),
        (
            r#"{"model":"chat","messages":[{"role":"user"}],"stream":"yes"}"#,
            "`stream` must be a boolean",
            Some("stream"),
        ),
    ];
    for (body, message, param) in cases {
        let answer = post_raw(&url, body.to_string(), &[]).await;
        assert_eq!(answer.status, 400, "{body}");
        let error = &answer.json()["error"];
        assert_eq!(error["type"], "invalid_request_error", "{body}");
        assert!(error["message"].as_str().unwrap_or_default().contains(message), "{body}: {error}");
        assert_eq!(error["param"].as_str(), param, "{body}");
    }
    assert_eq!(upstream.count(), 0, "a malformed request must never reach an upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_get_413() {
    let upstream = Upstream::start(Fault::Ok).await;
    let sidecar = TestSidecar::start(&two_target_policy(&upstream.base_url(), "")).await;
    let big = "x".repeat(100 * 1024);
    let body = json!({"model": "chat", "messages": [{"role": "user", "content": big}]});
    let answer = post(&sidecar.url("/v1/chat/completions"), &body).await;
    assert_eq!(answer.status, 413);
    assert_eq!(answer.json()["error"]["code"], "request_too_large");
    assert_eq!(upstream.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_models_get_404_and_models_lists_the_routes() {
    let upstream = Upstream::start(Fault::Ok).await;
    let sidecar = TestSidecar::start(&two_target_policy(&upstream.base_url(), "")).await;
    let answer = post(
        &sidecar.url("/v1/chat/completions"),
        &json!({"model": "gpt-5", "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(answer.status, 404);
    assert_eq!(answer.json()["error"]["code"], "model_not_found");
    let models = get(&sidecar.url("/v1/models")).await;
    assert_eq!(models.status, 200);
    let ids: Vec<Value> = models.json()["data"].as_array().expect("data").iter().map(|m| m["id"].clone()).collect();
    assert_eq!(ids, [json!("chat")]);
    // An endpoint Backstop does not handle goes where the app would have sent it (here nowhere).
    let elsewhere = get(&sidecar.url("/v1/nothing")).await;
    assert_eq!((elsewhere.status, elsewhere.header("x-backstop-passthrough")), (502, Some("true")));
    let message = elsewhere.json()["error"]["message"].as_str().unwrap_or_default().to_string();
    assert!(message.contains("could not reach http://127.0.0.1:9/v1/nothing"), "{message}");
    assert_eq!(get(&sidecar.url("/v1/chat/completions")).await.status, 405);
    assert_eq!(upstream.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_fields_pass_through_and_the_policy_key_replaces_the_apps() {
    let upstream = Upstream::start(Fault::Ok).await;
    let sidecar = TestSidecar::start(&two_target_policy(&upstream.base_url(), "")).await;
    let body = json!({
        "model": "chat",
        "messages": [{"role": "user", "content": "hi", "name": "ann"}],
        "temperature": 0.3,
        "logit_bias": {"50256": -100},
        "response_format": {"type": "json_object"},
        "vendor_extension": {"nested": [1, 2, 3]}
    });
    let answer =
        post_raw(&sidecar.url("/v1/chat/completions"), body.to_string(), &[("authorization", "Bearer app-dummy-key")])
            .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("x-backstop-model"), Some("up-model"));
    assert_eq!(answer.header("x-backstop-route"), Some("chat"));
    let received = upstream.received();
    let sent = &received[0].body;
    assert_eq!(sent["model"], "up-model", "the alias is replaced by the target's model");
    for field in ["temperature", "logit_bias", "response_format", "vendor_extension"] {
        assert_eq!(sent[field], body[field], "{field} must pass through untouched");
    }
    assert_eq!(sent["messages"], body["messages"]);
    let auth = received[0].headers.get("authorization").and_then(|v| v.to_str().ok());
    assert_eq!(auth, Some("Bearer sk-test-primary-SECRET"), "the policy's key, never the app's");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_relay_every_chunk_and_finish_with_done() {
    let upstream = Upstream::start(Fault::Ok).await;
    let sidecar = TestSidecar::start(&two_target_policy(&upstream.base_url(), "")).await;
    let answer = post_stream(&sidecar.url("/v1/chat/completions"), &chat(true)).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.text(), "from upstream");
    assert!(answer.done());
    assert_eq!(answer.events.len(), 5, "role, two content chunks, finish, [DONE]: {:?}", answer.events);
    assert_eq!(upstream.received()[0].body["stream"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_report_readiness_and_a_redacted_config() {
    let upstream = Upstream::start(Fault::Ok).await;
    let sidecar = TestSidecar::start(&two_target_policy(&upstream.base_url(), "")).await;
    assert_eq!(get(&sidecar.admin_url("/healthz")).await.status, 200);
    let ready = get(&sidecar.admin_url("/readyz")).await;
    assert_eq!(ready.status, 200);
    let config = get(&sidecar.admin_url("/config")).await;
    assert_eq!(config.status, 200);
    let text = String::from_utf8_lossy(&config.body).to_string();
    assert!(!text.contains("sk-test-primary-SECRET"), "{text}");
    assert_eq!(config.json()["policies"][0]["spec"]["providers"][0]["apiKey"]["value"], "<redacted>");
    assert_eq!(config.json()["source"], "tests/test");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_same_api_answer_reaches_the_app_byte_for_byte() {
    // Pretty-printed, an escape and a field Backstop does not know: decoding and encoding it
    // again would change every one of them.
    const BODY: &str = "{\n  \"id\": \"chatcmpl-raw\",\n  \"object\": \"chat.completion\",\n  \"created\": 1,\n  \"model\": \"up-model\",\n  \"choices\": [{\"index\": 0, \"message\": {\"role\": \"assistant\", \"content\": \"caf\\u00e9\"}, \"finish_reason\": \"stop\"}],\n  \"usage\": {\"prompt_tokens\": 3, \"completion_tokens\": 1, \"total_tokens\": 4},\n  \"vendor_extension\": {\"latency_ms\": 1.50}\n}\n";
    let upstream = Upstream::start(Fault::Body(BODY)).await;
    let sidecar = TestSidecar::start(&two_target_policy(&upstream.base_url(), "")).await;
    let answer = post(&sidecar.url("/v1/chat/completions"), &chat(false)).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(answer.header("x-backstop-provider"), Some("primary"));
    assert_eq!(String::from_utf8_lossy(&answer.body), BODY);
    // An Anthropic app still gets the answer translated.
    let anthropic = post(
        &sidecar.url("/v1/messages"),
        &json!({"model": "chat", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(anthropic.status, 200, "{:?}", anthropic.body);
    assert_eq!(anthropic.json()["content"][0]["text"], "café");
    assert_eq!(anthropic.json()["type"], "message");
}
