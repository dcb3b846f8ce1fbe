//! Anthropic's Messages API: the upstream provider, and the translations between Messages and
//! the neutral (OpenAI Chat Completions) shape in both directions, streaming included.
//!
//! Upstream: the neutral request becomes a Messages request (system prompt lifted out, tool
//! calls and results as content blocks, `max_tokens` filled in); answers and events come back
//! in Anthropic's format and are translated at the edge. Ingress: an app's Messages request
//! becomes the neutral request, and any provider's answer is rendered as a Messages answer.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use http::{HeaderValue, Uri};
use serde_json::{Map, Value, json};

use super::sse::{self, Parsed, WireStream};
use super::{
    Api, ApiKey, AttemptError, Credentials, Headroom, HttpClient, Reply, Sent, StreamEvent, encode, post_json,
    push_turn, read_json, stop_sequences,
};
use crate::chat::{ChatRequest, InvalidRequest, Message, Operation, Origin, json_object};
use crate::policy::FailureClass;

/// Anthropic's own API.
pub const DEFAULT_BASE_URL: &str = "https://api.anthropic.com";
/// The `anthropic-version` sent when the policy names none.
pub const DEFAULT_VERSION: &str = "2023-06-01";
/// `max_tokens` when neither the app nor the policy gives one (Messages requires it).
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

/// Chat Completions parameters a Messages request can carry, or that change nothing an app
/// would notice when dropped. Any other parameter makes an Anthropic target ineligible.
const PORTABLE: &[&str] = &[
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stop",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "user",
    "stream_options",
    "n",
    "seed",
    "service_tier",
    "store",
    "metadata",
    "prompt_cache_key",
    "safety_identifier",
    "logprobs",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "response_format",
];

/// An Anthropic Messages upstream.
#[derive(Debug)]
pub struct Anthropic {
    messages: Uri,
    keys: Credentials,
    version: HeaderValue,
    default_max_tokens: u64,
}

impl Anthropic {
    /// An upstream at `base_url` (such as `https://api.anthropic.com`).
    pub fn new(
        base_url: &str,
        keys: Vec<ApiKey>,
        version: Option<&str>,
        default_max_tokens: Option<u64>,
    ) -> Result<Self, String> {
        let messages: Uri = format!("{}/v1/messages", base_url.trim_end_matches('/').trim_end_matches("/v1"))
            .parse()
            .map_err(|e| format!("not a valid URL: {e}"))?;
        if !matches!(messages.scheme_str(), Some("http" | "https")) || messages.host().is_none() {
            return Err("must be an http:// or https:// URL with a host".to_string());
        }
        let credentials = Credentials::new(&keys, "")?;
        let version = HeaderValue::from_str(version.unwrap_or(DEFAULT_VERSION))
            .map_err(|_| "`apiVersion` holds characters not allowed in an HTTP header".to_string())?;
        Ok(Anthropic {
            messages,
            keys: credentials,
            version,
            default_max_tokens: default_max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        })
    }

    /// Keys balanced across (keyless counts as one).
    pub fn key_count(&self) -> usize {
        self.keys.count()
    }

    /// Endpoint identity for health state: URL and key fingerprint.
    pub fn endpoint_id(&self, key: usize) -> String {
        self.keys.identity(&format!("anthropic:{}", self.messages), key)
    }

