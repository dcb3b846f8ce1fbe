//! A neutral (Chat Completions) answer or stream chunk read in place: what the fallback loop,
//! the renderer and telemetry need of it, borrowed from its text, with no JSON tree built.
//!
//! Only the usual shape is read here. One with a field of an unexpected type, a key given
//! twice, an escaped `id`, `model` or finish reason, or an `error` object gives `None`, and its
//! reader decodes it whole instead; so does text that decoding would refuse anywhere, in the
//! fields read or not (a lone surrogate escape, a number out of range, nesting too deep, bytes
//! that are not UTF-8). Wherever this reading answers, it agrees with the whole one (a property
//! the fuzz targets check).

use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::value::MapAccessDeserializer;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// What a chat answer or chunk says, borrowed from its text.
#[derive(Debug, Default, Deserialize)]
pub struct ChatView<'a> {
    /// `id`.
    #[serde(borrow)]
    pub id: Option<&'a str>,
    /// `model`.
    #[serde(borrow)]
    pub model: Option<&'a str>,
    /// `choices`, folded.
    #[serde(borrow)]
    pub choices: Option<Choices<'a>>,
    /// `usage`.
    pub usage: Option<Object<Usage>>,
    #[serde(default)]
    error: Shape,
}

impl<'a> ChatView<'a> {
    /// The answer or chunk in `text`, if it has the usual shape and would decode.
    pub fn read(text: &'a str) -> Option<Self> {
        serde_json::from_str::<Checked>(text).ok()?;
        Self::reread(text)
    }

    /// The answer or chunk in `bytes`, if it has the usual shape and would decode.
    pub fn read_bytes(bytes: &'a [u8]) -> Option<Self> {
        serde_json::from_slice::<Checked>(bytes).ok()?;
        Self::reread_bytes(bytes)
    }

    /// [`read`](Self::read) again, for text that has passed it (or decoded) once: its shape
    /// only, not every value again.
    pub fn reread(text: &'a str) -> Option<Self> {
        Self::usual(serde_json::from_str::<Object<ChatView<'a>>>(text))
    }

    /// [`reread`](Self::reread) for bytes.
    pub fn reread_bytes(bytes: &'a [u8]) -> Option<Self> {
        Self::usual(serde_json::from_slice::<Object<ChatView<'a>>>(bytes))
    }

    fn usual(read: serde_json::Result<Object<ChatView<'a>>>) -> Option<Self> {
        let Object(view) = read.ok()?;
        (view.error != Shape::Object).then_some(view)
    }

    fn choices(&self) -> &Choices<'a> {
        const NONE: &Choices<'static> = &Choices::EMPTY;
        self.choices.as_ref().unwrap_or(NONE)
    }

    /// A choice's delta has text, a refusal or a tool call (a finish alone does not count).
    pub fn content(&self) -> bool {
        self.choices().content
    }

    /// A choice's message (a whole answer's) has text, a refusal or a tool call.
    pub fn message_content(&self) -> bool {
        self.choices().message_content
    }

    /// A whole answer whose every choice the provider's content filter ended, with nothing to
    /// show.
    pub fn filtered_without_content(&self) -> bool {
        let choices = self.choices();
        choices.count > 0 && choices.all_filtered && !choices.message_content
    }

    /// A choice's delta has reasoning (`reasoning_content`, `reasoning`).
    pub fn reasoning(&self) -> bool {
        self.choices().reasoning
    }

    /// A choice has a finish reason.
    pub fn end(&self) -> bool {
        self.choices().end
    }

    /// The choices' finish reasons that are not empty, in order.
    pub fn finish_reasons(&self) -> &[&'a str] {
        &self.choices().finish_reasons
    }

    /// Usage alone: `choices` is an empty list and `usage` is given.
    pub fn usage_only(&self) -> bool {
        self.choices.as_ref().is_some_and(|c| c.count == 0) && self.usage.is_some()
    }
}

/// `choices`, folded into what any of them says.
#[derive(Debug, Default)]
pub struct Choices<'a> {
    count: usize,
    content: bool,
    message_content: bool,
    all_filtered: bool,
    reasoning: bool,
    end: bool,
    finish_reasons: Vec<&'a str>,
}

impl Choices<'_> {
    const EMPTY: Choices<'static> = Choices {
        count: 0,
        content: false,
        message_content: false,
        all_filtered: true,
        reasoning: false,
        end: false,
        finish_reasons: Vec::new(),
    };
}

