//! Compiled, immutable routes: what a `FallbackPolicy` means at run time.
//!
//! [`PolicySnapshot::compile`] checks a spec completely, naming the field path of every
//! problem, and builds the providers, chains, retry and timeout settings the request path
//! reads. A snapshot never changes; a reload publishes a new one through [`PolicyStore`], and a
//! request keeps the snapshot it started with.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use serde_json::Value;

use crate::chat::ChatRequest;
use crate::health::breaker::{BreakerSettings, FailureRate};
use crate::health::budget::BudgetSettings;
use crate::health::{HealthRegistry, SharedBudget, TargetHealth};
use crate::policy::{
    ApiKeySource, ChainStepSpec, CircuitBreakerSpec, ClassSet, FailureClass, FallbackPolicy, FallbackPolicySpec,
    MockSpec, ProviderKind, ProviderSpec, RequestFeature, RequestOverride, RetrySpec, RouteSpec, TimeoutsSpec,
};
use crate::provider::anthropic::Anthropic;
use crate::provider::gemini::Gemini;
use crate::provider::mock::{Mock, MockBehaviour};
use crate::provider::openai::{self, OpenAi};
use crate::provider::{ApiKey, Provider};

/// Defaults for settings a policy leaves out.
pub mod defaults {
    use std::time::Duration;
    /// Attempts per target, the first included.
    pub const RETRY_ATTEMPTS: u32 = 2;
    /// The first retry's backoff.
    pub const BACKOFF_BASE: Duration = Duration::from_millis(200);
    /// The longest backoff.
    pub const BACKOFF_MAX: Duration = Duration::from_secs(2);
    /// One attempt.
    pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
    /// First streamed token.
    pub const FIRST_TOKEN_TIMEOUT: Duration = Duration::from_secs(10);
    /// The whole request.
    pub const TOTAL_TIMEOUT: Duration = Duration::from_secs(90);
    /// Extra attempts a route may add, as a percentage of its requests.
    pub const BUDGET_PERCENT: u32 = 20;
    /// Extra attempts always allowed per second.
    pub const MIN_RETRIES_PER_SECOND: u32 = 10;
    /// The retry budget's window.
    pub const BUDGET_WINDOW: Duration = Duration::from_secs(10);
    /// Attempts per request across every target.
    pub const MAX_REQUEST_ATTEMPTS: u32 = 6;
    /// Consecutive failures that open a breaker.
    pub const BREAKER_CONSECUTIVE_FAILURES: u32 = 5;
    /// Failure share that opens a breaker.
    pub const BREAKER_FAILURE_PERCENT: u32 = 50;
    /// The failure-rate window.
    pub const BREAKER_WINDOW: Duration = Duration::from_secs(30);
    /// Requests the failure-rate window needs.
    pub const BREAKER_MIN_REQUESTS: u32 = 20;
    /// The first open period.
    pub const BREAKER_OPEN_FOR: Duration = Duration::from_secs(30);
    /// The longest open period.
    pub const BREAKER_MAX_OPEN_FOR: Duration = Duration::from_secs(300);
    /// Probes at once while half-open.
    pub const BREAKER_HALF_OPEN_PROBES: u32 = 1;
    /// Extra targets a hedged request may start.
    pub const HEDGE_MAX_EXTRA: u32 = 1;
}

/// What replaces a secret wherever a policy is shown.
pub const REDACTED: &str = "<redacted>";

/// One problem in a policy, at a field path such as `spec.routes[0].chain[2].timeout`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Where in the document.
    pub path: String,
    /// What is wrong there.
    pub problem: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}`: {}", self.path, self.problem)
    }
}

/// Why a policy was rejected: every problem found, each with its field path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct InvalidPolicy {
    /// The problems, in document order.
    pub errors: Vec<FieldError>,
}

impl std::fmt::Display for InvalidPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let lines: Vec<String> = self.errors.iter().map(ToString::to_string).collect();
        write!(f, "invalid FallbackPolicy: {}", lines.join("; "))
    }
}

impl InvalidPolicy {
    /// A single problem.
    pub fn at(path: impl Into<String>, problem: impl Into<String>) -> Self {
        InvalidPolicy { errors: vec![FieldError { path: path.into(), problem: problem.into() }] }
    }
}

/// Finds the API key an `apiKey` names. The sidecar resolves `value` and `env` itself; the
/// operator resolves `secretKeyRef`.
pub trait KeyResolver {
    /// The key, or why it cannot be had.
    fn resolve(&self, source: &ApiKeySource) -> Result<ApiKey, String>;
}

/// Resolves `value` and `env` keys from the policy and this process's environment, as a
/// sidecar running from a policy file does.
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalKeys;

impl KeyResolver for LocalKeys {
    fn resolve(&self, source: &ApiKeySource) -> Result<ApiKey, String> {
        if let Some(value) = &source.value {
            return Ok(ApiKey::new(value.as_str()));
        }
        if let Some(name) = &source.env {
            return match std::env::var(name) {
                Ok(value) if !value.is_empty() => Ok(ApiKey::new(value)),
                _ => Err(format!("environment variable `{name}` is not set")),
            };
        }
        if source.secret_key_ref.is_some() {
            return Err("`secretKeyRef` is resolved by the operator; a policy file must use `value` or `env`".into());
        }
        Err("set one of `value`, `env` or `secretKeyRef`".into())
    }
}

/// Retries of one target, and the caps on a whole request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
        let exponent = retry.saturating_sub(1).min(16);
        let delay = self.base.saturating_mul(1 << exponent).min(self.max);
        let half = delay / 2;
        half + half.mul_f64(jitter.clamp(0.0, 1.0))
    }
}

/// Time limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// One attempt (see `timeouts.attempt`).
    pub attempt: Duration,
    /// Streams: attempt start to first content chunk.
    pub first_token: Duration,
    /// The whole request.
    pub total: Duration,
}

/// Hedging on a slow first token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hedge {
    /// Wait this long for a first token before starting the next target too.
    pub delay: Duration,
    /// Extra targets one request may start.
    pub max_extra: u32,
}

/// Which per-request headers the policy honours.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllowedOverrides {
    /// `x-backstop-no-fallback`.
    pub no_fallback: bool,
    /// `x-backstop-max-attempts`.
    pub max_attempts: bool,
    /// `x-backstop-deadline`.
    pub deadline: bool,
}

/// One provider + model (+ key) a chain can send to.
#[derive(Debug)]
pub struct Target {
    /// The provider.
    pub provider: Arc<Provider>,
    /// The model name sent to it.
    pub model: String,
    /// Which of the provider's keys to use.
    pub key: usize,
    /// This target's attempt time limit.
    pub attempt_timeout: Duration,
    /// Relative share within its step.
    pub weight: u32,
    /// `provider/model` (with `#n` for the n-th key when there are several), as shown in
    /// headers, logs and errors.
    pub label: String,
    /// What the sidecar knows of its health; shared across reloads.
    pub health: Arc<TargetHealth>,
    /// Requests the policy keeps away from this target (`skipFor`).
    pub skip_for: Vec<RequestFeature>,
}