    /// Sends one Messages request.
    pub async fn send(
        &self,
        http: &HttpClient,
        model: &str,
        request: &ChatRequest,
        key: usize,
    ) -> Result<Sent, AttemptError> {
        let body = to_messages_request(request, model, self.default_max_tokens);
        let mut headers = vec![("anthropic-version", self.version.clone())];
        headers.extend(self.keys.header("x-api-key", key));
        if let Some(origin) = request.origin.as_deref().filter(|o| o.api == Api::Anthropic) {
            headers.extend(
                origin.headers.iter().filter_map(|(name, value)| Some((*name, HeaderValue::from_str(value).ok()?))),
            );
        }
        let response =
            post_json(http, self.messages.clone(), &headers, encode(&body)?, request.stream, classify).await?;
        let headroom = anthropic_headroom(response.headers());
        if request.stream {
            let thinking_shows = request.origin.as_ref().is_some_and(|o| o.api == Api::Anthropic);
            let events = sse::event_stream(response.into_body(), EventParser::new(thinking_shows));
            return Ok(Sent { reply: Reply::Stream(events), headroom, api: Api::Anthropic });
        }
        let answer = read_json(response.into_body()).await?;
        if answer.get("type").and_then(Value::as_str) == Some("error") {
            let error = answer.get("error").cloned().unwrap_or(Value::Null);
            return Err(AttemptError::new(classify_error(None, &error), error_text(&error)));
        }
        if !answer.get("content").is_some_and(Value::is_array) {
            return Err(AttemptError::new(FailureClass::ServerError, "upstream answer has no `content`"));
        }
        if answer.get("stop_reason").and_then(Value::as_str) == Some("refusal")
            && !answer["content"]
                .as_array()
                .is_some_and(|c| c.iter().any(|b| b.get("type").is_some_and(|t| t != "thinking")))
        {
            return Err(AttemptError::new(FailureClass::ContentFiltered, "the model refused to answer"));
        }
        Ok(Sent { reply: Reply::Complete(answer), headroom, api: Api::Anthropic })
    }
}

/// Anthropic's rate-limit headers, in the neutral form.
fn anthropic_headroom(headers: &http::HeaderMap) -> Headroom {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    let reset = |name: &str| {
        text(name).and_then(|v| httpdate::parse_http_date(v).ok().or_else(|| humantime::parse_rfc3339(v).ok())).map(
            |at| at.duration_since(SystemTime::now()).unwrap_or_default().min(std::time::Duration::from_secs(86_400)),
        )
    };
    Headroom {
        remaining_requests: text("anthropic-ratelimit-requests-remaining").and_then(|v| v.parse().ok()),
        remaining_tokens: text("anthropic-ratelimit-tokens-remaining").and_then(|v| v.parse().ok()),
        reset_requests: reset("anthropic-ratelimit-requests-reset"),
        reset_tokens: reset("anthropic-ratelimit-tokens-reset"),
    }
}

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
    for (name, value) in &request.rest {
        if !PORTABLE.contains(&name.as_str()) {
            return Some(format!("`{name}` has no Messages equivalent"));
        }
        let problem = match name.as_str() {
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
        };
        if let Some(problem) = problem {
            return Some(format!("{problem} cannot be expressed in a Messages request"));
        }
    }
    for message in &request.messages {
        if let Some(Value::Array(parts)) = &message.content {
            for part in parts {
                match part.get("type").and_then(Value::as_str) {
                    Some("text" | "image_url") => {}
                    other => return Some(format!("message content of type `{}`", other.unwrap_or("unknown"))),
                }
            }
        }
    }
    None
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
    if let Some(stops) = stop_sequences(rest) {
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

fn finish_reason(stop_reason: Option<&str>) -> Option<&'static str> {
    stop_reason.map(|reason| match reason {
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        _ => "stop",
    })
}

fn stop_reason(finish_reason: Option<&str>) -> &'static str {
    match finish_reason {
        Some("length") => "max_tokens",
        Some("tool_calls" | "function_call") => "tool_use",
        Some("content_filter") => "refusal",
        _ => "end_turn",
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn prompt_tokens(usage: &Value) -> u64 {
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
        "created": now(),
        "model": message.get("model").cloned().unwrap_or(Value::Null),
        "choices": [{"index": 0, "message": out, "logprobs": null,
                     "finish_reason": finish_reason(message.get("stop_reason").and_then(Value::as_str)).unwrap_or("stop")}],
        "usage": {"prompt_tokens": input, "completion_tokens": output, "total_tokens": input.saturating_add(output)},
    })
}

/// Reads Messages stream events: `message_stop` ends it; `ping` is skipped; `error` fails it.
/// Thinking counts as content (commits the stream) only when `thinking_shows`: an app of
/// another API never sees it, so a failure during thinking can still fall through for it.
#[derive(Debug, Default)]
pub struct EventParser {
    stopped: bool,
    thinking_shows: bool,
}

impl EventParser {
    /// A parser for a stream the app sees thinking in (it speaks Messages) or not.
    pub fn new(thinking_shows: bool) -> Self {
        EventParser { stopped: false, thinking_shows }
    }
}

