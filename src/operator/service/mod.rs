//! The config service: the HTTPS endpoint sidecars stream their configuration from (the wire
//! contract is [`crate::configstream`]).
//!
//! Every replica serves it from its own warm copy of the served policies, so sidecars connect
//! to whichever replica the Service picks; the same listener carries the other replicas'
//! streams to the leader ([`peer`]). Connections are bounded (`--config-max-connections`),
//! each carries at most a few HTTP/2 streams, a pod has one stream at a time, and reports are
//! rate limited per stream; token reviews are bounded and cached ([`auth`]).

pub mod auth;
pub mod peer;
pub mod session;
pub mod sidecars;
pub mod tls;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::StreamBody;
use hyper::body::{Frame, Incoming};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::configstream::{FEATURE_VERIFY, FEATURES_HEADER, PROTOCOL_HEADER, Protocol, STREAM_PATH, VERSION_HEADER};
use crate::net::body::text_response;
use crate::net::body::{Body, BoxError};
use crate::net::server::{Options, serve_with};
use crate::operator::fleet::FleetView;
use crate::operator::leader::Leadership;
use crate::operator::served::ServedPolicies;
use auth::{Authenticator, bearer};
use peer::{Leading, PEER_PATH, REPLICA_HEADER};
use session::Session;
use sidecars::Sidecars;
use tls::ReloadingCert;

/// Streams one connection may carry at once (a sidecar needs one).
const STREAMS_PER_CONNECTION: u32 = 4;
/// HTTP/2 pings on idle connections, to notice sidecars that vanished.
const KEEP_ALIVE: Duration = Duration::from_secs(20);

/// What the config service shares with every stream.
pub struct ConfigService {
    /// The policies to serve.
    pub served: Arc<ServedPolicies>,
    /// The fleet view reports feed and decisions come from.
    pub fleet: Arc<FleetView>,
    /// The sidecars connected to this replica.
    pub sidecars: Arc<Sidecars>,
    pub(crate) auth: Authenticator,
    pub(crate) shutdown: watch::Receiver<bool>,
    /// Whether this replica leads (only the leader takes other replicas' evidence).
    pub(crate) leader: Leadership,
    /// This replica's own token, to recognise the other replicas' tokens by.
    pub(crate) peer_token_file: PathBuf,
    /// Streams cut off for what a sidecar sent, by reason.
    pub(crate) refusals: opentelemetry::metrics::Counter<u64>,
}

/// The operator's state the config service serves from.
pub struct Shared {
    /// The policies to serve.
    pub served: Arc<ServedPolicies>,
    /// The fleet view.
    pub fleet: Arc<FleetView>,
    /// The sidecars connected to this replica.
    pub sidecars: Arc<Sidecars>,
    /// Whether this replica leads.
    pub leader: Leadership,
}

impl ConfigService {
    /// A service over `shared`, checking tokens with `client`'s API server.
    pub fn new(
        client: kube::Client,
        shared: Shared,
        peer_token_file: PathBuf,
        metrics: &crate::telemetry::Metrics,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let Shared { served, fleet, sidecars, leader } = shared;
        let refusals = metrics
            .meter("backstop-operator")
            .u64_counter("backstop.operator.sidecar.cutoffs")
            .with_description(
                "Sidecar streams ended for what the sidecar sent (oversized or unreadable reports), by reason",
            )
            .build();
        ConfigService {
            served,
            fleet,
            sidecars,
            auth: Authenticator::new(client),
            shutdown,
            leader,
            peer_token_file,
            refusals,
        }
    }

    /// Serves on `listener` with `cert` until shutdown.
    pub async fn run(self: Arc<Self>, listener: TcpListener, cert: Arc<ReloadingCert>, max_connections: usize) {
        let options = Options {
            tls: Some(tokio_rustls::TlsAcceptor::from(Arc::new(cert.server_config()))),
            max_streams: Some(STREAMS_PER_CONNECTION),
            keep_alive: Some(KEEP_ALIVE),
            ..Options::network_facing(max_connections)
        };
        let shutdown = self.shutdown.clone();
        let reload = tokio::spawn(cert.watch(shutdown.clone()));
        serve_with(listener, shutdown, Duration::from_secs(5), options, move |request| {
            let service = self.clone();
            async move { service.handle(request).await }
        })
        .await;
        let _ = reload.await;
    }

    async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        match (request.method(), request.uri().path()) {
            (&Method::POST, STREAM_PATH) => self.stream(request).await,
            (&Method::POST, PEER_PATH) => self.peer(request).await,
            (_, STREAM_PATH) => text_response(StatusCode::METHOD_NOT_ALLOWED, "POST the stream\n"),
            _ => text_response(StatusCode::NOT_FOUND, "not found; sidecars POST /v1/stream\n"),
        }
    }

    /// Another replica's peer stream: taken only by the leader, only from a replica.
    async fn peer(&self, request: Request<Incoming>) -> Response<Body> {
        let replica =
            request.headers().get(REPLICA_HEADER).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
        if let Err(error) = self.auth.authenticate_peer(bearer(request.headers()), &self.peer_token_file).await {
            tracing::warn!(%replica, %error, "a peer was refused");
            return text_response(error.status(), &format!("{error}\n"));
        }
        if !*self.leader.borrow() {
            return text_response(StatusCode::MISDIRECTED_REQUEST, "this replica does not lead\n");
        }
        let leading = Leading {
            fleet: self.fleet.clone(),
            sidecars: self.sidecars.clone(),
            shutdown: self.shutdown.clone(),
            leader: self.leader.clone(),
        };
        peer::serve(leading, replica, request.into_body())
    }

    async fn stream(self: Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        if request.version() != Version::HTTP_2 {
            return text_response(StatusCode::HTTP_VERSION_NOT_SUPPORTED, "the config stream needs HTTP/2\n");
        }
        let asked = request.headers().get(PROTOCOL_HEADER).and_then(|v| v.to_str().ok()).unwrap_or_default();
        let Some(protocol) = Protocol::from_header(asked) else {
            return text_response(
                StatusCode::BAD_REQUEST,
                &format!("this operator speaks protocol 1 and 2; the sidecar sent `{asked}`\n"),
            );
        };
        let identity = match self.auth.authenticate(bearer(request.headers())).await {
            Ok(identity) => identity,
            Err(error) => {
                tracing::info!(%error, "a sidecar was refused");
                return text_response(error.status(), &format!("{error}\n"));
            }
        };
        let resume = request
            .headers()
            .get(VERSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .map(str::to_string);
        let verifies = request
            .headers()
            .get(FEATURES_HEADER)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|features| features.split(',').any(|f| f.trim() == FEATURE_VERIFY));
        tracing::debug!(namespace = %identity.namespace, pod = %identity.pod, resume = ?resume, verifies, "sidecar connected");
        let (session, replaced) = self.sidecars.connect(&identity.uid, &identity.namespace, &identity.pod);
        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(2);
        let body = request.into_body();
        let session = Session::new(self.clone(), identity, session, protocol, tx).verifying(verifies);
        tokio::spawn(session.run(body, resume, replaced));
        let frames = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|frame| (frame, rx)) });
        let mut response = Response::new(Body::new(StreamBody::new(frames)));
        response
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/x-ndjson"));
        response
    }
}
