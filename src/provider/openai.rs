//! OpenAI's Chat Completions API, spoken by OpenAI itself and by every OpenAI-compatible server
//! (vLLM, Ollama, Together, Groq ...). The neutral shape is this API's, so requests and answers
//! pass through untouched but for `model`.

use http::{HeaderValue, Uri};
use serde_json::Value;

use super::azure::Deployments;
use super::sse::{self, Parsed, WireStream};
use super::{
    Api, ApiKey, AttemptError, Credentials, Headroom, HttpClient, Reply, Sent, StreamEvent, classify_openai_error,
    encode, post_json, read_json, responses,
};
use crate::chat::{ChatRequest, Operation};
use crate::policy::{FailureClass, ProviderKind};

/// OpenAI's own API.
pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";

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
}

impl OpenAi {
    /// An upstream at `base_url` (such as `https://api.openai.com/v1`) with these keys.
    pub fn new(kind: ProviderKind, base_url: &str, api_keys: Vec<ApiKey>) -> Result<Self, String> {
        let completions = format!("{}/chat/completions", base_url.trim_end_matches('/'));
        let completions: Uri = completions.parse().map_err(|e| format!("not a valid URL: {e}"))?;
        match completions.scheme_str() {
            Some("http" | "https") => {}
            _ => return Err("must start with http:// or https://".to_string()),
        }
        if completions.host().is_none() {
            return Err("has no host".to_string());
        }
        let embeddings: Uri = format!("{}/embeddings", base_url.trim_end_matches('/'))
            .parse()
            .map_err(|e| format!("not a valid URL: {e}"))?;
        let responses: Uri = format!("{}/responses", base_url.trim_end_matches('/'))
            .parse()
            .map_err(|e| format!("not a valid URL: {e}"))?;
        let keys = Credentials::new(&api_keys, "Bearer ")?;
        Ok(OpenAi { kind, endpoint: Endpoint::Fixed { completions, embeddings, responses }, keys })
    }

    /// An Azure OpenAI resource at `base_url`, with `api-key` credentials.
    pub fn azure(base_url: &str, api_keys: Vec<ApiKey>, api_version: Option<&str>) -> Result<Self, String> {
        let deployments = Deployments::new(base_url, api_version)?;
        let keys = Credentials::new(&api_keys, "")?;
        Ok(OpenAi { kind: ProviderKind::AzureOpenAi, endpoint: Endpoint::Azure(deployments), keys })
    }

    /// Keys balanced across (keyless counts as one).
    pub fn key_count(&self) -> usize {
        self.keys.count()
    }

    /// Endpoint identity for health state: URL and key fingerprint.
    pub fn endpoint_id(&self, key: usize) -> String {
        let url = match &self.endpoint {
            Endpoint::Fixed { completions, .. } => completions.to_string(),
            Endpoint::Azure(d) => d.base().to_string(),
        };
        self.keys.identity(&format!("{}:{url}", self.kind.as_str()), key)
    }