impl WireStream for EventParser {
    fn event(&mut self, event: sse::Event) -> Parsed {
        let data = match sse::json_data(&event.data) {
            Ok(data) => data,
            Err(error) => return Parsed::Fail(error),
        };
        let kind = data.get("type").and_then(Value::as_str).or(event.event.as_deref()).unwrap_or_default().to_string();
        let (content, end) = match kind.as_str() {
            "ping" => return Parsed::Skip,
            "error" => {
                let error = data.get("error").cloned().unwrap_or(Value::Null);
                let class = classify_error(None, &error);
                let message = if class == FailureClass::AuthError {
                    "upstream rejected the credentials (in-stream error)".to_string()
                } else {
                    format!("error event in stream: {}", error_text(&error))
                };
                return Parsed::Fail(AttemptError::new(class, message));
            }
            "content_block_start" => {
                (data.pointer("/content_block/type").and_then(Value::as_str) == Some("tool_use"), false)
            }
            "content_block_delta" => {
                let delta = data.get("delta").cloned().unwrap_or(Value::Null);
                let visible: &[&str] =
                    if self.thinking_shows { &["text", "partial_json", "thinking"] } else { &["text", "partial_json"] };
                let text = visible.iter().any(|k| delta.get(*k).and_then(Value::as_str).is_some_and(|s| !s.is_empty()));
                (text, false)
            }
            "message_delta" => (false, data.pointer("/delta/stop_reason").is_some_and(|r| !r.is_null())),
            "message_stop" => {
                self.stopped = true;
                (false, true)
            }
            _ => (false, false),
        };
        Parsed::Event(StreamEvent { data, content, end })
    }

    fn may_end(&self) -> bool {
        self.stopped
    }
}

/// Turns Messages stream events into OpenAI `chat.completion.chunk`s.
#[derive(Debug)]
pub struct ToOpenAiStream {
    include_usage: bool,
    id: String,
    model: Value,
    created: u64,
    input_tokens: u64,
    output_tokens: u64,
    tools: HashMap<u64, usize>,
    /// Tool blocks that have had no argument text yet.
    no_arguments: Vec<u64>,
}

impl ToOpenAiStream {
    /// A translator; `include_usage` adds OpenAI's final usage chunk.
    pub fn new(include_usage: bool) -> Self {
        ToOpenAiStream {
            include_usage,
            id: "chatcmpl".into(),
            model: Value::Null,
            created: now(),
            input_tokens: 0,
            output_tokens: 0,
            tools: HashMap::new(),
            no_arguments: Vec::new(),
        }
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> Value {
        json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
               "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
    }

    /// The chunks for one Messages event.
    pub fn push(&mut self, event: &Value) -> Vec<Value> {
        match event.get("type").and_then(Value::as_str).unwrap_or_default() {
            "message_start" => {
                let message = &event["message"];
                if let Some(id) = message.get("id").and_then(Value::as_str) {
                    self.id = id.to_string();
                }
                self.model = message.get("model").cloned().unwrap_or(Value::Null);
                self.input_tokens = prompt_tokens(&message["usage"]);
                self.output_tokens = message.pointer("/usage/output_tokens").and_then(Value::as_u64).unwrap_or(0);
                vec![self.chunk(json!({"role": "assistant", "content": ""}), None)]
            }
            "content_block_start" => {
                let block = &event["content_block"];
                match block.get("type").and_then(Value::as_str) {
                    Some("tool_use") => {
                        let index = self.tools.len();
                        let position = event["index"].as_u64().unwrap_or(0);
                        self.tools.insert(position, index);
                        self.no_arguments.push(position);
                        vec![self.chunk(
                            json!({"tool_calls": [{"index": index, "id": block["id"], "type": "function",
                                                   "function": {"name": block["name"], "arguments": ""}}]}),
                            None,
                        )]
                    }
                    Some("text") if block["text"].as_str().is_some_and(|t| !t.is_empty()) => {
                        vec![self.chunk(json!({"content": block["text"]}), None)]
                    }
                    _ => Vec::new(),
                }
            }
            "content_block_delta" => {
                let delta = &event["delta"];
                match delta.get("type").and_then(Value::as_str) {
                    Some("text_delta") => vec![self.chunk(json!({"content": delta["text"]}), None)],
                    Some("input_json_delta") => {
                        let block = event["index"].as_u64().unwrap_or(0);
                        if delta["partial_json"].as_str().is_some_and(|j| !j.is_empty()) {
                            self.no_arguments.retain(|b| *b != block);
                        }
                        let index = self.tools.get(&block).copied().unwrap_or(0);
                        vec![self.chunk(
                            json!({"tool_calls": [{"index": index, "function": {"arguments": delta["partial_json"]}}]}),
                            None,
                        )]
                    }
                    _ => Vec::new(),
                }
            }
            "content_block_stop" => {
                // A tool without input: `{}`, as OpenAI sends, never an empty string.
                let block = event["index"].as_u64().unwrap_or(0);
                match (self.no_arguments.contains(&block), self.tools.get(&block).copied()) {
                    (true, Some(index)) => {
                        self.no_arguments.retain(|b| *b != block);
                        vec![
                            self.chunk(
                                json!({"tool_calls": [{"index": index, "function": {"arguments": "{}"}}]}),
                                None,
                            ),
                        ]
                    }
                    _ => Vec::new(),
                }
            }
            "message_delta" => {
                if let Some(output) = event.pointer("/usage/output_tokens").and_then(Value::as_u64) {
                    self.output_tokens = output;
                }
                match finish_reason(event.pointer("/delta/stop_reason").and_then(Value::as_str)) {
                    Some(finish) => vec![self.chunk(json!({}), Some(finish))],
                    None => Vec::new(),
                }
            }
            "message_stop" if self.include_usage => {
                let total = self.input_tokens.saturating_add(self.output_tokens);
                vec![
                    json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                            "choices": [], "usage": {"prompt_tokens": self.input_tokens, "completion_tokens": self.output_tokens, "total_tokens": total}}),
                ]
            }
            _ => Vec::new(),
        }
    }
}

