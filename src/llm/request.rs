//! The provider-neutral chat request every ingress parses into and every provider translates.
//!
//! OpenAI's Chat Completions shape is the lingua franca: it is what most SDKs and
//! OpenAI-compatible servers speak, and every other API maps onto it. Only the fields the
//! sidecar reads are typed; everything else rides in `rest` and reaches a provider of the same
//! API untouched.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::Api;

/// The request as the app sent it, when it came in another API than the neutral one: a
/// provider of that same API sends it on untouched but for `model`.
#[derive(Clone, Debug, PartialEq)]
pub struct Origin {
    /// The ingress API.
    pub api: Api,
    /// The body as received.
    pub body: Map<String, Value>,
    /// Fields of it that only a provider of the same API can honour (a provider of another
    /// API is not eligible for the request).
    pub unportable: Vec<String>,
    /// Request headers a provider of the same API is sent too (such as `anthropic-beta`,
    /// which turns on features the body relies on).
    pub headers: Vec<(&'static str, String)>,
}

/// What a request asks the model for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Operation {
    /// A chat completion (Chat Completions, Messages, `generateContent`).
    #[default]
    Chat,
    /// Embeddings of `input` (`/v1/embeddings`); `messages` is empty.
    Embeddings,
}

impl Origin {
    /// Why a provider of another API (named `target`) cannot serve this request, if it cannot.
    pub fn unportable_reason(&self, target: &str) -> Option<String> {
        let field = self.unportable.first()?;
        Some(if field == STATEFUL {
            "a stateful Responses request (`store` is not false, or it names a `previous_response_id`, \
             `conversation` or `background`) keeps state at OpenAI, so only an `openai` target can serve it"
                .to_string()
        } else {
            format!("`{field}` from the {} request has no {target} equivalent", self.api.as_str())
        })
    }
}

/// The `unportable` entry of a Responses request that keeps state at OpenAI.
pub const STATEFUL: &str = "store";

/// A parsed, validated chat request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    /// The model alias the app asked for; picks the route.
    pub model: String,
    /// The conversation so far.
    pub messages: Vec<Message>,
    /// Whether the app asked for a server-sent-event stream.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stream: bool,
    /// Every other field, in OpenAI's names: passed through as the app sent it when it spoke
    /// OpenAI, or translated from the ingress API.
    #[serde(flatten)]
    pub rest: Map<String, Value>,
    /// The original request, when the app spoke another API.
    #[serde(skip)]
    pub origin: Option<std::sync::Arc<Origin>>,
    /// Chat or embeddings.
    #[serde(skip)]
    pub operation: Operation,
    /// The last message is an assistant answer another target began, which the model is to
    /// continue rather than answer (`midStream: continue`).
    #[serde(skip)]
    pub continues: bool,
}

/// One message of the conversation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    pub role: String,
    /// Text, an array of content parts, or null (an assistant turn with only tool calls).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<Value>,
    /// Every other field (`name`, `tool_calls`, `tool_call_id`, ...), passed through.
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

/// Chat Completions parameters the other chat APIs (Messages, Gemini) can carry, or that
/// change nothing an app would notice when dropped. Any other parameter makes a target of
/// another API ineligible; whether a given *value* can be expressed is each API's own check.
pub const PORTABLE_PARAMETERS: &[&str] = &[
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

/// A message content part no API but OpenAI's can carry, named for an ineligibility reason.
pub fn other_part(part: &Value) -> Option<String> {
    Some(format!("message content of type `{}`", part.get("type").and_then(Value::as_str).unwrap_or("unknown")))
}

/// Why a request body is not a chat request; the message is shown to the app.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{message}")]
pub struct InvalidRequest {
    /// What is wrong, naming the field.
    pub message: String,
    /// The offending top-level field, when there is one (OpenAI's `param`).
    pub param: Option<&'static str>,
}

impl InvalidRequest {
    /// What is wrong with the request, naming `param` if one field is at fault.
    pub fn new(message: impl Into<String>, param: Option<&'static str>) -> Self {
        InvalidRequest { message: message.into(), param }
    }
}

/// A request body as a JSON object, or why it is not one: the first step of every ingress
/// parser.
pub fn json_object(body: &[u8]) -> Result<Map<String, Value>, InvalidRequest> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(InvalidRequest::new("request body must be a JSON object", None)),
        Err(e) => Err(InvalidRequest::new(format!("request body is not valid JSON: {e}"), None)),
    }
}

impl ChatRequest {
    /// The texts to embed, when `input` is text rather than tokens.
    pub fn input_texts(&self) -> Option<Vec<&str>> {
        match self.rest.get("input")? {
            Value::String(text) => Some(vec![text.as_str()]),
            Value::Array(items) => items.iter().map(Value::as_str).collect(),
            _ => None,
        }
    }

    /// Whether the request uses `feature`.
    pub fn uses(&self, feature: crate::llm::RequestFeature) -> bool {
        use crate::llm::RequestFeature;
        match feature {
            RequestFeature::Tools => self.rest.get("tools").and_then(Value::as_array).is_some_and(|t| !t.is_empty()),
            RequestFeature::Images => self.messages.iter().any(|m| {
                m.content.as_ref().and_then(Value::as_array).is_some_and(|parts| {
                    parts.iter().any(|p| p.get("type").and_then(Value::as_str) == Some("image_url"))
                })
            }),
            RequestFeature::StructuredOutput => matches!(
                self.rest.get("response_format").and_then(|f| f.get("type")).and_then(Value::as_str),
                Some("json_object" | "json_schema")
            ),
        }
    }

    /// The first thing in this request a target API named `api` cannot express, if any: a
    /// parameter outside [`PORTABLE_PARAMETERS`], a value that `refuses` names (such as "`n`
    /// above 1"), or a message content part that `part` refuses.
    pub fn inexpressible(
        &self,
        api: &str,
        refuses: impl Fn(&str, &Value) -> Option<&'static str>,
        part: impl Fn(&Value) -> Option<String>,
    ) -> Option<String> {
        for (name, value) in &self.rest {
            if !PORTABLE_PARAMETERS.contains(&name.as_str()) {
                return Some(format!("`{name}` has no {api} equivalent"));
            }
            if let Some(problem) = refuses(name, value) {
                return Some(format!("{problem} cannot be expressed in a {api} request"));
            }
        }
        self.messages.iter().filter_map(|m| m.content.as_ref()?.as_array()).flatten().find_map(part)
    }

    /// OpenAI's `stop` (one string or several) as a list, if any.
    pub fn stop_sequences(&self) -> Option<Value> {
        match self.rest.get("stop") {
            Some(Value::String(stop)) => Some(Value::Array(vec![Value::from(stop.as_str())])),
            Some(Value::Array(stops)) if !stops.is_empty() => Some(Value::Array(stops.clone())),
            _ => None,
        }
    }

    /// Whether the app asked for a usage chunk at the end of a stream.
    pub fn include_usage(&self) -> bool {
        self.rest.get("stream_options").and_then(|o| o.get("include_usage")).and_then(Value::as_bool).unwrap_or(false)
    }

    /// A rough prompt size in tokens (four characters a token), for providers that must
    /// report usage without a tokenizer.
    pub fn estimated_prompt_tokens(&self) -> u64 {
        let chars: usize = self
            .messages
            .iter()
            .map(|m| match &m.content {
                Some(Value::String(s)) => s.len(),
                Some(other) => other.to_string().len(),
                None => 0,
            })
            .sum();
        (chars as u64).div_ceil(4).max(1)
    }
}
