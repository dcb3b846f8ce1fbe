//! The neutral request as a `generateContent` (or `batchEmbedContents`) request, and what such
//! a request cannot say.

use std::collections::HashMap;

use serde_json::{Map, Value, json};

use crate::llm::request::other_part;
use crate::llm::{ChatRequest, Operation};
use crate::provider::turns::push_turn;

/// Why a Gemini target cannot serve `request` faithfully, if it cannot.
pub fn unsupported(request: &ChatRequest) -> Option<String> {
    if request.operation == Operation::Embeddings {
        if request.input_texts().is_none() {
            return Some("token-array embedding input (Gemini embeds text only)".to_string());
        }
        return request
            .rest
            .keys()
            .find(|k| !["input", "dimensions", "user", "encoding_format"].contains(&k.as_str()))
            .map(|k| format!("`{k}` has no Gemini embeddings equivalent"));
    }
    if let Some(reason) = request.origin.as_ref().and_then(|o| o.unportable_reason("Gemini")) {
        return Some(reason);
    }
    let streaming = request.stream;
    request.inexpressible(
        "Gemini",
        |name, value| match name {
            "logprobs" => (value == &Value::Bool(true)).then_some("`logprobs`"),
            "logit_bias" => value.as_object().is_some_and(|m| !m.is_empty()).then_some("`logit_bias`"),
            "parallel_tool_calls" => (value == &Value::Bool(false)).then_some("`parallel_tool_calls: false`"),
            "n" if streaming => value.as_u64().is_some_and(|n| n > 1).then_some("a stream of `n` above 1"),
            _ => None,
        },
        |part| match part.get("type").and_then(Value::as_str) {
            Some("text") => None,
            Some("image_url") => {
                let url = part.pointer("/image_url/url").and_then(Value::as_str).unwrap_or_default();
                (!url.starts_with("data:")).then(|| "images by URL (Gemini takes inline images only)".to_string())
            }
            _ => other_part(part),
        },
    )
}

