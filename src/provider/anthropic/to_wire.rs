//! The neutral request as a Messages request: the system prompt lifted out, tool calls and
//! results as content blocks, `max_tokens` filled in; and what a Messages request cannot say.

use serde_json::{Map, Value, json};

use crate::llm::request::other_part;
use crate::llm::{Api, ChatRequest, Operation};
use crate::provider::turns::push_turn;

/// Why an Anthropic target cannot serve `request` faithfully, if it cannot.
pub fn unsupported(request: &ChatRequest) -> Option<String> {
    if request.operation == Operation::Embeddings {
        return Some("the Messages API has no embeddings".to_string());
    }
    if let Some(origin) = &request.origin {
        if origin.api == Api::Anthropic {
            return None;
        }
        if let Some(reason) = origin.unportable_reason("Messages") {
            return Some(reason);
        }
    }
    request.inexpressible(
        "Messages",
        |name, value| match name {
            "n" => value.as_u64().is_some_and(|n| n > 1).then_some("`n` above 1"),
            "logprobs" => (value == &Value::Bool(true)).then_some("`logprobs`"),
            "presence_penalty" | "frequency_penalty" => {
                value.as_f64().is_some_and(|v| v != 0.0).then_some("presence and frequency penalties")
            }
            "logit_bias" => value.as_object().is_some_and(|m| !m.is_empty()).then_some("`logit_bias`"),
            "response_format" => (value.get("type").and_then(Value::as_str) != Some("text"))
                .then_some("`response_format` other than text"),
            "temperature" => value.as_f64().is_some_and(|t| t > 1.0).then_some("`temperature` above 1"),
            _ => None,
        },
        |part| match part.get("type").and_then(Value::as_str) {
            Some("text" | "image_url") => None,
            _ => other_part(part),
        },
    )
}

/// The Messages request for `model`: the app's own body when it spoke Messages, else a
/// translation of the neutral request.
pub fn to_messages_request(request: &ChatRequest, model: &str, default_max_tokens: u64) -> Value {
    if let Some(origin) = request.origin.as_deref().filter(|o| o.api == Api::Anthropic) {
        let mut body = origin.body.clone();
        body.insert("model".into(), Value::String(model.to_string()));
        return Value::Object(body);
    }
    let mut body = Map::new();
    body.insert("model".into(), json!(model));
    let mut system: Vec<String> = Vec::new();
    let mut messages: Vec<Value> = Vec::new();
    for message in &request.messages {
        match message.role.as_str() {
            "system" | "developer" => system.push(text_of(message.content.as_ref())),
            "assistant" => {
                let mut blocks = content_blocks(message.content.as_ref());
                for call in message.rest.get("tool_calls").and_then(Value::as_array).into_iter().flatten() {
                    let arguments = call.pointer("/function/arguments").and_then(Value::as_str).unwrap_or("{}");
                    blocks.push(json!({
                        "type": "tool_use",
                        "id": call.get("id").cloned().unwrap_or(json!("")),
                        "name": call.pointer("/function/name").cloned().unwrap_or(json!("")),
                        "input": serde_json::from_str::<Value>(arguments).unwrap_or_else(|_| json!({})),
                    }));
                }
                push_turn(&mut messages, "assistant", "content", blocks);
            }
            "tool" => {
                let result = json!({
                    "type": "tool_result",
                    "tool_use_id": message.rest.get("tool_call_id").cloned().unwrap_or(json!("")),
                    "content": text_of(message.content.as_ref()),
                });
                push_turn(&mut messages, "user", "content", vec![result]);
            }
            _ => push_turn(&mut messages, "user", "content", content_blocks(message.content.as_ref())),
        }
    }
    if !system.is_empty() {
        body.insert("system".into(), json!(system.join("\n\n")));
    }
    body.insert("messages".into(), Value::Array(messages));
    let rest = &request.rest;
    let max_tokens = rest.get("max_completion_tokens").or_else(|| rest.get("max_tokens")).and_then(Value::as_u64);
    body.insert("max_tokens".into(), json!(max_tokens.unwrap_or(default_max_tokens)));
    for name in ["temperature", "top_p"] {
        if let Some(value) = rest.get(name).filter(|v| !v.is_null()) {
            body.insert(name.into(), value.clone());
        }
    }
    if let Some(stops) = request.stop_sequences() {
        body.insert("stop_sequences".into(), stops);
    }
    if let Some(tools) = rest.get("tools").and_then(Value::as_array) {
        let tools: Vec<Value> = tools
            .iter()
            .filter_map(|tool| tool.get("function"))
            .map(|f| {
                let mut tool = json!({
                    "name": f.get("name").cloned().unwrap_or(json!("")),
                    "input_schema": f.get("parameters").cloned().unwrap_or(json!({"type": "object", "properties": {}})),
                });
                if let Some(description) = f.get("description") {
                    tool["description"] = description.clone();
                }
                tool
            })
            .collect();
        body.insert("tools".into(), Value::Array(tools));
    }
    let mut choice = match rest.get("tool_choice") {
        Some(Value::String(mode)) if mode == "none" => Some(json!({"type": "none"})),
        Some(Value::String(mode)) if mode == "required" => Some(json!({"type": "any"})),
        Some(Value::String(_)) => Some(json!({"type": "auto"})),
        Some(Value::Object(choice)) => {
            choice.get("function").and_then(|f| f.get("name")).map(|name| json!({"type": "tool", "name": name}))
        }
        _ => None,
    };
    if rest.get("parallel_tool_calls") == Some(&Value::Bool(false)) && rest.contains_key("tools") {
        let choice = choice.get_or_insert_with(|| json!({"type": "auto"}));
        choice["disable_parallel_tool_use"] = json!(true);
    }
    if let Some(choice) = choice {
        body.insert("tool_choice".into(), choice);
    }
    if let Some(user) = rest.get("user").and_then(Value::as_str) {
        body.insert("metadata".into(), json!({"user_id": user}));
    }
    if request.stream {
        body.insert("stream".into(), json!(true));
    }
    Value::Object(body)
}

