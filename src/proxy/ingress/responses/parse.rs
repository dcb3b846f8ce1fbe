//! An app's Responses request (`POST /v1/responses`) as the neutral request.
//!
//! A stateless request (`store: false`, no `previous_response_id` or `conversation`) falls back
//! across providers like any chat request. A stateful one lives in OpenAI's storage, so only
//! `openai` targets are eligible for it, and the chain says so rather than lose the state.

use serde_json::{Map, Value, json};

use crate::llm::request::STATEFUL;
use crate::llm::request::json_object;
use crate::llm::{Api, ChatRequest, InvalidRequest, Message, Operation, Origin};

/// Request fields the neutral request carries (or that change nothing when dropped).
const FIELDS: &[&str] = &[
    "model",
    "input",
    "instructions",
    "stream",
    "store",
    "tools",
    "tool_choice",
    "temperature",
    "top_p",
    "max_output_tokens",
    "parallel_tool_calls",
    "user",
    "text",
    "metadata",
    "service_tier",
    "truncation",
    "include",
    "reasoning",
    "safety_identifier",
    "prompt_cache_key",
];

/// Whether a Responses request keeps or uses state in OpenAI's storage.
pub fn is_stateful(body: &Map<String, Value>) -> bool {
    body.get("store") != Some(&Value::Bool(false))
        || body.get("previous_response_id").is_some_and(|v| !v.is_null())
        || body.get("conversation").is_some_and(|v| !v.is_null())
        || body.get("background") == Some(&Value::Bool(true))
}

/// Parses an app's Responses request into the neutral request, keeping the original body for
/// `openai` targets.
pub fn from_responses_request(body: &[u8]) -> Result<ChatRequest, InvalidRequest> {
    let invalid = |message: String, param: Option<&'static str>| InvalidRequest { message, param };
    let raw = json_object(body)?;
    let model = match raw.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        _ => return Err(invalid("you must provide a model parameter (`model` is missing)".into(), Some("model"))),
    };
    let stream = match raw.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(invalid("`stream` must be a boolean".into(), Some("stream"))),
    };
    let mut unportable: Vec<String> = raw.keys().filter(|k| !FIELDS.contains(&k.as_str())).cloned().collect();
    let mut messages = Vec::new();
    if let Some(instructions) = raw.get("instructions").and_then(Value::as_str) {
        messages.push(message("system", json!(instructions)));
    }
    match raw.get("input") {
        Some(Value::String(text)) if !text.is_empty() => messages.push(message("user", json!(text))),
        Some(Value::Array(items)) if !items.is_empty() => {
            for (i, item) in items.iter().enumerate() {
                input_item(item, i, &mut messages, &mut unportable)
                    .map_err(|problem| invalid(format!("`input[{i}]`: {problem}"), Some("input")))?;
            }
        }
        _ => return Err(invalid("`input` must be a non-empty string or array of items".into(), Some("input"))),
    }
    let mut rest = Map::new();
    for name in ["temperature", "top_p", "parallel_tool_calls", "user", "metadata", "service_tier"] {
        if let Some(v) = raw.get(name).filter(|v| !v.is_null()) {
            rest.insert(name.into(), v.clone());
        }
    }
    if let Some(max) = raw.get("max_output_tokens").filter(|v| !v.is_null()) {
        rest.insert("max_completion_tokens".into(), max.clone());
    }
    if let Some(effort) = raw.get("reasoning").and_then(|r| r.get("effort")).filter(|v| !v.is_null()) {
        rest.insert("reasoning_effort".into(), effort.clone());
    }
    if let Some(tools) = raw.get("tools").and_then(Value::as_array) {
        let mut converted = Vec::new();
        for tool in tools {
            match tool.get("type").and_then(Value::as_str) {
                Some("function") => {
                    let mut function = json!({"name": tool["name"], "parameters": tool.get("parameters").cloned().unwrap_or(json!({"type": "object"}))});
                    for key in ["description", "strict"] {
                        if let Some(v) = tool.get(key).filter(|v| !v.is_null()) {
                            function[key] = v.clone();
                        }
                    }
                    converted.push(json!({"type": "function", "function": function}));
                }
                other => unportable.push(format!("tools[type={}]", other.unwrap_or("unknown"))),
            }
        }
        if !converted.is_empty() {
            rest.insert("tools".into(), Value::Array(converted));
        }
    }
    match raw.get("tool_choice") {
        Some(Value::String(mode)) => {
            rest.insert("tool_choice".into(), json!(mode));
        }
        Some(choice) if choice.get("type").and_then(Value::as_str) == Some("function") => {
            rest.insert("tool_choice".into(), json!({"type": "function", "function": {"name": choice["name"]}}));
        }
        Some(Value::Null) | None => {}
        Some(_) => unportable.push("tool_choice".into()),
    }
    match raw.get("text").and_then(|t| t.get("format")) {
        Some(format) if format["type"] == "json_schema" => {
            let mut schema =
                json!({"name": format.get("name").cloned().unwrap_or(json!("response")), "schema": format["schema"]});
            if let Some(strict) = format.get("strict") {
                schema["strict"] = strict.clone();
            }
            rest.insert("response_format".into(), json!({"type": "json_schema", "json_schema": schema}));
        }
        Some(format) if format["type"] == "json_object" => {
            rest.insert("response_format".into(), json!({"type": "json_object"}));
        }
        _ => {}
    }
    if stream {
        rest.insert("stream_options".into(), json!({"include_usage": true}));
    }
    if is_stateful(&raw) {
        unportable.insert(0, STATEFUL.into());
    }
    Ok(ChatRequest {
        model,
        messages,
        stream,
        rest,
        origin: Some(std::sync::Arc::new(Origin { api: Api::Responses, body: raw, unportable, headers: Vec::new() })),
        operation: Operation::Chat,
        continues: false,
    })
}

