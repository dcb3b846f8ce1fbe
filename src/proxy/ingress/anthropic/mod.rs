//! The Anthropic ingress: `POST /v1/messages`, so apps on the Anthropic SDK
//! (`ANTHROPIC_BASE_URL=http://127.0.0.1:7400`) get the same chains. Answers, streams and errors
//! are written in the Messages format, with the status codes the Anthropic SDKs map to their
//! exception classes.

pub mod answer;
pub mod parse;
pub mod stream;

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode};
use serde_json::{Value, json};

use super::Dialect;
use super::named::{FromChat, ToNamedEvents};
use crate::llm::FailureClass;
use crate::llm::status::{anthropic_error_type, status_of_class};
use crate::llm::{Api, ChatRequest, InvalidRequest, StreamEvent};
use crate::net::body::{Body, json_response};
use crate::provider::neutral::to_openai_completion;
use crate::proxy::relay::{self, StreamRenderer};

/// A complete answer as an Anthropic Messages answer.
pub fn to_anthropic_message(api: Api, answer: Value) -> Value {
    match api {
        Api::Anthropic => answer,
        other => answer::from_openai_completion(&to_openai_completion(other, &answer)),
    }
}

/// Provider events as Messages events.
pub type ToAnthropicStream = ToNamedEvents<stream::FromOpenAiStream>;

impl ToAnthropicStream {
    /// A translator for events in `api`'s format.
    pub fn new(api: Api) -> Self {
        ToNamedEvents::between(api, Api::Anthropic, stream::FromOpenAiStream::new)
    }
}

impl FromChat for stream::FromOpenAiStream {
    fn push_chunk(&mut self, chunk: &Value) -> Vec<(String, Value)> {
        self.push(chunk).into_iter().map(|(name, data)| (name.to_string(), data)).collect()
    }

    fn finish_events(&mut self) -> Vec<(String, Value)> {
        self.finish().into_iter().map(|(name, data)| (name.to_string(), data)).collect()
    }
}

/// Anthropic Messages, as apps speak it.
pub struct AnthropicDialect;

impl Dialect for AnthropicDialect {
    const API: Api = Api::Anthropic;
    type Renderer = AnthropicStream;

    fn parse(body: &[u8], headers: &HeaderMap) -> Result<ChatRequest, InvalidRequest> {
        parse::from_messages_request_with(body, headers)
    }

    fn error(status: StatusCode, message: &str, code: &str, _param: Option<&str>, extra: Value) -> Response<Body> {
        error(status, message, code, extra)
    }

    const FORWARDS_OWN_API: bool = true;

    fn complete(api: Api, answer: Value, _request: &ChatRequest) -> Value {
        to_anthropic_message(api, answer)
    }

    fn renderer(api: Api, _request: &ChatRequest) -> AnthropicStream {
        AnthropicStream { translate: ToAnthropicStream::new(api) }
    }
}

/// A Messages error. Every target overloaded answers 529, as Anthropic itself does.
pub fn error(status: StatusCode, message: &str, code: &str, extra: Value) -> Response<Body> {
    let status =
        if status == StatusCode::SERVICE_UNAVAILABLE { StatusCode::from_u16(529).unwrap_or(status) } else { status };
    let mut body = error_body(status.as_u16(), message);
    body["error"]["backstop_code"] = json!(code);
    if let (Some(error), Value::Object(extra)) = (body["error"].as_object_mut(), extra) {
        error.extend(extra);
    }
    json_response(status, &body)
}

/// Renders a committed stream as Messages events. A failure after commit sends an `error`
/// event, which the Anthropic SDKs raise.
pub struct AnthropicStream {
    translate: ToAnthropicStream,
}

impl StreamRenderer for AnthropicStream {
    fn event(&mut self, event: &StreamEvent) -> Vec<Bytes> {
        self.translate.push(event).iter().map(|(name, data)| relay::encode(Some(name), data)).collect()
    }

    fn finish(&mut self) -> Vec<Bytes> {
        self.translate.finish().iter().map(|(name, data)| relay::encode(Some(name), data)).collect()
    }

    fn failure(&mut self, message: &str, class: Option<FailureClass>) -> Bytes {
        let status = status_of_class(class.unwrap_or(FailureClass::Timeout));
        relay::encode(Some("error"), &error_body(status, message))
    }
}

/// A Messages error body.
pub fn error_body(status: u16, message: &str) -> Value {
    json!({"type": "error", "error": {"type": anthropic_error_type(status), "message": message}})
}