/// Classifies an Anthropic error answer.
pub fn classify(status: Option<u16>, body: &[u8]) -> FailureClass {
    let parsed: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    classify_error(status, parsed.get("error").unwrap_or(&Value::Null))
}

fn classify_error(status: Option<u16>, error: &Value) -> FailureClass {
    let kind = error.get("type").and_then(Value::as_str).unwrap_or_default();
    let message = error.get("message").and_then(Value::as_str).unwrap_or_default().to_ascii_lowercase();
    match kind {
        "rate_limit_error" => FailureClass::RateLimited,
        "overloaded_error" => FailureClass::Overloaded,
        "api_error" => FailureClass::ServerError,
        "timeout_error" => FailureClass::Timeout,
        "authentication_error" | "permission_error" => FailureClass::AuthError,
        "billing_error" => FailureClass::QuotaExceeded,
        "invalid_request_error" if message.contains("prompt is too long") || message.contains("context window") => {
            FailureClass::ContextWindowExceeded
        }
        "invalid_request_error" if message.contains("credit balance") => FailureClass::QuotaExceeded,
        "invalid_request_error" | "not_found_error" | "request_too_large" => FailureClass::BadRequest,
        _ => super::classify_openai_error(status, b"{}"),
    }
}

fn error_text(error: &Value) -> String {
    error.get("message").and_then(Value::as_str).unwrap_or("unknown error").chars().take(300).collect()
}

