//! Protocol 2: a configuration carries each policy as its `FallbackPolicy` spec (the CRD's
//! own versioned, additive schema) and the keys its `secretKeyRef`s name, and the sidecar
//! compiles it with its own compiler ([`Policy::compile`], its `TryFrom`). The compiler's
//! internal types never cross the wire, so changing them is never a protocol change; a spec
//! field a sidecar does not know makes it refuse that one policy and keep its own copy of it.
//!
//! A configuration also names the policies the sidecar is to keep its own copy of
//! ([`Config::held`]): policies that exist but that the operator cannot serve right now (their
//! Secret is gone, they do not compile, the replica just started). A sidecar is never sent
//! less than it has because the control plane is incomplete.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::chain::{ApiKey, CompiledPolicy, InvalidPolicy, KeyError, KeyResolver, compile};
use crate::policy::{ApiKeySource, FallbackPolicy, FallbackPolicySpec};

/// A pod's configuration, versioned.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    /// A digest of the policies and held names below: what the sidecar acknowledges.
    pub version: String,
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name, as the operator authenticated it.
    pub pod: String,
    /// The policies selecting the pod, in name order.
    pub policies: Vec<Policy>,
    /// Policies selecting the pod that the sidecar keeps its own copy of, by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held: Vec<String>,
    /// Why no policy applies, when none does (for the sidecar's pass-through).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// One policy as the wire carries it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    /// Its name (the namespace is the configuration's).
    pub name: String,
    /// Its `spec`, as the API server holds it.
    pub spec: Value,
    /// The keys its `secretKeyRef`s name, by `SECRET/KEY`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub keys: BTreeMap<String, ApiKey>,
}

/// The first 8 bytes of a SHA-256, in hex: the versions on the stream.
pub fn short_digest(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

impl Config {
    /// The version of a configuration of `policies` (name and compiled version, in name order)
    /// and `held` names.
    pub fn version_of<'a>(policies: impl IntoIterator<Item = (&'a str, &'a str)>, held: &[String]) -> String {
        let mut text: Vec<String> = policies.into_iter().map(|(name, version)| format!("{name}={version}")).collect();
        text.extend(held.iter().map(|name| format!("{name}=held")));
        short_digest(text.join("\n").as_bytes())
    }

    /// The source (`namespace/name`) of a policy of this configuration.
    pub fn source(&self, name: &str) -> String {
        format!("{}/{name}", self.namespace)
    }

    /// Why no policy applies, for a configuration without any.
    pub fn empty_note(&self) -> String {
        self.note.clone().unwrap_or_else(|| {
            format!("no FallbackPolicy in namespace `{}` selects pod `{}`", self.namespace, self.pod)
        })
    }
}

/// Why a sidecar cannot take a policy it was sent.
#[derive(Debug, thiserror::Error)]
pub enum PolicyRefused {
    /// Its spec is not one this release can read (a newer operator's field).
    #[error("policy `{name}`: its spec is not one this sidecar can read: {source}")]
    Spec {
        /// The policy.
        name: String,
        /// Why.
        source: serde_json::Error,
    },
    /// It does not compile here.
    #[error("policy `{name}`: {source}")]
    Invalid {
        /// The policy.
        name: String,
        /// Why.
        source: InvalidPolicy,
    },
}

/// The keys a policy message carries.
struct WireKeys<'a>(&'a BTreeMap<String, ApiKey>);

/// How a `secretKeyRef` is named on the wire.
pub fn key_name(secret: &str, key: &str) -> String {
    format!("{secret}/{key}")
}

impl KeyResolver for WireKeys<'_> {
    fn resolve(&self, source: &ApiKeySource) -> Result<ApiKey, KeyError> {
        if source.value.is_some() {
            return Err(KeyError::InlineInCluster);
        }
        if source.env.is_some() {
            return Err(KeyError::EnvInCluster);
        }
        let Some(reference) = &source.secret_key_ref else { return Err(KeyError::SecretRefInFile) };
        self.0
            .get(&key_name(&reference.name, &reference.key))
            .cloned()
            .ok_or_else(|| KeyError::SecretKeyNotFound { name: reference.name.clone(), key: reference.key.clone() })
    }
}

