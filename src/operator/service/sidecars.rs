//! The sidecars connected to this replica: which pod, which policy versions it was sent, which
//! it serves, what it refused. One stream per pod: a newer stream of the same pod (a sidecar
//! that restarted, or reconnected before the old connection was seen to die) replaces the
//! older, which is told to end.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use parking_lot::{Mutex, MutexGuard};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::policy::SidecarsStatus;

/// How long another replica's list of sidecars counts without being refreshed.
const REMOTE_FRESH: Duration = Duration::from_secs(5);

/// What is known of one connected sidecar.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Sidecar {
    /// Its pod's uid.
    pub uid: String,
    /// Its pod's namespace.
    pub namespace: String,
    /// Its pod's name.
    pub pod: String,
    /// The policies it was last sent, name to version.
    pub sent: BTreeMap<String, String>,
    /// The policies it serves, name to version, once it acknowledged a configuration.
    pub applied: Option<BTreeMap<String, String>>,
    /// The policies of the configuration it last refused, and why.
    pub rejected: Option<(BTreeMap<String, String>, String)>,
}

struct Entry {
    sidecar: Sidecar,
    session: u64,
    stop: watch::Sender<bool>,
}

/// Every sidecar connected to this replica, by pod uid; on the leader, also those the other
/// replicas report.
#[derive(Default)]
pub struct Sidecars {
    pods: Mutex<HashMap<String, Entry>>,
    sessions: std::sync::atomic::AtomicU64,
    remote: Mutex<HashMap<String, (Vec<Sidecar>, Instant)>>,
}

impl Sidecars {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.pods.lock()
    }

    /// A stream of pod `uid` opened: returns its session number and a signal that turns true
    /// when a newer stream replaces it.
    pub fn connect(&self, uid: &str, namespace: &str, pod: &str) -> (u64, watch::Receiver<bool>) {
        let session = self.sessions.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let (stop, stopped) = watch::channel(false);
        let sidecar = Sidecar { uid: uid.into(), namespace: namespace.into(), pod: pod.into(), ..Sidecar::default() };
        if let Some(previous) = self.lock().insert(uid.to_string(), Entry { sidecar, session, stop }) {
            previous.stop.send_replace(true);
        }
        (session, stopped)
    }

    /// Session `session` of pod `uid` ended (unless a newer one replaced it).
    pub fn disconnect(&self, uid: &str, session: u64) -> bool {
        let mut pods = self.lock();
        if pods.get(uid).is_some_and(|entry| entry.session == session) {
            pods.remove(uid);
            return true;
        }
        false
    }

    /// Updates what is known of session `session` of pod `uid`.
    pub fn update(&self, uid: &str, session: u64, change: impl FnOnce(&mut Sidecar)) {
        if let Some(entry) = self.lock().get_mut(uid).filter(|entry| entry.session == session) {
            change(&mut entry.sidecar);
        }
    }

    /// The sidecars connected to this replica.
    pub fn local(&self) -> Vec<Sidecar> {
        self.lock().values().map(|entry| entry.sidecar.clone()).collect()
    }

    /// Every sidecar of the fleet: this replica's, and those other replicas reported lately
    /// (a pod that moved between replicas counts once).
    pub fn all(&self) -> Vec<Sidecar> {
        let mut all = self.local();
        let mut seen: HashSet<String> = all.iter().map(|s| s.uid.clone()).collect();
        let now = Instant::now();
        for (sidecars, at) in self.remote.lock().values() {
            if now.saturating_duration_since(*at) < REMOTE_FRESH {
                all.extend(sidecars.iter().filter(|s| seen.insert(s.uid.clone())).cloned());
            }
        }
        all
    }

    /// Another replica's sidecars, as it reported them.
    pub fn set_remote(&self, replica: &str, sidecars: Vec<Sidecar>) {
        self.remote.lock().insert(replica.to_string(), (sidecars, Instant::now()));
    }

    /// Forgets another replica's sidecars (its link ended).
    pub fn clear_remote(&self, replica: &str) {
        self.remote.lock().remove(replica);
    }

    /// How many are connected to this replica.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A policy's sidecars: those sent it, those serving `version` of it, those that refused it.
pub fn tally<'a>(
    sidecars: impl IntoIterator<Item = &'a Sidecar>,
    namespace: &str,
    name: &str,
    version: &str,
) -> SidecarsStatus {
    let mut status = SidecarsStatus::default();
    for sidecar in sidecars.into_iter().filter(|s| s.namespace == namespace && s.sent.contains_key(name)) {
        status.connected += 1;
        if sidecar.applied.as_ref().and_then(|applied| applied.get(name)).is_some_and(|v| v == version) {
            status.current += 1;
        } else if sidecar.rejected.as_ref().and_then(|(policies, _)| policies.get(name)).is_some_and(|v| v == version) {
            status.rejected += 1;
        }
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newer_stream_of_a_pod_replaces_the_older_and_status_counts_versions() {
        let sidecars = Sidecars::default();
        let (first, mut first_stopped) = sidecars.connect("uid-1", "shop", "web-1");
        let (second, _) = sidecars.connect("uid-1", "shop", "web-1");
        assert!(*first_stopped.borrow_and_update(), "the older stream is told to end");
        assert!(!sidecars.disconnect("uid-1", first), "its end does not remove the newer");
        let v = |version: &str| BTreeMap::from([("p".to_string(), version.to_string())]);
        sidecars.update("uid-1", second, |s| {
            s.sent = v("v2");
            s.applied = Some(v("v2"));
        });
        let (third, _) = sidecars.connect("uid-2", "shop", "web-2");
        sidecars.update("uid-2", third, |s| {
            s.sent = v("v2");
            s.applied = Some(v("v1"));
            s.rejected = Some((v("v2"), "cannot build provider".into()));
        });
        let (_, _) = sidecars.connect("uid-3", "other", "web-3");
        let all = sidecars.all();
        assert_eq!(tally(&all, "shop", "p", "v2"), SidecarsStatus { connected: 2, current: 1, rejected: 1 });
        assert_eq!(tally(&all, "other", "p", "v2"), SidecarsStatus::default());
        // Another replica's sidecars count too, once each.
        let moved = all.iter().find(|s| s.uid == "uid-2").cloned().expect("uid-2");
        let elsewhere = Sidecar {
            uid: "uid-9".into(),
            namespace: "shop".into(),
            pod: "web-9".into(),
            sent: v("v2"),
            applied: Some(v("v2")),
            rejected: None,
        };
        sidecars.set_remote("replica-b", vec![moved, elsewhere]);
        assert_eq!(tally(&sidecars.all(), "shop", "p", "v2"), SidecarsStatus { connected: 3, current: 2, rejected: 1 });
        sidecars.clear_remote("replica-b");
        assert_eq!(sidecars.all().len(), 3);
        assert!(sidecars.disconnect("uid-1", second));
        assert_eq!(sidecars.len(), 2);
    }
}