impl<'de: 'a, 'a> Deserialize<'de> for Choices<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fold<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for Fold<'a> {
            type Value = Choices<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of choices")
            }
            fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Choices<'a>, S::Error> {
                let mut choices = Choices { all_filtered: true, ..Choices::default() };
                while let Some(Object(choice)) = seq.next_element::<Object<Choice<'a>>>()? {
                    choices.count += 1;
                    if let Some(Object(delta)) = &choice.delta {
                        choices.content |= delta.content();
                        choices.reasoning |= delta.reasoning_content.is_text() || delta.reasoning.is_text();
                    }
                    if let Some(Object(message)) = &choice.message {
                        choices.message_content |= message.content();
                    }
                    choices.all_filtered &= choice.finish_reason == Some("content_filter");
                    if let Some(reason) = choice.finish_reason {
                        choices.end = true;
                        if !reason.is_empty() {
                            choices.finish_reasons.push(reason);
                        }
                    }
                }
                Ok(choices)
            }
        }
        deserializer.deserialize_seq(Fold(PhantomData))
    }
}

#[derive(Deserialize)]
struct Choice<'a> {
    delta: Option<Object<Delta>>,
    message: Option<Object<Delta>>,
    #[serde(borrow)]
    finish_reason: Option<&'a str>,
}

/// A chunk's `delta` or an answer's `message`.
#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    content: Shape,
    #[serde(default)]
    refusal: Shape,
    #[serde(default)]
    tool_calls: Shape,
    #[serde(default)]
    function_call: Shape,
    #[serde(default)]
    reasoning_content: Shape,
    #[serde(default)]
    reasoning: Shape,
}

impl Delta {
    fn content(&self) -> bool {
        self.content.is_text()
            || self.refusal.is_text()
            || self.tool_calls == Shape::List { empty: false }
            || self.function_call == Shape::Object
            || self.content == Shape::List { empty: false }
    }
}

/// `usage`'s token counts.
#[derive(Debug, Deserialize)]
pub struct Usage {
    /// `prompt_tokens`.
    pub prompt_tokens: Option<u64>,
    /// `completion_tokens`.
    pub completion_tokens: Option<u64>,
    prompt_tokens_details: Option<Object<Details>>,
}

impl Usage {
    /// `prompt_tokens_details.cached_tokens`.
    pub fn cached_tokens(&self) -> Option<u64> {
        self.prompt_tokens_details.as_ref().and_then(|Object(details)| details.cached_tokens)
    }
}

#[derive(Debug, Deserialize)]
struct Details {
    cached_tokens: Option<u64>,
}

/// A JSON object read as `T`; anything else (an array, which a derived struct would otherwise
/// read field by field) is an error.
#[derive(Debug)]
pub struct Object<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Map<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for Map<T> {
            type Value = Object<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Object<T>, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map)).map(Object)
            }
        }
        deserializer.deserialize_map(Map(PhantomData))
    }
}

/// Any JSON value, checked as decoding it into a `Value` checks it (escapes and UTF-8, number
/// range, nesting depth) but not kept. Fields the view does not read are otherwise skipped
/// with fewer checks.
struct Checked;

