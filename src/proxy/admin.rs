//! The admin listener: probes (`/healthz`, `/readyz`), target health (`/health`) and the
//! active policy with every key redacted (`/config`).

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;

use super::body::{Body, json_response, text_response};
use crate::snapshot::PolicyStore;
use crate::telemetry::Metrics;

/// Answers one admin request from the store's current state.
pub fn handle(store: &PolicyStore, metrics: &Metrics, request: &Request<Incoming>) -> Response<Body> {
    if request.method() != Method::GET {
        return text_response(StatusCode::METHOD_NOT_ALLOWED, "only GET is served here\n");
    }
    match request.uri().path() {
        "/healthz" => text_response(StatusCode::OK, "ok\n"),
        "/readyz" => match store.load() {
            Some(snapshot) => {
                text_response(StatusCode::OK, &format!("ready: {} (version {})\n", snapshot.source, snapshot.digest))
            }
            None => text_response(StatusCode::SERVICE_UNAVAILABLE, &format!("not ready: {}\n", store.unavailable())),
        },
        "/config" => match store.load() {
            Some(snapshot) => json_response(
                StatusCode::OK,
                &json!({"source": snapshot.source, "version": snapshot.version, "digest": snapshot.digest,
                        "policies": snapshot.redacted()}),
            ),
            None => json_response(StatusCode::SERVICE_UNAVAILABLE, &json!({"error": store.unavailable()})),
        },
        "/health" => json_response(StatusCode::OK, &store.health().report(tokio::time::Instant::now())),
        "/metrics" => text_response(StatusCode::OK, &metrics.prometheus_text()),
        _ => text_response(StatusCode::NOT_FOUND, "not found; try /healthz, /readyz, /health, /config or /metrics\n"),
    }
}
