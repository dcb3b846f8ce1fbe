//! The settings of a compiled policy, as plain data: retries and backoff, time limits, hedging,
//! the per-request controls a policy allows, circuit breakers and retry budgets; and how each
//! is compiled from its part of the spec, with defaults filled in.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::defaults;
use super::error::Errors;
use super::policy_duration::parse_duration;
use crate::backoff::{self, Backoff};
use crate::policy::{BreakerScope, CircuitBreakerSpec, RequestOverride, RetrySpec, RouteSpec, TimeoutsSpec};

use crate::llm::{ClassSet, FailureClass};

/// Retries of one target, and the caps on a whole request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Attempts per target, the first included (at least 1).
    pub attempts: u32,
    /// The first retry's backoff.
    pub base: Duration,
    /// The longest backoff; a `Retry-After` beyond it moves the chain on.
    pub max: Duration,
    /// Attempts per request across every target.
    pub max_request_attempts: u32,
}

impl RetryPolicy {
    /// The wait before retry number `retry` (1 for the first retry), given a `jitter` drawn
    /// uniformly from `[0, 1)`: half the exponential delay fixed, half random ("equal jitter"),
    /// so retries spread out but never come back at once.
    pub fn backoff(&self, retry: u32, jitter: f64) -> Duration {
        backoff::equal_jitter(Backoff::new(self.base, self.max).nth(retry), jitter)
    }
}

/// Time limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeouts {
    /// A non-streamed answer (see `timeouts.attempt`).
    pub attempt: Duration,
    /// Streams: attempt start to the first progress (content or thinking).
    pub first_token: Duration,
    /// Streams that have shown progress: the longest gap between two events.
    pub idle: Duration,
    /// A cap on a committed stream's length, if any.
    pub max_stream: Option<Duration>,
    /// The whole request.
    pub total: Duration,
}

/// Hedging on a slow first token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hedge {
    /// Wait this long for a first token before starting the next target too.
    pub delay: Duration,
    /// Extra targets one request may start.
    pub max_extra: u32,
}

/// Which per-request headers the policy honours.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllowedOverrides {
    /// `x-backstop-no-fallback`.
    pub no_fallback: bool,
    /// `x-backstop-max-attempts`.
    pub max_attempts: bool,
    /// `x-backstop-deadline`.
    pub deadline: bool,
    /// `x-backstop-drill`.
    #[serde(default)]
    pub drill: bool,
}

/// A target's prices, in US dollars per million tokens.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Price {
    /// Input tokens.
    pub input: f64,
    /// Output tokens.
    pub output: f64,
    /// Cached input tokens; `input` when `None`.
    pub cached_input: Option<f64>,
    /// Input tokens written to the prompt cache; [`CACHE_WRITE_MARKUP`] × `input` when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write: Option<f64>,
}

/// A cap on what one target may cost the fleet per window, compiled from `spendLimit`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SpendLimit {
    /// What the target's spend is counted under, fleet-wide: its policy, provider and model
    /// (every key of the provider counts toward one limit).
    pub key: String,
    /// US dollars per window.
    pub usd: f64,
    /// The window, aligned to the Unix epoch.
    pub per: Duration,
}

/// How a target is verified, compiled from `verify`: one small real request every `every`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verify {
    /// How often.
    pub every: Duration,
    /// The probe's one user message.
    pub prompt: String,
    /// The most tokens its answer may have.
    pub max_tokens: u32,
    /// How long it may take.
    pub timeout: Duration,
}

impl Default for Verify {
    fn default() -> Verify {
        Verify {
            every: super::defaults::VERIFY_EVERY,
            prompt: super::defaults::VERIFY_PROMPT.to_string(),
            max_tokens: super::defaults::VERIFY_MAX_TOKENS,
            timeout: super::defaults::VERIFY_TIMEOUT,
        }
    }
}

/// What writing a token to a prompt cache costs against reading it as input, when the policy
/// names no `cacheWrite` price: Anthropic's markup for its 5-minute cache (the only provider
/// that reports cache writes).
pub const CACHE_WRITE_MARKUP: f64 = 1.25;

