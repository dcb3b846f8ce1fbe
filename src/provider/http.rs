//! The request/answer plumbing every provider uses over the shared client
//! ([`crate::net::client`]): bounded reads, JSON bodies, and connection failures classified for
//! the fallback loop.

use bytes::Bytes;
use http_body_util::Full;

use crate::llm::FailureClass;
use crate::llm::{AttemptError, Whole};
use crate::net::client::HttpClient;

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
    decode_answer(read_body(body).await?)
}

/// A 2xx answer's bytes decoded as JSON, and kept.
pub(crate) fn decode_answer(raw: Bytes) -> Result<Whole, AttemptError> {
    let json = serde_json::from_slice(&raw).map_err(|e| {
        AttemptError::new(FailureClass::ServerError, format!("upstream answered 200 with invalid JSON: {e}"))
    })?;
    Ok(Whole::decoded(json, raw))
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
