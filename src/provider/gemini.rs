//! Google's Gemini API (`generateContent`, `streamGenerateContent?alt=sse`): the upstream
//! provider and the translations between it and the neutral (OpenAI Chat Completions) shape.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use http::Uri;
use serde_json::{Map, Value, json};

use super::sse::{self, Parsed, WireStream};
use super::{
    Api, ApiKey, AttemptError, Credentials, Headroom, HttpClient, Reply, Sent, StreamEvent, encode, post_json,
    push_turn, read_json, stop_sequences,
};
use crate::chat::{ChatRequest, Operation};
use crate::policy::FailureClass;

/// Google AI's Gemini API.
pub const DEFAULT_BASE_URL: &str = "https://generativelanguage.googleapis.com/v1beta";

/// Chat Completions parameters a `generateContent` request can carry, or that change nothing an
/// app would notice when dropped.
const PORTABLE: &[&str] = &[
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stop",
    "tools",
    "tool_choice",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "response_format",
    "user",
    "stream_options",
    "store",
    "metadata",
    "service_tier",
    "prompt_cache_key",
    "safety_identifier",
    "parallel_tool_calls",
    "logprobs",
    "logit_bias",
];

/// Finish reasons that mean a safety or policy filter stopped the answer.
const FILTERED: &[&str] = &["SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"];

/// A Gemini upstream.
#[derive(Debug)]
pub struct Gemini {
    base: String,
    keys: Credentials,
}

impl Gemini {
    /// An upstream at `base_url` (such as `https://generativelanguage.googleapis.com/v1beta`).
    pub fn new(base_url: &str, keys: Vec<ApiKey>) -> Result<Self, String> {
        let base = base_url.trim_end_matches('/').to_string();
        let probe: Uri =
            format!("{base}/models/probe:generateContent").parse().map_err(|e| format!("not a valid URL: {e}"))?;
        if !matches!(probe.scheme_str(), Some("http" | "https")) || probe.host().is_none() {
            return Err("must be an http:// or https:// URL with a host".to_string());
        }
        Ok(Gemini { base, keys: Credentials::new(&keys, "")? })
    }

    /// Keys balanced across (keyless counts as one).
    pub fn key_count(&self) -> usize {
        self.keys.count()
    }

    /// Endpoint identity for health state: URL and key fingerprint.
    pub fn endpoint_id(&self, key: usize) -> String {
        self.keys.identity(&format!("gemini:{}", self.base), key)
    }

    /// Sends one `generateContent` (or streaming, or `batchEmbedContents`) request.
    pub async fn send(
        &self,
        http: &HttpClient,
        model: &str,
        request: &ChatRequest,
        key: usize,
    ) -> Result<Sent, AttemptError> {
        let embeddings = request.operation == Operation::Embeddings;
        let method = match (embeddings, request.stream) {
            (true, _) => "batchEmbedContents",
            (false, true) => "streamGenerateContent?alt=sse",
            (false, false) => "generateContent",
        };
        let model = model.strip_prefix("models/").unwrap_or(model);
        let uri: Uri = format!("{}/models/{model}:{method}", self.base).parse().map_err(|e| {
            AttemptError::new(FailureClass::BadRequest, format!("model `{model}` does not fit in a URL: {e}"))
        })?;
        let wire = if embeddings { to_embed_request(request, model) } else { to_gemini_request(request) };
        let headers = self.keys.header("x-goog-api-key", key);
        let response = post_json(http, uri, &headers, encode(&wire)?, request.stream, classify).await?;
        if request.stream && !embeddings {
            let events = sse::event_stream(response.into_body(), EventParser::default());
            return Ok(Sent { reply: Reply::Stream(events), headroom: Headroom::default(), api: Api::Gemini });
        }
        let answer = read_json(response.into_body()).await?;
        if embeddings {
            let base64 = request.rest.get("encoding_format").and_then(Value::as_str) == Some("base64");
            return match embeddings_to_openai(&answer, model, base64) {
                Some(list) => {
                    Ok(Sent { reply: Reply::Complete(list), headroom: Headroom::default(), api: Api::OpenAi })
                }
                None => Err(AttemptError::new(FailureClass::ServerError, "upstream answer has no `embeddings`")),
            };
        }
        if let Some(error) = blocked(&answer) {
            return Err(error);
        }
        Ok(Sent { reply: Reply::Complete(answer), headroom: Headroom::default(), api: Api::Gemini })
    }
}