/// Breaker settings, compiled from `spec.circuitBreaker`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakerSettings {
    /// Consecutive counted failures that open it (0: never on this rule).
    pub consecutive_failures: u32,
    /// The failure-rate rule, if enabled.
    pub failure_rate: Option<FailureRate>,
    /// The first open period.
    pub open_for: Duration,
    /// The longest open period, however often it reopens.
    pub max_open_for: Duration,
    /// Probes let through at once while half-open.
    pub half_open_probes: u32,
    /// Failure classes that count against the target.
    pub counts: ClassSet,
    /// Whether the fleet's evidence opens it too, or the pod's only.
    pub scope: BreakerScope,
}

/// Opens when `percent` of the requests in the last `window` failed, once there were at least
/// `min_requests`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureRate {
    /// Failure share that opens the breaker, 1 to 100.
    pub percent: u32,
    /// How far back the window reaches.
    pub window: Duration,
    /// Requests the window must hold before the rule applies.
    pub min_requests: u32,
}

/// Budget settings, from `spec.retry`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetSettings {
    /// Extra attempts allowed, as a percentage of requests in the window.
    pub percent: u32,
    /// Extra attempts always allowed per second, however few requests there were.
    pub min_per_second: u32,
    /// How far back requests and extra attempts are counted.
    pub window: Duration,
}

/// The per-request controls `spec.allowRequestOverrides` lets apps send.
pub(crate) fn compile_overrides(allowed: Option<&[RequestOverride]>) -> AllowedOverrides {
    allowed.unwrap_or_default().iter().fold(AllowedOverrides::default(), |mut allowed, o| {
        match o {
            RequestOverride::NoFallback => allowed.no_fallback = true,
            RequestOverride::MaxAttempts => allowed.max_attempts = true,
            RequestOverride::Deadline => allowed.deadline = true,
            RequestOverride::Drill => allowed.drill = true,
        }
        allowed
    })
}

/// `spec.retry`'s per-target retries and per-request cap.
pub(crate) fn compile_retry(spec: Option<&RetrySpec>, errors: &mut Errors) -> RetryPolicy {
    let spec = spec.cloned().unwrap_or_default();
    let attempts = errors.number(spec.attempts, "spec.retry.attempts", 1..=10, defaults::RETRY_ATTEMPTS);
    let max_request_attempts = errors.number(
        spec.max_request_attempts,
        "spec.retry.maxRequestAttempts",
        1..=20,
        defaults::MAX_REQUEST_ATTEMPTS,
    );
    let backoff = spec.backoff.unwrap_or_default();
    let base = errors.duration(backoff.base.as_ref(), "spec.retry.backoff.base", defaults::BACKOFF_BASE);
    let max = errors.duration(backoff.max.as_ref(), "spec.retry.backoff.max", defaults::BACKOFF_MAX);
    if max < base {
        errors.push("spec.retry.backoff.max", "must not be shorter than `base`");
    }
    RetryPolicy { attempts, base, max, max_request_attempts }
}

/// `spec.retry`'s budget.
pub(crate) fn compile_budget(spec: Option<&RetrySpec>, errors: &mut Errors) -> BudgetSettings {
    let spec = spec.cloned().unwrap_or_default();
    BudgetSettings {
        percent: errors.number(spec.budget_percent, "spec.retry.budgetPercent", 0..=1000, defaults::BUDGET_PERCENT),
        min_per_second: errors.number(
            spec.min_retries_per_second,
            "spec.retry.minRetriesPerSecond",
            0..=10_000,
            defaults::MIN_RETRIES_PER_SECOND,
        ),
        window: defaults::BUDGET_WINDOW,
    }
}

/// `spec.timeouts`.
pub(crate) fn compile_timeouts(spec: Option<&TimeoutsSpec>, errors: &mut Errors) -> Timeouts {
    let spec = spec.cloned().unwrap_or_default();
    let attempt = errors.duration(spec.attempt.as_ref(), "spec.timeouts.attempt", defaults::ATTEMPT_TIMEOUT);
    let first_token =
        errors.duration(spec.first_token.as_ref(), "spec.timeouts.firstToken", defaults::FIRST_TOKEN_TIMEOUT);
    let total = errors.duration(spec.total.as_ref(), "spec.timeouts.total", defaults::TOTAL_TIMEOUT);
    let idle = errors.duration(spec.idle.as_ref(), "spec.timeouts.idle", defaults::IDLE_TIMEOUT);
    let max_stream =
        spec.max_stream.as_ref().map(|_| errors.duration(spec.max_stream.as_ref(), "spec.timeouts.maxStream", total));
    Timeouts { attempt, first_token, idle, total, max_stream }
}

