//! Several operator replicas, one fleet view.
//!
//! Any replica serves sidecars (the Service spreads them), but a fleet decision needs every
//! pod's evidence in one place, and status needs one writer. Both go to the replica that holds
//! the leader Lease:
//!
//! - The leader writes its config-service address into the Lease
//!   ([`crate::operator::leader::ENDPOINT_ANNOTATION`]). Every other replica opens one HTTP/2
//!   stream to it, `POST /v1/peer`, on the same TLS listener sidecars use.
//! - Up that stream go [`Forwarded`] messages: the pods connected to the replica (and the
//!   targets they may probe), their reports as they arrive, and every second the replica's
//!   sidecars and the versions they serve, for `status.sidecars`. Down it come the leader's
//!   decisions ([`FromLeader::Decisions`]) for every namespace, whole, whenever one changes;
//!   the replica sends them on to its own sidecars.
//! - The leader alone writes status and Events, from a view that holds every replica's pods.
//!
//! Trust both ways without new secrets: the replica presents its own projected token
//! (audience `backstop`, `--peer-token-file`), which the leader accepts only when a TokenReview
//! names the very ServiceAccount its own token belongs to; and the replica accepts the leader's
//! TLS certificate only when it is the certificate it serves itself (every replica mounts the
//! same Secret), so no host name needs to match a pod IP.
//!
//! A replica that cannot reach the leader (none elected yet, a network partition, a rotation
//! under way) stops following and decides from its own sidecars' evidence, then follows again
//! once the link is back: pods are never left without a fleet view, only with a smaller one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::sidecars::{Sidecar, Sidecars};
use super::tls::ReloadingCert;
use crate::backoff::{self, Backoff};
use crate::configstream::{HEARTBEAT, Lines, STREAM_IDLE, line};
use crate::net::body::{Body, BoxError};
use crate::operator::fleet::verify::Verification;
use crate::operator::fleet::{Decision, DecisionPhase, Decisions, FleetView, Forwarded, SpentWindow};
use crate::operator::leader::Holder;

/// The peer stream's path.
pub const PEER_PATH: &str = "/v1/peer";
/// The header naming the replica that opened a peer stream.
pub const REPLICA_HEADER: &str = "x-backstop-replica";
/// How often a replica sends its sidecars to the leader.
const SIDECARS_EVERY: Duration = Duration::from_secs(1);
/// Evidence a replica may queue for the leader before it drops some.
const FORWARD_QUEUE: usize = 8192;

/// A message up the peer stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum ToLeader {
    /// Pods and their evidence.
    Evidence {
        /// What happened.
        evidence: Forwarded,
    },
    /// One page of the replica's sidecars now: no message grows with the fleet.
    Sidecars {
        /// This page's sidecars.
        sidecars: Vec<Sidecar>,
        /// Which page of the round, from 0.
        #[serde(default)]
        page: u32,
        /// How many pages the round has.
        #[serde(default = "one")]
        pages: u32,
    },
}

fn one() -> u32 {
    1
}

/// Sidecars per [`ToLeader::Sidecars`] page.
const SIDECARS_PER_PAGE: usize = 200;
/// The largest message either replica reads from the other.
const MAX_PEER_BYTES: usize = 1 << 20;
/// Waits between failed attempts to reach the leader.
const FORWARD_RETRY: Backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));

/// The pages of one round of a replica's sidecars.
fn sidecar_pages(sidecars: Vec<Sidecar>) -> Vec<ToLeader> {
    let chunks: Vec<Vec<Sidecar>> = sidecars.chunks(SIDECARS_PER_PAGE).map(<[Sidecar]>::to_vec).collect();
    let pages = u32::try_from(chunks.len().max(1)).unwrap_or(u32::MAX);
    if chunks.is_empty() {
        return vec![ToLeader::Sidecars { sidecars: Vec::new(), page: 0, pages }];
    }
    chunks
        .into_iter()
        .enumerate()
        .map(|(page, sidecars)| ToLeader::Sidecars { sidecars, page: u32::try_from(page).unwrap_or(u32::MAX), pages })
        .collect()
}

/// Gathers a replica's pages until a round is whole.
#[derive(Default)]
struct Round {
    sidecars: Vec<Sidecar>,
    next: u32,
}