impl Target {
    /// Why the policy keeps `request` away from this target, if it does.
    pub fn skip_for(&self, request: &ChatRequest) -> Option<String> {
        self.skip_for
            .iter()
            .find(|feature| request.uses(**feature))
            .map(|feature| format!("`skipFor` excludes requests with {}", feature.as_str()))
    }
}

/// One step of a chain: one target, or several equivalent ones balanced by weight, latency
/// and load (a group, or one target whose provider has several keys).
#[derive(Debug)]
pub struct Step {
    /// The step's targets.
    pub members: Vec<Arc<Target>>,
}

/// A compiled route: the chain for one model alias, with the settings that govern it.
#[derive(Debug)]
pub struct Route {
    /// The alias (`*` for the catch-all).
    pub alias: String,
    /// The steps, in order.
    pub steps: Vec<Step>,
    /// The chain to switch to on `contextWindowExceeded` (may be empty).
    pub on_context_window_exceeded: Vec<Step>,
    /// The chain to switch to on `contentFiltered` (may be empty).
    pub on_content_filtered: Vec<Step>,
    /// Classes that fall through to the next step.
    pub fallback_on: ClassSet,
    /// Retries per target and the per-request cap.
    pub retry: RetryPolicy,
    /// Time limits.
    pub timeouts: Timeouts,
    /// Hedging, if enabled.
    pub hedge: Option<Hedge>,
    /// The route's retry budget; shared across reloads.
    pub budget: Arc<SharedBudget>,
    /// Per-request headers the policy honours.
    pub overrides: AllowedOverrides,
}

/// An immutable, compiled policy.
#[derive(Debug)]
pub struct PolicySnapshot {
    /// `namespace/name` of the policy it came from.
    pub source: String,
    /// Set by the [`PolicyStore`] when published; increases with every reload.
    pub version: u64,
    routes: HashMap<String, Arc<Route>>,
    catch_all: Option<Arc<Route>>,
    aliases: Vec<String>,
    redacted: Value,
}

impl PolicySnapshot {
    /// Compiles a policy, collecting every problem with its field path. Targets take their
    /// health state from `health`, which keeps it across reloads; new settings are applied to
    /// that state only once the whole policy is valid.
    pub fn compile(
        policy: &FallbackPolicy,
        keys: &dyn KeyResolver,
        health: &HealthRegistry,
    ) -> Result<PolicySnapshot, InvalidPolicy> {
        let mut errors = Errors::default();
        let spec = &policy.spec;
        let providers = compile_providers(spec, keys, &mut errors);
        let fallback_on = spec
            .fallback_on
            .as_ref()
            .map_or_else(ClassSet::default_fallback, |classes| classes.iter().copied().collect());
        let retry = compile_retry(spec.retry.as_ref(), &mut errors);
        let budget = compile_budget(spec.retry.as_ref(), &mut errors);
        let timeouts = compile_timeouts(spec.timeouts.as_ref(), &mut errors);
        let breaker = compile_breaker(spec.circuit_breaker.as_ref(), &mut errors);
        let overrides =
            spec.allow_request_overrides.iter().flatten().fold(AllowedOverrides::default(), |mut allowed, o| {
                match o {
                    RequestOverride::NoFallback => allowed.no_fallback = true,
                    RequestOverride::MaxAttempts => allowed.max_attempts = true,
                    RequestOverride::Deadline => allowed.deadline = true,
                }
                allowed
            });
        let mut compiler = Compiler {
            providers: &providers,
            default_timeout: timeouts.attempt,
            breaker: &breaker,
            health,
            targets: Vec::new(),
            errors,
        };

        let mut routes = HashMap::new();
        let mut catch_all = None;
        let mut aliases = Vec::new();
        let mut budgets = Vec::new();
        if spec.routes.is_empty() {
            compiler.errors.push("spec.routes", "must name at least one route");
        }
        for (r, route) in spec.routes.iter().enumerate() {
            let path = format!("spec.routes[{r}]");
            if route.model.is_empty() {
                compiler.errors.push(format!("{path}.model"), "must not be empty");
            } else if route.model != "*" && routes.contains_key(&route.model)
                || route.model == "*" && catch_all.is_some()
            {
                compiler.errors.push(format!("{path}.model"), format!("`{}` is routed twice", route.model));
            }
            if route.chain.is_empty() {
                compiler.errors.push(format!("{path}.chain"), "must have at least one step");
            }
            let steps = compiler.chain(&route.chain, &format!("{path}.chain"));
            let on_context_window_exceeded = compiler.chain(
                route.on_context_window_exceeded.as_deref().unwrap_or_default(),
                &format!("{path}.onContextWindowExceeded"),
            );
            let on_content_filtered = compiler
                .chain(route.on_content_filtered.as_deref().unwrap_or_default(), &format!("{path}.onContentFiltered"));
            let hedge = compile_hedge(route, &path, &mut compiler.errors);
            let shared_budget = health.budget(&route.model, budget);
            budgets.push((shared_budget.clone(), budget));
            let compiled = Arc::new(Route {
                alias: route.model.clone(),
                steps,
                on_context_window_exceeded,
                on_content_filtered,
                fallback_on,
                retry,
                timeouts,
                hedge,
                budget: shared_budget,
                overrides,
            });
            if route.model == "*" {
                catch_all = Some(compiled);
            } else {
                aliases.push(route.model.clone());
                routes.insert(route.model.clone(), compiled);
            }
        }
        let Compiler { targets, errors, .. } = compiler;
        errors.finish()?;
        health.apply(&targets, &breaker, &budgets);
        health.prune();
        Ok(PolicySnapshot {
            source: format!(
                "{}/{}",
                policy.metadata.namespace.as_deref().unwrap_or("default"),
                policy.metadata.name.as_deref().unwrap_or("unnamed")
            ),
            version: 0,
            routes,
            catch_all,
            aliases,
            redacted: redact(policy),
        })
    }

