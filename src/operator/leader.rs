//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several operator replicas
//! exactly one writes status and events while all of them keep their served policies warm.
//!
//! A small module on kube's API rather than a crate: the protocol is a few lines of optimistic
//! concurrency (every write names the Lease's `resourceVersion`, so two replicas never both
//! win), and the rules that keep two replicas from both leading are explicit in [`Elector`],
//! as client-go's leader election has them:
//!
//! - A standby measures the Lease's age from when *it* last saw the record change, on its own
//!   monotonic clock, never from the holder's `renewTime`: a holder whose clock runs behind
//!   cannot be deposed early.
//! - The leader renews every `renew`; a renewal that has not succeeded within `renew_deadline`
//!   of the last one (a call that fails, or one that hangs) makes it step down at once, before
//!   `duration` runs out and a standby may take the Lease. `renew_deadline` must be shorter
//!   than `duration`.
//!
//! A standby checks every `retry`; a replica that stops releases the Lease, so a standby takes
//! over at once on a rolling update.
//!
//! The leader also writes where its config service can be reached into the Lease
//! ([`ENDPOINT_ANNOTATION`]): the other replicas forward their sidecars' evidence there, so
//! that one fleet view decides for every pod ([`crate::operator::service::peer`]).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use kube::core::PartialObjectMeta;
use tokio::sync::watch;
use tokio::time::Instant;

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
    /// How long the leader keeps leading without a successful renewal; shorter than `duration`.
    pub renew_deadline: Duration,
    /// How often a standby tries to take it (and a leader retries a failed renewal).
    pub retry: Duration,
    /// Whether identities are pod names (of the Lease's namespace): a Lease whose holder pod no
    /// longer exists is then taken at once, without waiting out its duration (after a `helm
    /// uninstall` deleted the RBAC before the old leader could release it, say).
    pub holders_are_pods: bool,
}

/// Lease timings that would let two replicas lead at once.
#[derive(Debug, thiserror::Error)]
#[error(
    "--lease-renew ({renew}) must be shorter than --lease-renew-deadline ({deadline}), and that shorter than --lease-duration ({duration}): a leader must step down before a standby may take the Lease"
)]
pub struct UnsafeTimings {
    renew: String,
    deadline: String,
    duration: String,
}

impl LeaseSettings {
    /// Checks that a leader that cannot renew steps down before a standby may take the Lease.
    pub fn check(&self) -> Result<(), UnsafeTimings> {
        if self.renew < self.renew_deadline && self.renew_deadline < self.duration {
            return Ok(());
        }
        let text = |d: Duration| humantime::format_duration(d).to_string();
        Err(UnsafeTimings {
            renew: text(self.renew),
            deadline: text(self.renew_deadline),
            duration: text(self.duration),
        })
    }
}

/// This replica's identity in the Lease, and whether identities are pod names: `explicit` if
/// given, else the pod's name (`POD_NAME`, from the downward API), else the host name.
pub fn identity(explicit: Option<String>) -> (String, bool) {
    let pod = std::env::var("POD_NAME").ok();
    let holders_are_pods = explicit.is_none() && pod.is_some();
    let identity = explicit
        .or(pod)
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_string()))
        .unwrap_or_else(|| format!("backstop-operator-{}", std::process::id()));
    (identity, holders_are_pods)
}

/// The Lease's namespace: `explicit` if given, else the operator's own (`POD_NAMESPACE`, then
/// the service account's), else `backstop-system`.
pub fn namespace(explicit: Option<String>) -> String {
    explicit
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .or_else(|| std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace").ok())
        .map(|ns| ns.trim().to_string())
        .unwrap_or_else(|| "backstop-system".to_string())
}

/// Where the other replicas reach this one while it leads: `given`, else the pod's IP
/// (`POD_IP`) and the bound port, else the bound address itself unless it is unspecified.
pub fn advertised(given: Option<String>, bound: std::net::SocketAddr) -> Option<String> {
    let pod_ip = std::env::var("POD_IP").ok().and_then(|ip| ip.parse::<std::net::IpAddr>().ok());
    given
        .or_else(|| pod_ip.map(|ip| std::net::SocketAddr::new(ip, bound.port()).to_string()))
        .or_else(|| (!bound.ip().is_unspecified()).then(|| bound.to_string()))
}

/// The Lease as last read: what a standby watches for change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Who holds it ("" when released).
    pub holder: String,
    /// Its `resourceVersion`: any write changes it.
    pub version: String,
    /// How long its holder keeps it without renewing.
    pub duration: Duration,
}

