//! How one attempt at one target failed, already classified in the terms `fallbackOn` uses.
//! Providers build these from their own error answers; the fallback loop decides from them;
//! the ingress turns them into the app's error format. An authentication error's body is never
//! kept, so an upstream that echoes the key cannot leak it.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::HeaderMap;
use serde_json::Value;

use super::ratelimit::{Headroom, retry_after};
use crate::llm::FailureClass;

/// A failed attempt at one target, already classified.
#[derive(Clone, Debug)]
pub struct AttemptError {
    /// Why it failed, in the terms `fallbackOn` uses.
    pub class: FailureClass,
    /// The upstream's HTTP status, when it answered with one.
    pub status: Option<u16>,
    /// How long the upstream asked us to wait (`Retry-After`, `retry-after-ms`).
    pub retry_after: Option<Duration>,
    /// A one-line description safe to show the app: never an authentication error's body.
    pub message: String,
    /// The upstream's error body, kept to return as is when the failure is final.
    /// Never kept for `authError`.
    pub body: Option<Bytes>,
    /// How long the key is out of requests or tokens, per the error response's
    /// `x-ratelimit-*` headers.
    pub saturated_for: Option<Duration>,
    /// The request's own deadline, not the target, ended the attempt: nothing is learnt of
    /// the target's health from it.
    pub cut_by_deadline: bool,
}

impl AttemptError {
    /// A failure with no upstream answer (timeout, connection error, malformed reply).
    pub fn new(class: FailureClass, message: impl Into<String>) -> Self {
        AttemptError {
            class,
            status: None,
            retry_after: None,
            message: message.into(),
            body: None,
            saturated_for: None,
            cut_by_deadline: false,
        }
    }

    /// A failure the upstream answered with an error status, already classified by its
    /// provider's rules. The body is kept to return as is, except for `authError`.
    pub fn classified(class: FailureClass, status: u16, headers: &HeaderMap, body: Bytes) -> Self {
        let retry_after = retry_after(headers, SystemTime::now());
        let message = if class == FailureClass::AuthError {
            format!("upstream rejected the credentials (HTTP {status})")
        } else {
            let detail = error_message(&body).unwrap_or_else(|| snippet(&body));
            format!("HTTP {status}: {detail}")
        };
        let body = (class != FailureClass::AuthError).then_some(body);
        AttemptError {
            class,
            status: Some(status),
            retry_after,
            message,
            body,
            saturated_for: Headroom::from_headers(headers).exhausted_for(),
            cut_by_deadline: false,
        }
    }

    /// An error event inside a 2xx stream, classified by its provider: the provider's own
    /// message, shortened, except for `authError`, whose message might echo the key.
    pub fn in_stream(class: FailureClass, message: Option<&str>) -> Self {
        let message = if class == FailureClass::AuthError {
            "upstream rejected the credentials (in-stream error)".to_string()
        } else {
            format!("error event in stream: {}", truncate(message.unwrap_or("unknown error"), 300))
        };
        AttemptError::new(class, message)
    }

    /// An error object inside a 2xx answer, classified by its provider (same rules as
    /// [`AttemptError::in_stream`] for the message).
    pub fn in_answer(class: FailureClass, message: Option<&str>) -> Self {
        let message = if class == FailureClass::AuthError {
            "upstream rejected the credentials (error in a 200 answer)".to_string()
        } else {
            format!("error in a 200 answer: {}", truncate(message.unwrap_or("unknown error"), 300))
        };
        AttemptError::new(class, message)
    }
}

/// The `error` object of a JSON error body (`{"error": {...}}`), or null.
pub fn error_object(body: &[u8]) -> Value {
    let mut parsed: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    parsed.get_mut("error").map(Value::take).unwrap_or(Value::Null)
}

/// The `message` string of an error object.
pub fn message_of(error: &Value) -> Option<&str> {
    error.get("message").and_then(Value::as_str)
}

impl std::fmt::Display for AttemptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.class, self.message)
    }
}

impl std::error::Error for AttemptError {}

/// The `error.message` (or top-level `message`) of a JSON error body.
fn error_message(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let message = value.pointer("/error/message").or_else(|| value.get("message"))?.as_str()?;
    Some(truncate(message, 300))
}

fn snippet(body: &[u8]) -> String {
    if body.is_empty() {
        return "empty body".to_string();
    }
    truncate(&String::from_utf8_lossy(body), 120)
}

fn truncate(text: &str, max: usize) -> String {
    let line = text.lines().next().unwrap_or_default();
    if line.len() <= max {
        return line.to_string();
    }
    let mut end = max;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &line[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_failures_never_keep_the_body() {
        let in_stream = AttemptError::in_stream(FailureClass::AuthError, Some("bad key sk-abc...xyz"));
        assert!(!in_stream.message.contains("sk-abc"), "{}", in_stream.message);
        let body = Bytes::from_static(br#"{"error":{"message":"Incorrect API key provided: sk-abc...xyz"}}"#);
        let error = AttemptError::classified(FailureClass::AuthError, 401, &HeaderMap::new(), body);
        assert_eq!(error.class, FailureClass::AuthError);
        assert!(error.body.is_none());
        assert!(!error.message.contains("sk-abc"), "{}", error.message);
    }
}