    /// Sends one Chat Completions request.
    pub async fn send(
        &self,
        http: &HttpClient,
        model: &str,
        request: &ChatRequest,
        key: usize,
    ) -> Result<Sent, AttemptError> {
        let body = request
            .to_openai_json(model)
            .map_err(|e| AttemptError::new(FailureClass::BadRequest, format!("cannot encode request: {e}")))?;
        if let (Some(origin), Endpoint::Fixed { responses, .. }) = (&request.origin, &self.endpoint)
            && origin.api == Api::Responses
            && self.kind == ProviderKind::OpenAi
        {
            return self.send_responses(http, responses.clone(), model, request, key).await;
        }
        let embeddings = request.operation == Operation::Embeddings;
        let uri = match (&self.endpoint, embeddings) {
            (Endpoint::Fixed { completions, .. }, false) => completions.clone(),
            (Endpoint::Fixed { embeddings, .. }, true) => embeddings.clone(),
            (Endpoint::Azure(deployments), false) => {
                deployments.completions(model).map_err(|e| AttemptError::new(FailureClass::BadRequest, e))?
            }
            (Endpoint::Azure(deployments), true) => {
                deployments.embeddings(model).map_err(|e| AttemptError::new(FailureClass::BadRequest, e))?
            }
        };
        let response = post_json(http, uri, &self.credential(key), body, request.stream, classify_openai_error).await?;
        let headroom = Headroom::from_headers(response.headers());
        if request.stream {
            return Ok(Sent {
                reply: Reply::Stream(sse::event_stream(response.into_body(), ChunkParser::default())),
                headroom,
                api: Api::OpenAi,
            });
        }
        let answer = read_json(response.into_body()).await?;
        if let Some(error) = answer.get("error").filter(|e| e.is_object()) {
            return Err(AttemptError::from_stream_error(error));
        }
        if embeddings {
            if !answer.get("data").is_some_and(Value::is_array) {
                return Err(AttemptError::new(FailureClass::ServerError, "upstream answer has no `data`"));
            }
            return Ok(Sent { reply: Reply::Complete(answer), headroom, api: Api::OpenAi });
        }
        if !answer.get("choices").is_some_and(Value::is_array) {
            return Err(AttemptError::new(FailureClass::ServerError, "upstream answer has no `choices`"));
        }
        if filtered_without_content(&answer) {
            return Err(AttemptError::new(
                FailureClass::ContentFiltered,
                "the provider's content filter withheld the answer",
            ));
        }
        Ok(Sent { reply: Reply::Complete(answer), headroom, api: Api::OpenAi })
    }
}

impl OpenAi {
    /// The credential header for key `key`: `Authorization: Bearer` or Azure's `api-key`.
    fn credential(&self, key: usize) -> Vec<(&'static str, HeaderValue)> {
        let name = if matches!(self.endpoint, Endpoint::Azure(_)) { "api-key" } else { "authorization" };
        self.keys.header(name, key)
    }

    /// Whether this provider takes Responses requests as they are (OpenAI itself).
    pub fn speaks_responses(&self) -> bool {
        self.kind == ProviderKind::OpenAi && matches!(self.endpoint, Endpoint::Fixed { .. })
    }

    /// Sends the app's own Responses request, `model` replaced: state, tools and every field
    /// stay as OpenAI means them.
    async fn send_responses(
        &self,
        http: &HttpClient,
        uri: Uri,
        model: &str,
        request: &ChatRequest,
        key: usize,
    ) -> Result<Sent, AttemptError> {
        let mut body = request.origin.as_deref().map(|o| o.body.clone()).unwrap_or_default();
        body.insert("model".into(), Value::String(model.to_string()));
        let response =
            post_json(http, uri, &self.credential(key), encode(&body)?, request.stream, classify_openai_error).await?;
        let headroom = Headroom::from_headers(response.headers());
        if request.stream {
            let events = sse::event_stream(response.into_body(), responses::EventParser::default());
            return Ok(Sent { reply: Reply::Stream(events), headroom, api: Api::Responses });
        }
        let answer = read_json(response.into_body()).await?;
        if answer.get("status").and_then(Value::as_str) == Some("failed") {
            return Err(AttemptError::from_stream_error(answer.get("error").unwrap_or(&Value::Null)));
        }
        if !answer.get("output").is_some_and(Value::is_array) {
            return Err(AttemptError::new(FailureClass::ServerError, "upstream answer has no `output`"));
        }
        Ok(Sent { reply: Reply::Complete(answer), headroom, api: Api::Responses })
    }
}

/// Reads Chat Completions chunks: `[DONE]` ends the stream; an end without it is clean only
/// once a `finish_reason` has come.
#[derive(Debug, Default)]
pub struct ChunkParser {
    finished: bool,
}

impl WireStream for ChunkParser {
    fn event(&mut self, event: sse::Event) -> Parsed {
        if event.data.trim() == "[DONE]" {
            return Parsed::End;
        }
        match parse_chunk(&event.data) {
            Ok(chunk) => {
                let event = chunk_event(chunk);
                self.finished |= event.end;
                Parsed::Event(event)
            }
            Err(error) => Parsed::Fail(error),
        }
    }

    fn may_end(&self) -> bool {
        self.finished
    }
}

fn parse_chunk(data: &str) -> Result<Value, AttemptError> {
    let chunk = sse::json_data(data)?;
    if let Some(error) = chunk.get("error").filter(|e| e.is_object()) {
        return Err(AttemptError::from_stream_error(error));
    }
    if !chunk.is_object() {
        return Err(AttemptError::new(FailureClass::ServerError, "stream event is not a JSON object"));
    }
    Ok(chunk)
}

