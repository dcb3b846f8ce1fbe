//! Any provider's answer, in the neutral shape, as a Messages answer.

use serde_json::{Value, json};

/// The Messages `stop_reason` for a Chat Completions `finish_reason`.
pub(crate) fn stop_reason(finish_reason: Option<&str>) -> &'static str {
    match finish_reason {
        Some("length") => "max_tokens",
        Some("tool_calls" | "function_call") => "tool_use",
        Some("content_filter") => "refusal",
        _ => "end_turn",
    }
}

/// An OpenAI `chat.completion` as a Messages answer.
pub fn from_openai_completion(completion: &Value) -> Value {
    let choice = &completion["choices"][0];
    let message = &choice["message"];
    let mut content = Vec::new();
    if let Some(text) = message.get("content").and_then(Value::as_str).filter(|t| !t.is_empty()) {
        content.push(json!({"type": "text", "text": text}));
    }
    for call in message.get("tool_calls").and_then(Value::as_array).into_iter().flatten() {
        let arguments = call.pointer("/function/arguments").and_then(Value::as_str).unwrap_or("{}");
        content.push(json!({"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
                            "input": serde_json::from_str::<Value>(arguments).unwrap_or_else(|_| json!({}))}));
    }
    let id = completion.get("id").and_then(Value::as_str).unwrap_or("msg");
    json!({
        "id": if id.starts_with("msg_") { id.to_string() } else { format!("msg_{id}") },
        "type": "message",
        "role": "assistant",
        "model": completion.get("model").cloned().unwrap_or(Value::Null),
        "content": content,
        "stop_reason": stop_reason(choice.get("finish_reason").and_then(Value::as_str)),
        "stop_sequence": null,
        "usage": {
            "input_tokens": completion.pointer("/usage/prompt_tokens").and_then(Value::as_u64).unwrap_or(0),
            "output_tokens": completion.pointer("/usage/completion_tokens").and_then(Value::as_u64).unwrap_or(0),
        },
    })
}
