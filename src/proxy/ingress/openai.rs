//! The OpenAI ingress: `POST /v1/chat/completions` and `GET /v1/models`, answered in OpenAI's
//! format with the status codes and error shapes the OpenAI SDKs map to their exceptions.

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode};
use serde_json::{Value, json};

use super::Dialect;
use crate::llm::FailureClass;
use crate::llm::request::{Message, Operation, json_object};
use crate::llm::status::{openai_error_type, openai_error_type_of_class};
use crate::llm::{Api, ChatRequest, InvalidRequest, StreamEvent};
use crate::net::body::{Body, json_response};
use crate::provider::neutral::{self, Chunk};
use crate::proxy::relay::{self, StreamRenderer};
use crate::snapshot::PolicySnapshot;

/// Parses an OpenAI Chat Completions request body, rejecting what no provider would take.
pub fn parse_chat(body: &[u8]) -> Result<ChatRequest, InvalidRequest> {
    let mut object = json_object(body)?;
    let model = match object.remove("model") {
        Some(Value::String(model)) if !model.is_empty() => model,
        Some(Value::String(_)) => {
            return Err(InvalidRequest::new("`model` must not be empty", Some("model")));
        }
        Some(_) => {
            return Err(InvalidRequest::new("`model` must be a string", Some("model")));
        }
        None => {
            return Err(InvalidRequest::new("you must provide a model parameter (`model` is missing)", Some("model")));
        }
    };
    let messages = match object.remove("messages") {
        Some(Value::Array(items)) if !items.is_empty() => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| {
                serde_json::from_value::<Message>(item)
                    .map_err(|e| InvalidRequest::new(format!("`messages[{i}]` is invalid: {e}"), Some("messages")))
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(Value::Array(_)) => {
            return Err(InvalidRequest::new("`messages` must not be empty", Some("messages")));
        }
        Some(_) => {
            return Err(InvalidRequest::new("`messages` must be an array", Some("messages")));
        }
        None => {
            return Err(InvalidRequest::new("`messages` is missing", Some("messages")));
        }
    };
    let stream = match object.remove("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(stream)) => stream,
        Some(_) => {
            return Err(InvalidRequest::new("`stream` must be a boolean", Some("stream")));
        }
    };
    Ok(ChatRequest {
        model,
        messages,
        stream,
        rest: object,
        origin: None,
        operation: Operation::Chat,
        continues: false,
    })
}

/// OpenAI Chat Completions, as apps speak it.
pub struct OpenAiDialect;

impl Dialect for OpenAiDialect {
    const API: Api = Api::OpenAi;
    type Renderer = OpenAiStream;

    fn parse(body: &[u8], _headers: &HeaderMap) -> Result<ChatRequest, InvalidRequest> {
        parse_chat(body)
    }

    fn error(status: StatusCode, message: &str, code: &str, param: Option<&str>, extra: Value) -> Response<Body> {
        let kind = openai_error_type(status.as_u16());
        let code = if code == "invalid_request" { Value::Null } else { json!(code) };
        let mut error = json!({"message": message, "type": kind, "param": param, "code": code});
        if let (Some(error), Value::Object(extra)) = (error.as_object_mut(), extra) {
            error.extend(extra);
        }
        json_response(status, &json!({ "error": error }))
    }

    const FORWARDS_OWN_API: bool = true;

    fn complete(api: Api, answer: Value, _request: &ChatRequest) -> Value {
        neutral::into_openai_completion(api, answer)
    }

    fn renderer(api: Api, request: &ChatRequest) -> OpenAiStream {
        OpenAiStream { translate: neutral::ToOpenAiStream::new(api, request.include_usage()) }
    }
}

/// Renders a committed stream as OpenAI SSE: chunks, then `[DONE]`. A failure after commit
/// sends an `error` event, which the OpenAI SDKs raise as `APIError`.
pub struct OpenAiStream {
    translate: neutral::ToOpenAiStream,
}

impl StreamRenderer for OpenAiStream {
    fn event(&mut self, event: &StreamEvent) -> Vec<Bytes> {
        let mut frames = Vec::with_capacity(1);
        self.translate.each(event, |chunk| {
            frames.push(match chunk {
                Chunk::Text(text) => relay::encode_text(None, text),
                Chunk::Json(json) => relay::encode(None, json),
            })
        });
        frames
    }

    fn finish(&mut self) -> Vec<Bytes> {
        let mut frames: Vec<Bytes> = self.translate.finish().iter().map(|chunk| relay::encode(None, chunk)).collect();
        frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
        frames
    }

    fn failure(&mut self, message: &str, class: Option<FailureClass>) -> Bytes {
        let kind = class.map_or("timeout", openai_error_type_of_class);
        relay::encode(
            None,
            &json!({"error": {"message": message, "type": kind, "code": "stream_interrupted", "param": null}}),
        )
    }
}

/// `GET /v1/models`: the route aliases, as OpenAI's model list.
pub fn models(snapshot: &PolicySnapshot) -> Response<Body> {
    let data: Vec<Value> = snapshot
        .aliases()
        .iter()
        .map(|alias| json!({"id": alias, "object": "model", "created": 0, "owned_by": "backstop"}))
        .collect();
    json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::openai::stream::ChunkParser;
    use crate::provider::sse::{self, Decoder, Parsed, WireStream};

    #[test]
    fn an_openai_stream_passes_on_the_provider_s_own_text() {
        let read = |text: &str| match ChunkParser::default().event(sse::Event { event: None, data: text.into() }) {
            Parsed::Event(event) => event,
            other => panic!("{other:?}"),
        };
        let chunk = "{\"id\": \"c\",\n  \"choices\": [{\"index\": 0, \"delta\": {\"content\": \"Hi\"}, \"logprobs\": {\"x\": 1.10}}]}";
        let usage = r#"{"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;
        let request = |asked: bool| {
            let body = json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "x"}],
                "stream_options": {"include_usage": asked}});
            parse_chat(body.to_string().as_bytes()).expect("a request")
        };
        let mut renderer = OpenAiDialect::renderer(Api::OpenAi, &request(false));
        let frames = renderer.event(&read(chunk));
        assert_eq!(frames.len(), 1);
        let mut decoder = Decoder::new(1 << 20);
        decoder.push(&frames[0]);
        let sent = decoder.next_event().expect("one event").expect("complete");
        assert_eq!(sent.data, chunk, "the same text, `1.10` and the line break kept, not a re-encoding");
        assert!(renderer.event(&read(usage)).is_empty(), "the usage chunk Backstop asked for is its own");
        let mut asked = OpenAiDialect::renderer(Api::OpenAi, &request(true));
        assert_eq!(asked.event(&read(usage)), [Bytes::from(format!("data: {usage}\n\n"))]);
    }

    #[test]
    fn rejects_what_no_provider_would_take() {
        let cases = [
            ("{", "not valid JSON"),
            ("[]", "must be a JSON object"),
            (r#"{"messages":[{"role":"user","content":"x"}]}"#, "`model` is missing"),
            (r#"{"model":"","messages":[{"role":"user"}]}"#, "`model` must not be empty"),
            (r#"{"model":3,"messages":[{"role":"user"}]}"#, "`model` must be a string"),
            (r#"{"model":"m"}"#, "`messages` is missing"),
            (r#"{"model":"m","messages":[]}"#, "`messages` must not be empty"),
            (r#"{"model":"m","messages":[{"content":"x"}]}"#, "`messages[0]` is invalid"),
            (r#"{"model":"m","messages":[{"role":"user"}],"stream":"yes"}"#, "`stream` must be a boolean"),
        ];
        for (body, expected) in cases {
            let err = parse_chat(body.as_bytes()).expect_err(body);
            assert!(err.message.contains(expected), "{body}: {}", err.message);
        }
    }
}
