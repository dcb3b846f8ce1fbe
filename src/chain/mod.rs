//! A policy compiled into plain data: what a `FallbackPolicy` means, checked completely, with
//! defaults filled in and keys resolved, and nothing live inside: no HTTP clients, no health
//! state. [`compile`] is the one compiler, used alike by the sidecar for a policy file, by the
//! operator for a resource, and by `backstop check`; a [`CompiledPolicy`] serializes for the
//! config stream and has a content [`digest`](CompiledPolicy::digest) that versions it. The
//! sidecar binds it to live providers and health in [`crate::snapshot`].

pub mod adapt;
pub mod defaults;
pub mod error;
pub mod keys;
pub mod overrides;
pub mod policy_duration;
pub mod providers;
pub mod redact;
pub mod settings;

mod compile;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use adapt::Adaptation;
pub use compile::compile;
pub use error::{FieldError, InvalidPolicy};
pub use keys::{ApiKey, CheckKeys, KeyError, KeyResolver, LocalKeys};
pub use overrides::{TargetOverride, unix_ms_now};
pub use policy_duration::parse_duration;
pub use providers::{CompiledProvider, MockBehaviour};
pub use redact::REDACTED;
pub use settings::{
    AllowedOverrides, BreakerSettings, BudgetSettings, CACHE_WRITE_MARKUP, FailureRate, Hedge, Price, RetryPolicy,
    SpendLimit, Timeouts, Verify,
};

use crate::llm::{ClassSet, RequestFeature};
use crate::policy::MidStream;

/// A compiled, valid policy: plain data, equal when the policies mean the same.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CompiledPolicy {
    /// `namespace/name` of the policy it came from.
    pub source: String,
    /// `spec.providers`, in policy order; targets refer to them by index.
    pub providers: Vec<CompiledProvider>,
    /// `spec.routes`, in policy order; the catch-all's alias is `*`.
    pub routes: Vec<CompiledRoute>,
    /// Every target's circuit-breaker settings.
    pub breaker: BreakerSettings,
    /// Every route's retry-budget settings.
    pub budget: BudgetSettings,
    /// `spec.overrides`, resolved to target identities.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<TargetOverride>,
    /// The policy document with every key redacted, for `/config`.
    pub document: Value,
}

impl CompiledPolicy {
    /// A content hash of the compiled policy (keys included, as fingerprints cannot tell a
    /// rotated key otherwise): the version the operator reports and sidecars acknowledge. The
    /// same policy gives the same digest on every pod and in every run.
    pub fn digest(&self) -> String {
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
        digest.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The aliases apps may ask for, in policy order (the catch-all excluded).
    pub fn aliases(&self) -> impl Iterator<Item = &str> {
        self.routes.iter().map(|r| r.alias.as_str()).filter(|alias| *alias != "*")
    }

    /// Every target of every chain once, by identity, in chain order.
    pub fn targets(&self) -> Vec<&CompiledTarget> {
        distinct_targets(&self.routes)
    }
}

/// Every target of `routes`' chains once, by identity, in chain order.
fn distinct_targets(routes: &[CompiledRoute]) -> Vec<&CompiledTarget> {
    let mut targets: Vec<&CompiledTarget> = Vec::new();
    for route in routes {
        for step in route.steps.iter().chain(&route.on_context_window_exceeded).chain(&route.on_content_filtered) {
            for member in &step.members {
                if !targets.iter().any(|t| t.identity == member.identity) {
                    targets.push(member);
                }
            }
        }
    }
    targets
}

/// A compiled route: the chain for one model alias, with the settings that govern it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CompiledRoute {
    /// The alias (`*` for the catch-all).
    pub alias: String,
    /// The steps, in order.
    pub steps: Vec<CompiledStep>,
    /// The chain to switch to on `contextWindowExceeded` (may be empty).
    pub on_context_window_exceeded: Vec<CompiledStep>,
    /// The chain to switch to on `contentFiltered` (may be empty).
    pub on_content_filtered: Vec<CompiledStep>,
    /// Classes that fall through to the next step.
    pub fallback_on: ClassSet,
    /// Retries per target and the per-request cap.
    pub retry: RetryPolicy,
    /// Time limits.
    pub timeouts: Timeouts,
    /// Hedging, if enabled.
    pub hedge: Option<Hedge>,
    /// Per-request headers the policy honours.
    pub overrides: AllowedOverrides,
    /// Shadow comparison, if enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<CompiledShadow>,
    /// What a stream that fails after its first chunk does.
    #[serde(default, skip_serializing_if = "MidStream::is_fail")]
    pub mid_stream: MidStream,
}

/// A route's shadow comparison: which target a sampled share of its answered requests is also
/// sent to, in the background.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CompiledShadow {
    /// The shadow target, one per key of its provider (a shadow request picks one).
    pub targets: Vec<CompiledTarget>,
    /// Share of eligible requests shadowed, 0 to 1.
    pub share: f64,
    /// Shadow requests in flight at once.
    pub max_concurrent: u32,
    /// How long a shadow request may take.
    pub timeout: std::time::Duration,
    /// Whether prompt and answer text are recorded.
    pub capture_content: bool,
}

/// One step of a chain: one target, or several equivalent ones balanced by weight, latency
/// and load (a group, or one target whose provider has several keys).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompiledStep {
    /// The step's targets.
    pub members: Vec<CompiledTarget>,
}

/// One provider + model + key a chain can send to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CompiledTarget {
    /// Index into [`CompiledPolicy::providers`].
    pub provider: usize,
    /// The model name sent to it.
    pub model: String,
    /// Which of the provider's keys to use.
    pub key: usize,
    /// This target's attempt time limit.
    pub attempt_timeout: std::time::Duration,
    /// Relative share within its step.
    pub weight: u32,
    /// `provider/model` (with `#n` for the n-th key when there are several), as shown in
    /// headers, logs, errors and status.
    pub label: String,
    /// Requests the policy keeps away from this target (`skipFor`).
    pub skip_for: Vec<RequestFeature>,
    /// What identifies this target's health across reloads and pods: provider, endpoint, key
    /// fingerprint and model; never the key.
    pub identity: String,
    /// What it charges, if the policy says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<Price>,
    /// How its requests are adapted, if the policy says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapt: Option<Adaptation>,
    /// What it may cost the fleet per window, if the policy says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spend_limit: Option<SpendLimit>,
    /// How it is verified, if the policy verifies it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<Verify>,
}