impl<'de> Deserialize<'de> for Checked {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Check;
        impl<'de> Visitor<'de> for Check {
            type Value = Checked;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Checked, E> {
                Ok(Checked)
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Checked, E> {
                Ok(Checked)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Checked, E> {
                Ok(Checked)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Checked, E> {
                Ok(Checked)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Checked, E> {
                Ok(Checked)
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Checked, E> {
                Ok(Checked)
            }
            fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Checked, S::Error> {
                while seq.next_element::<Checked>()?.is_some() {}
                Ok(Checked)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Checked, A::Error> {
                while map.next_entry::<Checked, Checked>()?.is_some() {}
                Ok(Checked)
            }
        }
        deserializer.deserialize_any(Check)
    }
}

/// What a field holds, as far as showing something goes; read without copying it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Shape {
    #[default]
    Absent,
    Null,
    Text {
        empty: bool,
    },
    List {
        empty: bool,
    },
    Object,
    Other,
}

impl Shape {
    fn is_text(self) -> bool {
        self == Shape::Text { empty: false }
    }
}

impl<'de> Deserialize<'de> for Shape {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Look;
        impl<'de> Visitor<'de> for Look {
            type Value = Shape;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Shape, E> {
                Ok(Shape::Null)
            }
            fn visit_none<E: de::Error>(self) -> Result<Shape, E> {
                Ok(Shape::Null)
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Shape, E> {
                Ok(Shape::Other)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Shape, E> {
                Ok(Shape::Other)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Shape, E> {
                Ok(Shape::Other)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Shape, E> {
                Ok(Shape::Other)
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Shape, E> {
                Ok(Shape::Text { empty: text.is_empty() })
            }
            fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Shape, S::Error> {
                let mut empty = true;
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    empty = false;
                }
                Ok(Shape::List { empty })
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Shape, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Shape::Object)
            }
        }
        deserializer.deserialize_any(Look)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_is_read_in_place() {
        let text = r#"{"id":"c","object":"chat.completion.chunk","model":"m","choices":[
            {"index":0,"delta":{"content":"Hi\n\"there\""},"logprobs":null,"finish_reason":null},
            {"index":1,"delta":{"reasoning_content":"hm"},"finish_reason":"stop"},
            {"index":2,"delta":{},"finish_reason":""}],
            "usage":{"prompt_tokens":3,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":2}}}"#;
        let view = ChatView::read(text).expect("the usual shape");
        assert_eq!((view.id, view.model), (Some("c"), Some("m")));
        assert_eq!((view.content(), view.reasoning(), view.end()), (true, true, true));
        assert_eq!(view.finish_reasons(), ["stop"]);
        assert!(!view.usage_only());
        let Some(Object(usage)) = &view.usage else { panic!("usage") };
        assert_eq!((usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens()), (Some(3), Some(1), Some(2)));
        let usage_only = ChatView::read(r#"{"choices":[],"usage":{"total_tokens":4}}"#).expect("usual");
        assert!(usage_only.usage_only() && !usage_only.end());
        assert!(!ChatView::read(r#"{"choices":[],"usage":null}"#).expect("usual").usage_only());
    }

    #[test]
    fn a_whole_answer_is_read_in_place() {
        let answer = |message: &str, finish: &str| {
            format!(r#"{{"id":"a","choices":[{{"index":0,"message":{message},"finish_reason":{finish}}}]}}"#)
        };
        let read = |text: &str| {
            let view = ChatView::read_bytes(text.as_bytes()).expect("the usual shape");
            (view.message_content(), view.filtered_without_content(), view.content())
        };
        assert_eq!(read(&answer(r#"{"role":"assistant","content":"Hi"}"#, r#""stop""#)), (true, false, false));
        assert_eq!(
            read(&answer(r#"{"role":"assistant","content":null}"#, r#""content_filter""#)),
            (false, true, false)
        );
        assert_eq!(read(&answer(r#"{"content":"part"}"#, r#""content_filter""#)), (true, false, false));
        assert_eq!(read(&answer(r#"{"tool_calls":[{"id":"t"}]}"#, r#""tool_calls""#)), (true, false, false));
        assert_eq!(read(&answer(r#"{"content":""}"#, "null")), (false, false, false));
        assert_eq!(read(r#"{"choices":[]}"#), (false, false, false), "no choice is not a filtered one");
    }

    #[test]
    fn an_unusual_chunk_is_left_to_the_whole_reading() {
        for text in [
            r#"[{"delta": {"content": "x"}}]"#,
            r#"{"choices": [[{"content": "x"}, "stop"]]}"#,
            r#"{"choices": [{"delta": {"content": "x"}, "delta": {}}]}"#,
            r#"{"id": "a\u0062"}"#,
            r#"{"choices": {"0": {"delta": {"content": "x"}}}}"#,
            r#"{"choices": [{"finish_reason": 1}]}"#,
            r#"{"usage": {"prompt_tokens": 1.5}}"#,
            r#"{"error": {"message": "overloaded"}}"#,
            r#"{"choices": []} trailing"#,
            // Refused by decoding, though in fields the view does not read.
            r#"{"choices": [{"delta": {"tool_calls": [{"function": {"arguments": "\ud83d"}}]}}]}"#,
            r#"{"choices": [], "created": 1e400}"#,
        ] {
            assert!(ChatView::read(text).is_none(), "{text}");
        }
        assert!(ChatView::read(r#"{"error": null, "choices": []}"#).is_some());
        let deep = format!(r#"{{"choices": [], "x": {}{}}}"#, "[".repeat(200), "]".repeat(200));
        assert!(ChatView::read(&deep).is_none(), "nested deeper than decoding takes");
        assert!(ChatView::reread(&deep).is_some(), "a reread checks the shape only");
        let not_utf8 = b"{\"choices\": [{\"message\": {\"content\": \"Hi\"}, \"logprobs\": \"\xff\"}]}";
        assert!(ChatView::read_bytes(not_utf8).is_none());
        assert!(serde_json::from_slice::<serde_json::Value>(not_utf8).is_err(), "as decoding refuses it");
    }
}