fn message(role: &str, content: Value) -> Message {
    Message { role: role.to_string(), content: Some(content), rest: Map::new() }
}

fn input_item(
    item: &Value,
    index: usize,
    messages: &mut Vec<Message>,
    unportable: &mut Vec<String>,
) -> Result<(), String> {
    let kind = item.get("type").and_then(Value::as_str).unwrap_or("message");
    match kind {
        "message" => {
            let role = item.get("role").and_then(Value::as_str).ok_or("a message needs a `role`")?;
            if !matches!(role, "user" | "assistant" | "system" | "developer") {
                return Err(format!("unknown role `{role}`"));
            }
            let content = match item.get("content") {
                Some(Value::String(text)) => json!(text),
                Some(Value::Array(parts)) => {
                    let mut converted = Vec::new();
                    for part in parts {
                        match part.get("type").and_then(Value::as_str) {
                            Some("input_text" | "output_text") => converted
                                .push(json!({"type": "text", "text": part.get("text").cloned().unwrap_or(json!(""))})),
                            Some("input_image") if part.get("image_url").is_some_and(Value::is_string) => {
                                converted.push(json!({"type": "image_url", "image_url": {"url": part["image_url"]}}))
                            }
                            Some("refusal") => {}
                            other => {
                                unportable.push(format!("input[{index}].content[type={}]", other.unwrap_or("unknown")))
                            }
                        }
                    }
                    if converted.iter().all(|p| p["type"] == "text") {
                        json!(converted.iter().filter_map(|p| p["text"].as_str()).collect::<String>())
                    } else {
                        Value::Array(converted)
                    }
                }
                _ => return Err("a message needs `content`".into()),
            };
            messages.push(message(role, content));
        }
        "function_call" => {
            let call = json!({"id": item["call_id"], "type": "function",
                              "function": {"name": item["name"], "arguments": item.get("arguments").cloned().unwrap_or(json!("{}"))}});
            match messages.last_mut() {
                Some(last) if last.role == "assistant" && last.rest.contains_key("tool_calls") => {
                    if let Some(calls) = last.rest.get_mut("tool_calls").and_then(Value::as_array_mut) {
                        calls.push(call);
                    }
                }
                _ => {
                    let mut m = Message { role: "assistant".into(), content: None, rest: Map::new() };
                    m.rest.insert("tool_calls".into(), json!([call]));
                    messages.push(m);
                }
            }
        }
        "function_call_output" => {
            let output = match item.get("output") {
                Some(Value::String(text)) => text.clone(),
                Some(other) => other.to_string(),
                None => String::new(),
            };
            let mut m = message("tool", json!(output));
            m.rest.insert("tool_call_id".into(), item.get("call_id").cloned().unwrap_or(json!("")));
            messages.push(m);
        }
        "reasoning" => {}
        other => unportable.push(format!("input[{index}][type={other}]")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_decides_eligibility() {
        let parse = |body: Value| from_responses_request(body.to_string().as_bytes()).expect("valid");
        let stateless = parse(json!({"model": "m", "input": "hi", "store": false}));
        assert!(stateless.origin.as_ref().is_some_and(|o| o.unportable.is_empty()));
        for stateful in [
            json!({"model": "m", "input": "hi"}),
            json!({"model": "m", "input": "hi", "store": false, "previous_response_id": "resp_1"}),
        ] {
            let request = parse(stateful);
            assert!(request.origin.as_ref().is_some_and(|o| o.unportable[0] == STATEFUL));
        }
    }

    #[test]
    fn rejects_what_the_responses_api_would() {
        for (body, needle) in [
            (json!({"input": "hi"}), "model"),
            (json!({"model": "m"}), "input"),
            (json!({"model": "m", "input": []}), "input"),
            (json!({"model": "m", "input": [{"role": "wizard", "content": "x"}]}), "unknown role"),
        ] {
            let error = from_responses_request(body.to_string().as_bytes()).expect_err("invalid");
            assert!(error.message.contains(needle), "{body}: {}", error.message);
        }
    }
}
