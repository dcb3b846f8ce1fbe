//! What counts as content in a Chat Completions answer or chunk: text, a refusal or a tool
//! call. A stream commits at its first content chunk; an answer without any is empty.

use serde_json::Value;

/// A `content_filter` finish with nothing to show (Azure's output filter, for one): a failure
/// `onContentFiltered` can act on rather than an empty answer.
pub(crate) fn filtered_without_content(answer: &Value) -> bool {
    let choices = answer.get("choices").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    !choices.is_empty()
        && choices.iter().all(|c| c.get("finish_reason").and_then(Value::as_str) == Some("content_filter"))
        && !completion_has_content(answer)
}

/// Whether a chunk's delta has text, a refusal or a tool call (a finish alone does not count).
pub fn carries_content(chunk: &Value) -> bool {
    chunk
        .get("choices")
        .and_then(Value::as_array)
        .is_some_and(|choices| choices.iter().any(|choice| choice.get("delta").is_some_and(message_has_content)))
}

/// Whether a complete answer has text, a refusal or a tool call in any choice.
pub fn completion_has_content(answer: &Value) -> bool {
    answer
        .get("choices")
        .and_then(Value::as_array)
        .is_some_and(|choices| choices.iter().any(|choice| choice.get("message").is_some_and(message_has_content)))
}

fn message_has_content(message: &Value) -> bool {
    let text = |name: &str| message.get(name).and_then(Value::as_str).is_some_and(|s| !s.is_empty());
    text("content")
        || text("refusal")
        || message.get("tool_calls").is_some_and(|t| t.as_array().is_some_and(|a| !a.is_empty()))
        || message.get("function_call").is_some_and(Value::is_object)
        || message.get("content").is_some_and(|c| c.as_array().is_some_and(|a| !a.is_empty()))
}