/// The `generateContent` request for the neutral request.
pub fn to_gemini_request(request: &ChatRequest) -> Value {
    let mut system = Vec::new();
    let mut contents: Vec<Value> = Vec::new();
    let mut call_names: HashMap<String, String> = HashMap::new();
    for message in &request.messages {
        match message.role.as_str() {
            "system" | "developer" => system.extend(parts(message.content.as_ref())),
            "assistant" => {
                let mut out = parts(message.content.as_ref());
                for call in message.rest.get("tool_calls").and_then(Value::as_array).into_iter().flatten() {
                    let name = call.pointer("/function/name").and_then(Value::as_str).unwrap_or_default();
                    if let Some(id) = call.get("id").and_then(Value::as_str) {
                        call_names.insert(id.to_string(), name.to_string());
                    }
                    let arguments = call.pointer("/function/arguments").and_then(Value::as_str).unwrap_or("{}");
                    let args = serde_json::from_str::<Value>(arguments).unwrap_or_else(|_| json!({}));
                    out.push(json!({"functionCall": {"name": name, "args": args}}));
                }
                push_turn(&mut contents, "model", "parts", out);
            }
            "tool" => {
                let id = message.rest.get("tool_call_id").and_then(Value::as_str).unwrap_or_default();
                let name = call_names.get(id).cloned().unwrap_or_default();
                let text: String = parts(message.content.as_ref()).iter().filter_map(|p| p["text"].as_str()).collect();
                let response = serde_json::from_str::<Value>(&text)
                    .ok()
                    .filter(Value::is_object)
                    .unwrap_or_else(|| json!({"content": text}));
                push_turn(
                    &mut contents,
                    "user",
                    "parts",
                    vec![json!({"functionResponse": {"name": name, "response": response}})],
                );
            }
            _ => push_turn(&mut contents, "user", "parts", parts(message.content.as_ref())),
        }
    }
    let mut body = Map::new();
    body.insert("contents".into(), Value::Array(contents));
    if !system.is_empty() {
        body.insert("systemInstruction".into(), json!({"parts": system}));
    }
    let rest = &request.rest;
    let mut config = Map::new();
    let mut copy = |from: &str, to: &str| {
        if let Some(value) = rest.get(from).filter(|v| !v.is_null()) {
            config.insert(to.into(), value.clone());
        }
    };
    copy("temperature", "temperature");
    copy("top_p", "topP");
    copy("presence_penalty", "presencePenalty");
    copy("frequency_penalty", "frequencyPenalty");
    copy("seed", "seed");
    copy("n", "candidateCount");
    if let Some(max) = rest.get("max_completion_tokens").or_else(|| rest.get("max_tokens")).filter(|v| !v.is_null()) {
        config.insert("maxOutputTokens".into(), max.clone());
    }
    if let Some(stops) = request.stop_sequences() {
        config.insert("stopSequences".into(), stops);
    }
    match rest.get("response_format").and_then(|f| f.get("type")).and_then(Value::as_str) {
        Some("json_object") => {
            config.insert("responseMimeType".into(), json!("application/json"));
        }
        Some("json_schema") => {
            config.insert("responseMimeType".into(), json!("application/json"));
            if let Some(schema) = rest.get("response_format").and_then(|f| f.pointer("/json_schema/schema")) {
                config.insert("responseJsonSchema".into(), schema.clone());
            }
        }
        _ => {}
    }
    if !config.is_empty() {
        body.insert("generationConfig".into(), Value::Object(config));
    }
    if let Some(tools) = rest.get("tools").and_then(Value::as_array) {
        let declarations: Vec<Value> = tools
            .iter()
            .filter_map(|t| t.get("function"))
            .map(|f| {
                let mut declaration = json!({"name": f["name"]});
                if let Some(description) = f.get("description") {
                    declaration["description"] = description.clone();
                }
                if let Some(parameters) = f.get("parameters") {
                    declaration["parametersJsonSchema"] = parameters.clone();
                }
                declaration
            })
            .collect();
        body.insert("tools".into(), json!([{"functionDeclarations": declarations}]));
    }
    let mode = match rest.get("tool_choice") {
        Some(Value::String(mode)) if mode == "none" => Some(json!({"mode": "NONE"})),
        Some(Value::String(mode)) if mode == "required" => Some(json!({"mode": "ANY"})),
        Some(Value::String(_)) => Some(json!({"mode": "AUTO"})),
        Some(Value::Object(choice)) => choice
            .get("function")
            .and_then(|f| f.get("name"))
            .map(|name| json!({"mode": "ANY", "allowedFunctionNames": [name]})),
        _ => None,
    };
    if let Some(mode) = mode {
        body.insert("toolConfig".into(), json!({"functionCallingConfig": mode}));
    }
    Value::Object(body)
}

fn parts(content: Option<&Value>) -> Vec<Value> {
    match content {
        Some(Value::String(text)) if !text.is_empty() => vec![json!({"text": text})],
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|part| match part.get("type").and_then(Value::as_str) {
                Some("text") => Some(json!({"text": part.get("text").cloned().unwrap_or(json!(""))})),
                Some("image_url") => {
                    let url = part.pointer("/image_url/url").and_then(Value::as_str).unwrap_or_default();
                    let (mime, data) = url.strip_prefix("data:")?.split_once(";base64,")?;
                    Some(json!({"inlineData": {"mimeType": mime, "data": data}}))
                }
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// A `batchEmbedContents` request for an embeddings request.
pub(crate) fn to_embed_request(request: &ChatRequest, model: &str) -> Value {
    let dimensions = request.rest.get("dimensions").cloned();
    let requests: Vec<Value> = request
        .input_texts()
        .unwrap_or_default()
        .into_iter()
        .map(|text| {
            let mut one = json!({"model": format!("models/{model}"), "content": {"parts": [{"text": text}]}});
            if let Some(dimensions) = &dimensions {
                one["outputDimensionality"] = dimensions.clone();
            }
            one
        })
        .collect();
    json!({ "requests": requests })
}
