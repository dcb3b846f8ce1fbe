//! The sidecar's request path: the LLM listener apps point their SDKs at, one ingress per API
//! ([`ingress`]), the fallback walk ([`fallback`]), the stream relay ([`relay`]), pass-through
//! while no policy applies and for endpoints Backstop does not handle ([`passthrough`]), and
//! the admin listener for probes, health and the redacted config ([`admin`]); a stream that
//! breaks mid-answer continues on another target where the route asks ([`resume`]).

pub mod admin;
pub mod fallback;
pub mod ingress;
pub mod observe;
pub mod passthrough;
pub mod relay;
pub mod resume;
pub mod shadow;
pub mod verify;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::net::body::{self as body, Body};
use fallback::Upstreams;
use ingress::Dialect as _;
use ingress::anthropic::AnthropicDialect;
use ingress::embeddings::EmbeddingsDialect;
use ingress::openai::OpenAiDialect;
use ingress::responses::ResponsesDialect;

use crate::net::client::HttpClient;
use crate::net::server::serve;
use crate::snapshot::PolicyStore;
use crate::telemetry::Telemetry;
use observe::Recorder;

/// The default largest request body: bigger ones get a 413 (retries need the whole body).
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 10 << 20;
/// How long requests in flight may run on after a shutdown signal, by default.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(30);

/// Listener settings.
#[derive(Clone, Debug)]
pub struct SidecarSettings {
    /// The LLM listener (default `127.0.0.1:7400`).
    pub listen: SocketAddr,
    /// The admin listener.
    pub admin: SocketAddr,
    /// The largest request body accepted.
    pub max_request_bytes: usize,
    /// How long requests in flight may finish after a shutdown signal.
    pub drain: Duration,
    /// Where calls go while no policy applies; `None`: the providers' public endpoints.
    pub passthrough: Option<passthrough::Passthrough>,
    /// Whether the sidecar schedules its targets' verification probes itself (it reads a
    /// policy file: the fleet of one), rather than sending those the operator orders.
    pub verify_locally: bool,
}

/// Why the sidecar could not start serving.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// A listener could not be bound.
    #[error("cannot bind the sidecar's {listener} listener on {address}: {source}")]
    Listen {
        /// Which listener.
        listener: &'static str,
        /// Its address.
        address: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The default pass-through could not be set up.
    #[error("pass-through: {0}")]
    Passthrough(#[from] passthrough::PassthroughError),
}

struct State {
    drain: Duration,
    verifier: Arc<verify::Verifier>,
    verify_locally: bool,
    store: Arc<PolicyStore>,
    through: ingress::Through,
    max_request_bytes: usize,
    passthrough: passthrough::Passthrough,
}

/// A bound sidecar, ready to serve.
pub struct Sidecar {
    state: Arc<State>,
    llm: TcpListener,
    admin: TcpListener,
}

impl Sidecar {
    /// Binds both listeners, recording into `telemetry`. Port 0 picks a free port; see
    /// [`Sidecar::llm_addr`].
    pub async fn bind(
        config: &SidecarSettings,
        store: Arc<PolicyStore>,
        http: HttpClient,
        telemetry: Arc<Telemetry>,
    ) -> Result<Sidecar, BindError> {
        let bind = |address: SocketAddr, listener: &'static str| async move {
            TcpListener::bind(address).await.map_err(|source| BindError::Listen { listener, address, source })
        };
        let llm = bind(config.listen, "LLM").await?;
        let admin = bind(config.admin, "admin").await?;
        let passthrough = match &config.passthrough {
            Some(passthrough) => passthrough.clone(),
            None => {
                let listen = llm.local_addr().unwrap_or(config.listen);
                let destinations = passthrough::Destinations::new(
                    passthrough::OPENAI_DEFAULT,
                    passthrough::ANTHROPIC_DEFAULT,
                    listen,
                )?;
                passthrough::Passthrough::new(destinations, &[])?
            }
        };
        let upstreams = Upstreams::new(http);
        let verifier = Arc::new(verify::Verifier::new(store.clone(), upstreams.http().clone(), telemetry.clone()));
        let shadows = Arc::new(shadow::Shadows::new(telemetry.clone(), upstreams.clone()));
        let recorder = Arc::new(Recorder::new(telemetry));
        recorder.watch(&store);
        admin::instruments(&recorder.telemetry.metrics, &store);
        let state = Arc::new(State {
            drain: config.drain,
            verifier,
            verify_locally: config.verify_locally,
            store,
            through: ingress::Through { upstreams, recorder, shadows },
            max_request_bytes: config.max_request_bytes,
            passthrough,
        });
        Ok(Sidecar { state, llm, admin })
    }

    /// The LLM listener's address.
    pub fn llm_addr(&self) -> std::io::Result<SocketAddr> {
        self.llm.local_addr()
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> std::io::Result<SocketAddr> {
        self.admin.local_addr()
    }

    /// Serves until `shutdown` turns true, then lets requests in flight finish (up to the
    /// configured drain).
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        let verifier = tokio::spawn(self.state.verifier.clone().run(shutdown.clone()));
        let scheduler = self
            .state
            .verify_locally
            .then(|| tokio::spawn(self.state.verifier.clone().schedule_locally(shutdown.clone())));
        let llm_state = self.state.clone();
        let drain = self.state.drain;
        let llm = serve(self.llm, shutdown.clone(), drain, move |request| {
            let state = llm_state.clone();
            async move { handle_llm(&state, request).await }
        });
        let admin_state = self.state.clone();
        let admin = serve(self.admin, shutdown, drain, move |request| {
            let state = admin_state.clone();
            async move {
                admin::handle(&state.store, &state.passthrough, &state.through.recorder.telemetry.metrics, &request)
            }
        });
        tokio::join!(llm, admin);
        verifier.abort();
        if let Some(scheduler) = scheduler {
            scheduler.abort();
        }
    }
}

