//! Chat Completions streams: `chat.completion.chunk` events, `[DONE]` at the end.

use serde_json::Value;

use super::content::carries_content;
use super::error::stream_error;
use crate::llm::FailureClass;
use crate::llm::{AttemptError, StreamEvent};
use crate::provider::sse::{self, Parsed, WireStream};

/// Reads Chat Completions chunks: `[DONE]` ends the stream; an end without it is clean only
/// once a `finish_reason` has come.
#[derive(Debug, Default)]
pub struct ChunkParser {
    finished: bool,
}

impl WireStream for ChunkParser {
    fn event(&mut self, event: sse::Event) -> Parsed {
        if event.data.trim() == "[DONE]" {
            return Parsed::End;
        }
        match parse_chunk(&event.data) {
            Ok(chunk) => {
                let event = chunk_event(chunk);
                self.finished |= event.end;
                Parsed::Event(event)
            }
            Err(error) => Parsed::Fail(error),
        }
    }

    fn may_end(&self) -> bool {
        self.finished
    }
}

fn parse_chunk(data: &str) -> Result<Value, AttemptError> {
    let chunk = sse::json_data(data)?;
    if let Some(error) = chunk.get("error").filter(|e| e.is_object()) {
        return Err(stream_error(error));
    }
    if !chunk.is_object() {
        return Err(AttemptError::new(FailureClass::ServerError, "stream event is not a JSON object"));
    }
    Ok(chunk)
}

fn has_finish_reason(chunk: &Value) -> bool {
    chunk
        .get("choices")
        .and_then(Value::as_array)
        .is_some_and(|choices| choices.iter().any(|c| c.get("finish_reason").is_some_and(|r| !r.is_null())))
}

/// A Chat Completions chunk as a stream event.
pub fn chunk_event(chunk: Value) -> StreamEvent {
    let content = carries_content(&chunk);
    let progress = content || carries_reasoning(&chunk);
    StreamEvent { content, progress, end: has_finish_reason(&chunk), data: chunk }
}

/// Whether a chunk carries reasoning that OpenAI-compatible servers stream before the answer
/// (`reasoning_content` from vLLM, DeepSeek and others; `reasoning` from some routers).
fn carries_reasoning(chunk: &Value) -> bool {
    chunk.get("choices").and_then(Value::as_array).is_some_and(|choices| {
        choices.iter().any(|choice| {
            let delta = choice.get("delta");
            ["reasoning_content", "reasoning"]
                .iter()
                .any(|k| delta.and_then(|d| d.get(k)).and_then(Value::as_str).is_some_and(|s| !s.is_empty()))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn content_chunks_are_recognised() {
        // A chunk commits a held stream when it carries content or ends the answer.
        let commits = |chunk: Value| {
            let event = chunk_event(chunk);
            event.content || event.end
        };
        assert!(!commits(json!({"choices": [{"delta": {"role": "assistant", "content": ""}}]})));
        assert!(commits(json!({"choices": [{"delta": {"content": "Hi"}}]})));
        assert!(commits(json!({"choices": [{"delta": {"tool_calls": [{"index": 0}]}}]})));
        assert!(commits(json!({"choices": [{"delta": {}, "finish_reason": "stop"}]})));
        assert!(!commits(json!({"choices": [], "usage": {"total_tokens": 3}})));
    }

    #[test]
    fn in_stream_errors_and_garbage_fail_the_chunk() {
        assert_eq!(
            parse_chunk(r#"{"error":{"message":"x","type":"rate_limit_error"}}"#).expect_err("error").class,
            FailureClass::RateLimited
        );
        assert_eq!(parse_chunk("not json").expect_err("garbage").class, FailureClass::ServerError);
        assert!(parse_chunk(r#"{"choices":[]}"#).is_ok());
    }
}
