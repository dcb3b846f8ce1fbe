//! A neutral request as an OpenAI-format target receives it: the Chat Completions (or
//! embeddings) body with the target's model, and, for a stream, a request for its usage.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::llm::ChatRequest;
use crate::llm::request::{Message, Operation};

/// A request to an OpenAI-format target, as it is encoded.
#[derive(Serialize)]
#[serde(untagged)]
enum Outgoing<'a> {
    /// Embeddings: the app's fields, `model` replaced.
    Embeddings(Map<String, Value>),
    /// A chat completion.
    Chat {
        model: &'a str,
        messages: &'a [Message],
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        stream: bool,
        #[serde(flatten)]
        rest: &'a Map<String, Value>,
    },
}

/// The request body for one target: this request with `model` replaced.
pub fn encode(request: &ChatRequest, model: &str) -> Result<Vec<u8>, serde_json::Error> {
    encode_with(request, model, false)
}

/// [`encode`]; with `usage`, a stream also asks for its token usage
/// (`stream_options.include_usage`), for telemetry and cost, whether or not the app did.
pub fn encode_with(request: &ChatRequest, model: &str, usage: bool) -> Result<Vec<u8>, serde_json::Error> {
    write_with(request, model, usage, |body| serde_json::to_vec(body))
}

/// [`encode_with`] as a JSON object, for a target whose request is
/// adapted before it is encoded.
pub fn encode_object(request: &ChatRequest, model: &str, usage: bool) -> Result<Map<String, Value>, serde_json::Error> {
    write_with(request, model, usage, |body| match serde_json::to_value(body)? {
        Value::Object(object) => Ok(object),
        _ => Err(serde::ser::Error::custom("a request must encode as a JSON object")),
    })
}

/// The OpenAI request for `model`, written by `write`.
fn write_with<T>(
    request: &ChatRequest,
    model: &str,
    usage: bool,
    write: impl FnOnce(&Outgoing<'_>) -> Result<T, serde_json::Error>,
) -> Result<T, serde_json::Error> {
    if request.operation == Operation::Embeddings {
        let mut body = request.rest.clone();
        body.insert("model".into(), Value::String(model.to_string()));
        return write(&Outgoing::Embeddings(body));
    }
    if usage && request.stream && !request.include_usage() {
        let mut rest = request.rest.clone();
        let options = rest.entry("stream_options").or_insert_with(|| Value::Object(Map::new()));
        if let Some(options) = options.as_object_mut() {
            options.insert("include_usage".into(), Value::Bool(true));
        }
        return write(&Outgoing::Chat { model, messages: &request.messages, stream: true, rest: &rest });
    }
    write(&Outgoing::Chat { model, messages: &request.messages, stream: request.stream, rest: &request.rest })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn unknown_fields_pass_through() {
        let body = json!({
            "model": "chat",
            "messages": [{"role": "user", "content": "hi", "name": "ann"}],
            "temperature": 0.2,
            "logit_bias": {"50256": -100},
            "stream": true
        });
        let request: ChatRequest = serde_json::from_value(body).expect("parses");
        assert!(request.stream);
        let out: Value = serde_json::from_slice(&encode(&request, "gpt-4o").expect("serializes")).expect("json");
        assert_eq!(out["model"], "gpt-4o");
        assert_eq!(out["temperature"], 0.2);
        assert_eq!(out["logit_bias"], json!({"50256": -100}));
        assert_eq!(out["messages"][0], json!({"role": "user", "content": "hi", "name": "ann"}));
        assert_eq!(out["stream"], true);
    }
}