/// `spec.circuitBreaker`.
pub(crate) fn compile_breaker(spec: Option<&CircuitBreakerSpec>, errors: &mut Errors) -> BreakerSettings {
    let spec = spec.cloned().unwrap_or_default();
    let path = "spec.circuitBreaker";
    let rate = spec.failure_rate.unwrap_or_default();
    let failure_rate = FailureRate {
        percent: errors.number(
            rate.percent,
            &format!("{path}.failureRate.percent"),
            1..=100,
            defaults::BREAKER_FAILURE_PERCENT,
        ),
        window: errors.duration(rate.window.as_ref(), format!("{path}.failureRate.window"), defaults::BREAKER_WINDOW),
        min_requests: errors.number(
            rate.min_requests,
            &format!("{path}.failureRate.minRequests"),
            1..=1_000_000,
            defaults::BREAKER_MIN_REQUESTS,
        ),
    };
    let open_for = errors.duration(spec.open_for.as_ref(), format!("{path}.openFor"), defaults::BREAKER_OPEN_FOR);
    let max_open_for =
        errors.duration(spec.max_open_for.as_ref(), format!("{path}.maxOpenFor"), defaults::BREAKER_MAX_OPEN_FOR);
    if max_open_for < open_for {
        errors.push(format!("{path}.maxOpenFor"), "must not be shorter than `openFor`");
    }
    let counts = match &spec.count_on {
        Some(classes) if classes.contains(&FailureClass::BadRequest) => {
            errors.push(
                format!("{path}.countOn"),
                "`badRequest` says nothing about the target and cannot count against it",
            );
            ClassSet::breaker_default()
        }
        Some(classes) => classes.iter().copied().collect(),
        None => ClassSet::breaker_default(),
    };
    BreakerSettings {
        consecutive_failures: errors.number(
            spec.consecutive_failures,
            &format!("{path}.consecutiveFailures"),
            0..=1_000_000,
            defaults::BREAKER_CONSECUTIVE_FAILURES,
        ),
        failure_rate: Some(failure_rate),
        open_for,
        max_open_for,
        half_open_probes: errors.number(
            spec.half_open_probes,
            &format!("{path}.halfOpenProbes"),
            1..=100,
            defaults::BREAKER_HALF_OPEN_PROBES,
        ),
        counts,
        scope: spec.scope.unwrap_or_default(),
    }
}

/// A route's `hedge`.
pub(crate) fn compile_hedge(route: &RouteSpec, path: &str, errors: &mut Errors) -> Option<Hedge> {
    let spec = route.hedge.as_ref()?;
    let delay = match parse_duration(&spec.after_first_token_delay) {
        Ok(delay) => delay,
        Err(problem) => {
            errors.push(format!("{path}.hedge.afterFirstTokenDelay"), problem);
            return None;
        }
    };
    let max_extra = errors.number(spec.max_extra, &format!("{path}.hedge.maxExtra"), 1..=3, defaults::HEDGE_MAX_EXTRA);
    Some(Hedge { delay, max_extra })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_bounded_jitter() {
        let retry = RetryPolicy {
            attempts: 5,
            base: Duration::from_millis(200),
            max: Duration::from_secs(2),
            max_request_attempts: 6,
        };
        assert_eq!(retry.backoff(1, 0.0), Duration::from_millis(100));
        assert_eq!(retry.backoff(1, 1.0), Duration::from_millis(200));
        assert_eq!(retry.backoff(2, 1.0), Duration::from_millis(400));
        assert_eq!(retry.backoff(3, 0.5), Duration::from_millis(600));
        assert_eq!(retry.backoff(10, 1.0), Duration::from_secs(2));
        assert_eq!(retry.backoff(1000, 1.0), Duration::from_secs(2));
    }
}
