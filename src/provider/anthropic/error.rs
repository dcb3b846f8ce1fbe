//! Anthropic's error format (`{"type": "error", "error": {"type", "message"}}`), classified in
//! the terms `fallbackOn` uses.

use serde_json::Value;

use crate::llm::FailureClass;
use crate::llm::outcome::error_object;
use crate::llm::status::class_of_status;

/// Classifies an Anthropic error answer.
pub fn classify(status: Option<u16>, body: &[u8]) -> FailureClass {
    classify_error(status, &error_object(body))
}

/// Classifies an Anthropic error object, in an error answer or an `error` stream event.
pub fn classify_error(status: Option<u16>, error: &Value) -> FailureClass {
    let kind = error.get("type").and_then(Value::as_str).unwrap_or_default();
    let message = error.get("message").and_then(Value::as_str).unwrap_or_default().to_ascii_lowercase();
    // A refused key is one whatever the body says (a gateway in front of the API may word it
    // in its own format).
    if matches!(status, Some(401 | 403)) {
        return FailureClass::AuthError;
    }
    match kind {
        "rate_limit_error" => FailureClass::RateLimited,
        "overloaded_error" => FailureClass::Overloaded,
        "api_error" => FailureClass::ServerError,
        "timeout_error" => FailureClass::Timeout,
        "authentication_error" | "permission_error" => FailureClass::AuthError,
        "billing_error" => FailureClass::QuotaExceeded,
        "invalid_request_error" if message.contains("prompt is too long") || message.contains("context window") => {
            FailureClass::ContextWindowExceeded
        }
        "invalid_request_error" if message.contains("credit balance") => FailureClass::QuotaExceeded,
        "invalid_request_error" | "not_found_error" | "request_too_large" => FailureClass::BadRequest,
        _ => status.map_or(FailureClass::ServerError, class_of_status),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn classifies_anthropic_errors() {
        let c = |status: u16, kind: &str, message: &str| {
            classify(
                Some(status),
                json!({"type": "error", "error": {"type": kind, "message": message}}).to_string().as_bytes(),
            )
        };
        assert_eq!(c(429, "rate_limit_error", "slow down"), FailureClass::RateLimited);
        assert_eq!(c(529, "overloaded_error", "Overloaded"), FailureClass::Overloaded);
        assert_eq!(c(500, "api_error", "oops"), FailureClass::ServerError);
        assert_eq!(c(401, "authentication_error", "invalid x-api-key"), FailureClass::AuthError);
        assert_eq!(c(403, "permission_error", "no"), FailureClass::AuthError);
        assert_eq!(c(401, "invalid_request_error", "invalid api key"), FailureClass::AuthError, "by its status");
        assert_eq!(c(402, "billing_error", "pay"), FailureClass::QuotaExceeded);
        assert_eq!(c(400, "invalid_request_error", "Your credit balance is too low"), FailureClass::QuotaExceeded);
        assert_eq!(
            c(400, "invalid_request_error", "prompt is too long: 250000 tokens > 200000 maximum"),
            FailureClass::ContextWindowExceeded
        );
        assert_eq!(c(400, "invalid_request_error", "max_tokens: field required"), FailureClass::BadRequest);
        assert_eq!(c(404, "not_found_error", "model: x"), FailureClass::BadRequest);
        assert_eq!(c(504, "timeout_error", "timeout"), FailureClass::Timeout);
        assert_eq!(classify(Some(502), b"<html>bad gateway"), FailureClass::ServerError);
    }
}