async fn handle_llm(state: &State, request: Request<Incoming>) -> Response<Body> {
    let path = request.uri().path().trim_end_matches('/').to_string();
    let path = path.strip_prefix("/v1").unwrap_or(&path);
    let anthropic = path == "/messages";
    let fail = |status: StatusCode, message: &str, code: &str| {
        if anthropic {
            ingress::anthropic::error(status, message, code, serde_json::Value::Null)
        } else {
            OpenAiDialect::error(status, message, code, None, serde_json::Value::Null)
        }
    };
    // No policy applies: the call goes where it would have gone without Backstop.
    let snapshot = match state.store.load() {
        Some(snapshot) if !snapshot.is_empty() => snapshot,
        Some(empty) => return state.passthrough.forward(request, &empty.source).await,
        None => return state.passthrough.forward(request, &state.store.unavailable()).await,
    };
    match (request.method(), path) {
        (&Method::POST, "/chat/completions" | "/messages" | "/responses" | "/embeddings") => {
            let headers = request.headers().clone();
            let body = match body::read_request(request, state.max_request_bytes).await {
                Ok(body) => body,
                Err(refused) => return fail(refused.status, &refused.message, refused.code),
            };
            let through = &state.through;
            match path {
                "/messages" => ingress::serve::<AnthropicDialect>(snapshot, &headers, &body, through).await,
                "/responses" => ingress::serve::<ResponsesDialect>(snapshot, &headers, &body, through).await,
                "/embeddings" => ingress::serve::<EmbeddingsDialect>(snapshot, &headers, &body, through).await,
                _ => ingress::serve::<OpenAiDialect>(snapshot, &headers, &body, through).await,
            }
        }
        (&Method::GET, "/models") => ingress::openai::models(&snapshot),
        (_, "/chat/completions" | "/messages" | "/embeddings" | "/responses" | "/models") => fail(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{} is not allowed here", request.method()),
            "method_not_allowed",
        ),
        // An endpoint Backstop does not handle (files, audio, batches ...): what the app would
        // have done without Backstop, with its own credentials.
        _ => state.passthrough.forward(request, "Backstop does not handle this endpoint").await,
    }
}
