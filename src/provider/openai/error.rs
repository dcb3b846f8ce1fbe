//! OpenAI's error format (`{"error": {"message", "type", "code"}}`), which OpenAI-compatible
//! servers, Azure and the mock provider share, classified in the terms `fallbackOn` uses.

use bytes::Bytes;
use http::HeaderMap;
use serde_json::Value;

use crate::llm::AttemptError;
use crate::llm::FailureClass;
use crate::llm::outcome::message_of;
use crate::llm::status::class_of_status;

/// Classifies an error answer in OpenAI's format.
pub fn classify(status: Option<u16>, body: &[u8]) -> FailureClass {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let error = parsed.as_ref().map(|v| v.get("error").unwrap_or(v)).cloned().unwrap_or(Value::Null);
    classify_value(status, &error)
}

/// Classifies a status and an OpenAI-style error object (either may be missing).
pub fn classify_value(status: Option<u16>, error: &Value) -> FailureClass {
    let field = |name: &str| error.get(name).and_then(Value::as_str).map(str::to_ascii_lowercase).unwrap_or_default();
    let (code, kind, message) = (field("code"), field("type"), field("message"));
    let says = |needle: &str| code.contains(needle) || kind.contains(needle);
    if says("insufficient_quota") || says("billing") || says("quota") {
        return FailureClass::QuotaExceeded;
    }
    if says("context_length") || message.contains("maximum context length") || message.contains("context window") {
        return FailureClass::ContextWindowExceeded;
    }
    if says("content_filter") || says("content_policy") {
        return FailureClass::ContentFiltered;
    }
    match status {
        Some(status) => class_of_status(status),
        None if says("rate_limit") => FailureClass::RateLimited,
        None if says("overloaded") => FailureClass::Overloaded,
        None if says("authentication") || says("permission") => FailureClass::AuthError,
        None if says("invalid_request") => FailureClass::BadRequest,
        None => FailureClass::ServerError,
    }
}

/// A failure the upstream answered with an error status, in OpenAI's error format.
pub fn from_response(status: u16, headers: &HeaderMap, body: Bytes) -> AttemptError {
    let class = classify(Some(status), &body);
    AttemptError::classified(class, status, headers, body)
}

/// An error event inside a 2xx stream, such as `data: {"error": {...}}`.
pub fn stream_error(error: &Value) -> AttemptError {
    AttemptError::in_stream(classify_embedded(error), message_of(error))
}

/// An error object inside a 2xx answer.
pub fn in_answer(error: &Value) -> AttemptError {
    AttemptError::in_answer(classify_embedded(error), message_of(error))
}

/// An error object with no HTTP status of its own: its `code` may be one.
fn classify_embedded(error: &Value) -> FailureClass {
    let status = error.get("code").and_then(Value::as_u64).and_then(|c| u16::try_from(c).ok());
    classify_value(status.filter(|s| (400..600).contains(s)), error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn class(status: u16, body: Value) -> FailureClass {
        classify(Some(status), body.to_string().as_bytes())
    }

    #[test]
    fn classifies_openai_error_bodies() {
        use FailureClass::*;
        assert_eq!(class(429, json!({"error": {"type": "requests", "code": "rate_limit_exceeded"}})), RateLimited);
        assert_eq!(
            class(429, json!({"error": {"type": "insufficient_quota", "code": "insufficient_quota"}})),
            QuotaExceeded
        );
        assert_eq!(class(402, json!({})), QuotaExceeded);
        assert_eq!(class(401, json!({"error": {"code": "invalid_api_key"}})), AuthError);
        assert_eq!(class(403, json!({})), AuthError);
        assert_eq!(class(503, json!({})), Overloaded);
        assert_eq!(class(529, json!({"type": "error", "error": {"type": "overloaded_error"}})), Overloaded);
        assert_eq!(class(500, json!({})), ServerError);
        assert_eq!(class(502, json!({})), ServerError);
        assert_eq!(class(408, json!({})), Timeout);
        assert_eq!(class(400, json!({"error": {"code": "context_length_exceeded"}})), ContextWindowExceeded);
        assert_eq!(
            class(400, json!({"error": {"message": "This model's maximum context length is 8192 tokens"}})),
            ContextWindowExceeded
        );
        assert_eq!(class(400, json!({"error": {"code": "content_filter"}})), ContentFiltered);
        assert_eq!(class(400, json!({"error": {"code": "invalid_value"}})), BadRequest);
        assert_eq!(class(404, json!({"error": {"code": "model_not_found"}})), BadRequest);
        assert_eq!(classify(Some(500), b"<html>oops"), ServerError);
    }

    #[test]
    fn classifies_in_stream_error_events() {
        use FailureClass::*;
        let e = |v: Value| stream_error(&v).class;
        assert_eq!(e(json!({"message": "slow down", "type": "rate_limit_error"})), RateLimited);
        assert_eq!(e(json!({"message": "busy", "type": "overloaded_error"})), Overloaded);
        assert_eq!(e(json!({"message": "boom", "code": 500})), ServerError);
        assert_eq!(e(json!({"message": "bad", "type": "invalid_request_error"})), BadRequest);
        assert_eq!(e(json!({"message": "?"})), ServerError);
    }
}
