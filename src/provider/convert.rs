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

/// Turns a provider's stream events into Messages events `(event name, data)`.
pub enum ToAnthropicStream {
    /// Already Messages events.
    Same,
    /// Through OpenAI chunks.
    Via(Box<(ToOpenAiStream, anthropic::FromOpenAiStream)>),
}

impl ToAnthropicStream {
    /// A translator for events in `api`'s format.
    pub fn new(api: Api) -> Self {
        match api {
            Api::Anthropic => ToAnthropicStream::Same,
            other => {
                ToAnthropicStream::Via(Box::new((ToOpenAiStream::new(other, true), anthropic::FromOpenAiStream::new())))
            }
        }
    }

    /// The events for one upstream event.
    pub fn push(&mut self, event: &StreamEvent) -> Vec<(String, Value)> {
        match self {
            ToAnthropicStream::Same => {
                let name = event.data.get("type").and_then(Value::as_str).unwrap_or("message").to_string();
                vec![(name, event.data.clone())]
            }
            ToAnthropicStream::Via(pair) => {
                let (to_openai, to_anthropic) = &mut **pair;
                to_openai
                    .push(event)
                    .iter()
                    .flat_map(|chunk| to_anthropic.push(chunk))
                    .map(|(name, data)| (name.to_string(), data))
                    .collect()
            }
        }
    }

    /// Events owed when the stream has ended cleanly.
    pub fn finish(&mut self) -> Vec<(String, Value)> {
        match self {
            ToAnthropicStream::Same => Vec::new(),
            ToAnthropicStream::Via(pair) => {
                let (to_openai, to_anthropic) = &mut **pair;
                let mut out: Vec<(String, Value)> = to_openai
                    .finish()
                    .iter()
                    .flat_map(|chunk| to_anthropic.push(chunk))
                    .map(|(name, data)| (name.to_string(), data))
                    .collect();
                out.extend(to_anthropic.finish().into_iter().map(|(name, data)| (name.to_string(), data)));
                out
            }
        }
    }
}

/// Turns a provider's stream events into Responses events `(event type, data)`.
pub enum ToResponsesStream {
    /// Already Responses events.
    Same,
    /// Through chat chunks.
    Via(Box<(ToOpenAiStream, responses::FromChatStream)>),
}

impl ToResponsesStream {
    /// A translator for events in `api`'s format, answering the app's `request`.
    pub fn new(api: Api, request: &crate::chat::ChatRequest) -> Self {
        match api {
            Api::Responses => ToResponsesStream::Same,
            other => ToResponsesStream::Via(Box::new((
                ToOpenAiStream::new(other, true),
                responses::FromChatStream::new(request),
            ))),
        }
    }

    /// The events for one upstream event.
    pub fn push(&mut self, event: &StreamEvent) -> Vec<(String, Value)> {
        match self {
            ToResponsesStream::Same => {
                let name = event.data.get("type").and_then(Value::as_str).unwrap_or("message").to_string();
                vec![(name, event.data.clone())]
            }
            ToResponsesStream::Via(pair) => {
                let (to_chat, to_responses) = &mut **pair;
                to_chat.push(event).iter().flat_map(|chunk| to_responses.push(chunk)).collect()
            }
        }
    }

    /// Events owed when the stream has ended cleanly.
    pub fn finish(&mut self) -> Vec<(String, Value)> {
        match self {
            ToResponsesStream::Same => Vec::new(),
            ToResponsesStream::Via(pair) => {
                let (to_chat, to_responses) = &mut **pair;
                let mut out: Vec<(String, Value)> =
                    to_chat.finish().iter().flat_map(|chunk| to_responses.push(chunk)).collect();
                out.extend(to_responses.finish());
                out
            }
        }
    }
}
