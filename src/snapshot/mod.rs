//! What the request path reads: a compiled policy bound to live providers and to the health
//! state that outlives it, published as one immutable snapshot ([`PolicyStore`]).
//!
//! [`PolicySnapshot::assemble`] is the one place a [`CompiledPolicy`] (plain data, from a file
//! or the config stream) meets sockets and health: it builds each provider's client, finds
//! each target's health by identity so that a reload keeps what the sidecar learnt, and only
//! once everything is built applies the new breaker and budget settings to that state. A
//! request takes the snapshot with one atomic load and keeps it to the end.

mod store;

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;

use crate::chain::{
    AllowedOverrides, CompiledPolicy, CompiledRoute, CompiledShadow, CompiledStep, CompiledTarget, Hedge, RetryPolicy,
    SpendLimit, Timeouts,
};
use crate::health::gate::Forced;
use crate::health::spend::{SpendGuard, Spent};
use crate::health::{HealthRegistry, SharedBudget, TargetHealth};
use crate::llm::ChatRequest;
use crate::policy::{MidStream, OverrideState};

use crate::llm::{ClassSet, RequestFeature};
use crate::provider::{InvalidBackend, Provider};

pub use store::{LinkStatus, PolicyStore};

/// One provider + model (+ key) a chain can send to, live.
#[derive(Debug)]
pub struct Target {
    /// The provider.
    pub provider: Arc<Provider>,
    /// The model name sent to it.
    pub model: String,
    /// Which of the provider's keys to use.
    pub key: usize,
    /// This target's attempt time limit.
    pub attempt_timeout: std::time::Duration,
    /// Relative share within its step.
    pub weight: u32,
    /// `provider/model` (with `#n` for the n-th key when there are several).
    pub label: String,
    /// What identifies it across reloads and pods (see [`crate::chain::CompiledTarget`]).
    pub identity: String,
    /// What the sidecar knows of its health; shared across reloads.
    pub health: Arc<TargetHealth>,
    /// Requests the policy keeps away from this target (`skipFor`).
    pub skip_for: Vec<RequestFeature>,
    /// What it charges, if the policy says.
    pub price: Option<crate::chain::Price>,
    /// How its requests are adapted, if the policy says.
    pub adapt: Option<crate::chain::Adaptation>,
    /// Its spend against its `spendLimit`, if the policy sets one; shared by every key of its
    /// provider and across reloads.
    pub spend: Option<Arc<SpendGuard>>,
    /// How it is verified, if the policy verifies it.
    pub verify: Option<crate::chain::Verify>,
}

impl Target {
    /// Whether its spend window is spent now, and by how much.
    pub fn spent(&self) -> Option<Spent> {
        self.spend.as_ref()?.spent(crate::health::spend::unix_ms())
    }

    /// Why the policy keeps `request` away from this target, if it does.
    pub fn skip_for(&self, request: &ChatRequest) -> Option<String> {
        self.skip_for
            .iter()
            .find(|feature| request.uses(**feature))
            .map(|feature| format!("`skipFor` excludes requests with {}", feature.as_str()))
    }
}

/// One step of a chain: its targets, balanced.
#[derive(Debug)]
pub struct Step {
    /// The step's targets.
    pub members: Vec<Arc<Target>>,
}

/// A live route: the chain for one model alias, with the settings that govern it.
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
    /// Shadow comparison, if enabled.
    pub shadow: Option<Arc<Shadow>>,
    /// What a stream that fails after its first chunk does.
    pub mid_stream: MidStream,
}

/// A route's shadow comparison, live.
#[derive(Debug)]
pub struct Shadow {
    /// The shadow target, one per key of its provider. Their health is their own: a shadow
    /// never opens a breaker, reports to the fleet, or shows in status.
    pub targets: Vec<Arc<Target>>,
    /// Share of eligible requests shadowed, 0 to 1.
    pub share: f64,
    /// How long a shadow request may take.
    pub timeout: std::time::Duration,
    /// Whether prompt and answer text are recorded.
    pub capture_content: bool,
    /// Shadow requests in flight.
    pub slots: Arc<tokio::sync::Semaphore>,
}

impl Route {
    /// Every target of its chains, special chains included (a target may appear twice).
    pub fn targets(&self) -> impl Iterator<Item = &Arc<Target>> {
        self.steps
            .iter()
            .chain(&self.on_context_window_exceeded)
            .chain(&self.on_content_filtered)
            .flat_map(|step| &step.members)
    }
}

/// An immutable, live set of policies: the file's one, or every policy the operator serves
/// the pod. A route's alias is taken from the first policy (in name order) that routes it.
#[derive(Debug)]
pub struct PolicySnapshot {
    /// `namespace/name` of the policies it came from, or why there are none.
    pub source: String,
    /// Set by the [`PolicyStore`] when published; increases with every reload.
    pub version: u64,
    /// The content digest of what was compiled: a policy's, or the operator's config version.
    pub digest: String,
    routes: HashMap<String, Arc<Route>>,
    catch_all: Option<Arc<Route>>,
    aliases: Vec<String>,
    redacted: Vec<Value>,
}

