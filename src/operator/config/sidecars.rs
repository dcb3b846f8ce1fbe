//! The sidecars connected to this replica: which pod, which policy versions it was sent, which
//! it serves, what it refused. One stream per pod: a newer stream of the same pod (a sidecar
//! that restarted, or reconnected before the old connection was seen to die) replaces the
//! older, which is told to end.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};

use tokio::sync::watch;

use crate::policy::SidecarsStatus;

/// What is known of one connected sidecar.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sidecar {
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

/// Every sidecar connected to this replica, by pod uid.
#[derive(Default)]
pub struct Sidecars {
    pods: Mutex<HashMap<String, Entry>>,
    sessions: std::sync::atomic::AtomicU64,
}

impl Sidecars {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.pods.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A stream of pod `uid` opened: returns its session number and a signal that turns true
    /// when a newer stream replaces it.
    pub fn connect(&self, uid: &str, namespace: &str, pod: &str) -> (u64, watch::Receiver<bool>) {
        let session = self.sessions.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let (stop, stopped) = watch::channel(false);
        let sidecar = Sidecar { namespace: namespace.into(), pod: pod.into(), ..Sidecar::default() };
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

    /// Every connected sidecar.
    pub fn all(&self) -> Vec<Sidecar> {
        self.lock().values().map(|entry| entry.sidecar.clone()).collect()
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A policy's sidecars: those sent it, those serving `version` of it, those that refused it.
pub fn tally<'a>(sidecars: impl IntoIterator<Item = &'a Sidecar>, namespace: &str, name: &str, version: &str) -> SidecarsStatus {
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
        assert!(sidecars.disconnect("uid-1", second));
        assert_eq!(sidecars.len(), 2);
    }
}
