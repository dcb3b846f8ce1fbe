//! A provider's successful answer: whole, or a stream of events, each still in the provider's
//! own wire format and flagged with what the fallback loop needs to know of it.

use std::pin::Pin;
use std::sync::OnceLock;

use bytes::Bytes;
use futures_util::Stream;
use serde_json::Value;

use super::AttemptError;

/// A successful answer, in the provider's own format (see [`Sent::api`]).
pub enum Reply {
    /// A whole answer.
    Complete(Whole),
    /// Events as they arrive. The stream ends after the provider's end marker; an early end
    /// or an error event is an `Err` item.
    Stream(ChunkStream),
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reply::Complete(whole) => f.debug_tuple("Complete").field(whole.json()).finish(),
            Reply::Stream(_) => f.write_str("Stream(..)"),
        }
    }
}

/// A whole answer: its JSON, and the bytes it arrived as when it was read off the wire. An app
/// that speaks the provider's own API gets those bytes as they are, not decoded and encoded
/// again; an answer whose reader checked it in place is decoded only if something asks.
#[derive(Clone, Debug)]
pub struct Whole {
    /// The answer, decoded from `raw` on first use.
    json: OnceLock<Value>,
    /// Its bytes as the provider sent them; `None` for an answer built here (a translation,
    /// the mock provider).
    pub raw: Option<Bytes>,
}

impl Whole {
    /// An answer read off the wire and decoded.
    pub fn decoded(json: Value, raw: Bytes) -> Whole {
        Whole { json: OnceLock::from(json), raw: Some(raw) }
    }

    /// An answer read off the wire whose reader checked it is a JSON object, not yet decoded.
    pub fn undecoded(raw: Bytes) -> Whole {
        Whole { json: OnceLock::new(), raw: Some(raw) }
    }

    /// The answer.
    pub fn json(&self) -> &Value {
        self.json.get_or_init(|| decode_bytes(self.raw.as_deref()))
    }

    /// The answer if it is decoded already.
    pub fn json_if_decoded(&self) -> Option<&Value> {
        self.json.get()
    }

    /// The answer, taken.
    pub fn into_json(self) -> Value {
        self.json.into_inner().unwrap_or_else(|| decode_bytes(self.raw.as_deref()))
    }
}

impl From<Value> for Whole {
    fn from(json: Value) -> Whole {
        Whole { json: OnceLock::from(json), raw: None }
    }
}

/// A stream of a provider's events.
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<StreamEvent, AttemptError>> + Send>>;

/// One streamed event in its provider's own format, with what the fallback loop needs to
/// know of it.
///
/// An event read off the wire keeps its text: an app that speaks the provider's API gets it as
/// it came, and its JSON is decoded only if something asks for it (a translation, a resume).
#[derive(Clone, Debug)]
pub struct StreamEvent {
    /// The event's data as the provider sent it, while it is still what `json` holds.
    text: Option<String>,
    /// The event's JSON payload, decoded from `text` on first use.
    json: OnceLock<Value>,
    /// It carries text, a refusal or a tool call the app will see: it commits a held stream.
    pub content: bool,
    /// It shows the model working: content, or thinking the app may not see. The first one
    /// ends the wait for a first token; after it, only gaps between events are bounded.
    pub progress: bool,
    /// It ends the answer (a finish or stop reason).
    pub end: bool,
}

impl StreamEvent {
    /// An event built here, or already decoded.
    pub fn new(data: Value, content: bool, progress: bool, end: bool) -> Self {
        StreamEvent { text: None, json: OnceLock::from(data), content, progress, end }
    }

    /// An event kept as the provider's text, which its parser has checked is a JSON object.
    pub fn from_text(text: String, content: bool, progress: bool, end: bool) -> Self {
        StreamEvent { text: Some(text), json: OnceLock::new(), content, progress, end }
    }

    /// The event's JSON payload.
    pub fn data(&self) -> &Value {
        self.json.get_or_init(|| decode(self.text.as_deref()))
    }

    /// Changes the payload; the event no longer passes on as the provider sent it.
    pub fn edit(&mut self, change: impl FnOnce(&mut Value)) {
        let mut json = std::mem::take(&mut self.json).into_inner().unwrap_or_else(|| decode(self.text.as_deref()));
        change(&mut json);
        self.text = None;
        self.json = OnceLock::from(json);
    }

    /// The event's data exactly as the provider sent it, if it was read off the wire and not
    /// changed since.
    pub fn text(&self) -> Option<&str> {
        self.text.as_deref()
    }
}

/// An event's text as JSON. Its parser checked that it is a JSON object; text that is not
/// decodes as `Null`.
fn decode(text: Option<&str>) -> Value {
    decode_bytes(text.map(str::as_bytes))
}

/// Bytes as JSON, as [`decode`] reads text.
fn decode_bytes(bytes: Option<&[u8]>) -> Value {
    bytes.and_then(|bytes| serde_json::from_slice(bytes).ok()).unwrap_or_default()
}

/// One embedding as OpenAI writes it: a float array, or with `encoding_format: base64`
/// (the OpenAI SDKs' default) the little-endian `f32`s, base64-encoded.
pub(crate) fn embedding_value(values: &[f64], base64: bool) -> Value {
    use base64::Engine as _;
    if !base64 {
        return Value::from(values.to_vec());
    }
    let bytes: Vec<u8> = values.iter().flat_map(|v| (*v as f32).to_le_bytes()).collect();
    Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embeddings_encode_as_the_sdks_expect() {
        assert_eq!(embedding_value(&[1.0, -0.5], false), serde_json::json!([1.0, -0.5]));
        assert_eq!(embedding_value(&[1.0, -0.5], true), serde_json::json!("AACAPwAAAL8="));
    }

    #[test]
    fn a_payload_kept_as_text_is_decoded_when_asked_and_an_edit_drops_the_text() {
        let text = r#"{"id": "c", "usage": {"total_tokens": 4}}"#;
        let whole = Whole::undecoded(Bytes::from_static(text.as_bytes()));
        assert_eq!(whole.json(), &serde_json::json!({"id": "c", "usage": {"total_tokens": 4}}));
        assert_eq!(whole.clone().into_json(), whole.json().clone());
        assert_eq!(whole.raw.as_deref(), Some(text.as_bytes()), "the bytes stay for the app");
        let mut event = StreamEvent::from_text(text.to_string(), false, false, false);
        assert_eq!(event.text(), Some(text));
        event.edit(|data| data["usage"]["total_tokens"] = serde_json::json!(9));
        assert_eq!(event.text(), None, "changed, it no longer passes on as the provider sent it");
        assert_eq!(event.data()["usage"]["total_tokens"], 9);
        assert_eq!(event.data()["id"], "c");
    }
}
