//! The sidecar's side of the config stream ([`crate::configstream`]): connect to the operator
//! with the pod's token, apply each configuration atomically (requests in flight keep the
//! snapshot they started with), acknowledge or refuse it, persist it, apply the fleet's
//! decisions, and report what the targets did. Reconnects with exponential backoff and full
//! jitter, resuming by version so that an unchanged configuration is not sent again.
//!
//! It asks for the newest protocol and falls back to the previous one when an operator of the
//! previous release refuses it (a rolling upgrade under way). A policy it cannot take, or one
//! the operator says to hold, keeps the copy the sidecar already has: it is never left with
//! less than it had because of what it was sent.
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
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::state;
use crate::backoff::{self, Backoff};
use crate::chain::CompiledPolicy;
use crate::configstream::{
    FEATURE_VERIFY, FEATURES_HEADER, Fleet, FleetTarget, HEARTBEAT, Lines, MAX_CONFIG_BYTES, MAX_REPORT_RESULTS,
    PROTOCOL_HEADER, Protocol, REPORT_EVERY, Rejected, Report, STREAM_IDLE, STREAM_PATH, ServerMessage, TargetReport,
    VERSION_HEADER, WindowSpend, bounded_reason, line, v1, v2,
};
use crate::health::gate::FleetState;
use crate::net::body::{Body, BoxError};
use crate::net::client::load_ca_file;
use crate::snapshot::{LinkStatus, PolicyStore};

/// The default path of the pod's projected token.
pub const DEFAULT_TOKEN_FILE: &str = "/var/run/secrets/backstop/token";
/// How long connecting (TCP, TLS, HTTP/2 and the stream's headers) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The first and the longest wait between reconnection attempts.
const RECONNECT: Backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));

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
    /// How long a sidecar with nothing to serve waits for the operator before it is ready
    /// anyway, passing calls through.
    pub startup_timeout: Duration,
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
    Ca(#[from] crate::net::client::CaFileError),
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
    /// The operator does not speak the protocol version asked for (an older release).
    #[error("the operator does not speak protocol {asked}: {message}")]
    Protocol {
        /// The version asked for.
        asked: &'static str,
        /// The operator's explanation.
        message: String,
    },
    /// The stream ended without a goodbye.
    #[error("the stream ended")]
    Ended,
}

