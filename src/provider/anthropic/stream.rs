//! Messages streams: named events (`message_start`, `content_block_delta`, ... `message_stop`),
//! read for the fallback loop and turned into neutral chunks.

use std::collections::HashMap;

use serde_json::{Value, json};

use super::error::classify_error;
use super::from_wire::{finish_reason, prompt_tokens};
use crate::llm::outcome::message_of;
use crate::llm::{AttemptError, StreamEvent, unix_seconds};
use crate::provider::sse::{self, Parsed, WireStream};

/// Reads Messages stream events: `message_stop` ends it; `ping` is skipped; `error` fails it.
/// Thinking counts as content (commits the stream) only when `thinking_shows`: an app of
/// another API never sees it, so a failure during thinking can still fall through for it.
#[derive(Debug, Default)]
pub struct EventParser {
    stopped: bool,
    thinking_shows: bool,
}

impl EventParser {
    /// A parser for a stream the app sees thinking in (it speaks Messages) or not.
    pub fn new(thinking_shows: bool) -> Self {
        EventParser { stopped: false, thinking_shows }
    }
}

impl WireStream for EventParser {
    fn event(&mut self, event: sse::Event) -> Parsed {
        let data = match sse::json_data(&event.data) {
            Ok(data) => data,
            Err(error) => return Parsed::Fail(error),
        };
        let kind = data.get("type").and_then(Value::as_str).or(event.event.as_deref()).unwrap_or_default().to_string();
        let (content, progress, end) = match kind.as_str() {
            // Kept, not skipped: a ping shows the connection alive between thinking deltas.
            "ping" => (false, false, false),
            "error" => {
                let error = data.get("error").unwrap_or(&Value::Null);
                return Parsed::Fail(AttemptError::in_stream(classify_error(None, error), message_of(error)));
            }
            "content_block_start" => {
                let tool = data.pointer("/content_block/type").and_then(Value::as_str) == Some("tool_use");
                (tool, tool, false)
            }
            "content_block_delta" => {
                let delta = data.get("delta").unwrap_or(&Value::Null);
                let has = |k: &str| delta.get(k).and_then(Value::as_str).is_some_and(|s| !s.is_empty());
                let text = has("text") || has("partial_json");
                let thinking = has("thinking");
                (text || (thinking && self.thinking_shows), text || thinking, false)
            }
            "message_delta" => (false, false, data.pointer("/delta/stop_reason").is_some_and(|r| !r.is_null())),
            "message_stop" => {
                self.stopped = true;
                (false, false, true)
            }
            _ => (false, false, false),
        };
        Parsed::Event(StreamEvent::new(data, content, progress, end))
    }

    fn may_end(&self) -> bool {
        self.stopped
    }
}

/// Turns Messages stream events into OpenAI `chat.completion.chunk`s.
#[derive(Debug)]
pub struct ToOpenAiStream {
    include_usage: bool,
    id: String,
    model: Value,
    created: u64,
    input_tokens: u64,
    output_tokens: u64,
    tools: HashMap<u64, usize>,
    /// Tool blocks that have had no argument text yet.
    no_arguments: Vec<u64>,
}

