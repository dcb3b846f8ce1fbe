//! What one request leaves in telemetry, following the OpenTelemetry GenAI conventions:
//!
//! - a SERVER span (`chat {alias}`) for the app's request, continuing the app's trace, with the
//!   route, the answering target, the attempt count, the fallback reason and the app's own
//!   parameters (`gen_ai.request.*`), a
//!   `backstop.fallback` event for each fall-through (from, to, reason) and a
//!   `backstop.skipped` event for each target passed over without an attempt;
//! - a CLIENT span (`chat {model}`) for every attempt, credited to the target that made it,
//!   with its provider, models, response id, finish reasons, tokens (cached ones too), time to
//!   first chunk, failure class and cost; its id is the one that went upstream in `traceparent`;
//! - metrics: `gen_ai.client.operation.duration`, `gen_ai.client.token.usage` and
//!   `gen_ai.client.operation.time_to_first_chunk` per attempt, and Backstop's own (requests,
//!   attempts per request, fallbacks, hedges, cost), labelled by route and target only, so the
//!   policy bounds their cardinality;
//! - a structured log record per fall-through, in the request's trace.
//!
//! Everything is built once the request ends (for a stream, once the stream ends), from the
//! [`RequestRecord`](crate::proxy::fallback::RequestRecord) the fallback walk made: nothing here
//! runs while an attempt is in flight, and strings are made only here, as telemetry encodes
//! them. No prompt or completion text is recorded. The instruments and the recorder are in
//! [`instruments`], a request's spans, logs and metrics in [`finish`], a relayed stream's watcher
//! in [`stream`].

mod finish;
mod instruments;
mod stream;

pub use finish::{Observation, RequestFacts, Summary};
pub use instruments::Recorder;
pub use stream::StreamObserver;