/// The election's rules, free of I/O: what this replica has seen of the Lease and when, on its
/// own clock.
#[derive(Debug)]
pub struct Elector {
    identity: String,
    renew_deadline: Duration,
    /// The record last seen to change, and when.
    observed: Option<(Record, Instant)>,
    /// When this replica last renewed successfully, while it leads.
    renewed: Option<Instant>,
    /// Whether the holder of the observed record was looked up, and found gone.
    holder_checked: Option<bool>,
}

impl Elector {
    /// An elector for `identity`.
    pub fn new(identity: &str, renew_deadline: Duration) -> Elector {
        Elector { identity: identity.to_string(), renew_deadline, observed: None, renewed: None, holder_checked: None }
    }

    /// Notes the Lease as read at `now`; its age restarts whenever it changed.
    pub fn observe(&mut self, record: Record, now: Instant) {
        if self.observed.as_ref().is_none_or(|(seen, _)| *seen != record) {
            self.observed = Some((record, now));
            self.holder_checked = None;
        }
    }

    /// Whether the observed holder still needs looking up (once per record).
    pub fn holder_unchecked(&self) -> bool {
        self.holder_checked.is_none() && self.observed.as_ref().is_some_and(|(r, _)| !r.holder.is_empty())
    }

    /// The observed holder was looked up: `gone` when it no longer exists, so it cannot lead.
    pub fn holder_found(&mut self, gone: bool) {
        self.holder_checked = Some(gone);
    }

    /// Whether this replica may write the Lease as its holder at `now`: it is free, ours, or
    /// unchanged for its whole duration as this replica has watched it.
    pub fn may_take(&self, now: Instant) -> bool {
        match &self.observed {
            None => true,
            Some((record, at)) => {
                record.holder.is_empty()
                    || record.holder == self.identity
                    || self.holder_checked == Some(true)
                    || now.saturating_duration_since(*at) >= record.duration
            }
        }
    }

    /// This replica wrote the Lease as its holder at `now`.
    pub fn renewed(&mut self, now: Instant) {
        self.renewed = Some(now);
    }

    /// This replica does not lead (it lost a race, stepped down or released).
    pub fn lost(&mut self) {
        self.renewed = None;
    }

    /// Whether this replica leads.
    pub fn leads(&self) -> bool {
        self.renewed.is_some()
    }

    /// Until when this replica may go on leading without another successful renewal.
    pub fn leads_until(&self) -> Option<Instant> {
        self.renewed.map(|at| at + self.renew_deadline)
    }
}

/// Whether this replica leads, as a watch channel that changes the moment it does.
pub type Leadership = watch::Receiver<bool>;

/// Runs the election until `shutdown` turns true, then releases the Lease if this replica
/// holds it. `leader` follows the outcome; `holder` follows who holds the Lease.
pub async fn run(
    api: Api<Lease>,
    pods: Api<PartialObjectMeta<Pod>>,
    settings: LeaseSettings,
    leader: watch::Sender<bool>,
    holder: watch::Sender<Option<Holder>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut elector = Elector::new(&settings.identity, settings.renew_deadline);
    loop {
        // A call that hangs must not keep a leader leading past its renew deadline.
        let until = elector.leads_until();
        let attempt = try_hold(&api, &pods, &settings, &mut elector);
        let outcome = match until {
            Some(until) => tokio::time::timeout_at(until, attempt).await.ok(),
            None => tokio::time::timeout(settings.duration, attempt).await.ok(),
        };
        let succeeded = matches!(outcome, Some(Ok(_)));
        let leads = match outcome {
            Some(Ok(held_by)) => {
                holder.send_if_modified(|current| std::mem::replace(current, held_by.clone()) != held_by);
                elector.leads()
            }
            Some(Err(error)) => {
                tracing::warn!(lease = %settings.name, %error, "cannot read or write the leader lease");
                step_down_if_late(&mut elector, &settings)
            }
            None => {
                tracing::warn!(lease = %settings.name, "the leader lease did not answer in time");
                step_down_if_late(&mut elector, &settings)
            }
        };
        if leader.send_if_modified(|current| std::mem::replace(current, leads) != leads) {
            tracing::info!(lease = %settings.name, identity = %settings.identity, leads, "leadership changed");
        }
        let wait = match (leads, elector.leads_until()) {
            // A leader renews every `renew`, but sooner after a failure, and never later than
            // its deadline.
            (true, Some(until)) => {
                let next = Instant::now() + if succeeded { settings.renew } else { settings.retry };
                next.min(until)
            }
            _ => Instant::now() + settings.retry,
        };
        tokio::select! {
            _ = shutdown.changed() => break,
            () = tokio::time::sleep_until(wait) => {}
        }
    }
    if elector.leads() {
        leader.send_replace(false);
        if let Err(error) = release(&api, &settings).await {
            tracing::warn!(lease = %settings.name, %error, "cannot release the leader lease");
        }
    }
}

