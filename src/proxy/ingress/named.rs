//! Streams from any provider in the format of a named-event ingress (Messages, Responses):
//! untouched when the provider speaks the app's API, else through chat chunks. Each such
//! ingress supplies its own [`FromChat`].

use serde_json::Value;

use crate::llm::{Api, StreamEvent};
use crate::provider::neutral::ToOpenAiStream;

/// Builds the events of an API whose streams are named events (Messages, Responses) from
/// chat chunks.
pub trait FromChat {
    /// The events for one chunk, as `(event name, data)`.
    fn push_chunk(&mut self, chunk: &Value) -> Vec<(String, Value)>;
    /// The events that close the stream.
    fn finish_events(&mut self) -> Vec<(String, Value)>;
}

/// Turns a provider's stream events into a named-event API's events: untouched when the
/// provider speaks that API, else through chat chunks.
pub enum ToNamedEvents<T> {
    /// Already the app's events.
    Same,
    /// Through chat chunks.
    Via(Box<(ToOpenAiStream, T)>),
}

impl<T: FromChat> ToNamedEvents<T> {
    /// A translator from `from`'s events to `to`'s, `build` making the chunk-to-event half.
    pub fn between(from: Api, to: Api, build: impl FnOnce() -> T) -> Self {
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
                let data = event.data();
                let name = data.get("type").and_then(Value::as_str).unwrap_or("message").to_string();
                vec![(name, data.clone())]
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
