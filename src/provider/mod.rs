//! Upstream providers: one file per wire API, behind one closed enum.
//!
//! A provider turns the neutral [`ChatRequest`] into its API's request, sends it, and turns the
//! answer back into the neutral reply (OpenAI's `chat.completion` and `chat.completion.chunk`
//! shapes) or into an [`AttemptError`] that has classified itself. Timeouts, retries and
//! fall-through are the chain's business, not the provider's.

pub mod anthropic;
pub mod azure;
pub mod convert;
pub mod gemini;
pub mod mock;
pub mod openai;
pub mod responses;
pub mod sse;

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::Stream;
use http::HeaderMap;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::CertificateDer;
use serde_json::Value;

use crate::chat::ChatRequest;
use crate::policy::FailureClass;

/// The shared upstream HTTP client: pooled connections, HTTPS through rustls, HTTP/1.1 and
/// HTTP/2 (chosen by ALPN).
pub type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Builds the upstream client: HTTPS through rustls (ring) trusting the Mozilla roots plus
/// `extra_roots` (a private gateway's CA), HTTP/1.1 and HTTP/2 chosen by ALPN. Call once per
/// process: its pool is shared by every provider and survives policy reloads.
pub fn http_client(extra_roots: &[CertificateDer<'static>]) -> Result<HttpClient, rustls::Error> {
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    for root in extra_roots {
        roots.add(root.clone())?;
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .build(https))
}

/// Reads the certificates of a PEM file, for [`http_client`]'s extra roots.
pub fn load_ca_file(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{} is not a PEM certificate bundle: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", path.display()));
    }
    Ok(certs)
}

/// An API key. Its `Debug` never shows the key, so it cannot leak through a log line.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(Arc<str>);

impl ApiKey {
    /// Wraps a key.
    pub fn new(key: impl Into<Arc<str>>) -> Self {
        ApiKey(key.into())
    }

