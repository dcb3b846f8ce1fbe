//! Gemini's error format (`{"error": {"code", "message", "status"}}`) and its safety blocks,
//! classified in the terms `fallbackOn` uses.

use serde_json::Value;

use super::from_wire::{FILTERED, parts_of};
use crate::llm::AttemptError;
use crate::llm::FailureClass;
use crate::llm::outcome::{error_object, message_of};
use crate::llm::status::class_of_status;

/// Classifies a Gemini error answer (`{"error": {"code", "message", "status"}}`).
pub fn classify(status: Option<u16>, body: &[u8]) -> FailureClass {
    classify_error(status, &error_object(body))
}

/// Classifies a Gemini error object, in an error answer or a stream event.
pub fn classify_error(status: Option<u16>, error: &Value) -> FailureClass {
    let kind = error.get("status").and_then(Value::as_str).unwrap_or_default();
    let message = error.get("message").and_then(Value::as_str).unwrap_or_default().to_ascii_lowercase();
    let details = error.get("details").map(Value::to_string).unwrap_or_default();
    match kind {
        _ if message.contains("api key not valid") || details.contains("API_KEY_INVALID") => FailureClass::AuthError,
        "UNAUTHENTICATED" | "PERMISSION_DENIED" => FailureClass::AuthError,
        "RESOURCE_EXHAUSTED" if message.contains("billing") => FailureClass::QuotaExceeded,
        "RESOURCE_EXHAUSTED" => FailureClass::RateLimited,
        "UNAVAILABLE" => FailureClass::Overloaded,
        "INTERNAL" | "UNKNOWN" => FailureClass::ServerError,
        "DEADLINE_EXCEEDED" => FailureClass::Timeout,
        "INVALID_ARGUMENT" | "FAILED_PRECONDITION" | "OUT_OF_RANGE"
            if message.contains("token count")
                || message.contains("maximum number of tokens")
                || message.contains("too long") =>
        {
            FailureClass::ContextWindowExceeded
        }
        "INVALID_ARGUMENT" | "FAILED_PRECONDITION" | "NOT_FOUND" | "OUT_OF_RANGE" => FailureClass::BadRequest,
        _ => status
            .or_else(|| error.get("code").and_then(Value::as_u64).and_then(|c| u16::try_from(c).ok()))
            .map_or(FailureClass::ServerError, class_of_status),
    }
}

/// A response the safety filters blocked outright: no candidate, or only filtered ones with
/// nothing to show.
pub fn blocked(answer: &Value) -> Option<AttemptError> {
    if let Some(error) = answer.get("error").filter(|e| e.is_object()) {
        return Some(AttemptError::in_answer(classify_error(None, error), message_of(error)));
    }
    let candidates = answer.get("candidates").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    if candidates.is_empty() {
        return match answer.pointer("/promptFeedback/blockReason").and_then(Value::as_str) {
            Some(reason) => Some(AttemptError::new(FailureClass::ContentFiltered, format!("prompt blocked: {reason}"))),
            None => Some(AttemptError::new(FailureClass::ServerError, "upstream answer has no candidates")),
        };
    }
    let all_filtered = candidates.iter().all(|c| {
        c.get("finishReason").and_then(Value::as_str).is_some_and(|r| FILTERED.contains(&r)) && parts_of(c).is_empty()
    });
    all_filtered.then(|| AttemptError::new(FailureClass::ContentFiltered, "answer blocked by the safety filters"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn classifies_gemini_errors() {
        let c = |code: u16, status: &str, message: &str| {
            classify(
                Some(code),
                json!({"error": {"code": code, "status": status, "message": message}}).to_string().as_bytes(),
            )
        };
        assert_eq!(
            c(429, "RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota)."),
            FailureClass::RateLimited
        );
        assert_eq!(c(503, "UNAVAILABLE", "The model is overloaded."), FailureClass::Overloaded);
        assert_eq!(c(500, "INTERNAL", "An internal error has occurred."), FailureClass::ServerError);
        assert_eq!(
            c(400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key."),
            FailureClass::AuthError
        );
        assert_eq!(c(403, "PERMISSION_DENIED", "denied"), FailureClass::AuthError);
        assert_eq!(
            c(
                400,
                "INVALID_ARGUMENT",
                "The input token count (1200000) exceeds the maximum number of tokens allowed (1048576)."
            ),
            FailureClass::ContextWindowExceeded
        );
        assert_eq!(c(400, "INVALID_ARGUMENT", "Invalid value at 'contents'"), FailureClass::BadRequest);
        assert_eq!(c(504, "DEADLINE_EXCEEDED", "slow"), FailureClass::Timeout);
        assert_eq!(c(404, "NOT_FOUND", "models/x is not found"), FailureClass::BadRequest);
    }
}
