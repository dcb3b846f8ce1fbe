//! What the operator serves sidecars: per namespace, the last good compiled version of each
//! policy, as immutable snapshots that a subscriber receives whenever one changes.
//!
//! Every replica keeps this store warm from its own reconciles, whether or not it leads, so
//! any replica can serve sidecars. It lives in memory only: keys included, it is rebuilt from
//! the API server after a restart and never written anywhere.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use tokio::sync::watch;

use crate::chain::CompiledPolicy;

/// One policy's last good compiled version.
#[derive(Debug, PartialEq)]
pub struct ServedPolicy {
    /// The policy's name.
    pub name: String,
    /// Which pods' sidecars take it (none: every pod in the namespace).
    pub selector: Option<LabelSelector>,
    /// The compiled policy, keys resolved.
    pub compiled: CompiledPolicy,
    /// Its content digest: the version sidecars acknowledge.
    pub version: String,
    /// The `metadata.generation` it was compiled from.
    pub generation: i64,
    /// The resource's uid, for the Events about it.
    pub uid: String,
}

/// Every served policy of one namespace, at one moment.
#[derive(Debug, Default)]
pub struct NamespacePolicies {
    /// Increases with every change to the namespace's policies.
    pub revision: u64,
    /// By policy name.
    pub policies: BTreeMap<String, Arc<ServedPolicy>>,
}

/// The served policies of every namespace, each published through its own `watch` channel.
#[derive(Debug, Default)]
pub struct ServedPolicies {
    namespaces: Mutex<HashMap<String, watch::Sender<Arc<NamespacePolicies>>>>,
}

impl ServedPolicies {
    /// An empty store.
    pub fn new() -> Self {
        ServedPolicies::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, watch::Sender<Arc<NamespacePolicies>>>> {
        // The lock guards a map lookup; a panic while holding it leaves nothing half-done.
        self.namespaces.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Follows `namespace`'s policies: the current set at once, then every change.
    pub fn subscribe(&self, namespace: &str) -> watch::Receiver<Arc<NamespacePolicies>> {
        self.lock().entry(namespace.to_string()).or_insert_with(|| watch::channel(Arc::default()).0).subscribe()
    }

    /// The policy served as `namespace/name`, if any.
    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<ServedPolicy>> {
        self.lock().get(namespace).and_then(|tx| tx.borrow().policies.get(name).cloned())
    }

    /// Serves `policy` in `namespace` in place of its previous version; returns whether
    /// anything changed (a reconcile of an unchanged policy publishes nothing).
    pub fn publish(&self, namespace: &str, policy: ServedPolicy) -> bool {
        let mut namespaces = self.lock();
        let tx = namespaces.entry(namespace.to_string()).or_insert_with(|| watch::channel(Arc::default()).0);
        let current = tx.borrow().clone();
        if current.policies.get(&policy.name).is_some_and(|served| **served == policy) {
            return false;
        }
        let mut policies = current.policies.clone();
        policies.insert(policy.name.clone(), Arc::new(policy));
        tx.send_replace(Arc::new(NamespacePolicies { revision: current.revision + 1, policies }));
        true
    }

    /// Stops serving `namespace/name` (the policy was deleted).
    pub fn remove(&self, namespace: &str, name: &str) {
        self.retain(namespace, |policy| policy != name);
    }

    /// Keeps only the policies of `namespace` for which `keep` holds (after a re-list, those
    /// that still exist).
    pub fn retain(&self, namespace: &str, keep: impl Fn(&str) -> bool) {
        let namespaces = self.lock();
        let Some(tx) = namespaces.get(namespace) else { return };
        let current = tx.borrow().clone();
        if current.policies.keys().all(|name| keep(name)) {
            return;
        }
        let policies =
            current.policies.iter().filter(|(name, _)| keep(name)).map(|(k, v)| (k.clone(), v.clone())).collect();
        tx.send_replace(Arc::new(NamespacePolicies { revision: current.revision + 1, policies }));
    }

    /// The namespaces that have (or had) policies.
    pub fn namespaces(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{DEMO_POLICY, compiled};

    fn served(name: &str, yaml: &str) -> ServedPolicy {
        let compiled = compiled(yaml);
        ServedPolicy {
            name: name.into(),
            selector: None,
            version: compiled.digest(),
            compiled,
            generation: 1,
            uid: "u".into(),
        }
    }

    #[tokio::test]
    async fn subscribers_see_each_change_once_and_unchanged_publishes_are_no_ops() {
        let store = ServedPolicies::new();
        let mut rx = store.subscribe("shop");
        assert!(rx.borrow_and_update().policies.is_empty());
        assert!(store.publish("shop", served("a", DEMO_POLICY)));
        assert!(rx.has_changed().expect("open"));
        assert_eq!(rx.borrow_and_update().revision, 1);
        assert!(!store.publish("shop", served("a", DEMO_POLICY)), "the same version again");
        assert!(!rx.has_changed().expect("open"));
        assert!(store.publish("shop", served("a", &DEMO_POLICY.replace("sk-secret-123", "sk-rotated"))));
        assert_eq!(rx.borrow_and_update().revision, 2);
        assert!(store.publish("other", served("a", DEMO_POLICY)));
        assert!(!rx.has_changed().expect("open"), "another namespace's change is not this one's");
        store.remove("shop", "a");
        assert!(rx.borrow_and_update().policies.is_empty());
        assert!(store.get("other", "a").is_some());
    }
}
