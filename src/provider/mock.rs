//! The built-in `mock` provider: answers in-process like a real OpenAI-style upstream, with
//! latency and failures set in the policy, so demos, drills and tests need no network or key.

use bytes::Bytes;
use futures_util::stream;
use http::{HeaderMap, HeaderValue};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use super::openai::error::from_response;
use super::openai::stream::chunk_event;
use crate::chain::MockBehaviour;
use crate::llm::answer::embedding_value;
use crate::llm::{AttemptError, ChatRequest, ChunkStream, FailureClass, Operation, Reply, unix_seconds};

/// A running mock provider. Its random draw is shared by every request to it, so a seeded
/// mock fails the same sequence of requests on every run.
#[derive(Debug)]
pub struct Mock {
    behaviour: MockBehaviour,
    rng: Mutex<StdRng>,
}

impl Mock {
    /// A mock with this behaviour.
    pub fn new(behaviour: MockBehaviour) -> Self {
        let rng = match behaviour.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Mock { behaviour, rng: Mutex::new(rng) }
    }

    /// Its behaviour.
    pub fn behaviour(&self) -> &MockBehaviour {
        &self.behaviour
    }

    fn draws_failure(&self) -> bool {
        if self.behaviour.failure_rate <= 0.0 {
            return false;
        }
        if self.behaviour.failure_rate >= 1.0 {
            return true;
        }
        // The lock guards a few arithmetic steps and is never held across an await.
        let mut rng = self.rng.lock();
        rng.random_bool(self.behaviour.failure_rate)
    }

    /// Answers one request.
    pub async fn send(&self, model: &str, request: &ChatRequest) -> Result<Reply, AttemptError> {
        let failing = self.draws_failure();
        if !self.behaviour.latency.is_zero() {
            tokio::time::sleep(self.behaviour.latency).await;
        }
        if failing {
            return Err(self.failure());
        }
        if request.operation == Operation::Embeddings {
            return Ok(Reply::Complete(embeddings(model, request).into()));
        }
        let id = format!("chatcmpl-mock-{:x}", rand::random::<u64>());
        let created = unix_seconds();
        let prompt_tokens = request.estimated_prompt_tokens();
        let reply = self.reply_to(request);
        let completion_tokens = reply.split_whitespace().count().max(1) as u64;
        let usage = json!({
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        });
        if !request.stream {
            return Ok(Reply::Complete(
                json!({
                    "id": id,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [{
                        "index": 0,
                        "message": {"role": "assistant", "content": reply, "refusal": null},
                        "logprobs": null,
                        "finish_reason": "stop",
                    }],
                    "usage": usage,
                    "system_fingerprint": "backstop-mock",
                })
                .into(),
            ));
        }
        let chunk = |choices: Value| json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices});
        let mut chunks =
            vec![chunk(json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]))];
        let pieces = split_reply(reply, self.behaviour.chunks);
        let cut =
            self.behaviour.stream_cut_after.map(|n| n as usize).filter(|n| *n < pieces.len() && !request.continues);
        for piece in pieces {
            chunks.push(chunk(json!([{"index": 0, "delta": {"content": piece}, "finish_reason": null}])));
        }
        chunks.push(chunk(json!([{"index": 0, "delta": {}, "finish_reason": "stop"}])));
        // As OpenAI does when asked, which Backstop always does of OpenAI (for its telemetry);
        // an app that did not ask is not sent it.
        let mut last = chunk(json!([]));
        last["usage"] = usage;
        chunks.push(last);
        let first_token_latency = self.behaviour.first_token_latency;
        let stream: ChunkStream =
            Box::pin(stream::unfold((chunks.into_iter(), 0usize), move |(mut rest, index)| async move {
                // The role chunk goes out at once, content waits for the first token.
                if index == 1 && !first_token_latency.is_zero() {
                    tokio::time::sleep(first_token_latency).await;
                }
                if cut.is_some_and(|after| index == after + 1) {
                    let cut = AttemptError::new(
                        FailureClass::ServerError,
                        "stream broke off: connection reset (mock provider)",
                    );
                    return Some((Err(cut), (Vec::new().into_iter(), usize::MAX)));
                }
                rest.next().map(|chunk| (Ok(chunk_event(chunk)), (rest, index.saturating_add(1))))
            }));
        Ok(Reply::Stream(stream))
    }

    /// The answer's text: the reply, or, continuing an answer another target began, what of
    /// the reply follows the text so far (the whole reply when it does not begin that way).
    fn reply_to<'a>(&'a self, request: &ChatRequest) -> &'a str {
        let reply = self.behaviour.reply.as_str();
        let begun = request.messages.last().filter(|_| request.continues).and_then(|m| m.content.as_ref());
        match begun.and_then(Value::as_str) {
            Some(begun) => reply.strip_prefix(begun).unwrap_or(reply),
            None => reply,
        }
    }

    fn failure(&self) -> AttemptError {
        let status = self.behaviour.failure_status;
        let (kind, code, message) = match status {
            429 => ("requests", "rate_limit_exceeded", "Rate limit reached (mock provider)."),
            401 => ("invalid_request_error", "invalid_api_key", "Incorrect API key provided (mock provider)."),
            400 => ("invalid_request_error", "invalid_value", "Invalid request (mock provider)."),
            503 | 529 => ("server_error", "overloaded", "The server is overloaded (mock provider)."),
            _ => ("server_error", "server_error", "The server had an error (mock provider)."),
        };
        let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
        let mut headers = HeaderMap::new();
        if let Some(secs) = self.behaviour.retry_after
            && matches!(status, 429 | 503)
        {
            headers.insert("retry-after", HeaderValue::from(secs));
        }
        from_response(status, &headers, Bytes::from(body.to_string()))
    }
}