impl Round {
    /// Takes a page; the whole round once its last page came in order.
    fn take(&mut self, sidecars: Vec<Sidecar>, page: u32, pages: u32) -> Option<Vec<Sidecar>> {
        if page == 0 {
            self.sidecars.clear();
            self.next = 0;
        }
        if page != self.next {
            // A page out of order: wait for the next round to start.
            self.next = u32::MAX;
            return None;
        }
        self.sidecars.extend(sidecars);
        self.next += 1;
        (self.next == pages).then(|| std::mem::take(&mut self.sidecars))
    }
}

/// A decision as it travels between replicas.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireDecision {
    /// The target's label.
    pub label: String,
    /// Why it is out.
    pub reason: String,
    /// Since when.
    pub since: Time,
    /// When an open period ends, by the wall clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<Time>,
    /// Open for this much longer, in ms from the message; `None`: half-open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_for_ms: Option<u64>,
    /// The probers' pod uids while half-open.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub probers: Vec<String>,
}

impl WireDecision {
    fn from_decision(decision: &Decision, now: Instant) -> WireDecision {
        let (open_for_ms, probers) = match &decision.phase {
            DecisionPhase::Open { until } => {
                (Some(u64::try_from(until.saturating_duration_since(now).as_millis()).unwrap_or(u64::MAX)), Vec::new())
            }
            DecisionPhase::HalfOpen { probers } => (None, probers.clone()),
        };
        WireDecision {
            label: decision.label.clone(),
            reason: decision.reason.clone(),
            since: Time(decision.since),
            until: decision.until.map(Time),
            open_for_ms,
            probers,
        }
    }

    fn into_decision(self, now: Instant) -> Decision {
        let phase = match self.open_for_ms {
            Some(ms) => DecisionPhase::Open { until: now + Duration::from_millis(ms) },
            None => DecisionPhase::HalfOpen { probers: self.probers },
        };
        Decision { phase, reason: self.reason, since: self.since.0, until: self.until.map(|t| t.0), label: self.label }
    }
}

/// A spent spend window as it travels between replicas.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireSpent {
    /// The window.
    pub window: i64,
    /// What the fleet had spent when it reached the limit.
    pub usd: f64,
    /// The limit.
    pub limit: f64,
    /// When the window ends, in Unix ms.
    pub until_ms: i64,
}

impl From<&SpentWindow> for WireSpent {
    fn from(spent: &SpentWindow) -> WireSpent {
        WireSpent { window: spent.window, usd: spent.usd, limit: spent.limit, until_ms: spent.until_ms }
    }
}

impl From<WireSpent> for SpentWindow {
    fn from(spent: WireSpent) -> SpentWindow {
        SpentWindow { window: spent.window, usd: spent.usd, limit: spent.limit, until_ms: spent.until_ms }
    }
}

/// A message down the peer stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum FromLeader {
    /// One namespace's decisions, whole.
    Decisions {
        /// The namespace.
        namespace: String,
        /// Its targets out of rotation.
        targets: BTreeMap<String, WireDecision>,
        /// Its spent spend windows, by spend key.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        spent: BTreeMap<String, WireSpent>,
        /// Its verified targets' orders and last results, by identity.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        verify: BTreeMap<String, Verification>,
    },
    /// The stream is alive.
    Heartbeat,
}

/// What the leader's side of a peer stream reads and feeds: this replica's fleet view and
/// sidecars, and when to stop (shutdown, or the lead lost).
#[derive(Clone)]
pub struct Leading {
    /// The fleet view the replicas' evidence feeds and decisions come from.
    pub fleet: Arc<FleetView>,
    /// The sidecars, the replicas' own listed beside this replica's.
    pub sidecars: Arc<Sidecars>,
    /// Turns true at shutdown.
    pub shutdown: watch::Receiver<bool>,
    /// Whether this replica leads.
    pub leader: watch::Receiver<bool>,
}

/// The leader's side: one authenticated replica's stream, answered with the fleet's decisions
/// as they change while the replica's evidence is read.
pub fn serve(leading: Leading, replica: String, body: Incoming) -> Response<Body> {
    tracing::info!(%replica, "a replica forwards its sidecars' evidence here");
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(8);
    tokio::spawn(lead(leading, replica, body, tx));
    let frames = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|frame| (frame, rx)) });
    Response::new(Body::new(StreamBody::new(frames)))
}

