//! Every upstream fault, streaming and not, against a real sidecar on real sockets: the
//! documented outcome (retry, fall through, or return as is) and what the app sees.

use std::time::Duration;

use serde_json::Value;

use crate::support::*;

/// Runs one request (streaming or not) through a two-target chain whose primary misbehaves
/// with `fault`, and checks the answer came from the fallback, with `reason` in the headers,
/// after `primary_attempts` attempts at the primary.
async fn falls_through(fault: Fault, stream: bool, reason: &str, primary_attempts: usize) {
    let upstream = Upstream::start(fault.clone()).await;
    let sidecar = TestSidecar::start(&two_target_policy(&upstream.base_url(), "")).await;
    let (status, provider, header_reason, attempts, text) = if stream {
        let answer = post_stream(&sidecar.url("/v1/chat/completions"), &chat(true)).await;
        assert!(answer.done(), "{fault:?}: stream did not finish cleanly: {answer:?}");
        assert!(answer.broken.is_none(), "{answer:?}");
        assert_eq!(answer.header("content-type"), Some("text/event-stream"));
        (
            answer.status,
            answer.header("x-backstop-provider").map(str::to_string),
            answer.header("x-backstop-fallback-reason").map(str::to_string),
            answer.header("x-backstop-attempts").map(str::to_string),
            answer.text(),
        )
    } else {
        let answer = post(&sidecar.url("/v1/chat/completions"), &chat(false)).await;
        (
            answer.status,
            answer.header("x-backstop-provider").map(str::to_string),
            answer.header("x-backstop-fallback-reason").map(str::to_string),
            answer.header("x-backstop-attempts").map(str::to_string),
            answer.text(),
        )
    };
    assert_eq!(status, 200, "{fault:?} stream={stream}");
    assert_eq!(provider.as_deref(), Some("fallback"), "{fault:?} stream={stream}");
    assert_eq!(text, "from fallback", "{fault:?} stream={stream}: the app must see only the fallback's answer");
    assert_eq!(
        header_reason.as_deref(),
        Some(format!("primary/up-model={reason}").as_str()),
        "{fault:?} stream={stream}"
    );
    assert_eq!(upstream.count(), primary_attempts, "{fault:?} stream={stream}: attempts at the primary");
    assert_eq!(attempts.as_deref(), Some((primary_attempts + 1).to_string().as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_error_500_is_retried_then_falls_through() {
    falls_through(Fault::status(500), false, "serverError", 2).await;
    falls_through(Fault::status(500), true, "serverError", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overloaded_503_and_529_are_retried_then_fall_through() {
    for status in [503, 529] {
        falls_through(Fault::status(status), false, "overloaded", 2).await;
        falls_through(Fault::status(status), true, "overloaded", 2).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_error_401_falls_through_without_retry() {
    falls_through(Fault::status(401), false, "authError", 1).await;
    falls_through(Fault::status(401), true, "authError", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_refused_falls_through() {
    let addr = refused_addr().await;
    let sidecar = TestSidecar::start(&two_target_policy(&format!("http://{addr}/v1"), "")).await;
    for stream in [false, true] {
        let (status, reason, attempts) = if stream {
            let a = post_stream(&sidecar.url("/v1/chat/completions"), &chat(true)).await;
            assert_eq!(a.text(), "from fallback");
            (
                a.status,
                a.header("x-backstop-fallback-reason").map(str::to_string),
                a.header("x-backstop-attempts").map(str::to_string),
            )
        } else {
            let a = post(&sidecar.url("/v1/chat/completions"), &chat(false)).await;
            assert_eq!(a.text(), "from fallback");
            (
                a.status,
                a.header("x-backstop-fallback-reason").map(str::to_string),
                a.header("x-backstop-attempts").map(str::to_string),
            )
        };
        assert_eq!(status, 200);
        assert_eq!(reason.as_deref(), Some("primary/up-model=connectError"));
        assert_eq!(attempts.as_deref(), Some("3"), "a refused connection is retried once, then falls through");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stall_before_headers_times_out_and_falls_through() {
    let started = tokio::time::Instant::now();
    falls_through(Fault::StallBeforeHeaders, false, "timeout", 2).await;
    falls_through(Fault::StallBeforeHeaders, true, "timeout", 2).await;
    // Two 500 ms attempts per request, not the upstream's hour.
    assert!(started.elapsed() < Duration::from_secs(8), "{:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stall_before_the_first_chunk_times_out_and_falls_through_unseen() {
    // Streams: the held role chunk is dropped; non-streams: a body that stops is a timeout.
    falls_through(Fault::StallAfterHeaders, true, "timeout", 2).await;
    falls_through(Fault::StallAfterHeaders, false, "timeout", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_answers_fall_through() {
    falls_through(Fault::Garbage, false, "serverError", 2).await;
    falls_through(Fault::Garbage, true, "serverError", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_event_inside_a_200_falls_through() {
    falls_through(Fault::ErrorEvent { kind: "server_error" }, true, "serverError", 2).await;
    falls_through(Fault::ErrorEvent { kind: "server_error" }, false, "serverError", 2).await;
    falls_through(Fault::ErrorEvent { kind: "rate_limit_error" }, true, "rateLimited", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_before_the_body_completes_falls_through_when_not_streaming() {
    // Nothing has reached the app yet, so a broken body is just another failed attempt.
    falls_through(Fault::CutAfterFirstChunk, false, "connectError", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_after_the_first_chunk_ends_the_stream_with_an_error() {
    let upstream = Upstream::start(Fault::CutAfterFirstChunk).await;
    let sidecar = TestSidecar::start(&two_target_policy(&upstream.base_url(), "")).await;
    let answer = post_stream(&sidecar.url("/v1/chat/completions"), &chat(true)).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("x-backstop-provider"), Some("primary"), "committed to the primary");
    assert_eq!(answer.text(), "from", "the first chunk reached the app");
    assert!(!answer.done(), "a cut stream must never end with [DONE]: {answer:?}");
    let last: Value = serde_json::from_str(answer.events.last().expect("events")).expect("json event");
    assert_eq!(last["error"]["code"], "stream_interrupted", "{last}");
    assert!(answer.broken.is_some(), "the body must end with an error, not a clean finish");
    assert_eq!(upstream.count(), 1, "no retry after commit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_request_400_is_returned_as_is_without_fallback() {
    let upstream = Upstream::start(Fault::status(400)).await;
    let sidecar = TestSidecar::start(&two_target_policy(&upstream.base_url(), "")).await;
    for stream in [false, true] {
        let answer = post(&sidecar.url("/v1/chat/completions"), &chat(stream)).await;
        assert_eq!(answer.status, 400, "stream={stream}");
        let Fault::Status { body, .. } = Fault::status(400) else { unreachable!() };
        assert_eq!(answer.json(), body, "the provider's own body, untouched");
        assert_eq!(answer.header("x-backstop-provider"), Some("primary"));
        assert_eq!(answer.header("x-backstop-fallback-reason"), None);
    }
    assert_eq!(upstream.count(), 2, "one attempt per request, no retry, no fall-through");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_429_honours_retry_after_before_retrying() {
    for stream in [false, true] {
        let upstream = Upstream::scripted(vec![Fault::with_retry_after(429, "1")], Fault::Ok).await;
        let sidecar = TestSidecar::start(&two_target_policy(&upstream.base_url(), "")).await;
        let (status, provider) = if stream {
            let a = post_stream(&sidecar.url("/v1/chat/completions"), &chat(true)).await;
            assert_eq!(a.text(), "from upstream");
            (a.status, a.header("x-backstop-provider").map(str::to_string))
        } else {
            let a = post(&sidecar.url("/v1/chat/completions"), &chat(false)).await;
            assert_eq!(a.text(), "from upstream");
            assert_eq!(a.json()["upstream_extra"], "kept", "unknown answer fields pass through");
            (a.status, a.header("x-backstop-provider").map(str::to_string))
        };
        assert_eq!((status, provider.as_deref()), (200, Some("primary")), "the retry at the primary succeeded");
        let received = upstream.received();
        assert_eq!(received.len(), 2);
        let gap = received[1].at - received[0].at;
        assert!(gap >= Duration::from_millis(990), "retried after {gap:?}, before the 1 s Retry-After");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_beyond_the_backoff_cap_falls_through_at_once() {
    for stream in [false, true] {
        let started = tokio::time::Instant::now();
        falls_through(Fault::with_retry_after(429, "30"), stream, "rateLimited", 1).await;
        assert!(started.elapsed() < Duration::from_secs(3), "waited {:?}", started.elapsed());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_target_rate_limited_answers_429_with_retry_after() {
    let upstream = Upstream::start(Fault::with_retry_after(429, "7")).await;
    let policy = two_target_policy(&upstream.base_url(), "").replace(
        "{name: fallback, type: mock, mock: {reply: \"from fallback\", chunks: 2}}",
        "{name: fallback, type: mock, mock: {failureRate: 1, failureStatus: 429, retryAfter: 9}}",
    );
    let sidecar = TestSidecar::start(&policy).await;
    // The first request tries both; their Retry-After opens both breakers, so the second
    // skips them, except the one that opened first, which it tries rather than fail untried.
    for (stream, tried) in [(false, 2), (true, 1)] {
        let answer = post(&sidecar.url("/v1/chat/completions"), &chat(stream)).await;
        assert_eq!(answer.status, 429, "{}", String::from_utf8_lossy(&answer.body));
        assert_eq!(answer.header("retry-after"), Some("7"));
        let error = &answer.json()["error"];
        assert_eq!(error["code"], "all_targets_rate_limited");
        assert_eq!(error["attempts"].as_array().map(Vec::len), Some(tried), "{error}");
        let message = error["message"].as_str().expect("message");
        assert!(message.contains("primary/up-model rateLimited (429)"), "{message}");
        if tried == 2 {
            assert!(message.contains("fallback/mock-model rateLimited (429)"), "{message}");
        } else {
            assert_eq!(error["skipped"], serde_json::json!(["fallback/mock-model"]), "{message}");
        }
    }
    assert_eq!(upstream.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_target_failing_answers_502_listing_attempts_without_auth_bodies() {
    let upstream = Upstream::start(Fault::status(401)).await;
    let policy = two_target_policy(&upstream.base_url(), "")
        .replace("mock: {reply: \"from fallback\", chunks: 2}", "mock: {failureRate: 1, failureStatus: 500}");
    let sidecar = TestSidecar::start(&policy).await;
    let answer = post(&sidecar.url("/v1/chat/completions"), &chat(false)).await;
    assert_eq!(answer.status, 502);
    let body = String::from_utf8_lossy(&answer.body).to_string();
    assert!(!body.contains("SECRET"), "the upstream's 401 body leaked: {body}");
    let error = &answer.json()["error"];
    assert_eq!(error["code"], "all_targets_failed");
    let classes: Vec<&str> =
        error["attempts"].as_array().expect("attempts").iter().filter_map(|a| a["class"].as_str()).collect();
    assert_eq!(classes, ["authError", "serverError", "serverError"]);
    assert_eq!(answer.header("x-backstop-attempts"), Some("3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_deadline_answers_504() {
    let upstream = Upstream::start(Fault::StallBeforeHeaders).await;
    let policy = two_target_policy(&upstream.base_url(), "").replace("total: 10s", "total: 700ms");
    let sidecar = TestSidecar::start(&policy).await;
    let started = tokio::time::Instant::now();
    let answer = post(&sidecar.url("/v1/chat/completions"), &chat(false)).await;
    assert_eq!(answer.status, 504, "{}", String::from_utf8_lossy(&answer.body));
    assert_eq!(answer.json()["error"]["code"], "deadline_exceeded");
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classes_outside_fallback_on_are_returned_as_is() {
    let upstream = Upstream::start(Fault::status(500)).await;
    let policy = two_target_policy(&upstream.base_url(), "  fallbackOn: [rateLimited]\n");
    let sidecar = TestSidecar::start(&policy).await;
    let answer = post(&sidecar.url("/v1/chat/completions"), &chat(false)).await;
    assert_eq!(answer.status, 500);
    assert_eq!(answer.header("x-backstop-provider"), Some("primary"));
    assert_eq!(upstream.count(), 2, "transient failures are still retried at the same target");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_after_the_first_chunk_on_a_reused_connection_delivers_the_chunk_then_the_error() {
    for wire in [Wire::OpenAi, Wire::Anthropic] {
        for _ in 0..5 {
            // The first request leaves its connection in the sidecar's pool; the second reuses it.
            let upstream = Upstream::speaking(wire, vec![Fault::Ok], Fault::CutAfterFirstChunk).await;
            let kind = if wire == Wire::Anthropic { "anthropic" } else { "openai-compatible" };
            let base = if wire == Wire::Anthropic {
                upstream.base_url().trim_end_matches("/v1").to_string()
            } else {
                upstream.base_url()
            };
            let policy = two_target_policy(&base, "").replace("type: openai-compatible", &format!("type: {kind}"));
            let sidecar = TestSidecar::start(&policy).await;
            let warm = post_stream(&sidecar.url("/v1/chat/completions"), &chat(true)).await;
            assert!(warm.done(), "{warm:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
            let answer = post_stream(&sidecar.url("/v1/chat/completions"), &chat(true)).await;
            assert_eq!(answer.header("x-backstop-provider"), Some("primary"), "{wire:?}: committed: {answer:?}");
            assert_eq!(answer.text(), "from", "{wire:?}: the chunk that arrived reached the app");
            assert!(answer.broken.is_some() && !answer.done(), "{wire:?}: then the error");
            assert_eq!(upstream.count(), 2, "{wire:?}: no second billed call to a target that streamed");
        }
    }
}

/// A raw HTTP/1.1 upstream: answers its first request with a whole stream and keeps the
/// connection; on the second it sends the headers and the first content chunk, then closes the
/// connection (`reset`: with a TCP reset) without the terminating chunk. Counts requests, and
/// the cuts made on a connection that had served a request before.
async fn raw_cutting_upstream(
    reset: bool,
    anthropic: bool,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let reused_cuts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (counted, reused) = (requests.clone(), reused_cuts.clone());
    let event = move |text: &str| -> String {
        if anthropic {
            let data = serde_json::json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}});
            format!("event: content_block_delta\ndata: {data}\n\n")
        } else {
            let data = serde_json::json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]});
            format!("data: {data}\n\n")
        }
    };
    let start = if anthropic {
        let message = serde_json::json!({"type": "message_start", "message": {"id": "msg", "type": "message", "role": "assistant",
            "model": "m", "content": [], "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 1, "output_tokens": 1}}});
        let block = serde_json::json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}});
        format!("event: message_start\ndata: {message}\n\nevent: content_block_start\ndata: {block}\n\n")
    } else {
        String::new()
    };
    let end = if anthropic {
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":2}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n".to_string()
    } else {
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n".to_string()
    };
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let (counted, reused, start, end) = (counted.clone(), reused.clone(), start.clone(), end.clone());
            let whole = format!("{start}{}{}{end}", event("from"), event(" upstream"));
            let first = format!("{start}{}", event("from"));
            tokio::spawn(async move {
                let mut served = 0;
                let mut buffer = Vec::new();
                loop {
                    // Read one request: headers, then its content-length body.
                    let mut chunk = [0u8; 65536];
                    let Ok(n) = socket.read(&mut chunk).await else { return };
                    if n == 0 {
                        return;
                    }
                    buffer.extend_from_slice(&chunk[..n]);
                    let Some(head_end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
                    let head = String::from_utf8_lossy(&buffer[..head_end]).to_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
                        .unwrap_or(0);
                    if buffer.len() < head_end + 4 + length {
                        continue;
                    }
                    buffer.drain(..head_end + 4 + length);
                    let nth = counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    served += 1;
                    let cut = nth > 1;
                    if cut && served > 1 {
                        reused.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    let body = if cut { &first } else { &whole };
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n",
                        body.len()
                    );
                    let _ = socket.write_all(response.as_bytes()).await;
                    if !cut {
                        let _ = socket.write_all(b"0\r\n\r\n").await;
                        continue;
                    }
                    let _ = socket.flush().await;
                    if reset {
                        let _ = socket.set_zero_linger();
                    }
                    drop(socket);
                    return;
                }
            });
        }
    });
    (address, requests, reused_cuts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_upstream_cut_after_its_first_chunk_on_a_reused_connection_keeps_the_commit_point() {
    for anthropic in [false, true] {
        for reset in [false, true] {
            let (address, requests, reused_cuts) = raw_cutting_upstream(reset, anthropic).await;
            let kind = if anthropic { "anthropic" } else { "openai-compatible" };
            let base = if anthropic { format!("http://{address}") } else { format!("http://{address}/v1") };
            let policy = two_target_policy(&base, "").replace("type: openai-compatible", &format!("type: {kind}"));
            let sidecar = TestSidecar::start(&policy).await;
            let warm = post_stream(&sidecar.url("/v1/chat/completions"), &chat(true)).await;
            assert!(warm.done(), "anthropic={anthropic} reset={reset}: {warm:?}");
            // Its connection goes back to the sidecar's pool once the stream ended.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let answer = post_stream(&sidecar.url("/v1/chat/completions"), &chat(true)).await;
            let case = format!("anthropic={anthropic} reset={reset}");
            assert_eq!(
                reused_cuts.load(std::sync::atomic::Ordering::SeqCst),
                1,
                "{case}: cut on the reused connection"
            );
            assert_eq!(answer.header("x-backstop-provider"), Some("primary"), "{case}: committed: {answer:?}");
            assert_eq!(answer.text(), "from", "{case}: the chunk that arrived reached the app");
            assert!(answer.broken.is_some() && !answer.done(), "{case}: then the error");
            assert_eq!(requests.load(std::sync::atomic::Ordering::SeqCst), 2, "{case}: no second billed call");
        }
    }
}
