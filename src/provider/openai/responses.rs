//! OpenAI's Responses API as an upstream: an `openai` target is sent the app's own Responses
//! request, and its answers and events are read here. The Responses *ingress* (an app speaking
//! it) lives in `proxy::ingress::responses`.

use serde_json::{Value, json};

use super::error::stream_error;
use crate::llm::StreamEvent;
use crate::provider::sse::{self, Parsed, WireStream};

/// A Response object as a chat completion (to check it for content).
pub fn to_chat_completion(response: &Value) -> Value {
    let output = response.get("output").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    let text: String = output
        .iter()
        .filter(|item| item["type"] == "message")
        .flat_map(|item| item["content"].as_array().into_iter().flatten())
        .filter_map(|part| part.get("text").and_then(Value::as_str))
        .collect();
    let calls: Vec<Value> = output
        .iter()
        .filter(|item| item["type"] == "function_call")
        .map(|item| json!({"id": item["call_id"], "type": "function", "function": {"name": item["name"], "arguments": item["arguments"]}}))
        .collect();
    let mut message = json!({"role": "assistant", "content": text});
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    json!({"id": response["id"], "object": "chat.completion", "model": response["model"],
           "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]})
}

/// Reads a Responses event stream from an `openai` target: `response.completed` (or
/// `incomplete`) ends it; `response.failed` and `error` fail it.
#[derive(Debug, Default)]
pub struct EventParser {
    done: bool,
}

impl WireStream for EventParser {
    fn event(&mut self, event: sse::Event) -> Parsed {
        let data = match sse::json_data(&event.data) {
            Ok(data) => data,
            Err(error) => return Parsed::Fail(error),
        };
        let kind = data.get("type").and_then(Value::as_str).unwrap_or_default();
        let (content, progress, end) = match kind {
            "error" => return Parsed::Fail(stream_error(&data)),
            "response.failed" => {
                let error = data.pointer("/response/error").cloned().unwrap_or(Value::Null);
                return Parsed::Fail(stream_error(&error));
            }
            "response.output_text.delta" | "response.refusal.delta" | "response.function_call_arguments.delta" => {
                let text = data.get("delta").and_then(Value::as_str).is_some_and(|d| !d.is_empty());
                (text, text, false)
            }
            "response.reasoning_summary_text.delta" | "response.reasoning_text.delta" => (false, true, false),
            "response.output_item.added" => {
                let call = data.pointer("/item/type").and_then(Value::as_str) == Some("function_call");
                (call, call, false)
            }
            "response.completed" | "response.incomplete" => {
                self.done = true;
                (false, false, true)
            }
            _ => (false, false, false),
        };
        Parsed::Event(StreamEvent::new(data, content, progress, end))
    }

    fn may_end(&self) -> bool {
        self.done
    }
}

/// Turns a Responses stream from an `openai` target into chat chunks (for checks only: a
/// Responses stream only ever goes back to a Responses app untouched).
pub fn event_to_chunks(event: &Value) -> Vec<Value> {
    match event.get("type").and_then(Value::as_str) {
        Some("response.output_text.delta") => {
            vec![
                json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": event["delta"]}, "finish_reason": null}]}),
            ]
        }
        Some("response.completed") => {
            vec![
                json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
            ]
        }
        _ => Vec::new(),
    }
}