impl StreamError {
    /// Whether the operator's certificate did not verify against the CA this pod trusts.
    pub fn is_untrusted(&self) -> bool {
        let StreamError::Connect(error) = self else { return false };
        error.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()).is_some_and(|tls| {
            matches!(tls, rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented)
        })
    }
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
    /// The protocol version the next connection asks for.
    protocol: Protocol,
    /// The configuration version served, from the operator or the state directory.
    applied: Option<String>,
    /// The policies served, by source: what a held or refused policy keeps.
    current: BTreeMap<String, CompiledPolicy>,
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
            protocol: Protocol::NEWEST,
            applied: None,
            current: BTreeMap::new(),
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
                self.current = config.policies.iter().map(|p| (p.source.clone(), p.clone())).collect();
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
        self.store.settle_after(self.settings.startup_timeout);
        let mut failures: u32 = 0;
        loop {
            let started = Instant::now();
            let outcome = self.session(&mut shutdown).await;
            let asked = std::mem::replace(&mut self.protocol, Protocol::NEWEST);
            match outcome {
                Ok(Ended::Shutdown) => return,
                Ok(Ended::Goodbye(reason)) => {
                    tracing::info!(%reason, "the operator ended the stream; reconnecting");
                    failures = 0;
                    continue;
                }
                Err(StreamError::Protocol { message, .. }) if asked.previous().is_some() => {
                    let previous = asked.previous().unwrap_or(asked);
                    tracing::info!(asked = asked.as_str(), using = previous.as_str(), %message,
                        "the operator is of an earlier release; speaking its protocol");
                    self.protocol = previous;
                    continue;
                }
                Err(error) => {
                    // What the fleet said is void with the stream that said it: a configuration
                    // applied before the next stream's fleet message must not bring it back.
                    self.fleet = None;
                    self.store.health().apply_fleet(|_| None);
                    self.store.health().verify().set_orders(&BTreeMap::new());
                    if started.elapsed() > Duration::from_secs(10) {
                        failures = 0;
                    }
                    self.note_error(&error);
                }
            }
            let wait = backoff::spread(RECONNECT.after(failures), rand::random());
            failures = failures.saturating_add(1);
            tokio::select! {
                _ = shutdown.changed() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    fn note_error(&mut self, error: &StreamError) {
        let text = error.to_string();
        let url = &self.settings.url;
        let untrusted = error.is_untrusted();
        let changed = self.last_error.as_deref() != Some(text.as_str());
        if changed {
            self.store.set_link(LinkStatus {
                url: url.to_string(),
                connected: false,
                last_error: Some(text.clone()),
                untrusted,
                since_unix_ms: crate::chain::unix_ms_now(),
            });
        }
        if changed && untrusted {
            // Loud: a replaced serving CA leaves every running pod unable to hear the operator
            // until it is restarted with the new CA.
            tracing::error!(operator = %url, error = %text,
                "cannot verify the operator's certificate with the CA this pod was given; keeping the last configuration (restart the pod to take the current CA)");
        } else if changed {
            match self.store.load() {
                Some(snapshot) => tracing::warn!(operator = %url, error = %text,
                    serving = %snapshot.digest, "lost the operator; serving the last configuration applied"),
                None => tracing::warn!(operator = %url, error = %text,
                    "cannot reach the operator; passing calls through until it is reached"),
            }
        } else {
            tracing::debug!(operator = %url, error = %text, "still cannot reach the operator");
        }
        self.last_error = Some(text.clone());
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
            .header(PROTOCOL_HEADER, self.protocol.as_str())
            .header(VERSION_HEADER, self.applied.clone().unwrap_or_default())
            .header(FEATURES_HEADER, FEATURE_VERIFY)
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
            let message = bounded_reason(String::from_utf8_lossy(&text).trim());
            if status == StatusCode::BAD_REQUEST && message.contains("speaks protocol") {
                return Err(StreamError::Protocol { asked: self.protocol.as_str(), message });
            }
            return Err(StreamError::Refused { status, message });
        }
        if self.last_error.take().is_some() {
            tracing::info!(operator = %self.settings.url, "reconnected to the operator");
        } else {
            tracing::info!(operator = %self.settings.url, "connected to the operator");
        }
        self.store.set_link(LinkStatus {
            url: self.settings.url.to_string(),
            connected: true,
            last_error: None,
            untrusted: false,
            since_unix_ms: crate::chain::unix_ms_now(),
        });
        let mut lines = Lines::new(MAX_CONFIG_BYTES);
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
                                trailing_failures: tally.trailing_failures,
                            })
                        })
                        .collect();
                    let spend: BTreeMap<String, WindowSpend> = self
                        .store
                        .health()
                        .spend_reports(crate::health::spend::unix_ms())
                        .into_iter()
                        .map(|(key, (window, usd))| (key, WindowSpend { window, usd }))
                        .collect();
                    let verified = self.store.health().verify().take_results(MAX_REPORT_RESULTS);
                    if targets.is_empty() && spend.is_empty() && verified.is_empty() && last_sent.elapsed() < HEARTBEAT {
                        continue;
                    }
                    let report = Report { applied: self.applied.clone(), rejected: None, targets, spend, verified };
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
            spend: BTreeMap::new(),
            verified: BTreeMap::new(),
        })
    }

    /// Handles one message; `Some` when it ends the stream.
    fn take(&mut self, text: &[u8]) -> Option<Ended> {
        let message = match self.protocol {
            Protocol::V2 => serde_json::from_slice::<ServerMessage<v2::Config>>(text).map(|m| match m {
                ServerMessage::Config(config) => Taken::V2(config),
                other => Taken::Other(other),
            }),
            Protocol::V1 => serde_json::from_slice::<ServerMessage<v1::Config>>(text).map(|m| match m {
                ServerMessage::Config(config) => Taken::V1(config),
                ServerMessage::Unchanged { version } => Taken::Other(ServerMessage::Unchanged { version }),
                ServerMessage::Fleet(fleet) => Taken::Other(ServerMessage::Fleet(fleet)),
                ServerMessage::Heartbeat => Taken::Other(ServerMessage::Heartbeat),
                ServerMessage::Goodbye { reason } => Taken::Other(ServerMessage::Goodbye { reason }),
            }),
        };
        let message = match message {
            Ok(message) => message,
            Err(error) => {
                // A configuration this release cannot read is refused by its version, keeping
                // everything; anything else unreadable is skipped (a newer operator's message).
                let value: serde_json::Value = serde_json::from_slice(text).unwrap_or_default();
                if value["type"] == "config" {
                    let version = value["version"].as_str().unwrap_or_default().to_string();
                    tracing::error!(%version, %error, "cannot read the configuration the operator sent; keeping the last good one");
                    self.rejected = Some(Rejected {
                        version,
                        reason: bounded_reason(&format!("unreadable: {error}")),
                        policies: Vec::new(),
                    });
                }
                return None;
            }
        };
        match message {
            Taken::V2(config) => self.apply_v2(&config),
            Taken::V1(config) => {
                let note = config.empty_note();
                self.apply_with_note(config, &note, None);
            }
            Taken::Other(ServerMessage::Config(config)) => self.apply_v2(&config),
            Taken::Other(ServerMessage::Unchanged { version }) => {
                tracing::debug!(%version, "the configuration is unchanged since the last connection");
                self.applied = Some(version);
                self.pending_ack = true;
            }
            Taken::Other(ServerMessage::Fleet(fleet)) => {
                apply_fleet(&self.store, &fleet);
                self.fleet = Some(fleet);
            }
            Taken::Other(ServerMessage::Heartbeat) => {}
            Taken::Other(ServerMessage::Goodbye { reason }) => return Some(Ended::Goodbye(reason)),
        }
        None
    }

    /// A protocol-2 configuration: each policy compiled here; a held policy, or one that does
    /// not compile here, keeps the copy this sidecar has.
    fn apply_v2(&mut self, config: &v2::Config) {
        let mut policies = Vec::new();
        let mut refused = Vec::new();
        let mut reasons = Vec::new();
        let keep = |name: &str, policies: &mut Vec<CompiledPolicy>| {
            if let Some(mine) = self.current.get(&config.source(name)) {
                policies.push(mine.clone());
            }
        };
        for policy in &config.policies {
            match policy.compile(&config.namespace) {
                Ok(compiled) => policies.push(compiled),
                Err(error) => {
                    tracing::error!(policy = %config.source(&policy.name), %error, "cannot take a policy the operator sent; keeping this sidecar's copy");
                    refused.push(policy.name.clone());
                    reasons.push(error.to_string());
                    keep(&policy.name, &mut policies);
                }
            }
        }
        for name in &config.held {
            tracing::debug!(policy = %config.source(name), "the operator holds a policy: keeping this sidecar's copy");
            keep(name, &mut policies);
        }
        policies.sort_by(|a, b| a.source.cmp(&b.source));
        let resolved = v1::Config {
            version: config.version.clone(),
            namespace: config.namespace.clone(),
            pod: config.pod.clone(),
            policies,
        };
        let refusal = (!refused.is_empty()).then(|| Rejected {
            version: config.version.clone(),
            reason: bounded_reason(&reasons.join("; ")),
            policies: refused,
        });
        let note = config.empty_note();
        self.apply_with_note(resolved, &note, refusal);
    }

    /// Serves `config` (its policies compiled), or refuses it whole keeping the last good one;
    /// `refusal` reports the policies of it that were not taken.
    fn apply_with_note(&mut self, config: v1::Config, note: &str, refusal: Option<Rejected>) {
        match self.store.publish_all(&config.policies, &config.version, note) {
            Ok(_) => {
                tracing::info!(version = %config.version, policies = %names(&config), "applied the operator's configuration");
                self.applied = Some(config.version.clone());
                self.current = config.policies.iter().map(|p| (p.source.clone(), p.clone())).collect();
                self.pending_ack = true;
                self.rejected = refusal;
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
                self.rejected = Some(Rejected {
                    version: config.version,
                    reason: bounded_reason(&error.to_string()),
                    policies: Vec::new(),
                });
            }
        }
    }
}

