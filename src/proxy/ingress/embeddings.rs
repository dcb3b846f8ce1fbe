//! The embeddings ingress: `POST /v1/embeddings`, OpenAI's format, never streamed.

use http::{HeaderMap, Response, StatusCode};
use serde_json::Value;

use super::Dialect;
use super::openai::{OpenAiDialect, OpenAiStream};
use crate::llm::request::{Operation, json_object};
use crate::llm::{Api, ChatRequest, InvalidRequest};
use crate::net::body::Body;

/// Parses an OpenAI embeddings request body (`model`, `input`, and optional
/// `encoding_format`, `dimensions`, `user`).
pub fn parse(body: &[u8]) -> Result<ChatRequest, InvalidRequest> {
    let mut object = json_object(body)?;
    let model = match object.remove("model") {
        Some(Value::String(model)) if !model.is_empty() => model,
        _ => return Err(InvalidRequest::new("`model` must be a non-empty string", Some("model"))),
    };
    let valid_input = match object.get("input") {
        Some(Value::String(text)) => !text.is_empty(),
        Some(Value::Array(items)) => {
            !items.is_empty()
                && (items.iter().all(|i| i.as_str().is_some_and(|s| !s.is_empty()))
                    || items.iter().all(|i| i.is_u64())
                    || items.iter().all(|i| i.as_array().is_some_and(|t| !t.is_empty() && t.iter().all(Value::is_u64))))
        }
        _ => false,
    };
    if !valid_input {
        return Err(InvalidRequest::new(
            "`input` must be a non-empty string, array of strings, array of tokens or array of token arrays",
            Some("input"),
        ));
    }
    Ok(ChatRequest {
        model,
        messages: Vec::new(),
        stream: false,
        rest: object,
        origin: None,
        operation: Operation::Embeddings,
        continues: false,
    })
}

/// OpenAI embeddings (`POST /v1/embeddings`): same errors, never streamed.
pub struct EmbeddingsDialect;

impl Dialect for EmbeddingsDialect {
    const API: Api = Api::OpenAi;
    type Renderer = OpenAiStream;

    fn parse(body: &[u8], _headers: &HeaderMap) -> Result<ChatRequest, InvalidRequest> {
        parse(body)
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
