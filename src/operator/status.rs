//! What a reconcile concluded about a policy, as the status users read in `kubectl`: the
//! `Ready` condition (Kubernetes condition conventions: `lastTransitionTime` kept while the
//! status does not change), `observedGeneration`, and the version sidecars are served.
//!
//! Written with server-side apply under [`FIELD_MANAGER`], and only when it differs from what
//! the API server already holds, so a steady reconcile writes nothing.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use serde_json::json;

use crate::chain::{InvalidPolicy, KeyError};
use crate::policy::{API_VERSION, FallbackPolicy, FallbackPolicyStatus};

/// The field manager of the operator's status writes.
pub const FIELD_MANAGER: &str = "backstop-operator";

/// Why a policy is or is not ready; the condition's `reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// It compiled; sidecars are served it.
    Compiled,
    /// It does not compile.
    InvalidPolicy,
    /// A Secret it names does not exist.
    SecretNotFound,
    /// A Secret it names has no such key.
    SecretKeyNotFound,
    /// It has an inline key (`apiKey.value`), which a cluster refuses.
    InlineKeyRefused,
    /// A Secret it names lacks the label the operator requires.
    SecretNotLabelled,
}

impl Reason {
    /// The reason's name in the condition.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Compiled => "Compiled",
            Reason::InvalidPolicy => "InvalidPolicy",
            Reason::SecretNotFound => "SecretNotFound",
            Reason::SecretKeyNotFound => "SecretKeyNotFound",
            Reason::InlineKeyRefused => "InlineKeyRefused",
            Reason::SecretNotLabelled => "SecretNotLabelled",
        }
    }

    /// Why `invalid` was refused: a missing Secret or key before anything else, since
    /// creating it is what the user does next.
    pub fn of(invalid: &InvalidPolicy) -> Reason {
        match invalid.key_error() {
            Some(KeyError::SecretNotFound(_)) => Reason::SecretNotFound,
            Some(KeyError::SecretKeyNotFound { .. }) => Reason::SecretKeyNotFound,
            Some(KeyError::InlineInCluster) => Reason::InlineKeyRefused,
            Some(KeyError::SecretNotLabelled(_)) => Reason::SecretNotLabelled,
            _ => Reason::InvalidPolicy,
        }
    }
}

/// One reconcile's conclusion.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// Ready, or why not.
    pub reason: Reason,
    /// The condition's message: the version, or every problem with its field path.
    pub message: String,
    /// The version served and its route count: this generation's when it compiled, else the
    /// last good one's, if any.
    pub served: Option<(String, u32)>,
}

/// The status `verdict` makes of `policy`'s, at `now`.
pub fn desired(policy: &FallbackPolicy, verdict: &Verdict, now: Timestamp) -> FallbackPolicyStatus {
    let current = policy.status.as_ref();
    let generation = policy.metadata.generation;
    let status = if verdict.reason == Reason::Compiled { "True" } else { "False" };
    let previous = current.and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
    let last_transition_time = match previous {
        Some(previous) if previous.status == status => previous.last_transition_time.clone(),
        _ => Time(now),
    };
    let ready = Condition {
        type_: "Ready".into(),
        status: status.into(),
        reason: verdict.reason.as_str().into(),
        message: truncate(&verdict.message, 32 * 1024),
        observed_generation: generation,
        last_transition_time,
    };
    FallbackPolicyStatus {
        observed_generation: generation,
        conditions: vec![ready],
        compiled_version: verdict.served.as_ref().map(|(version, _)| version.clone()),
        routes: verdict.served.as_ref().map(|(_, routes)| *routes),
        // Written by the fleet status under its own field manager.
        sidecars: current.and_then(|s| s.sidecars.clone()),
        targets: current.and_then(|s| s.targets.clone()),
        degraded: current.and_then(|s| s.degraded),
    }
}

/// Whether `desired` says anything the current status does not.
pub fn changed(policy: &FallbackPolicy, desired: &FallbackPolicyStatus) -> bool {
    let Some(current) = &policy.status else { return true };
    let ready = |s: &FallbackPolicyStatus| {
        s.conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone(), c.observed_generation))
    };
    current.observed_generation != desired.observed_generation
        || current.compiled_version != desired.compiled_version
        || current.routes != desired.routes
        || ready(current) != ready(desired)
}

/// The server-side apply patch that sets the operator's fields of `status`.
pub fn apply_patch(status: &FallbackPolicyStatus) -> serde_json::Value {
    let mut status = serde_json::to_value(status).unwrap_or_default();
    if let Some(fields) = status.as_object_mut() {
        for fleet_field in ["sidecars", "targets", "degraded"] {
            fields.remove(fleet_field);
        }
    }
    json!({"apiVersion": API_VERSION, "kind": "FallbackPolicy", "status": status})
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::DEMO_POLICY;

    fn policy(generation: i64, status: Option<FallbackPolicyStatus>) -> FallbackPolicy {
        let mut policy: FallbackPolicy = serde_yaml_ng::from_str(DEMO_POLICY).expect("parses");
        policy.metadata.generation = Some(generation);
        policy.status = status;
        policy
    }

    fn compiled(version: &str) -> Verdict {
        Verdict { reason: Reason::Compiled, message: format!("version {version}"), served: Some((version.into(), 2)) }
    }

    #[test]
    fn transitions_keep_their_time_until_the_status_changes() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().expect("time");
        let t1: Timestamp = "2026-01-01T00:05:00Z".parse().expect("time");
        let first = desired(&policy(1, None), &compiled("abc"), t0);
        assert_eq!(first.conditions[0].last_transition_time, Time(t0));
        assert_eq!((first.observed_generation, first.routes), (Some(1), Some(2)));
        // A new generation that compiles: still True, the transition time stays.
        let second = desired(&policy(2, Some(first.clone())), &compiled("def"), t1);
        assert_eq!(second.conditions[0].last_transition_time, Time(t0));
        assert!(changed(&policy(2, Some(first.clone())), &second));
        // Invalid: False now, the version served stays the last good one.
        let rejected = Verdict {
            reason: Reason::InvalidPolicy,
            message: "`spec.retry.attempts`: 0 is not between 1 and 10".into(),
            served: Some(("def".into(), 2)),
        };
        let third = desired(&policy(3, Some(second.clone())), &rejected, t1);
        assert_eq!(third.conditions[0].status, "False");
        assert_eq!(third.conditions[0].reason, "InvalidPolicy");
        assert_eq!(third.conditions[0].last_transition_time, Time(t1));
        assert_eq!(third.compiled_version.as_deref(), Some("def"));
        // The same verdict again: nothing to write.
        assert!(!changed(&policy(3, Some(third.clone())), &desired(&policy(3, Some(third.clone())), &rejected, t1)));
        assert!(apply_patch(&third)["status"].get("sidecars").is_none());
    }
}
