//! Chat Completions streams: `chat.completion.chunk` events, `[DONE]` at the end.

use serde_json::Value;

use super::content::carries_content;
use super::error::stream_error;
use crate::llm::FailureClass;
use crate::llm::view::ChatView;
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
        let read = match ChatView::read(&event.data).map(|view| shows(&view)) {
            // The usual chunk, read in place and kept as it came.
            Some((content, progress, end)) => Ok(StreamEvent::from_text(event.data, content, progress, end)),
            None => parse_chunk(&event.data).map(chunk_event),
        };
        match read {
            Ok(event) => {
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
    let end = has_finish_reason(&chunk);
    StreamEvent::new(chunk, content, progress, end)
}

/// What a chunk read in place shows: content, progress, an end.
fn shows(view: &ChatView<'_>) -> (bool, bool, bool) {
    let content = view.content();
    (content, content || view.reasoning(), view.end())
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

/// Whether the two readings of a chunk agree: the in-place one, wherever it answers, shows what
/// decoding the chunk whole does. The fuzz target checks it on any input.
pub fn readings_agree(text: &str) -> bool {
    let Some(view) = ChatView::read(text) else { return true };
    parse_chunk(text).is_ok_and(|whole| {
        let event = chunk_event(whole);
        shows(&view) == (event.content, event.progress, event.end)
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
        let mut parser = ChunkParser::default();
        let error = sse::Event { event: None, data: r#"{"error":{"message":"x","type":"rate_limit_error"}}"#.into() };
        assert!(matches!(parser.event(error), Parsed::Fail(e) if e.class == FailureClass::RateLimited));
    }

    #[test]
    fn a_usual_chunk_is_kept_as_it_came_and_read_as_the_whole_one() {
        let chunks = [
            json!({"id": "c", "object": "chat.completion.chunk", "model": "m",
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]}),
            json!({"id": "c", "choices": [{"index": 0, "delta": {"content": "Hi\n"}, "logprobs": null}]}),
            json!({"choices": [{"delta": {"refusal": "no"}}]}),
            json!({"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}}]}),
            json!({"choices": [{"delta": {"tool_calls": []}}]}),
            json!({"choices": [{"delta": {"function_call": {"name": "f"}}}]}),
            json!({"choices": [{"delta": {"content": [{"type": "text", "text": "x"}]}}]}),
            json!({"choices": [{"delta": {"reasoning_content": "thinking"}}]}),
            json!({"choices": [{"delta": {"reasoning": ""}}]}),
            json!({"choices": [{"delta": {}, "finish_reason": "stop"}, {"delta": {}, "finish_reason": null}]}),
            json!({"choices": [{"delta": {}, "finish_reason": ""}]}),
            json!({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}),
            json!({"choices": [{"delta": null}], "error": null}),
        ];
        for chunk in chunks {
            // Spaced as a provider might write it: the app gets these bytes, not a re-encoding.
            let text = serde_json::to_string_pretty(&chunk).expect("encodes");
            assert!(readings_agree(&text), "{text}");
            let Parsed::Event(event) = ChunkParser::default().event(sse::Event { event: None, data: text.clone() })
            else {
                panic!("{text} is an event")
            };
            assert_eq!(event.text(), Some(text.as_str()), "kept as it came");
            let whole = chunk_event(chunk.clone());
            assert_eq!(
                (event.content, event.progress, event.end),
                (whole.content, whole.progress, whole.end),
                "{text}"
            );
            assert_eq!(event.data(), &chunk, "decoded when asked");
        }
    }
}