    /// The key itself, for the one header that carries it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A hash of the key that tells keys apart in memory without revealing them. Never
    /// shown anywhere.
    pub fn fingerprint(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.0.hash(&mut hasher);
        hasher.finish()
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// A configured upstream: one entry of `spec.providers`, ready to send.
#[derive(Debug)]
pub struct Provider {
    /// The policy's name for it.
    pub name: String,
    backend: Backend,
}

#[derive(Debug)]
enum Backend {
    OpenAi(openai::OpenAi),
    Anthropic(anthropic::Anthropic),
    Gemini(gemini::Gemini),
    Mock(Box<mock::Mock>),
}

impl Provider {
    /// An OpenAI or OpenAI-compatible provider.
    pub fn openai(name: String, upstream: openai::OpenAi) -> Self {
        Provider { name, backend: Backend::OpenAi(upstream) }
    }

    /// An Anthropic Messages provider.
    pub fn anthropic(name: String, upstream: anthropic::Anthropic) -> Self {
        Provider { name, backend: Backend::Anthropic(upstream) }
    }

    /// A Gemini provider.
    pub fn gemini(name: String, upstream: gemini::Gemini) -> Self {
        Provider { name, backend: Backend::Gemini(upstream) }
    }

    /// A built-in mock provider.
    pub fn mock(name: String, mock: mock::Mock) -> Self {
        Provider { name, backend: Backend::Mock(Box::new(mock)) }
    }

    /// The wire format of its answers.
    pub fn api(&self) -> Api {
        match &self.backend {
            Backend::OpenAi(_) | Backend::Mock(_) => Api::OpenAi,
            Backend::Anthropic(_) => Api::Anthropic,
            Backend::Gemini(_) => Api::Gemini,
        }
    }

    /// Why this provider cannot serve `request` faithfully, if it cannot: a parameter or
    /// content its API has no way to express. The chain skips it rather than send a request
    /// that means something else.
    pub fn unsupported(&self, request: &ChatRequest) -> Option<String> {
        match &self.backend {
            Backend::OpenAi(o)
                if o.speaks_responses() && request.origin.as_ref().is_some_and(|r| r.api == Api::Responses) =>
            {
                None
            }
            Backend::OpenAi(_) | Backend::Mock(_) => openai::unsupported(request),
            Backend::Anthropic(_) => anthropic::unsupported(request),
            Backend::Gemini(_) => gemini::unsupported(request),
        }
    }

    /// How many API keys it balances across (at least 1; keyless counts as one).
    pub fn key_count(&self) -> usize {
        match &self.backend {
            Backend::OpenAi(o) => o.key_count(),
            Backend::Anthropic(a) => a.key_count(),
            Backend::Gemini(g) => g.key_count(),
            Backend::Mock(_) => 1,
        }
    }

    /// A stable identity for key `key` at this provider's endpoint, for health state that
    /// survives reloads: kind, URL and a fingerprint of the key (never the key itself).
    pub fn endpoint_id(&self, key: usize) -> String {
        match &self.backend {
            Backend::OpenAi(o) => o.endpoint_id(key),
            Backend::Anthropic(a) => a.endpoint_id(key),
            Backend::Gemini(g) => g.endpoint_id(key),
            Backend::Mock(m) => format!("mock:{}:{:?}", self.name, m.behaviour()),
        }
    }

    /// Sends `request` to `model` at this provider with its `key`-th API key. A `Stream`
    /// reply has answered with a 2xx but may still fail before its first chunk; the caller
    /// bounds every wait.
    pub async fn send(
        &self,
        http: &HttpClient,
        model: &str,
        request: &ChatRequest,
        key: usize,
    ) -> Result<Sent, AttemptError> {
        match &self.backend {
            Backend::OpenAi(upstream) => upstream.send(http, model, request, key).await,
            Backend::Anthropic(upstream) => upstream.send(http, model, request, key).await,
            Backend::Gemini(upstream) => upstream.send(http, model, request, key).await,
            Backend::Mock(mock) => mock.send(model, request).await.map(|reply| Sent {
                reply,
                headroom: Headroom::default(),
                api: Api::OpenAi,
            }),
        }
    }
}

/// A successful send: the reply and what the provider said about its rate limits.
#[derive(Debug)]
pub struct Sent {
    /// The reply, in the provider's own wire format.
    pub reply: Reply,
    /// Rate-limit headroom from the response headers.
    pub headroom: Headroom,
    /// The wire format of `reply`.
    pub api: Api,
}

pub use crate::chat::Api;

/// One streamed event in its provider's own format, with what the fallback loop needs to
/// know of it.
#[derive(Clone, Debug)]
pub struct StreamEvent {
    /// The event's JSON payload.
    pub data: Value,
    /// It carries text, a refusal or a tool call.
    pub content: bool,
    /// It ends the answer (a finish or stop reason).
    pub end: bool,
}

/// One embedding as OpenAI writes it: a float array, or with `encoding_format: base64`
/// (the OpenAI SDKs' default) the little-endian `f32`s, base64-encoded.
pub(crate) fn embedding_value(values: &[f64], base64: bool) -> Value {
    use base64::Engine as _;
    if !base64 {
        return Value::from(values.to_vec());
    }
    let bytes: Vec<u8> = values.iter().flat_map(|v| (*v as f32).to_le_bytes()).collect();
    Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// The largest complete answer or error body read from an upstream.
pub(crate) const MAX_ANSWER_BYTES: usize = 32 << 20;

/// Reads a whole upstream body, bounded.
pub(crate) async fn read_body(body: hyper::body::Incoming) -> Result<Bytes, AttemptError> {
    use http_body_util::BodyExt;
    http_body_util::Limited::new(body, MAX_ANSWER_BYTES)
        .collect()
        .await
        .map(|collected| collected.to_bytes())
        .map_err(|e| AttemptError::new(FailureClass::ConnectError, format!("answer broke off: {e}")))
}

/// A provider's API keys as ready-made header values (marked sensitive, so no debug output
/// of a request shows them), with fingerprints that tell keys apart in health state.
#[derive(Debug, Default)]
pub(crate) struct Credentials {
    values: Vec<http::HeaderValue>,
    fingerprints: Vec<u64>,
}

impl Credentials {
    /// Header values `prefix` + key for each key.
    pub(crate) fn new(keys: &[ApiKey], prefix: &str) -> Result<Self, String> {
        let values = keys
            .iter()
            .map(|key| {
                let mut value = http::HeaderValue::from_str(&format!("{prefix}{}", key.expose()))
                    .map_err(|_| "API key holds characters not allowed in an HTTP header".to_string())?;
                value.set_sensitive(true);
                Ok(value)
            })
            .collect::<Result<_, String>>()?;
        Ok(Credentials { values, fingerprints: keys.iter().map(ApiKey::fingerprint).collect() })
    }

    /// Keys balanced across (keyless counts as one).
    pub(crate) fn count(&self) -> usize {
        self.values.len().max(1)
    }

    /// The `name: value` header for key `key`, if there are keys.
    pub(crate) fn header(&self, name: &'static str, key: usize) -> Vec<(&'static str, http::HeaderValue)> {
        self.values.get(key).map(|value| (name, value.clone())).into_iter().collect()
    }

    /// A health identity for key `key` at `endpoint`: never the key itself.
    pub(crate) fn identity(&self, endpoint: &str, key: usize) -> String {
        format!("{endpoint}:{:x}", self.fingerprints.get(key).copied().unwrap_or(0))
    }
}

/// POSTs a JSON `body` with the provider's `headers`. A non-2xx answer is read and classified
/// by the provider's `classify`; a 2xx response is returned for the provider to read.
pub(crate) async fn post_json(
    http: &HttpClient,
    uri: http::Uri,
    headers: &[(&'static str, http::HeaderValue)],
    body: Vec<u8>,
    stream: bool,
    classify: fn(Option<u16>, &[u8]) -> FailureClass,
) -> Result<http::Response<hyper::body::Incoming>, AttemptError> {
    let mut builder = http::Request::builder()
        .method(http::Method::POST)
        .uri(uri)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::USER_AGENT, concat!("backstop/", env!("CARGO_PKG_VERSION")))
        .header(http::header::ACCEPT, if stream { "text/event-stream" } else { "application/json" });
    for (name, value) in headers {
        builder = builder.header(*name, value.clone());
    }
    let outgoing = builder
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| AttemptError::new(FailureClass::BadRequest, format!("cannot build request: {e}")))?;
    let response = http.request(outgoing).await.map_err(|e| connect_error(&e))?;
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let headers = response.headers().clone();
    let body = read_body(response.into_body()).await?;
    let class = classify(Some(status.as_u16()), &body);
    Err(AttemptError::classified(class, status.as_u16(), &headers, body))
}

/// Appends `items` to a conversation as a turn of `role`, merged into the previous turn when it
/// has the same role: Messages and Gemini want user and assistant turns to alternate. `field`
/// names the turn's item list (`content` or `parts`).
pub(crate) fn push_turn(turns: &mut Vec<Value>, role: &str, field: &str, items: Vec<Value>) {
    if items.is_empty() {
        return;
    }
    if let Some(last) = turns.last_mut()
        && last["role"] == role
        && let Some(existing) = last[field].as_array_mut()
    {
        existing.extend(items);
        return;
    }
    let mut turn = serde_json::Map::new();
    turn.insert("role".into(), Value::from(role));
    turn.insert(field.into(), Value::Array(items));
    turns.push(Value::Object(turn));
}

/// OpenAI's `stop` (one string or several) as a list, if any.
pub(crate) fn stop_sequences(rest: &serde_json::Map<String, Value>) -> Option<Value> {
    match rest.get("stop") {
        Some(Value::String(stop)) => Some(Value::Array(vec![Value::from(stop.as_str())])),
        Some(Value::Array(stops)) if !stops.is_empty() => Some(Value::Array(stops.clone())),
        _ => None,
    }
}

/// Encodes a request body.
pub(crate) fn encode(body: &impl serde::Serialize) -> Result<Vec<u8>, AttemptError> {
    serde_json::to_vec(body)
        .map_err(|e| AttemptError::new(FailureClass::BadRequest, format!("cannot encode request: {e}")))
}

/// Reads a 2xx answer as JSON.
pub(crate) async fn read_json(body: hyper::body::Incoming) -> Result<Value, AttemptError> {
    let body = read_body(body).await?;
    serde_json::from_slice(&body).map_err(|e| {
        AttemptError::new(FailureClass::ServerError, format!("upstream answered 200 with invalid JSON: {e}"))
    })
}

/// Classifies a failed connection: whether it never opened or broke before an answer, the
/// next target can fix it.
pub(crate) fn connect_error(error: &hyper_util::client::legacy::Error) -> AttemptError {
    let mut source: Option<&dyn std::error::Error> = Some(error);
    let mut detail = String::new();
    while let Some(e) = source {
        detail = e.to_string();
        source = e.source();
    }
    let what = if error.is_connect() { "connection failed" } else { "connection broke before an answer" };
    AttemptError::new(FailureClass::ConnectError, format!("{what}: {detail}"))
}

/// What a provider's `x-ratelimit-*` headers say about the key's remaining quota.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Headroom {
    /// `x-ratelimit-remaining-requests`.
    pub remaining_requests: Option<u64>,
    /// `x-ratelimit-remaining-tokens`.
    pub remaining_tokens: Option<u64>,
    /// `x-ratelimit-reset-requests`.
    pub reset_requests: Option<Duration>,
    /// `x-ratelimit-reset-tokens`.
    pub reset_tokens: Option<Duration>,
}

impl Headroom {
    /// Reads OpenAI-style rate-limit headers.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
        Headroom {
            remaining_requests: text("x-ratelimit-remaining-requests").and_then(|v| v.parse().ok()),
            remaining_tokens: text("x-ratelimit-remaining-tokens").and_then(|v| v.parse().ok()),
            reset_requests: text("x-ratelimit-reset-requests").and_then(parse_reset),
            reset_tokens: text("x-ratelimit-reset-tokens").and_then(parse_reset),
        }
    }

    /// How long the key is out of requests or tokens, if the headers say it is: the balancer
    /// steers away from it until then, before it returns a 429.
    pub fn exhausted_for(&self) -> Option<Duration> {
        let requests =
            (self.remaining_requests == Some(0)).then(|| self.reset_requests.unwrap_or(Duration::from_secs(1)));
        let tokens = (self.remaining_tokens == Some(0)).then(|| self.reset_tokens.unwrap_or(Duration::from_secs(1)));
        requests.into_iter().chain(tokens).max()
    }
}

/// The longest wait an upstream can impose through its headers: one day. Anything longer is
/// read as one day, so no arithmetic on instants can overflow.
const MAX_UPSTREAM_WAIT_SECS: f64 = 86_400.0;

/// Parses a rate-limit reset such as `1s`, `6m0s`, `59.5s`, `120ms` or a bare number of seconds.
fn parse_reset(text: &str) -> Option<Duration> {
    if let Ok(secs) = text.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(MAX_UPSTREAM_WAIT_SECS)));
    }
    let mut total = 0.0;
    let mut rest = text;
    while !rest.is_empty() {
        let split = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let (number, tail) = rest.split_at(split);
        let value: f64 = number.parse().ok()?;
        let unit_end = tail.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let scale = match unit {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += value * scale;
        rest = tail;
    }
    (total.is_finite() && total >= 0.0).then(|| Duration::from_secs_f64(total.min(MAX_UPSTREAM_WAIT_SECS)))
}

