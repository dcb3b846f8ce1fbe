//! Target health end to end: breakers keep a failing target out and probe it back in, a
//! `Retry-After` is respected across requests, keys rotate, hedges race, the retry budget caps
//! an outage's extra load, special chains and per-request controls apply.

use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use crate::support::*;

fn reason(answer: &Answer) -> String {
    answer.header("x-backstop-fallback-reason").unwrap_or_default().to_string()
}

async fn health(sidecar: &TestSidecar, target: &str) -> Value {
    let report = get(&sidecar.admin_url("/health")).await.json();
    report["targets"]
        .as_array()
        .expect("targets")
        .iter()
        .find(|t| t["target"] == target)
        .cloned()
        .unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_breaker_keeps_the_target_out_and_says_so_in_headers_and_health() {
    let failing = Fault::status(500);
    let script = vec![failing.clone(), failing.clone(), failing];
    let upstream = Upstream::scripted(script, Fault::Ok).await;
    let policy = two_target_policy(
        &upstream.base_url(),
        "  circuitBreaker: {consecutiveFailures: 3, openFor: 1s, maxOpenFor: 10s, halfOpenProbes: 1}\n",
    )
    .replace("attempts: 2", "attempts: 1");
    let sidecar = TestSidecar::start(&policy).await;
    let url = sidecar.url("/v1/chat/completions");

    for _ in 0..3 {
        let answer = post(&url, &chat(false)).await;
        assert_eq!((answer.status, reason(&answer).as_str()), (200, "primary/up-model=serverError"));
    }
    assert_eq!(upstream.count(), 3);
    let state = health(&sidecar, "primary/up-model").await;
    assert_eq!(state["state"], "open", "{state}");
    assert_eq!(state["failures"]["serverError"], 3, "{state}");

    // Open: skipped without an attempt.
    for stream in [false, true, false] {
        let answer = post(&url, &chat(stream)).await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.header("x-backstop-provider"), Some("fallback"));
        assert_eq!(reason(&answer), "primary/up-model=circuitOpen");
        assert_eq!(answer.header("x-backstop-attempts"), Some("1"));
    }
    assert_eq!(upstream.count(), 3, "no request reaches an open target");
    // Half-open probes, doubling open periods and Retry-After periods are timed in paused
    // time in the fallback loop's unit tests.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_key_moves_to_another_key_before_falling_through() {
    let upstream = Upstream::start(Fault::ByKey {
        key: "sk-revoked",
        matched: Box::new(Fault::status(401)),
        other: Box::new(Fault::Ok),
    })
    .await;
    let policy = two_target_policy(&upstream.base_url(), "")
        .replace("apiKey: {value: sk-test-primary-SECRET}", "apiKeys: [{value: sk-revoked}, {value: sk-good}]");
    let sidecar = TestSidecar::start(&policy).await;
    for i in 0..12 {
        let answer = post(&sidecar.url("/v1/chat/completions"), &chat(i % 2 == 0)).await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.header("x-backstop-provider"), Some("primary"), "never the fallback: another key works");
        let why = reason(&answer);
        assert!(
            why.is_empty() || why == "primary/up-model#1=authError" || why == "primary/up-model#1=circuitOpen",
            "{why}"
        );
    }
    let revoked = upstream
        .received()
        .iter()
        .filter(|r| r.headers.get("authorization").and_then(|v| v.to_str().ok()) == Some("Bearer sk-revoked"))
        .count();
    assert!(revoked <= 5, "the revoked key's breaker opens after 5 failures; it was tried {revoked} times");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_headers_steer_away_from_an_exhausted_key_before_it_429s() {
    let exhausted =
        vec![("x-ratelimit-remaining-requests", "0".to_string()), ("x-ratelimit-reset-requests", "30s".to_string())];
    let upstream = Upstream::start(Fault::ByKey {
        key: "sk-busy",
        matched: Box::new(Fault::OkWith(exhausted)),
        other: Box::new(Fault::OkWith(vec![("x-ratelimit-remaining-requests", "999".to_string())])),
    })
    .await;
    let policy = two_target_policy(&upstream.base_url(), "")
        .replace("apiKey: {value: sk-test-primary-SECRET}", "apiKeys: [{value: sk-busy}, {value: sk-free}]");
    let sidecar = TestSidecar::start(&policy).await;
    for _ in 0..20 {
        assert_eq!(post(&sidecar.url("/v1/chat/completions"), &chat(false)).await.status, 200);
    }
    let busy = upstream
        .received()
        .iter()
        .filter(|r| r.headers.get("authorization").and_then(|v| v.to_str().ok()) == Some("Bearer sk-busy"))
        .count();
    assert_eq!(busy, 1, "after it said it had no requests left, the busy key got none");
    assert!(health(&sidecar, "primary/up-model#1").await["rateLimitedForMs"].as_u64().is_some_and(|ms| ms > 20_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hedge_answers_from_the_faster_target_and_cancels_the_slow_one() {
    let upstream = Upstream::start(Fault::SlowFirstToken(Duration::from_secs(5))).await;
    let policy = two_target_policy(&upstream.base_url(), "")
        .replace("chain:\n", "hedge: {afterFirstTokenDelay: 300ms}\n      chain:\n")
        .replace("firstToken: 500ms", "firstToken: 8s")
        .replace("attempt: 500ms", "attempt: 8s")
        .replace("chunks: 2}", "chunks: 2, firstTokenLatency: 100ms}");
    let sidecar = TestSidecar::start(&policy).await;
    for stream in [true, false] {
        let started = Instant::now();
        let (provider, why, text) = if stream {
            let a = post_stream(&sidecar.url("/v1/chat/completions"), &chat(true)).await;
            assert!(a.done());
            (
                a.header("x-backstop-provider").map(str::to_string),
                a.header("x-backstop-fallback-reason").map(str::to_string),
                a.text(),
            )
        } else {
            let a = post(&sidecar.url("/v1/chat/completions"), &chat(false)).await;
            (a.header("x-backstop-provider").map(str::to_string), Some(reason(&a)), a.text())
        };
        let took = started.elapsed();
        assert_eq!(provider.as_deref(), Some("fallback"), "stream={stream}");
        assert_eq!(text, "from fallback");
        assert_eq!(why.as_deref(), Some("primary/up-model=hedged"));
        assert!(
            took < Duration::from_millis(2000),
            "the hedge delay plus the fallback's latency, not the primary's 5 s: {took:?}"
        );
    }
    // Only the streamed request reaches `SlowFirstToken`'s body; its connection is closed.
    let until = Instant::now() + Duration::from_secs(3);
    while upstream.cancelled() < 1 {
        assert!(Instant::now() < until, "the slow attempt was never cancelled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_total_outage_upstream_load_stays_within_the_retry_budget() {
    let first = Upstream::start(Fault::status(503)).await;
    let second = Upstream::start(Fault::status(503)).await;
    let policy = format!(
        r#"apiVersion: backstop.dev/v1alpha1
kind: FallbackPolicy
metadata: {{name: outage, namespace: tests}}
spec:
  providers:
    - {{name: a, type: openai-compatible, baseUrl: "{}"}}
    - {{name: b, type: openai-compatible, baseUrl: "{}"}}
  routes:
    - model: chat
      chain: [{{provider: a, model: m}}, {{provider: b, model: m}}]
  retry: {{attempts: 3, backoff: {{base: 1ms, max: 5ms}}, budgetPercent: 20, minRetriesPerSecond: 0}}
  circuitBreaker: {{consecutiveFailures: 0, failureRate: {{percent: 100, minRequests: 1000000}}}}
"#,
        first.base_url(),
        second.base_url()
    );
    let sidecar = TestSidecar::start(&policy).await;
    let requests = 100;
    let mut budget_stops = 0;
    for _ in 0..requests {
        let answer = post(&sidecar.url("/v1/chat/completions"), &chat(false)).await;
        assert_eq!(answer.status, 503);
        if answer.json()["error"]["stopped"].as_str().is_some_and(|s| s.contains("retry budget")) {
            budget_stops += 1;
        }
    }
    let sent = first.count() + second.count();
    // Without a budget every request would make 6 attempts (600 in all).
    assert!(sent <= requests + requests / 5, "{sent} upstream requests for {requests} app requests");
    assert!(sent >= requests, "every request gets at least its own attempt");
    assert!(budget_stops >= 60, "{budget_stops} requests were stopped by the budget");
    let budget = &get(&sidecar.admin_url("/health")).await.json()["retryBudgets"][0];
    assert_eq!(budget["route"], "chat");
    assert_eq!(budget["requests"], requests);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn context_window_errors_switch_to_the_special_chain() {
    let too_long = Fault::Status {
        status: 400,
        body: serde_json::json!({"error": {"message": "This model's maximum context length is 8192 tokens", "type": "invalid_request_error", "code": "context_length_exceeded"}}),
        headers: vec![],
    };
    let upstream = Upstream::start(too_long).await;
    let policy = two_target_policy(&upstream.base_url(), "")
        .replace("chain:\n", "onContextWindowExceeded: [{provider: fallback, model: long-context}]\n      chain:\n");
    let sidecar = TestSidecar::start(&policy).await;
    let answer = post(&sidecar.url("/v1/chat/completions"), &chat(false)).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("x-backstop-model"), Some("long-context"));
    assert_eq!(reason(&answer), "primary/up-model=contextWindowExceeded");
    assert_eq!(upstream.count(), 1, "not retried: a longer wait does not make the prompt shorter");

    // Without the special chain, the provider's 400 goes back as is.
    let plain = TestSidecar::start(&two_target_policy(&upstream.base_url(), "")).await;
    let answer = post(&plain.url("/v1/chat/completions"), &chat(false)).await;
    assert_eq!(answer.status, 400);
    assert_eq!(answer.json()["error"]["code"], "context_length_exceeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_completions_fall_through_when_asked() {
    let upstream = Upstream::start(Fault::Empty).await;
    let with = TestSidecar::start(&two_target_policy(
        &upstream.base_url(),
        "  fallbackOn: [rateLimited, overloaded, serverError, timeout, connectError, emptyCompletion]\n",
    ))
    .await;
    for stream in [false, true] {
        let (text, why) = if stream {
            let a = post_stream(&with.url("/v1/chat/completions"), &chat(true)).await;
            (a.text(), a.header("x-backstop-fallback-reason").map(str::to_string))
        } else {
            let a = post(&with.url("/v1/chat/completions"), &chat(false)).await;
            (a.text(), Some(reason(&a)))
        };
        assert_eq!(text, "from fallback", "stream={stream}");
        assert_eq!(why.as_deref(), Some("primary/up-model=emptyCompletion"));
    }
    let without = TestSidecar::start(&two_target_policy(&upstream.base_url(), "")).await;
    let answer = post(&without.url("/v1/chat/completions"), &chat(false)).await;
    assert_eq!((answer.header("x-backstop-provider"), answer.text().as_str()), (Some("primary"), ""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_controls_apply_only_where_the_policy_allows_them() {
    let upstream = Upstream::start(Fault::status(500)).await;
    let policy = two_target_policy(&upstream.base_url(), "  allowRequestOverrides: [noFallback, maxAttempts]\n");
    let sidecar = TestSidecar::start(&policy).await;
    let url = sidecar.url("/v1/chat/completions");
    let body = chat(false).to_string();

    let no_fallback = post_raw(&url, body.clone(), &[("x-backstop-no-fallback", "true")]).await;
    assert_eq!(no_fallback.status, 500, "the primary's own error, not the fallback's answer");
    assert_eq!(no_fallback.header("x-backstop-attempts"), Some("2"), "retries still apply");

    let capped = post_raw(&url, body.clone(), &[("x-backstop-max-attempts", "1")]).await;
    assert_eq!(capped.status, 502);
    assert!(capped.json()["error"]["stopped"].as_str().is_some_and(|s| s.contains("attempt cap")), "{}", capped.json());
    assert_eq!(capped.header("x-backstop-attempts"), Some("1"));

    // Not allowed by the policy: ignored.
    let ignored = post_raw(&url, body, &[("x-backstop-deadline", "1ms"), ("x-backstop-bogus", "x")]).await;
    assert_eq!((ignored.status, ignored.header("x-backstop-provider")), (200, Some("fallback")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_the_app_set_never_counts_against_the_target() {
    let upstream = Upstream::start(Fault::StallBeforeHeaders).await;
    let policy = two_target_policy(
        &upstream.base_url(),
        "  allowRequestOverrides: [deadline]\n  circuitBreaker: {consecutiveFailures: 2}\n",
    )
    .replace("attempts: 2", "attempts: 1");
    let sidecar = TestSidecar::start(&policy).await;
    let body = chat(false).to_string();
    for _ in 0..4 {
        let answer =
            post_raw(&sidecar.url("/v1/chat/completions"), body.clone(), &[("x-backstop-deadline", "100ms")]).await;
        assert_eq!(answer.status, 504, "{}", String::from_utf8_lossy(&answer.body));
    }
    let state = health(&sidecar, "primary/up-model").await;
    assert_eq!(state["state"], "closed", "the app's short deadline is not the target's fault: {state}");
    assert_eq!(state["failures"], serde_json::json!({}), "{state}");
    assert_eq!(upstream.count(), 4);
    // Its own attempt timeout is: two of those open the breaker.
    for _ in 0..2 {
        assert_eq!(
            post(&sidecar.url("/v1/chat/completions"), &chat(false)).await.header("x-backstop-provider"),
            Some("fallback")
        );
    }
    assert_eq!(health(&sidecar, "primary/up-model").await["state"], "open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hedge_with_nowhere_to_go_leaves_the_other_keys_to_try() {
    let upstream = Upstream::start(Fault::ByKey {
        key: "sk-slow-broken",
        matched: Box::new(Fault::Delayed(Duration::from_millis(400), Box::new(Fault::status(500)))),
        other: Box::new(Fault::Ok),
    })
    .await;
    let policy = format!(
        r#"apiVersion: backstop.dev/v1alpha1
kind: FallbackPolicy
metadata: {{name: hedge-keys, namespace: tests}}
spec:
  providers:
    - {{name: primary, type: openai-compatible, baseUrl: "{}", apiKeys: [{{value: sk-slow-broken}}, {{value: sk-good}}]}}
  routes:
    - model: chat
      hedge: {{afterFirstTokenDelay: 100ms}}
      chain: [{{provider: primary, model: up-model}}]
  retry: {{attempts: 1}}
"#,
        upstream.base_url()
    );
    let sidecar = TestSidecar::start(&policy).await;
    for _ in 0..6 {
        let answer = post(&sidecar.url("/v1/chat/completions"), &chat(false)).await;
        assert_eq!(answer.status, 200, "{}", String::from_utf8_lossy(&answer.body));
        assert_eq!(answer.text(), "from upstream");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_that_break_after_their_first_token_count_against_the_target() {
    let upstream = Upstream::start(Fault::CutAfterFirstChunk).await;
    let policy = two_target_policy(&upstream.base_url(), "  circuitBreaker: {consecutiveFailures: 2}\n");
    let sidecar = TestSidecar::start(&policy).await;
    let url = sidecar.url("/v1/chat/completions");
    for _ in 0..2 {
        let cut = post_stream(&url, &chat(true)).await;
        assert_eq!(cut.header("x-backstop-provider"), Some("primary"));
        assert!(cut.broken.is_some(), "committed, then cut");
    }
    let state = health(&sidecar, "primary/up-model").await;
    assert_eq!(state["state"], "open", "{state}");
    assert_eq!(state["inFlight"], 0, "a finished stream is no longer in flight: {state}");
    let next = post_stream(&url, &chat(true)).await;
    assert_eq!(next.header("x-backstop-provider"), Some("fallback"));
    assert_eq!(next.header("x-backstop-fallback-reason"), Some("primary/up-model=circuitOpen"));
    assert!(next.done());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_stream_is_ended_by_a_stall_not_by_the_request_deadline() {
    let upstream = Upstream::start(Fault::StallAfterFirstChunk).await;
    let policy =
        two_target_policy(&upstream.base_url(), "").replace("idle: 500ms, total: 10s", "idle: 700ms, total: 200ms");
    let sidecar = TestSidecar::start(&policy).await;
    let started = Instant::now();
    let answer = post_stream(&sidecar.url("/v1/chat/completions"), &chat(true)).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.text(), "from", "the first chunk reached the app");
    assert!(!answer.done() && answer.broken.is_some(), "cut, not finished: {answer:?}");
    assert!(answer.events.last().is_some_and(|e| e.contains("upstream sent nothing for 700ms")), "{answer:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(700),
        "the 200 ms total deadline is for finding a target, not for a committed stream: {:?}",
        started.elapsed()
    );
    let state = health(&sidecar, "primary/up-model").await;
    assert_eq!(state["failures"]["timeout"], 1, "a stalled stream counts against its target: {state}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_request_walks_the_fallback_path_on_purpose_and_says_so() {
    let upstream = Upstream::start(Fault::Ok).await;
    let policy = two_target_policy(&upstream.base_url(), "  allowRequestOverrides: [drill]\n");
    let sidecar = TestSidecar::start(&policy).await;
    let url = sidecar.url("/v1/chat/completions");

    let drilled = post_raw(&url, chat(false).to_string(), &[("x-backstop-drill", "primary/up-model")]).await;
    assert_eq!(drilled.status, 200, "{}", String::from_utf8_lossy(&drilled.body));
    assert_eq!((drilled.header("x-backstop-provider"), drilled.text().as_str()), (Some("fallback"), "from fallback"));
    assert_eq!(drilled.header("x-backstop-drill"), Some("true"));
    assert_eq!(drilled.header("x-backstop-fallback-reason"), Some("primary/up-model=drill"));
    let streamed = post_stream_with(&url, &chat(true), &[("x-backstop-drill", "primary")]).await;
    assert_eq!((streamed.header("x-backstop-drill"), streamed.text().as_str()), (Some("true"), "from fallback"));
    assert_eq!(upstream.count(), 0, "the drilled target was never called");

    let typo = post_raw(&url, chat(false).to_string(), &[("x-backstop-drill", "primary/gpt-4o")]).await;
    assert_eq!(typo.status, 400);
    assert_eq!(typo.json()["error"]["code"], "invalid_drill", "{}", typo.json());

    let plain = post(&url, &chat(false)).await;
    assert_eq!((plain.header("x-backstop-provider"), plain.header("x-backstop-drill")), (Some("primary"), None));

    // The same header where the policy does not allow drills is ignored.
    let strict = TestSidecar::start(&two_target_policy(&upstream.base_url(), "")).await;
    let ignored =
        post_raw(&strict.url("/v1/chat/completions"), chat(false).to_string(), &[("x-backstop-drill", "primary")])
            .await;
    assert_eq!((ignored.header("x-backstop-provider"), ignored.header("x-backstop-drill")), (Some("primary"), None));
    assert_eq!(upstream.count(), 2);
}
