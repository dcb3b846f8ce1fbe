//! The fallback loop's outcome as the app's response: the answer with headers saying which
//! target answered and why the chain fell through, the provider's own error when the failure
//! is final, or one error that lists every attempt when the chain ran out.

use std::time::Duration;

use http::{HeaderValue, Response, StatusCode, header};
use serde_json::{Value, json};

use super::Dialect;
use crate::llm::ChatRequest;
use crate::llm::FailureClass;
use crate::llm::status::status_of_class;
use crate::net::body::{Body, json_bytes_response, json_response};
use crate::proxy::fallback::{Answered, Attempt, Committed, RequestRecord, Unanswered};
use crate::proxy::relay;
use crate::proxy::resume::Resume;
use crate::snapshot::Route;

/// The response for the fallback loop's `outcome` on `route`; `watch` rides along with a
/// streamed answer until it ends, and `resume` continues it on another target if it breaks.
pub fn respond<D: Dialect>(
    route: &Route,
    request: &ChatRequest,
    outcome: Result<Answered, Unanswered>,
    watch: Option<Box<dyn relay::StreamWatch>>,
    resume: Option<Box<Resume>>,
) -> Response<Body> {
    let mut response = match outcome {
        Ok(answered) => {
            log_answered(&route.alias, &answered);
            answer::<D>(answered, request, watch, resume)
        }
        Err(Unanswered::Final { target, error, record }) => {
            let attempts = &record.attempts;
            tracing::info!(route = %route.alias, target_label = %target.label, class = %error.class,
                status = error.status.unwrap_or_default(), attempts = attempts.len(),
                "returning the provider's error: `fallbackOn` does not cover it");
            let status = error.status.and_then(|s| StatusCode::from_u16(s).ok());
            let same_api = target.provider.api() == D::API;
            let mut response = match (status, &error.body) {
                (Some(status), Some(body)) if same_api && serde_json::from_slice::<Value>(body).is_ok() => {
                    json_bytes_response(status, body.clone())
                }
                _ => D::error(
                    status.unwrap_or_else(|| app_status(error.class)),
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
        Err(Unanswered::Exhausted { record }) => exhausted::<D>(&route.alias, &record),
    };
    set_header(&mut response, "x-backstop-route", &route.alias);
    response
}

/// The status an app gets for a failure of `class` with no upstream status.
fn app_status(class: FailureClass) -> StatusCode {
    StatusCode::from_u16(status_of_class(class)).unwrap_or(StatusCode::BAD_GATEWAY)
}

fn log_answered(route: &str, answered: &Answered) {
    let record = &answered.record;
    if record.fell_through() {
        tracing::info!(route, target_label = %answered.target.label, attempts = record.attempts.len(),
            fell_through = %record.fallback_reason(), "answered after falling through");
    } else {
        tracing::debug!(route, target_label = %answered.target.label, attempts = record.attempts.len(), "answered");
    }
}

fn answer<D: Dialect>(
    answered: Answered,
    request: &ChatRequest,
    watch: Option<Box<dyn relay::StreamWatch>>,
    resume: Option<Box<Resume>>,
) -> Response<Body> {
    let Answered { target, reply, record } = answered;
    let mut response = match reply {
        Committed::Complete { body, api } => match &body.raw {
            // Same API, nothing to change: the provider's bytes, not decoded and encoded again.
            Some(raw) if api == D::API && D::FORWARDS_OWN_API => json_bytes_response(StatusCode::OK, raw.clone()),
            _ => json_response(StatusCode::OK, &D::complete(api, body.into_json(), request)),
        },
        Committed::Stream { held, rest, idle_timeout, api, permit, stream_deadline } => {
            let renderer = D::renderer(api, request);
            // A stream that may continue on another target bounds its own gaps (a
            // continuation's walk is one of them) and reports to the targets' health itself.
            let (rest, idle, permit) = match resume {
                Some(resume) => (resume.relay(rest, permit, idle_timeout), None, None),
                None => (relay::plain(rest), Some(idle_timeout), permit),
            };
            let limits = relay::Limits { idle, deadline: stream_deadline };
            let mut response =
                Response::new(relay::sse_body(held, rest, limits, renderer, relay::Tail { permit, watch }));
            let headers = response.headers_mut();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            response
        }
    };
    set_header(&mut response, "x-backstop-provider", &target.provider.name);
    set_header(&mut response, "x-backstop-model", &target.model);
    set_header(&mut response, "x-backstop-attempts", &record.attempts.len().to_string());
    if !record.left.is_empty() {
        set_header(&mut response, "x-backstop-fallback-reason", &record.fallback_reason());
    }
    response
}

/// The answer when every target failed: 429 if every attempt was rate limited, 504 if the
/// deadline ran out, 503 if every attempt found the targets overloaded, else 502. The message
/// lists each attempt; authentication errors show only their status.
fn exhausted<D: Dialect>(route: &str, record: &RequestRecord) -> Response<Body> {
    let (attempts, skipped, retry_after) = (&record.attempts, record.out_of_rotation(), record.retry_after);
    let (deadline_exceeded, stopped) = (record.deadline_exceeded(), record.stopped());
    let failed: Vec<&Attempt> = attempts.iter().filter(|a| a.class().is_some()).collect();
    let every = |class: FailureClass| !failed.is_empty() && failed.iter().all(|a| a.class() == Some(class));
    let (status, code) = if attempts.is_empty() {
        (StatusCode::SERVICE_UNAVAILABLE, "no_target_available")
    } else if every(FailureClass::RateLimited) {
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
            let class = a.class().map_or("cancelled", FailureClass::as_str);
            match a.status() {
                Some(s) => format!("{} {class} ({s}): {}", a.target, a.message()),
                None => format!("{} {class}: {}", a.target, a.message()),
            }
        })
        .collect();
    let mut message = if attempts.is_empty() {
        "no target is in rotation".to_string()
    } else if deadline_exceeded {
        format!("the request's deadline ran out after {} attempt(s): {}", attempts.len(), listed.join("; "))
    } else {
        format!("every target failed ({} attempt(s)): {}", attempts.len(), listed.join("; "))
    };
    if !skipped.is_empty() {
        message.push_str(&format!("; skipped, out of rotation: {}", skipped.join(", ")));
    }
    if let Some(stopped) = stopped {
        message.push_str(&format!("; not tried further: {stopped}"));
    }
    tracing::warn!(route, attempts = attempts.len(), status = status.as_u16(), %message, "no target answered");
    let detail: Vec<Value> = attempts
        .iter()
        .map(|a| json!({"target": a.target, "class": a.class().map(FailureClass::as_str), "status": a.status(), "message": a.message()}))
        .collect();
    let extra = json!({"attempts": detail, "skipped": skipped, "stopped": stopped});
    let mut response = D::error(status, &message, code, None, extra);
    set_header(&mut response, "x-backstop-attempts", &attempts.len().to_string());
    if let Some(wait) = retry_after {
        set_header(&mut response, "retry-after", &wait.as_secs_f64().ceil().max(1.0).to_string());
        set_header(&mut response, "retry-after-ms", &wait.as_millis().max(1).to_string());
    }
    let worth = app_should_retry(status, retry_after);
    set_header(&mut response, "x-should-retry", if worth { "true" } else { "false" });
    response
}

/// The longest `Retry-After` worth an app's own retry: the OpenAI SDKs wait out at most 60 s.
const APP_RETRY_WAIT: Duration = Duration::from_secs(60);

/// Whether the app's SDK should retry an exhausted chain itself (the OpenAI and Anthropic SDKs
/// obey `x-should-retry`, and by default retry 429s and 5xx twice, each time down the whole
/// chain). Only when every target was rate limited and the soonest asked to be retried within
/// a minute: by then one of them has recovered, and its breaker lets the retry through. A
/// chain walked to its end with retries and fall-throughs already spent would fail the same
/// way, only multiplying the load on an outage.
fn app_should_retry(status: StatusCode, retry_after: Option<Duration>) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS && retry_after.is_some_and(|wait| wait <= APP_RETRY_WAIT)
}

fn set_header(response: &mut Response<Body>, name: &'static str, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        response.headers_mut().insert(name, value);
    }
}
