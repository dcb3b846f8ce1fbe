//! The sidecar's side of the config stream ([`super::protocol`]): connect to the operator with
//! the pod's token, apply each configuration atomically (requests in flight keep the snapshot
//! they started with), acknowledge or refuse it, persist it, apply the fleet's decisions, and
//! report what the targets did. Reconnects with exponential backoff and full jitter, resuming
//! by version so that an unchanged configuration is not sent again.
//!
//! The token file is read at every connection, so the kubelet's rotation is picked up; the
//! operator ends a stream when its token expires. The CA file is read at every connection too.
//! Fleet decisions are cleared when the stream breaks: a decision the sidecar can no longer
//! hear the end of must not outlive the connection, and its own breakers take over.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rand::Rng as _;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::protocol::{
    Config, Fleet, FleetTarget, HEARTBEAT, Lines, PROTOCOL, PROTOCOL_HEADER, REPORT_EVERY, Rejected, Report,
    STREAM_IDLE, STREAM_PATH, ServerMessage, TargetReport, VERSION_HEADER, line,
};
use super::state;
use crate::health::gate::FleetState;
use crate::provider::load_ca_file;
use crate::server::{Body, BoxError};
use crate::snapshot::PolicyStore;

/// The default path of the pod's projected token.
pub const DEFAULT_TOKEN_FILE: &str = "/var/run/secrets/backstop/token";
/// How long connecting (TCP, TLS, HTTP/2 and the stream's headers) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The first and the longest wait between reconnection attempts.
const BACKOFF_FIRST: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Where and how to reach the operator.
#[derive(Clone, Debug)]
pub struct StreamSettings {
    /// `https://HOST:PORT` of the operator's config service.
    pub url: Uri,
    /// A PEM bundle to trust for it: a file, or the PEM itself (the injected sidecar gets it
    /// inline, so no object is needed in the app's namespace); the Mozilla roots when `None`.
    pub ca: Option<CaSource>,
    /// The pod's projected ServiceAccount token.
    pub token_file: PathBuf,
    /// Where the applied configuration is kept, if anywhere.
    pub state_dir: Option<PathBuf>,
}

/// Where the control plane's CA comes from.
#[derive(Clone, Debug)]
pub enum CaSource {
    /// A PEM file, read at every connection.
    File(PathBuf),
    /// PEM text.
    Pem(String),
}

