//! An app's Messages request (`POST /v1/messages`) as the neutral request, keeping the
//! original body and `anthropic-beta` header for Anthropic targets.

use serde_json::{Map, Value, json};

use crate::llm::request::json_object;
use crate::llm::{Api, ChatRequest, InvalidRequest, Message, Operation, Origin};

/// Messages request fields the neutral request carries; anything else only an Anthropic
/// target can honour. `thinking` and `cache_control` only tune how a Claude model works and
/// are dropped for other providers.
const INGRESS_FIELDS: &[&str] = &[
    "model",
    "messages",
    "system",
    "max_tokens",
    "temperature",
    "top_p",
    "stop_sequences",
    "stream",
    "tools",
    "tool_choice",
    "metadata",
    "thinking",
    "service_tier",
];

/// Parses an app's Messages request into the neutral request, keeping the original body for
/// Anthropic targets.
pub fn from_messages_request(body: &[u8]) -> Result<ChatRequest, InvalidRequest> {
    from_messages_request_with(body, &http::HeaderMap::new())
}

/// [`from_messages_request`], keeping the app's `anthropic-beta` header for Anthropic targets.
pub fn from_messages_request_with(body: &[u8], headers: &http::HeaderMap) -> Result<ChatRequest, InvalidRequest> {
    let beta = headers.get("anthropic-beta").and_then(|v| v.to_str().ok()).map(|v| ("anthropic-beta", v.to_string()));
    let raw = json_object(body)?;
    let model = match raw.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        _ => return Err(invalid("model: Field required (a non-empty string)".into(), "model")),
    };
    let Some(max_tokens) = raw.get("max_tokens").and_then(Value::as_u64) else {
        return Err(invalid("max_tokens: Field required (a positive integer)".into(), "max_tokens"));
    };
    let Some(turns) = raw.get("messages").and_then(Value::as_array).filter(|m| !m.is_empty()) else {
        return Err(invalid("messages: Field required (a non-empty array)".into(), "messages"));
    };
    let stream = match raw.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(invalid("stream: Input should be a valid boolean".into(), "stream")),
    };
    let mut unportable: Vec<String> = raw.keys().filter(|k| !INGRESS_FIELDS.contains(&k.as_str())).cloned().collect();
    if raw.contains_key("top_k") {
        unportable.retain(|k| k != "top_k");
        unportable.push("top_k".into());
    }
    let mut messages: Vec<Message> = system(raw.get("system"))?.into_iter().collect();
    for (i, turn) in turns.iter().enumerate() {
        messages.extend(self::turn(i, turn, &mut unportable)?);
    }
    let rest = parameters(&raw, max_tokens, stream, &mut unportable);
    Ok(ChatRequest {
        model,
        messages,
        stream,
        rest,
        origin: Some(std::sync::Arc::new(Origin {
            api: Api::Anthropic,
            body: raw,
            unportable,
            headers: beta.into_iter().collect(),
        })),
        operation: Operation::Chat,
        continues: false,
    })
}

fn invalid(message: String, param: &'static str) -> InvalidRequest {
    InvalidRequest::new(message, Some(param))
}

/// `system` (a string, or text blocks joined by lines) as a system message.
fn system(system: Option<&Value>) -> Result<Option<Message>, InvalidRequest> {
    match system {
        Some(Value::String(text)) => Ok(Some(message("system", json!(text)))),
        Some(Value::Array(blocks)) => {
            let text =
                blocks.iter().filter_map(|b| b.get("text").and_then(Value::as_str)).collect::<Vec<_>>().join("\n");
            Ok(Some(message("system", json!(text))))
        }
        Some(_) => Err(invalid("system: Input should be a string or a list of text blocks".into(), "system")),
        None => Ok(None),
    }
}

/// Turn `i` as neutral messages: its tool results, each a `tool` message, then its text, images
/// and tool calls as one message of its role. Blocks no other API has are noted in `unportable`.
fn turn(i: usize, turn: &Value, unportable: &mut Vec<String>) -> Result<Vec<Message>, InvalidRequest> {
    let role = turn.get("role").and_then(Value::as_str).unwrap_or_default();
    if role != "user" && role != "assistant" {
        return Err(invalid(format!("messages.{i}.role: Input should be 'user' or 'assistant'"), "messages"));
    }
    let blocks: Vec<Value> = match turn.get("content") {
        Some(Value::String(text)) => vec![json!({"type": "text", "text": text})],
        Some(Value::Array(blocks)) => blocks.clone(),
        _ => return Err(invalid(format!("messages.{i}.content: Field required"), "messages")),
    };
    let mut messages = Vec::new();
    let mut parts = Vec::new();
    let mut tool_calls = Vec::new();
    for block in &blocks {
        match block.get("type").and_then(Value::as_str).unwrap_or_default() {
            "text" => parts.push(json!({"type": "text", "text": block.get("text").cloned().unwrap_or(json!(""))})),
            "image" => parts.push(json!({"type": "image_url", "image_url": {"url": image_url(&block["source"])}})),
            "tool_use" => tool_calls.push(json!({
                "id": block["id"], "type": "function",
                "function": {"name": block["name"], "arguments": block.get("input").map(Value::to_string).unwrap_or_else(|| "{}".into())},
            })),
            "tool_result" => messages.push(tool_result(block)),
            "thinking" | "redacted_thinking" => {}
            other => unportable.push(format!("messages.{i}.content[type={other}]")),
        }
    }
    if !parts.is_empty() || !tool_calls.is_empty() {
        let only_text = parts.iter().all(|p| p["type"] == "text");
        let content = if parts.is_empty() {
            Value::Null
        } else if only_text {
            json!(parts.iter().filter_map(|p| p["text"].as_str()).collect::<String>())
        } else {
            Value::Array(parts)
        };
        let mut m = message(role, content);
        if !tool_calls.is_empty() {
            m.rest.insert("tool_calls".into(), Value::Array(tool_calls));
        }
        messages.push(m);
    }
    Ok(messages)
}

