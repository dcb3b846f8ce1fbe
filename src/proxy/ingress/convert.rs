//! Answers from any provider in the format of a named-event ingress (Messages, Responses):
//! untouched when the provider speaks the app's API, else through the neutral shape.

use serde_json::Value;

use super::{anthropic, responses};
use crate::llm::{Api, StreamEvent};
use crate::provider::neutral::{ToOpenAiStream, to_openai_completion};

/// A complete answer as an Anthropic Messages answer.
pub fn to_anthropic_message(api: Api, answer: Value) -> Value {
    match api {
        Api::Anthropic => answer,
        other => anthropic::answer::from_openai_completion(&to_openai_completion(other, &answer)),
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

impl FromChat for anthropic::stream::FromOpenAiStream {
    fn push_chunk(&mut self, chunk: &Value) -> Vec<(String, Value)> {
        self.push(chunk).into_iter().map(|(name, data)| (name.to_string(), data)).collect()
    }

    fn finish_events(&mut self) -> Vec<(String, Value)> {
        self.finish().into_iter().map(|(name, data)| (name.to_string(), data)).collect()
    }
}

impl FromChat for responses::stream::FromChatStream {
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
pub type ToAnthropicStream = ToNamedEvents<anthropic::stream::FromOpenAiStream>;
/// Provider events as Responses events.
pub type ToResponsesStream = ToNamedEvents<responses::stream::FromChatStream>;

impl ToAnthropicStream {
    /// A translator for events in `api`'s format.
    pub fn new(api: Api) -> Self {
        ToNamedEvents::between(api, Api::Anthropic, anthropic::stream::FromOpenAiStream::new)
    }
}

impl ToResponsesStream {
    /// A translator for events in `api`'s format, answering the app's `request`.
    pub fn new(api: Api, request: &crate::llm::ChatRequest) -> Self {
        ToNamedEvents::between(api, Api::Responses, || responses::stream::FromChatStream::new(request))
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