impl ToOpenAiStream {
    /// A translator; `include_usage` adds OpenAI's final usage chunk.
    pub fn new(include_usage: bool) -> Self {
        ToOpenAiStream {
            include_usage,
            id: "chatcmpl".into(),
            model: Value::Null,
            created: unix_seconds(),
            input_tokens: 0,
            output_tokens: 0,
            tools: HashMap::new(),
            no_arguments: Vec::new(),
        }
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> Value {
        json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
               "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
    }

    /// The chunks for one Messages event.
    pub fn push(&mut self, event: &Value) -> Vec<Value> {
        match event.get("type").and_then(Value::as_str).unwrap_or_default() {
            "message_start" => {
                let message = &event["message"];
                if let Some(id) = message.get("id").and_then(Value::as_str) {
                    self.id = id.to_string();
                }
                self.model = message.get("model").cloned().unwrap_or(Value::Null);
                self.input_tokens = prompt_tokens(&message["usage"]);
                self.output_tokens = message.pointer("/usage/output_tokens").and_then(Value::as_u64).unwrap_or(0);
                vec![self.chunk(json!({"role": "assistant", "content": ""}), None)]
            }
            "content_block_start" => {
                let block = &event["content_block"];
                match block.get("type").and_then(Value::as_str) {
                    Some("tool_use") => {
                        let index = self.tools.len();
                        let position = event["index"].as_u64().unwrap_or(0);
                        self.tools.insert(position, index);
                        self.no_arguments.push(position);
                        vec![self.chunk(
                            json!({"tool_calls": [{"index": index, "id": block["id"], "type": "function",
                                                   "function": {"name": block["name"], "arguments": ""}}]}),
                            None,
                        )]
                    }
                    Some("text") if block["text"].as_str().is_some_and(|t| !t.is_empty()) => {
                        vec![self.chunk(json!({"content": block["text"]}), None)]
                    }
                    _ => Vec::new(),
                }
            }
            "content_block_delta" => {
                let delta = &event["delta"];
                match delta.get("type").and_then(Value::as_str) {
                    Some("text_delta") => vec![self.chunk(json!({"content": delta["text"]}), None)],
                    Some("input_json_delta") => {
                        let block = event["index"].as_u64().unwrap_or(0);
                        if delta["partial_json"].as_str().is_some_and(|j| !j.is_empty()) {
                            self.no_arguments.retain(|b| *b != block);
                        }
                        let index = self.tools.get(&block).copied().unwrap_or(0);
                        vec![self.chunk(
                            json!({"tool_calls": [{"index": index, "function": {"arguments": delta["partial_json"]}}]}),
                            None,
                        )]
                    }
                    _ => Vec::new(),
                }
            }
            "content_block_stop" => {
                // A tool without input: `{}`, as OpenAI sends, never an empty string.
                let block = event["index"].as_u64().unwrap_or(0);
                match (self.no_arguments.contains(&block), self.tools.get(&block).copied()) {
                    (true, Some(index)) => {
                        self.no_arguments.retain(|b| *b != block);
                        vec![
                            self.chunk(
                                json!({"tool_calls": [{"index": index, "function": {"arguments": "{}"}}]}),
                                None,
                            ),
                        ]
                    }
                    _ => Vec::new(),
                }
            }
            "message_delta" => {
                if let Some(output) = event.pointer("/usage/output_tokens").and_then(Value::as_u64) {
                    self.output_tokens = output;
                }
                match finish_reason(event.pointer("/delta/stop_reason").and_then(Value::as_str)) {
                    Some(finish) => vec![self.chunk(json!({}), Some(finish))],
                    None => Vec::new(),
                }
            }
            "message_stop" if self.include_usage => {
                let total = self.input_tokens.saturating_add(self.output_tokens);
                vec![
                    json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                            "choices": [], "usage": {"prompt_tokens": self.input_tokens, "completion_tokens": self.output_tokens, "total_tokens": total}}),
                ]
            }
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::FailureClass;

    #[test]
    fn stream_events_are_flagged_for_commit() {
        let mut parser = EventParser::new(true);
        let event = |data: Value| sse::Event { event: None, data: data.to_string() };
        let Parsed::Event(e) = parser.event(event(json!({"type": "message_start", "message": {}}))) else { panic!() };
        assert!(!e.content && !e.end);
        let Parsed::Event(ping) = parser.event(event(json!({"type": "ping"}))) else { panic!() };
        assert!(!ping.content && !ping.progress, "a ping shows the connection alive, not progress");
        let Parsed::Event(e) = parser.event(event(
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}}),
        )) else {
            panic!()
        };
        assert!(e.content);
        let Parsed::Fail(error) = parser
            .event(event(json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})))
        else {
            panic!()
        };
        assert_eq!(error.class, FailureClass::Overloaded);
        assert!(!parser.may_end());
        let Parsed::Event(e) = parser.event(event(json!({"type": "message_stop"}))) else { panic!() };
        assert!(e.end && parser.may_end());
    }

    #[test]
    fn tools_without_input_get_empty_object_arguments() {
        let mut t = ToOpenAiStream::new(false);
        let mut chunks = t.push(&json!({"type": "message_start", "message": {"id": "m", "model": "c", "usage": {}}}));
        chunks.extend(t.push(&json!({"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "tool_use", "id": "toolu_1", "name": "now", "input": {}}})));
        chunks.extend(t.push(&json!({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": ""}})));
        chunks.extend(t.push(&json!({"type": "content_block_stop", "index": 0})));
        let arguments: String = chunks
            .iter()
            .filter_map(|c| c.pointer("/choices/0/delta/tool_calls/0/function/arguments").and_then(Value::as_str))
            .collect();
        assert_eq!(arguments, "{}");
    }

    #[test]
    fn thinking_commits_only_streams_whose_app_sees_it() {
        let thinking = sse::Event {
            event: None,
            data: json!({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "hmm"}}).to_string(),
        };
        let Parsed::Event(seen) = EventParser::new(true).event(thinking.clone()) else { panic!() };
        assert!(seen.content, "an Anthropic app sees thinking: it commits the stream");
        let Parsed::Event(unseen) = EventParser::new(false).event(thinking) else { panic!() };
        assert!(!unseen.content, "other apps never see it: a failure during thinking can still fall through");
        assert!(unseen.progress, "but it shows the model working: the first-token wait is over");
    }
}