    /// The route for a requested model alias.
    pub fn route(&self, model: &str) -> Option<&Arc<Route>> {
        self.routes.get(model).or(self.catch_all.as_ref())
    }

    /// The aliases apps may ask for, in policy order (the catch-all excluded).
    pub fn aliases(&self) -> &[String] {
        &self.aliases
    }

    /// The policy document with every secret value replaced, for `/config`.
    pub fn redacted(&self) -> &Value {
        &self.redacted
    }
}

#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn push(&mut self, path: impl Into<String>, problem: impl Into<String>) {
        self.0.push(FieldError { path: path.into(), problem: problem.into() });
    }

    fn finish(self) -> Result<(), InvalidPolicy> {
        if self.0.is_empty() { Ok(()) } else { Err(InvalidPolicy { errors: self.0 }) }
    }
}

/// Parses a duration such as `250ms`, `30s`, `1m30s` or `2h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    if trimmed.starts_with('-') {
        return Err(format!("`{text}` is negative; durations must be greater than zero"));
    }
    let duration = humantime::parse_duration(trimmed)
        .map_err(|_| format!("`{text}` is not a duration (write it like `500ms`, `30s` or `1m30s`)"))?;
    if duration.is_zero() {
        return Err("must be greater than zero".to_string());
    }
    if duration > Duration::from_secs(86_400) {
        return Err(format!("`{text}` is longer than the 24h maximum"));
    }
    Ok(duration)
}

fn duration_field(value: Option<&String>, path: String, default: Duration, errors: &mut Errors) -> Duration {
    match value.map(|v| parse_duration(v)) {
        None => default,
        Some(Ok(duration)) => duration,
        Some(Err(problem)) => {
            errors.push(path, problem);
            default
        }
    }
}

fn number_field(
    value: Option<u32>,
    path: &str,
    range: std::ops::RangeInclusive<u32>,
    default: u32,
    errors: &mut Errors,
) -> u32 {
    match value {
        Some(n) if !range.contains(&n) => {
            errors.push(path, format!("{n} is not between {} and {}", range.start(), range.end()));
            default
        }
        Some(n) => n,
        None => default,
    }
}

fn compile_providers(
    spec: &FallbackPolicySpec,
    keys: &dyn KeyResolver,
    errors: &mut Errors,
) -> BTreeMap<String, Arc<Provider>> {
    let mut providers = BTreeMap::new();
    if spec.providers.is_empty() {
        errors.push("spec.providers", "must name at least one provider");
    }
    for (i, provider) in spec.providers.iter().enumerate() {
        let path = format!("spec.providers[{i}]");
        if provider.name.is_empty() || provider.name.contains(['/', '#', '=', ',']) {
            errors.push(format!("{path}.name"), "must be non-empty and contain none of `/`, `#`, `=`, `,`");
            continue;
        }
        if providers.contains_key(&provider.name) {
            errors.push(format!("{path}.name"), format!("`{}` is defined twice", provider.name));
            continue;
        }
        if let Some(built) = compile_provider(provider, &path, keys, errors) {
            providers.insert(provider.name.clone(), Arc::new(built));
        }
    }
    providers
}

fn resolve_key(source: &ApiKeySource, path: &str, keys: &dyn KeyResolver, errors: &mut Errors) -> Option<ApiKey> {
    let set = [source.value.is_some(), source.env.is_some(), source.secret_key_ref.is_some()];
    if set.iter().filter(|s| **s).count() != 1 {
        errors.push(path, "set exactly one of `value`, `env` or `secretKeyRef`");
        return None;
    }
    match keys.resolve(source) {
        Ok(key) => Some(key),
        Err(problem) => {
            errors.push(path, problem);
            None
        }
    }
}

