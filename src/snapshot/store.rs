//! Where the active snapshot lives, beside the health state that snapshots share. Readers take
//! the snapshot with one atomic load and keep it for the whole request; a publish never waits
//! for them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwapOption;

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
    waiting: std::sync::Mutex<Option<String>>,
}

impl PolicyStore {
    /// An empty store: nothing is served until a policy is published.
    pub fn new() -> Self {
        PolicyStore::default()
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
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| "no valid policy loaded yet".into())
    }

    /// Notes why there is nothing to serve yet (such as the operator being unreachable), for
    /// the 503 answers and `/readyz`.
    pub fn set_unavailable(&self, why: String) {
        *self.waiting.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }
}