/// A successful answer, in the provider's own format (see [`Sent::api`]).
pub enum Reply {
    /// A whole answer.
    Complete(Value),
    /// Events as they arrive. The stream ends after the provider's end marker; an early end
    /// or an error event is an `Err` item.
    Stream(ChunkStream),
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reply::Complete(v) => f.debug_tuple("Complete").field(v).finish(),
            Reply::Stream(_) => f.write_str("Stream(..)"),
        }
    }
}

/// A stream of a provider's events.
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<StreamEvent, AttemptError>> + Send>>;

/// A failed attempt at one target, already classified.
#[derive(Clone, Debug)]
pub struct AttemptError {
    /// Why it failed, in the terms `fallbackOn` uses.
    pub class: FailureClass,
    /// The upstream's HTTP status, when it answered with one.
    pub status: Option<u16>,
    /// How long the upstream asked us to wait (`Retry-After`, `retry-after-ms`).
    pub retry_after: Option<Duration>,
    /// A one-line description safe to show the app: never an authentication error's body.
    pub message: String,
    /// The upstream's error body, kept to return as is when the failure is final.
    /// Never kept for `authError`.
    pub body: Option<Bytes>,
    /// How long the key is out of requests or tokens, per the error response's
    /// `x-ratelimit-*` headers.
    pub saturated_for: Option<Duration>,
    /// The request's own deadline, not the target, ended the attempt: nothing is learnt of
    /// the target's health from it.
    pub cut_by_deadline: bool,
}