impl PolicySnapshot {
    /// Binds `compiled` to live providers and to the health state in `health`. Nothing in
    /// `health` changes unless every provider could be built.
    pub fn assemble(compiled: &CompiledPolicy, health: &HealthRegistry) -> Result<PolicySnapshot, InvalidBackend> {
        PolicySnapshot::assemble_all(std::slice::from_ref(compiled), compiled.digest(), health)
    }

    /// Binds several policies at once, as one snapshot versioned `digest`. Nothing in `health`
    /// changes unless every provider of every policy could be built.
    pub fn assemble_all(
        policies: &[CompiledPolicy],
        digest: String,
        health: &HealthRegistry,
    ) -> Result<PolicySnapshot, InvalidBackend> {
        let (now, now_ms) = (tokio::time::Instant::now(), crate::chain::unix_ms_now());
        let mut routes = HashMap::new();
        let mut catch_all = None;
        let mut aliases = Vec::new();
        let mut bound = Vec::new();
        for compiled in policies {
            let providers = compiled
                .providers
                .iter()
                .map(|config| Provider::build(config).map(Arc::new))
                .collect::<Result<Vec<_>, _>>()?;
            let mut binder = Binder {
                compiled,
                providers: &providers,
                health,
                targets: Vec::new(),
                spends: Vec::new(),
                now,
                now_ms,
            };
            let mut budgets = Vec::new();
            for config in &compiled.routes {
                let shadowed =
                    if config.alias == "*" { catch_all.is_some() } else { routes.contains_key(&config.alias) };
                if shadowed {
                    continue;
                }
                let budget = health.budget(&config.alias, compiled.budget);
                budgets.push(budget.clone());
                let route = Arc::new(binder.route(config, budget)?);
                if config.alias == "*" {
                    catch_all = Some(route);
                } else {
                    aliases.push(config.alias.clone());
                    routes.insert(config.alias.clone(), route);
                }
            }
            bound.push((binder.targets, budgets, binder.spends));
        }
        for (compiled, (targets, budgets, spends)) in policies.iter().zip(bound) {
            for (guard, limit) in spends {
                guard.reconfigure(limit);
            }
            health.apply(&targets, &compiled.breaker, &budgets, compiled.budget);
        }
        let sources: Vec<&str> = policies.iter().map(|p| p.source.as_str()).collect();
        Ok(PolicySnapshot {
            source: if sources.is_empty() { "no policy".to_string() } else { sources.join(", ") },
            version: 0,
            digest,
            routes,
            catch_all,
            aliases,
            redacted: policies.iter().map(|p| p.document.clone()).collect(),
        })
    }

    /// Every chain target of every route (a target may appear more than once).
    pub fn targets(&self) -> impl Iterator<Item = &Arc<Target>> {
        self.routes.values().chain(&self.catch_all).flat_map(|route| route.targets())
    }

    /// The chain target `identity` names, from whichever route has it.
    pub fn target(&self, identity: &str) -> Option<Arc<Target>> {
        self.targets().find(|target| target.identity == identity).cloned()
    }

    /// The route for a requested model alias.
    pub fn route(&self, model: &str) -> Option<&Arc<Route>> {
        self.routes.get(model).or(self.catch_all.as_ref())
    }

    /// Whether it routes nothing at all (no policy selects the pod).
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty() && self.catch_all.is_none()
    }

    /// The aliases apps may ask for, in policy order (the catch-all excluded).
    pub fn aliases(&self) -> &[String] {
        &self.aliases
    }

    /// The policy documents with every secret value replaced, for `/config`.
    pub fn redacted(&self) -> &[Value] {
        &self.redacted
    }
}

/// What binding a compiled policy needs at hand.
struct Binder<'a> {
    compiled: &'a CompiledPolicy,
    providers: &'a [Arc<Provider>],
    health: &'a HealthRegistry,
    /// Every target's health and override, for the settings to apply once all is built.
    targets: Vec<(Arc<TargetHealth>, Option<Forced>)>,
    /// Every spend guard and its limit, likewise.
    spends: Vec<(Arc<SpendGuard>, SpendLimit)>,
    now: tokio::time::Instant,
    now_ms: i64,
}

