//! A provider's answer in the neutral (OpenAI Chat Completions) shape: what an OpenAI app is
//! sent, what a named-event ingress (Messages, Responses) renders from, and what the fallback
//! loop checks for content.

use serde_json::Value;

use super::{anthropic, gemini, openai};
use crate::llm::view::ChatView;
use crate::llm::{Api, StreamEvent, Whole};

/// Whether a complete answer has text, a refusal or a tool call.
pub fn has_content(api: Api, answer: &Value) -> bool {
    match api {
        Api::OpenAi => openai::content::completion_has_content(answer),
        other => openai::content::completion_has_content(&to_openai_completion(other, answer)),
    }
}

/// Whether a whole answer has text, a refusal or a tool call; a usual chat answer not decoded
/// is read in place.
pub fn whole_has_content(api: Api, answer: &Whole) -> bool {
    let undecoded = answer.raw.as_deref().filter(|_| api == Api::OpenAi && answer.json_if_decoded().is_none());
    match undecoded.and_then(ChatView::reread_bytes) {
        Some(view) => view.message_content(),
        None => has_content(api, answer.json()),
    }
}

/// Whether a chat answer read in place says what decoding it whole says about its content and
/// the content filter (wherever it is read in place). The fuzz targets check it on any input.
pub fn answer_readings_agree(bytes: &[u8]) -> bool {
    let Some(view) = ChatView::read_bytes(bytes) else { return true };
    serde_json::from_slice::<Value>(bytes).is_ok_and(|whole| {
        view.message_content() == openai::content::completion_has_content(&whole)
            && view.filtered_without_content() == openai::content::filtered_without_content(&whole)
    })
}

/// A complete answer as an OpenAI `chat.completion`.
pub fn to_openai_completion(api: Api, answer: &Value) -> Value {
    match api {
        Api::OpenAi => answer.clone(),
        Api::Anthropic => anthropic::from_wire::to_openai_completion(answer),
        Api::Gemini => gemini::from_wire::to_openai_completion(answer),
        Api::Responses => openai::responses::to_chat_completion(answer),
    }
}

/// A complete answer as an OpenAI `chat.completion`, without a copy when it already is one.
pub fn into_openai_completion(api: Api, answer: Value) -> Value {
    match api {
        Api::OpenAi => answer,
        other => to_openai_completion(other, &answer),
    }
}

/// A chat chunk handed on: the provider's own text, or JSON.
#[derive(Clone, Copy, Debug)]
pub enum Chunk<'a> {
    /// As the provider sent it.
    Text(&'a str),
    /// Decoded or built here.
    Json(&'a Value),
}

/// Turns a provider's stream events into OpenAI `chat.completion.chunk`s.
pub enum ToOpenAiStream {
    /// Already OpenAI chunks; with `false`, the app did not ask for usage, and the usage-only
    /// chunk Backstop asked for (for its telemetry) is left out.
    Same(bool),
    /// From Messages events.
    Anthropic(anthropic::stream::ToOpenAiStream),
    /// From Gemini partial answers.
    Gemini(gemini::stream::ToOpenAiStream),
    /// From Responses events.
    Responses,
}

impl ToOpenAiStream {
    /// A translator for events in `api`'s format; `include_usage` is the app's
    /// `stream_options.include_usage`.
    pub fn new(api: Api, include_usage: bool) -> Self {
        match api {
            Api::OpenAi => ToOpenAiStream::Same(include_usage),
            Api::Anthropic => ToOpenAiStream::Anthropic(anthropic::stream::ToOpenAiStream::new(include_usage)),
            Api::Gemini => ToOpenAiStream::Gemini(gemini::stream::ToOpenAiStream::new(include_usage)),
            Api::Responses => ToOpenAiStream::Responses,
        }
    }

    /// The chunks for one event.
    pub fn push(&mut self, event: &StreamEvent) -> Vec<Value> {
        match self {
            ToOpenAiStream::Same(_) if self.leaves_out(event) => Vec::new(),
            ToOpenAiStream::Same(_) => vec![event.data().clone()],
            ToOpenAiStream::Anthropic(t) => t.push(event.data()),
            ToOpenAiStream::Gemini(t) => t.push(event.data()),
            ToOpenAiStream::Responses => openai::responses::event_to_chunks(event.data()),
        }
    }

    /// Hands each chunk for one event to `emit`; an OpenAI chunk is handed on as it is, not
    /// copied, and as the provider's own text when it still is that.
    pub fn each(&mut self, event: &StreamEvent, mut emit: impl FnMut(Chunk<'_>)) {
        match self {
            ToOpenAiStream::Same(_) => {
                if !self.leaves_out(event) {
                    emit(event.text().map_or_else(|| Chunk::Json(event.data()), Chunk::Text));
                }
            }
            _ => self.push(event).iter().map(Chunk::Json).for_each(emit),
        }
    }

    /// An OpenAI usage-only chunk the app did not ask for.
    fn leaves_out(&self, event: &StreamEvent) -> bool {
        if !matches!(self, ToOpenAiStream::Same(false)) {
            return false;
        }
        match event.text().and_then(ChatView::reread) {
            Some(chunk) => chunk.usage_only(),
            None => {
                let data = event.data();
                data["choices"].as_array().is_some_and(Vec::is_empty) && data.get("usage").is_some_and(|u| !u.is_null())
            }
        }
    }

    /// Chunks owed when the stream has ended cleanly.
    pub fn finish(&mut self) -> Vec<Value> {
        match self {
            ToOpenAiStream::Gemini(t) => t.finish(),
            ToOpenAiStream::Same(_) | ToOpenAiStream::Anthropic(_) | ToOpenAiStream::Responses => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::openai::stream::chunk_event;
    use serde_json::json;

    fn decoded(chunk: Chunk<'_>) -> Value {
        match chunk {
            Chunk::Text(text) => serde_json::from_str(text).expect("JSON"),
            Chunk::Json(json) => json.clone(),
        }
    }

    fn handed_on(translate: &mut ToOpenAiStream, chunk: &Value) -> Vec<Value> {
        let mut chunks = Vec::new();
        translate.each(&chunk_event(chunk.clone()), |chunk| chunks.push(decoded(chunk)));
        chunks
    }

    #[test]
    fn openai_chunks_are_handed_on_as_they_are_and_usage_only_when_the_app_asked() {
        let content = json!({"id": "c", "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": null}]});
        let usage =
            json!({"id": "c", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}});
        let mut asked = ToOpenAiStream::new(Api::OpenAi, true);
        let mut not_asked = ToOpenAiStream::new(Api::OpenAi, false);
        assert_eq!(handed_on(&mut asked, &content), vec![content.clone()]);
        assert_eq!(handed_on(&mut not_asked, &content), vec![content.clone()]);
        assert_eq!(handed_on(&mut asked, &usage), vec![usage.clone()]);
        assert!(handed_on(&mut not_asked, &usage).is_empty(), "the usage chunk Backstop asked for is its own");
        // `each` and `push` agree, whichever the translator.
        let mut from_anthropic = ToOpenAiStream::new(Api::Anthropic, true);
        let start =
            json!({"type": "message_start", "message": {"id": "m", "model": "claude", "usage": {"input_tokens": 3}}});
        let event = crate::llm::StreamEvent::new(start, false, false, false);
        let mut each = Vec::new();
        from_anthropic.each(&event, |chunk| each.push(decoded(chunk)));
        assert_eq!(each, ToOpenAiStream::new(Api::Anthropic, true).push(&event));
        assert!(!each.is_empty(), "message_start opens the OpenAI stream with the assistant's role");
    }
}
