//! The operator: watches `FallbackPolicy` resources and the Secrets they name, compiles each
//! with the sidecar's own compiler, keeps the last good version of each ready to serve
//! ([`served`]), and tells users in the resource's status and Events what it concluded.
//!
//! Sidecars stream their configuration from its config service ([`config`]), and report what
//! their targets do; the fleet view ([`fleet`]) merges the reports into decisions every pod
//! applies, and the leader writes them into status. Every replica reconciles, keeps its served
//! policies warm and serves sidecars; only the replica that holds the Lease ([`leader`]) writes
//! status and Events and decides for the fleet, with the others forwarding their sidecars'
//! evidence to it ([`service::peer`]). The process also serves `/healthz`, `/readyz` (ready once every
//! policy the first listing found has been reconciled) and `/metrics` on its admin port.

pub mod fleet;
pub mod inject;
pub mod leader;
pub mod reconcile;
pub mod secrets;
pub mod served;
pub mod service;
pub mod status;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, Event as WatchEvent};
use kube::runtime::{WatchStreamExt, predicates, watcher::watcher};
use kube::{Api, Client, ResourceExt};
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::net::body::{Body, text_response};
use crate::net::server::{Options, serve_with};
use crate::policy::FallbackPolicy;
use crate::telemetry::Metrics;
use fleet::FleetView;
use fleet::status::FleetStatus;
use inject::webhook::Webhook;
use leader::{Leadership, LeaseSettings};
use served::ServedPolicies;
use service::ConfigService;
use service::peer::Follower;
use service::sidecars::Sidecars;
use service::tls::ReloadingCert;

/// The config service's settings.
#[derive(Clone, Debug)]
pub struct ConfigServiceSettings {
    /// Where sidecars connect.
    pub listen: SocketAddr,
    /// The PEM certificate chain it serves, reloaded when it changes.
    pub cert_file: std::path::PathBuf,
    /// The PEM private key, reloaded when it changes.
    pub key_file: std::path::PathBuf,
    /// The most connections at once.
    pub max_connections: usize,
    /// This replica's own projected token (audience `backstop`), presented to the leader and
    /// used to recognise the other replicas' tokens.
    pub peer_token_file: std::path::PathBuf,
    /// The address the other replicas reach this one's config service at, if it leads.
    pub advertise: Option<String>,
}

/// The injection webhook's settings.
#[derive(Clone, Debug)]
pub struct WebhookSettings {
    /// Where the API server calls it.
    pub listen: SocketAddr,
    /// The injection settings file (the chart's ConfigMap).
    pub injection_config: std::path::PathBuf,
}

/// Connections the admin listener holds at once.
const ADMIN_MAX_CONNECTIONS: usize = 64;
/// How often the fleet view's timers advance.
const FLEET_TICK: Duration = Duration::from_millis(250);
/// How often the leader writes the fleet's status fields (when they changed).
const FLEET_STATUS_EVERY: Duration = Duration::from_secs(1);

/// The operator's settings.
#[derive(Clone, Debug)]
pub struct OperatorSettings {
    /// The config service sidecars stream from; `None`: off.
    pub config_service: Option<ConfigServiceSettings>,
    /// The sidecar-injection webhook (it shares the config service's certificate); `None`: off.
    pub webhook: Option<WebhookSettings>,
    /// Namespaces to watch; empty: all of them.
    pub namespaces: Vec<String>,
    /// The admin listener (`/healthz`, `/readyz`, `/metrics`).
    pub admin: SocketAddr,
    /// The namespace of the leader Lease (the operator's own).
    pub lease_namespace: String,
    /// The leader election.
    pub lease: LeaseSettings,
    /// Read only Secrets labelled [`secrets::CREDENTIALS_LABEL`].
    pub require_credentials_label: bool,
}

