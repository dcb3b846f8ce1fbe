//! An incremental decoder for server-sent events (the WHATWG `text/event-stream` format).
//!
//! Written here rather than taken from a crate because the sidecar must bound what it buffers:
//! an upstream that sends an endless line must fail the attempt, not grow memory.

use bytes::{Buf, BytesMut};
use futures_util::stream;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::llm::FailureClass;
use crate::llm::{AttemptError, ChunkStream, StreamEvent};

/// The largest single stream event read from an upstream.
pub const MAX_EVENT_BYTES: usize = 4 << 20;

/// What one SSE event means in a provider's stream format.
#[derive(Debug)]
pub enum Parsed {
    /// An event to pass on.
    Event(StreamEvent),
    /// Nothing to pass on (a ping, a comment).
    Skip,
    /// The provider's end marker: the stream ended cleanly.
    End,
    /// An error event, or an event that cannot be read.
    Fail(AttemptError),
}

/// A provider's stream format, one event at a time.
pub trait WireStream: Send + 'static {
    /// Interprets one event.
    fn event(&mut self, event: Event) -> Parsed;
    /// Whether the body may end here without an end marker and still be complete.
    fn may_end(&self) -> bool;
}

/// An event's data as JSON, or the failure an undecodable event is.
pub fn json_data(data: &str) -> Result<serde_json::Value, AttemptError> {
    serde_json::from_str(data)
        .map_err(|e| AttemptError::new(FailureClass::ServerError, format!("undecodable stream event: {e}")))
}

struct Reader<P> {
    body: Incoming,
    decoder: Decoder,
    parser: P,
    finished: bool,
}

/// Turns an SSE response body into the provider's events. An early end, an undecodable or
/// oversized event, and an error event are `Err` items, after which the stream ends.
pub fn event_stream<P: WireStream>(body: Incoming, parser: P) -> ChunkStream {
    let reader = Reader { body, decoder: Decoder::new(MAX_EVENT_BYTES), parser, finished: false };
    Box::pin(stream::unfold(reader, |mut reader| async move {
        loop {
            if reader.finished {
                return None;
            }
            let next = match reader.decoder.next_event() {
                Ok(next) => next,
                Err(too_large) => {
                    reader.finished = true;
                    return Some((Err(AttemptError::new(FailureClass::ServerError, too_large.to_string())), reader));
                }
            };
            if let Some(event) = next {
                match reader.parser.event(event) {
                    Parsed::Event(event) => return Some((Ok(event), reader)),
                    Parsed::Skip => continue,
                    Parsed::End => return None,
                    Parsed::Fail(error) => {
                        reader.finished = true;
                        return Some((Err(error), reader));
                    }
                }
            }
            match reader.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        reader.decoder.push(&data);
                    }
                }
                Some(Err(e)) => {
                    reader.finished = true;
                    let error = AttemptError::new(FailureClass::ServerError, format!("stream broke off: {e}"));
                    return Some((Err(error), reader));
                }
                None => {
                    reader.finished = true;
                    if let Some(event) = reader.decoder.finish() {
                        match reader.parser.event(event) {
                            Parsed::Event(event) => return Some((Ok(event), reader)),
                            Parsed::End => return None,
                            Parsed::Fail(error) => return Some((Err(error), reader)),
                            Parsed::Skip => {}
                        }
                    }
                    if reader.parser.may_end() {
                        return None;
                    }
                    let error = AttemptError::new(FailureClass::ServerError, "stream ended before its end marker");
                    return Some((Err(error), reader));
                }
            }
        }
    }))
}

/// One decoded event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The `event:` field, if any.
    pub event: Option<String>,
    /// The `data:` lines, joined with `\n`.
    pub data: String,
}

/// An event or line longer than the decoder's limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("server-sent event larger than {limit} bytes")]
pub struct TooLarge {
    /// The limit that was exceeded.
    pub limit: usize,
}

/// Feeds on bytes as they arrive and yields complete events.
#[derive(Debug)]
pub struct Decoder {
    buffer: BytesMut,
    event: Option<String>,
    data: String,
    has_data: bool,
    limit: usize,
}

