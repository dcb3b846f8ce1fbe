//! Shadow comparison over real sockets: the app's answers stay exactly what the primary sent
//! while a shadow target receives the same requests in the background, a stalled shadow keeps
//! nobody waiting, the pool of shadow requests is bounded, and a route under failure is never
//! shadowed.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::*;

fn policy(primary: &str, shadow: &str, shadow_settings: &str) -> String {
    format!(
        r#"apiVersion: backstop.dev/v1alpha1
kind: FallbackPolicy
metadata: {{name: shadowed, namespace: tests}}
spec:
  providers:
    - {{name: primary, type: openai-compatible, baseUrl: "{primary}"}}
    - {{name: claude, type: anthropic, baseUrl: "{shadow}", apiKey: {{value: sk-ant-shadow-SECRET}}}}
    - {{name: spare, type: mock, mock: {{reply: "from spare"}}}}
  routes:
    - model: chat
      chain: [{{provider: primary, model: up-model}}, {{provider: spare, model: m}}]
      shadow: {{provider: claude, model: claude-shadow, percent: 100{shadow_settings}}}
  retry: {{attempts: 1}}
  timeouts: {{attempt: 2s, firstToken: 2s, total: 10s}}
"#
    )
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_shadowed_and_every_answer_is_the_primary_s_untouched() {
    let primary = Upstream::start(Fault::Ok).await;
    let shadow = Upstream::speaking(Wire::Anthropic, vec![], Fault::Ok).await;
    let sidecar =
        TestSidecar::start(&policy(&primary.base_url(), &format!("http://{}", shadow.addr), ", maxConcurrent: 8"))
            .await;
    let url = sidecar.url("/v1/chat/completions");
    let body = json!({"model": "chat", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}],
                      "max_tokens": 40});
    let direct =
        post(&format!("{}/chat/completions", primary.base_url()), &json!({"model": "up-model", "messages": []})).await;
    for _ in 0..4 {
        let answer = post(&url, &body).await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.json()["choices"], direct.json()["choices"], "the primary's answer, unchanged");
        assert_eq!(answer.header("x-backstop-provider"), Some("primary"));
    }
    let streamed = post_stream(
        &url,
        &json!({"model": "chat", "messages": [{"role": "user", "content": "hello"}], "stream": true}),
    )
    .await;
    assert!(streamed.done());
    assert_eq!(streamed.text(), "from upstream");

    // The shadow target got the same requests, in its own API, asking for whole answers.
    wait_for("five shadow requests", || shadow.count() == 5).await;
    let received = shadow.received();
    assert_eq!(received[0].path, "/v1/messages");
    assert_eq!(received[0].body["model"], "claude-shadow");
    assert_eq!(received[0].body["system"], "Be brief.");
    assert_eq!(received[0].body["messages"], json!([{"role": "user", "content": [{"type": "text", "text": "hello"}]}]));
    assert_eq!(received[0].body["max_tokens"], 40);
    assert!(received.iter().all(|r| r.body.get("stream").is_none_or(|s| s == &Value::Bool(false))), "{received:?}");
    assert_eq!(primary.count(), 6, "one direct call and five app requests: the primary got each request once");

    let compared = "backstop_shadow_requests_total{backstop_route=\"chat\",backstop_shadow_outcome=\"compared\",backstop_shadow_target=\"claude/claude-shadow\"";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = String::from_utf8_lossy(&get(&sidecar.admin_url("/metrics")).await.body).into_owned();
        if prometheus_sample(&text, compared) == 5.0 {
            break text;
        }
        assert!(tokio::time::Instant::now() < deadline, "five comparisons:\n{text}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(text.contains("backstop_shadow_length_ratio_bucket{backstop_route=\"chat\",backstop_shadow_target=\"claude/claude-shadow\""), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_shadow_keeps_nobody_waiting_and_its_pool_is_bounded() {
    let primary = Upstream::start(Fault::Ok).await;
    let stalled = Upstream::start(Fault::StallBeforeHeaders).await;
    let sidecar = TestSidecar::start(&policy(
        &primary.base_url(),
        &format!("http://{}", stalled.addr),
        ", maxConcurrent: 1, timeout: 30s",
    ))
    .await;
    let url = sidecar.url("/v1/chat/completions");
    for _ in 0..3 {
        let answer = post(&url, &chat(false)).await;
        assert_eq!((answer.status, answer.text().as_str()), (200, "from upstream"));
    }
    let streamed = post_stream(&url, &chat(true)).await;
    assert!(streamed.done(), "a stream ends with the primary's, whatever the shadow does");
    wait_for("the one shadow in flight reached its target", || stalled.count() == 1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(stalled.count(), 1, "one slot: the others were not shadowed");
    let text = String::from_utf8_lossy(&get(&sidecar.admin_url("/metrics")).await.body).into_owned();
    assert_eq!(
        prometheus_sample(
            &text,
            "backstop_shadow_requests_total{backstop_route=\"chat\",backstop_shadow_outcome=\"busy\""
        ),
        3.0,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_under_failure_is_not_shadowed() {
    let primary = Upstream::scripted(vec![Fault::status(500)], Fault::Ok).await;
    let shadow = Upstream::speaking(Wire::Anthropic, vec![], Fault::Ok).await;
    let sidecar = TestSidecar::start(&policy(&primary.base_url(), &format!("http://{}", shadow.addr), "")).await;
    let url = sidecar.url("/v1/chat/completions");
    let fell_through = post(&url, &chat(false)).await;
    assert_eq!(fell_through.header("x-backstop-provider"), Some("spare"));
    // The primary answers again, but the route fell through within its budget's window.
    let answered = post(&url, &chat(false)).await;
    assert_eq!(answered.header("x-backstop-provider"), Some("primary"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(shadow.count(), 0);
    let text = String::from_utf8_lossy(&get(&sidecar.admin_url("/metrics")).await.body).into_owned();
    assert_eq!(
        prometheus_sample(
            &text,
            "backstop_shadow_requests_total{backstop_route=\"chat\",backstop_shadow_outcome=\"underFailure\""
        ),
        2.0,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stateful_responses_request_is_never_shadowed() {
    let primary = Upstream::start(Fault::Ok).await;
    let shadow = Upstream::start(Fault::Ok).await;
    let sidecar = TestSidecar::start(&format!(
        r#"apiVersion: backstop.dev/v1alpha1
kind: FallbackPolicy
metadata: {{name: responses, namespace: tests}}
spec:
  providers:
    - {{name: oai, type: openai, baseUrl: "{}", apiKey: {{value: sk-a}}}}
    - {{name: other, type: openai, baseUrl: "{}", apiKey: {{value: sk-b}}}}
  routes:
    - model: chat
      chain: [{{provider: oai, model: gpt-5}}]
      shadow: {{provider: other, model: gpt-5-mini, percent: 100}}
"#,
        primary.base_url(),
        shadow.base_url()
    ))
    .await;
    let url = sidecar.url("/v1/responses");
    // `store` defaults to true: OpenAI keeps this response, and a second one would be kept too.
    let stateful = post(&url, &json!({"model": "chat", "input": "hello"})).await;
    assert_eq!(stateful.status, 200, "{}", String::from_utf8_lossy(&stateful.body));
    let stateless = post(&url, &json!({"model": "chat", "input": "hello", "store": false})).await;
    assert_eq!(stateless.status, 200);
    wait_for("the stateless request's shadow", || shadow.count() == 1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let received = shadow.received();
    assert_eq!(received.len(), 1, "only the stateless request was shadowed");
    assert_eq!((received[0].path.as_str(), received[0].body["store"].clone()), ("/v1/responses", json!(false)));
    let text = String::from_utf8_lossy(&get(&sidecar.admin_url("/metrics")).await.body).into_owned();
    assert_eq!(
        prometheus_sample(
            &text,
            "backstop_shadow_requests_total{backstop_route=\"chat\",backstop_shadow_outcome=\"ineligible\""
        ),
        1.0,
        "{text}"
    );
}
