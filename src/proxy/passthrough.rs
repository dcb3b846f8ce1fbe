//! Pass-through: while no policy selects the pod (none yet, a selector that misses it, the
//! policy deleted, the operator not reached within the start-up bound), the app's calls go
//! where they would have gone without Backstop, unchanged, with the app's own credentials: the
//! base URL the app had before injection (`--passthrough-openai`, `--passthrough-anthropic`,
//! which the webhook sets from the app's own variables), else the provider's public endpoint.
//!
//! Nothing is parsed or translated: method, path, query, headers and body are streamed both
//! ways, and the answer carries `x-backstop-passthrough: true`. A sidecar without a policy is
//! thereby never worse than no sidecar.

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::llm::Api;
use crate::net::body::{Body, json_response};

/// OpenAI's public endpoint, where an OpenAI SDK goes without a base URL.
pub const OPENAI_DEFAULT: &str = "https://api.openai.com/v1";
/// Anthropic's public endpoint, where an Anthropic SDK goes without a base URL.
pub const ANTHROPIC_DEFAULT: &str = "https://api.anthropic.com";
/// The header every passed-through answer carries.
pub const HEADER: &str = "x-backstop-passthrough";

/// A pass-through base URL that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PassthroughError {
    /// Not an absolute `http(s)://` URL.
    #[error("`{url}` is not an http:// or https:// URL")]
    Url {
        /// The URL given.
        url: String,
    },
    /// It is the sidecar itself: every call would loop.
    #[error("`{url}` is this sidecar's own listener; pass-through would loop")]
    Loop {
        /// The URL given.
        url: String,
    },
    /// TLS could not be set up.
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
}

/// Where passed-through calls go.
#[derive(Clone, Debug)]
pub struct Destinations {
    /// The OpenAI API's base URL (`…/v1`).
    pub openai: Uri,
    /// The Anthropic API's base URL (without `/v1`).
    pub anthropic: Uri,
}

impl Destinations {
    /// Parses both base URLs, refusing one that points at `listen`, the sidecar itself.
    pub fn new(openai: &str, anthropic: &str, listen: std::net::SocketAddr) -> Result<Destinations, PassthroughError> {
        let parse = |url: &str| -> Result<Uri, PassthroughError> {
            let uri: Uri = url.trim().parse().map_err(|_| PassthroughError::Url { url: url.into() })?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                return Err(PassthroughError::Url { url: url.into() });
            }
            let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
            let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("https") { 443 } else { 80 });
            let local = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
            if local && port == listen.port() {
                return Err(PassthroughError::Loop { url: url.into() });
            }
            Ok(uri)
        };
        Ok(Destinations { openai: parse(openai)?, anthropic: parse(anthropic)? })
    }

    /// The URL a call to `path_and_query` goes to, and for which API. Anthropic's SDKs send
    /// `anthropic-version` on every call and call `/v1/messages…`; everything else is OpenAI's,
    /// whose base URL ends in `/v1` as the app's `OPENAI_BASE_URL` did.
    pub fn route(&self, path_and_query: &str, headers: &HeaderMap) -> (Api, String) {
        let anthropic = headers.contains_key("anthropic-version")
            || path_and_query.starts_with("/v1/messages")
            || path_and_query.starts_with("/v1/complete");
        if anthropic {
            let base = self.anthropic.to_string();
            return (Api::Anthropic, format!("{}{path_and_query}", base.trim_end_matches('/')));
        }
        let base = self.openai.to_string();
        let rest = path_and_query.strip_prefix("/v1").filter(|r| r.is_empty() || r.starts_with(['/', '?']));
        (Api::OpenAi, format!("{}{}", base.trim_end_matches('/'), rest.unwrap_or(path_and_query)))
    }
}

/// Forwards calls while no policy applies.
#[derive(Clone)]
pub struct Passthrough {
    destinations: Destinations,
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Body>,
}

impl std::fmt::Debug for Passthrough {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Passthrough").field("destinations", &self.destinations).finish_non_exhaustive()
    }
}

/// Hop-by-hop headers (RFC 9110, 7.6.1): never forwarded.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in HOP_BY_HOP.iter().chain(&named) {
        headers.remove(name);
    }
    headers.remove(header::TRANSFER_ENCODING);
    headers.remove(header::HOST);
}

