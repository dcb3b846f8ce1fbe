//! Backstop: an LLM fallback layer for Kubernetes.
//!
//! The sidecar ([`proxy`]) takes an app's OpenAI-style requests on loopback and walks an
//! ordered chain of provider targets ([`chain`]) until one answers, retrying, timing out and
//! falling through as the `FallbackPolicy` ([`policy`]) says. Policies come from a watched file
//! today ([`control`]); the operator's config stream comes next.

pub mod chain;
pub mod chat;
pub mod control;
pub mod fuzzing;
pub mod health;
pub mod policy;
pub mod provider;
pub mod proxy;
pub mod telemetry;