/// Why the operator could not run.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// A listener could not be bound.
    #[error("cannot bind the {listener} listener {address}: {source}")]
    Bind {
        /// Which.
        listener: &'static str,
        /// The address.
        address: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The webhook was asked for without the config service.
    #[error(
        "the injection webhook needs the config service: its certificate, and the sidecars it injects stream from it"
    )]
    WebhookWithoutConfigService,
    /// The Lease's timings would let two replicas lead at once.
    #[error(transparent)]
    Lease(#[from] leader::UnsafeTimings),
    /// The config service's certificate does not load.
    #[error("the config service's certificate: {0}; give --tls-cert-file and --tls-key-file, or --config-listen none")]
    Certificate(#[from] service::tls::CertError),
}

/// The instruments a reconcile records into.
pub struct Instruments {
    /// Reconciles, by result (`compiled`, `rejected`, `error`).
    pub reconciles: Counter<u64>,
    /// How long reconciles take.
    pub duration: Histogram<f64>,
}

impl Instruments {
    fn new(metrics: &Metrics, leader: Leadership) -> Instruments {
        metrics.runtime_tasks();
        let meter = metrics.meter("backstop-operator");
        meter
            .u64_observable_gauge("backstop.operator.leader")
            .with_description("1 while this replica holds the leader Lease and writes status")
            .with_callback(move |gauge| gauge.observe(u64::from(*leader.borrow()), &[]))
            .build();
        Instruments {
            reconciles: meter
                .u64_counter("backstop.operator.reconciles")
                .with_description("Reconciles, by result")
                .build(),
            duration: meter
                .f64_histogram("backstop.operator.reconcile.duration")
                .with_unit("s")
                .with_description("How long a reconcile takes, the API calls it makes included")
                .with_boundaries(vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0])
                .build(),
        }
    }
}

/// What every reconcile shares.
pub struct Context {
    /// The API server.
    pub client: Client,
    /// The last good compiled version of every policy.
    pub served: Arc<ServedPolicies>,
    /// Publishes Events.
    pub recorder: Recorder,
    /// Whether this replica leads.
    pub leader: Leadership,
    /// Reconcile metrics.
    pub instruments: Instruments,
    /// Whether only Secrets labelled [`secrets::CREDENTIALS_LABEL`] may be read.
    pub require_credentials_label: bool,
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    /// Counts one more failure in a row for `policy`; returns how many there have been.
    fn note_failure(&self, policy: &str) -> u32 {
        let mut failures = self.failures.lock();
        let count = failures.entry(policy.to_string()).or_default();
        *count = count.saturating_add(1);
        *count
    }

    /// Forgets `policy`'s failures after a reconcile that finished.
    fn clear_failures(&self, policy: &str) {
        self.failures.lock().remove(policy);
    }
}

/// Binds `address` for `listener`.
async fn bind(listener: &'static str, address: SocketAddr) -> Result<TcpListener, OperatorError> {
    TcpListener::bind(address).await.map_err(|source| OperatorError::Bind { listener, address, source })
}

/// The config service, bound, with the certificate it serves (the webhook's too).
struct BoundService {
    service: Arc<ConfigService>,
    listener: TcpListener,
    cert: Arc<ReloadingCert>,
    settings: ConfigServiceSettings,
}

/// The webhook, bound.
struct BoundWebhook {
    webhook: Arc<Webhook>,
    listener: TcpListener,
    cert: Arc<ReloadingCert>,
}

impl BoundWebhook {
    /// Binds the webhook of `settings`, serving the config service's certificate.
    async fn bind(settings: &WebhookSettings, service: &BoundService) -> Result<BoundWebhook, OperatorError> {
        let listener = bind("webhook", settings.listen).await?;
        let webhook = Webhook {
            settings_file: settings.injection_config.clone(),
            release: env!("CARGO_PKG_VERSION").to_string(),
        };
        if let Err(error) = webhook.settings() {
            tracing::warn!(%error, "the injection settings do not load now; pods are created without the sidecar until they do");
        }
        Ok(BoundWebhook { webhook: Arc::new(webhook), listener, cert: service.cert.clone() })
    }
}

