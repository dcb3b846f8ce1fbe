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
        let mut snapshot = PolicySnapshot::assemble(compiled, &self.health)?;
        let version = self.versions.fetch_add(1, Ordering::Relaxed) + 1;
        snapshot.version = version;
        self.current.store(Some(Arc::new(snapshot)));
        Ok(version)
    }
}