/// A response the safety filters blocked outright: no candidate, or only filtered ones with
/// nothing to show.
fn blocked(answer: &Value) -> Option<AttemptError> {
    if let Some(error) = answer.get("error").filter(|e| e.is_object()) {
        return Some(AttemptError::new(classify_error(None, error), error_text(error)));
    }
    let candidates = answer.get("candidates").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    if candidates.is_empty() {
        return match answer.pointer("/promptFeedback/blockReason").and_then(Value::as_str) {
            Some(reason) => Some(AttemptError::new(FailureClass::ContentFiltered, format!("prompt blocked: {reason}"))),
            None => Some(AttemptError::new(FailureClass::ServerError, "upstream answer has no candidates")),
        };
    }
    let all_filtered = candidates.iter().all(|c| {
        c.get("finishReason").and_then(Value::as_str).is_some_and(|r| FILTERED.contains(&r)) && parts_of(c).is_empty()
    });
    all_filtered.then(|| AttemptError::new(FailureClass::ContentFiltered, "answer blocked by the safety filters"))
}

fn parts_of(candidate: &Value) -> Vec<&Value> {
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

/// A `batchEmbedContents` request for an embeddings request.
fn to_embed_request(request: &ChatRequest, model: &str) -> Value {
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

/// A `batchEmbedContents` answer as an OpenAI embeddings list.
fn embeddings_to_openai(answer: &Value, model: &str, base64: bool) -> Option<Value> {
    let data: Vec<Value> = answer
        .get("embeddings")?
        .as_array()?
        .iter()
        .enumerate()
        .map(|(index, e)| {
            let values: Vec<f64> =
                e.get("values").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_f64).collect();
            json!({"object": "embedding", "index": index, "embedding": super::embedding_value(&values, base64)})
        })
        .collect();
    Some(json!({"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": 0, "total_tokens": 0}}))
}

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
    for (name, value) in &request.rest {
        if !PORTABLE.contains(&name.as_str()) {
            return Some(format!("`{name}` has no Gemini equivalent"));
        }
        let problem = match name.as_str() {
            "logprobs" => (value == &Value::Bool(true)).then_some("`logprobs`"),
            "logit_bias" => value.as_object().is_some_and(|m| !m.is_empty()).then_some("`logit_bias`"),
            "parallel_tool_calls" => (value == &Value::Bool(false)).then_some("`parallel_tool_calls: false`"),
            "n" if request.stream => value.as_u64().is_some_and(|n| n > 1).then_some("a stream of `n` above 1"),
            _ => None,
        };
        if let Some(problem) = problem {
            return Some(format!("{problem} cannot be expressed in a Gemini request"));
        }
    }
    for message in &request.messages {
        if let Some(Value::Array(parts)) = &message.content {
            for part in parts {
                match part.get("type").and_then(Value::as_str) {
                    Some("text") => {}
                    Some("image_url") => {
                        let url = part.pointer("/image_url/url").and_then(Value::as_str).unwrap_or_default();
                        if !url.starts_with("data:") {
                            return Some("images by URL (Gemini takes inline images only)".to_string());
                        }
                    }
                    other => return Some(format!("message content of type `{}`", other.unwrap_or("unknown"))),
                }
            }
        }
    }
    None
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
    if let Some(stops) = stop_sequences(rest) {
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

fn finish_reason(reason: Option<&str>, called: bool) -> Option<&'static str> {
    let reason = reason?;
    Some(match reason {
        _ if called => "tool_calls",
        "MAX_TOKENS" => "length",
        r if FILTERED.contains(&r) => "content_filter",
        _ => "stop",
    })
}

fn usage(metadata: &Value) -> Value {
    let prompt = metadata.get("promptTokenCount").and_then(Value::as_u64).unwrap_or(0);
    let completion = metadata
        .get("candidatesTokenCount")
        .and_then(Value::as_u64)
        .unwrap_or(0)
        .saturating_add(metadata.get("thoughtsTokenCount").and_then(Value::as_u64).unwrap_or(0));
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt.saturating_add(completion)})
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn call_id(part: &Value, index: usize) -> Value {
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
        "created": now(),
        "model": answer.get("modelVersion").cloned().unwrap_or(Value::Null),
        "choices": choices,
        "usage": usage(answer.get("usageMetadata").unwrap_or(&Value::Null)),
    })
}

/// Reads `streamGenerateContent?alt=sse` events: each is a partial answer; the body ends after
/// the one with a `finishReason` (there is no end marker).
#[derive(Debug, Default)]
pub struct EventParser {
    finished: bool,
    emitted_content: bool,
}

