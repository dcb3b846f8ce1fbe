//! Any provider's answer, in the neutral shape, as a Response object.

use serde_json::{Map, Value, json};

use crate::llm::{ChatRequest, unix_seconds};

pub(crate) fn response_id(id: Option<&str>) -> String {
    match id {
        Some(id) if id.starts_with("resp_") => id.to_string(),
        Some(id) => format!("resp_{id}"),
        None => "resp_backstop".into(),
    }
}

/// The parts of the app's request a Response object echoes back.
pub(crate) fn echo(request: &ChatRequest) -> Map<String, Value> {
    let body = request.origin.as_deref().map(|o| o.body.clone()).unwrap_or_default();
    let mut echo = Map::new();
    for (name, default) in [
        ("instructions", Value::Null),
        ("max_output_tokens", Value::Null),
        ("parallel_tool_calls", json!(true)),
        ("previous_response_id", Value::Null),
        ("temperature", json!(1.0)),
        ("top_p", json!(1.0)),
        ("tool_choice", json!("auto")),
        ("tools", json!([])),
        ("text", json!({"format": {"type": "text"}})),
        ("truncation", json!("disabled")),
        ("metadata", json!({})),
        ("store", json!(false)),
        ("user", Value::Null),
    ] {
        echo.insert(name.into(), body.get(name).cloned().unwrap_or(default));
    }
    echo
}

pub(crate) fn usage(chat_usage: &Value) -> Value {
    let input = chat_usage.get("prompt_tokens").and_then(Value::as_u64).unwrap_or(0);
    let output = chat_usage.get("completion_tokens").and_then(Value::as_u64).unwrap_or(0);
    json!({"input_tokens": input, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": output,
           "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": input.saturating_add(output)})
}

pub(crate) fn response_object(
    id: &str,
    model: &Value,
    status: &str,
    output: Vec<Value>,
    usage: Value,
    echo: &Map<String, Value>,
) -> Value {
    let mut response = json!({"id": id, "object": "response", "created_at": unix_seconds(), "status": status, "error": null,
                              "incomplete_details": null, "model": model, "output": output, "usage": usage});
    if let Some(object) = response.as_object_mut() {
        object.extend(echo.clone());
    }
    response
}

/// A chat completion as a Response object.
pub fn from_chat_completion(completion: &Value, request: &ChatRequest) -> Value {
    let id = response_id(completion.get("id").and_then(Value::as_str));
    let choice = &completion["choices"][0];
    let message = &choice["message"];
    let mut output = Vec::new();
    if let Some(text) = message.get("content").and_then(Value::as_str).filter(|t| !t.is_empty()) {
        output.push(json!({"type": "message", "id": format!("msg_{id}"), "status": "completed", "role": "assistant",
                           "content": [{"type": "output_text", "text": text, "annotations": []}]}));
    }
    for (n, call) in message.get("tool_calls").and_then(Value::as_array).into_iter().flatten().enumerate() {
        output.push(json!({"type": "function_call", "id": format!("fc_{id}_{n}"), "call_id": call["id"],
                           "name": call["function"]["name"], "arguments": call["function"]["arguments"], "status": "completed"}));
    }
    let status =
        if choice.get("finish_reason").and_then(Value::as_str) == Some("length") { "incomplete" } else { "completed" };
    let mut response =
        response_object(&id, &completion["model"], status, output, usage(&completion["usage"]), &echo(request));
    if status == "incomplete" {
        response["incomplete_details"] = json!({"reason": "max_output_tokens"});
    }
    response
}
