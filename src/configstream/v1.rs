//! Protocol 1, the config stream of Backstop 0.1: a configuration carries the compiled
//! policies themselves. This release still serves it, to the sidecars of pods that started
//! before the operator was upgraded, and reads it, from an operator of the previous release in
//! the middle of a rolling update. Its encoding is pinned by the recorded messages in
//! `tests/fixtures/configstream/v1/`: a change to the compiled types that alters it fails
//! that test, and then protocol 1 needs types of its own here.
//!
//! Protocol 1 has no held policies: a configuration that would hold one is not sent to a
//! protocol-1 sidecar at all (it keeps what it has).

use serde::{Deserialize, Serialize};

use crate::chain::CompiledPolicy;

/// A pod's configuration, versioned.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    /// A digest of the policies below: what the sidecar acknowledges.
    pub version: String,
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name, as the operator authenticated it.
    pub pod: String,
    /// The policies, in name order; keys resolved.
    pub policies: Vec<CompiledPolicy>,
}

impl Config {
    /// A pod's configuration of `policies` (in name order).
    pub fn new(namespace: &str, pod: &str, policies: Vec<CompiledPolicy>) -> Config {
        Config { version: Config::version_of(&policies), namespace: namespace.into(), pod: pod.into(), policies }
    }

    /// The version of a set of policies: a digest of their names and contents.
    pub fn version_of(policies: &[CompiledPolicy]) -> String {
        let text: Vec<String> = policies.iter().map(|p| format!("{}={}", p.source, p.digest())).collect();
        super::v2::short_digest(text.join("\n").as_bytes())
    }

    /// What a sidecar serves when no policy selects its pod.
    pub fn empty_note(&self) -> String {
        format!("no FallbackPolicy in namespace `{}` selects pod `{}`", self.namespace, self.pod)
    }
}
