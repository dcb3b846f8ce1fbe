//! Answers from one wire API in another's format, at the edge: each ingress renders what the
//! answering provider sent, through the neutral (OpenAI) shape when the two differ and
//! untouched when they are the same.

use serde_json::Value;

use super::{Api, StreamEvent, anthropic, gemini, openai, responses};

/// Whether a complete answer has text, a refusal or a tool call.
pub fn has_content(api: Api, answer: &Value) -> bool {
    match api {
        Api::OpenAi => openai::completion_has_content(answer),
        other => openai::completion_has_content(&to_openai_completion(other, answer)),
    }
}

/// A complete answer as an OpenAI `chat.completion`.
pub fn to_openai_completion(api: Api, answer: &Value) -> Value {
    match api {
        Api::OpenAi => answer.clone(),
        Api::Anthropic => anthropic::to_openai_completion(answer),
        Api::Gemini => gemini::to_openai_completion(answer),
        Api::Responses => responses::to_chat_completion(answer),
    }
}

/// A complete answer as an OpenAI `chat.completion`, without a copy when it already is one.
pub fn into_openai_completion(api: Api, answer: Value) -> Value {
    match api {
        Api::OpenAi => answer,
        other => to_openai_completion(other, &answer),
    }
}

/// A complete answer as an Anthropic Messages answer.
pub fn to_anthropic_message(api: Api, answer: Value) -> Value {
    match api {
        Api::Anthropic => answer,
        other => anthropic::from_openai_completion(&to_openai_completion(other, &answer)),
    }
}

/// Turns a provider's stream events into OpenAI `chat.completion.chunk`s.
pub enum ToOpenAiStream {
    /// Already OpenAI chunks.
    Same,
    /// From Messages events.
    Anthropic(anthropic::ToOpenAiStream),
    /// From Gemini partial answers.
    Gemini(gemini::ToOpenAiStream),
    /// From Responses events.
    Responses,
}

impl ToOpenAiStream {
    /// A translator for events in `api`'s format; `include_usage` is the app's
    /// `stream_options.include_usage`.
    pub fn new(api: Api, include_usage: bool) -> Self {
        match api {
            Api::OpenAi => ToOpenAiStream::Same,
            Api::Anthropic => ToOpenAiStream::Anthropic(anthropic::ToOpenAiStream::new(include_usage)),
            Api::Gemini => ToOpenAiStream::Gemini(gemini::ToOpenAiStream::new(include_usage)),
            Api::Responses => ToOpenAiStream::Responses,
        }
    }

    /// The chunks for one event.
    pub fn push(&mut self, event: &StreamEvent) -> Vec<Value> {
        match self {
            ToOpenAiStream::Same => vec![event.data.clone()],
            ToOpenAiStream::Anthropic(t) => t.push(&event.data),
            ToOpenAiStream::Gemini(t) => t.push(&event.data),
            ToOpenAiStream::Responses => responses::event_to_chunks(&event.data),
        }
    }

    /// Chunks owed when the stream has ended cleanly.
    pub fn finish(&mut self) -> Vec<Value> {
        match self {
            ToOpenAiStream::Gemini(t) => t.finish(),
            ToOpenAiStream::Same | ToOpenAiStream::Anthropic(_) | ToOpenAiStream::Responses => Vec::new(),
        }
    }
}

/// Builds the events of an API whose streams are named events (Messages, Responses) from
/// chat chunks.
pub trait FromChat {
    /// The events for one chunk, as `(event name, data)`.
    fn push_chunk(&mut self, chunk: &Value) -> Vec<(String, Value)>;
    /// The events that close the stream.
    fn finish_events(&mut self) -> Vec<(String, Value)>;
}

impl FromChat for anthropic::FromOpenAiStream {
    fn push_chunk(&mut self, chunk: &Value) -> Vec<(String, Value)> {
        self.push(chunk).into_iter().map(|(name, data)| (name.to_string(), data)).collect()
    }

    fn finish_events(&mut self) -> Vec<(String, Value)> {
        self.finish().into_iter().map(|(name, data)| (name.to_string(), data)).collect()
    }
}

impl FromChat for responses::FromChatStream {
    fn push_chunk(&mut self, chunk: &Value) -> Vec<(String, Value)> {
        self.push(chunk)
    }

    fn finish_events(&mut self) -> Vec<(String, Value)> {
        self.finish()
    }
}

/// Turns a provider's stream events into a named-event API's events: untouched when the
/// provider speaks that API, else through chat chunks.
pub enum ToNamedEvents<T> {
    /// Already the app's events.
    Same,
    /// Through chat chunks.
    Via(Box<(ToOpenAiStream, T)>),
}

/// Provider events as Messages events.
pub type ToAnthropicStream = ToNamedEvents<anthropic::FromOpenAiStream>;
/// Provider events as Responses events.
pub type ToResponsesStream = ToNamedEvents<responses::FromChatStream>;

impl ToAnthropicStream {
    /// A translator for events in `api`'s format.
    pub fn new(api: Api) -> Self {
        ToNamedEvents::between(api, Api::Anthropic, anthropic::FromOpenAiStream::new)
    }
}

impl ToResponsesStream {
    /// A translator for events in `api`'s format, answering the app's `request`.
    pub fn new(api: Api, request: &crate::chat::ChatRequest) -> Self {
        ToNamedEvents::between(api, Api::Responses, || responses::FromChatStream::new(request))
    }
}

impl<T: FromChat> ToNamedEvents<T> {
    fn between(from: Api, to: Api, build: impl FnOnce() -> T) -> Self {
        if from == to {
            ToNamedEvents::Same
        } else {
            ToNamedEvents::Via(Box::new((ToOpenAiStream::new(from, true), build())))
        }
    }

    /// The events for one upstream event.
    pub fn push(&mut self, event: &StreamEvent) -> Vec<(String, Value)> {
        match self {
            ToNamedEvents::Same => {
                let name = event.data.get("type").and_then(Value::as_str).unwrap_or("message").to_string();
                vec![(name, event.data.clone())]
            }
            ToNamedEvents::Via(pair) => {
                let (to_chat, to_named) = &mut **pair;
                to_chat.push(event).iter().flat_map(|chunk| to_named.push_chunk(chunk)).collect()
            }
        }
    }

    /// Events owed when the stream has ended cleanly.
    pub fn finish(&mut self) -> Vec<(String, Value)> {
        match self {
            ToNamedEvents::Same => Vec::new(),
            ToNamedEvents::Via(pair) => {
                let (to_chat, to_named) = &mut **pair;
                let mut out: Vec<(String, Value)> =
                    to_chat.finish().iter().flat_map(|chunk| to_named.push_chunk(chunk)).collect();
                out.extend(to_named.finish_events());
                out
            }
        }
    }
}