impl WireStream for EventParser {
    fn event(&mut self, event: sse::Event) -> Parsed {
        let data = match sse::json_data(&event.data) {
            Ok(data) => data,
            Err(error) => return Parsed::Fail(error),
        };
        if data.get("error").is_some()
            || (data.get("candidates").is_none() && data.pointer("/promptFeedback/blockReason").is_some())
        {
            return Parsed::Fail(
                blocked(&data).unwrap_or_else(|| AttemptError::new(FailureClass::ServerError, "error event in stream")),
            );
        }
        let candidate = data.pointer("/candidates/0").cloned().unwrap_or(Value::Null);
        let reason = candidate.get("finishReason").and_then(Value::as_str);
        let content = !parts_of(&candidate).is_empty();
        if !content && !self.emitted_content && reason.is_some_and(|r| FILTERED.contains(&r)) {
            return Parsed::Fail(AttemptError::new(
                FailureClass::ContentFiltered,
                "answer blocked by the safety filters",
            ));
        }
        let end = reason.is_some();
        self.finished |= end;
        self.emitted_content |= content;
        Parsed::Event(StreamEvent { data, content, end })
    }

    fn may_end(&self) -> bool {
        self.finished
    }
}

/// Turns Gemini stream events into OpenAI `chat.completion.chunk`s.
#[derive(Debug)]
pub struct ToOpenAiStream {
    include_usage: bool,
    started: bool,
    calls: usize,
    created: u64,
    id: String,
    model: Value,
    usage: Option<Value>,
}

impl ToOpenAiStream {
    /// A translator; `include_usage` adds OpenAI's final usage chunk.
    pub fn new(include_usage: bool) -> Self {
        ToOpenAiStream {
            include_usage,
            started: false,
            calls: 0,
            created: now(),
            id: "chatcmpl-gemini".into(),
            model: Value::Null,
            usage: None,
        }
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> Value {
        json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
               "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
    }

    /// The chunks for one event.
    pub fn push(&mut self, event: &Value) -> Vec<Value> {
        let mut out = Vec::new();
        if !self.started {
            self.started = true;
            if let Some(id) = event.get("responseId").and_then(Value::as_str) {
                self.id = format!("chatcmpl-{id}");
            }
            self.model = event.get("modelVersion").cloned().unwrap_or(Value::Null);
            out.push(self.chunk(json!({"role": "assistant", "content": ""}), None));
        }
        if let Some(metadata) = event.get("usageMetadata") {
            self.usage = Some(usage(metadata));
        }
        let candidate = event.pointer("/candidates/0").cloned().unwrap_or(Value::Null);
        for part in parts_of(&candidate) {
            if let Some(text) = part.get("text").and_then(Value::as_str) {
                out.push(self.chunk(json!({"content": text}), None));
            } else if let Some(call) = part.get("functionCall") {
                let index = self.calls;
                self.calls += 1;
                let arguments = call.get("args").map(Value::to_string).unwrap_or_else(|| "{}".into());
                out.push(self.chunk(
                    json!({"tool_calls": [{"index": index, "id": call_id(part, index), "type": "function",
                                           "function": {"name": call["name"], "arguments": arguments}}]}),
                    None,
                ));
            }
        }
        if let Some(finish) = finish_reason(candidate.get("finishReason").and_then(Value::as_str), self.calls > 0) {
            out.push(self.chunk(json!({}), Some(finish)));
        }
        out
    }

    /// The usage chunk, when asked for, once the stream has ended.
    pub fn finish(&mut self) -> Vec<Value> {
        match (&self.usage, self.include_usage) {
            (Some(usage), true) => {
                vec![json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                               "model": self.model, "choices": [], "usage": usage})]
            }
            _ => Vec::new(),
        }
    }
}

/// Classifies a Gemini error answer (`{"error": {"code", "message", "status"}}`).
pub fn classify(status: Option<u16>, body: &[u8]) -> FailureClass {
    let parsed: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    classify_error(status, parsed.get("error").unwrap_or(&Value::Null))
}