impl Decoder {
    /// A decoder that fails on any event or line larger than `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Decoder { buffer: BytesMut::new(), event: None, data: String::new(), has_data: false, limit }
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The next complete event, if the buffered bytes hold one.
    pub fn next_event(&mut self) -> Result<Option<Event>, TooLarge> {
        loop {
            let Some(end) = self.buffer.iter().position(|b| *b == b'\n' || *b == b'\r') else {
                if self.buffer.len() + self.data.len() > self.limit {
                    return Err(TooLarge { limit: self.limit });
                }
                return Ok(None);
            };
            // A lone `\r` at the end of the buffer may be the first half of `\r\n`.
            if self.buffer[end] == b'\r' && end + 1 == self.buffer.len() {
                return Ok(None);
            }
            let line = self.buffer.split_to(end);
            let newline = if self.buffer.starts_with(b"\r\n") { 2 } else { 1 };
            self.buffer.advance(newline);
            if let Some(event) = self.line(&line)? {
                return Ok(Some(event));
            }
        }
    }

    /// The event left unterminated when the stream ended, if any.
    pub fn finish(&mut self) -> Option<Event> {
        if !self.buffer.is_empty() {
            let line = self.buffer.split();
            // Only an over-limit line can fail, and `next_event` has already bounded it.
            if let Ok(Some(event)) = self.line(&line) {
                return Some(event);
            }
        }
        self.dispatch()
    }

    fn line(&mut self, line: &[u8]) -> Result<Option<Event>, TooLarge> {
        if line.is_empty() {
            return Ok(self.dispatch());
        }
        if line[0] == b':' {
            return Ok(None);
        }
        let line = String::from_utf8_lossy(line);
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line.as_ref(), ""),
        };
        match field {
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
                if self.data.len() > self.limit {
                    return Err(TooLarge { limit: self.limit });
                }
            }
            "event" => self.event = Some(value.to_string()),
            _ => {}
        }
        Ok(None)
    }

    fn dispatch(&mut self) -> Option<Event> {
        let event = self.event.take();
        if !self.has_data {
            return None;
        }
        self.has_data = false;
        Some(Event { event, data: std::mem::take(&mut self.data) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(chunks: &[&[u8]]) -> Vec<Event> {
        let mut decoder = Decoder::new(1024);
        let mut out = Vec::new();
        for chunk in chunks {
            decoder.push(chunk);
            while let Some(event) = decoder.next_event().expect("within limit") {
                out.push(event);
            }
        }
        out.extend(decoder.finish());
        out
    }

    #[test]
    fn decodes_across_arbitrary_splits() {
        let stream = b"data: {\"a\":1}\n\n: comment\nevent: message_start\ndata: x\ndata: y\r\n\r\ndata: [DONE]\n\n";
        let whole = decode_all(&[stream]);
        assert_eq!(
            whole,
            vec![
                Event { event: None, data: "{\"a\":1}".into() },
                Event { event: Some("message_start".into()), data: "x\ny".into() },
                Event { event: None, data: "[DONE]".into() },
            ]
        );
        for split in 1..stream.len() {
            let (a, b) = stream.split_at(split);
            assert_eq!(decode_all(&[a, b]), whole, "split at {split}");
        }
        let bytewise: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(decode_all(&bytewise), whole);
    }

    #[test]
    fn unterminated_last_event_is_returned_on_finish() {
        assert_eq!(decode_all(&[b"data: tail"]), vec![Event { event: None, data: "tail".into() }]);
    }

    #[test]
    fn bounds_what_it_buffers() {
        let mut decoder = Decoder::new(16);
        decoder.push(&[b'x'; 64]);
        assert_eq!(decoder.next_event(), Err(TooLarge { limit: 16 }));
        let mut decoder = Decoder::new(16);
        decoder.push(b"data: 0123456789\ndata: 0123456789\n");
        assert!(decoder.next_event().is_err());
    }
}
