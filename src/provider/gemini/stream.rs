//! Gemini streams (`streamGenerateContent?alt=sse`): each event is a partial answer, read for
//! the fallback loop and turned into neutral chunks.

use serde_json::{Value, json};

use super::error::blocked;
use super::from_wire::{FILTERED, call_id, finish_reason, parts_of, usage};
use crate::llm::FailureClass;
use crate::llm::{AttemptError, StreamEvent, unix_seconds};
use crate::provider::sse::{self, Parsed, WireStream};

/// Reads `streamGenerateContent?alt=sse` events: each is a partial answer; the body ends after
/// the one with a `finishReason` (there is no end marker).
#[derive(Debug, Default)]
pub struct EventParser {
    finished: bool,
    emitted_content: bool,
}

impl WireStream for EventParser {
    fn event(&mut self, event: sse::Event) -> Parsed {
        let data = match sse::json_data(&event.data) {
            Ok(data) => data,
            Err(error) => return Parsed::Fail(error),
        };
        if data.get("error").is_some()
            || (data.get("candidates").is_none() && data.pointer("/promptFeedback/blockReason").is_some())
        {
            return Parsed::Fail(
                blocked(&data).unwrap_or_else(|| AttemptError::new(FailureClass::ServerError, "error event in stream")),
            );
        }
        let candidate = data.pointer("/candidates/0").cloned().unwrap_or(Value::Null);
        let reason = candidate.get("finishReason").and_then(Value::as_str);
        let content = !parts_of(&candidate).is_empty();
        if !content && !self.emitted_content && reason.is_some_and(|r| FILTERED.contains(&r)) {
            return Parsed::Fail(AttemptError::new(
                FailureClass::ContentFiltered,
                "answer blocked by the safety filters",
            ));
        }
        let end = reason.is_some();
        self.finished |= end;
        self.emitted_content |= content;
        let thinking = candidate
            .pointer("/content/parts")
            .and_then(Value::as_array)
            .is_some_and(|parts| parts.iter().any(|p| p.get("thought") == Some(&Value::Bool(true))));
        Parsed::Event(StreamEvent::new(data, content, content || thinking, end))
    }

    fn may_end(&self) -> bool {
        self.finished
    }
}

/// Turns Gemini stream events into OpenAI `chat.completion.chunk`s.
#[derive(Debug)]
pub struct ToOpenAiStream {
    include_usage: bool,
    started: bool,
    calls: usize,
    created: u64,
    id: String,
    model: Value,
    usage: Option<Value>,
}

impl ToOpenAiStream {
    /// A translator; `include_usage` adds OpenAI's final usage chunk.
    pub fn new(include_usage: bool) -> Self {
        ToOpenAiStream {
            include_usage,
            started: false,
            calls: 0,
            created: unix_seconds(),
            id: "chatcmpl-gemini".into(),
            model: Value::Null,
            usage: None,
        }
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> Value {
        json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
               "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
    }

    /// The chunks for one event.
    pub fn push(&mut self, event: &Value) -> Vec<Value> {
        let mut out = Vec::new();
        if !self.started {
            self.started = true;
            if let Some(id) = event.get("responseId").and_then(Value::as_str) {
                self.id = format!("chatcmpl-{id}");
            }
            self.model = event.get("modelVersion").cloned().unwrap_or(Value::Null);
            out.push(self.chunk(json!({"role": "assistant", "content": ""}), None));
        }
        if let Some(metadata) = event.get("usageMetadata") {
            self.usage = Some(usage(metadata));
        }
        let candidate = event.pointer("/candidates/0").cloned().unwrap_or(Value::Null);
        for part in parts_of(&candidate) {
            if let Some(text) = part.get("text").and_then(Value::as_str) {
                out.push(self.chunk(json!({"content": text}), None));
            } else if let Some(call) = part.get("functionCall") {
                let index = self.calls;
                self.calls += 1;
                let arguments = call.get("args").map(Value::to_string).unwrap_or_else(|| "{}".into());
                out.push(self.chunk(
                    json!({"tool_calls": [{"index": index, "id": call_id(part, index), "type": "function",
                                           "function": {"name": call["name"], "arguments": arguments}}]}),
                    None,
                ));
            }
        }
        if let Some(finish) = finish_reason(candidate.get("finishReason").and_then(Value::as_str), self.calls > 0) {
            out.push(self.chunk(json!({}), Some(finish)));
        }
        out
    }

    /// The usage chunk, when asked for, once the stream has ended.
    pub fn finish(&mut self) -> Vec<Value> {
        match (&self.usage, self.include_usage) {
            (Some(usage), true) => {
                vec![json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                               "model": self.model, "choices": [], "usage": usage})]
            }
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safety_blocks_are_content_filtered() {
        let prompt_blocked = json!({"promptFeedback": {"blockReason": "SAFETY"}});
        assert_eq!(blocked(&prompt_blocked).map(|e| e.class), Some(FailureClass::ContentFiltered));
        let answer_blocked = json!({"candidates": [{"finishReason": "SAFETY", "content": {"parts": []}}]});
        assert_eq!(blocked(&answer_blocked).map(|e| e.class), Some(FailureClass::ContentFiltered));
        let fine = json!({"candidates": [{"finishReason": "STOP", "content": {"parts": [{"text": "hi"}]}}]});
        assert!(blocked(&fine).is_none());
        let mut parser = EventParser::default();
        let Parsed::Fail(e) = parser.event(sse::Event { event: None, data: answer_blocked.to_string() }) else {
            panic!()
        };
        assert_eq!(e.class, FailureClass::ContentFiltered);
        // After content has streamed, a safety stop ends the answer instead of failing it.
        let mut parser = EventParser::default();
        let text = json!({"candidates": [{"content": {"parts": [{"text": "partial"}]}}]});
        assert!(matches!(parser.event(sse::Event { event: None, data: text.to_string() }), Parsed::Event(_)));
        let Parsed::Event(stop) = parser.event(sse::Event { event: None, data: answer_blocked.to_string() }) else {
            panic!()
        };
        assert!(stop.end && parser.may_end());
        let mut translate = ToOpenAiStream::new(false);
        let chunks = translate.push(stop.data());
        assert_eq!(chunks.last().and_then(|c| c.pointer("/choices/0/finish_reason")), Some(&json!("content_filter")));
    }
}
