//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several operator replicas
//! exactly one writes status and events while all of them keep their served policies warm.
//!
//! A small module on kube's API rather than a crate: the protocol is a few lines of optimistic
//! concurrency (every write names the Lease's `resourceVersion`, so two replicas never both
//! win), and the one behaviour that matters, stepping down the moment a renewal fails, is
//! explicit here. The leader renews every `renew`; a standby checks every `retry` and takes
//! the Lease once its holder has not renewed for `duration`; a replica that stops releases it,
//! so a standby takes over at once on a rolling update.
//!
//! The leader also writes where its config service can be reached into the Lease
//! ([`ENDPOINT_ANNOTATION`]): the other replicas forward their sidecars' evidence there, so
//! that one fleet view decides for every pod ([`crate::operator::peer`]).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;

/// The Lease annotation with the leader's config-service address (`HOST:PORT`).
pub const ENDPOINT_ANNOTATION: &str = "backstop.dev/config-endpoint";

/// The replica holding the Lease, as the others see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    /// Its identity.
    pub identity: String,
    /// Its config service, if it has one.
    pub endpoint: Option<String>,
}

/// Lease settings.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    /// This replica's config-service address, written into the Lease while it leads.
    pub endpoint: Option<String>,
    /// The Lease's name.
    pub name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a holder that stops renewing keeps the Lease.
    pub duration: Duration,
    /// How often the leader renews.
    pub renew: Duration,
    /// How often a standby tries to take it.
    pub retry: Duration,
}

/// Whether this replica leads, as a watch channel that changes the moment it does.
pub type Leadership = watch::Receiver<bool>;

/// Runs the election until `shutdown` turns true, then releases the Lease if this replica
/// holds it. `leader` follows the outcome; `holder` follows who holds the Lease.
pub async fn run(
    api: Api<Lease>,
    settings: LeaseSettings,
    leader: watch::Sender<bool>,
    holder: watch::Sender<Option<Holder>>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let leads = match try_hold(&api, &settings).await {
            Ok((leads, held_by)) => {
                holder.send_if_modified(|current| std::mem::replace(current, held_by.clone()) != held_by);
                leads
            }
            Err(error) => {
                tracing::warn!(lease = %settings.name, %error, "cannot read or write the leader lease");
                false
            }
        };
        if leader.send_if_modified(|current| std::mem::replace(current, leads) != leads) {
            tracing::info!(lease = %settings.name, identity = %settings.identity, leads, "leadership changed");
        }
        let wait = if leads { settings.renew } else { settings.retry };
        tokio::select! {
            _ = shutdown.changed() => break,
            () = tokio::time::sleep(wait) => {}
        }
    }
    if *leader.borrow() {
        leader.send_replace(false);
        if let Err(error) = release(&api, &settings).await {
            tracing::warn!(lease = %settings.name, %error, "cannot release the leader lease");
        }
    }
}

/// Takes or renews the Lease if this replica may; returns whether it holds it now, and who
/// does.
async fn try_hold(api: &Api<Lease>, settings: &LeaseSettings) -> kube::Result<(bool, Option<Holder>)> {
    let now = Timestamp::now();
    let annotations = settings
        .endpoint
        .as_ref()
        .map(|endpoint| std::collections::BTreeMap::from([(ENDPOINT_ANNOTATION.to_string(), endpoint.clone())]));
    let ourselves = Holder { identity: settings.identity.clone(), endpoint: settings.endpoint.clone() };
    let Some(lease) = api.get_opt(&settings.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta { name: Some(settings.name.clone()), annotations, ..ObjectMeta::default() },
            spec: Some(held_by(settings, now, now, 0)),
        };
        return claimed(api.create(&PostParams::default(), &lease).await, ourselves);
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    let ours = holder == settings.identity;
    if !ours && !holder.is_empty() && !expired(&spec, now) {
        let endpoint = lease.metadata.annotations.as_ref().and_then(|a| a.get(ENDPOINT_ANNOTATION)).cloned();
        return Ok((false, Some(Holder { identity: holder.to_string(), endpoint })));
    }
    let acquired = if ours { spec.acquire_time.map_or(now, |t| t.0) } else { now };
    let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!ours);
    let mut renewed = lease;
    renewed.spec = Some(held_by(settings, acquired, now, transitions));
    let mut held = renewed.metadata.annotations.take().unwrap_or_default();
    held.remove(ENDPOINT_ANNOTATION);
    held.extend(annotations.unwrap_or_default());
    renewed.metadata.annotations = Some(held);
    // `replace` carries the `resourceVersion` just read: if another replica wrote in between,
    // the API server refuses this write with a conflict and this replica does not lead.
    claimed(api.replace(&settings.name, &PostParams::default(), &renewed).await, ourselves)
}

fn claimed(written: kube::Result<Lease>, ourselves: Holder) -> kube::Result<(bool, Option<Holder>)> {
    match written {
        Ok(_) => Ok((true, Some(ourselves))),
        // Someone else won the race; the next round learns who.
        Err(kube::Error::Api(status)) if status.code == 409 => Ok((false, None)),
        Err(error) => Err(error),
    }
}

fn held_by(settings: &LeaseSettings, acquired: Timestamp, renewed: Timestamp, transitions: i32) -> LeaseSpec {
    LeaseSpec {
        holder_identity: Some(settings.identity.clone()),
        lease_duration_seconds: Some(i32::try_from(settings.duration.as_secs().max(1)).unwrap_or(i32::MAX)),
        acquire_time: Some(MicroTime(acquired)),
        renew_time: Some(MicroTime(renewed)),
        lease_transitions: Some(transitions),
        ..LeaseSpec::default()
    }
}

/// Whether the holder of `spec` has not renewed it for its whole duration by `now`.
fn expired(spec: &LeaseSpec, now: Timestamp) -> bool {
    let Some(renewed) = &spec.renew_time else { return true };
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
    renewed.0.checked_add(duration).is_ok_and(|until| until < now)
}

/// Gives the Lease up so that a standby need not wait out its duration.
async fn release(api: &Api<Lease>, settings: &LeaseSettings) -> kube::Result<()> {
    let Some(mut lease) = api.get_opt(&settings.name).await? else { return Ok(()) };
    let Some(spec) = lease.spec.as_mut() else { return Ok(()) };
    if spec.holder_identity.as_deref() != Some(settings.identity.as_str()) {
        return Ok(());
    }
    spec.holder_identity = None;
    spec.renew_time = None;
    api.replace(&settings.name, &PostParams::default(), &lease).await.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_expires_only_after_its_duration_without_renewal() {
        let renewed: Timestamp = "2026-01-01T00:00:00Z".parse().expect("time");
        let spec = LeaseSpec {
            holder_identity: Some("a".into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(renewed)),
            ..LeaseSpec::default()
        };
        assert!(!expired(&spec, renewed.checked_add(SignedDuration::from_secs(15)).expect("time")));
        assert!(expired(&spec, renewed.checked_add(SignedDuration::from_secs(16)).expect("time")));
        assert!(expired(&LeaseSpec::default(), renewed), "never renewed");
    }
}
