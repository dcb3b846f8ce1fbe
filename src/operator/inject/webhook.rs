//! The mutating admission webhook that injects the sidecar: `POST /inject` on
//! `--webhook-listen`, over TLS with the operator's certificate (reloaded when it changes),
//! HTTP/2 or HTTP/1.1.
//!
//! It never blocks a pod: a request it cannot read, settings it cannot load or anything else
//! that goes wrong lets the pod through unchanged, with a warning the user sees in `kubectl`
//! and a log line. Only the webhook configuration's `failurePolicy` decides what happens when
//! the webhook cannot be reached at all (the chart's default, `Ignore`, creates the pod without
//! the sidecar).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use k8s_openapi::api::core::v1::Pod;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::{Decision, Settings, inject};
use crate::net::body::{Body, json_response, text_response};
use crate::net::server::{Options, serve_with};
use crate::operator::service::tls::ReloadingCert;

/// Connections the webhook holds at once: the API servers keep a few each.
const MAX_CONNECTIONS: usize = 256;
/// The largest AdmissionReview read (the API server's own request limit is 3 MiB).
const MAX_REVIEW_BYTES: usize = 4 << 20;

/// The webhook's settings.
#[derive(Clone, Debug)]
pub struct Webhook {
    /// The injection settings file (the chart's ConfigMap), read for every pod so that a
    /// change applies without a restart.
    pub settings_file: PathBuf,
    /// What injected pods record as their injector (`backstop.dev/injected`).
    pub release: String,
}

/// Why the injection settings could not be had.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The settings do not parse.
    #[error("{path} is not valid injection settings: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_yaml_ng::Error,
    },
}

impl Webhook {
    /// The settings and the CA bundle, as they are now.
    pub fn settings(&self) -> Result<(Settings, String), SettingsError> {
        let read = |path: &PathBuf| {
            std::fs::read_to_string(path).map_err(|source| SettingsError::Read { path: path.clone(), source })
        };
        let text = read(&self.settings_file)?;
        let settings: Settings = serde_yaml_ng::from_str(&text)
            .map_err(|source| SettingsError::Parse { path: self.settings_file.clone(), source })?;
        let ca = read(&settings.ca_file)?;
        Ok((settings, ca))
    }

    /// Serves on `listener` until `shutdown`.
    pub async fn run(
        self: Arc<Self>,
        listener: TcpListener,
        cert: Arc<ReloadingCert>,
        shutdown: watch::Receiver<bool>,
    ) {
        let options = Options {
            tls: Some(tokio_rustls::TlsAcceptor::from(Arc::new(cert.server_config_for(&[b"h2", b"http/1.1"])))),
            ..Options::network_facing(MAX_CONNECTIONS)
        };
        serve_with(listener, shutdown, Duration::from_secs(5), options, move |request| {
            let webhook = self.clone();
            async move { webhook.handle(request).await }
        })
        .await;
    }

    async fn handle(&self, request: Request<Incoming>) -> Response<Body> {
        match (request.method(), request.uri().path()) {
            (&Method::POST, "/inject") => {
                let body = match Limited::new(request.into_body(), MAX_REVIEW_BYTES).collect().await {
                    Ok(body) => body.to_bytes(),
                    Err(error) => {
                        return text_response(StatusCode::BAD_REQUEST, &format!("unreadable review: {error}\n"));
                    }
                };
                json_response(StatusCode::OK, &self.review(&body))
            }
            (&Method::GET, "/healthz") => text_response(StatusCode::OK, "ok\n"),
            _ => text_response(StatusCode::NOT_FOUND, "not found; the API server POSTs /inject\n"),
        }
    }

    /// The answer to one AdmissionReview.
    pub fn review(&self, body: &[u8]) -> Value {
        let request: AdmissionRequest<Pod> =
            match serde_json::from_slice::<AdmissionReview<Pod>>(body).map_err(|e| e.to_string()).and_then(|review| {
                review.try_into().map_err(|e: kube::core::admission::ConvertAdmissionReviewError| e.to_string())
            }) {
                Ok(request) => request,
                Err(error) => {
                    tracing::warn!(%error, "an AdmissionReview that cannot be read");
                    return serde_json::to_value(AdmissionResponse::invalid(error).into_review()).unwrap_or_default();
                }
            };
        let response = self.respond(&request);
        let mut review = serde_json::to_value(response.into_review()).unwrap_or_default();
        // The patch is a byte string: Go's JSON, which the API server speaks, writes those in
        // base64; kube's type serializes it as an array of numbers, which Go happens to read
        // too. Send the form Kubernetes documents.
        if let Some(patch) = review.pointer_mut("/response/patch")
            && let Some(bytes) =
                patch.as_array().map(|a| a.iter().filter_map(|b| u8::try_from(b.as_u64()?).ok()).collect::<Vec<u8>>())
        {
            use base64::Engine as _;
            *patch = Value::String(base64::engine::general_purpose::STANDARD.encode(bytes));
        }
        review
    }

    fn respond(&self, request: &AdmissionRequest<Pod>) -> AdmissionResponse {
        let response = AdmissionResponse::from(request);
        let Some(pod) = request.object.as_ref().filter(|_| request.operation == Operation::Create) else {
            return response;
        };
        let namespace = request.namespace.as_deref().unwrap_or_default();
        let name = pod.metadata.name.clone().or_else(|| pod.metadata.generate_name.clone()).unwrap_or_default();
        let (settings, ca) = match self.settings() {
            Ok(loaded) => loaded,
            Err(error) => {
                tracing::error!(%error, pod = %format!("{namespace}/{name}"), "cannot inject the sidecar; the pod is created without it");
                return warn(response, format!("backstop: the sidecar was not injected: {error}"));
            }
        };
        match inject(pod, &settings, &ca, &self.release) {
            Decision::Skip(reason) => {
                tracing::debug!(pod = %format!("{namespace}/{name}"), reason, "not injected");
                response
            }
            Decision::Inject(injected, warnings) => {
                let before = serde_json::to_value(pod).unwrap_or_default();
                let after = serde_json::to_value(&injected).unwrap_or_default();
                let patch = json_patch::diff(&before, &after);
                tracing::info!(pod = %format!("{namespace}/{name}"), "injected the sidecar");
                let mut response = match response.clone().with_patch(patch) {
                    Ok(patched) => patched,
                    Err(error) => return warn(response, format!("backstop: the sidecar was not injected: {error}")),
                };
                if !warnings.is_empty() {
                    response.warnings = Some(warnings);
                }
                response
            }
        }
    }
}

fn warn(mut response: AdmissionResponse, warning: String) -> AdmissionResponse {
    response.warnings.get_or_insert_with(Vec::new).push(warning);
    response
}
