//! A `generateContent` answer in the neutral (OpenAI Chat Completions) shape.

use serde_json::{Value, json};

use crate::llm::answer::embedding_value;
use crate::llm::unix_seconds;

/// Finish reasons that mean a safety or policy filter stopped the answer.
pub(crate) const FILTERED: &[&str] =
    &["SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"];

pub(crate) fn parts_of(candidate: &Value) -> Vec<&Value> {
    candidate
        .pointer("/content/parts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|p| p.get("thought") != Some(&Value::Bool(true)))
        .filter(|p| {
            p.get("text").and_then(Value::as_str).is_some_and(|t| !t.is_empty()) || p.get("functionCall").is_some()
        })
        .collect()
}

pub(crate) fn finish_reason(reason: Option<&str>, called: bool) -> Option<&'static str> {
    let reason = reason?;
    Some(match reason {
        _ if called => "tool_calls",
        "MAX_TOKENS" => "length",
        r if FILTERED.contains(&r) => "content_filter",
        _ => "stop",
    })
}

pub(crate) fn usage(metadata: &Value) -> Value {
    let prompt = metadata.get("promptTokenCount").and_then(Value::as_u64).unwrap_or(0);
    let completion = metadata
        .get("candidatesTokenCount")
        .and_then(Value::as_u64)
        .unwrap_or(0)
        .saturating_add(metadata.get("thoughtsTokenCount").and_then(Value::as_u64).unwrap_or(0));
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt.saturating_add(completion)})
}

pub(crate) fn call_id(part: &Value, index: usize) -> Value {
    part.pointer("/functionCall/id")
        .filter(|v| v.is_string())
        .cloned()
        .unwrap_or_else(|| json!(format!("call_{index}")))
}

/// A `generateContent` answer as an OpenAI `chat.completion`.
pub fn to_openai_completion(answer: &Value) -> Value {
    let choices: Vec<Value> = answer
        .get("candidates")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(i, candidate)| {
            let parts = parts_of(candidate);
            let text: String = parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).collect();
            let calls: Vec<Value> = parts
                .iter()
                .filter(|p| p.get("functionCall").is_some())
                .enumerate()
                .map(|(n, p)| {
                    json!({"id": call_id(p, n), "type": "function", "function": {
                        "name": p["functionCall"]["name"], "arguments": p["functionCall"].get("args").map(Value::to_string).unwrap_or_else(|| "{}".into())}})
                })
                .collect();
            let mut message = json!({"role": "assistant", "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { json!(text) }});
            if !calls.is_empty() {
                message["tool_calls"] = Value::Array(calls.clone());
            }
            let finish = finish_reason(candidate.get("finishReason").and_then(Value::as_str), !calls.is_empty()).unwrap_or("stop");
            json!({"index": candidate.get("index").and_then(Value::as_u64).unwrap_or(i as u64), "message": message, "logprobs": null, "finish_reason": finish})
        })
        .collect();
    json!({
        "id": answer.get("responseId").and_then(Value::as_str).map(|id| format!("chatcmpl-{id}")).unwrap_or_else(|| "chatcmpl-gemini".into()),
        "object": "chat.completion",
        "created": unix_seconds(),
        "model": answer.get("modelVersion").cloned().unwrap_or(Value::Null),
        "choices": choices,
        "usage": usage(answer.get("usageMetadata").unwrap_or(&Value::Null)),
    })
}

/// A `batchEmbedContents` answer as an OpenAI embeddings list.
pub(crate) fn embeddings_to_openai(answer: &Value, model: &str, base64: bool) -> Option<Value> {
    let data: Vec<Value> = answer
        .get("embeddings")?
        .as_array()?
        .iter()
        .enumerate()
        .map(|(index, e)| {
            let values: Vec<f64> =
                e.get("values").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_f64).collect();
            json!({"object": "embedding", "index": index, "embedding": embedding_value(&values, base64)})
        })
        .collect();
    Some(json!({"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": 0, "total_tokens": 0}}))
}
