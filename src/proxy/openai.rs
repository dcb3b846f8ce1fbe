//! The OpenAI ingress: `POST /v1/chat/completions` and `GET /v1/models`, answered in OpenAI's
//! format with the status codes and error shapes the OpenAI SDKs map to their exceptions.

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode};
use serde_json::{Value, json};

use super::chat::{Dialect, error_type};
use super::stream::{self, StreamRenderer};
use super::{Body, json_response};
use crate::chain::PolicySnapshot;
use crate::chat::{Api, ChatRequest, InvalidRequest};
use crate::policy::FailureClass;
use crate::provider::{StreamEvent, convert, responses};

/// OpenAI Chat Completions, as apps speak it.
pub struct OpenAiDialect;

impl Dialect for OpenAiDialect {
    const API: Api = Api::OpenAi;
    type Renderer = OpenAiStream;

    fn parse(body: &[u8], _headers: &HeaderMap) -> Result<ChatRequest, InvalidRequest> {
        ChatRequest::from_openai_json(body)
    }

    fn error(status: StatusCode, message: &str, code: &str, param: Option<&str>, extra: Value) -> Response<Body> {
        let kind = match status.as_u16() {
            400 | 404 | 405 | 413 | 422 => "invalid_request_error",
            401 | 403 => "authentication_error",
            429 => "rate_limit_error",
            503 => "overloaded_error",
            504 => "timeout",
            _ => "upstream_error",
        };
        let code = if code == "invalid_request" { Value::Null } else { json!(code) };
        let mut error = json!({"message": message, "type": kind, "param": param, "code": code});
        if let (Some(error), Value::Object(extra)) = (error.as_object_mut(), extra) {
            error.extend(extra);
        }
        json_response(status, &json!({ "error": error }))
    }

    fn complete(api: Api, answer: Value, _request: &ChatRequest) -> Value {
        convert::into_openai_completion(api, answer)
    }

    fn renderer(api: Api, request: &ChatRequest) -> OpenAiStream {
        OpenAiStream { translate: convert::ToOpenAiStream::new(api, request.include_usage()) }
    }
}

/// OpenAI embeddings (`POST /v1/embeddings`): same errors, never streamed.
pub struct EmbeddingsDialect;

impl Dialect for EmbeddingsDialect {
    const API: Api = Api::OpenAi;
    type Renderer = OpenAiStream;

    fn parse(body: &[u8], _headers: &HeaderMap) -> Result<ChatRequest, InvalidRequest> {
        ChatRequest::from_openai_embeddings_json(body)
    }

    fn error(status: StatusCode, message: &str, code: &str, param: Option<&str>, extra: Value) -> Response<Body> {
        OpenAiDialect::error(status, message, code, param, extra)
    }

    fn complete(_api: Api, answer: Value, _request: &ChatRequest) -> Value {
        // Every provider that embeds answers in OpenAI's list format.
        answer
    }

    fn renderer(api: Api, request: &ChatRequest) -> OpenAiStream {
        OpenAiDialect::renderer(api, request)
    }
}

/// OpenAI Responses (`POST /v1/responses`): OpenAI's error format; answers and streams as
/// Response objects and Responses events.
pub struct ResponsesDialect;

impl Dialect for ResponsesDialect {
    const API: Api = Api::Responses;
    type Renderer = ResponsesStream;

    fn parse(body: &[u8], _headers: &HeaderMap) -> Result<ChatRequest, InvalidRequest> {
        responses::from_responses_request(body)
    }

    fn error(status: StatusCode, message: &str, code: &str, param: Option<&str>, extra: Value) -> Response<Body> {
        OpenAiDialect::error(status, message, code, param, extra)
    }

    fn complete(api: Api, answer: Value, request: &ChatRequest) -> Value {
        match api {
            Api::Responses => answer,
            other => responses::from_chat_completion(&convert::to_openai_completion(other, &answer), request),
        }
    }

    fn renderer(api: Api, request: &ChatRequest) -> ResponsesStream {
        ResponsesStream { translate: convert::ToResponsesStream::new(api, request), sequence: 0 }
    }
}

/// Renders a committed stream as Responses events. A failure after commit sends an `error`
/// event, which the OpenAI SDKs raise as `APIError`.
pub struct ResponsesStream {
    translate: convert::ToResponsesStream,
    sequence: u64,
}

impl ResponsesStream {
    fn frames(&mut self, events: Vec<(String, Value)>) -> Vec<Bytes> {
        events
            .into_iter()
            .map(|(name, data)| {
                self.sequence = data.get("sequence_number").and_then(Value::as_u64).unwrap_or(self.sequence) + 1;
                stream::encode(Some(&name), &data)
            })
            .collect()
    }
}

impl StreamRenderer for ResponsesStream {
    fn event(&mut self, event: &StreamEvent) -> Vec<Bytes> {
        let events = self.translate.push(event);
        self.frames(events)
    }

    fn finish(&mut self) -> Vec<Bytes> {
        let events = self.translate.finish();
        self.frames(events)
    }

    fn failure(&mut self, message: &str, class: Option<FailureClass>) -> Bytes {
        let kind = class.map_or("timeout", error_type);
        stream::encode(
            Some("error"),
            &json!({"type": "error", "code": "stream_interrupted", "message": message, "param": null,
                    "sequence_number": self.sequence, "error": {"type": kind, "code": "stream_interrupted", "message": message}}),
        )
    }
}

/// Renders a committed stream as OpenAI SSE: chunks, then `[DONE]`. A failure after commit
/// sends an `error` event, which the OpenAI SDKs raise as `APIError`.
pub struct OpenAiStream {
    translate: convert::ToOpenAiStream,
}

impl StreamRenderer for OpenAiStream {
    fn event(&mut self, event: &StreamEvent) -> Vec<Bytes> {
        self.translate.push(event).iter().map(|chunk| stream::encode(None, chunk)).collect()
    }

    fn finish(&mut self) -> Vec<Bytes> {
        let mut frames: Vec<Bytes> = self.translate.finish().iter().map(|chunk| stream::encode(None, chunk)).collect();
        frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
        frames
    }

    fn failure(&mut self, message: &str, class: Option<FailureClass>) -> Bytes {
        let kind = class.map_or("timeout", error_type);
        stream::encode(
            None,
            &json!({"error": {"message": message, "type": kind, "code": "stream_interrupted", "param": null}}),
        )
    }
}

/// `GET /v1/models`: the route aliases, as OpenAI's model list.
pub fn models(snapshot: Option<&PolicySnapshot>) -> Response<Body> {
    let data: Vec<Value> = snapshot
        .map(|s| s.aliases())
        .unwrap_or_default()
        .iter()
        .map(|alias| json!({"id": alias, "object": "model", "created": 0, "owned_by": "backstop"}))
        .collect();
    json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
}
