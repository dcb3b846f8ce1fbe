//! Google's Gemini API (`generateContent`, `streamGenerateContent?alt=sse`,
//! `batchEmbedContents`) as an upstream: the client, with the translations to the API
//! (`to_wire`), back to the neutral shape (`from_wire`), its streams and its errors.

pub mod error;
pub mod from_wire;
pub mod stream;
pub mod to_wire;

use http::Uri;
use serde_json::Value;

use super::credentials::Credentials;
use super::http::{encode, post_json, read_json};
use super::{Call, InvalidBackend, Sent, endpoint, sse};
use crate::chain::CompiledProvider;
use crate::llm::FailureClass;
use crate::llm::ratelimit::Headroom;
use crate::llm::{Api, AttemptError, Operation, Reply};

/// A Gemini upstream.
#[derive(Debug)]
pub struct Gemini {
    base: String,
    keys: Credentials,
}

impl Gemini {
    /// The upstream a compiled `gemini` provider names (`baseUrl` such as
    /// `https://generativelanguage.googleapis.com/v1beta`).
    pub fn new(config: &CompiledProvider) -> Result<Self, InvalidBackend> {
        let base = config.base_url.trim_end_matches('/').to_string();
        endpoint(config, format!("{base}/models/probe:generateContent"))?;
        Ok(Gemini { base, keys: Credentials::new(config, "")? })
    }

    /// Sends one `generateContent` (or streaming, or `batchEmbedContents`) request.
    pub async fn send(&self, call: Call<'_>) -> Result<Sent, AttemptError> {
        let Call { http, model, request, key, trace, adapt } = call;
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
        let mut wire =
            if embeddings { to_wire::to_embed_request(request, model) } else { to_wire::to_gemini_request(request) };
        if let (Some(adaptation), Value::Object(body), false) = (adapt, &mut wire, embeddings) {
            super::adapt::apply(adaptation, super::adapt::Wire::Gemini, body);
        }
        let headers = self.keys.header("x-goog-api-key", key);
        let response = post_json(http, uri, headers, trace, encode(&wire)?, request.stream, error::classify).await?;
        if request.stream && !embeddings {
            let events = sse::event_stream(response.into_body(), stream::EventParser::default());
            return Ok(Sent { reply: Reply::Stream(events), headroom: Headroom::default(), api: Api::Gemini });
        }
        let whole = read_json(response.into_body()).await?;
        let answer = whole.json();
        if embeddings {
            let base64 = request.rest.get("encoding_format").and_then(Value::as_str) == Some("base64");
            return match from_wire::embeddings_to_openai(answer, model, base64) {
                Some(list) => {
                    Ok(Sent { reply: Reply::Complete(list.into()), headroom: Headroom::default(), api: Api::OpenAi })
                }
                None => Err(AttemptError::new(FailureClass::ServerError, "upstream answer has no `embeddings`")),
            };
        }
        if let Some(error) = error::blocked(answer) {
            return Err(error);
        }
        Ok(Sent { reply: Reply::Complete(whole), headroom: Headroom::default(), api: Api::Gemini })
    }
}