/// Deterministic unit vectors, one per input, so the same text always embeds the same way.
fn embeddings(model: &str, request: &ChatRequest) -> Value {
    use std::hash::{Hash, Hasher};
    let dimensions = request.rest.get("dimensions").and_then(Value::as_u64).unwrap_or(8).clamp(1, 4096) as usize;
    let base64 = request.rest.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let inputs: Vec<String> = match request.rest.get("input") {
        Some(Value::Array(items)) => {
            items.iter().map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_string)).collect()
        }
        Some(Value::String(text)) => vec![text.clone()],
        _ => Vec::new(),
    };
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, text)| {
            let raw: Vec<f64> = (0..dimensions)
                .map(|d| {
                    let mut hasher = std::collections::hash_map::DefaultHasher::new();
                    (text, d).hash(&mut hasher);
                    (hasher.finish() % 2001) as f64 / 1000.0 - 1.0
                })
                .collect();
            let norm = raw.iter().map(|v| v * v).sum::<f64>().sqrt().max(f64::EPSILON);
            let unit: Vec<f64> = raw.iter().map(|v| v / norm).collect();
            json!({"object": "embedding", "index": index, "embedding": embedding_value(&unit, base64)})
        })
        .collect();
    let tokens: u64 = inputs.iter().map(|t| (t.len() as u64).div_ceil(4)).sum();
    json!({"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
}

/// Cuts `reply` into `parts` pieces at character boundaries, as evenly as it can.
fn split_reply(reply: &str, parts: u32) -> Vec<String> {
    let chars: Vec<char> = reply.chars().collect();
    let parts = (parts.max(1) as usize).min(chars.len().max(1));
    let size = chars.len().div_ceil(parts).max(1);
    let pieces: Vec<String> = chars.chunks(size).map(|c| c.iter().collect()).collect();
    if pieces.is_empty() { vec![String::new()] } else { pieces }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use std::time::Duration;

    fn request(stream: bool) -> ChatRequest {
        serde_json::from_value(json!({"model": "m", "messages": [{"role": "user", "content": "hello there"}],
                                      "stream": stream, "stream_options": {"include_usage": true}}))
        .expect("valid")
    }

    #[test]
    fn splits_replies_evenly() {
        assert_eq!(split_reply("abcdefgh", 4), ["ab", "cd", "ef", "gh"]);
        assert_eq!(split_reply("abc", 10), ["a", "b", "c"]);
        assert_eq!(split_reply("", 3), [""]);
        assert_eq!(split_reply("héllo", 2).concat(), "héllo");
    }

    #[tokio::test]
    async fn seeded_failures_repeat_exactly() {
        let behaviour = MockBehaviour { failure_rate: 0.5, failure_status: 429, seed: Some(7), ..Default::default() };
        let draw = |mock: &Mock| (0..64).map(|_| mock.draws_failure()).collect::<Vec<_>>();
        let first = draw(&Mock::new(behaviour.clone()));
        assert_eq!(first, draw(&Mock::new(behaviour)));
        let failures = first.iter().filter(|f| **f).count();
        assert!((16..=48).contains(&failures), "{failures} of 64");
    }

    #[tokio::test]
    async fn failures_carry_status_and_retry_after() {
        let mock = Mock::new(MockBehaviour {
            failure_rate: 1.0,
            failure_status: 429,
            retry_after: Some(3),
            ..Default::default()
        });
        let error = mock.send("m", &request(false)).await.expect_err("fails");
        assert_eq!(error.class, FailureClass::RateLimited);
        assert_eq!(error.status, Some(429));
        assert_eq!(error.retry_after, Some(Duration::from_secs(3)));
    }

    #[tokio::test]
    async fn streams_the_reply_with_usage() {
        let mock = Mock::new(MockBehaviour { reply: "one two three".into(), chunks: 3, ..Default::default() });
        let Ok(Reply::Stream(stream)) = mock.send("m", &request(true)).await else { panic!("expected a stream") };
        let chunks: Vec<Value> = stream.map(|c| c.expect("chunk").data().clone()).collect().await;
        let text: String =
            chunks.iter().filter_map(|c| c.pointer("/choices/0/delta/content").and_then(Value::as_str)).collect();
        assert_eq!(text, "one two three");
        assert_eq!(chunks.last().and_then(|c| c.pointer("/usage/completion_tokens")), Some(&json!(3)));
    }

    /// The text of a stream's chunks, and its error if it was cut.
    async fn streamed(mock: &Mock, request: &ChatRequest) -> (String, Option<AttemptError>) {
        let Ok(Reply::Stream(mut stream)) = mock.send("m", request).await else { panic!("expected a stream") };
        let mut text = String::new();
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => text.extend(event.data().pointer("/choices/0/delta/content").and_then(Value::as_str)),
                Err(error) => return (text, Some(error)),
            }
        }
        (text, None)
    }

    #[tokio::test]
    async fn a_cut_stream_breaks_after_its_chunks_and_a_continuation_carries_on_from_its_text() {
        let behaviour =
            MockBehaviour { reply: "ab cd ef gh".into(), chunks: 4, stream_cut_after: Some(2), ..Default::default() };
        let mock = Mock::new(behaviour);
        let (text, cut) = streamed(&mock, &request(true)).await;
        assert_eq!(text, "ab cd ");
        assert_eq!(cut.map(|e| e.class), Some(FailureClass::ServerError));

        let mut continuing = request(true);
        continuing
            .messages
            .push(serde_json::from_value(json!({"role": "assistant", "content": "ab cd"})).expect("message"));
        continuing.continues = true;
        let (rest, cut) = streamed(&mock, &continuing).await;
        assert_eq!((rest.as_str(), cut.is_none()), (" ef gh", true), "the rest, never cut");
    }
}