/// Why a stream could not be had or broke.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The URL is not `https://HOST[:PORT]`.
    #[error("`{0}` is not an https://HOST:PORT URL")]
    Url(String),
    /// The token file cannot be read.
    #[error("cannot read the token file {path}: {source}")]
    Token {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The CA file cannot be used.
    #[error(transparent)]
    Ca(#[from] crate::provider::http::CaFileError),
    /// The inline CA is not PEM certificates.
    #[error("the control plane's CA (BACKSTOP_CONTROL_PLANE_CA_DATA) holds no PEM certificate")]
    CaData,
    /// TLS could not be set up.
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// Connecting failed.
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    /// Connecting took too long.
    #[error("connecting took longer than {}s", CONNECT_TIMEOUT.as_secs())]
    Timeout,
    /// HTTP/2 failed.
    #[error("HTTP/2: {0}")]
    Http(#[from] hyper::Error),
    /// The operator refused the stream.
    #[error("the operator refused the stream ({status}): {message}")]
    Refused {
        /// Its status.
        status: StatusCode,
        /// Its explanation.
        message: String,
    },
    /// Nothing came for [`STREAM_IDLE`].
    #[error("nothing heard from the operator for {}s", STREAM_IDLE.as_secs())]
    Idle,
    /// The operator sent a message longer than the protocol allows.
    #[error("the operator sent a message longer than the protocol allows")]
    TooLong,
    /// The stream ended without a goodbye.
    #[error("the stream ended")]
    Ended,
}

/// How a stream ended without an error.
enum Ended {
    /// The operator said goodbye: reconnect at once.
    Goodbye(String),
    /// The sidecar is shutting down.
    Shutdown,
}

/// The sidecar's link to the operator.
pub struct ControlStream {
    settings: StreamSettings,
    store: Arc<PolicyStore>,
    /// The configuration version served, from the operator or the state directory.
    applied: Option<String>,
    /// The fleet's decisions last received, applied again after each configuration.
    fleet: Option<Fleet>,
    /// A refusal not yet reported.
    rejected: Option<Rejected>,
    /// An acknowledgement not yet sent.
    pending_ack: bool,
    last_error: Option<String>,
}

impl ControlStream {
    /// A link feeding `store`.
    pub fn new(settings: StreamSettings, store: Arc<PolicyStore>) -> Result<ControlStream, StreamError> {
        if settings.url.scheme_str() != Some("https") || settings.url.host().is_none() {
            return Err(StreamError::Url(settings.url.to_string()));
        }
        Ok(ControlStream {
            settings,
            store,
            applied: None,
            fleet: None,
            rejected: None,
            pending_ack: false,
            last_error: None,
        })
    }

    /// Serves the configuration persisted in the state directory, if there is a usable one;
    /// returns its version.
    pub fn restore(&mut self) -> Option<String> {
        let dir = self.settings.state_dir.as_ref()?;
        let config = match state::load(dir) {
            Ok(config) => config?,
            Err(error) => {
                tracing::warn!(%error, "the persisted configuration is not usable; waiting for the operator");
                return None;
            }
        };
        match self.store.publish_all(&config.policies, &config.version, &config.empty_note()) {
            Ok(_) => {
                tracing::info!(version = %config.version, policies = %names(&config), dir = %dir.display(),
                    "serving the persisted configuration until the operator is reached");
                self.applied = Some(config.version.clone());
                Some(config.version)
            }
            Err(error) => {
                tracing::warn!(%error, "the persisted configuration cannot be served; waiting for the operator");
                None
            }
        }
    }

    /// Keeps the stream up until `shutdown`.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut failures: u32 = 0;
        loop {
            let started = Instant::now();
            match self.session(&mut shutdown).await {
                Ok(Ended::Shutdown) => return,
                Ok(Ended::Goodbye(reason)) => {
                    tracing::info!(%reason, "the operator ended the stream; reconnecting");
                    failures = 0;
                    continue;
                }
                Err(error) => {
                    self.store.health().apply_fleet(|_| None);
                    if started.elapsed() > Duration::from_secs(10) {
                        failures = 0;
                    }
                    self.note_error(&error);
                }
            }
            let ceiling = BACKOFF_FIRST.saturating_mul(1 << failures.min(10)).min(BACKOFF_MAX);
            failures = failures.saturating_add(1);
            let wait = ceiling.mul_f64(rand::rng().random_range(0.1..=1.0));
            tokio::select! {
                _ = shutdown.changed() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    fn note_error(&mut self, error: &StreamError) {
        let text = error.to_string();
        let url = &self.settings.url;
        if self.last_error.as_deref() != Some(text.as_str()) {
            match self.store.load() {
                Some(snapshot) => tracing::warn!(operator = %url, error = %text,
                    serving = %snapshot.digest, "lost the operator; serving the last configuration applied"),
                None => {
                    tracing::warn!(operator = %url, error = %text, "cannot reach the operator; nothing to serve yet")
                }
            }
            self.last_error = Some(text.clone());
        } else {
            tracing::debug!(operator = %url, error = %text, "still cannot reach the operator");
        }
        if self.store.load().is_none() {
            self.store.set_unavailable(format!("waiting for the operator at {url}: {text}"));
        }
    }

    async fn connect(&self) -> Result<hyper::client::conn::http2::SendRequest<Body>, StreamError> {
        let url = &self.settings.url;
        let host = url.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_string();
        let port = url.port_u16().unwrap_or(443);
        let mut roots = rustls::RootCertStore::empty();
        match &self.settings.ca {
            Some(CaSource::File(path)) => {
                for cert in load_ca_file(path)? {
                    roots.add(cert)?;
                }
            }
            Some(CaSource::Pem(pem)) => {
                use rustls::pki_types::pem::PemObject;
                let certs: Vec<_> =
                    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()).filter_map(Result::ok).collect();
                if certs.is_empty() {
                    return Err(StreamError::CaData);
                }
                for cert in certs {
                    roots.add(cert)?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let name = ServerName::try_from(host.clone()).map_err(|_| StreamError::Url(url.to_string()))?;
        let connecting = async {
            let tcp = TcpStream::connect((host.as_str(), port)).await.map_err(StreamError::Connect)?;
            let _ = tcp.set_nodelay(true);
            let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
                .connect(name, tcp)
                .await
                .map_err(StreamError::Connect)?;
            let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(Duration::from_secs(20))
                .keep_alive_timeout(Duration::from_secs(10))
                .handshake(TokioIo::new(stream))
                .await?;
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(%error, "the operator connection ended");
                }
            });
            Ok::<_, StreamError>(sender)
        };
        tokio::time::timeout(CONNECT_TIMEOUT, connecting).await.map_err(|_| StreamError::Timeout)?
    }

    async fn session(&mut self, shutdown: &mut watch::Receiver<bool>) -> Result<Ended, StreamError> {
        let token_file = &self.settings.token_file;
        let token = std::fs::read_to_string(token_file)
            .map_err(|source| StreamError::Token { path: token_file.clone(), source })?;
        let mut sender = self.connect().await?;
        let (tx, rx) = mpsc::channel::<Bytes>(4);
        let frames = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|bytes| (Ok::<_, BoxError>(Frame::data(bytes)), rx))
        });
        let uri =
            format!("https://{}{STREAM_PATH}", self.settings.url.authority().map(|a| a.as_str()).unwrap_or_default());
        let request = Request::post(uri)
            .header(http::header::AUTHORIZATION, format!("Bearer {}", token.trim()))
            .header(PROTOCOL_HEADER, PROTOCOL)
            .header(VERSION_HEADER, self.applied.clone().unwrap_or_default())
            .header(http::header::CONTENT_TYPE, "application/x-ndjson")
            .body(Body::new(StreamBody::new(frames)))
            .map_err(|_| StreamError::Url(self.settings.url.to_string()))?;
        let response = tokio::time::timeout(CONNECT_TIMEOUT, sender.send_request(request))
            .await
            .map_err(|_| StreamError::Timeout)??;
        let status = response.status();
        let mut body = response.into_body();
        if !status.is_success() {
            let text =
                http_body_util::Limited::new(body, 4096).collect().await.map(|c| c.to_bytes()).unwrap_or_default();
            let message = String::from_utf8_lossy(&text).trim().to_string();
            return Err(StreamError::Refused { status, message });
        }
        if self.last_error.take().is_some() {
            tracing::info!(operator = %self.settings.url, "reconnected to the operator");
        } else {
            tracing::info!(operator = %self.settings.url, "connected to the operator");
        }
        let mut lines = Lines::default();
        let mut reports = tokio::time::interval(REPORT_EVERY);
        reports.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_sent = Instant::now();
        let mut heard = Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.changed() => return Ok(Ended::Shutdown),
                () = tokio::time::sleep_until(heard + STREAM_IDLE) => return Err(StreamError::Idle),
                frame = body.frame() => {
                    let data = match frame {
                        Some(Ok(frame)) => match frame.into_data() {
                            Ok(data) => data,
                            Err(_) => continue,
                        },
                        Some(Err(error)) => return Err(StreamError::Http(error)),
                        None => return Err(StreamError::Ended),
                    };
                    heard = Instant::now();
                    for text in lines.push(&data).map_err(|_| StreamError::TooLong)? {
                        if let Some(ended) = self.take(&text) {
                            return Ok(ended);
                        }
                        if let Some(report) = self.acknowledgement() {
                            if tx.send(line(&report)).await.is_err() {
                                return Err(StreamError::Ended);
                            }
                            last_sent = Instant::now();
                        }
                    }
                }
                _ = reports.tick() => {
                    let targets: BTreeMap<String, TargetReport> = self
                        .store
                        .health()
                        .take_tallies()
                        .into_iter()
                        .map(|(identity, tally)| {
                            (identity, TargetReport {
                                successes: tally.successes,
                                failures: tally.failures,
                                retry_after_ms: tally.retry_after.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                                last_failure: tally.last_failure,
                            })
                        })
                        .collect();
                    if targets.is_empty() && last_sent.elapsed() < HEARTBEAT {
                        continue;
                    }
                    let report = Report { applied: self.applied.clone(), rejected: None, targets };
                    if tx.send(line(&report)).await.is_err() {
                        return Err(StreamError::Ended);
                    }
                    last_sent = Instant::now();
                }
            }
        }
    }

    /// The report owed after a message: the version applied, or a refusal.
    fn acknowledgement(&mut self) -> Option<Report> {
        let rejected = self.rejected.take();
        let pending = self.pending_ack;
        self.pending_ack = false;
        (pending || rejected.is_some()).then(|| Report {
            applied: self.applied.clone(),
            rejected,
            targets: BTreeMap::new(),
        })
    }

    /// Handles one message; `Some` when it ends the stream.
    fn take(&mut self, text: &[u8]) -> Option<Ended> {
        let message = match serde_json::from_slice::<ServerMessage>(text) {
            Ok(message) => message,
            Err(error) => {
                // A configuration this release cannot read is refused by its version; anything
                // else unreadable is skipped (a newer operator's message type).
                let value: serde_json::Value = serde_json::from_slice(text).unwrap_or_default();
                if value["type"] == "config" {
                    let version = value["version"].as_str().unwrap_or_default().to_string();
                    tracing::error!(%version, %error, "cannot read the configuration the operator sent; keeping the last good one");
                    self.rejected = Some(Rejected { version, reason: format!("unreadable: {error}") });
                }
                return None;
            }
        };
        match message {
            ServerMessage::Config(config) => self.apply(config),
            ServerMessage::Unchanged { version } => {
                tracing::debug!(%version, "the configuration is unchanged since the last connection");
                self.applied = Some(version);
                self.pending_ack = true;
            }
            ServerMessage::Fleet(fleet) => {
                apply_fleet(&self.store, &fleet);
                self.fleet = Some(fleet);
            }
            ServerMessage::Heartbeat => {}
            ServerMessage::Goodbye { reason } => return Some(Ended::Goodbye(reason)),
        }
        None
    }

    fn apply(&mut self, config: Config) {
        match self.store.publish_all(&config.policies, &config.version, &config.empty_note()) {
            Ok(_) => {
                tracing::info!(version = %config.version, policies = %names(&config), "applied the operator's configuration");
                self.applied = Some(config.version.clone());
                self.pending_ack = true;
                if let Some(fleet) = &self.fleet {
                    apply_fleet(&self.store, fleet);
                }
                if let Some(dir) = &self.settings.state_dir
                    && let Err(error) = state::save(dir, &config)
                {
                    tracing::warn!(%error, "cannot persist the configuration; a restart without the operator will have nothing to serve");
                }
            }
            Err(error) => {
                tracing::error!(version = %config.version, %error, "refused the operator's configuration; keeping the last good one");
                self.rejected = Some(Rejected { version: config.version, reason: error.to_string() });
            }
        }
    }
}

