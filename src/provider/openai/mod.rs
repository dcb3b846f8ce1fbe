//! OpenAI's Chat Completions API, spoken by OpenAI itself, by every OpenAI-compatible server
//! (vLLM, Ollama, Together, Groq ...) and by Azure OpenAI at its deployment URLs. The neutral
//! shape is this API's, so requests and answers pass through untouched but for `model`.

pub mod azure;
pub mod content;
pub mod error;
pub mod responses;
pub mod stream;
pub mod to_wire;

use http::{HeaderValue, Uri};
use serde_json::Value;

use super::credentials::Credentials;
use super::http::{decode_answer, encode, post_json, read_body, read_json};
use super::{Call, InvalidBackend, Sent, endpoint, sse};
use crate::chain::CompiledProvider;
use crate::llm::ratelimit::Headroom;
use crate::llm::view::ChatView;
use crate::llm::{Api, AttemptError, ChatRequest, Operation, Reply, Whole};
use crate::policy::{Continuation, ProviderKind};

use crate::llm::FailureClass;
use azure::Deployments;

/// Where requests go. One per provider, built at reload: its size does not matter.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
enum Endpoint {
    /// One URL per operation for every model: OpenAI and OpenAI-compatible servers.
    Fixed { completions: Uri, embeddings: Uri, responses: Uri },
    /// A URL per deployment: Azure OpenAI.
    Azure(Deployments),
}

/// An OpenAI-compatible upstream.
#[derive(Debug)]
pub struct OpenAi {
    kind: ProviderKind,
    endpoint: Endpoint,
    /// One credential per key; none for keyless endpoints.
    keys: Credentials,
    /// It continues a final assistant message when told `continue_final_message`.
    continue_final_message: bool,
}

impl OpenAi {
    /// The upstream a compiled `openai`, `openai-compatible` or `azure-openai` provider names.
    pub fn new(config: &CompiledProvider) -> Result<Self, InvalidBackend> {
        let base = config.base_url.trim_end_matches('/');
        if config.kind == ProviderKind::AzureOpenAi {
            let deployments = Deployments::new(config)?;
            let keys = Credentials::new(config, "")?;
            return Ok(OpenAi {
                kind: config.kind,
                endpoint: Endpoint::Azure(deployments),
                keys,
                continue_final_message: false,
            });
        }
        let completions = endpoint(config, format!("{base}/chat/completions"))?;
        let embeddings = endpoint(config, format!("{base}/embeddings"))?;
        let responses = endpoint(config, format!("{base}/responses"))?;
        let keys = Credentials::new(config, "Bearer ")?;
        Ok(OpenAi {
            kind: config.kind,
            endpoint: Endpoint::Fixed { completions, embeddings, responses },
            keys,
            continue_final_message: config.continuation == Some(Continuation::ContinueFinalMessage),
        })
    }

    /// Sends one Chat Completions (or embeddings, or Responses) request.
    pub async fn send(&self, call: Call<'_>) -> Result<Sent, AttemptError> {
        let Call { http, model, request, key, trace, adapt } = call;
        if let (Some(origin), Endpoint::Fixed { responses, .. }) = (&request.origin, &self.endpoint)
            && origin.api == Api::Responses
            && self.kind == ProviderKind::OpenAi
        {
            return self.send_responses(call, responses.clone()).await;
        }
        // OpenAI and Azure report a stream's usage when asked; other OpenAI-compatible servers
        // may refuse the option, so they are sent the app's request as it is.
        let usage = matches!(self.kind, ProviderKind::OpenAi | ProviderKind::AzureOpenAi);
        let embeddings = request.operation == Operation::Embeddings;
        let cannot_encode =
            |e: serde_json::Error| AttemptError::new(FailureClass::BadRequest, format!("cannot encode request: {e}"));
        let continue_final = request.continues && self.continue_final_message;
        let body = match adapt.filter(|_| !embeddings) {
            None if !continue_final => to_wire::encode_with(request, model, usage).map_err(cannot_encode)?,
            adaptation => {
                let mut wire = to_wire::encode_object(request, model, usage).map_err(cannot_encode)?;
                if let Some(adaptation) = adaptation {
                    let completion_tokens = matches!(self.kind, ProviderKind::OpenAi | ProviderKind::AzureOpenAi);
                    super::adapt::apply(adaptation, super::adapt::Wire::Chat { completion_tokens }, &mut wire);
                }
                if continue_final {
                    // vLLM's and SGLang's chat template options: continue the final assistant
                    // message instead of opening a new turn after it.
                    wire.insert("continue_final_message".into(), Value::Bool(true));
                    wire.insert("add_generation_prompt".into(), Value::Bool(false));
                }
                encode(&wire)?
            }
        };
        let uri = match (&self.endpoint, embeddings) {
            (Endpoint::Fixed { completions, .. }, false) => completions.clone(),
            (Endpoint::Fixed { embeddings, .. }, true) => embeddings.clone(),
            (Endpoint::Azure(deployments), false) => deployments.completions(model)?,
            (Endpoint::Azure(deployments), true) => deployments.embeddings(model)?,
        };
        let response = post_json(http, uri, self.credential(key), trace, body, request.stream, error::classify).await?;
        let headroom = Headroom::from_headers(response.headers());
        if request.stream {
            return Ok(Sent {
                reply: Reply::Stream(sse::event_stream(response.into_body(), stream::ChunkParser::default())),
                headroom,
                api: Api::OpenAi,
            });
        }
        let raw = read_body(response.into_body()).await?;
        // The usual chat answer, checked in place and passed on undecoded.
        let view = if embeddings { None } else { ChatView::read_bytes(&raw) };
        match view.filter(|view| view.choices.is_some()) {
            Some(view) if view.filtered_without_content() => return Err(filtered()),
            Some(_) => return Ok(Sent { reply: Reply::Complete(Whole::undecoded(raw)), headroom, api: Api::OpenAi }),
            None => {}
        }
        let whole = decode_answer(raw)?;
        let answer = whole.json();
        if let Some(error) = answer.get("error").filter(|e| e.is_object()) {
            return Err(error::in_answer(error));
        }
        if embeddings {
            if !answer.get("data").is_some_and(Value::is_array) {
                return Err(AttemptError::new(FailureClass::ServerError, "upstream answer has no `data`"));
            }
            return Ok(Sent { reply: Reply::Complete(whole), headroom, api: Api::OpenAi });
        }
        if !answer.get("choices").is_some_and(Value::is_array) {
            return Err(AttemptError::new(FailureClass::ServerError, "upstream answer has no `choices`"));
        }
        if content::filtered_without_content(answer) {
            return Err(filtered());
        }
        Ok(Sent { reply: Reply::Complete(whole), headroom, api: Api::OpenAi })
    }

