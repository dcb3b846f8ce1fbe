//! The OpenAI ingress: `POST /v1/chat/completions` and `GET /v1/models`, answered in OpenAI's
//! format with the status codes and error shapes the OpenAI SDKs map to their exceptions.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use serde_json::{Value, json};

use super::fallback::{self, Answered, Attempt, Committed, Controls, Unanswered};
use super::stream::{self, StreamRenderer};
use super::{Body, full, json_response};
use crate::chain::{PolicySnapshot, Route};
use crate::chat::ChatRequest;
use crate::policy::FailureClass;
use crate::provider::{HttpClient, StreamEvent, convert};

/// Answers one Chat Completions request whose body has been read.
pub async fn chat_completions(
    snapshot: Option<std::sync::Arc<PolicySnapshot>>,
    headers: &HeaderMap,
    body: &[u8],
    http: &HttpClient,
) -> Response<Body> {
    let request = match ChatRequest::from_openai_json(body) {
        Ok(request) => request,
        Err(invalid) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                &invalid.message,
                "invalid_request_error",
                None,
                invalid.param,
            );
        }
    };
    let Some(snapshot) = snapshot else {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "backstop has no valid policy loaded; see the sidecar's log",
            "service_unavailable",
            Some("no_policy"),
            None,
        );
    };
    let Some(route) = snapshot.route(&request.model) else {
        let known = snapshot.aliases().join(", ");
        return error_response(
            StatusCode::NOT_FOUND,
            &format!("The model `{}` does not exist in this sidecar's policy; routed models: {known}", request.model),
            "invalid_request_error",
            Some("model_not_found"),
            Some("model"),
        );
    };
    let outcome = fallback::run(route, &request, http, controls(route, headers)).await;
    let mut response = match outcome {
        Ok(answered) => {
            log_answered(&route.alias, &answered);
            answer(answered, request.include_usage())
        }
        Err(Unanswered::Final { target, error, attempts }) => {
            tracing::info!(route = %route.alias, target_label = %target.label, class = %error.class, status = ?error.status,
                attempts = attempts.len(), "returning the provider's error: `fallbackOn` does not cover it");
            let status = error.status.and_then(|s| StatusCode::from_u16(s).ok());
            let mut response = match (status, &error.body) {
                (Some(status), Some(body)) if serde_json::from_slice::<Value>(body).is_ok() => {
                    let mut response = Response::new(full(body.clone()));
                    *response.status_mut() = status;
                    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                    response
                }
                _ => error_response(
                    status.unwrap_or_else(|| status_for(error.class)),
                    &format!("{}: {}", target.label, error.message),
                    error_type(error.class),
                    Some(error.class.as_str()),
                    None,
                ),
            };
            set_header(&mut response, "x-backstop-provider", &target.provider.name);
            set_header(&mut response, "x-backstop-model", &target.model);
            set_header(&mut response, "x-backstop-attempts", &attempts.len().to_string());
            response
        }
        Err(Unanswered::Exhausted { attempts, skipped, deadline_exceeded, stopped, retry_after }) => {
            exhausted(&route.alias, &attempts, &skipped, deadline_exceeded, stopped, retry_after)
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

fn answer(answered: Answered, include_usage: bool) -> Response<Body> {
    let Answered { target, reply, attempts, fell_through } = answered;
    let mut response = match reply {
        Committed::Complete { body, api } => json_response(StatusCode::OK, &convert::to_openai_completion(api, &body)),
        Committed::Stream { held, rest, idle_timeout, api } => {
            let renderer = OpenAiStream { translate: convert::ToOpenAiStream::new(api, include_usage) };
            let mut response = Response::new(stream::sse_body(held, rest, idle_timeout, renderer));
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

/// Renders a committed stream as OpenAI SSE: chunks, then `[DONE]`. A failure after commit
/// sends an `error` event, which the OpenAI SDKs raise as `APIError`.
struct OpenAiStream {
    translate: convert::ToOpenAiStream,
}

impl StreamRenderer for OpenAiStream {
    fn event(&mut self, event: &StreamEvent) -> Vec<Bytes> {
        self.translate.push(event).iter().map(data_event).collect()
    }

    fn finish(&mut self) -> Vec<Bytes> {
        let mut frames: Vec<Bytes> = self.translate.finish().iter().map(data_event).collect();
        frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
        frames
    }

    fn failure(&mut self, message: &str, class: Option<FailureClass>) -> Bytes {
        let kind = class.map_or("timeout", error_type);
        data_event(&json!({"error": {"message": message, "type": kind, "code": "stream_interrupted", "param": null}}))
    }
}

fn data_event(value: &Value) -> Bytes {
    let mut bytes = Vec::with_capacity(256);
    bytes.extend_from_slice(b"data: ");
    // Serializing a `Value` to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut bytes, value);
    bytes.extend_from_slice(b"\n\n");
    Bytes::from(bytes)
}

/// The answer when every target failed: 429 if every attempt was rate limited, 504 if the
/// deadline ran out, 503 if every attempt found the targets overloaded, else 502. The message
/// lists each attempt; authentication errors show only their status.
fn exhausted(
    route: &str,
    attempts: &[Attempt],
    skipped: &[String],
    deadline_exceeded: bool,
    stopped: Option<&'static str>,
    retry_after: Option<Duration>,
) -> Response<Body> {
    let failed: Vec<&Attempt> = attempts.iter().filter(|a| a.class.is_some()).collect();
    let every = |class: FailureClass| !failed.is_empty() && failed.iter().all(|a| a.class == Some(class));
    let (status, kind, code) = if every(FailureClass::RateLimited) {
        (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "all_targets_rate_limited")
    } else if deadline_exceeded {
        (StatusCode::GATEWAY_TIMEOUT, "timeout", "deadline_exceeded")
    } else if every(FailureClass::Overloaded) {
        (StatusCode::SERVICE_UNAVAILABLE, "overloaded_error", "all_targets_overloaded")
    } else {
        (StatusCode::BAD_GATEWAY, "upstream_error", "all_targets_failed")
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
    let body = json!({"error": {"message": message, "type": kind, "code": code, "param": null,
        "attempts": detail, "skipped": skipped, "stopped": stopped}});
    let mut response = json_response(status, &body);
    set_header(&mut response, "x-backstop-attempts", &attempts.len().to_string());
    if let Some(wait) = retry_after {
        set_header(&mut response, "retry-after", &wait.as_secs_f64().ceil().max(1.0).to_string());
    }
    response
}

fn status_for(class: FailureClass) -> StatusCode {
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

fn error_type(class: FailureClass) -> &'static str {
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

/// An OpenAI-format error: `{"error": {"message", "type", "param", "code"}}`.
pub fn error_response(
    status: StatusCode,
    message: &str,
    kind: &str,
    code: Option<&str>,
    param: Option<&str>,
) -> Response<Body> {
    json_response(status, &json!({"error": {"message": message, "type": kind, "param": param, "code": code}}))
}

/// `GET /v1/models`: the route aliases, as OpenAI's model list.
pub fn models(snapshot: Option<&PolicySnapshot>) -> Response<Body> {
    let data: Vec<Value> = snapshot
        .map(|s| s.aliases())
        .unwrap_or_default()
        .iter()
        .map(|alias| json!({"id": alias, "object": "model", "created": 0, "owned_by": "backstop"}))
        .collect();
    json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
}

fn set_header(response: &mut Response<Body>, name: &'static str, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        response.headers_mut().insert(name, value);
    }
}
