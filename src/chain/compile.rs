//! The compiler: a `FallbackPolicy` spec checked completely, every problem named by its field
//! path and reported at once, into a [`CompiledPolicy`].

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::time::Duration;

use super::adapt::compile_adapt;
use super::defaults;
use super::error::{Errors, InvalidPolicy};
use super::keys::KeyResolver;
use super::overrides::compile_target_overrides;
use super::providers::{CompiledProvider, compile_providers};
use super::redact::redact;
use super::settings::{Price, SpendLimit, Verify};
use super::settings::{
    compile_breaker, compile_budget, compile_hedge, compile_overrides, compile_retry, compile_timeouts,
};
use super::{CompiledPolicy, CompiledRoute, CompiledShadow, CompiledStep, CompiledTarget, distinct_targets};
use crate::policy::{AdaptSpec, ChainStepSpec, FallbackPolicy, PriceSpec, ShadowSpec, SpendLimitSpec, VerifySpec};

use crate::llm::{ClassSet, RequestFeature};

/// Compiles a policy, collecting every problem with its field path. `keys` resolves `apiKey`s:
/// [`super::LocalKeys`] in a sidecar reading a file, the Secrets of the policy's namespace in
/// the operator.
pub fn compile(policy: &FallbackPolicy, keys: &dyn KeyResolver) -> Result<CompiledPolicy, InvalidPolicy> {
    let mut errors = Errors::default();
    let spec = &policy.spec;
    let providers = compile_providers(spec, keys, &mut errors);
    let fallback_on =
        spec.fallback_on.as_ref().map_or_else(ClassSet::default_fallback, |classes| classes.iter().copied().collect());
    let retry = compile_retry(spec.retry.as_ref(), &mut errors);
    let budget = compile_budget(spec.retry.as_ref(), &mut errors);
    let timeouts = compile_timeouts(spec.timeouts.as_ref(), &mut errors);
    let breaker = compile_breaker(spec.circuit_breaker.as_ref(), &mut errors);
    let overrides = compile_overrides(spec.allow_request_overrides.as_deref());
    let source = format!(
        "{}/{}",
        policy.metadata.namespace.as_deref().unwrap_or("default"),
        policy.metadata.name.as_deref().unwrap_or("unnamed")
    );
    let verify = spec.verify.as_ref().map(|spec| compile_verify(spec, &Verify::default(), "spec.verify", &mut errors));
    let mut compiler = Compiler {
        providers: &providers,
        default_timeout: timeouts.attempt,
        errors,
        source,
        spend_limits: BTreeMap::new(),
        unlimited: Vec::new(),
        verify_on: spec.verify.as_ref().is_some_and(|spec| spec.enabled != Some(false)),
        verify,
        verifies: BTreeMap::new(),
    };

    let mut routes = Vec::with_capacity(spec.routes.len());
    let mut seen = HashSet::new();
    if spec.routes.is_empty() {
        compiler.errors.push("spec.routes", "must name at least one route");
    }
    for (r, route) in spec.routes.iter().enumerate() {
        let path = format!("spec.routes[{r}]");
        if route.model.is_empty() {
            compiler.errors.push(format!("{path}.model"), "must not be empty");
        } else if !seen.insert(route.model.as_str()) {
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
        let shadow = route.shadow.as_ref().map(|spec| compiler.shadow(spec, &format!("{path}.shadow")));
        routes.push(CompiledRoute {
            alias: route.model.clone(),
            steps,
            on_context_window_exceeded,
            on_content_filtered,
            fallback_on,
            retry,
            timeouts,
            hedge,
            overrides,
            shadow,
            mid_stream: route.mid_stream.unwrap_or_default(),
        });
    }
    if let Some(problem) = spec.selector_problem() {
        compiler.errors.push("spec.selector", problem);
    }
    for (key, path) in std::mem::take(&mut compiler.unlimited) {
        if let Some((_, at)) = compiler.spend_limits.get(&key) {
            let target = key.rsplit('\u{1f}').next().unwrap_or_default();
            let problem = format!(
                "`{target}` has a `spendLimit` at `{at}`: set the same one here, or its spend here goes uncapped"
            );
            compiler.errors.push(format!("{path}.spendLimit"), problem);
        }
    }
    let target_overrides =
        compile_target_overrides(spec.overrides.as_deref(), &distinct_targets(&routes), &mut compiler.errors);
    compiler.errors.finish()?;
    let source = compiler.source;
    let mut providers: Vec<(usize, CompiledProvider)> = providers.into_values().collect();
    providers.sort_by_key(|(index, _)| *index);
    Ok(CompiledPolicy {
        source,
        providers: providers.into_iter().map(|(_, config)| config).collect(),
        routes,
        breaker,
        budget,
        overrides: target_overrides,
        document: redact(policy),
    })
}

/// One chain member as the policy names it.
struct Member<'a> {
    provider: &'a str,
    model: &'a str,
    timeout: Option<&'a String>,
    weight: u32,
    skip_for: Option<&'a [RequestFeature]>,
    price: Option<&'a PriceSpec>,
    adapt: Option<&'a AdaptSpec>,
    spend_limit: Option<&'a SpendLimitSpec>,
    /// Its own `verify`, for a chain target; `None` for a shadow target, never verified.
    verify: Option<Option<&'a VerifySpec>>,
}

