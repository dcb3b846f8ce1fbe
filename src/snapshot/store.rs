//! Where the active snapshot lives, beside the health state that snapshots share, and how its
//! source stands. Readers take the snapshot with one atomic load and keep it for the whole
//! request; a publish never waits for them.
//!
//! Without a snapshot, or with one that routes nothing (no policy selects the pod), the
//! sidecar passes calls through ([`crate::proxy::passthrough`]); [`PolicyStore::readiness`]
//! says whether it is ready anyway, which it is once the start-up bound has passed: the
//! control plane is never on an app's start-up path.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use parking_lot::Mutex;
use serde::Serialize;
use tokio::time::Instant;

use super::PolicySnapshot;
use crate::chain::CompiledPolicy;
use crate::health::HealthRegistry;
use crate::provider::InvalidBackend;

/// The active snapshot and the health registry behind it.
#[derive(Debug, Default)]
pub struct PolicyStore {
    current: ArcSwapOption<PolicySnapshot>,
    versions: AtomicU64,
    health: HealthRegistry,
    waiting: Mutex<Option<String>>,
    /// From when the sidecar is ready without a policy.
    settles_at: Mutex<Option<Instant>>,
    link: Mutex<Option<LinkStatus>>,
}

/// How the sidecar's link to the operator stands, for `/health` and the metrics.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LinkStatus {
    /// The operator's config service.
    pub url: String,
    /// Whether a stream is up.
    pub connected: bool,
    /// Why the last attempt or stream failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Whether that failure was the operator's certificate not verifying against the CA this
    /// pod was given: a serving CA replaced under running pods.
    pub untrusted: bool,
    /// Since when, in milliseconds since the Unix epoch.
    pub since_unix_ms: i64,
}

impl PolicyStore {
    /// An empty store: nothing is served until a policy is published.
    pub fn new() -> Self {
        PolicyStore::default()
    }

    /// Makes the sidecar ready without a policy once `bound` has passed from now, passing
    /// calls through until one arrives.
    pub fn settle_after(&self, bound: Duration) {
        *self.settles_at.lock() = Some(Instant::now() + bound);
    }

    /// Whether the start-up bound has passed.
    pub fn settled(&self) -> bool {
        self.settles_at.lock().is_some_and(|at| Instant::now() >= at)
    }

    /// `Ok` with what is served when ready, `Err` with why not.
    pub fn readiness(&self) -> Result<String, String> {
        match self.load() {
            Some(snapshot) if snapshot.is_empty() => Ok(format!("passing calls through: {}", snapshot.source)),
            Some(snapshot) => Ok(format!("{} (version {})", snapshot.source, snapshot.digest)),
            None if self.settled() => Ok(format!("passing calls through: {}", self.unavailable())),
            None => Err(self.unavailable()),
        }
    }

    /// Why calls pass through now, if they do: no snapshot yet, or one that routes nothing.
    pub fn passthrough_reason(&self) -> Option<String> {
        match self.load() {
            Some(snapshot) if !snapshot.is_empty() => None,
            Some(snapshot) => Some(snapshot.source.clone()),
            None => Some(self.unavailable()),
        }
    }

    /// Records how the link to the operator stands.
    pub fn set_link(&self, link: LinkStatus) {
        *self.link.lock() = Some(link);
    }

    /// How the link to the operator stands, when there is one.
    pub fn link(&self) -> Option<LinkStatus> {
        self.link.lock().clone()
    }

    /// The active snapshot, if a valid policy has been published.
    pub fn load(&self) -> Option<Arc<PolicySnapshot>> {
        self.current.load_full()
    }

    /// The health state of every target and route.
    pub fn health(&self) -> &HealthRegistry {
        &self.health
    }

    /// Binds `compiled` to live providers and this store's health, and makes it the active
    /// snapshot; returns its version. A policy that cannot be bound changes nothing.
    pub fn publish(&self, compiled: &CompiledPolicy) -> Result<u64, InvalidBackend> {
        self.install(PolicySnapshot::assemble(compiled, &self.health)?)
    }

    /// Binds a set of policies as one snapshot versioned `digest` (the operator's config for
    /// this pod), and makes it the active snapshot. `empty` says why, when there is no policy.
    pub fn publish_all(&self, policies: &[CompiledPolicy], digest: &str, empty: &str) -> Result<u64, InvalidBackend> {
        let mut snapshot = PolicySnapshot::assemble_all(policies, digest.to_string(), &self.health)?;
        if policies.is_empty() {
            snapshot.source = empty.to_string();
        }
        self.install(snapshot)
    }

    fn install(&self, mut snapshot: PolicySnapshot) -> Result<u64, InvalidBackend> {
        let version = self.versions.fetch_add(1, Ordering::Relaxed) + 1;
        snapshot.version = version;
        self.current.store(Some(Arc::new(snapshot)));
        Ok(version)
    }

    /// Why there is nothing to serve, while [`PolicyStore::load`] is `None`.
    pub fn unavailable(&self) -> String {
        self.waiting.lock().clone().unwrap_or_else(|| "no valid policy loaded yet".into())
    }

    /// Notes why there is nothing to serve yet (such as the operator being unreachable), for
    /// the 503 answers and `/readyz`.
    pub fn set_unavailable(&self, why: String) {
        *self.waiting.lock() = Some(why);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{DEMO_POLICY, compiled};

    #[tokio::test(start_paused = true)]
    async fn without_a_policy_the_sidecar_is_ready_once_the_start_up_bound_passes_and_passes_calls_through() {
        let store = PolicyStore::new();
        store.set_unavailable("waiting for the operator at https://operator:7402".into());
        store.settle_after(Duration::from_secs(10));
        assert_eq!(store.readiness(), Err("waiting for the operator at https://operator:7402".into()));
        assert_eq!(store.passthrough_reason().as_deref(), Some("waiting for the operator at https://operator:7402"));
        tokio::time::sleep(Duration::from_secs(10)).await;
        let ready = store.readiness().expect("ready once the bound passed");
        assert!(ready.starts_with("passing calls through: waiting for the operator"), "{ready}");
        // The operator says no policy selects the pod: still passing through.
        store.publish_all(&[], "v0", "no FallbackPolicy in namespace `shop` selects pod `web-1`").expect("empty");
        assert_eq!(
            store.passthrough_reason().as_deref(),
            Some("no FallbackPolicy in namespace `shop` selects pod `web-1`")
        );
        // A policy arrives: served, not passed through.
        store.publish(&compiled(DEMO_POLICY)).expect("publish");
        assert_eq!(store.passthrough_reason(), None);
        assert!(store.readiness().expect("ready").contains("version"));
    }
}