impl Binder<'_> {
    fn route(&mut self, config: &CompiledRoute, budget: Arc<SharedBudget>) -> Result<Route, InvalidBackend> {
        Ok(Route {
            alias: config.alias.clone(),
            steps: self.chain(&config.steps)?,
            on_context_window_exceeded: self.chain(&config.on_context_window_exceeded)?,
            on_content_filtered: self.chain(&config.on_content_filtered)?,
            fallback_on: config.fallback_on,
            retry: config.retry,
            timeouts: config.timeouts,
            hedge: config.hedge,
            budget,
            overrides: config.overrides,
            shadow: config.shadow.as_ref().map(|shadow| self.shadow(shadow)).transpose()?,
            mid_stream: config.mid_stream,
        })
    }

    /// A shadow's targets, bound to their providers but not to the registry's health.
    fn shadow(&mut self, config: &CompiledShadow) -> Result<Arc<Shadow>, InvalidBackend> {
        let targets = config
            .targets
            .iter()
            .map(|target| {
                let health = Arc::new(TargetHealth::new(target.label.clone(), self.compiled.breaker.clone()));
                self.live(target, health).map(Arc::new)
            })
            .collect::<Result<_, _>>()?;
        Ok(Arc::new(Shadow {
            targets,
            share: config.share,
            timeout: config.timeout,
            capture_content: config.capture_content,
            slots: Arc::new(tokio::sync::Semaphore::new(config.max_concurrent as usize)),
        }))
    }

    fn chain(&mut self, steps: &[CompiledStep]) -> Result<Vec<Step>, InvalidBackend> {
        steps
            .iter()
            .map(|step| {
                let members = step.members.iter().map(|t| self.target(t).map(Arc::new)).collect::<Result<_, _>>()?;
                Ok(Step { members })
            })
            .collect()
    }

    fn target(&mut self, config: &CompiledTarget) -> Result<Target, InvalidBackend> {
        let health = self.health.target(&config.identity, &config.label, &self.compiled.breaker);
        self.targets.push((health.clone(), self.forced(&config.identity)));
        let mut target = self.live(config, health)?;
        if let Some(limit) = &config.spend_limit {
            let guard = self.health.spend(limit);
            self.spends.push((guard.clone(), limit.clone()));
            target.spend = Some(guard);
        }
        Ok(target)
    }

    fn live(&self, config: &CompiledTarget, health: Arc<TargetHealth>) -> Result<Target, InvalidBackend> {
        let provider = self
            .providers
            .get(config.provider)
            .ok_or_else(|| InvalidBackend::UnknownProvider { target: config.label.clone() })?
            .clone();
        Ok(Target {
            provider,
            model: config.model.clone(),
            key: config.key,
            attempt_timeout: config.attempt_timeout,
            weight: config.weight,
            label: config.label.clone(),
            identity: config.identity.clone(),
            health,
            skip_for: config.skip_for.clone(),
            price: config.price,
            adapt: config.adapt.clone(),
            spend: None,
            verify: config.verify.clone(),
        })
    }
}

impl Binder<'_> {
    /// The policy's override of the target `identity`, in this pod's clock, if one is in force.
    fn forced(&self, identity: &str) -> Option<Forced> {
        let found = self
            .compiled
            .overrides
            .iter()
            .find(|o| o.active_at(self.now_ms) && o.identities.iter().any(|i| i == identity))?;
        let until = found
            .until_ms
            .map(|until| self.now + std::time::Duration::from_millis(u64::try_from(until - self.now_ms).unwrap_or(0)));
        Some(Forced {
            open: found.state == OverrideState::ForcedOpen,
            since: self.now,
            until,
            reason: found.reason.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{DEMO_POLICY as POLICY, compiled};

    #[test]
    fn health_state_survives_a_reload_and_a_new_key_is_a_new_target() {
        let store = PolicyStore::new();
        store.publish(&compiled(POLICY)).expect("binds");
        let first = store.load().expect("published");
        store.publish(&compiled(POLICY)).expect("binds");
        let second = store.load().expect("published");
        let chat = |s: &PolicySnapshot| s.route("chat").expect("route").clone();
        let (a, b) = (chat(&first), chat(&second));
        assert!(Arc::ptr_eq(&a.steps[0].members[0].health, &b.steps[0].members[0].health));
        assert!(Arc::ptr_eq(&a.budget, &b.budget));
        store.publish(&compiled(&POLICY.replace("sk-secret-123", "sk-rotated"))).expect("binds");
        let third = store.load().expect("published");
        assert!(!Arc::ptr_eq(&a.steps[0].members[0].health, &chat(&third).steps[0].members[0].health));
        assert_eq!(third.route("anything").map(|r| r.alias.as_str()), Some("*"));
        assert_eq!(third.aliases(), ["chat"]);
    }

    #[test]
    fn the_store_publishes_increasing_versions_and_refuses_what_cannot_be_bound() {
        let store = PolicyStore::new();
        assert!(store.load().is_none());
        assert_eq!(store.publish(&compiled(POLICY)), Ok(1));
        let held = store.load().expect("published");
        assert_eq!(store.publish(&compiled(POLICY)), Ok(2));
        assert_eq!(held.version, 1, "a held snapshot never changes");
        let mut broken = compiled(POLICY);
        broken.routes[0].steps[0].members[0].provider = 9;
        assert!(matches!(store.publish(&broken), Err(InvalidBackend::UnknownProvider { .. })));
        let mut bad_url = compiled(POLICY);
        bad_url.providers[0].base_url = "not a url".into();
        assert!(matches!(store.publish(&bad_url), Err(InvalidBackend::BaseUrl { .. })));
        assert_eq!(store.load().map(|s| s.version), Some(2), "nothing that failed to bind was published");
        assert_eq!(store.load().map(|s| s.digest.clone()), Some(compiled(POLICY).digest()));
    }
}