/// An address for logs: the bound one, or `off`.
fn shown(address: Option<SocketAddr>) -> String {
    address.map_or_else(|| "off".to_string(), |a| a.to_string())
}

/// Runs the operator until `shutdown` turns true: binds every listener first (a listener that
/// cannot be bound stops it at once), then runs the leader election, the controllers, the fleet
/// view and its status, the config service, the webhook and the admin endpoint together.
pub async fn run(
    config: OperatorSettings,
    client: Client,
    metrics: Metrics,
    served: Arc<ServedPolicies>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), OperatorError> {
    config.lease.check()?;
    let (leader_tx, leader) = watch::channel(false);
    let (holder_tx, holder) = watch::channel(None);
    let reporter = Reporter { controller: "backstop-operator".into(), instance: Some(config.lease.identity.clone()) };
    let ctx = Arc::new(Context {
        client: client.clone(),
        served,
        recorder: Recorder::new(client.clone(), reporter),
        leader: leader.clone(),
        instruments: Instruments::new(&metrics, leader.clone()),
        require_credentials_label: config.require_credentials_label,
        failures: Mutex::default(),
    });
    let admin_listener = bind("admin", config.admin).await?;
    let fleet = Arc::new(FleetView::new(ctx.served.clone()));
    let sidecars = Arc::new(Sidecars::default());
    let service = match config.config_service.clone() {
        None => None,
        Some(settings) => {
            let cert = Arc::new(ReloadingCert::load(settings.cert_file.clone(), settings.key_file.clone())?);
            let listener = bind("config service", settings.listen).await?;
            let shared = service::Shared {
                served: ctx.served.clone(),
                fleet: fleet.clone(),
                sidecars: sidecars.clone(),
                leader: leader.clone(),
            };
            let service = ConfigService::new(
                client.clone(),
                shared,
                settings.peer_token_file.clone(),
                &metrics,
                shutdown.clone(),
            );
            Some(BoundService { service: Arc::new(service), listener, cert, settings })
        }
    };
    let webhook = match (&config.webhook, &service) {
        (None, _) => None,
        (Some(_), None) => return Err(OperatorError::WebhookWithoutConfigService),
        (Some(settings), Some(service)) => Some(BoundWebhook::bind(settings, service).await?),
    };
    let service_address = service.as_ref().and_then(|s| s.listener.local_addr().ok());
    let mut lease = config.lease.clone();
    lease.endpoint = service_address
        .and_then(|bound| leader::advertised(service.as_ref().and_then(|s| s.settings.advertise.clone()), bound));
    let lease_api = Api::<Lease>::namespaced(client.clone(), &config.lease_namespace);
    let lease_pods = Api::namespaced(client.clone(), &config.lease_namespace);
    let election = tokio::spawn(leader::run(lease_api, lease_pods, lease, leader_tx, holder_tx, shutdown.clone()));
    let follower = service.as_ref().map(|service| Follower {
        fleet: fleet.clone(),
        sidecars: sidecars.clone(),
        holder,
        identity: config.lease.identity.clone(),
        token_file: service.settings.peer_token_file.clone(),
        cert: service.cert.clone(),
    });
    let follower = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            if let Some(follower) = follower {
                follower.run(shutdown).await;
            }
        }
    });
    tracing::info!(admin = %shown(admin_listener.local_addr().ok()),
        config = %shown(service_address),
        webhook = %shown(webhook.as_ref().and_then(|w| w.listener.local_addr().ok())),
        namespaces = %if config.namespaces.is_empty() { "all".to_string() } else { config.namespaces.join(",") },
        identity = %config.lease.identity, "backstop operator starting");
    {
        let sidecars = sidecars.clone();
        metrics
            .meter("backstop-operator")
            .u64_observable_gauge("backstop.operator.sidecars")
            .with_description("Sidecars streaming their configuration from this replica")
            .with_callback(move |gauge| gauge.observe(sidecars.len() as u64, &[]))
            .build();
        let (fleet, leader) = (fleet.clone(), leader.clone());
        metrics
            .meter("backstop-operator")
            .u64_observable_gauge("backstop.target.verified")
            .with_description(
                "1 when a verified target answered its last verification probe, 0 when it did not; by namespace \
                 and target, from the leader",
            )
            .with_callback(move |gauge| {
                if !*leader.borrow() {
                    return;
                }
                for (namespace, target, passed) in fleet.verified() {
                    let labels = [KeyValue::new("namespace", namespace), KeyValue::new("target", target)];
                    gauge.observe(u64::from(passed), &labels);
                }
            })
            .build();
    }
    let fleet_ticks = tokio::spawn(fleet.clone().run(FLEET_TICK, shutdown.clone()));
    // One watched store of policies per scope (a namespace, or all): its controller reconciles
    // from it, and the fleet status writer sees in it what the API server holds.
    let scopes: Vec<Option<String>> =
        if config.namespaces.is_empty() { vec![None] } else { config.namespaces.iter().cloned().map(Some).collect() };
    let scopes: Vec<_> = scopes.into_iter().map(|scope| (scope, reflector::store::<FallbackPolicy>())).collect();
    let fleet_status = FleetStatus::new(
        client.clone(),
        ctx.served.clone(),
        fleet.clone(),
        sidecars.clone(),
        ctx.recorder.clone(),
        leader.clone(),
        scopes.iter().map(|(_, (reader, _))| reader.clone()).collect(),
    );
    let fleet_status = tokio::spawn(fleet_status.run(FLEET_STATUS_EVERY, shutdown.clone()));
    let service = async move {
        if let Some(BoundService { service, listener, cert, settings }) = service {
            service.run(listener, cert, settings.max_connections).await;
        }
    };
    let admin = {
        let (served, metrics) = (ctx.served.clone(), metrics.clone());
        // Probes and Prometheus: a handful of connections at a time.
        let options = Options::network_facing(ADMIN_MAX_CONNECTIONS);
        serve_with(admin_listener, shutdown.clone(), Duration::from_secs(5), options, move |request| {
            let response = admin(&request, served.is_complete(), &metrics);
            async move { response }
        })
    };
    let controllers = futures_util::future::join_all(
        scopes
            .into_iter()
            .map(|(scope, (reader, writer))| controller(scope, reader, writer, ctx.clone(), shutdown.clone())),
    );
    let webhook = {
        let shutdown = shutdown.clone();
        async move {
            if let Some(BoundWebhook { webhook, listener, cert }) = webhook {
                webhook.run(listener, cert, shutdown).await;
            }
        }
    };
    tokio::join!(admin, controllers, service, webhook);
    let _ = tokio::join!(fleet_ticks, fleet_status, follower);
    // The election releases the Lease when `shutdown` fires; wait for it to finish.
    let _ = election.await;
    Ok(())
}