fn compile_provider(spec: &ProviderSpec, path: &str, keys: &dyn KeyResolver, errors: &mut Errors) -> Option<Provider> {
    let api_keys: Vec<ApiKey> = match (&spec.api_key, &spec.api_keys) {
        (Some(_), Some(_)) => {
            errors.push(format!("{path}.apiKeys"), "set either `apiKey` or `apiKeys`, not both");
            return None;
        }
        (Some(source), None) => resolve_key(source, &format!("{path}.apiKey"), keys, errors).into_iter().collect(),
        (None, Some(sources)) => {
            if sources.is_empty() {
                errors.push(format!("{path}.apiKeys"), "must list at least one key");
            }
            sources
                .iter()
                .enumerate()
                .filter_map(|(k, source)| resolve_key(source, &format!("{path}.apiKeys[{k}]"), keys, errors))
                .collect()
        }
        (None, None) => Vec::new(),
    };
    if spec.mock.is_some() && spec.kind != ProviderKind::Mock {
        errors.push(format!("{path}.mock"), "only valid with `type: mock`");
    }
    if spec.api_version.is_some() && !matches!(spec.kind, ProviderKind::Anthropic | ProviderKind::AzureOpenAi) {
        errors.push(format!("{path}.apiVersion"), "only valid with `type: anthropic` or `type: azure-openai`");
    }
    match spec.default_max_tokens {
        Some(_) if spec.kind != ProviderKind::Anthropic => {
            errors.push(format!("{path}.defaultMaxTokens"), "only valid with `type: anthropic`");
        }
        Some(0) => errors.push(format!("{path}.defaultMaxTokens"), "must be at least 1"),
        _ => {}
    }
    match spec.kind {
        ProviderKind::Mock => {
            if spec.base_url.is_some() {
                errors.push(format!("{path}.baseUrl"), "a `mock` provider has no URL");
            }
            let behaviour = compile_mock(spec.mock.as_ref(), &format!("{path}.mock"), errors);
            Some(Provider::mock(spec.name.clone(), Mock::new(behaviour)))
        }
        ProviderKind::Anthropic => {
            let base_url = spec.base_url.as_deref().unwrap_or(crate::provider::anthropic::DEFAULT_BASE_URL);
            match Anthropic::new(base_url, api_keys, spec.api_version.as_deref(), spec.default_max_tokens) {
                Ok(upstream) => Some(Provider::anthropic(spec.name.clone(), upstream)),
                Err(problem) => {
                    let field = if problem.contains("API key") {
                        "apiKey"
                    } else if problem.contains("apiVersion") {
                        "apiVersion"
                    } else {
                        "baseUrl"
                    };
                    errors.push(format!("{path}.{field}"), problem);
                    None
                }
            }
        }
        ProviderKind::Gemini => {
            let base_url = spec.base_url.as_deref().unwrap_or(crate::provider::gemini::DEFAULT_BASE_URL);
            match Gemini::new(base_url, api_keys) {
                Ok(upstream) => Some(Provider::gemini(spec.name.clone(), upstream)),
                Err(problem) => {
                    let field = if problem.contains("API key") { "apiKey" } else { "baseUrl" };
                    errors.push(format!("{path}.{field}"), problem);
                    None
                }
            }
        }
        ProviderKind::AzureOpenAi => {
            let Some(base_url) = spec.base_url.as_deref() else {
                errors.push(
                    format!("{path}.baseUrl"),
                    "is required for `azure-openai` (https://RESOURCE.openai.azure.com)",
                );
                return None;
            };
            match OpenAi::azure(base_url, api_keys, spec.api_version.as_deref()) {
                Ok(upstream) => Some(Provider::openai(spec.name.clone(), upstream)),
                Err(problem) => {
                    let field = if problem.contains("API key") { "apiKey" } else { "baseUrl" };
                    errors.push(format!("{path}.{field}"), problem);
                    None
                }
            }
        }
        kind @ (ProviderKind::OpenAi | ProviderKind::OpenAiCompatible) => {
            let base_url = match (&spec.base_url, kind) {
                (Some(url), _) => url.as_str(),
                (None, ProviderKind::OpenAi) => openai::DEFAULT_BASE_URL,
                (None, _) => {
                    errors.push(format!("{path}.baseUrl"), "is required for `openai-compatible`");
                    return None;
                }
            };
            match OpenAi::new(kind, base_url, api_keys) {
                Ok(upstream) => Some(Provider::openai(spec.name.clone(), upstream)),
                Err(problem) => {
                    let field = if problem.contains("API key") { "apiKey" } else { "baseUrl" };
                    errors.push(format!("{path}.{field}"), problem);
                    None
                }
            }
        }
    }
}

fn compile_mock(spec: Option<&MockSpec>, path: &str, errors: &mut Errors) -> MockBehaviour {
    let mut behaviour = MockBehaviour::default();
    let Some(spec) = spec else { return behaviour };
    if let Some(reply) = &spec.reply {
        behaviour.reply = reply.clone();
    }
    behaviour.latency = duration_field(spec.latency.as_ref(), format!("{path}.latency"), Duration::ZERO, errors);
    behaviour.first_token_latency =
        duration_field(spec.first_token_latency.as_ref(), format!("{path}.firstTokenLatency"), Duration::ZERO, errors);
    match spec.chunks {
        Some(0) => errors.push(format!("{path}.chunks"), "must be at least 1"),
        Some(chunks) => behaviour.chunks = chunks,
        None => {}
    }
    match spec.failure_rate {
        Some(rate) if !(0.0..=1.0).contains(&rate) => {
            errors.push(format!("{path}.failureRate"), format!("{rate} is not between 0 and 1"));
        }
        Some(rate) => behaviour.failure_rate = rate,
        None => {}
    }
    match spec.failure_status {
        Some(status) if !(400..=599).contains(&status) => {
            errors.push(format!("{path}.failureStatus"), format!("{status} is not an HTTP error status (400-599)"));
        }
        Some(status) => behaviour.failure_status = status,
        None => {}
    }
    behaviour.retry_after = spec.retry_after;
    behaviour.seed = spec.seed;
    behaviour
}

