//! The chat request path shared by every ingress API: parse, route, run the chain, and answer
//! in the app's own format. Each ingress supplies a [`Dialect`]: how its requests parse and how
//! its answers, streams and errors are written.

use std::time::Duration;

use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use serde_json::{Value, json};

use super::fallback::{self, Answered, Attempt, Committed, Controls, Unanswered};
use super::stream::{self, StreamRenderer};
use super::{Body, full};
use crate::chain::{PolicySnapshot, Route};
use crate::chat::{Api, ChatRequest, InvalidRequest};
use crate::policy::FailureClass;
use crate::provider::HttpClient;

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
    /// A renderer for a stream from a provider of `api`.
    fn renderer(api: Api, request: &ChatRequest) -> Self::Renderer;
}

/// Answers one chat request whose body has been read.
pub async fn serve<D: Dialect>(
    snapshot: Option<std::sync::Arc<PolicySnapshot>>,
    headers: &HeaderMap,
    body: &[u8],
    http: &HttpClient,
) -> Response<Body> {
    let request = match D::parse(body, headers) {
        Ok(request) => request,
        Err(invalid) => {
            return D::error(StatusCode::BAD_REQUEST, &invalid.message, "invalid_request", invalid.param, Value::Null);
        }
    };
    let Some(snapshot) = snapshot else {
        return D::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "backstop has no valid policy loaded; see the sidecar's log",
            "no_policy",
            None,
            Value::Null,
        );
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
    let outcome = fallback::run(route, &request, http, controls(route, headers)).await;
    let mut response = match outcome {
        Ok(answered) => {
            log_answered(&route.alias, &answered);
            answer::<D>(answered, &request)
        }
        Err(Unanswered::Final { target, error, attempts }) => {
            tracing::info!(route = %route.alias, target_label = %target.label, class = %error.class, status = ?error.status,
                attempts = attempts.len(), "returning the provider's error: `fallbackOn` does not cover it");
            let status = error.status.and_then(|s| StatusCode::from_u16(s).ok());
            let same_api = target.provider.api() == D::API;
            let mut response = match (status, &error.body) {
                (Some(status), Some(body)) if same_api && serde_json::from_slice::<Value>(body).is_ok() => {
                    let mut response = Response::new(full(body.clone()));
                    *response.status_mut() = status;
                    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                    response
                }
                _ => D::error(
                    status.unwrap_or_else(|| status_for(error.class)),
                    &format!("{}: {}", target.label, error.message),
                    error.class.as_str(),
                    None,
                    Value::Null,
                ),
            };
            set_header(&mut response, "x-backstop-provider", &target.provider.name);
            set_header(&mut response, "x-backstop-model", &target.model);
            set_header(&mut response, "x-backstop-attempts", &attempts.len().to_string());
            response
        }
        Err(Unanswered::Ineligible { reasons }) => {
            let listed: Vec<String> = reasons.iter().map(|(target, why)| format!("{target}: {why}")).collect();
            D::error(
                StatusCode::BAD_REQUEST,
                &format!(
                    "no target of route `{}` can serve this request faithfully: {}",
                    route.alias,
                    listed.join("; ")
                ),
                "no_eligible_target",
                None,
                Value::Null,
            )
        }
        Err(Unanswered::Exhausted { attempts, skipped, deadline_exceeded, stopped, retry_after }) => {
            exhausted::<D>(&route.alias, &attempts, &skipped, deadline_exceeded, stopped, retry_after)
        }
    };
    set_header(&mut response, "x-backstop-route", &route.alias);
    response
}

fn log_answered(route: &str, answered: &Answered) {
    if answered.fell_through.is_empty() {
        tracing::debug!(route, target_label = %answered.target.label, attempts = answered.attempts.len(), "answered");
    } else {
        tracing::info!(route, target_label = %answered.target.label, attempts = answered.attempts.len(),
            fell_through = %fallback_reason(&answered.fell_through), "answered after falling through");
    }
}