impl Passthrough {
    /// A pass-through to `destinations`, trusting the Mozilla roots and `extra_roots`.
    pub fn new(
        destinations: Destinations,
        extra_roots: &[rustls::pki_types::CertificateDer<'static>],
    ) -> Result<Passthrough, PassthroughError> {
        let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        for root in extra_roots {
            roots.add(root.clone())?;
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(crate::net::client::https_connector(tls, Duration::from_secs(10)));
        Ok(Passthrough { destinations, client })
    }

    /// Where calls go.
    pub fn destinations(&self) -> &Destinations {
        &self.destinations
    }

    /// Forwards `request` as it is and streams the answer back; `why` says why there is no
    /// policy (for the error a failed forward answers with).
    pub async fn forward(&self, request: Request<Incoming>, why: &str) -> Response<Body> {
        let (mut parts, body) = request.into_parts();
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
        let (api, url) = self.destinations.route(&path, &parts.headers);
        let uri: Uri = match url.parse() {
            Ok(uri) => uri,
            Err(_) => return failure(api, StatusCode::BAD_REQUEST, &format!("cannot forward to `{url}`")),
        };
        strip_hop_by_hop(&mut parts.headers);
        let mut outgoing = Request::new(Body::new(body.map_err(Into::into)));
        *outgoing.method_mut() = parts.method;
        *outgoing.uri_mut() = uri;
        *outgoing.headers_mut() = parts.headers;
        match self.client.request(outgoing).await {
            Ok(answer) => {
                let (mut parts, body) = answer.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                parts.headers.insert(HEADER, HeaderValue::from_static("true"));
                Response::from_parts(parts, Body::new(body.map_err(Into::into)))
            }
            Err(error) => {
                let mut source: Option<&dyn std::error::Error> = Some(&error);
                let mut detail = String::new();
                while let Some(e) = source {
                    detail = e.to_string();
                    source = e.source();
                }
                tracing::debug!(%url, %detail, "pass-through failed");
                failure(
                    api,
                    StatusCode::BAD_GATEWAY,
                    &format!("backstop passes calls through ({why}) and could not reach {url}: {detail}"),
                )
            }
        }
    }
}

/// An error in the API's own shape, marked as passed through.
fn failure(api: Api, status: StatusCode, message: &str) -> Response<Body> {
    let body = match api {
        Api::Anthropic => serde_json::json!({"type": "error", "error": {"type": "api_error", "message": message}}),
        _ => serde_json::json!({"error": {"message": message, "type": "server_error", "code": "passthrough_failed"}}),
    };
    let mut response = json_response(status, &body);
    response.headers_mut().insert(HEADER, HeaderValue::from_static("true"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn destinations() -> Destinations {
        let listen = "127.0.0.1:7400".parse().expect("address");
        Destinations::new("https://gateway.example/openai/v1", "https://api.anthropic.com", listen).expect("valid")
    }

    #[test]
    fn calls_go_to_the_api_they_belong_to_with_path_and_query_kept() {
        let d = destinations();
        let none = HeaderMap::new();
        assert_eq!(
            d.route("/v1/chat/completions", &none),
            (Api::OpenAi, "https://gateway.example/openai/v1/chat/completions".into())
        );
        assert_eq!(
            d.route("/v1/files?purpose=batch", &none),
            (Api::OpenAi, "https://gateway.example/openai/v1/files?purpose=batch".into())
        );
        assert_eq!(d.route("/v1/messages", &none), (Api::Anthropic, "https://api.anthropic.com/v1/messages".into()));
        let mut anthropic = HeaderMap::new();
        anthropic.insert("anthropic-version", HeaderValue::from_static("2023-06-01"));
        assert_eq!(d.route("/v1/models", &anthropic), (Api::Anthropic, "https://api.anthropic.com/v1/models".into()));
        assert_eq!(d.route("/v1x", &none), (Api::OpenAi, "https://gateway.example/openai/v1/v1x".into()));
    }

    #[test]
    fn a_base_url_that_is_not_http_or_is_the_sidecar_itself_is_refused() {
        let listen = "127.0.0.1:7400".parse().expect("address");
        let error = Destinations::new("http://127.0.0.1:7400/v1", ANTHROPIC_DEFAULT, listen).expect_err("a loop");
        assert!(error.to_string().contains("would loop"), "{error}");
        assert!(Destinations::new("http://localhost:7400", ANTHROPIC_DEFAULT, listen).is_err());
        assert!(Destinations::new(OPENAI_DEFAULT, "ftp://x", listen).is_err());
        assert!(Destinations::new("http://127.0.0.1:8000/v1", ANTHROPIC_DEFAULT, listen).is_ok());
    }

    #[test]
    fn hop_by_hop_headers_are_not_forwarded_and_credentials_are() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-private"));
        headers.insert("x-private", HeaderValue::from_static("1"));
        headers.insert(header::HOST, HeaderValue::from_static("127.0.0.1:7400"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer app-key"));
        headers.insert("x-api-key", HeaderValue::from_static("app-key"));
        strip_hop_by_hop(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["authorization", "x-api-key"]);
    }
}