fn compile_retry(spec: Option<&RetrySpec>, errors: &mut Errors) -> RetryPolicy {
    let spec = spec.cloned().unwrap_or_default();
    let attempts = number_field(spec.attempts, "spec.retry.attempts", 1..=10, defaults::RETRY_ATTEMPTS, errors);
    let max_request_attempts = number_field(
        spec.max_request_attempts,
        "spec.retry.maxRequestAttempts",
        1..=20,
        defaults::MAX_REQUEST_ATTEMPTS,
        errors,
    );
    let backoff = spec.backoff.unwrap_or_default();
    let base = duration_field(backoff.base.as_ref(), "spec.retry.backoff.base".into(), defaults::BACKOFF_BASE, errors);
    let max = duration_field(backoff.max.as_ref(), "spec.retry.backoff.max".into(), defaults::BACKOFF_MAX, errors);
    if max < base {
        errors.push("spec.retry.backoff.max", "must not be shorter than `base`");
    }
    RetryPolicy { attempts, base, max, max_request_attempts }
}

fn compile_budget(spec: Option<&RetrySpec>, errors: &mut Errors) -> BudgetSettings {
    let spec = spec.cloned().unwrap_or_default();
    BudgetSettings {
        percent: number_field(
            spec.budget_percent,
            "spec.retry.budgetPercent",
            0..=1000,
            defaults::BUDGET_PERCENT,
            errors,
        ),
        min_per_second: number_field(
            spec.min_retries_per_second,
            "spec.retry.minRetriesPerSecond",
            0..=10_000,
            defaults::MIN_RETRIES_PER_SECOND,
            errors,
        ),
        window: defaults::BUDGET_WINDOW,
    }
}

fn compile_timeouts(spec: Option<&TimeoutsSpec>, errors: &mut Errors) -> Timeouts {
    let spec = spec.cloned().unwrap_or_default();
    let attempt =
        duration_field(spec.attempt.as_ref(), "spec.timeouts.attempt".into(), defaults::ATTEMPT_TIMEOUT, errors);
    let first_token = duration_field(
        spec.first_token.as_ref(),
        "spec.timeouts.firstToken".into(),
        defaults::FIRST_TOKEN_TIMEOUT,
        errors,
    );
    let total = duration_field(spec.total.as_ref(), "spec.timeouts.total".into(), defaults::TOTAL_TIMEOUT, errors);
    Timeouts { attempt, first_token, total }
}

fn compile_breaker(spec: Option<&CircuitBreakerSpec>, errors: &mut Errors) -> BreakerSettings {
    let spec = spec.cloned().unwrap_or_default();
    let path = "spec.circuitBreaker";
    let rate = spec.failure_rate.unwrap_or_default();
    let failure_rate = FailureRate {
        percent: number_field(
            rate.percent,
            &format!("{path}.failureRate.percent"),
            1..=100,
            defaults::BREAKER_FAILURE_PERCENT,
            errors,
        ),
        window: duration_field(
            rate.window.as_ref(),
            format!("{path}.failureRate.window"),
            defaults::BREAKER_WINDOW,
            errors,
        ),
        min_requests: number_field(
            rate.min_requests,
            &format!("{path}.failureRate.minRequests"),
            1..=1_000_000,
            defaults::BREAKER_MIN_REQUESTS,
            errors,
        ),
    };
    let open_for =
        duration_field(spec.open_for.as_ref(), format!("{path}.openFor"), defaults::BREAKER_OPEN_FOR, errors);
    let max_open_for = duration_field(
        spec.max_open_for.as_ref(),
        format!("{path}.maxOpenFor"),
        defaults::BREAKER_MAX_OPEN_FOR,
        errors,
    );
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
        consecutive_failures: number_field(
            spec.consecutive_failures,
            &format!("{path}.consecutiveFailures"),
            0..=1_000_000,
            defaults::BREAKER_CONSECUTIVE_FAILURES,
            errors,
        ),
        failure_rate: Some(failure_rate),
        open_for,
        max_open_for,
        half_open_probes: number_field(
            spec.half_open_probes,
            &format!("{path}.halfOpenProbes"),
            1..=100,
            defaults::BREAKER_HALF_OPEN_PROBES,
            errors,
        ),
        counts,
    }
}

fn compile_hedge(route: &RouteSpec, path: &str, errors: &mut Errors) -> Option<Hedge> {
    let spec = route.hedge.as_ref()?;
    let delay = match parse_duration(&spec.after_first_token_delay) {
        Ok(delay) => delay,
        Err(problem) => {
            errors.push(format!("{path}.hedge.afterFirstTokenDelay"), problem);
            return None;
        }
    };
    let max_extra =
        number_field(spec.max_extra, &format!("{path}.hedge.maxExtra"), 1..=3, defaults::HEDGE_MAX_EXTRA, errors);
    Some(Hedge { delay, max_extra })
}

/// What compiling chains needs at hand.
struct Compiler<'a> {
    providers: &'a BTreeMap<String, Arc<Provider>>,
    default_timeout: Duration,
    breaker: &'a BreakerSettings,
    health: &'a HealthRegistry,
    targets: Vec<Arc<TargetHealth>>,
    errors: Errors,
}