fn classify_error(status: Option<u16>, error: &Value) -> FailureClass {
    let kind = error.get("status").and_then(Value::as_str).unwrap_or_default();
    let message = error.get("message").and_then(Value::as_str).unwrap_or_default().to_ascii_lowercase();
    let details = error.get("details").map(Value::to_string).unwrap_or_default();
    match kind {
        _ if message.contains("api key not valid") || details.contains("API_KEY_INVALID") => FailureClass::AuthError,
        "UNAUTHENTICATED" | "PERMISSION_DENIED" => FailureClass::AuthError,
        "RESOURCE_EXHAUSTED" if message.contains("billing") => FailureClass::QuotaExceeded,
        "RESOURCE_EXHAUSTED" => FailureClass::RateLimited,
        "UNAVAILABLE" => FailureClass::Overloaded,
        "INTERNAL" | "UNKNOWN" => FailureClass::ServerError,
        "DEADLINE_EXCEEDED" => FailureClass::Timeout,
        "INVALID_ARGUMENT" | "FAILED_PRECONDITION" | "OUT_OF_RANGE"
            if message.contains("token count")
                || message.contains("maximum number of tokens")
                || message.contains("too long") =>
        {
            FailureClass::ContextWindowExceeded
        }
        "INVALID_ARGUMENT" | "FAILED_PRECONDITION" | "NOT_FOUND" | "OUT_OF_RANGE" => FailureClass::BadRequest,
        _ => super::classify_openai_error(
            status.or_else(|| error.get("code").and_then(Value::as_u64).and_then(|c| u16::try_from(c).ok())),
            b"{}",
        ),
    }
}

fn error_text(error: &Value) -> String {
    error.get("message").and_then(Value::as_str).unwrap_or("unknown error").chars().take(300).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_gemini_errors() {
        let c = |code: u16, status: &str, message: &str| {
            classify(
                Some(code),
                json!({"error": {"code": code, "status": status, "message": message}}).to_string().as_bytes(),
            )
        };
        assert_eq!(
            c(429, "RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota)."),
            FailureClass::RateLimited
        );
        assert_eq!(c(503, "UNAVAILABLE", "The model is overloaded."), FailureClass::Overloaded);
        assert_eq!(c(500, "INTERNAL", "An internal error has occurred."), FailureClass::ServerError);
        assert_eq!(
            c(400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key."),
            FailureClass::AuthError
        );
        assert_eq!(c(403, "PERMISSION_DENIED", "denied"), FailureClass::AuthError);
        assert_eq!(
            c(
                400,
                "INVALID_ARGUMENT",
                "The input token count (1200000) exceeds the maximum number of tokens allowed (1048576)."
            ),
            FailureClass::ContextWindowExceeded
        );
        assert_eq!(c(400, "INVALID_ARGUMENT", "Invalid value at 'contents'"), FailureClass::BadRequest);
        assert_eq!(c(504, "DEADLINE_EXCEEDED", "slow"), FailureClass::Timeout);
        assert_eq!(c(404, "NOT_FOUND", "models/x is not found"), FailureClass::BadRequest);
    }

    #[test]
    fn safety_blocks_are_content_filtered() {
        let prompt_blocked = json!({"promptFeedback": {"blockReason": "SAFETY"}});
        assert_eq!(blocked(&prompt_blocked).map(|e| e.class), Some(FailureClass::ContentFiltered));
        let answer_blocked = json!({"candidates": [{"finishReason": "SAFETY", "content": {"parts": []}}]});
        assert_eq!(blocked(&answer_blocked).map(|e| e.class), Some(FailureClass::ContentFiltered));
        let fine = json!({"candidates": [{"finishReason": "STOP", "content": {"parts": [{"text": "hi"}]}}]});
        assert!(blocked(&fine).is_none());
        let mut parser = EventParser::default();
        let Parsed::Fail(e) = parser.event(sse::Event { event: None, data: answer_blocked.to_string() }) else {
            panic!()
        };
        assert_eq!(e.class, FailureClass::ContentFiltered);
        // After content has streamed, a safety stop ends the answer instead of failing it.
        let mut parser = EventParser::default();
        let text = json!({"candidates": [{"content": {"parts": [{"text": "partial"}]}}]});
        assert!(matches!(parser.event(sse::Event { event: None, data: text.to_string() }), Parsed::Event(_)));
        let Parsed::Event(stop) = parser.event(sse::Event { event: None, data: answer_blocked.to_string() }) else {
            panic!()
        };
        assert!(stop.end && parser.may_end());
        let mut translate = ToOpenAiStream::new(false);
        let chunks = translate.push(&stop.data);
        assert_eq!(chunks.last().and_then(|c| c.pointer("/choices/0/finish_reason")), Some(&json!("content_filter")));
    }
}