impl AttemptError {
    /// A failure with no upstream answer (timeout, connection error, malformed reply).
    pub fn new(class: FailureClass, message: impl Into<String>) -> Self {
        AttemptError {
            class,
            status: None,
            retry_after: None,
            message: message.into(),
            body: None,
            saturated_for: None,
            cut_by_deadline: false,
        }
    }

    /// A failure the upstream answered with an error status, in OpenAI's error format.
    pub fn from_response(status: u16, headers: &HeaderMap, body: Bytes) -> Self {
        let class = classify_openai_error(Some(status), &body);
        AttemptError::classified(class, status, headers, body)
    }

    /// A failure the upstream answered with an error status, already classified by its
    /// provider's rules. The body is kept to return as is, except for `authError`.
    pub fn classified(class: FailureClass, status: u16, headers: &HeaderMap, body: Bytes) -> Self {
        let retry_after = retry_after(headers, SystemTime::now());
        let message = if class == FailureClass::AuthError {
            format!("upstream rejected the credentials (HTTP {status})")
        } else {
            let detail = error_message(&body).unwrap_or_else(|| snippet(&body));
            format!("HTTP {status}: {detail}")
        };
        let body = (class != FailureClass::AuthError).then_some(body);
        AttemptError {
            class,
            status: Some(status),
            retry_after,
            message,
            body,
            saturated_for: Headroom::from_headers(headers).exhausted_for(),
            cut_by_deadline: false,
        }
    }

