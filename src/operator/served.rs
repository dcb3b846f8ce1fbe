//! What the operator serves sidecars: per namespace, the last good compiled version of each
//! policy, as immutable snapshots that a subscriber receives whenever one changes.
//!
//! Every replica keeps this store warm from its own reconciles, whether or not it leads, so
//! any replica can serve sidecars. It lives in memory only: keys included, it is rebuilt from
//! the API server after a restart and never written anywhere.
//!
//! A replica never sends a sidecar less than the sidecar has because the replica itself is
//! incomplete. So a namespace is *complete* only once every policy the first listing found
//! there has been reconciled, and a policy this replica has no good version of (its Secret is
//! gone, it does not compile right now) is *held*: sidecars are told to keep their own copy,
//! never to drop it. A namespace the operator does not watch is complete and empty at once:
//! its pods pass their calls through.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use parking_lot::{Mutex, MutexGuard};
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
    /// The policy as the config stream (protocol 2) carries it: its spec and its keys.
    pub wire: crate::configstream::v2::Policy,
    /// Its content digest: the version sidecars acknowledge.
    pub version: String,
    /// The `metadata.generation` it was compiled from.
    pub generation: i64,
    /// The resource's uid, for the Events about it.
    pub uid: String,
}

/// A policy that exists but that this replica has no good version of: sidecars keep theirs.
#[derive(Clone, Debug, PartialEq)]
pub struct HeldPolicy {
    /// Which pods' sidecars take it.
    pub selector: Option<LabelSelector>,
    /// Why there is no good version here.
    pub reason: String,
}

/// Every served policy of one namespace, at one moment.
#[derive(Debug, Default)]
pub struct NamespacePolicies {
    /// Increases with every change to the namespace's policies.
    pub revision: u64,
    /// By policy name.
    pub policies: BTreeMap<String, Arc<ServedPolicy>>,
    /// Policies sidecars keep their own copy of, by name.
    pub held: BTreeMap<String, HeldPolicy>,
    /// Whether every policy of the namespace has been reconciled since this replica started:
    /// until then nothing is sent to the namespace's sidecars.
    pub complete: bool,
    /// Why the namespace has no policy at all, when that is not simply because none exists.
    pub unwatched: bool,
}

#[derive(Debug, Default)]
struct State {
    namespaces: HashMap<String, watch::Sender<Arc<NamespacePolicies>>>,
    /// Policies the first listing found that have not been reconciled yet, by namespace.
    pending: HashMap<String, BTreeSet<String>>,
    /// The watched namespaces that have been listed (all of them: `None` in `listed_all`).
    listed: BTreeSet<String>,
    listed_all: bool,
}

/// The served policies of every namespace, each published through its own `watch` channel.
#[derive(Debug)]
pub struct ServedPolicies {
    /// The namespaces served; `None`: all of them.
    scope: Option<BTreeSet<String>>,
    state: Mutex<State>,
}

impl Default for ServedPolicies {
    fn default() -> Self {
        ServedPolicies::new()
    }
}

impl State {
    fn watched(scope: &Option<BTreeSet<String>>, namespace: &str) -> bool {
        scope.as_ref().is_none_or(|scope| scope.contains(namespace))
    }

    fn complete(&self, scope: &Option<BTreeSet<String>>, namespace: &str) -> bool {
        if !State::watched(scope, namespace) {
            return true;
        }
        let listed = self.listed_all || self.listed.contains(namespace);
        listed && self.pending.get(namespace).is_none_or(BTreeSet::is_empty)
    }

    fn channel(&mut self, scope: &Option<BTreeSet<String>>, namespace: &str) -> &watch::Sender<Arc<NamespacePolicies>> {
        let complete = self.complete(scope, namespace);
        let unwatched = !State::watched(scope, namespace);
        self.namespaces.entry(namespace.to_string()).or_insert_with(|| {
            watch::channel(Arc::new(NamespacePolicies { complete, unwatched, ..NamespacePolicies::default() })).0
        })
    }

