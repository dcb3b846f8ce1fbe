//! The embeddings ingress: `POST /v1/embeddings`, OpenAI's format, never streamed.

use http::{HeaderMap, Response, StatusCode};
use serde_json::Value;

use super::Dialect;
use super::openai::{OpenAiDialect, OpenAiStream};
use crate::llm::{Api, ChatRequest, InvalidRequest};
use crate::net::body::Body;

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