fn fallback_reason(fell_through: &[(String, &'static str)]) -> String {
    fell_through.iter().map(|(target, why)| format!("{target}={why}")).collect::<Vec<_>>().join(", ")
}

/// The per-request controls an app sent as `x-backstop-*` headers, limited to what the policy
/// allows; every other such header, and every malformed one, is ignored and logged.
pub fn controls(route: &Route, headers: &HeaderMap) -> Controls {
    let mut controls = Controls::default();
    for (name, value) in headers {
        let name = name.as_str();
        if !name.starts_with("x-backstop-") {
            continue;
        }
        let value = value.to_str().unwrap_or_default().trim();
        let applied = match name {
            "x-backstop-no-fallback" if route.overrides.no_fallback => match value {
                "true" | "1" => {
                    controls.no_fallback = true;
                    true
                }
                "false" | "0" => true,
                _ => false,
            },
            "x-backstop-max-attempts" if route.overrides.max_attempts => match value.parse::<u32>() {
                Ok(n) if n >= 1 => {
                    controls.max_attempts = Some(n);
                    true
                }
                _ => false,
            },
            "x-backstop-deadline" if route.overrides.deadline => match crate::chain::parse_duration(value) {
                Ok(deadline) => {
                    controls.deadline = Some(deadline);
                    true
                }
                Err(_) => false,
            },
            _ => false,
        };
        if !applied {
            tracing::info!(header = name, value, route = %route.alias,
                "ignoring a request control header: unknown, malformed, or not allowed by `allowRequestOverrides`");
        }
    }
    controls
}

fn answer<D: Dialect>(answered: Answered, request: &ChatRequest) -> Response<Body> {
    let Answered { target, reply, attempts, fell_through } = answered;
    let mut response = match reply {
        Committed::Complete { body, api } => super::json_response(StatusCode::OK, &D::complete(api, body, request)),
        Committed::Stream { held, rest, idle_timeout, api, permit, deadline } => {
            let renderer = D::renderer(api, request);
            let limits = stream::Limits { idle: idle_timeout, deadline };
            let mut response = Response::new(stream::sse_body(held, rest, limits, renderer, permit));
            let headers = response.headers_mut();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            response
        }
    };
    set_header(&mut response, "x-backstop-provider", &target.provider.name);
    set_header(&mut response, "x-backstop-model", &target.model);
    set_header(&mut response, "x-backstop-attempts", &attempts.len().to_string());
    if !fell_through.is_empty() {
        set_header(&mut response, "x-backstop-fallback-reason", &fallback_reason(&fell_through));
    }
    response
}

/// The answer when every target failed: 429 if every attempt was rate limited, 504 if the
/// deadline ran out, 503 if every attempt found the targets overloaded, else 502. The message
/// lists each attempt; authentication errors show only their status.
fn exhausted<D: Dialect>(
    route: &str,
    attempts: &[Attempt],
    skipped: &[String],
    deadline_exceeded: bool,
    stopped: Option<&'static str>,
    retry_after: Option<Duration>,
) -> Response<Body> {
    let failed: Vec<&Attempt> = attempts.iter().filter(|a| a.class.is_some()).collect();
    let every = |class: FailureClass| !failed.is_empty() && failed.iter().all(|a| a.class == Some(class));
    let (status, code) = if every(FailureClass::RateLimited) {
        (StatusCode::TOO_MANY_REQUESTS, "all_targets_rate_limited")
    } else if deadline_exceeded {
        (StatusCode::GATEWAY_TIMEOUT, "deadline_exceeded")
    } else if every(FailureClass::Overloaded) {
        (StatusCode::SERVICE_UNAVAILABLE, "all_targets_overloaded")
    } else {
        (StatusCode::BAD_GATEWAY, "all_targets_failed")
    };
    let listed: Vec<String> = attempts
        .iter()
        .map(|a| {
            let class = a.class.map_or("cancelled", FailureClass::as_str);
            match a.status {
                Some(s) => format!("{} {class} ({s}): {}", a.target, a.message),
                None => format!("{} {class}: {}", a.target, a.message),
            }
        })
        .collect();
    let mut message = if deadline_exceeded {
        format!("the request's deadline ran out after {} attempt(s): {}", attempts.len(), listed.join("; "))
    } else {
        format!("every target failed ({} attempt(s)): {}", attempts.len(), listed.join("; "))
    };
    if !skipped.is_empty() {
        message.push_str(&format!("; skipped with an open circuit: {}", skipped.join(", ")));
    }
    if let Some(stopped) = stopped {
        message.push_str(&format!("; not tried further: {stopped}"));
    }
    tracing::warn!(route, attempts = attempts.len(), status = status.as_u16(), %message, "no target answered");
    let detail: Vec<Value> = attempts
        .iter()
        .map(|a| json!({"target": a.target, "class": a.class.map(FailureClass::as_str), "status": a.status, "message": a.message}))
        .collect();
    let extra = json!({"attempts": detail, "skipped": skipped, "stopped": stopped});
    let mut response = D::error(status, &message, code, None, extra);
    set_header(&mut response, "x-backstop-attempts", &attempts.len().to_string());
    if let Some(wait) = retry_after {
        set_header(&mut response, "retry-after", &wait.as_secs_f64().ceil().max(1.0).to_string());
    }
    response
}

/// The status an app gets for a failure with no upstream status.
pub fn status_for(class: FailureClass) -> StatusCode {
    match class {
        FailureClass::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        FailureClass::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
        FailureClass::Timeout => StatusCode::GATEWAY_TIMEOUT,
        FailureClass::ServerError | FailureClass::ConnectError => StatusCode::BAD_GATEWAY,
        FailureClass::AuthError => StatusCode::BAD_GATEWAY,
        FailureClass::QuotaExceeded => StatusCode::TOO_MANY_REQUESTS,
        FailureClass::ContextWindowExceeded | FailureClass::ContentFiltered | FailureClass::BadRequest => {
            StatusCode::BAD_REQUEST
        }
        FailureClass::EmptyCompletion => StatusCode::BAD_GATEWAY,
    }
}

/// The OpenAI error `type` for a failure class.
pub fn error_type(class: FailureClass) -> &'static str {
    match class {
        FailureClass::RateLimited | FailureClass::QuotaExceeded => "rate_limit_error",
        FailureClass::Overloaded => "overloaded_error",
        FailureClass::Timeout => "timeout",
        FailureClass::AuthError => "upstream_authentication_error",
        FailureClass::BadRequest | FailureClass::ContextWindowExceeded | FailureClass::ContentFiltered => {
            "invalid_request_error"
        }
        FailureClass::ServerError | FailureClass::ConnectError | FailureClass::EmptyCompletion => "upstream_error",
    }
}

fn set_header(response: &mut Response<Body>, name: &'static str, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        response.headers_mut().insert(name, value);
    }
}