    /// An error event inside a 2xx stream, such as `data: {"error": {...}}`.
    pub fn from_stream_error(error: &Value) -> Self {
        let status = error.get("code").and_then(Value::as_u64).and_then(|c| u16::try_from(c).ok());
        let class = classify_error_value(status.filter(|s| (400..600).contains(s)), error);
        let message = if class == FailureClass::AuthError {
            "upstream rejected the credentials (in-stream error)".to_string()
        } else {
            let detail = error.get("message").and_then(Value::as_str).unwrap_or("unknown error");
            format!("error event in stream: {}", truncate(detail, 300))
        };
        AttemptError {
            class,
            status: None,
            retry_after: None,
            message,
            body: None,
            saturated_for: None,
            cut_by_deadline: false,
        }
    }
}

impl std::fmt::Display for AttemptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.class, self.message)
    }
}

impl std::error::Error for AttemptError {}

/// Classifies an error answer in OpenAI's format (`{"error": {"message", "type", "code"}}`),
/// which OpenAI-compatible servers and the mock provider share.
pub fn classify_openai_error(status: Option<u16>, body: &[u8]) -> FailureClass {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let error = parsed.as_ref().map(|v| v.get("error").unwrap_or(v)).cloned().unwrap_or(Value::Null);
    classify_error_value(status, &error)
}