// ---- ingress: an app speaking Messages ----

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
    let invalid = |message: String, param: Option<&'static str>| InvalidRequest { message, param };
    let raw = json_object(body)?;
    let model = match raw.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        _ => return Err(invalid("model: Field required (a non-empty string)".into(), Some("model"))),
    };
    let Some(max_tokens) = raw.get("max_tokens").and_then(Value::as_u64) else {
        return Err(invalid("max_tokens: Field required (a positive integer)".into(), Some("max_tokens")));
    };
    let Some(turns) = raw.get("messages").and_then(Value::as_array).filter(|m| !m.is_empty()) else {
        return Err(invalid("messages: Field required (a non-empty array)".into(), Some("messages")));
    };
    let stream = match raw.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(invalid("stream: Input should be a valid boolean".into(), Some("stream"))),
    };
    let mut unportable: Vec<String> = raw.keys().filter(|k| !INGRESS_FIELDS.contains(&k.as_str())).cloned().collect();
    if raw.contains_key("top_k") {
        unportable.retain(|k| k != "top_k");
        unportable.push("top_k".into());
    }
    let mut messages = Vec::new();
    match raw.get("system") {
        Some(Value::String(text)) => messages.push(message("system", json!(text))),
        Some(Value::Array(blocks)) => {
            let text =
                blocks.iter().filter_map(|b| b.get("text").and_then(Value::as_str)).collect::<Vec<_>>().join("\n");
            messages.push(message("system", json!(text)));
        }
        Some(_) => {
            return Err(invalid("system: Input should be a string or a list of text blocks".into(), Some("system")));
        }
        None => {}
    }
    for (i, turn) in turns.iter().enumerate() {
        let role = turn.get("role").and_then(Value::as_str).unwrap_or_default();
        if role != "user" && role != "assistant" {
            return Err(invalid(format!("messages.{i}.role: Input should be 'user' or 'assistant'"), Some("messages")));
        }
        let blocks: Vec<Value> = match turn.get("content") {
            Some(Value::String(text)) => vec![json!({"type": "text", "text": text})],
            Some(Value::Array(blocks)) => blocks.clone(),
            _ => return Err(invalid(format!("messages.{i}.content: Field required"), Some("messages"))),
        };
        let mut parts = Vec::new();
        let mut tool_calls = Vec::new();
        for block in &blocks {
            match block.get("type").and_then(Value::as_str).unwrap_or_default() {
                "text" => parts.push(json!({"type": "text", "text": block.get("text").cloned().unwrap_or(json!(""))})),
                "image" => {
                    let source = &block["source"];
                    let url = match source.get("type").and_then(Value::as_str) {
                        Some("base64") => format!(
                            "data:{};base64,{}",
                            source["media_type"].as_str().unwrap_or("image/png"),
                            source["data"].as_str().unwrap_or_default()
                        ),
                        _ => source["url"].as_str().unwrap_or_default().to_string(),
                    };
                    parts.push(json!({"type": "image_url", "image_url": {"url": url}}));
                }
                "tool_use" => tool_calls.push(json!({
                    "id": block["id"], "type": "function",
                    "function": {"name": block["name"], "arguments": block.get("input").map(Value::to_string).unwrap_or_else(|| "{}".into())},
                })),
                "tool_result" => {
                    let content = match block.get("content") {
                        Some(Value::String(text)) => text.clone(),
                        Some(Value::Array(inner)) => {
                            inner.iter().filter_map(|b| b.get("text").and_then(Value::as_str)).collect::<Vec<_>>().join("\n")
                        }
                        _ => String::new(),
                    };
                    let mut result = message("tool", json!(content));
                    result.rest.insert("tool_call_id".into(), block.get("tool_use_id").cloned().unwrap_or(json!("")));
                    messages.push(result);
                }
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
    }
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
    })
}

