//! The shared upstream HTTP client and the request/answer plumbing every provider uses:
//! bounded reads, JSON bodies, and connection failures classified for the fallback loop.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::CertificateDer;

use crate::llm::{AttemptError, Whole};
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
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .build(https_connector(tls, Duration::from_secs(10))))
}

/// The connector of an outbound client: `https://` through rustls with `tls`, plain `http://`
/// too, HTTP/2 or HTTP/1.1 by ALPN, no Nagle delay, connects bounded by `connect_timeout`.
pub fn https_connector(
    tls: rustls::ClientConfig,
    connect_timeout: Duration,
) -> hyper_rustls::HttpsConnector<HttpConnector> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http)
}

/// Why a CA file cannot be trusted.
#[derive(Debug, thiserror::Error)]
pub enum CaFileError {
    /// It could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: rustls::pki_types::pem::Error,
    },
    /// It is not PEM certificates.
    #[error("{path} is not a PEM certificate bundle: {source}")]
    NotPem {
        /// The file.
        path: PathBuf,
        /// Why.
        source: rustls::pki_types::pem::Error,
    },
    /// It holds none.
    #[error("{0} holds no certificate")]
    Empty(PathBuf),
}

/// Reads the certificates of a PEM file, for [`http_client`]'s extra roots.
pub fn load_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaFileError> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|source| CaFileError::Read { path: path.to_path_buf(), source })?
        .collect::<Result<_, _>>()
        .map_err(|source| CaFileError::NotPem { path: path.to_path_buf(), source })?;
    if certs.is_empty() {
        return Err(CaFileError::Empty(path.to_path_buf()));
    }
    Ok(certs)
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

/// POSTs a JSON `body` with the provider's `headers`. A non-2xx answer is read and classified
/// by the provider's `classify`; a 2xx response is returned for the provider to read.
pub(crate) async fn post_json(
    http: &HttpClient,
    uri: http::Uri,
    headers: impl IntoIterator<Item = (&'static str, http::HeaderValue)>,
    trace: &[(&'static str, http::HeaderValue)],
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
    for (name, value) in headers.into_iter().chain(trace.iter().cloned()) {
        builder = builder.header(name, value);
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

/// Encodes a request body.
pub(crate) fn encode(body: &impl serde::Serialize) -> Result<Vec<u8>, AttemptError> {
    serde_json::to_vec(body)
        .map_err(|e| AttemptError::new(FailureClass::BadRequest, format!("cannot encode request: {e}")))
}

/// Reads a 2xx answer as JSON, keeping its bytes.
pub(crate) async fn read_json(body: hyper::body::Incoming) -> Result<Whole, AttemptError> {
    let raw = read_body(body).await?;
    let json = serde_json::from_slice(&raw).map_err(|e| {
        AttemptError::new(FailureClass::ServerError, format!("upstream answered 200 with invalid JSON: {e}"))
    })?;
    Ok(Whole { json, raw: Some(raw) })
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