fn has_finish_reason(chunk: &Value) -> bool {
    chunk
        .get("choices")
        .and_then(Value::as_array)
        .is_some_and(|choices| choices.iter().any(|c| c.get("finish_reason").is_some_and(|r| !r.is_null())))
}

/// Why a Chat Completions target cannot serve `request` faithfully, if it cannot: only fields
/// of a request that came in another API can be missing here.
pub fn unsupported(request: &ChatRequest) -> Option<String> {
    request.origin.as_ref()?.unportable_reason("Chat Completions")
}

/// A Chat Completions chunk as a stream event.
pub fn chunk_event(chunk: Value) -> StreamEvent {
    StreamEvent { content: carries_content(&chunk), end: has_finish_reason(&chunk), data: chunk }
}

/// A `content_filter` finish with nothing to show (Azure's output filter, for one): a failure
/// `onContentFiltered` can act on rather than an empty answer.
fn filtered_without_content(answer: &Value) -> bool {
    let choices = answer.get("choices").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    !choices.is_empty()
        && choices.iter().all(|c| c.get("finish_reason").and_then(Value::as_str) == Some("content_filter"))
        && !completion_has_content(answer)
}

/// Whether a chunk's delta has text, a refusal or a tool call (a finish alone does not count).
pub fn carries_content(chunk: &Value) -> bool {
    chunk
        .get("choices")
        .and_then(Value::as_array)
        .is_some_and(|choices| choices.iter().any(|choice| choice.get("delta").is_some_and(message_has_content)))
}

/// Whether a complete answer has text, a refusal or a tool call in any choice.
pub fn completion_has_content(answer: &Value) -> bool {
    answer
        .get("choices")
        .and_then(Value::as_array)
        .is_some_and(|choices| choices.iter().any(|choice| choice.get("message").is_some_and(message_has_content)))
}

fn message_has_content(message: &Value) -> bool {
    let text = |name: &str| message.get(name).and_then(Value::as_str).is_some_and(|s| !s.is_empty());
    text("content")
        || text("refusal")
        || message.get("tool_calls").is_some_and(|t| t.as_array().is_some_and(|a| !a.is_empty()))
        || message.get("function_call").is_some_and(Value::is_object)
        || message.get("content").is_some_and(|c| c.as_array().is_some_and(|a| !a.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn content_chunks_are_recognised() {
        // A chunk commits a held stream when it carries content or ends the answer.
        let commits = |chunk: Value| {
            let event = chunk_event(chunk);
            event.content || event.end
        };
        assert!(!commits(json!({"choices": [{"delta": {"role": "assistant", "content": ""}}]})));
        assert!(commits(json!({"choices": [{"delta": {"content": "Hi"}}]})));
        assert!(commits(json!({"choices": [{"delta": {"tool_calls": [{"index": 0}]}}]})));
        assert!(commits(json!({"choices": [{"delta": {}, "finish_reason": "stop"}]})));
        assert!(!commits(json!({"choices": [], "usage": {"total_tokens": 3}})));
    }

    #[test]
    fn rejects_base_urls_that_cannot_work() {
        assert!(OpenAi::new(ProviderKind::OpenAi, DEFAULT_BASE_URL, vec![]).is_ok());
        assert!(OpenAi::new(ProviderKind::OpenAiCompatible, "ftp://x/v1", vec![]).is_err());
        assert!(OpenAi::new(ProviderKind::OpenAiCompatible, "not a url", vec![]).is_err());
        assert!(OpenAi::new(ProviderKind::OpenAi, DEFAULT_BASE_URL, vec![ApiKey::new("bad\nkey")]).is_err());
    }

    #[test]
    fn in_stream_errors_and_garbage_fail_the_chunk() {
        assert_eq!(
            parse_chunk(r#"{"error":{"message":"x","type":"rate_limit_error"}}"#).expect_err("error").class,
            FailureClass::RateLimited
        );
        assert_eq!(parse_chunk("not json").expect_err("garbage").class, FailureClass::ServerError);
        assert!(parse_chunk(r#"{"choices":[]}"#).is_ok());
    }
}
