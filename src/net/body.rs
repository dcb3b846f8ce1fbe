//! Request and response bodies on every listener.

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::Value;

/// A response body: whole or streamed.
pub type Body = http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, BoxError>;
/// The error a response body can end with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body refused before it was parsed.
#[derive(Debug)]
pub struct Refused {
    /// The status to answer with.
    pub status: StatusCode,
    /// What is wrong.
    pub message: String,
    /// Backstop's machine-readable reason.
    pub code: &'static str,
}

/// Reads the whole request body (it is replayed to every target), up to `limit` bytes.
pub async fn read_request(request: Request<Incoming>, limit: usize) -> Result<Bytes, Refused> {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let too_large = || Refused {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        message: format!("request body is larger than the sidecar's limit of {limit} bytes"),
        code: "request_too_large",
    };
    if declared.is_some_and(|len| len > limit) {
        return Err(too_large());
    }
    match Limited::new(request.into_body(), limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(error) => Err(Refused {
            status: StatusCode::BAD_REQUEST,
            message: format!("could not read the request body: {error}"),
            code: "unreadable_body",
        }),
    }
}

/// A whole body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Body::new(Full::new(bytes.into()).map_err(|never| match never {}))
}

/// A JSON response.
pub fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    json_bytes_response(status, serde_json::to_vec(value).unwrap_or_default())
}

/// A response of JSON that is already encoded (a provider's own bytes).
pub fn json_bytes_response(status: StatusCode, json: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(full(json));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// A plain-text response.
pub fn text_response(status: StatusCode, text: &str) -> Response<Body> {
    let mut response = Response::new(full(text.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}