impl Policy {
    /// The message for a policy `name` with `spec` and the `keys` its references name.
    pub fn new(name: &str, spec: &FallbackPolicySpec, keys: BTreeMap<String, ApiKey>) -> Policy {
        Policy { name: name.to_string(), spec: serde_json::to_value(spec).unwrap_or_default(), keys }
    }

    /// The policy compiled by this release's compiler, as a policy of `namespace`.
    pub fn compile(&self, namespace: &str) -> Result<CompiledPolicy, PolicyRefused> {
        let spec: FallbackPolicySpec = serde_json::from_value(self.spec.clone())
            .map_err(|source| PolicyRefused::Spec { name: self.name.clone(), source })?;
        let mut policy = FallbackPolicy::new(&self.name, spec);
        policy.metadata.namespace = Some(namespace.to_string());
        compile(&policy, &WireKeys(&self.keys))
            .map_err(|source| PolicyRefused::Invalid { name: self.name.clone(), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::DEMO_POLICY;

    fn spec(yaml: &str) -> FallbackPolicySpec {
        let policy: FallbackPolicy = serde_yaml_ng::from_str(yaml).expect("policy");
        policy.spec
    }

    const CLUSTER_POLICY: &str = "apiVersion: backstop.dev/v1alpha1\nkind: FallbackPolicy\nmetadata: {name: chat}\nspec:\n  providers:\n    - {name: primary, type: openai, apiKey: {secretKeyRef: {name: llm-keys, key: openai}}}\n    - {name: backup, type: mock}\n  routes:\n    - {model: chat, chain: [{provider: primary, model: gpt-4o}, {provider: backup, model: m}]}\n";

    #[test]
    fn a_sidecar_compiles_the_spec_with_the_keys_it_was_sent_and_refuses_what_it_cannot_read() {
        let keys = BTreeMap::from([(key_name("llm-keys", "openai"), ApiKey::new("sk-live-1"))]);
        let message = Policy::new("chat", &spec(CLUSTER_POLICY), keys);
        let compiled = message.compile("shop").expect("compiles");
        assert_eq!(compiled.source, "shop/chat");
        assert_eq!(compiled.providers[0].api_keys[0].expose(), "sk-live-1");
        assert!(!format!("{message:?}").contains("sk-live-1"), "keys never show in Debug");

        let missing = Policy::new("chat", &spec(CLUSTER_POLICY), BTreeMap::new());
        let error = missing.compile("shop").expect_err("no key");
        assert!(error.to_string().contains("Secret `llm-keys` has no key `openai`"), "{error}");

        let mut newer = Policy::new("chat", &spec(CLUSTER_POLICY), BTreeMap::new());
        newer.spec["fieldOfANewerRelease"] = serde_json::json!(true);
        let error = newer.compile("shop").expect_err("unknown field");
        assert!(error.to_string().contains("not one this sidecar can read"), "{error}");

        let inline = Policy::new("demo", &spec(DEMO_POLICY), BTreeMap::new());
        let error = inline.compile("shop").expect_err("inline keys are for policy files");
        assert!(error.to_string().contains("inline"), "{error}");
    }

    #[test]
    fn the_version_changes_with_any_policy_version_or_held_name() {
        let one = Config::version_of([("a", "v1")], &[]);
        assert_eq!(one, Config::version_of([("a", "v1")], &[]));
        assert_ne!(one, Config::version_of([("a", "v2")], &[]));
        assert_ne!(one, Config::version_of([("a", "v1")], &["b".to_string()]));
        assert_eq!(one.len(), 16);
    }
}
