//! Compiled, immutable routes: what a `FallbackPolicy` means at run time.
//!
//! [`PolicySnapshot::compile`] checks a spec completely, naming the field path of every
//! problem, and builds the providers, chains, retry and timeout settings the request path
//! reads. A snapshot never changes; a reload publishes a new one through [`PolicyStore`], and a
//! request keeps the snapshot it started with.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use serde_json::Value;

use crate::policy::{
    ApiKeySource, ChainStepSpec, FailureClass, FallbackPolicy, FallbackPolicySpec, MockSpec,
    ProviderKind, ProviderSpec, RetrySpec, TimeoutsSpec,
};
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
        InvalidPolicy {
            errors: vec![FieldError {
                path: path.into(),
                problem: problem.into(),
            }],
        }
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

/// A set of failure classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ClassSet(u16);

impl ClassSet {
    /// The classes that fall through when `fallbackOn` is not set.
    pub fn default_fallback() -> Self {
        FailureClass::ALL
            .into_iter()
            .filter(|c| c.falls_through_by_default())
            .collect()
    }

    /// Whether `class` is in the set.
    pub fn contains(self, class: FailureClass) -> bool {
        self.0 & (1 << class as u16) != 0
    }
}

impl FromIterator<FailureClass> for ClassSet {
    fn from_iter<I: IntoIterator<Item = FailureClass>>(iter: I) -> Self {
        ClassSet(iter.into_iter().fold(0, |bits, c| bits | 1 << c as u16))
    }
}

/// Retries of one target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per target, the first included (at least 1).
    pub attempts: u32,
    /// The first retry's backoff.
    pub base: Duration,
    /// The longest backoff; a `Retry-After` beyond it moves the chain on.
    pub max: Duration,
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

/// One provider + model a chain can send to.
#[derive(Debug)]
pub struct Target {
    /// The provider.
    pub provider: Arc<Provider>,
    /// The model name sent to it.
    pub model: String,
    /// This target's attempt time limit.
    pub attempt_timeout: Duration,
    /// Relative share within its step.
    pub weight: u32,
    /// `provider/model`, as shown in headers, logs and errors.
    pub label: String,
}

/// One step of a chain: one target, or several balanced by weight.
#[derive(Debug)]
pub struct Step {
    /// The step's targets (one unless it is a group).
    pub members: Vec<Arc<Target>>,
    total_weight: u32,
}

impl Step {
    /// Picks a member by weight, `draw` being uniform in `[0, 1)`.
    pub fn pick(&self, draw: f64) -> &Arc<Target> {
        let point = (f64::from(self.total_weight) * draw.clamp(0.0, 1.0)) as u32;
        let mut passed = 0;
        for member in &self.members {
            passed += member.weight;
            if point < passed {
                return member;
            }
        }
        // `members` is never empty: compile rejects empty groups.
        &self.members[self.members.len() - 1]
    }
}