async fn lead(leading: Leading, replica: String, mut body: Incoming, tx: mpsc::Sender<Result<Frame<Bytes>, BoxError>>) {
    let Leading { fleet, sidecars, mut shutdown, mut leader } = leading;
    let mut changes = fleet.changes();
    let mut sent: HashMap<String, u64> = HashMap::new();
    let mut joined: HashSet<(String, String)> = HashSet::new();
    let mut lines = Lines::new(MAX_PEER_BYTES);
    let mut round = Round::default();
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    let mut heard = Instant::now();
    let send = |message: &FromLeader| {
        let tx = tx.clone();
        let bytes = line(message);
        async move { tx.send(Ok(Frame::data(bytes))).await.is_ok() }
    };
    let mut dirty = true;
    'stream: loop {
        // Every namespace whose decisions changed since they were last sent.
        let now = Instant::now();
        let changed = if std::mem::take(&mut dirty) { fleet.all_decisions() } else { Vec::new() };
        for (namespace, decisions) in changed {
            if sent.get(&namespace) == Some(&decisions.revision) {
                continue;
            }
            sent.insert(namespace.clone(), decisions.revision);
            let targets =
                decisions.targets.iter().map(|(id, d)| (id.clone(), WireDecision::from_decision(d, now))).collect();
            let spent = decisions.spent.iter().map(|(key, s)| (key.clone(), WireSpent::from(s))).collect();
            let verify = decisions.verify.clone();
            if !send(&FromLeader::Decisions { namespace, targets, spent, verify }).await {
                break 'stream;
            }
        }
        tokio::select! {
            _ = shutdown.changed() => break,
            // An `Err` (the election ended) disables the branch rather than spinning on it.
            Ok(()) = leader.changed() => if !*leader.borrow() { break },
            Ok(()) = changes.changed() => dirty = true,
            _ = heartbeat.tick() => {
                if heard.elapsed() > STREAM_IDLE || !send(&FromLeader::Heartbeat).await {
                    break;
                }
            }
            frame = body.frame() => match frame {
                Some(Ok(frame)) => {
                    let Some(data) = frame.data_ref() else { continue };
                    heard = Instant::now();
                    let Ok(complete) = lines.push(data) else { break };
                    for text in complete {
                        match serde_json::from_slice::<ToLeader>(&text) {
                            Ok(ToLeader::Evidence { evidence }) => {
                                match &evidence {
                                    Forwarded::Join { namespace, pod, .. } => { joined.insert((namespace.clone(), pod.clone())); }
                                    Forwarded::Leave { namespace, pod } => { joined.remove(&(namespace.clone(), pod.clone())); }
                                    Forwarded::Observe { .. } => {}
                                }
                                fleet.take_forwarded(evidence, Instant::now());
                            }
                            Ok(ToLeader::Sidecars { sidecars: listed, page, pages }) => {
                                if let Some(all) = round.take(listed, page, pages) {
                                    sidecars.set_remote(&replica, all);
                                }
                            }
                            Err(error) => tracing::debug!(%replica, %error, "unreadable peer message"),
                        }
                    }
                }
                Some(Err(_)) | None => break,
            },
        }
    }
    for (namespace, pod) in joined {
        fleet.take_forwarded(Forwarded::Leave { namespace, pod }, Instant::now());
    }
    sidecars.clear_remote(&replica);
    tracing::info!(%replica, "a replica's peer stream ended");
}

/// The other replicas' side: what they need to follow the leader.
pub struct Follower {
    /// This replica's fleet view.
    pub fleet: Arc<FleetView>,
    /// This replica's sidecars.
    pub sidecars: Arc<Sidecars>,
    /// Who holds the Lease.
    pub holder: watch::Receiver<Option<Holder>>,
    /// This replica's identity.
    pub identity: String,
    /// This replica's own projected token.
    pub token_file: PathBuf,
    /// The certificate this replica serves, which the leader's must be.
    pub cert: Arc<ReloadingCert>,
}

/// Why a peer link failed.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("cannot read the token file {0}: {1}")]
    Token(PathBuf, std::io::Error),
    #[error("`{0}` is not HOST:PORT")]
    Endpoint(String),
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("HTTP/2: {0}")]
    Http(#[from] hyper::Error),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("the leader refused ({0}): {1}")]
    Refused(StatusCode, String),
    #[error("the leader went quiet")]
    Idle,
    #[error("the stream ended")]
    Ended,
}

