//! Backstop: an LLM fallback layer for Kubernetes.
//!
//! The modules, in the order their imports flow:
//!
//! - [`policy`] — the `FallbackPolicy` custom resource as users write it; no I/O.
//! - [`backoff`] — doubling waits and their jitter, for every place that waits after a failure.
//! - [`llm`] — the provider-neutral request, answer, stream events and failure outcome.
//! - [`chain`] — a policy compiled into plain data (routes, chains, settings, resolved keys).
//! - [`health`] — circuit breakers, balancing inputs and retry budgets.
//! - [`provider`] — one folder per upstream wire API, built from compiled provider configs.
//! - [`snapshot`] — a compiled policy bound to live providers and health, published atomically.
//! - [`proxy`] — the sidecar's listeners, one ingress per API, and the fallback loop.
//! - [`configstream`] — the config stream's versioned contract, shared by both halves.
//! - [`control`] — where a sidecar's policies come from.
//! - [`operator`] — the controller behind `kubectl apply`: compiles policies, writes status, serves them.
//! - [`net`] — the network plumbing both halves share: listeners, bodies, the HTTPS client.
//! - [`telemetry`] — logs and metrics.

pub mod backoff;
pub mod chain;
pub mod configstream;
pub mod control;
pub mod health;
pub mod llm;
pub mod net;
pub mod operator;
pub mod policy;
pub mod provider;
pub mod proxy;
pub mod snapshot;
pub mod telemetry;

#[cfg(any(test, fuzzing))]
pub mod fuzzing;
#[cfg(test)]
mod testing;