/// A message as read, whatever the protocol.
enum Taken {
    V1(v1::Config),
    V2(v2::Config),
    Other(ServerMessage<v2::Config>),
}

fn names(config: &v1::Config) -> String {
    if config.policies.is_empty() {
        return config.empty_note();
    }
    config.policies.iter().map(|p| p.source.as_str()).collect::<Vec<_>>().join(", ")
}

/// Applies the fleet's decisions to the store's targets, in this pod's clock.
fn apply_fleet(store: &PolicyStore, fleet: &Fleet) {
    store.health().verify().set_orders(&fleet.verify);
    store
        .health()
        .apply_fleet_spend(crate::health::spend::unix_ms(), |key| fleet.spent.get(key).map(|s| (s.window, s.usd)));
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
    use crate::configstream::v1::Config;
    use crate::health::OutBecause;
    use crate::policy::TargetState;
    use crate::testing::{CLUSTER_POLICY, DEMO_POLICY, compiled, served};

    fn stream(dir: &std::path::Path) -> ControlStream {
        let settings = StreamSettings {
            url: "https://operator.example:7402".parse().expect("url"),
            ca: None,
            token_file: dir.join("token"),
            state_dir: Some(dir.join("state")),
            startup_timeout: Duration::from_secs(10),
        };
        ControlStream::new(settings, Arc::new(PolicyStore::new())).expect("stream")
    }

    /// A link that speaks protocol 1, as to an operator of the previous release.
    fn stream_v1(dir: &std::path::Path) -> ControlStream {
        let mut link = stream(dir);
        link.protocol = Protocol::V1;
        link
    }

    fn message<C: serde::Serialize>(message: &ServerMessage<C>) -> Vec<u8> {
        serde_json::to_vec(message).expect("json")
    }

    #[tokio::test]
    async fn configurations_are_applied_persisted_acknowledged_or_refused_keeping_the_last_good() {
        let dir = tempfile::tempdir().expect("dir");
        let mut link = stream_v1(dir.path());
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
            link.take(&message(&ServerMessage::<Config>::Goodbye { reason: "bye".into() })),
            Some(Ended::Goodbye(_))
        ));

        // A restart finds it in the state directory.
        let mut restarted = stream_v1(dir.path());
        assert_eq!(restarted.restore(), Some(good.version.clone()));
        assert_eq!(restarted.store.load().map(|s| s.digest.clone()), Some(good.version));
    }

    #[tokio::test]
    async fn fleet_decisions_reach_the_targets_and_survive_a_new_configuration() {
        let dir = tempfile::tempdir().expect("dir");
        let mut link = stream_v1(dir.path());
        let policy = compiled(DEMO_POLICY);
        let identity = policy.targets()[0].identity.clone();
        let config = Config::new("shop", "web-1", vec![policy]);
        link.take(&message(&ServerMessage::Config(config.clone())));
        let fleet = Fleet {
            verify: BTreeMap::new(),
            targets: BTreeMap::from([(identity, FleetTarget::Open { retry_in_ms: 60_000, reason: "3 pods".into() })]),
            spent: BTreeMap::new(),
        };
        link.take(&message(&ServerMessage::<Config>::Fleet(fleet)));
        let state = |link: &ControlStream| {
            let (targets, _) = link.store.health().view(Instant::now());
            targets.into_iter().find(|t| t.target == "primary/gpt-4o").expect("target")
        };
        assert_eq!(state(&link).state, TargetState::Open);
        assert_eq!(state(&link).out_because, Some(OutBecause::Fleet { reason: "3 pods".into(), probe: None }));
        // The same policies again under a new version: the decision still applies.
        let mut renamed = config.clone();
        renamed.version = "v2".into();
        link.take(&message(&ServerMessage::Config(renamed)));
        assert_eq!(state(&link).state, TargetState::Open);
        link.take(&message(&ServerMessage::<Config>::Fleet(Fleet::default())));
        assert_eq!(state(&link).state, TargetState::Closed);
    }

    fn v2_config(policies: Vec<v2::Policy>, held: &[&str]) -> v2::Config {
        let held: Vec<String> = held.iter().map(|h| h.to_string()).collect();
        let versions: Vec<(String, String)> =
            policies.iter().map(|p| (p.name.clone(), v2::short_digest(p.spec.to_string().as_bytes()))).collect();
        v2::Config {
            version: v2::Config::version_of(versions.iter().map(|(n, v)| (n.as_str(), v.as_str())), &held),
            namespace: "shop".into(),
            pod: "web-1".into(),
            policies,
            held,
            note: None,
        }
    }

    #[tokio::test]
    async fn a_held_policy_and_one_this_sidecar_cannot_take_keep_its_own_copy() {
        let dir = tempfile::tempdir().expect("dir");
        let mut link = stream(dir.path());
        let chat = served("chat", CLUSTER_POLICY).wire;
        let other = served("other", &CLUSTER_POLICY.replace("name: chat", "name: other")).wire;
        let both = v2_config(vec![chat.clone(), other.clone()], &[]);
        link.take(&message(&ServerMessage::Config(both.clone())));
        let ack = link.acknowledgement().expect("owed");
        assert_eq!((ack.applied.as_deref(), ack.rejected), (Some(both.version.as_str()), None));
        let sources = |link: &ControlStream| link.current.keys().cloned().collect::<Vec<_>>();
        assert_eq!(sources(&link), ["shop/chat", "shop/other"]);

        // The operator restarted and cannot serve `other` now (its Secret is gone): held.
        let held = v2_config(vec![chat.clone()], &["other"]);
        link.take(&message(&ServerMessage::Config(held.clone())));
        assert_eq!(link.acknowledgement().and_then(|a| a.applied), Some(held.version.clone()));
        assert_eq!(sources(&link), ["shop/chat", "shop/other"], "nothing dropped");
        let snapshot = link.store.load().expect("served");
        assert!(snapshot.source.contains("shop/other"), "{}", snapshot.source);

        // A newer operator sends a spec this release cannot read: that policy keeps its copy,
        // the rest applies, and the refusal names it.
        let mut newer = chat.clone();
        newer.spec["fieldOfANewerRelease"] = serde_json::json!(1);
        let partly = v2_config(vec![newer, other.clone()], &[]);
        link.take(&message(&ServerMessage::Config(partly.clone())));
        let ack = link.acknowledgement().expect("owed");
        assert_eq!(ack.applied.as_deref(), Some(partly.version.as_str()));
        let refusal = ack.rejected.expect("a refusal");
        assert_eq!(refusal.policies, ["chat"]);
        assert!(refusal.reason.contains("not one this sidecar can read"), "{}", refusal.reason);
        assert_eq!(sources(&link), ["shop/chat", "shop/other"]);

        // A restart serves what was applied, held copies included.
        let mut restarted = stream(dir.path());
        assert_eq!(restarted.restore(), Some(partly.version));
        assert_eq!(sources(&restarted), ["shop/chat", "shop/other"]);

        // No policy selects the pod any more: an empty configuration, passed through.
        let none = v2_config(vec![], &[]);
        link.take(&message(&ServerMessage::Config(none)));
        assert!(link.store.passthrough_reason().is_some_and(|why| why.contains("selects pod `web-1`")));
    }
}