/// The text of a message's content: the string, or its text parts joined.
fn text_of(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => {
            parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).collect::<Vec<_>>().join("\n")
        }
        _ => String::new(),
    }
}

/// OpenAI content (a string or parts) as Messages content blocks.
fn content_blocks(content: Option<&Value>) -> Vec<Value> {
    match content {
        Some(Value::String(text)) if !text.is_empty() => vec![json!({"type": "text", "text": text})],
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|part| match part.get("type").and_then(Value::as_str) {
                Some("text") => Some(json!({"type": "text", "text": part.get("text").cloned().unwrap_or(json!(""))})),
                Some("image_url") => {
                    let url = part.pointer("/image_url/url").and_then(Value::as_str).unwrap_or_default();
                    Some(image_block(url))
                }
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn image_block(url: &str) -> Value {
    match url.strip_prefix("data:").and_then(|rest| rest.split_once(";base64,")) {
        Some((media_type, data)) => {
            json!({"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}})
        }
        None => json!({"type": "image", "source": {"type": "url", "url": url}}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: Value) -> ChatRequest {
        serde_json::from_value(body).expect("valid")
    }

    #[test]
    fn reports_what_messages_cannot_express() {
        let base = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        assert_eq!(unsupported(&chat(base.clone())), None);
        let with = |k: &str, v: Value| {
            let mut b = base.clone();
            b[k] = v;
            unsupported(&chat(b))
        };
        assert_eq!(with("temperature", json!(0.5)), None);
        assert_eq!(with("n", json!(1)), None);
        assert!(with("n", json!(2)).is_some());
        assert!(with("logprobs", json!(true)).is_some());
        assert!(with("temperature", json!(1.5)).is_some());
        assert!(with("response_format", json!({"type": "json_schema"})).is_some());
        assert!(with("audio", json!({"voice": "alloy"})).is_some());
        assert!(with("some_vendor_field", json!(1)).is_some());
        let audio = json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]});
        assert!(unsupported(&chat(audio)).is_some());
    }
}