/// What compiling chains needs at hand.
struct Compiler<'a> {
    /// The valid providers by name, with their index in the compiled policy.
    providers: &'a BTreeMap<String, (usize, CompiledProvider)>,
    default_timeout: Duration,
    errors: Errors,
    /// `namespace/name`, which spend limits are counted under.
    source: String,
    /// Each target's spend limit and where it was set: one target has one limit.
    spend_limits: BTreeMap<String, (SpendLimit, String)>,
    /// The chain targets without a spend limit, by spend key, with their paths: a target limited
    /// in one place must be limited wherever it appears, or its spend there would go uncapped.
    unlimited: Vec<(String, String)>,
    /// `spec.verify`, compiled: what a target's own `verify` overrides.
    verify: Option<Verify>,
    /// Each target's verification and where it was decided: one target, one verification.
    verifies: BTreeMap<String, (Option<Verify>, String)>,
    /// Whether `spec.verify` verifies targets that say nothing.
    verify_on: bool,
}

impl Compiler<'_> {
    fn chain(&mut self, steps: &[ChainStepSpec], path: &str) -> Vec<CompiledStep> {
        steps.iter().enumerate().filter_map(|(s, step)| self.step(step, &format!("{path}[{s}]"))).collect()
    }

    fn step(&mut self, spec: &ChainStepSpec, path: &str) -> Option<CompiledStep> {
        let members: Vec<CompiledTarget> = match (&spec.group, &spec.provider, &spec.model) {
            (Some(group), None, None) => {
                if group.is_empty() {
                    self.errors.push(format!("{path}.group"), "must have at least one member");
                }
                if spec.timeout.is_some() {
                    self.errors.push(format!("{path}.timeout"), "set `timeout` on each group member instead");
                }
                if spec.price.is_some() {
                    self.errors.push(format!("{path}.price"), "set `price` on each group member instead");
                }
                if spec.adapt.is_some() {
                    self.errors.push(format!("{path}.adapt"), "set `adapt` on each group member instead");
                }
                if spec.spend_limit.is_some() {
                    self.errors.push(format!("{path}.spendLimit"), "set `spendLimit` on each group member instead");
                }
                if spec.verify.is_some() {
                    self.errors.push(format!("{path}.verify"), "set `verify` on each group member instead");
                }
                let mut seen = HashSet::new();
                let mut members = Vec::new();
                for (m, member) in group.iter().enumerate() {
                    let member_path = format!("{path}.group[{m}]");
                    let weight = self.errors.number(member.weight, &format!("{member_path}.weight"), 1..=1000, 1);
                    if !seen.insert((&member.provider, &member.model)) {
                        self.errors.push(member_path.clone(), "the same provider and model appear twice in this group");
                    }
                    members.extend(self.targets(
                        Member {
                            provider: &member.provider,
                            model: &member.model,
                            timeout: member.timeout.as_ref(),
                            weight,
                            skip_for: member.skip_for.as_deref(),
                            price: member.price.as_ref(),
                            adapt: member.adapt.as_ref(),
                            spend_limit: member.spend_limit.as_ref(),
                            verify: Some(member.verify.as_ref()),
                        },
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
                let member = Member {
                    provider,
                    model,
                    timeout: spec.timeout.as_ref(),
                    weight: 1,
                    skip_for: spec.skip_for.as_deref(),
                    price: spec.price.as_ref(),
                    adapt: spec.adapt.as_ref(),
                    spend_limit: spec.spend_limit.as_ref(),
                    verify: Some(spec.verify.as_ref()),
                };
                self.targets(member, path)
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
        (!members.is_empty()).then_some(CompiledStep { members })
    }

    /// The targets for one provider + model: one per API key of the provider.
    fn targets(&mut self, member: Member<'_>, path: &str) -> Vec<CompiledTarget> {
        let Member { provider, model, timeout, weight, skip_for, price, adapt, spend_limit, verify } = member;
        let spend_limit = spend_limit.and_then(|spec| self.spend_limit(spec, provider, model, price.is_some(), path));
        // A chain target (a shadow's spend is its own, never capped).
        if spend_limit.is_none() && verify.is_some() {
            self.unlimited.push((format!("{}\u{1f}{provider}/{model}", self.source), path.to_string()));
        }
        let verify = verify.and_then(|own| self.verify(own, provider, model, path));
        let attempt_timeout = self.errors.duration(timeout, format!("{path}.timeout"), self.default_timeout);
        let price = price.map(|price| {
            for (field, value) in [
                ("input", Some(price.input)),
                ("output", Some(price.output)),
                ("cachedInput", price.cached_input),
                ("cacheWrite", price.cache_write),
            ] {
                if value.is_some_and(|v| !v.is_finite() || v < 0.0) {
                    self.errors
                        .push(format!("{path}.price.{field}"), "must be a price of zero or more, per million tokens");
                }
            }
            Price {
                input: price.input,
                output: price.output,
                cached_input: price.cached_input,
                cache_write: price.cache_write,
            }
        });
        if model.is_empty() {
            self.errors.push(format!("{path}.model"), "must not be empty");
        }
        let Some((index, found)) = self.providers.get(provider) else {
            self.errors.push(format!("{path}.provider"), format!("`{provider}` is not defined in `spec.providers`"));
            return Vec::new();
        };
        let adapt = compile_adapt(adapt, found.kind, provider, path, &mut self.errors);
        let keys = found.key_count();
        (0..keys)
            .map(|key| {
                let mut label = format!("{provider}/{model}");
                if keys > 1 {
                    let _ = write!(label, "#{}", key + 1);
                }
                CompiledTarget {
                    provider: *index,
                    model: model.to_string(),
                    key,
                    attempt_timeout,
                    weight,
                    label,
                    skip_for: skip_for.unwrap_or_default().to_vec(),
                    identity: format!("{}\u{1f}{model}", found.endpoint_id(key)),
                    price,
                    adapt: adapt.clone(),
                    spend_limit: spend_limit.clone(),
                    verify: verify.clone(),
                }
            })
            .collect()
    }
}

impl Compiler<'_> {
    /// The spend limit `spec` of `provider`/`model` at `path`: its window at least 10 s (and, as
    /// every policy duration, at most 24 h), a positive amount, a price to count it by, and the
    /// same limit wherever the target appears.
    fn spend_limit(
        &mut self,
        spec: &SpendLimitSpec,
        provider: &str,
        model: &str,
        priced: bool,
        path: &str,
    ) -> Option<SpendLimit> {
        let field = format!("{path}.spendLimit");
        let per = self.errors.duration(Some(&spec.per), format!("{field}.per"), Duration::ZERO);
        if !per.is_zero() && per < Duration::from_secs(10) {
            self.errors.push(format!("{field}.per"), format!("`{}` is shorter than 10s", spec.per));
        }
        if !(spec.usd.is_finite() && spec.usd > 0.0) {
            self.errors.push(format!("{field}.usd"), "must be an amount above zero, in US dollars");
        }
        if !priced {
            self.errors.push(field.clone(), "needs the target's `price`, which its spend is counted by");
        }
        let key = format!("{}\u{1f}{provider}/{model}", self.source);
        let limit = SpendLimit { key: key.clone(), usd: spec.usd, per };
        match self.spend_limits.get(&key) {
            Some((earlier, at)) if (earlier.usd, earlier.per) != (limit.usd, limit.per) => {
                let problem = format!("`{provider}/{model}` has another `spendLimit` at `{at}`: one target, one limit");
                self.errors.push(field, problem);
            }
            Some(_) => {}
            None => {
                self.spend_limits.insert(key, (limit.clone(), field));
            }
        }
        Some(limit)
    }

    /// The verification of `provider`/`model` at `path`, whose own `verify` is `own`: its own
    /// settings over the policy's; none when neither verifies it. Wherever the target appears,
    /// it must come to the same.
    fn verify(&mut self, own: Option<&VerifySpec>, provider: &str, model: &str, path: &str) -> Option<Verify> {
        let base = self.verify.clone().unwrap_or_default();
        let verify = match own {
            Some(spec) => {
                let verify = compile_verify(spec, &base, &format!("{path}.verify"), &mut self.errors);
                (spec.enabled != Some(false)).then_some(verify)
            }
            None => self.verify_on.then_some(base),
        };
        let target = format!("{provider}/{model}");
        match self.verifies.get(&target) {
            Some((earlier, at)) if *earlier != verify => {
                let problem = format!("`{target}` is verified otherwise at `{at}`: one target, one verification");
                self.errors.push(format!("{path}.verify"), problem);
            }
            Some(_) => {}
            None => {
                self.verifies.insert(target, (verify.clone(), path.to_string()));
            }
        }
        verify
    }

    /// A route's `shadow` at `path`.
    fn shadow(&mut self, spec: &ShadowSpec, path: &str) -> CompiledShadow {
        if !(spec.percent.is_finite() && spec.percent > 0.0 && spec.percent <= 100.0) {
            self.errors.push(format!("{path}.percent"), format!("{} is not more than 0 and at most 100", spec.percent));
        }
        let max_concurrent = self.errors.number(
            spec.max_concurrent,
            &format!("{path}.maxConcurrent"),
            1..=256,
            defaults::SHADOW_MAX_CONCURRENT,
        );
        let timeout = self.errors.duration(spec.timeout.as_ref(), format!("{path}.timeout"), defaults::SHADOW_TIMEOUT);
        let member = Member {
            provider: &spec.provider,
            model: &spec.model,
            timeout: spec.timeout.as_ref(),
            weight: 1,
            skip_for: None,
            price: spec.price.as_ref(),
            adapt: spec.adapt.as_ref(),
            spend_limit: None,
            verify: None,
        };
        CompiledShadow {
            targets: self.targets(member, path),
            share: (spec.percent / 100.0).clamp(0.0, 1.0),
            max_concurrent,
            timeout,
            capture_content: spec.capture_content.unwrap_or(false),
        }
    }
}

/// `spec`'s settings at `path` over `base`.
fn compile_verify(spec: &VerifySpec, base: &Verify, path: &str, errors: &mut Errors) -> Verify {
    let every = errors.duration(spec.every.as_ref(), format!("{path}.every"), base.every);
    if spec.every.is_some() && every < defaults::VERIFY_MIN_EVERY {
        errors.push(
            format!("{path}.every"),
            format!("`{}` is shorter than 10s", spec.every.as_deref().unwrap_or_default()),
        );
    }
    let timeout = errors.duration(spec.timeout.as_ref(), format!("{path}.timeout"), base.timeout);
    let prompt = spec.prompt.clone().unwrap_or_else(|| base.prompt.clone());
    if prompt.trim().is_empty() || prompt.chars().count() > 1000 {
        errors.push(format!("{path}.prompt"), "must be a message of 1 to 1000 characters");
    }
    let max_tokens = errors.number(spec.max_tokens, &format!("{path}.maxTokens"), 1..=4096, base.max_tokens);
    Verify { every, prompt, max_tokens, timeout }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::LocalKeys;
    use crate::chain::defaults;
    use crate::chain::redact::REDACTED;
    use crate::chain::settings::{AllowedOverrides, Hedge, RetryPolicy};
    use crate::policy::Parameter;

    use crate::llm::FailureClass;

    use crate::testing::{DEMO_POLICY as GOOD, assert_errors};

    fn compile(yaml: &str) -> Result<CompiledPolicy, InvalidPolicy> {
        let policy: FallbackPolicy = serde_yaml_ng::from_str(yaml).expect("test policy parses");
        super::compile(&policy, &LocalKeys)
    }

    fn route<'p>(policy: &'p CompiledPolicy, alias: &str) -> &'p CompiledRoute {
        policy.routes.iter().find(|r| r.alias == alias).expect("route")
    }

    #[test]
    fn compiles_a_full_policy() {
        let policy = compile(GOOD).expect("valid");
        assert_eq!(policy.source, "shop/demo");
        assert_eq!(policy.aliases().collect::<Vec<_>>(), ["chat"]);
        let chat = route(&policy, "chat");
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
        assert_eq!(policy.routes[1].alias, "*");
    }

    #[test]
    fn defaults_apply() {
        let policy = compile(
            "apiVersion: backstop.dev/v1alpha1\nkind: FallbackPolicy\nmetadata: {name: d}\nspec:\n  providers: [{name: m, type: mock}]\n  routes: [{model: chat, chain: [{provider: m, model: x}]}]\n",
        )
        .expect("valid");
        let route = route(&policy, "chat");
        assert_eq!(route.retry.attempts, defaults::RETRY_ATTEMPTS);
        assert_eq!(route.timeouts.first_token, defaults::FIRST_TOKEN_TIMEOUT);
        assert_eq!(route.fallback_on, ClassSet::default_fallback());
        assert!(!route.fallback_on.contains(FailureClass::BadRequest));
        assert!(!route.fallback_on.contains(FailureClass::ContextWindowExceeded));
        assert!(route.fallback_on.contains(FailureClass::AuthError));
        assert_eq!(policy.routes.len(), 1);
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
            (
                GOOD.replace("spec:\n", "spec:\n  selector: {matchExpressions: [{key: app, operator: In}]}\n"),
                "`spec.selector`:",
            ),
            (
                GOOD.replace(
                    "{name: primary, type: openai,",
                    "{name: primary, type: openai, continuation: assistantPrefill,",
                ),
                "`spec.providers[0].continuation`: `assistantPrefill` is not possible with `type: openai`: OpenAI's API answers",
            ),
            (
                GOOD.replace("latency: 10ms}", "latency: 10ms}, continuation: continueFinalMessage"),
                "`spec.providers[2].continuation`: `continueFinalMessage` is not possible with `type: mock`",
            ),
            (
                GOOD.replace("latency: 10ms}", "latency: 10ms, streamCutAfter: 0}"),
                "`spec.providers[2].mock.streamCutAfter`:",
            ),
            (
                GOOD.replace("timeout: 20s}", "timeout: 20s, spendLimit: {per: 1h, usd: 50}}"),
                "`spec.routes[0].chain[0].spendLimit`: needs the target's `price`",
            ),
            (
                GOOD.replace("timeout: 20s}", "timeout: 20s, price: {input: 1, output: 1}, spendLimit: {per: 5s, usd: 50}}"),
                "`spec.routes[0].chain[0].spendLimit.per`: `5s` is shorter than 10s",
            ),
            (
                GOOD.replace("timeout: 20s}", "timeout: 20s, price: {input: 1, output: 1}, spendLimit: {per: 1h, usd: 0}}"),
                "`spec.routes[0].chain[0].spendLimit.usd`: must be an amount above zero",
            ),
            (
                GOOD.replace("timeout: 20s}", "timeout: 20s, price: {input: 1, output: 1}, spendLimit: {per: 1h, usd: 5}}")
                    .replace(
                        "chain: [{provider: fake, model: any}]",
                        "chain: [{provider: primary, model: gpt-4o, price: {input: 1, output: 1}, spendLimit: {per: 1h, usd: 9}}]",
                    ),
                "`spec.routes[1].chain[0].spendLimit`: `primary/gpt-4o` has another `spendLimit` at `spec.routes[0].chain[0].spendLimit`",
            ),
            (
                GOOD.replace("timeout: 20s}", "timeout: 20s, price: {input: 1, output: 1}, spendLimit: {per: 1h, usd: 5}}")
                    .replace("chain: [{provider: fake, model: any}]", "chain: [{provider: primary, model: gpt-4o}]"),
                "`spec.routes[1].chain[0].spendLimit`: `primary/gpt-4o` has a `spendLimit` at `spec.routes[0].chain[0].spendLimit`: set the same one here",
            ),
            (GOOD.to_string() + "  verify: {every: 5s}\n", "`spec.verify.every`: `5s` is shorter than 10s"),
            (GOOD.to_string() + "  verify: {prompt: ' '}\n", "`spec.verify.prompt`: must be a message of 1 to 1000 characters"),
            (
                GOOD.replace("timeout: 20s}", "timeout: 20s, verify: {maxTokens: 0}}"),
                "`spec.routes[0].chain[0].verify.maxTokens`: 0 is not between 1 and 4096",
            ),
            (
                GOOD.replace("        - group:", "        - verify: {}\n          group:"),
                "`spec.routes[0].chain[1].verify`: set `verify` on each group member instead",
            ),
            (
                GOOD.replace("timeout: 20s}", "timeout: 20s, verify: {enabled: false}}")
                    .replace("chain: [{provider: fake, model: any}]", "chain: [{provider: primary, model: gpt-4o}]")
                    + "  verify: {}\n",
                "`spec.routes[1].chain[0].verify`: `primary/gpt-4o` is verified otherwise at `spec.routes[0].chain[0]`: one target, one verification",
            ),
        ];
        assert_errors(&cases, compile);
    }

    #[test]
    fn targets_are_verified_by_the_policy_s_settings_under_their_own() {
        let verify = |policy: &CompiledPolicy| -> Vec<(String, Option<Verify>)> {
            policy.targets().into_iter().map(|t| (t.label.clone(), t.verify.clone())).collect()
        };
        assert!(verify(&compile(GOOD).expect("valid")).iter().all(|(_, v)| v.is_none()), "off unless asked");
        let yaml = GOOD.replace("timeout: 20s}", "timeout: 20s, verify: {enabled: false}}").replace(
            "{provider: fake, model: m}",
            "{provider: fake, model: m, verify: {prompt: Say hi., timeout: 5s}}",
        ) + "  verify: {every: 1h, maxTokens: 4}\n";
        let policy = compile(&yaml).expect("valid");
        let policy_wide = Verify { every: Duration::from_secs(3600), max_tokens: 4, ..Verify::default() };
        let own = Verify { prompt: "Say hi.".into(), timeout: Duration::from_secs(5), ..policy_wide.clone() };
        assert_eq!(
            verify(&policy),
            [
                ("primary/gpt-4o".to_string(), None),
                ("local/llama".to_string(), Some(policy_wide.clone())),
                ("fake/m".to_string(), Some(own)),
                ("fake/any".to_string(), Some(policy_wide)),
            ]
        );
        assert_eq!(Verify::default().prompt, "Reply with OK.");
        assert_eq!((Verify::default().every, Verify::default().max_tokens), (Duration::from_secs(900), 1));
        // A target's own `verify` turns it on where the policy verifies nothing.
        let one = compile(&GOOD.replace("timeout: 20s}", "timeout: 20s, verify: {}}")).expect("valid");
        let on: Vec<String> = verify(&one).into_iter().filter(|(_, v)| v.is_some()).map(|(l, _)| l).collect();
        assert_eq!(on, ["primary/gpt-4o"]);
        // Shadow targets are in no chain: never verified.
        let shadowed = compile(
            &(GOOD.replace(
                "    - model: \"*\"",
                "      shadow: {provider: fake, model: s, percent: 5}\n    - model: \"*\"",
            ) + "  verify: {}\n"),
        )
        .expect("valid");
        assert!(route(&shadowed, "chat").shadow.as_ref().is_some_and(|s| s.targets[0].verify.is_none()));
    }

    #[test]
    fn reports_every_problem_at_once() {
        let yaml = GOOD.replace("timeout: 20s", "timeout: soon").replace("attempts: 3", "attempts: 99");
        let error = compile(&yaml).expect_err("invalid");
        assert_eq!(error.errors.len(), 2, "{error}");
    }

    #[test]
    fn redacts_key_values() {
        let policy = compile(GOOD).expect("valid");
        let shown = policy.document.to_string();
        assert!(!shown.contains("sk-secret-123"), "{shown}");
        assert!(shown.contains(REDACTED));
    }

    #[test]
    fn several_keys_become_balanced_members_of_one_step() {
        let yaml = GOOD.replace(
            "{name: primary, type: openai, apiKey: {value: sk-secret-123}}",
            "{name: primary, type: openai, apiKeys: [{value: sk-a}, {value: sk-b}, {value: sk-c}]}",
        );
        let policy = compile(&yaml).expect("valid");
        let step = &route(&policy, "chat").steps[0];
        let labels: Vec<&str> = step.members.iter().map(|m| m.label.as_str()).collect();
        assert_eq!(labels, ["primary/gpt-4o#1", "primary/gpt-4o#2", "primary/gpt-4o#3"]);
        assert_eq!(step.members.iter().map(|m| m.key).collect::<Vec<_>>(), [0, 1, 2]);
        assert!(!policy.document.to_string().contains("sk-b"));
        let both = GOOD.replace("apiKey: {value: sk-secret-123}", "apiKey: {value: a}, apiKeys: [{value: b}]");
        assert!(compile(&both).expect_err("both").to_string().contains("`spec.providers[0].apiKeys`: set either"));
    }

    #[test]
    fn routes_compile_hedges_special_chains_and_overrides() {
        let yaml = GOOD.replace(
            "    - model: \"*\"",
            "      onContextWindowExceeded: [{provider: fake, model: big}]\n      hedge: {afterFirstTokenDelay: 2s}\n    - model: \"*\"",
        ) + "  allowRequestOverrides: [noFallback, deadline]\n";
        let policy = compile(&yaml).expect("valid");
        let chat = route(&policy, "chat");
        assert_eq!(chat.hedge, Some(Hedge { delay: Duration::from_secs(2), max_extra: 1 }));
        assert_eq!(chat.on_context_window_exceeded[0].members[0].label, "fake/big");
        assert!(chat.on_content_filtered.is_empty());
        assert_eq!(
            chat.overrides,
            AllowedOverrides { no_fallback: true, max_attempts: false, deadline: true, drill: false }
        );
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
    fn adaptations_compile_per_target_and_name_what_an_api_cannot_take() {
        let anthropic = GOOD.replace(
            "    - {name: fake, type: mock",
            "    - {name: claude, type: anthropic, apiKey: {value: sk-a}}\n    - {name: fake, type: mock",
        );
        let with = |step: &str| anthropic.replace("{provider: primary, model: gpt-4o, timeout: 20s}", step);
        let policy = compile(&with(
            "{provider: claude, model: c, adapt: {set: {temperature: 0.3, topK: 40}, cap: {maxTokens: 512}, remove: [topP], systemPrompt: {suffix: Be brief.}}}",
        ))
        .expect("valid");
        let adaptation = route(&policy, "chat").steps[0].members[0].adapt.clone().expect("adapted");
        assert_eq!(
            adaptation,
            crate::chain::Adaptation {
                set: vec![(Parameter::Temperature, serde_json::json!(0.3)), (Parameter::TopK, serde_json::json!(40))],
                cap: vec![(Parameter::MaxTokens, 512.0)],
                remove: vec![Parameter::TopP],
                system_prefix: None,
                system_suffix: Some("Be brief.".into()),
            }
        );
        assert!(policy.document.to_string().contains("Be brief."), "/config shows the adaptation");
        let cases = [
            (
                with("{provider: primary, model: gpt-4o, adapt: {set: {topK: 40}}}"),
                "`spec.routes[0].chain[0].adapt.set.topK`: provider `primary` (type `openai`) has no `topK` parameter; it is for openai-compatible, anthropic, gemini",
            ),
            (
                with("{provider: claude, model: c, adapt: {set: {temperature: 1.5}}}"),
                "`spec.routes[0].chain[0].adapt.set.temperature`: 1.5 is not between 0 and 1 for Anthropic",
            ),
            (
                with("{provider: claude, model: c, adapt: {set: {reasoningEffort: low}}}"),
                "`spec.routes[0].chain[0].adapt.set.reasoningEffort`: provider `claude` (type `anthropic`) has no",
            ),
            (
                with("{provider: claude, model: c, adapt: {set: {thinkingBudget: 500}}}"),
                "`spec.routes[0].chain[0].adapt.set.thinkingBudget`: 500 is not between 1024",
            ),
            (
                with("{provider: claude, model: c, adapt: {set: {thinkingBudget: 2048, topK: 5}}}"),
                "`spec.routes[0].chain[0].adapt.set.topK`: Anthropic's extended thinking",
            ),
            (
                with("{provider: claude, model: c, adapt: {remove: [maxTokens]}}"),
                "`spec.routes[0].chain[0].adapt.remove[0]`: Anthropic's Messages API requires `max_tokens`",
            ),
            (
                with("{provider: claude, model: c, adapt: {remove: [seed]}}"),
                "`spec.routes[0].chain[0].adapt.remove[0]`: provider `claude` (type `anthropic`) has no `seed`",
            ),
            (
                with("{provider: primary, model: gpt-4o, adapt: {set: {maxTokens: 9}, cap: {maxTokens: 5}}}"),
                "`spec.routes[0].chain[0].adapt.cap.maxTokens`: is also in `set`",
            ),
            (
                with("{provider: primary, model: gpt-4o, adapt: {set: {seed: 1}, remove: [seed]}}"),
                "`spec.routes[0].chain[0].adapt.remove[0]`: `seed` is also set or capped",
            ),
            (
                with("{provider: primary, model: gpt-4o, adapt: {cap: {thinkingBudget: 10}}}"),
                "`spec.routes[0].chain[0].adapt.cap.thinkingBudget`: provider `primary` (type `openai`) has no",
            ),
            (
                with("{provider: primary, model: gpt-4o, adapt: {systemPrompt: {prefix: \" \"}}}"),
                "`spec.routes[0].chain[0].adapt.systemPrompt.prefix`: must not be empty",
            ),
            (
                anthropic
                    .replace("- {provider: fake, model: m}", "- {provider: claude, model: m, adapt: {set: {seed: 3}}}"),
                "`spec.routes[0].chain[1].group[1].adapt.set.seed`: provider `claude`",
            ),
            (
                anthropic.replace("        - group:\n", "        - adapt: {set: {seed: 3}}\n          group:\n"),
                "`spec.routes[0].chain[1].adapt`: set `adapt` on each group member instead",
            ),
        ];
        assert_errors(&cases, compile);
    }

    #[test]
    fn a_shadow_compiles_with_its_target_and_limits() {
        let yaml = GOOD.replace(
            "    - model: \"*\"",
            "      shadow: {provider: local, model: llama-shadow, percent: 1, adapt: {set: {topK: 5}}}\n    - model: \"*\"",
        );
        let policy = compile(&yaml).expect("valid");
        let shadow = route(&policy, "chat").shadow.clone().expect("shadow");
        assert_eq!(shadow.targets[0].label, "local/llama-shadow");
        assert_eq!((shadow.share, shadow.max_concurrent, shadow.capture_content), (0.01, 4, false));
        assert_eq!(shadow.timeout, defaults::SHADOW_TIMEOUT);
        assert!(shadow.targets[0].adapt.is_some());
        assert!(
            policy.targets().iter().all(|t| t.label != "local/llama-shadow"),
            "a shadow target is not a chain target: it has no breaker and no fleet state"
        );
        let cases = [
            (yaml.replace("percent: 1", "percent: 0"), "`spec.routes[0].shadow.percent`: 0 is not more than 0"),
            (yaml.replace("percent: 1", "percent: 1, maxConcurrent: 0"), "`spec.routes[0].shadow.maxConcurrent`"),
            (
                yaml.replace("provider: local, model: llama-shadow", "provider: nope, model: x"),
                "`spec.routes[0].shadow.provider`: `nope` is not defined",
            ),
            (yaml.replace("percent: 1", "percent: 1, timeout: never"), "`spec.routes[0].shadow.timeout`"),
            (
                yaml.replace("topK: 5", "reasoningEffort: high, thinkingBudget: 5"),
                "`spec.routes[0].shadow.adapt.set.thinkingBudget`",
            ),
        ];
        assert_errors(&cases, compile);
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
    fn a_compiled_policy_is_plain_data_with_a_stable_digest() {
        let policy = compile(GOOD).expect("valid");
        let json = serde_json::to_string(&policy).expect("serializes");
        let back: CompiledPolicy = serde_json::from_str(&json).expect("deserializes");
        assert_eq!(back, policy);
        assert_eq!(back.digest(), policy.digest());
        assert_eq!(compile(GOOD).expect("valid").digest(), policy.digest(), "the same policy, the same digest");
        let mut with_status: FallbackPolicy = serde_yaml_ng::from_str(GOOD).expect("parses");
        with_status.metadata.resource_version = Some("42".into());
        with_status.status =
            Some(crate::policy::FallbackPolicyStatus { observed_generation: Some(7), ..Default::default() });
        assert_eq!(
            super::compile(&with_status, &LocalKeys).expect("valid").digest(),
            policy.digest(),
            "status and bookkeeping are not part of the version"
        );
        let rotated = compile(&GOOD.replace("sk-secret-123", "sk-rotated")).expect("valid");
        assert_ne!(rotated.digest(), policy.digest(), "a rotated key is a new version");
        assert!(!format!("{policy:?}").contains("sk-secret-123"), "Debug never shows a key");
        let identity = &route(&policy, "chat").steps[0].members[0].identity;
        assert!(!identity.contains("sk-secret"), "{identity}");
    }
}