fn names(config: &Config) -> String {
    if config.policies.is_empty() {
        return config.empty_note();
    }
    config.policies.iter().map(|p| p.source.as_str()).collect::<Vec<_>>().join(", ")
}

/// Applies the fleet's decisions to the store's targets, in this pod's clock.
fn apply_fleet(store: &PolicyStore, fleet: &Fleet) {
    let now = Instant::now();
    store.health().apply_fleet(|identity| {
        fleet.targets.get(identity).map(|target| match target {
            FleetTarget::Open { retry_in_ms, reason } => FleetState::Open {
                since: now,
                until: now + Duration::from_millis(*retry_in_ms),
                reason: reason.clone(),
            },
            FleetTarget::HalfOpen { probe, reason } => {
                FleetState::HalfOpen { since: now, probe: *probe, reason: reason.clone() }
            }
        })
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{DEMO_POLICY, compiled};

    fn stream(dir: &std::path::Path) -> ControlStream {
        let settings = StreamSettings {
            url: "https://operator.example:7402".parse().expect("url"),
            ca: None,
            token_file: dir.join("token"),
            state_dir: Some(dir.join("state")),
        };
        ControlStream::new(settings, Arc::new(PolicyStore::new())).expect("stream")
    }

    fn message(message: &ServerMessage) -> Vec<u8> {
        serde_json::to_vec(message).expect("json")
    }

    #[tokio::test]
    async fn configurations_are_applied_persisted_acknowledged_or_refused_keeping_the_last_good() {
        let dir = tempfile::tempdir().expect("dir");
        let mut link = stream(dir.path());
        let good = Config::new("shop", "web-1", vec![compiled(DEMO_POLICY)]);
        assert!(link.take(&message(&ServerMessage::Config(good.clone()))).is_none());
        let ack = link.acknowledgement().expect("an acknowledgement is owed");
        assert_eq!((ack.applied.as_deref(), ack.rejected), (Some(good.version.as_str()), None));
        assert!(link.acknowledgement().is_none(), "once");
        assert_eq!(link.store.load().map(|s| s.digest.clone()), Some(good.version.clone()));
        assert_eq!(state::load(&dir.path().join("state")).expect("persisted"), Some(good.clone()));

        // A configuration this sidecar cannot serve: refused with the reason, the last good stays.
        let mut unusable = compiled(DEMO_POLICY);
        unusable.providers[1].base_url = "not a url".into();
        let bad = Config::new("shop", "web-1", vec![unusable]);
        link.take(&message(&ServerMessage::Config(bad.clone())));
        let refusal = link.acknowledgement().expect("a refusal is owed");
        assert_eq!(refusal.applied.as_deref(), Some(good.version.as_str()));
        let rejected = refusal.rejected.expect("rejected");
        assert_eq!(rejected.version, bad.version);
        assert!(rejected.reason.contains("not a url"), "{}", rejected.reason);
        assert_eq!(link.store.load().map(|s| s.digest.clone()), Some(good.version.clone()));

        // One from a newer release this one cannot read: refused by its version.
        link.take(br#"{"type":"config","version":"v9","namespace":"shop","pod":"web-1","policies":[{"future":true}]}"#);
        let refusal = link.acknowledgement().expect("owed");
        assert_eq!(refusal.rejected.map(|r| r.version), Some("v9".to_string()));
        // Other unknown messages are skipped; a goodbye ends the stream.
        assert!(link.take(br#"{"type":"somethingNew"}"#).is_none());
        assert!(link.acknowledgement().is_none());
        assert!(matches!(
            link.take(&message(&ServerMessage::Goodbye { reason: "bye".into() })),
            Some(Ended::Goodbye(_))
        ));

        // A restart finds it in the state directory.
        let mut restarted = stream(dir.path());
        assert_eq!(restarted.restore(), Some(good.version.clone()));
        assert_eq!(restarted.store.load().map(|s| s.digest.clone()), Some(good.version));
    }

    #[tokio::test]
    async fn fleet_decisions_reach_the_targets_and_survive_a_new_configuration() {
        let dir = tempfile::tempdir().expect("dir");
        let mut link = stream(dir.path());
        let policy = compiled(DEMO_POLICY);
        let identity = policy.targets()[0].identity.clone();
        let config = Config::new("shop", "web-1", vec![policy]);
        link.take(&message(&ServerMessage::Config(config.clone())));
        let fleet = Fleet {
            targets: BTreeMap::from([(identity, FleetTarget::Open { retry_in_ms: 60_000, reason: "3 pods".into() })]),
        };
        link.take(&message(&ServerMessage::Fleet(fleet)));
        let state = |link: &ControlStream| {
            let health = link.store.health().report(Instant::now());
            health["targets"]
                .as_array()
                .expect("targets")
                .iter()
                .find(|t| t["target"] == "primary/gpt-4o")
                .cloned()
                .expect("target")
        };
        assert_eq!(state(&link)["state"], "open");
        assert_eq!(state(&link)["openedBecause"], "fleet: 3 pods");
        // The same policies again under a new version: the decision still applies.
        let mut renamed = config.clone();
        renamed.version = "v2".into();
        link.take(&message(&ServerMessage::Config(renamed)));
        assert_eq!(state(&link)["state"], "open");
        link.take(&message(&ServerMessage::Fleet(Fleet::default())));
        assert_eq!(state(&link)["state"], "closed");
    }
}