    /// The credential header for key `key`: `Authorization: Bearer` or Azure's `api-key`.
    fn credential(&self, key: usize) -> Option<(&'static str, HeaderValue)> {
        let name = if matches!(self.endpoint, Endpoint::Azure(_)) { "api-key" } else { "authorization" };
        self.keys.header(name, key)
    }

    /// Whether this provider takes Responses requests as they are (OpenAI itself).
    pub fn speaks_responses(&self) -> bool {
        self.kind == ProviderKind::OpenAi && matches!(self.endpoint, Endpoint::Fixed { .. })
    }

    /// Sends the app's own Responses request, `model` replaced: state, tools and every field
    /// stay as OpenAI means them.
    async fn send_responses(&self, call: Call<'_>, uri: Uri) -> Result<Sent, AttemptError> {
        let Call { http, model, request, key, trace, adapt } = call;
        let mut body = request.origin.as_deref().map(|o| o.body.clone()).unwrap_or_default();
        body.insert("model".into(), Value::String(model.to_string()));
        if let Some(adaptation) = adapt {
            super::adapt::apply(adaptation, super::adapt::Wire::Responses, &mut body);
        }
        let response =
            post_json(http, uri, self.credential(key), trace, encode(&body)?, request.stream, error::classify).await?;
        let headroom = Headroom::from_headers(response.headers());
        if request.stream {
            let events = sse::event_stream(response.into_body(), responses::EventParser::default());
            return Ok(Sent { reply: Reply::Stream(events), headroom, api: Api::Responses });
        }
        let whole = read_json(response.into_body()).await?;
        let answer = whole.json();
        if answer.get("status").and_then(Value::as_str) == Some("failed") {
            return Err(error::in_answer(answer.get("error").unwrap_or(&Value::Null)));
        }
        if !answer.get("output").is_some_and(Value::is_array) {
            return Err(AttemptError::new(FailureClass::ServerError, "upstream answer has no `output`"));
        }
        Ok(Sent { reply: Reply::Complete(whole), headroom, api: Api::Responses })
    }
}

/// A chat answer the provider's content filter withheld.
fn filtered() -> AttemptError {
    AttemptError::new(FailureClass::ContentFiltered, "the provider's content filter withheld the answer")
}

/// Why a Chat Completions target cannot serve `request` faithfully, if it cannot: only fields
/// of a request that came in another API can be missing here.
pub fn unsupported(request: &ChatRequest) -> Option<String> {
    request.origin.as_ref()?.unportable_reason("Chat Completions")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::ApiKey;

    fn config(kind: ProviderKind, base_url: &str, keys: &[&str]) -> CompiledProvider {
        CompiledProvider {
            name: "p".into(),
            kind,
            base_url: base_url.into(),
            api_keys: keys.iter().map(|k| ApiKey::new(*k)).collect(),
            ..CompiledProvider::default()
        }
    }

    #[test]
    fn refuses_configs_that_cannot_work() {
        assert!(OpenAi::new(&config(ProviderKind::OpenAi, "https://api.openai.com/v1", &["sk"])).is_ok());
        assert!(OpenAi::new(&config(ProviderKind::OpenAiCompatible, "ftp://x/v1", &[])).is_err());
        assert!(OpenAi::new(&config(ProviderKind::OpenAiCompatible, "not a url", &[])).is_err());
        let bad_key = OpenAi::new(&config(ProviderKind::OpenAi, "https://api.openai.com/v1", &["bad\nkey"]));
        assert!(matches!(bad_key, Err(InvalidBackend::HeaderValue { field: "apiKey", .. })), "{bad_key:?}");
    }
}