/// After a failed renewal: steps down once the renew deadline has passed; returns whether this
/// replica still leads.
fn step_down_if_late(elector: &mut Elector, settings: &LeaseSettings) -> bool {
    if elector.leads_until().is_some_and(|until| Instant::now() >= until) {
        tracing::warn!(lease = %settings.name, deadline_s = settings.renew_deadline.as_secs_f64(),
            "no renewal within the renew deadline: stepping down before another replica may lead");
        elector.lost();
    }
    elector.leads()
}

/// Takes or renews the Lease if this replica may; returns who holds it now.
async fn try_hold(
    api: &Api<Lease>,
    pods: &Api<PartialObjectMeta<Pod>>,
    settings: &LeaseSettings,
    elector: &mut Elector,
) -> kube::Result<Option<Holder>> {
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
        return claimed(api.create(&PostParams::default(), &lease).await, ourselves, elector);
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.clone().unwrap_or_default();
    elector.observe(
        Record {
            holder: holder.clone(),
            version: lease.metadata.resource_version.clone().unwrap_or_default(),
            duration: Duration::from_secs(u64::try_from(spec.lease_duration_seconds.unwrap_or(15)).unwrap_or(15)),
        },
        Instant::now(),
    );
    let ours = holder == settings.identity;
    if !ours && elector.leads() {
        // Someone else holds it: whatever this replica thought, it does not lead.
        elector.lost();
    }
    if !elector.may_take(Instant::now()) && settings.holders_are_pods && elector.holder_unchecked() {
        let gone = pods.get_metadata_opt(&holder).await?.is_none();
        if gone {
            tracing::info!(lease = %settings.name, %holder, "the lease's holder pod is gone: taking the lease without waiting it out");
        }
        elector.holder_found(gone);
    }
    if !elector.may_take(Instant::now()) {
        let endpoint = lease.metadata.annotations.as_ref().and_then(|a| a.get(ENDPOINT_ANNOTATION)).cloned();
        return Ok(Some(Holder { identity: holder, endpoint }));
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
    claimed(api.replace(&settings.name, &PostParams::default(), &renewed).await, ourselves, elector)
}

fn claimed(written: kube::Result<Lease>, ourselves: Holder, elector: &mut Elector) -> kube::Result<Option<Holder>> {
    match written {
        Ok(lease) => {
            let now = Instant::now();
            elector.renewed(now);
            elector.observe(
                Record {
                    holder: ourselves.identity.clone(),
                    version: lease.metadata.resource_version.unwrap_or_default(),
                    duration: Duration::from_secs(
                        u64::try_from(lease.spec.and_then(|s| s.lease_duration_seconds).unwrap_or(15)).unwrap_or(15),
                    ),
                },
                now,
            );
            Ok(Some(ourselves))
        }
        // Someone else won the race; the next round learns who.
        Err(kube::Error::Api(status)) if status.code == 409 => {
            elector.lost();
            Ok(None)
        }
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

    fn record(holder: &str, version: &str) -> Record {
        Record { holder: holder.into(), version: version.into(), duration: Duration::from_secs(15) }
    }

    #[tokio::test(start_paused = true)]
    async fn a_standby_times_the_lease_on_its_own_clock_from_the_last_change_it_saw() {
        let mut standby = Elector::new("b", Duration::from_secs(10));
        let start = Instant::now();
        // Whatever the holder's renewTime says (its clock may be far behind), a record that keeps
        // changing is never taken.
        for second in 0..60u64 {
            standby.observe(record("a", &second.to_string()), start + Duration::from_secs(second));
            assert!(!standby.may_take(start + Duration::from_secs(second)), "renewed at {second}s");
        }
        // It stops changing: taken only once the whole duration passed since it was seen to change.
        let last = start + Duration::from_secs(59);
        standby.observe(record("a", "59"), last + Duration::from_secs(10));
        assert!(!standby.may_take(last + Duration::from_secs(14)));
        assert!(standby.may_take(last + Duration::from_secs(15)));
        // Released: taken at once.
        standby.observe(record("", "60"), last + Duration::from_secs(16));
        assert!(standby.may_take(last + Duration::from_secs(16)));
        // Held by a pod that is gone: taken at once, once looked up.
        let mut after_uninstall = Elector::new("c", Duration::from_secs(10));
        after_uninstall.observe(record("old-pod", "70"), start);
        assert!(after_uninstall.holder_unchecked() && !after_uninstall.may_take(start));
        after_uninstall.holder_found(true);
        assert!(!after_uninstall.holder_unchecked() && after_uninstall.may_take(start));
        after_uninstall.observe(record("new-pod", "71"), start);
        assert!(
            after_uninstall.holder_unchecked() && !after_uninstall.may_take(start),
            "a new holder is looked up anew"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_leads_only_until_its_renew_deadline_without_a_renewal() {
        let mut leader = Elector::new("a", Duration::from_secs(10));
        assert!(!leader.leads());
        let start = Instant::now();
        leader.renewed(start);
        assert_eq!(leader.leads_until(), Some(start + Duration::from_secs(10)));
        leader.renewed(start + Duration::from_secs(5));
        assert_eq!(leader.leads_until(), Some(start + Duration::from_secs(15)));
        leader.lost();
        assert!(!leader.leads() && leader.leads_until().is_none());
    }

    /// A Lease API whose calls the test answers, or leaves hanging.
    fn lease_api()
    -> (Api<Lease>, tower_test::mock::Handle<http::Request<kube::client::Body>, http::Response<kube::client::Body>>)
    {
        let (service, handle) =
            tower_test::mock::pair::<http::Request<kube::client::Body>, http::Response<kube::client::Body>>();
        (Api::namespaced(kube::Client::new(service, "default"), "backstop-system"), handle)
    }

    fn lease_json(holder: &str, version: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "lease", "namespace": "backstop-system", "resourceVersion": version},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15}}))
        .expect("json")
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_whose_renewal_hangs_steps_down_at_its_deadline_before_the_lease_expires() {
        let (api, mut handle) = lease_api();
        let pods = Api::namespaced(api.clone().into_client(), "backstop-system");
        let settings = LeaseSettings {
            endpoint: None,
            name: "lease".into(),
            identity: "a".into(),
            duration: Duration::from_secs(15),
            renew: Duration::from_secs(5),
            renew_deadline: Duration::from_secs(10),
            retry: Duration::from_secs(2),
            holders_are_pods: false,
        };
        let (leader_tx, mut leader) = watch::channel(false);
        let (holder_tx, _holder) = watch::channel(None);
        let (_stop, stopped) = watch::channel(false);
        let election = tokio::spawn(run(api, pods, settings, leader_tx, holder_tx, stopped));
        // The first round: the Lease is free; this replica takes it.
        let (request, respond) = handle.next_request().await.expect("a read");
        assert_eq!(request.method(), http::Method::GET);
        respond.send_response(http::Response::builder().body(lease_json("", "1").into()).expect("response"));
        let (request, respond) = handle.next_request().await.expect("a write");
        assert_eq!(request.method(), http::Method::PUT);
        respond.send_response(http::Response::builder().body(lease_json("a", "2").into()).expect("response"));
        leader.wait_for(|leads| *leads).await.expect("leads");
        let led_at = Instant::now();
        // The next renewal never gets an answer: it hangs.
        let (_hung, _never) = handle.next_request().await.expect("a renewal");
        tokio::time::timeout(Duration::from_secs(60), leader.wait_for(|leads| !*leads))
            .await
            .expect("steps down rather than lead on a hung call")
            .expect("steps down");
        let stepped_down = led_at.elapsed();
        assert!(stepped_down <= Duration::from_secs(10), "stepped down after {stepped_down:?}");
        assert!(stepped_down < Duration::from_secs(15), "before any standby may take the Lease");
        election.abort();
    }
}
