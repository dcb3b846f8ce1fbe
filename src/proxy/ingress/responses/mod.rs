//! The Responses ingress: `POST /v1/responses`, OpenAI's error format; answers and streams as
//! Response objects and Responses events.

pub mod answer;
pub mod parse;
pub mod stream;

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode};
use serde_json::{Value, json};

use super::Dialect;
use super::named::{FromChat, ToNamedEvents};
use super::openai::OpenAiDialect;
use crate::llm::FailureClass;
use crate::llm::status::openai_error_type_of_class;
use crate::llm::{Api, ChatRequest, InvalidRequest, StreamEvent};
use crate::net::body::Body;
use crate::provider::neutral::to_openai_completion;
use crate::proxy::relay::{self, StreamRenderer};

/// Provider events as Responses events.
pub type ToResponsesStream = ToNamedEvents<stream::FromChatStream>;

impl ToResponsesStream {
    /// A translator for events in `api`'s format, answering the app's `request`.
    pub fn new(api: Api, request: &ChatRequest) -> Self {
        ToNamedEvents::between(api, Api::Responses, || stream::FromChatStream::new(request))
    }
}

impl FromChat for stream::FromChatStream {
    fn push_chunk(&mut self, chunk: &Value) -> Vec<(String, Value)> {
        self.push(chunk)
    }

    fn finish_events(&mut self) -> Vec<(String, Value)> {
        self.finish()
    }
}

/// OpenAI Responses (`POST /v1/responses`): OpenAI's error format; answers and streams as
/// Response objects and Responses events.
pub struct ResponsesDialect;

impl Dialect for ResponsesDialect {
    const API: Api = Api::Responses;
    type Renderer = ResponsesStream;

    fn parse(body: &[u8], _headers: &HeaderMap) -> Result<ChatRequest, InvalidRequest> {
        parse::from_responses_request(body)
    }

    fn error(status: StatusCode, message: &str, code: &str, param: Option<&str>, extra: Value) -> Response<Body> {
        OpenAiDialect::error(status, message, code, param, extra)
    }

    const FORWARDS_OWN_API: bool = true;

    fn complete(api: Api, answer: Value, request: &ChatRequest) -> Value {
        match api {
            Api::Responses => answer,
            other => answer::from_chat_completion(&to_openai_completion(other, &answer), request),
        }
    }

    fn renderer(api: Api, request: &ChatRequest) -> ResponsesStream {
        ResponsesStream { translate: ToResponsesStream::new(api, request), sequence: 0 }
    }
}

/// Renders a committed stream as Responses events. A failure after commit sends an `error`
/// event, which the OpenAI SDKs raise as `APIError`.
pub struct ResponsesStream {
    translate: ToResponsesStream,
    sequence: u64,
}

impl ResponsesStream {
    fn frames(&mut self, events: Vec<(String, Value)>) -> Vec<Bytes> {
        events
            .into_iter()
            .map(|(name, data)| {
                self.sequence = data.get("sequence_number").and_then(Value::as_u64).unwrap_or(self.sequence) + 1;
                relay::encode(Some(&name), &data)
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
        let kind = class.map_or("timeout", openai_error_type_of_class);
        relay::encode(
            Some("error"),
            &json!({"type": "error", "code": "stream_interrupted", "message": message, "param": null,
                    "sequence_number": self.sequence, "error": {"type": kind, "code": "stream_interrupted", "message": message}}),
        )
    }
}
