//! A Messages answer in the neutral (OpenAI Chat Completions) shape.

use serde_json::{Value, json};

use crate::llm::unix_seconds;

/// The Chat Completions `finish_reason` for a Messages `stop_reason`.
pub(crate) fn finish_reason(stop_reason: Option<&str>) -> Option<&'static str> {
    stop_reason.map(|reason| match reason {
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        _ => "stop",
    })
}

/// Every input token of a Messages `usage`, cached ones included.
pub(crate) fn prompt_tokens(usage: &Value) -> u64 {
    ["input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"]
        .iter()
        .filter_map(|k| usage.get(*k).and_then(Value::as_u64))
        .fold(0, u64::saturating_add)
}

/// A Messages answer as an OpenAI `chat.completion`.
pub fn to_openai_completion(message: &Value) -> Value {
    let blocks = message.get("content").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    let text: String = blocks.iter().filter(|b| b["type"] == "text").filter_map(|b| b["text"].as_str()).collect();
    let tool_calls: Vec<Value> = blocks
        .iter()
        .filter(|b| b["type"] == "tool_use")
        .map(|b| {
            json!({"id": b["id"], "type": "function",
                   "function": {"name": b["name"], "arguments": b.get("input").map(Value::to_string).unwrap_or_else(|| "{}".into())}})
        })
        .collect();
    let mut out = json!({"role": "assistant", "content": if text.is_empty() && !tool_calls.is_empty() { Value::Null } else { json!(text) }});
    if !tool_calls.is_empty() {
        out["tool_calls"] = Value::Array(tool_calls);
    }
    let usage = message.get("usage").cloned().unwrap_or(Value::Null);
    let (input, output) = (prompt_tokens(&usage), usage.get("output_tokens").and_then(Value::as_u64).unwrap_or(0));
    json!({
        "id": message.get("id").cloned().unwrap_or(json!("msg")),
        "object": "chat.completion",
        "created": unix_seconds(),
        "model": message.get("model").cloned().unwrap_or(Value::Null),
        "choices": [{"index": 0, "message": out, "logprobs": null,
                     "finish_reason": finish_reason(message.get("stop_reason").and_then(Value::as_str)).unwrap_or("stop")}],
        "usage": {"prompt_tokens": input, "completion_tokens": output, "total_tokens": input.saturating_add(output)},
    })
}
