//! The Anthropic ingress: `POST /v1/messages`, so apps on the Anthropic SDK
//! (`ANTHROPIC_BASE_URL=http://127.0.0.1:7400`) get the same chains. Answers, streams and errors
//! are written in the Messages format, with the status codes the Anthropic SDKs map to their
//! exception classes.

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode};
use serde_json::{Value, json};

use super::chat::Dialect;
use super::stream::{self, StreamRenderer};
use super::{Body, json_response};
use crate::chat::{Api, ChatRequest, InvalidRequest};
use crate::policy::FailureClass;
use crate::provider::anthropic::{self, error_type_for};
use crate::provider::{StreamEvent, convert};

/// Anthropic Messages, as apps speak it.
pub struct AnthropicDialect;

impl Dialect for AnthropicDialect {
    const API: Api = Api::Anthropic;
    type Renderer = AnthropicStream;

    fn parse(body: &[u8], headers: &HeaderMap) -> Result<ChatRequest, InvalidRequest> {
        anthropic::from_messages_request_with(body, headers)
    }

    fn error(status: StatusCode, message: &str, code: &str, _param: Option<&str>, extra: Value) -> Response<Body> {
        error(status, message, code, extra)
    }

    fn complete(api: Api, answer: Value, _request: &ChatRequest) -> Value {
        convert::to_anthropic_message(api, answer)
    }

    fn renderer(api: Api, _request: &ChatRequest) -> AnthropicStream {
        AnthropicStream { translate: convert::ToAnthropicStream::new(api) }
    }
}

/// A Messages error. Every target overloaded answers 529, as Anthropic itself does.
pub fn error(status: StatusCode, message: &str, code: &str, extra: Value) -> Response<Body> {
    let status = if status == StatusCode::SERVICE_UNAVAILABLE && code != "no_policy" {
        StatusCode::from_u16(529).unwrap_or(status)
    } else {
        status
    };
    let mut body = anthropic::error_body(status.as_u16(), message);
    body["error"]["backstop_code"] = json!(code);
    if let (Some(error), Value::Object(extra)) = (body["error"].as_object_mut(), extra) {
        error.extend(extra);
    }
    json_response(status, &body)
}

/// Renders a committed stream as Messages events. A failure after commit sends an `error`
/// event, which the Anthropic SDKs raise.
pub struct AnthropicStream {
    translate: convert::ToAnthropicStream,
}

impl StreamRenderer for AnthropicStream {
    fn event(&mut self, event: &StreamEvent) -> Vec<Bytes> {
        self.translate.push(event).iter().map(|(name, data)| stream::encode(Some(name), data)).collect()
    }

    fn finish(&mut self) -> Vec<Bytes> {
        self.translate.finish().iter().map(|(name, data)| stream::encode(Some(name), data)).collect()
    }

    fn failure(&mut self, message: &str, class: Option<FailureClass>) -> Bytes {
        let status = match class {
            Some(FailureClass::RateLimited) => 429,
            Some(FailureClass::Overloaded) => 529,
            None | Some(FailureClass::Timeout) => 504,
            _ => 500,
        };
        stream::encode(
            Some("error"),
            &json!({"type": "error", "error": {"type": error_type_for(status), "message": message}}),
        )
    }
}
