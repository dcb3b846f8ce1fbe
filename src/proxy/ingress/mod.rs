//! The request path shared by every ingress API: parse, route, run the chain, and answer in
//! the app's own format. Each ingress supplies a [`Dialect`]: how its requests parse and how
//! its answers, streams and errors are written. Translations from the neutral shape to an
//! app's format live beside each dialect; [`respond`] turns the fallback loop's outcome into
//! the response.

pub mod anthropic;
pub mod embeddings;
pub mod named;
pub mod openai;
pub mod respond;
pub mod responses;

use std::sync::Arc;

use http::{HeaderMap, Response, StatusCode};
use serde_json::Value;

use super::fallback::{self, Chance, Controls, Upstreams};
use super::observe::{Observation, Recorder, RequestFacts, StreamObserver, Summary};
use super::resume;
use super::shadow::{self, Shadows, StreamShadow};
use crate::llm::{Api, ChatRequest, InvalidRequest};
use crate::net::body::Body;
use crate::proxy::relay::StreamRenderer;
use crate::snapshot::PolicySnapshot;

/// How one ingress API reads requests and writes answers.
pub trait Dialect {
    /// The API apps speak to this ingress.
    const API: Api;
    /// The stream renderer.
    type Renderer: StreamRenderer;
    /// Parses a request body.
    fn parse(body: &[u8], headers: &HeaderMap) -> Result<ChatRequest, InvalidRequest>;
    /// An error in this API's format. `code` is Backstop's machine-readable reason; `extra`
    /// fields join the error object.
    fn error(status: StatusCode, message: &str, code: &str, param: Option<&str>, extra: Value) -> Response<Body>;
    /// A whole answer from a provider of `api`, in this API's format.
    fn complete(api: Api, answer: Value, request: &ChatRequest) -> Value;
    /// Whether [`Dialect::complete`] leaves an answer in this API's own format as it is, so the
    /// provider's bytes can go to the app unchanged.
    const FORWARDS_OWN_API: bool = false;
    /// A renderer for a stream from a provider of `api`.
    fn renderer(api: Api, request: &ChatRequest) -> Self::Renderer;
}

/// What a request goes through once parsed: the upstream connections, the telemetry recorder,
/// and the shadow comparisons.
pub struct Through {
    /// The upstream connections.
    pub upstreams: Upstreams,
    /// Telemetry.
    pub recorder: Arc<Recorder>,
    /// Shadow comparisons.
    pub shadows: Arc<Shadows>,
}

/// Answers one chat request whose body has been read: parsed in the dialect's API, routed by
/// `model`, walked down the route's chain through `transport`, and answered in the same API.
pub async fn serve<D: Dialect>(
    snapshot: Arc<PolicySnapshot>,
    headers: &HeaderMap,
    body: &[u8],
    through: &Through,
) -> Response<Body> {
    let Through { upstreams, recorder, shadows } = through;
    let request = match D::parse(body, headers) {
        Ok(request) => request,
        Err(invalid) => {
            return D::error(StatusCode::BAD_REQUEST, &invalid.message, "invalid_request", invalid.param, Value::Null);
        }
    };
    let Some(route) = snapshot.route(&request.model) else {
        let known = snapshot.aliases().join(", ");
        return D::error(
            StatusCode::NOT_FOUND,
            &format!("The model `{}` does not exist in this sidecar's policy; routed models: {known}", request.model),
            "model_not_found",
            Some("model"),
            Value::Null,
        );
    };
    let controls = match Controls::from_headers(route, headers) {
        Ok(controls) => controls,
        Err(unknown) => {
            return D::error(StatusCode::BAD_REQUEST, &unknown.to_string(), "invalid_drill", None, Value::Null);
        }
    };
    let drill = !controls.drill.is_empty();
    let observation = Observation::start(recorder, headers);
    let mut outcome = {
        let transport = upstreams.traced(&observation.trace);
        fallback::run(route, &request, &transport, controls.clone(), Chance::Random).await
    };
    let through = (upstreams, &observation.trace);
    let resume = resume::arm(&mut outcome, route, &request, D::API, &controls, through);
    let summary = Summary::of(&outcome);
    let facts = RequestFacts::of(&request, drill);
    let shadow = if drill { None } else { shadow::sample(shadows, route, &request, &outcome, &observation.trace) };
    let (shadow, request_for_shadow) = shadow.unzip();
    if summary.streamed() {
        let observer = StreamObserver::new(observation, route.clone(), facts, summary);
        let waiting =
            shadow.zip(outcome.as_ref().ok()).and_then(|(pending, answered)| StreamShadow::new(pending, answered));
        let watch = Box::new((observer, waiting));
        let response = drilled(respond::respond::<D>(route, &request, outcome, Some(watch), resume), drill);
        if let Some(sender) = request_for_shadow {
            // Taken when the stream has ended, by the shadow's task.
            let _ = sender.send(request);
        }
        return response;
    }
    let primary = shadow.as_ref().and(outcome.as_ref().ok()).and_then(shadow::Primary::of);
    let response = drilled(respond::respond::<D>(route, &request, outcome, None, None), drill);
    observation.finish(route, &facts, &summary, response.status().as_u16(), tokio::time::Instant::now(), None);
    if let (Some(pending), Some(primary), Some(sender)) = (shadow, primary, request_for_shadow) {
        let _ = sender.send(request);
        pending.launch(primary);
    }
    response
}

/// A drill's response says so, whatever its outcome.
fn drilled(mut response: Response<Body>, drill: bool) -> Response<Body> {
    if drill {
        response.headers_mut().insert("x-backstop-drill", http::HeaderValue::from_static("true"));
    }
    response
}
