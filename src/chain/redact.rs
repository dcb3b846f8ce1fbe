//! The policy as it may be shown (`/config`, status, logs): every key value replaced.

use serde_json::{Value, json};

use crate::policy::{API_VERSION, FallbackPolicy};

/// What replaces a secret wherever a policy is shown.
pub const REDACTED: &str = "<redacted>";

/// The policy as a JSON document of what it asks for: its name and its spec, with every
/// `apiKey.value` replaced by [`REDACTED`]. Server-side bookkeeping (status, resource version,
/// managed fields) is left out, so the document, and the compiled version it is part of,
/// changes only when the policy does.
pub fn redact(policy: &FallbackPolicy) -> Value {
    let mut spec = policy.spec.clone();
    for provider in &mut spec.providers {
        for key in provider.api_key.iter_mut().chain(provider.api_keys.iter_mut().flatten()) {
            if key.value.is_some() {
                key.value = Some(REDACTED.to_string());
            }
        }
    }
    json!({
        "apiVersion": API_VERSION,
        "kind": "FallbackPolicy",
        "metadata": {"name": policy.metadata.name, "namespace": policy.metadata.namespace},
        "spec": spec,
    })
}