impl Compiler<'_> {
    fn chain(&mut self, steps: &[ChainStepSpec], path: &str) -> Vec<Step> {
        steps.iter().enumerate().filter_map(|(s, step)| self.step(step, &format!("{path}[{s}]"))).collect()
    }

    fn step(&mut self, spec: &ChainStepSpec, path: &str) -> Option<Step> {
        let members: Vec<Arc<Target>> = match (&spec.group, &spec.provider, &spec.model) {
            (Some(group), None, None) => {
                if group.is_empty() {
                    self.errors.push(format!("{path}.group"), "must have at least one member");
                }
                if spec.timeout.is_some() {
                    self.errors.push(format!("{path}.timeout"), "set `timeout` on each group member instead");
                }
                let mut seen = HashSet::new();
                let mut members = Vec::new();
                for (m, member) in group.iter().enumerate() {
                    let member_path = format!("{path}.group[{m}]");
                    let weight =
                        number_field(member.weight, &format!("{member_path}.weight"), 1..=1000, 1, &mut self.errors);
                    if !seen.insert((&member.provider, &member.model)) {
                        self.errors.push(member_path.clone(), "the same provider and model appear twice in this group");
                    }
                    members.extend(self.targets(
                        &member.provider,
                        &member.model,
                        member.timeout.as_ref(),
                        weight,
                        member.skip_for.as_deref(),
                        &member_path,
                    ));
                }
                members
            }
            (Some(_), _, _) => {
                self.errors.push(path, "set either `group` or `provider` and `model`, not both");
                return None;
            }
            (None, Some(provider), Some(model)) => {
                self.targets(provider, model, spec.timeout.as_ref(), 1, spec.skip_for.as_deref(), path)
            }
            (None, None, Some(_)) => {
                self.errors.push(format!("{path}.provider"), "is required (or use `group`)");
                return None;
            }
            (None, _, None) => {
                self.errors.push(format!("{path}.model"), "is required (or use `group`)");
                return None;
            }
        };
        (!members.is_empty()).then_some(Step { members })
    }

    /// The targets for one provider + model: one per API key of the provider.
    fn targets(
        &mut self,
        provider: &str,
        model: &str,
        timeout: Option<&String>,
        weight: u32,
        skip_for: Option<&[RequestFeature]>,
        path: &str,
    ) -> Vec<Arc<Target>> {
        let attempt_timeout =
            duration_field(timeout, format!("{path}.timeout"), self.default_timeout, &mut self.errors);
        if model.is_empty() {
            self.errors.push(format!("{path}.model"), "must not be empty");
        }
        let Some(found) = self.providers.get(provider) else {
            self.errors.push(format!("{path}.provider"), format!("`{provider}` is not defined in `spec.providers`"));
            return Vec::new();
        };
        let keys = found.key_count();
        (0..keys)
            .map(|key| {
                let mut label = format!("{provider}/{model}");
                if keys > 1 {
                    let _ = write!(label, "#{}", key + 1);
                }
                let identity = format!("{}\u{1f}{model}\u{1f}{}", found.name, found.endpoint_id(key));
                let health = self.health.target(&identity, &label, self.breaker);
                self.targets.push(health.clone());
                Arc::new(Target {
                    provider: found.clone(),
                    model: model.to_string(),
                    key,
                    attempt_timeout,
                    weight,
                    label,
                    health,
                    skip_for: skip_for.unwrap_or_default().to_vec(),
                })
            })
            .collect()
    }
}

/// The policy as a JSON document with every `apiKey.value` replaced by [`REDACTED`].
fn redact(policy: &FallbackPolicy) -> Value {
    let mut copy = policy.clone();
    copy.metadata.managed_fields = None;
    for provider in &mut copy.spec.providers {
        for key in provider.api_key.iter_mut().chain(provider.api_keys.iter_mut().flatten()) {
            if key.value.is_some() {
                key.value = Some(REDACTED.to_string());
            }
        }
    }
    serde_json::to_value(&copy).unwrap_or(Value::Null)
}

/// Where the active snapshot lives, beside the health state that snapshots share. Readers take
/// the snapshot with one atomic load and keep it for the whole request; a publish never waits
/// for them.
#[derive(Debug, Default)]
pub struct PolicyStore {
    current: ArcSwapOption<PolicySnapshot>,
    versions: AtomicU64,
    health: HealthRegistry,
}

impl PolicyStore {
    /// An empty store: nothing is served until a policy is published.
    pub fn new() -> Self {
        PolicyStore::default()
    }

    /// The active snapshot, if a valid policy has been published.
    pub fn load(&self) -> Option<Arc<PolicySnapshot>> {
        self.current.load_full()
    }

    /// The health state of every target and route; compile snapshots against it.
    pub fn health(&self) -> &HealthRegistry {
        &self.health
    }