/// Classifies a status and an OpenAI-style error object (either may be missing).
fn classify_error_value(status: Option<u16>, error: &Value) -> FailureClass {
    let field = |name: &str| error.get(name).and_then(Value::as_str).map(str::to_ascii_lowercase).unwrap_or_default();
    let (code, kind, message) = (field("code"), field("type"), field("message"));
    let says = |needle: &str| code.contains(needle) || kind.contains(needle);
    if says("insufficient_quota") || says("billing") || says("quota") {
        return FailureClass::QuotaExceeded;
    }
    if says("context_length") || message.contains("maximum context length") || message.contains("context window") {
        return FailureClass::ContextWindowExceeded;
    }
    if says("content_filter") || says("content_policy") {
        return FailureClass::ContentFiltered;
    }
    match status {
        Some(429) => FailureClass::RateLimited,
        Some(402) => FailureClass::QuotaExceeded,
        Some(401 | 403) => FailureClass::AuthError,
        Some(408) => FailureClass::Timeout,
        Some(503 | 529) => FailureClass::Overloaded,
        Some(500..=599) => FailureClass::ServerError,
        Some(400..=499) => FailureClass::BadRequest,
        Some(_) => FailureClass::ServerError,
        None if says("rate_limit") => FailureClass::RateLimited,
        None if says("overloaded") => FailureClass::Overloaded,
        None if says("authentication") || says("permission") => FailureClass::AuthError,
        None if says("invalid_request") => FailureClass::BadRequest,
        None => FailureClass::ServerError,
    }
}

/// The wait an upstream asked for: `retry-after-ms` (OpenAI, Azure), else `Retry-After` as
/// seconds or an HTTP date.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(ms) = text("retry-after-ms").and_then(|v| v.parse::<f64>().ok())
        && ms.is_finite()
        && ms >= 0.0
    {
        return Some(Duration::from_secs_f64((ms / 1000.0).min(MAX_UPSTREAM_WAIT_SECS)));
    }
    let value = text("retry-after")?;
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(MAX_UPSTREAM_WAIT_SECS)));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO).min(Duration::from_secs_f64(MAX_UPSTREAM_WAIT_SECS)))
}

fn error_message(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let message = value.pointer("/error/message").or_else(|| value.get("message"))?.as_str()?;
    Some(truncate(message, 300))
}

fn snippet(body: &[u8]) -> String {
    if body.is_empty() {
        return "empty body".to_string();
    }
    truncate(&String::from_utf8_lossy(body), 120)
}