/// A compiled route: the chain for one model alias, with the settings that govern it.
#[derive(Debug)]
pub struct Route {
    /// The alias (`*` for the catch-all).
    pub alias: String,
    /// The steps, in order.
    pub steps: Vec<Step>,
    /// Classes that fall through to the next step.
    pub fallback_on: ClassSet,
    /// Retries per target.
    pub retry: RetryPolicy,
    /// Time limits.
    pub timeouts: Timeouts,
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
    /// Compiles a policy, collecting every problem with its field path.
    pub fn compile(
        policy: &FallbackPolicy,
        keys: &dyn KeyResolver,
    ) -> Result<PolicySnapshot, InvalidPolicy> {
        let mut errors = Errors::default();
        let spec = &policy.spec;
        let providers = compile_providers(spec, keys, &mut errors);
        let fallback_on = spec
            .fallback_on
            .as_ref()
            .map_or_else(ClassSet::default_fallback, |classes| {
                classes.iter().copied().collect()
            });
        let retry = compile_retry(spec.retry.as_ref(), &mut errors);
        let timeouts = compile_timeouts(spec.timeouts.as_ref(), &mut errors);

        let mut routes = HashMap::new();
        let mut catch_all = None;
        let mut aliases = Vec::new();
        if spec.routes.is_empty() {
            errors.push("spec.routes", "must name at least one route");
        }
        for (r, route) in spec.routes.iter().enumerate() {
            let path = format!("spec.routes[{r}]");
            if route.model.is_empty() {
                errors.push(format!("{path}.model"), "must not be empty");
            } else if route.model != "*" && routes.contains_key(&route.model)
                || route.model == "*" && catch_all.is_some()
            {
                errors.push(
                    format!("{path}.model"),
                    format!("`{}` is routed twice", route.model),
                );
            }
            if route.chain.is_empty() {
                errors.push(format!("{path}.chain"), "must have at least one step");
            }
            let steps: Vec<Step> = route
                .chain
                .iter()
                .enumerate()
                .filter_map(|(s, step)| {
                    compile_step(
                        step,
                        &format!("{path}.chain[{s}]"),
                        &providers,
                        timeouts.attempt,
                        &mut errors,
                    )
                })
                .collect();
            let compiled = Arc::new(Route {
                alias: route.model.clone(),
                steps,
                fallback_on,
                retry,
                timeouts,
            });
            if route.model == "*" {
                catch_all = Some(compiled);
            } else {
                aliases.push(route.model.clone());
                routes.insert(route.model.clone(), compiled);
            }
        }
        errors.finish()?;
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
        self.0.push(FieldError {
            path: path.into(),
            problem: problem.into(),
        });
    }

    fn finish(self) -> Result<(), InvalidPolicy> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(InvalidPolicy { errors: self.0 })
        }
    }
}

/// Parses a duration such as `250ms`, `30s`, `1m30s` or `2h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    if trimmed.starts_with('-') {
        return Err(format!(
            "`{text}` is negative; durations must be greater than zero"
        ));
    }
    let duration = humantime::parse_duration(trimmed).map_err(|_| {
        format!("`{text}` is not a duration (write it like `500ms`, `30s` or `1m30s`)")
    })?;
    if duration.is_zero() {
        return Err("must be greater than zero".to_string());
    }
    Ok(duration)
}

fn duration_field(
    value: Option<&String>,
    path: String,
    default: Duration,
    errors: &mut Errors,
) -> Duration {
    match value.map(|v| parse_duration(v)) {
        None => default,
        Some(Ok(duration)) => duration,
        Some(Err(problem)) => {
            errors.push(path, problem);
            default
        }
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
        if provider.name.is_empty() || provider.name.contains('/') {
            errors.push(
                format!("{path}.name"),
                "must be non-empty and contain no `/`",
            );
            continue;
        }
        if providers.contains_key(&provider.name) {
            errors.push(
                format!("{path}.name"),
                format!("`{}` is defined twice", provider.name),
            );
            continue;
        }
        if let Some(built) = compile_provider(provider, &path, keys, errors) {
            providers.insert(provider.name.clone(), Arc::new(built));
        }
    }
    providers
}