/// One controller: the policies of one namespace (or all), triggered by their changes, by the
/// Secrets they name, and by this replica becoming the leader.
async fn controller(
    scope: Option<String>,
    reader: Store<FallbackPolicy>,
    writer: reflector::store::Writer<FallbackPolicy>,
    ctx: Arc<Context>,
    mut shutdown: watch::Receiver<bool>,
) {
    // `PartialObjectMeta` makes the Secret watch metadata-only: the operator learns that a
    // Secret changed without ever holding Secrets it does not use.
    let (policies, secrets): (Api<FallbackPolicy>, Api<PartialObjectMeta<Secret>>) = match &scope {
        Some(namespace) => {
            (Api::namespaced(ctx.client.clone(), namespace), Api::namespaced(ctx.client.clone(), namespace))
        }
        None => (Api::all(ctx.client.clone()), Api::all(ctx.client.clone())),
    };
    let (served, listed) = (ctx.served.clone(), reader.clone());
    let scope_for_prune = scope.clone();
    let changes = watcher(policies, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .inspect(move |event| match event {
            Ok(WatchEvent::Delete(policy)) => {
                served.remove(&policy.namespace().unwrap_or_default(), &policy.name_any())
            }
            // After a (re-)list, stop serving what no longer exists; after the first, the
            // namespaces are complete once every policy listed has been reconciled.
            Ok(WatchEvent::InitDone) => {
                let found = listed
                    .state()
                    .iter()
                    .map(|p| (p.namespace().unwrap_or_default(), p.name_any()))
                    .collect::<Vec<_>>();
                served.listed(scope_for_prune.as_deref(), found);
                prune(&served, &listed, scope_for_prune.as_deref());
            }
            _ => {}
        })
        .applied_objects()
        .predicate_filter(predicates::generation, Default::default());
    let secret_watch = if ctx.require_credentials_label {
        watcher::Config::default().labels(&format!("{}=true", secrets::CREDENTIALS_LABEL))
    } else {
        watcher::Config::default()
    };
    let secret_changes = watcher(secrets, secret_watch)
        .default_backoff()
        .touched_objects()
        .predicate_filter(predicates::resource_version, Default::default());
    let by_secret = reader.clone();
    let became_leader = futures_util::stream::unfold(ctx.leader.clone(), |mut leader| async move {
        loop {
            leader.changed().await.ok()?;
            if *leader.borrow_and_update() {
                return Some(((), leader));
            }
        }
    });
    let run = Controller::for_stream(changes, reader)
        .watches_stream(secret_changes, move |secret: PartialObjectMeta<Secret>| policies_naming(&by_secret, &secret))
        .reconcile_all_on(became_leader)
        .graceful_shutdown_on(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .run(reconcile::reconcile, reconcile::error_policy, ctx.clone())
        .for_each(|result| {
            match result {
                Ok((policy, _)) => {
                    ctx.clear_failures(&format!("{}/{}", policy.namespace.unwrap_or_default(), policy.name))
                }
                Err(error) => tracing::debug!(%error, "controller"),
            }
            std::future::ready(())
        });
    run.await;
}

/// The policies that take a key from `secret`.
fn policies_naming(
    policies: &Store<FallbackPolicy>,
    secret: &PartialObjectMeta<Secret>,
) -> Vec<ObjectRef<FallbackPolicy>> {
    let (namespace, name) = (secret.namespace(), secret.name_any());
    policies
        .state()
        .iter()
        .filter(|policy| policy.namespace() == namespace && secrets::references(&policy.spec, &name))
        .map(|policy| ObjectRef::from_obj(policy.as_ref()))
        .collect()
}

/// Stops serving policies of `scope` that the listing `listed` no longer has.
fn prune(served: &ServedPolicies, listed: &Store<FallbackPolicy>, scope: Option<&str>) {
    for namespace in served.namespaces() {
        if scope.is_some_and(|scope| scope != namespace) {
            continue;
        }
        served.retain(&namespace, |name| listed.get(&ObjectRef::new(name).within(&namespace)).is_some());
    }
}

fn admin(request: &Request<Incoming>, ready: bool, metrics: &Metrics) -> Response<Body> {
    if request.method() != Method::GET {
        return text_response(StatusCode::METHOD_NOT_ALLOWED, "only GET is served here\n");
    }
    match request.uri().path() {
        "/healthz" => text_response(StatusCode::OK, "ok\n"),
        "/readyz" if ready => text_response(StatusCode::OK, "ready\n"),
        "/readyz" => text_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the first listing and reconcile of every policy is not done\n",
        ),
        "/metrics" => text_response(StatusCode::OK, &metrics.prometheus_text()),
        _ => text_response(StatusCode::NOT_FOUND, "not found; try /healthz, /readyz or /metrics\n"),
    }
}
