//! The admin listener: probes (`/healthz`, `/readyz`), target health, pass-through and the
//! link to the operator (`/health`), the active policy with every key redacted (`/config`),
//! and metrics (`/metrics`).

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use opentelemetry::KeyValue;
use serde_json::{Value, json};

use super::passthrough::Passthrough;
use crate::health::breaker::OpenCause;
use crate::health::{BudgetView, OutBecause, TargetView};
use crate::net::body::{Body, json_response, text_response};
use crate::policy::TargetState;
use crate::snapshot::PolicyStore;
use crate::telemetry::Metrics;
use crate::telemetry::otlp::Exports;

/// Registers the gauges that show the sidecar's link to the operator and whether it passes
/// calls through.
pub fn instruments(metrics: &Metrics, store: &std::sync::Arc<PolicyStore>) {
    metrics.runtime_tasks();
    let meter = metrics.meter("backstop");
    let link = store.clone();
    meter
        .u64_observable_gauge("backstop.control_plane.connected")
        .with_description("1 while the config stream to the operator is up (absent without an operator)")
        .with_callback(move |gauge| {
            if let Some(status) = link.link() {
                gauge.observe(u64::from(status.connected), &[]);
            }
        })
        .build();
    let link = store.clone();
    meter
        .u64_observable_gauge("backstop.control_plane.untrusted")
        .with_description(
            "1 while the operator's certificate does not verify against the CA this pod was given: the sidecar keeps its last configuration",
        )
        .with_callback(move |gauge| {
            if let Some(status) = link.link() {
                gauge.observe(u64::from(status.untrusted), &[]);
            }
        })
        .build();
    let passing = store.clone();
    meter
        .u64_observable_gauge("backstop.passthrough.active")
        .with_description("1 while no policy applies and calls go where the app would have sent them")
        .with_callback(move |gauge| {
            gauge.observe(u64::from(passing.passthrough_reason().is_some()), &[KeyValue::new("mode", "sidecar")]);
        })
        .build();
}

/// Answers one admin request from the store's current state.
pub fn handle(
    store: &PolicyStore,
    passthrough: &Passthrough,
    metrics: &Metrics,
    request: &Request<Incoming>,
) -> Response<Body> {
    if request.method() != Method::GET {
        return text_response(StatusCode::METHOD_NOT_ALLOWED, "only GET is served here\n");
    }
    match request.uri().path() {
        "/healthz" => text_response(StatusCode::OK, "ok\n"),
        "/readyz" => match store.readiness() {
            Ok(ready) => text_response(StatusCode::OK, &format!("ready: {ready}\n")),
            Err(why) => text_response(StatusCode::SERVICE_UNAVAILABLE, &format!("not ready: {why}\n")),
        },
        "/config" => match store.load() {
            Some(snapshot) => json_response(
                StatusCode::OK,
                &json!({"source": snapshot.source, "version": snapshot.version, "digest": snapshot.digest,
                        "policies": snapshot.redacted()}),
            ),
            None => json_response(StatusCode::SERVICE_UNAVAILABLE, &json!({"error": store.unavailable()})),
        },
        "/health" => {
            let (targets, budgets) = store.health().view(tokio::time::Instant::now());
            let mut health = json!({
                "targets": targets.iter().map(target_json).collect::<Vec<_>>(),
                "retryBudgets": budgets.iter().map(budget_json).collect::<Vec<_>>(),
            });
            let destinations = passthrough.destinations();
            health["passthrough"] = json!({
                "active": store.passthrough_reason().is_some(),
                "reason": store.passthrough_reason(),
                "openai": destinations.openai.to_string(),
                "anthropic": destinations.anthropic.to_string(),
            });
            if let Some(link) = store.link() {
                health["controlPlane"] = json!(link);
            }
            health["telemetry"] = telemetry_json(&metrics.exports());
            json_response(StatusCode::OK, &health)
        }
        "/metrics" => text_response(StatusCode::OK, &metrics.prometheus_text()),
        _ => text_response(StatusCode::NOT_FOUND, "not found; try /healthz, /readyz, /health, /config or /metrics\n"),
    }
}

/// Each exported signal's state as `/health` shows it: whether its last export failed and how
/// much it dropped (a signal not exported is left out).
fn telemetry_json(exports: &Exports) -> Value {
    let signals =
        exports.each().into_iter().filter(|s| s.on()).map(|signal| {
            (signal.name().to_string(), json!({"failing": signal.failing(), "dropped": signal.dropped()}))
        });
    json!({"otlp": signals.collect::<serde_json::Map<_, _>>()})
}

/// A target's state as `/health` names it.
fn state_name(state: TargetState) -> &'static str {
    match state {
        TargetState::Closed => "closed",
        TargetState::Open => "open",
        TargetState::HalfOpen => "halfOpen",
        TargetState::ForcedOpen => "forcedOpen",
        TargetState::ForcedClosed => "forcedClosed",
        TargetState::SpendLimit => "spendLimit",
    }
}

/// Why a target is out, in `/health`'s words.
fn out_because(why: &OutBecause) -> String {
    match why {
        OutBecause::Breaker(OpenCause::Failures) => "failures crossed the breaker's threshold".to_string(),
        OutBecause::Breaker(OpenCause::FailedProbe) => "a probe failed after it was open".to_string(),
        OutBecause::Breaker(OpenCause::RetryAfter(wait)) => {
            format!("the provider asked to wait {}s (Retry-After)", wait.as_secs_f64().ceil())
        }
        OutBecause::Override(reason) => format!("override: {reason}"),
        OutBecause::Fleet { reason, probe: None } => format!("fleet: {reason}"),
        OutBecause::Fleet { reason, probe: Some(probe) } => {
            format!("fleet: {reason}; {}", if *probe { "this pod probes it" } else { "other pods probe it" })
        }
    }
}

/// One target's health as `/health` shows it.
pub fn target_json(view: &TargetView) -> Value {
    let failures: serde_json::Map<String, Value> =
        view.failures.iter().map(|(class, n)| (class.as_str().to_string(), json!(n))).collect();
    let mut json = json!({
        "target": view.target,
        "state": state_name(view.state),
        "retryInMs": view.retry_in.map(|d| d.as_millis() as u64),
        "openedBecause": view.out_because.as_ref().map(out_because),
        "consecutiveFailures": view.consecutive_failures,
        "inFlight": view.in_flight,
        "latencyMs": (view.latency * 1000.0 * 10.0).round() / 10.0,
        "successes": view.successes,
        "failures": failures,
        "lastFailure": view.last_failure,
        // Out of quota per its rate-limit headers (steered away from, not open).
        "rateLimitedForMs": view.rate_limited_for.map(|d| d.as_millis() as u64).filter(|ms| *ms > 0),
    });
    // The last verification probe this pod sent it, when it sent one.
    if let (Some(verified), Some(fields)) = (&view.verified, json.as_object_mut()) {
        fields.insert("verified".into(), serde_json::to_value(verified).unwrap_or_default());
    }
    json
}

/// One route's retry budget as `/health` shows it.
fn budget_json(view: &BudgetView) -> Value {
    json!({"route": view.route, "requests": view.requests, "extraAttempts": view.extra_attempts,
           "available": view.available})
}