fn compile_provider(
    spec: &ProviderSpec,
    path: &str,
    keys: &dyn KeyResolver,
    errors: &mut Errors,
) -> Option<Provider> {
    let api_key = spec.api_key.as_ref().and_then(|source| {
        let set = [
            source.value.is_some(),
            source.env.is_some(),
            source.secret_key_ref.is_some(),
        ];
        if set.iter().filter(|s| **s).count() != 1 {
            errors.push(
                format!("{path}.apiKey"),
                "set exactly one of `value`, `env` or `secretKeyRef`",
            );
            return None;
        }
        match keys.resolve(source) {
            Ok(key) => Some(key),
            Err(problem) => {
                errors.push(format!("{path}.apiKey"), problem);
                None
            }
        }
    });
    if spec.mock.is_some() && spec.kind != ProviderKind::Mock {
        errors.push(format!("{path}.mock"), "only valid with `type: mock`");
    }
    match spec.kind {
        ProviderKind::Mock => {
            if spec.base_url.is_some() {
                errors.push(format!("{path}.baseUrl"), "a `mock` provider has no URL");
            }
            let behaviour = compile_mock(spec.mock.as_ref(), &format!("{path}.mock"), errors);
            Some(Provider::mock(spec.name.clone(), Mock::new(behaviour)))
        }
        kind @ (ProviderKind::OpenAi | ProviderKind::OpenAiCompatible) => {
            let base_url = match (&spec.base_url, kind) {
                (Some(url), _) => url.as_str(),
                (None, ProviderKind::OpenAi) => openai::DEFAULT_BASE_URL,
                (None, _) => {
                    errors.push(
                        format!("{path}.baseUrl"),
                        "is required for `openai-compatible`",
                    );
                    return None;
                }
            };
            match OpenAi::new(kind, base_url, api_key) {
                Ok(upstream) => Some(Provider::openai(spec.name.clone(), upstream)),
                Err(problem) => {
                    let field = if problem.contains("API key") {
                        "apiKey"
                    } else {
                        "baseUrl"
                    };
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
    behaviour.latency = duration_field(
        spec.latency.as_ref(),
        format!("{path}.latency"),
        Duration::ZERO,
        errors,
    );
    behaviour.first_token_latency = duration_field(
        spec.first_token_latency.as_ref(),
        format!("{path}.firstTokenLatency"),
        Duration::ZERO,
        errors,
    );
    match spec.chunks {
        Some(0) => errors.push(format!("{path}.chunks"), "must be at least 1"),
        Some(chunks) => behaviour.chunks = chunks,
        None => {}
    }
    match spec.failure_rate {
        Some(rate) if !(0.0..=1.0).contains(&rate) => {
            errors.push(
                format!("{path}.failureRate"),
                format!("{rate} is not between 0 and 1"),
            );
        }
        Some(rate) => behaviour.failure_rate = rate,
        None => {}
    }
    match spec.failure_status {
        Some(status) if !(400..=599).contains(&status) => {
            errors.push(
                format!("{path}.failureStatus"),
                format!("{status} is not an HTTP error status (400-599)"),
            );
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
    let attempts = match spec.attempts {
        Some(n) if !(1..=10).contains(&n) => {
            errors.push(
                "spec.retry.attempts",
                format!("{n} is not between 1 and 10"),
            );
            defaults::RETRY_ATTEMPTS
        }
        Some(n) => n,
        None => defaults::RETRY_ATTEMPTS,
    };
    let backoff = spec.backoff.unwrap_or_default();
    let base = duration_field(
        backoff.base.as_ref(),
        "spec.retry.backoff.base".into(),
        defaults::BACKOFF_BASE,
        errors,
    );
    let max = duration_field(
        backoff.max.as_ref(),
        "spec.retry.backoff.max".into(),
        defaults::BACKOFF_MAX,
        errors,
    );
    if max < base {
        errors.push("spec.retry.backoff.max", "must not be shorter than `base`");
    }
    RetryPolicy {
        attempts,
        base,
        max,
    }
}

fn compile_timeouts(spec: Option<&TimeoutsSpec>, errors: &mut Errors) -> Timeouts {
    let spec = spec.cloned().unwrap_or_default();
    let attempt = duration_field(
        spec.attempt.as_ref(),
        "spec.timeouts.attempt".into(),
        defaults::ATTEMPT_TIMEOUT,
        errors,
    );
    let first_token = duration_field(
        spec.first_token.as_ref(),
        "spec.timeouts.firstToken".into(),
        defaults::FIRST_TOKEN_TIMEOUT,
        errors,
    );
    let total = duration_field(
        spec.total.as_ref(),
        "spec.timeouts.total".into(),
        defaults::TOTAL_TIMEOUT,
        errors,
    );
    Timeouts {
        attempt,
        first_token,
        total,
    }
}

fn compile_step(
    spec: &ChainStepSpec,
    path: &str,
    providers: &BTreeMap<String, Arc<Provider>>,
    default_timeout: Duration,
    errors: &mut Errors,
) -> Option<Step> {
    let members: Vec<Arc<Target>> = match (&spec.group, &spec.provider, &spec.model) {
        (Some(group), None, None) => {
            if group.is_empty() {
                errors.push(format!("{path}.group"), "must have at least one member");
            }
            let mut seen = HashSet::new();
            group
                .iter()
                .enumerate()
                .filter_map(|(m, member)| {
                    let member_path = format!("{path}.group[{m}]");
                    let weight = member.weight.unwrap_or(1);
                    if !(1..=1000).contains(&weight) {
                        errors.push(
                            format!("{member_path}.weight"),
                            format!("{weight} is not between 1 and 1000"),
                        );
                    }
                    if !seen.insert((&member.provider, &member.model)) {
                        errors.push(
                            member_path.clone(),
                            "the same provider and model appear twice in this group",
                        );
                    }
                    compile_target(
                        &member.provider,
                        &member.model,
                        member.timeout.as_ref(),
                        weight.clamp(1, 1000),
                        &member_path,
                        providers,
                        default_timeout,
                        errors,
                    )
                })
                .collect()
        }
        (Some(_), _, _) => {
            errors.push(
                path,
                "set either `group` or `provider` and `model`, not both",
            );
            return None;
        }
        (None, Some(provider), Some(model)) => compile_target(
            provider,
            model,
            spec.timeout.as_ref(),
            1,
            path,
            providers,
            default_timeout,
            errors,
        )
        .into_iter()
        .collect(),
        (None, None, Some(_)) => {
            errors.push(format!("{path}.provider"), "is required (or use `group`)");
            return None;
        }
        (None, _, None) => {
            errors.push(format!("{path}.model"), "is required (or use `group`)");
            return None;
        }
    };
    if spec.group.is_some() && spec.timeout.is_some() {
        errors.push(
            format!("{path}.timeout"),
            "set `timeout` on each group member instead",
        );
    }
    if members.is_empty() {
        return None;
    }
    let total_weight = members.iter().map(|m| m.weight).sum();
    Some(Step {
        members,
        total_weight,
    })
}

#[allow(clippy::too_many_arguments)]
fn compile_target(
    provider: &str,
    model: &str,
    timeout: Option<&String>,
    weight: u32,
    path: &str,
    providers: &BTreeMap<String, Arc<Provider>>,
    default_timeout: Duration,
    errors: &mut Errors,
) -> Option<Arc<Target>> {
    let timeout = duration_field(timeout, format!("{path}.timeout"), default_timeout, errors);
    if model.is_empty() {
        errors.push(format!("{path}.model"), "must not be empty");
    }
    match providers.get(provider) {
        Some(found) => Some(Arc::new(Target {
            provider: found.clone(),
            model: model.to_string(),
            attempt_timeout: timeout,
            weight,
            label: format!("{provider}/{model}"),
        })),
        None => {
            errors.push(
                format!("{path}.provider"),
                format!("`{provider}` is not defined in `spec.providers`"),
            );
            None
        }
    }
}

/// The policy as a JSON document with every `apiKey.value` replaced by [`REDACTED`].
fn redact(policy: &FallbackPolicy) -> Value {
    let mut copy = policy.clone();
    copy.metadata.managed_fields = None;
    for provider in &mut copy.spec.providers {
        if let Some(key) = &mut provider.api_key
            && key.value.is_some()
        {
            key.value = Some(REDACTED.to_string());
        }
    }
    serde_json::to_value(&copy).unwrap_or(Value::Null)
}

/// Where the active snapshot lives. Readers take it with one atomic load and keep it for the
/// whole request; a publish never waits for them.
#[derive(Debug, Default)]
pub struct PolicyStore {
    current: ArcSwapOption<PolicySnapshot>,
    versions: AtomicU64,
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
        PolicySnapshot::compile(&parse(yaml), &LocalKeys)
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
        assert_eq!(
            chat.steps[0].members[0].attempt_timeout,
            Duration::from_secs(20)
        );
        assert_eq!(
            chat.steps[1].members[1].attempt_timeout,
            Duration::from_secs(5)
        );
        assert_eq!(
            chat.retry,
            RetryPolicy {
                attempts: 3,
                base: Duration::from_millis(100),
                max: Duration::from_secs(1)
            }
        );
        assert_eq!(chat.timeouts.total, Duration::from_secs(90));
        assert!(chat.fallback_on.contains(FailureClass::RateLimited));
        assert!(!chat.fallback_on.contains(FailureClass::ServerError));
        assert_eq!(
            snapshot.route("anything-else").map(|r| r.alias.as_str()),
            Some("*")
        );
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
        assert!(
            !route
                .fallback_on
                .contains(FailureClass::ContextWindowExceeded)
        );
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
            (
                GOOD.replace("timeout: 20s", "timeout: -5s"),
                "`spec.routes[0].chain[0].timeout`: `-5s` is negative",
            ),
            (
                GOOD.replace("timeout: 20s", "timeout: 0s"),
                "`spec.routes[0].chain[0].timeout`: must be greater than zero",
            ),
            (
                GOOD.replace("timeout: 20s", "timeout: soon"),
                "`spec.routes[0].chain[0].timeout`: `soon` is not a duration",
            ),
            (
                GOOD.replace("name: local", "name: primary"),
                "`spec.providers[1].name`: `primary` is defined twice",
            ),
            (
                GOOD.replace("model: \"*\"", "model: chat"),
                "`spec.routes[1].model`: `chat` is routed twice",
            ),
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
            (
                GOOD.replace("http://127.0.0.1:8000/v1", "ftp://x"),
                "`spec.providers[1].baseUrl`: must start with http",
            ),
            (
                GOOD.replace(
                    "{value: sk-secret-123}",
                    "{env: BACKSTOP_TEST_SURELY_UNSET}",
                ),
                "`spec.providers[0].apiKey`: environment variable `BACKSTOP_TEST_SURELY_UNSET` is not set",
            ),
            (
                GOOD.replace(
                    "{value: sk-secret-123}",
                    "{secretKeyRef: {name: k, key: openai}}",
                ),
                "`spec.providers[0].apiKey`: `secretKeyRef` is resolved by the operator",
            ),
            (
                GOOD.replace("{value: sk-secret-123}", "{value: a, env: B}"),
                "`spec.providers[0].apiKey`: set exactly one",
            ),
            (
                GOOD.replace("attempts: 3", "attempts: 0"),
                "`spec.retry.attempts`: 0 is not between 1 and 10",
            ),
            (
                GOOD.replace("max: 1s", "max: 10ms"),
                "`spec.retry.backoff.max`: must not be shorter than `base`",
            ),
            (
                GOOD.replace("latency: 10ms}", "latency: 10ms, failureRate: 1.5}"),
                "`spec.providers[2].mock.failureRate`: 1.5 is not between 0 and 1",
            ),
            (
                GOOD.replace("latency: 10ms}", "latency: 10ms, failureStatus: 200}"),
                "`spec.providers[2].mock.failureStatus`: 200 is not an HTTP error status",
            ),
            (
                GOOD.replace(
                    "- {provider: primary, model: gpt-4o, timeout: 20s}",
                    "- {model: gpt-4o}",
                ),
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
            assert!(
                error.contains(expected),
                "expected {expected:?} in {error:?}"
            );
        }
    }

    #[test]
    fn reports_every_problem_at_once() {
        let yaml = GOOD
            .replace("timeout: 20s", "timeout: soon")
            .replace("attempts: 3", "attempts: 99");
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
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn backoff_grows_to_its_cap_with_bounded_jitter() {
        let retry = RetryPolicy {
            attempts: 5,
            base: Duration::from_millis(200),
            max: Duration::from_secs(2),
        };
        assert_eq!(retry.backoff(1, 0.0), Duration::from_millis(100));
        assert_eq!(retry.backoff(1, 1.0), Duration::from_millis(200));
        assert_eq!(retry.backoff(2, 1.0), Duration::from_millis(400));
        assert_eq!(retry.backoff(3, 0.5), Duration::from_millis(600));
        assert_eq!(retry.backoff(10, 1.0), Duration::from_secs(2));
        assert_eq!(retry.backoff(1000, 1.0), Duration::from_secs(2));
    }

    #[test]
    fn weighted_pick_honours_weights() {
        let snapshot = compile(GOOD).expect("valid");
        let step = &snapshot.route("chat").expect("route").steps[1];
        let picks: Vec<&str> = (0..4)
            .map(|i| step.pick(f64::from(i) / 4.0).label.as_str())
            .collect();
        assert_eq!(
            picks,
            ["local/llama", "local/llama", "local/llama", "fake/m"]
        );
        assert_eq!(step.pick(0.999_999).label, "fake/m");
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
