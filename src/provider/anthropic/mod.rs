//! Anthropic's Messages API as an upstream: the client, with the translations to the API
//! (`to_wire`), back to the neutral shape (`from_wire`), its streams (`stream`) and its errors
//! (`error`). The Messages *ingress* (an app speaking it) lives in `proxy::ingress::anthropic`.

pub mod error;
pub mod from_wire;
pub mod stream;
pub mod to_wire;

use std::time::SystemTime;

use http::{HeaderValue, Uri};
use serde_json::Value;

use super::credentials::Credentials;
use super::http::{encode, post_json, read_json};
use super::{Call, InvalidBackend, Sent, endpoint, sse};
use crate::chain::CompiledProvider;
use crate::llm::FailureClass;
use crate::llm::outcome::message_of;
use crate::llm::ratelimit::Headroom;
use crate::llm::{Api, AttemptError, Reply};

/// The `anthropic-version` sent when the policy names none.
pub const DEFAULT_VERSION: &str = "2023-06-01";
/// `max_tokens` when neither the app nor the policy gives one (Messages requires it).
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

/// An Anthropic Messages upstream.
#[derive(Debug)]
pub struct Anthropic {
    messages: Uri,
    keys: Credentials,
    version: HeaderValue,
    default_max_tokens: u64,
}

impl Anthropic {
    /// The upstream a compiled `anthropic` provider names (`baseUrl` such as
    /// `https://api.anthropic.com`, with or without `/v1`).
    pub fn new(config: &CompiledProvider) -> Result<Self, InvalidBackend> {
        let base = config.base_url.trim_end_matches('/').trim_end_matches("/v1");
        let messages = endpoint(config, format!("{base}/v1/messages"))?;
        let keys = Credentials::new(config, "")?;
        let version = HeaderValue::from_str(config.api_version.as_deref().unwrap_or(DEFAULT_VERSION))
            .map_err(|_| InvalidBackend::HeaderValue { provider: config.name.clone(), field: "apiVersion" })?;
        Ok(Anthropic {
            messages,
            keys,
            version,
            default_max_tokens: config.default_max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        })
    }

    /// Sends one Messages request.
    pub async fn send(&self, call: Call<'_>) -> Result<Sent, AttemptError> {
        let Call { http, model, request, key, trace, adapt } = call;
        let mut body = to_wire::to_messages_request(request, model, self.default_max_tokens);
        if let (Some(adaptation), Value::Object(wire)) = (adapt, &mut body) {
            super::adapt::apply(adaptation, super::adapt::Wire::Messages, wire);
        }
        let mut headers = vec![("anthropic-version", self.version.clone())];
        headers.extend(self.keys.header("x-api-key", key));
        if let Some(origin) = request.origin.as_deref().filter(|o| o.api == Api::Anthropic) {
            headers.extend(
                origin.headers.iter().filter_map(|(name, value)| Some((*name, HeaderValue::from_str(value).ok()?))),
            );
        }
        let response =
            post_json(http, self.messages.clone(), headers, trace, encode(&body)?, request.stream, error::classify)
                .await?;
        let headroom = anthropic_headroom(response.headers());
        if request.stream {
            let thinking_shows = request.origin.as_ref().is_some_and(|o| o.api == Api::Anthropic);
            let events = sse::event_stream(response.into_body(), stream::EventParser::new(thinking_shows));
            return Ok(Sent { reply: Reply::Stream(events), headroom, api: Api::Anthropic });
        }
        let whole = read_json(response.into_body()).await?;
        let answer = whole.json();
        if answer.get("type").and_then(Value::as_str) == Some("error") {
            let error = answer.get("error").unwrap_or(&Value::Null);
            return Err(AttemptError::in_answer(error::classify_error(None, error), message_of(error)));
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
        Ok(Sent { reply: Reply::Complete(whole), headroom, api: Api::Anthropic })
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