fn message(role: &str, content: Value) -> Message {
    Message { role: role.to_string(), content: Some(content), rest: Map::new() }
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

/// Turns OpenAI `chat.completion.chunk`s into Messages stream events, as `(event name, data)`.
#[derive(Debug, Default)]
pub struct FromOpenAiStream {
    started: bool,
    open: Option<u64>,
    next_block: u64,
    tools: HashMap<u64, u64>,
    tool_ids: HashMap<u64, String>,
    stop_reason: Option<&'static str>,
    input_tokens: u64,
    output_tokens: u64,
}

impl FromOpenAiStream {
    /// A fresh translator.
    pub fn new() -> Self {
        FromOpenAiStream::default()
    }

    fn start(&mut self, chunk: &Value, out: &mut Vec<(&'static str, Value)>) {
        if self.started {
            return;
        }
        self.started = true;
        let id = chunk.get("id").and_then(Value::as_str).unwrap_or("msg");
        out.push((
            "message_start",
            json!({"type": "message_start", "message": {
                "id": if id.starts_with("msg_") { id.to_string() } else { format!("msg_{id}") },
                "type": "message", "role": "assistant", "model": chunk.get("model").cloned().unwrap_or(Value::Null),
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": self.input_tokens, "output_tokens": 0},
            }}),
        ));
    }

    fn close(&mut self, out: &mut Vec<(&'static str, Value)>) {
        if let Some(index) = self.open.take() {
            out.push(("content_block_stop", json!({"type": "content_block_stop", "index": index})));
        }
    }

    /// The events for one chunk.
    pub fn push(&mut self, chunk: &Value) -> Vec<(&'static str, Value)> {
        let mut out = Vec::new();
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
            self.input_tokens = usage.get("prompt_tokens").and_then(Value::as_u64).unwrap_or(self.input_tokens);
            self.output_tokens = usage.get("completion_tokens").and_then(Value::as_u64).unwrap_or(self.output_tokens);
        }
        self.start(chunk, &mut out);
        let Some(choice) = chunk.get("choices").and_then(Value::as_array).and_then(|c| c.first()) else {
            return out;
        };
        let delta = &choice["delta"];
        if let Some(text) = delta.get("content").and_then(Value::as_str).filter(|t| !t.is_empty()) {
            if self.open.is_none_or(|index| self.tools.values().any(|t| *t == index)) {
                self.close(&mut out);
                let index = self.next_block;
                self.next_block += 1;
                self.open = Some(index);
                out.push((
                    "content_block_start",
                    json!({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}),
                ));
            }
            let index = self.open.unwrap_or(0);
            out.push((
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}}),
            ));
        }
        for call in delta.get("tool_calls").and_then(Value::as_array).into_iter().flatten() {
            let openai_index = call.get("index").and_then(Value::as_u64).unwrap_or(0);
            let new_id = call.get("id").and_then(Value::as_str).filter(|id| !id.is_empty());
            let known = self.tools.contains_key(&openai_index);
            // Some servers number every parallel call 0: a new id is a new call all the same.
            let reused = known && new_id.is_some() && self.tool_ids.get(&openai_index).map(String::as_str) != new_id;
            if let Some(id) = new_id {
                self.tool_ids.insert(openai_index, id.to_string());
            }
            if !known || reused {
                self.close(&mut out);
                let index = self.next_block;
                self.next_block += 1;
                self.tools.insert(openai_index, index);
                self.open = Some(index);
                out.push((
                    "content_block_start",
                    json!({"type": "content_block_start", "index": index, "content_block": {
                        "type": "tool_use", "id": call.get("id").cloned().unwrap_or(json!("")),
                        "name": call.pointer("/function/name").cloned().unwrap_or(json!("")), "input": {}}}),
                ));
            }
            let index = self.tools[&openai_index];
            if let Some(arguments) =
                call.pointer("/function/arguments").and_then(Value::as_str).filter(|a| !a.is_empty())
            {
                out.push((
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": arguments}}),
                ));
            }
        }
        if let Some(finish) = choice.get("finish_reason").and_then(Value::as_str) {
            self.stop_reason = Some(stop_reason(Some(finish)));
        }
        out
    }

    /// The events that close the message.
    pub fn finish(&mut self) -> Vec<(&'static str, Value)> {
        let mut out = Vec::new();
        self.start(&json!({}), &mut out);
        self.close(&mut out);
        out.push((
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": self.stop_reason.unwrap_or("end_turn"), "stop_sequence": null},
                   "usage": {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens}}),
        ));
        out.push(("message_stop", json!({"type": "message_stop"})));
        out
    }
}

/// The Messages error type an SDK maps `status` to.
pub fn error_type_for(status: u16) -> &'static str {
    match status {
        400 | 422 => "invalid_request_error",
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        504 => "timeout_error",
        529 | 503 => "overloaded_error",
        _ => "api_error",
    }
}