    /// Publishes `change` of `namespace`'s policies (and its completeness) if anything changed.
    fn update(
        &mut self,
        scope: &Option<BTreeSet<String>>,
        namespace: &str,
        change: impl FnOnce(&mut BTreeMap<String, Arc<ServedPolicy>>, &mut BTreeMap<String, HeldPolicy>),
    ) -> bool {
        let complete = self.complete(scope, namespace);
        let tx = self.channel(scope, namespace);
        let current = tx.borrow().clone();
        let (mut policies, mut held) = (current.policies.clone(), current.held.clone());
        change(&mut policies, &mut held);
        if policies == current.policies && held == current.held && complete == current.complete {
            return false;
        }
        tx.send_replace(Arc::new(NamespacePolicies {
            revision: current.revision + 1,
            policies,
            held,
            complete,
            unwatched: current.unwatched,
        }));
        true
    }
}

impl ServedPolicies {
    /// An empty store serving every namespace.
    pub fn new() -> Self {
        ServedPolicies { scope: None, state: Mutex::default() }
    }

    /// An empty store serving only `namespaces` (all of them when empty).
    pub fn for_namespaces(namespaces: &[String]) -> Self {
        let scope = (!namespaces.is_empty()).then(|| namespaces.iter().cloned().collect());
        ServedPolicies { scope, state: Mutex::default() }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The lock guards map updates; a panic while holding it leaves nothing half-done.
        self.state.lock()
    }

    /// Follows `namespace`'s policies: the current set at once, then every change.
    pub fn subscribe(&self, namespace: &str) -> watch::Receiver<Arc<NamespacePolicies>> {
        self.lock().channel(&self.scope, namespace).subscribe()
    }

    /// The policy served as `namespace/name`, if any.
    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<ServedPolicy>> {
        self.lock().namespaces.get(namespace).and_then(|tx| tx.borrow().policies.get(name).cloned())
    }

    /// The first listing of `namespace` (or of every namespace, `None`) found `policies`: the
    /// namespaces are complete once each of them has been reconciled. Later listings change
    /// nothing here (they only prune, [`ServedPolicies::retain`]).
    pub fn listed(&self, namespace: Option<&str>, policies: impl IntoIterator<Item = (String, String)>) {
        let mut state = self.lock();
        let first = match namespace {
            None => !std::mem::replace(&mut state.listed_all, true),
            Some(namespace) => state.listed.insert(namespace.to_string()),
        };
        if first {
            for (namespace, name) in policies {
                let reconciled = state
                    .namespaces
                    .get(&namespace)
                    .is_some_and(|tx| tx.borrow().policies.contains_key(&name) || tx.borrow().held.contains_key(&name));
                if !reconciled {
                    state.pending.entry(namespace).or_default().insert(name);
                }
            }
        }
        let namespaces: Vec<String> = state.namespaces.keys().cloned().collect();
        for namespace in namespaces {
            state.update(&self.scope, &namespace, |_, _| {});
        }
    }

    /// Whether every watched namespace has been listed and every policy listed reconciled: the
    /// replica's readiness.
    pub fn is_complete(&self) -> bool {
        let state = self.lock();
        let listed = state.listed_all || self.scope.as_ref().is_some_and(|scope| scope.is_subset(&state.listed));
        listed && state.pending.values().all(BTreeSet::is_empty)
    }

    /// Serves `policy` in `namespace` in place of its previous version; returns whether
    /// anything changed (a reconcile of an unchanged policy publishes nothing).
    pub fn publish(&self, namespace: &str, policy: ServedPolicy) -> bool {
        let mut state = self.lock();
        state.pending.entry(namespace.to_string()).or_default().remove(&policy.name);
        let name = policy.name.clone();
        let policy = Arc::new(policy);
        state.update(&self.scope, namespace, |policies, held| {
            held.remove(&name);
            if policies.get(&name).is_none_or(|served| **served != *policy) {
                policies.insert(name.clone(), policy);
            }
        })
    }