    /// Makes `snapshot` the active one and returns its version.
    pub fn publish(&self, mut snapshot: PolicySnapshot) -> u64 {
        let version = self.versions.fetch_add(1, Ordering::Relaxed) + 1;
        snapshot.version = version;
        self.current.store(Some(Arc::new(snapshot)));
        version
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::FallbackPolicy;

    fn parse(yaml: &str) -> FallbackPolicy {
        serde_yaml_ng::from_str(yaml).expect("test policy parses")
    }

    fn compile(yaml: &str) -> Result<PolicySnapshot, InvalidPolicy> {
        PolicySnapshot::compile(&parse(yaml), &LocalKeys, &HealthRegistry::new())
    }

    const GOOD: &str = r#"
apiVersion: backstop.dev/v1alpha1
kind: FallbackPolicy
metadata: {name: demo, namespace: shop}
spec:
  providers:
    - {name: primary, type: openai, apiKey: {value: sk-secret-123}}
    - {name: local, type: openai-compatible, baseUrl: "http://127.0.0.1:8000/v1"}
    - {name: fake, type: mock, mock: {reply: hi, latency: 10ms}}
  routes:
    - model: chat
      chain:
        - {provider: primary, model: gpt-4o, timeout: 20s}
        - group:
            - {provider: local, model: llama, weight: 3}
            - {provider: fake, model: m}
    - model: "*"
      chain: [{provider: fake, model: any}]
  fallbackOn: [rateLimited, timeout]
  retry: {attempts: 3, backoff: {base: 100ms, max: 1s}}
  timeouts: {attempt: 5s, firstToken: 2s, total: 1m30s}
"#;

    #[test]
    fn compiles_a_full_policy() {
        let snapshot = compile(GOOD).expect("valid");
        assert_eq!(snapshot.source, "shop/demo");
        assert_eq!(snapshot.aliases(), ["chat"]);
        let chat = snapshot.route("chat").expect("chat route");
        assert_eq!(chat.steps.len(), 2);
        assert_eq!(chat.steps[0].members[0].label, "primary/gpt-4o");
        assert_eq!(chat.steps[0].members[0].attempt_timeout, Duration::from_secs(20));
        assert_eq!(chat.steps[1].members[1].attempt_timeout, Duration::from_secs(5));
        assert_eq!(
            chat.retry,
            RetryPolicy {
                attempts: 3,
                base: Duration::from_millis(100),
                max: Duration::from_secs(1),
                max_request_attempts: 6
            }
        );
        assert_eq!(chat.timeouts.total, Duration::from_secs(90));
        assert!(chat.fallback_on.contains(FailureClass::RateLimited));
        assert!(!chat.fallback_on.contains(FailureClass::ServerError));
        assert_eq!(snapshot.route("anything-else").map(|r| r.alias.as_str()), Some("*"));
    }

    #[test]
    fn defaults_apply() {
        let snapshot = compile(
            "apiVersion: backstop.dev/v1alpha1\nkind: FallbackPolicy\nmetadata: {name: d}\nspec:\n  providers: [{name: m, type: mock}]\n  routes: [{model: chat, chain: [{provider: m, model: x}]}]\n",
        )
        .expect("valid");
        let route = snapshot.route("chat").expect("route");
        assert_eq!(route.retry.attempts, defaults::RETRY_ATTEMPTS);
        assert_eq!(route.timeouts.first_token, defaults::FIRST_TOKEN_TIMEOUT);
        assert_eq!(route.fallback_on, ClassSet::default_fallback());
        assert!(!route.fallback_on.contains(FailureClass::BadRequest));
        assert!(!route.fallback_on.contains(FailureClass::ContextWindowExceeded));
        assert!(route.fallback_on.contains(FailureClass::AuthError));
        assert!(snapshot.route("other").is_none());
    }

    #[test]
    fn every_problem_is_named_by_its_field_path() {
        let cases = [
            (
                GOOD.replace("provider: fake, model: any", "provider: nope, model: any"),
                "`spec.routes[1].chain[0].provider`: `nope` is not defined",
            ),
            (GOOD.replace("timeout: 20s", "timeout: -5s"), "`spec.routes[0].chain[0].timeout`: `-5s` is negative"),
            (
                GOOD.replace("timeout: 20s", "timeout: 0s"),
                "`spec.routes[0].chain[0].timeout`: must be greater than zero",
            ),
            (
                GOOD.replace("timeout: 20s", "timeout: soon"),
                "`spec.routes[0].chain[0].timeout`: `soon` is not a duration",
            ),
            (GOOD.replace("name: local", "name: primary"), "`spec.providers[1].name`: `primary` is defined twice"),
            (GOOD.replace("model: \"*\"", "model: chat"), "`spec.routes[1].model`: `chat` is routed twice"),
            (
                GOOD.replace("chain: [{provider: fake, model: any}]", "chain: []"),
                "`spec.routes[1].chain`: must have at least one step",
            ),
            (
                GOOD.replace("weight: 3", "weight: 0"),
                "`spec.routes[0].chain[1].group[0].weight`: 0 is not between 1 and 1000",
            ),
            (
                GOOD.replace(", baseUrl: \"http://127.0.0.1:8000/v1\"", ""),
                "`spec.providers[1].baseUrl`: is required for `openai-compatible`",
            ),
            (GOOD.replace("http://127.0.0.1:8000/v1", "ftp://x"), "`spec.providers[1].baseUrl`: must start with http"),
            (
                GOOD.replace("{value: sk-secret-123}", "{env: BACKSTOP_TEST_SURELY_UNSET}"),
                "`spec.providers[0].apiKey`: environment variable `BACKSTOP_TEST_SURELY_UNSET` is not set",
            ),
            (
                GOOD.replace("{value: sk-secret-123}", "{secretKeyRef: {name: k, key: openai}}"),
                "`spec.providers[0].apiKey`: `secretKeyRef` is resolved by the operator",
            ),
            (
                GOOD.replace("{value: sk-secret-123}", "{value: a, env: B}"),
                "`spec.providers[0].apiKey`: set exactly one",
            ),
            (GOOD.replace("attempts: 3", "attempts: 0"), "`spec.retry.attempts`: 0 is not between 1 and 10"),
            (GOOD.replace("max: 1s", "max: 10ms"), "`spec.retry.backoff.max`: must not be shorter than `base`"),
            (
                GOOD.replace("latency: 10ms}", "latency: 10ms, failureRate: 1.5}"),
                "`spec.providers[2].mock.failureRate`: 1.5 is not between 0 and 1",
            ),
            (
                GOOD.replace("latency: 10ms}", "latency: 10ms, failureStatus: 200}"),
                "`spec.providers[2].mock.failureStatus`: 200 is not an HTTP error status",
            ),
            (
                GOOD.replace("- {provider: primary, model: gpt-4o, timeout: 20s}", "- {model: gpt-4o}"),
                "`spec.routes[0].chain[0].provider`: is required",
            ),
            (
                GOOD.replace(
                    "{name: local, type: openai-compatible",
                    "{name: local, type: openai-compatible, mock: {}",
                ),
                "`spec.providers[1].mock`: only valid with `type: mock`",
            ),
        ];
        for (yaml, expected) in cases {
            let error = compile(&yaml).expect_err(expected).to_string();
            assert!(error.contains(expected), "expected {expected:?} in {error:?}");
        }
    }

    #[test]
    fn reports_every_problem_at_once() {
        let yaml = GOOD.replace("timeout: 20s", "timeout: soon").replace("attempts: 3", "attempts: 99");
        let error = compile(&yaml).expect_err("invalid");
        assert_eq!(error.errors.len(), 2, "{error}");
    }

    #[test]
    fn redacts_key_values() {
        let snapshot = compile(GOOD).expect("valid");
        let shown = snapshot.redacted().to_string();
        assert!(!shown.contains("sk-secret-123"), "{shown}");
        assert!(shown.contains(REDACTED));
    }

    #[test]
    fn durations_parse_like_kubernetes_users_write_them() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("100000000y").is_err_and(|e| e.contains("24h")));
        assert!(parse_duration("").is_err());
    }

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

    #[test]
    fn several_keys_become_balanced_members_of_one_step() {
        let yaml = GOOD.replace(
            "{name: primary, type: openai, apiKey: {value: sk-secret-123}}",
            "{name: primary, type: openai, apiKeys: [{value: sk-a}, {value: sk-b}, {value: sk-c}]}",
        );
        let snapshot = compile(&yaml).expect("valid");
        let step = &snapshot.route("chat").expect("route").steps[0];
        let labels: Vec<&str> = step.members.iter().map(|m| m.label.as_str()).collect();
        assert_eq!(labels, ["primary/gpt-4o#1", "primary/gpt-4o#2", "primary/gpt-4o#3"]);
        assert_eq!(step.members.iter().map(|m| m.key).collect::<Vec<_>>(), [0, 1, 2]);
        assert!(!snapshot.redacted().to_string().contains("sk-b"));
        let both = GOOD.replace("apiKey: {value: sk-secret-123}", "apiKey: {value: a}, apiKeys: [{value: b}]");
        assert!(compile(&both).expect_err("both").to_string().contains("`spec.providers[0].apiKeys`: set either"));
    }

    #[test]
    fn routes_compile_hedges_special_chains_and_overrides() {
        let yaml = GOOD.replace(
            "    - model: \"*\"",
            "      onContextWindowExceeded: [{provider: fake, model: big}]\n      hedge: {afterFirstTokenDelay: 2s}\n    - model: \"*\"",
        ) + "  allowRequestOverrides: [noFallback, deadline]\n";
        let snapshot = compile(&yaml).expect("valid");
        let chat = snapshot.route("chat").expect("route");
        assert_eq!(chat.hedge, Some(Hedge { delay: Duration::from_secs(2), max_extra: 1 }));
        assert_eq!(chat.on_context_window_exceeded[0].members[0].label, "fake/big");
        assert!(chat.on_content_filtered.is_empty());
        assert_eq!(chat.overrides, AllowedOverrides { no_fallback: true, max_attempts: false, deadline: true });
        let bad = yaml.replace("afterFirstTokenDelay: 2s", "afterFirstTokenDelay: 2s, maxExtra: 9");
        assert!(
            compile(&bad)
                .expect_err("bad")
                .to_string()
                .contains("`spec.routes[0].hedge.maxExtra`: 9 is not between 1 and 3")
        );
        let bad = yaml.replace("[{provider: fake, model: big}]", "[{provider: nope, model: big}]");
        assert!(
            compile(&bad)
                .expect_err("bad")
                .to_string()
                .contains("`spec.routes[0].onContextWindowExceeded[0].provider`")
        );
    }

    #[test]
    fn breaker_settings_are_checked() {
        let with = |cb: &str| compile(&format!("{GOOD}  circuitBreaker: {cb}\n"));
        assert!(with("{consecutiveFailures: 3, openFor: 10s, maxOpenFor: 1m, failureRate: {percent: 40}}").is_ok());
        let cases = [
            ("{openFor: 10m, maxOpenFor: 1m}", "`spec.circuitBreaker.maxOpenFor`: must not be shorter than `openFor`"),
            ("{countOn: [badRequest]}", "`spec.circuitBreaker.countOn`: `badRequest` says nothing"),
            ("{failureRate: {percent: 0}}", "`spec.circuitBreaker.failureRate.percent`: 0 is not between 1 and 100"),
            ("{halfOpenProbes: 0}", "`spec.circuitBreaker.halfOpenProbes`: 0 is not between 1 and 100"),
        ];
        for (cb, expected) in cases {
            let error = with(cb).expect_err(cb).to_string();
            assert!(error.contains(expected), "{expected:?} in {error:?}");
        }
    }

    #[test]
    fn health_state_survives_a_reload_and_an_invalid_policy_changes_none_of_it() {
        let health = HealthRegistry::new();
        let first = PolicySnapshot::compile(&parse(GOOD), &LocalKeys, &health).expect("valid");
        let second = PolicySnapshot::compile(&parse(GOOD), &LocalKeys, &health).expect("valid");
        let a = &first.route("chat").expect("route").steps[0].members[0].health;
        let b = &second.route("chat").expect("route").steps[0].members[0].health;
        assert!(Arc::ptr_eq(a, b), "the same target keeps its health across reloads");
        assert!(Arc::ptr_eq(&first.route("chat").expect("route").budget, &second.route("chat").expect("route").budget));
        let changed = GOOD.replace("sk-secret-123", "sk-rotated");
        let third = PolicySnapshot::compile(&parse(&changed), &LocalKeys, &health).expect("valid");
        let c = &third.route("chat").expect("route").steps[0].members[0].health;
        assert!(!Arc::ptr_eq(a, c), "a new key is a new target");
        let invalid = GOOD.to_string() + "  circuitBreaker: {consecutiveFailures: 1, openFor: soon}\n";
        assert!(PolicySnapshot::compile(&parse(&invalid), &LocalKeys, &health).is_err());
    }

    #[test]
    fn the_store_publishes_increasing_versions() {
        let store = PolicyStore::new();
        assert!(store.load().is_none());
        assert_eq!(store.publish(compile(GOOD).expect("valid")), 1);
        let held = store.load().expect("published");
        assert_eq!(store.publish(compile(GOOD).expect("valid")), 2);
        assert_eq!(held.version, 1, "a held snapshot never changes");
        assert_eq!(store.load().map(|s| s.version), Some(2));
    }
}
