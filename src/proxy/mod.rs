//! The sidecar's request path: the LLM listener apps point their SDKs at, and the admin
//! listener for probes and the redacted config.

pub mod anthropic;
pub mod chat;
pub mod fallback;
pub mod openai;
pub mod stream;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::chain::PolicyStore;
use crate::provider::HttpClient;
use chat::Dialect as _;

/// A response body: whole or streamed.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;
/// The error a response body can end with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The default largest request body: bigger ones get a 413 (retries need the whole body).
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 10 << 20;
/// How long requests in flight may run on after a shutdown signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Listener settings.
#[derive(Clone, Debug)]
pub struct SidecarConfig {
    /// The LLM listener (default `127.0.0.1:7400`).
    pub listen: SocketAddr,
    /// The admin listener (default `0.0.0.0:7401`).
    pub admin: SocketAddr,
    /// The largest request body accepted.
    pub max_request_bytes: usize,
}

struct State {
    store: Arc<PolicyStore>,
    http: HttpClient,
    max_request_bytes: usize,
}

/// A bound sidecar, ready to serve.
pub struct Sidecar {
    state: Arc<State>,
    llm: TcpListener,
    admin: TcpListener,
}

impl Sidecar {
    /// Binds both listeners. Port 0 picks a free port; see [`Sidecar::llm_addr`].
    pub async fn bind(config: &SidecarConfig, store: Arc<PolicyStore>, http: HttpClient) -> std::io::Result<Sidecar> {
        let llm = TcpListener::bind(config.listen).await?;
        let admin = TcpListener::bind(config.admin).await?;
        let state = Arc::new(State { store, http, max_request_bytes: config.max_request_bytes });
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

    /// Serves until `shutdown` turns true, then lets requests in flight finish (up to 30 s).
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        let llm_state = self.state.clone();
        let llm = serve(self.llm, shutdown.clone(), move |request| {
            let state = llm_state.clone();
            async move { handle_llm(&state, request).await }
        });
        let admin_state = self.state.clone();
        let admin = serve(self.admin, shutdown, move |request| {
            let state = admin_state.clone();
            async move { handle_admin(&state, &request) }
        });
        tokio::join!(llm, admin);
    }
}

/// Accepts connections (HTTP/1.1 and cleartext HTTP/2) until shutdown, then drains.
async fn serve<F, Fut>(listener: TcpListener, mut shutdown: watch::Receiver<bool>, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => {
                let (socket, _) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors and the like: back off rather than spin.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = socket.set_nodelay(true);
                let handler = handler.clone();
                let service = service_fn(move |request| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(request).await) }
                });
                let connection = builder.serve_connection_with_upgrades(TokioIo::new(socket), service).into_owned();
                let connection = graceful.watch(connection);
                // Owned by `graceful`, which waits for it on shutdown.
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        tracing::debug!(%error, "connection ended with an error");
                    }
                });
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown()).await.is_err() {
        tracing::warn!("requests still in flight after {}s; closing them", DRAIN_TIMEOUT.as_secs());
    }
}

async fn handle_llm(state: &State, request: Request<Incoming>) -> Response<Body> {
    let path = request.uri().path().trim_end_matches('/').to_string();
    let path = path.strip_prefix("/v1").unwrap_or(&path);
    let anthropic = path == "/messages";
    let fail = |status: StatusCode, message: &str, code: &str| {
        if anthropic {
            anthropic::error(status, message, code, serde_json::Value::Null)
        } else {
            openai::OpenAiDialect::error(status, message, code, None, serde_json::Value::Null)
        }
    };
    match (request.method(), path) {
        (&Method::POST, "/chat/completions" | "/messages" | "/responses" | "/embeddings") => {
            let headers = request.headers().clone();
            let body = match read_body(request, state.max_request_bytes).await {
                Ok(body) => body,
                Err((status, message, code)) => return fail(status, &message, code),
            };
            let (snapshot, http) = (state.store.load(), &state.http);
            match path {
                "/messages" => chat::serve::<anthropic::AnthropicDialect>(snapshot, &headers, &body, http).await,
                "/responses" => chat::serve::<openai::ResponsesDialect>(snapshot, &headers, &body, http).await,
                "/embeddings" => chat::serve::<openai::EmbeddingsDialect>(snapshot, &headers, &body, http).await,
                _ => chat::serve::<openai::OpenAiDialect>(snapshot, &headers, &body, http).await,
            }
        }
        (&Method::GET, "/models") => openai::models(state.store.load().as_deref()),
        (_, "/chat/completions" | "/messages" | "/embeddings" | "/responses" | "/models") => fail(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{} is not allowed here", request.method()),
            "method_not_allowed",
        ),
        _ => fail(
            StatusCode::NOT_FOUND,
            &format!("no such endpoint: {} {}", request.method(), request.uri().path()),
            "unknown_url",
        ),
    }
}

/// Reads the whole request body (it is replayed to every target), up to `limit` bytes.
async fn read_body(request: Request<Incoming>, limit: usize) -> Result<Bytes, (StatusCode, String, &'static str)> {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let too_large = || {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is larger than the sidecar's limit of {limit} bytes"),
            "request_too_large",
        )
    };
    if declared.is_some_and(|len| len > limit) {
        return Err(too_large());
    }
    match Limited::new(request.into_body(), limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(error) => {
            Err((StatusCode::BAD_REQUEST, format!("could not read the request body: {error}"), "unreadable_body"))
        }
    }
}

fn handle_admin(state: &State, request: &Request<Incoming>) -> Response<Body> {
    if request.method() != Method::GET {
        return text_response(StatusCode::METHOD_NOT_ALLOWED, "only GET is served here\n");
    }
    match request.uri().path() {
        "/healthz" => text_response(StatusCode::OK, "ok\n"),
        "/readyz" => match state.store.load() {
            Some(snapshot) => text_response(
                StatusCode::OK,
                &format!("ready: policy {} version {}\n", snapshot.source, snapshot.version),
            ),
            None => text_response(StatusCode::SERVICE_UNAVAILABLE, "not ready: no valid policy loaded\n"),
        },
        "/config" => match state.store.load() {
            Some(snapshot) => json_response(
                StatusCode::OK,
                &json!({"source": snapshot.source, "version": snapshot.version, "policy": snapshot.redacted()}),
            ),
            None => json_response(StatusCode::SERVICE_UNAVAILABLE, &json!({"error": "no valid policy loaded"})),
        },
        "/health" => json_response(StatusCode::OK, &state.store.health().report(tokio::time::Instant::now())),
        _ => text_response(StatusCode::NOT_FOUND, "not found; try /healthz, /readyz, /health or /config\n"),
    }
}

/// A whole body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Body::new(Full::new(bytes.into()).map_err(|never| match never {}))
}

/// A JSON response.
pub fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let mut response = Response::new(full(serde_json::to_vec(value).unwrap_or_default()));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn text_response(status: StatusCode, text: &str) -> Response<Body> {
    let mut response = Response::new(full(text.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}