/// An image block's source as a URL: a `data:` URL for base64 data.
fn image_url(source: &Value) -> String {
    match source.get("type").and_then(Value::as_str) {
        Some("base64") => format!(
            "data:{};base64,{}",
            source["media_type"].as_str().unwrap_or("image/png"),
            source["data"].as_str().unwrap_or_default()
        ),
        _ => source["url"].as_str().unwrap_or_default().to_string(),
    }
}

/// A `tool_result` block as a `tool` message (its text blocks joined by lines).
fn tool_result(block: &Value) -> Message {
    let content = match block.get("content") {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(inner)) => {
            inner.iter().filter_map(|b| b.get("text").and_then(Value::as_str)).collect::<Vec<_>>().join("\n")
        }
        _ => String::new(),
    };
    let mut result = message("tool", json!(content));
    result.rest.insert("tool_call_id".into(), block.get("tool_use_id").cloned().unwrap_or(json!("")));
    result
}

/// The request's parameters in OpenAI's names. Server tools are noted in `unportable`.
fn parameters(
    raw: &Map<String, Value>,
    max_tokens: u64,
    stream: bool,
    unportable: &mut Vec<String>,
) -> Map<String, Value> {
    let mut rest = Map::new();
    // OpenAI's current name: its reasoning models refuse `max_tokens`.
    rest.insert("max_completion_tokens".into(), json!(max_tokens));
    for name in ["temperature", "top_p"] {
        if let Some(v) = raw.get(name) {
            rest.insert(name.into(), v.clone());
        }
    }
    if let Some(stops) = raw.get("stop_sequences").and_then(Value::as_array).filter(|s| !s.is_empty()) {
        rest.insert("stop".into(), Value::Array(stops.clone()));
    }
    if let Some(tools) = raw.get("tools").and_then(Value::as_array) {
        let mut converted = Vec::new();
        for tool in tools {
            match tool.get("type").and_then(Value::as_str) {
                None | Some("custom") => converted.push(json!({"type": "function", "function": {
                    "name": tool["name"], "description": tool.get("description").cloned().unwrap_or(json!("")),
                    "parameters": tool.get("input_schema").cloned().unwrap_or(json!({"type": "object"})),
                }})),
                Some(server_tool) => unportable.push(format!("tools[type={server_tool}]")),
            }
        }
        rest.insert("tools".into(), Value::Array(converted));
    }
    if let Some(choice) = raw.get("tool_choice") {
        let converted = match choice.get("type").and_then(Value::as_str) {
            Some("any") => json!("required"),
            Some("none") => json!("none"),
            Some("tool") => json!({"type": "function", "function": {"name": choice["name"]}}),
            _ => json!("auto"),
        };
        rest.insert("tool_choice".into(), converted);
        if choice.get("disable_parallel_tool_use") == Some(&Value::Bool(true)) {
            rest.insert("parallel_tool_calls".into(), json!(false));
        }
    }
    if let Some(user) = raw.get("metadata").and_then(|m| m.get("user_id")) {
        rest.insert("user".into(), user.clone());
    }
    if stream {
        // Messages streams report output tokens at the end; ask OpenAI-style upstreams too.
        rest.insert("stream_options".into(), json!({"include_usage": true}));
    }
    rest
}

fn message(role: &str, content: Value) -> Message {
    Message { role: role.to_string(), content: Some(content), rest: Map::new() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ingress_rejects_what_the_messages_api_would() {
        for (body, needle) in [
            (json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 5}), "model"),
            (json!({"model": "m", "messages": [{"role": "user", "content": "x"}]}), "max_tokens"),
            (json!({"model": "m", "max_tokens": 5, "messages": []}), "messages"),
            (json!({"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}), "role"),
        ] {
            let error = from_messages_request(body.to_string().as_bytes()).expect_err("invalid");
            assert!(error.message.contains(needle), "{}: {}", body, error.message);
        }
    }
}