    /// A reconcile of `namespace/name` found no good version now (`reason`): the last good one
    /// stays served if this replica has one; otherwise sidecars are told to hold their own.
    pub fn hold(&self, namespace: &str, name: &str, selector: Option<LabelSelector>, reason: &str) {
        let mut state = self.lock();
        state.pending.entry(namespace.to_string()).or_default().remove(name);
        state.update(&self.scope, namespace, |policies, held| {
            if !policies.contains_key(name) {
                held.insert(name.to_string(), HeldPolicy { selector, reason: reason.to_string() });
            }
        });
    }

    /// Stops serving `namespace/name` (the policy was deleted).
    pub fn remove(&self, namespace: &str, name: &str) {
        self.retain(namespace, |policy| policy != name);
    }

    /// Keeps only the policies of `namespace` for which `keep` holds (after a re-list, those
    /// that still exist).
    pub fn retain(&self, namespace: &str, keep: impl Fn(&str) -> bool) {
        let mut state = self.lock();
        if let Some(pending) = state.pending.get_mut(namespace) {
            pending.retain(|name| keep(name));
        }
        if !state.namespaces.contains_key(namespace) {
            return;
        }
        state.update(&self.scope, namespace, |policies, held| {
            policies.retain(|name, _| keep(name));
            held.retain(|name, _| keep(name));
        });
    }

    /// The namespaces that have (or had) policies.
    pub fn namespaces(&self) -> Vec<String> {
        self.lock().namespaces.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::DEMO_POLICY;

    fn served(name: &str, yaml: &str) -> ServedPolicy {
        crate::testing::served(name, yaml)
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

    #[tokio::test]
    async fn a_namespace_is_complete_once_every_policy_listed_there_was_reconciled() {
        let store = ServedPolicies::new();
        let shop = store.subscribe("shop");
        assert!(!shop.borrow().complete, "nothing is known before the first listing");
        assert!(!store.is_complete());
        store.listed(None, [("shop".to_string(), "a".to_string()), ("shop".to_string(), "b".to_string())]);
        assert!(!shop.borrow().complete, "two policies are listed, none reconciled");
        assert!(store.subscribe("empty").borrow().complete, "a namespace without policies is complete");
        store.publish("shop", served("a", DEMO_POLICY));
        assert!(!shop.borrow().complete && !store.is_complete());
        // `b` does not compile now (its Secret is gone) and this replica never had it: held.
        store.hold("shop", "b", None, "Secret `llm-keys` not found");
        let now = shop.borrow().clone();
        assert!(now.complete && store.is_complete());
        assert_eq!(now.held.keys().collect::<Vec<_>>(), ["b"]);
        assert_eq!(now.policies.keys().collect::<Vec<_>>(), ["a"]);
        // `a` fails later: its last good version stays served, nothing is held for it.
        store.hold("shop", "a", None, "Secret `llm-keys` not found");
        assert!(!shop.borrow().held.contains_key("a") && store.get("shop", "a").is_some());
        // `b` compiles again: served, no longer held.
        store.publish("shop", served("b", DEMO_POLICY));
        assert!(shop.borrow().held.is_empty());
        // A deleted policy is neither served nor held.
        store.hold("shop", "c", None, "invalid");
        store.remove("shop", "c");
        assert!(shop.borrow().held.is_empty());
    }

    #[tokio::test]
    async fn a_namespace_the_operator_does_not_watch_is_complete_and_empty_at_once() {
        let store = ServedPolicies::for_namespaces(&["shop".to_string()]);
        let elsewhere = store.subscribe("billing");
        assert!(elsewhere.borrow().complete && elsewhere.borrow().unwatched);
        assert!(!store.subscribe("shop").borrow().complete);
        assert!(!store.is_complete());
        store.listed(Some("shop"), []);
        assert!(store.subscribe("shop").borrow().complete && store.is_complete());
    }
}
