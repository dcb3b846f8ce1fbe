//! The policy as it may be shown (`/config`, status, logs): every key value replaced.

use serde_json::Value;

use crate::policy::FallbackPolicy;

/// What replaces a secret wherever a policy is shown.
pub const REDACTED: &str = "<redacted>";

/// The policy as a JSON document with every `apiKey.value` replaced by [`REDACTED`] and the
/// server-side bookkeeping (`managedFields`) left out.
pub fn redact(policy: &FallbackPolicy) -> Value {
    let mut copy = policy.clone();
    copy.metadata.managed_fields = None;
    for provider in &mut copy.spec.providers {
        for key in provider.api_key.iter_mut().chain(provider.api_keys.iter_mut().flatten()) {
            if key.value.is_some() {
                key.value = Some(REDACTED.to_string());
            }
        }
    }
    serde_json::to_value(&copy).unwrap_or(Value::Null)
}