/// A Messages error body.
pub fn error_body(status: u16, message: &str) -> Value {
    json!({"type": "error", "error": {"type": error_type_for(status), "message": message}})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: Value) -> ChatRequest {
        ChatRequest::from_openai_json(body.to_string().as_bytes()).expect("valid")
    }

    #[test]
    fn classifies_anthropic_errors() {
        let c = |status: u16, kind: &str, message: &str| {
            classify(
                Some(status),
                json!({"type": "error", "error": {"type": kind, "message": message}}).to_string().as_bytes(),
            )
        };
        assert_eq!(c(429, "rate_limit_error", "slow down"), FailureClass::RateLimited);
        assert_eq!(c(529, "overloaded_error", "Overloaded"), FailureClass::Overloaded);
        assert_eq!(c(500, "api_error", "oops"), FailureClass::ServerError);
        assert_eq!(c(401, "authentication_error", "invalid x-api-key"), FailureClass::AuthError);
        assert_eq!(c(403, "permission_error", "no"), FailureClass::AuthError);
        assert_eq!(c(402, "billing_error", "pay"), FailureClass::QuotaExceeded);
        assert_eq!(c(400, "invalid_request_error", "Your credit balance is too low"), FailureClass::QuotaExceeded);
        assert_eq!(
            c(400, "invalid_request_error", "prompt is too long: 250000 tokens > 200000 maximum"),
            FailureClass::ContextWindowExceeded
        );
        assert_eq!(c(400, "invalid_request_error", "max_tokens: field required"), FailureClass::BadRequest);
        assert_eq!(c(404, "not_found_error", "model: x"), FailureClass::BadRequest);
        assert_eq!(c(504, "timeout_error", "timeout"), FailureClass::Timeout);
        assert_eq!(classify(Some(502), b"<html>bad gateway"), FailureClass::ServerError);
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

    #[test]
    fn stream_events_are_flagged_for_commit() {
        let mut parser = EventParser::new(true);
        let event = |data: Value| sse::Event { event: None, data: data.to_string() };
        let Parsed::Event(e) = parser.event(event(json!({"type": "message_start", "message": {}}))) else { panic!() };
        assert!(!e.content && !e.end);
        assert!(matches!(parser.event(event(json!({"type": "ping"}))), Parsed::Skip));
        let Parsed::Event(e) = parser.event(event(
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}}),
        )) else {
            panic!()
        };
        assert!(e.content);
        let Parsed::Fail(error) = parser
            .event(event(json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})))
        else {
            panic!()
        };
        assert_eq!(error.class, FailureClass::Overloaded);
        assert!(!parser.may_end());
        let Parsed::Event(e) = parser.event(event(json!({"type": "message_stop"}))) else { panic!() };
        assert!(e.end && parser.may_end());
    }

    #[test]
    fn tools_without_input_get_empty_object_arguments() {
        let mut t = ToOpenAiStream::new(false);
        let mut chunks = t.push(&json!({"type": "message_start", "message": {"id": "m", "model": "c", "usage": {}}}));
        chunks.extend(t.push(&json!({"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "tool_use", "id": "toolu_1", "name": "now", "input": {}}})));
        chunks.extend(t.push(&json!({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": ""}})));
        chunks.extend(t.push(&json!({"type": "content_block_stop", "index": 0})));
        let arguments: String = chunks
            .iter()
            .filter_map(|c| c.pointer("/choices/0/delta/tool_calls/0/function/arguments").and_then(Value::as_str))
            .collect();
        assert_eq!(arguments, "{}");
    }

    #[test]
    fn a_reused_tool_index_with_a_new_id_is_a_new_block() {
        let mut t = FromOpenAiStream::new();
        let call = |id: &str, args: &str| {
            json!({"id": "c", "model": "m", "choices": [{"index": 0, "delta": {"tool_calls": [
                {"index": 0, "id": id, "type": "function", "function": {"name": "f", "arguments": args}}]}}]})
        };
        let mut events = t.push(&call("call_a", "{}"));
        events.extend(t.push(&call("call_b", "{}")));
        events.extend(t.finish());
        let starts: Vec<&Value> = events.iter().filter(|(n, _)| *n == "content_block_start").map(|(_, d)| d).collect();
        assert_eq!(starts.len(), 2, "{events:?}");
        assert_eq!(starts[1]["content_block"]["id"], "call_b");
        assert_eq!(starts[1]["index"], 1);
    }

    #[test]
    fn thinking_commits_only_streams_whose_app_sees_it() {
        let thinking = sse::Event {
            event: None,
            data: json!({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "hmm"}}).to_string(),
        };
        let Parsed::Event(seen) = EventParser::new(true).event(thinking.clone()) else { panic!() };
        assert!(seen.content, "an Anthropic app sees thinking: it commits the stream");
        let Parsed::Event(unseen) = EventParser::new(false).event(thinking) else { panic!() };
        assert!(!unseen.content, "other apps never see it: a failure during thinking can still fall through");
    }

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
