//! The provider-neutral side of every request, and the runtime vocabulary every layer above
//! shares: what an app asked for ([`request`]) and what kinds of request it is ([`feature`]),
//! what a provider answered ([`answer`]), how an attempt failed ([`failure`], [`outcome`]), what
//! its rate-limit headers said ([`ratelimit`], in the Go duration syntax of [`go_duration`]),
//! and the one table that maps failures to HTTP statuses and each API's error types
//! ([`status`]). Every ingress parses into these types and every provider translates from them,
//! so nothing here knows a wire format but the neutral one. It imports nothing of Backstop.

pub mod answer;
pub mod failure;
pub mod feature;
pub mod go_duration;
pub mod outcome;
pub mod ratelimit;
pub mod request;
pub mod status;
pub mod view;

use std::time::{SystemTime, UNIX_EPOCH};

pub use answer::{ChunkStream, Reply, StreamEvent, Whole};
pub use failure::{ClassSet, FailureClass};
pub use feature::RequestFeature;
pub use outcome::AttemptError;
pub use request::{ChatRequest, InvalidRequest, Message, Operation, Origin};

/// A wire API that requests and answers can be written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Api {
    /// OpenAI Chat Completions (and every OpenAI-compatible server): the neutral shape.
    OpenAi,
    /// Anthropic Messages.
    Anthropic,
    /// Google Gemini `generateContent`.
    Gemini,
    /// OpenAI Responses (`/v1/responses`).
    Responses,
}

impl Api {
    /// A short name for logs and reasons.
    pub fn as_str(self) -> &'static str {
        match self {
            Api::OpenAi => "openai",
            Api::Anthropic => "anthropic",
            Api::Gemini => "gemini",
            Api::Responses => "responses",
        }
    }
}

/// Seconds since the Unix epoch, for the `created` fields of translated answers.
pub fn unix_seconds() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