fn truncate(text: &str, max: usize) -> String {
    let line = text.lines().next().unwrap_or_default();
    if line.len() <= max {
        return line.to_string();
    }
    let mut end = max;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &line[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use serde_json::json;

    fn class(status: u16, body: Value) -> FailureClass {
        classify_openai_error(Some(status), body.to_string().as_bytes())
    }

    #[test]
    fn classifies_openai_error_bodies() {
        use FailureClass::*;
        assert_eq!(class(429, json!({"error": {"type": "requests", "code": "rate_limit_exceeded"}})), RateLimited);
        assert_eq!(
            class(429, json!({"error": {"type": "insufficient_quota", "code": "insufficient_quota"}})),
            QuotaExceeded
        );
        assert_eq!(class(402, json!({})), QuotaExceeded);
        assert_eq!(class(401, json!({"error": {"code": "invalid_api_key"}})), AuthError);
        assert_eq!(class(403, json!({})), AuthError);
        assert_eq!(class(503, json!({})), Overloaded);
        assert_eq!(class(529, json!({"type": "error", "error": {"type": "overloaded_error"}})), Overloaded);
        assert_eq!(class(500, json!({})), ServerError);
        assert_eq!(class(502, json!({})), ServerError);
        assert_eq!(class(408, json!({})), Timeout);
        assert_eq!(class(400, json!({"error": {"code": "context_length_exceeded"}})), ContextWindowExceeded);
        assert_eq!(
            class(400, json!({"error": {"message": "This model's maximum context length is 8192 tokens"}})),
            ContextWindowExceeded
        );
        assert_eq!(class(400, json!({"error": {"code": "content_filter"}})), ContentFiltered);
        assert_eq!(class(400, json!({"error": {"code": "invalid_value"}})), BadRequest);
        assert_eq!(class(404, json!({"error": {"code": "model_not_found"}})), BadRequest);
        assert_eq!(classify_openai_error(Some(500), b"<html>oops"), ServerError);
    }

    #[test]
    fn classifies_in_stream_error_events() {
        use FailureClass::*;
        let e = |v: Value| AttemptError::from_stream_error(&v).class;
        assert_eq!(e(json!({"message": "slow down", "type": "rate_limit_error"})), RateLimited);
        assert_eq!(e(json!({"message": "busy", "type": "overloaded_error"})), Overloaded);
        assert_eq!(e(json!({"message": "boom", "code": 500})), ServerError);
        assert_eq!(e(json!({"message": "bad", "type": "invalid_request_error"})), BadRequest);
        assert_eq!(e(json!({"message": "?"})), ServerError);
    }

    #[test]
    fn auth_failures_never_keep_the_body() {
        let body = Bytes::from_static(br#"{"error":{"message":"Incorrect API key provided: sk-abc...xyz"}}"#);
        let error = AttemptError::from_response(401, &HeaderMap::new(), body);
        assert_eq!(error.class, FailureClass::AuthError);
        assert!(error.body.is_none());
        assert!(!error.message.contains("sk-abc"), "{}", error.message);
    }

    #[test]
    fn embeddings_encode_as_the_sdks_expect() {
        assert_eq!(embedding_value(&[1.0, -0.5], false), serde_json::json!([1.0, -0.5]));
        assert_eq!(embedding_value(&[1.0, -0.5], true), serde_json::json!("AACAPwAAAL8="));
    }

    #[test]
    fn reads_rate_limit_headroom() {
        let mut headers = HeaderMap::new();
        assert_eq!(Headroom::from_headers(&headers).exhausted_for(), None);
        headers.insert("x-ratelimit-remaining-requests", HeaderValue::from_static("0"));
        headers.insert("x-ratelimit-reset-requests", HeaderValue::from_static("1m30.5s"));
        headers.insert("x-ratelimit-remaining-tokens", HeaderValue::from_static("1200"));
        headers.insert("x-ratelimit-reset-tokens", HeaderValue::from_static("120ms"));
        let headroom = Headroom::from_headers(&headers);
        assert_eq!(headroom.reset_tokens, Some(Duration::from_millis(120)));
        assert_eq!(headroom.exhausted_for(), Some(Duration::from_secs_f64(90.5)));
        headers.insert("x-ratelimit-remaining-requests", HeaderValue::from_static("7"));
        assert_eq!(Headroom::from_headers(&headers).exhausted_for(), None);
        assert_eq!(parse_reset("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse_reset("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_reset("soon"), None);
        assert_eq!(parse_reset("1e20"), Some(Duration::from_secs(86_400)), "clamped: no instant arithmetic overflows");
        assert_eq!(parse_reset("99999999999999999999h"), Some(Duration::from_secs(86_400)));
        let mut huge = HeaderMap::new();
        huge.insert("retry-after-ms", HeaderValue::from_static("1e25"));
        assert_eq!(retry_after(&huge, SystemTime::UNIX_EPOCH), Some(Duration::from_secs(86_400)));
    }

    #[test]
    fn reads_retry_after_in_every_form() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers, now), None);
        headers.insert("retry-after", HeaderValue::from_static("5"));
        assert_eq!(retry_after(&headers, now), Some(Duration::from_secs(5)));
        headers.insert("retry-after", HeaderValue::from_static("1.5"));
        assert_eq!(retry_after(&headers, now), Some(Duration::from_millis(1500)));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(7));
        headers.insert("retry-after", HeaderValue::from_str(&date).expect("header"));
        assert_eq!(retry_after(&headers, now), Some(Duration::from_secs(7)));
        headers.insert("retry-after-ms", HeaderValue::from_static("250"));
        assert_eq!(retry_after(&headers, now), Some(Duration::from_millis(250)));
        headers.insert("retry-after-ms", HeaderValue::from_static("nonsense"));
        headers.insert("retry-after", HeaderValue::from_static("garbage"));
        assert_eq!(retry_after(&headers, now), None);
    }
}