impl Follower {
    /// Follows whichever replica leads until `shutdown`.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut failures = 0u32;
        let mut last_error: Option<String> = None;
        loop {
            let holder = self.holder.borrow_and_update().clone();
            let endpoint = holder.filter(|h| h.identity != self.identity).and_then(|h| h.endpoint);
            let Some(endpoint) = endpoint else {
                self.fleet.unfollow();
                // `Err` (the election ended) disables the branch: wait for shutdown alone.
                tokio::select! {
                    _ = shutdown.changed() => return,
                    Ok(()) = self.holder.changed() => continue,
                }
            };
            let mut holder = self.holder.clone();
            let outcome = tokio::select! {
                _ = shutdown.changed() => return,
                Ok(()) = holder.changed() => Ok(()),
                outcome = self.link(&endpoint) => outcome,
            };
            self.fleet.unfollow();
            match outcome {
                Ok(()) => failures = 0,
                Err(error) => {
                    let text = error.to_string();
                    if last_error.as_deref() != Some(text.as_str()) {
                        tracing::warn!(leader = %endpoint, error = %text, "cannot forward to the leader; deciding from this replica's own sidecars meanwhile");
                        last_error = Some(text);
                    }
                    failures = failures.saturating_add(1);
                    let wait = backoff::spread(FORWARD_RETRY.after(failures), rand::random());
                    tokio::select! {
                        _ = shutdown.changed() => return,
                        Ok(()) = self.holder.changed() => {}
                        () = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    async fn link(&self, endpoint: &str) -> Result<(), LinkError> {
        let token =
            std::fs::read_to_string(&self.token_file).map_err(|e| LinkError::Token(self.token_file.clone(), e))?;
        let (host, port) = endpoint
            .rsplit_once(':')
            .and_then(|(host, port)| {
                Some((host.trim_matches(|c| c == '[' || c == ']').to_string(), port.parse::<u16>().ok()?))
            })
            .ok_or_else(|| LinkError::Endpoint(endpoint.to_string()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SameCertificate { cert: self.cert.clone(), provider }))
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect((host.as_str(), port)))
            .await
            .map_err(|_| LinkError::Connect(std::io::ErrorKind::TimedOut.into()))?
            .map_err(LinkError::Connect)?;
        let name = ServerName::try_from("backstop-operator-peer").map_err(|_| LinkError::Endpoint(endpoint.into()))?;
        let stream =
            tokio_rustls::TlsConnector::from(Arc::new(tls)).connect(name, tcp).await.map_err(LinkError::Connect)?;
        let (mut sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(20))
            .handshake(TokioIo::new(stream))
            .await?;
        tokio::spawn(connection);
        let (evidence_tx, mut evidence_rx) = mpsc::channel::<Forwarded>(FORWARD_QUEUE);
        let (up_tx, up_rx) = mpsc::channel::<Bytes>(64);
        let frames = futures_util::stream::unfold(up_rx, |mut rx| async move {
            rx.recv().await.map(|bytes| (Ok::<_, BoxError>(Frame::data(bytes)), rx))
        });
        let request = Request::post(format!("https://{endpoint}{PEER_PATH}"))
            .header(http::header::AUTHORIZATION, format!("Bearer {}", token.trim()))
            .header(REPLICA_HEADER, &self.identity)
            .body(Body::new(StreamBody::new(frames)))
            .map_err(|_| LinkError::Endpoint(endpoint.to_string()))?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let mut body = response.into_body();
        if !status.is_success() {
            let text =
                http_body_util::Limited::new(body, 4096).collect().await.map(|c| c.to_bytes()).unwrap_or_default();
            return Err(LinkError::Refused(status, String::from_utf8_lossy(&text).trim().to_string()));
        }
        tracing::info!(leader = %endpoint, "forwarding this replica's sidecars' evidence to the leader");
        self.fleet.follow(evidence_tx);
        let mut lines = Lines::new(crate::configstream::MAX_CONFIG_BYTES);
        let mut sidecars = tokio::time::interval(SIDECARS_EVERY);
        let mut heard = Instant::now();
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(heard + STREAM_IDLE) => return Err(LinkError::Idle),
                Some(evidence) = evidence_rx.recv() => {
                    if up_tx.send(line(&ToLeader::Evidence { evidence })).await.is_err() {
                        return Err(LinkError::Ended);
                    }
                }
                _ = sidecars.tick() => {
                    for page in sidecar_pages(self.sidecars.local()) {
                        if up_tx.send(line(&page)).await.is_err() {
                            return Err(LinkError::Ended);
                        }
                    }
                }
                frame = body.frame() => {
                    let data = match frame {
                        Some(Ok(frame)) => match frame.into_data() { Ok(data) => data, Err(_) => continue },
                        Some(Err(error)) => return Err(LinkError::Http(error)),
                        None => return Err(LinkError::Ended),
                    };
                    heard = Instant::now();
                    for text in lines.push(&data).map_err(|_| LinkError::Ended)? {
                        if let Ok(FromLeader::Decisions { namespace, targets, spent, verify }) = serde_json::from_slice::<FromLeader>(&text) {
                            let now = Instant::now();
                            let targets = targets.into_iter().map(|(id, d)| (id, d.into_decision(now))).collect();
                            let spent = spent.into_iter().map(|(key, s)| (key, SpentWindow::from(s))).collect();
                            self.fleet.adopt(&namespace, Decisions { revision: 0, targets, spent, verify });
                        }
                    }
                }
            }
        }
    }
}

/// Trusts exactly the certificate this replica serves.
#[derive(Debug)]
struct SameCertificate {
    cert: Arc<ReloadingCert>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for SameCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.cert.leaf() {
            Some(own) if own.as_ref() == end_entity.as_ref() => Ok(ServerCertVerified::assertion()),
            _ => Err(rustls::Error::General("the leader does not serve this replica's certificate".into())),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replicas_sidecars_go_in_pages_no_message_grows_with_the_fleet() {
        let fleet: Vec<Sidecar> = (0..450).map(|i| Sidecar { uid: format!("uid-{i}"), ..Sidecar::default() }).collect();
        let pages = sidecar_pages(fleet.clone());
        assert_eq!(pages.len(), 3);
        assert!(pages.iter().all(|p| line(p).len() < 64 << 10), "each page is small");
        let mut round = Round::default();
        let mut whole = None;
        for page in pages {
            let ToLeader::Sidecars { sidecars, page, pages } = page else { panic!("a page") };
            whole = round.take(sidecars, page, pages);
        }
        assert_eq!(whole.map(|all| all.len()), Some(450));
        // An empty replica still sends its (empty) round; an out-of-order page is dropped.
        assert_eq!(sidecar_pages(Vec::new()).len(), 1);
        assert_eq!(round.take(fleet[..2].to_vec(), 1, 3), None);
        assert_eq!(round.take(fleet[..2].to_vec(), 2, 3), None, "waits for the next round");
        assert_eq!(round.take(fleet[..2].to_vec(), 0, 1).map(|all| all.len()), Some(2));
        // A replica of the previous release sends its sidecars in one message.
        let old: ToLeader = serde_json::from_str(r#"{"type":"sidecars","sidecars":[]}"#).expect("parses");
        assert_eq!(old, ToLeader::Sidecars { sidecars: Vec::new(), page: 0, pages: 1 });
    }

    #[test]
    fn decisions_cross_between_replicas_with_their_times() {
        let now = Instant::now();
        let since: k8s_openapi::jiff::Timestamp = "2026-11-27T10:00:00Z".parse().expect("time");
        let open = Decision {
            phase: DecisionPhase::Open { until: now + Duration::from_secs(30) },
            reason: "r".into(),
            since,
            until: Some(since),
            label: "a/m".into(),
        };
        let wire = WireDecision::from_decision(&open, now);
        assert_eq!(wire.open_for_ms, Some(30_000));
        let spent = SpentWindow { window: 7, usd: 50.5, limit: 50.0, until_ms: 8 * 3_600_000 };
        let text = serde_json::to_string(&FromLeader::Decisions {
            namespace: "shop".into(),
            targets: BTreeMap::from([("id".to_string(), wire)]),
            spent: BTreeMap::from([("key".to_string(), WireSpent::from(&spent))]),
            verify: BTreeMap::new(),
        })
        .expect("json");
        let FromLeader::Decisions { targets, spent: spent_back, .. } = serde_json::from_str(&text).expect("parses")
        else {
            panic!()
        };
        let back = targets["id"].clone().into_decision(now);
        assert_eq!(back, open);
        assert_eq!(SpentWindow::from(spent_back["key"]), spent);
        let older = r#"{"type":"decisions","namespace":"shop","targets":{}}"#;
        assert!(
            matches!(serde_json::from_str(older), Ok(FromLeader::Decisions { spent, .. }) if spent.is_empty()),
            "a leader of the previous release sends no spend"
        );
        let half = Decision { phase: DecisionPhase::HalfOpen { probers: vec!["uid-1".into()] }, until: None, ..open };
        assert_eq!(WireDecision::from_decision(&half, now).into_decision(now), half);
    }
}
