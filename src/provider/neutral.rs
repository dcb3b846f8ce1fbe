//! A provider's answer in the neutral (OpenAI Chat Completions) shape: what an OpenAI app is
//! sent, what a named-event ingress (Messages, Responses) renders from, and what the fallback
//! loop checks for content.

use serde_json::Value;

use super::{anthropic, gemini, openai};
use crate::llm::{Api, StreamEvent};

/// Whether a complete answer has text, a refusal or a tool call.
pub fn has_content(api: Api, answer: &Value) -> bool {
    match api {
        Api::OpenAi => openai::content::completion_has_content(answer),
        other => openai::content::completion_has_content(&to_openai_completion(other, answer)),
    }
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
            ToOpenAiStream::Same(false)
                if event.data["choices"].as_array().is_some_and(Vec::is_empty)
                    && event.data.get("usage").is_some_and(|u| !u.is_null()) =>
            {
                Vec::new()
            }
            ToOpenAiStream::Same(_) => vec![event.data.clone()],
            ToOpenAiStream::Anthropic(t) => t.push(&event.data),
            ToOpenAiStream::Gemini(t) => t.push(&event.data),
            ToOpenAiStream::Responses => openai::responses::event_to_chunks(&event.data),
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
