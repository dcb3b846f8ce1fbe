//! The `FallbackPolicy` custom resource: the serde and schema types users write, with no I/O.
//!
//! These types mirror the YAML exactly (strings for durations, optional fields for defaults);
//! [`crate::chain`] turns them into a compiled policy that cannot hold an invalid state. The
//! `///` docs on every field are what `kubectl explain fallbackpolicy.spec...` shows.
//! [`document`] reads a policy file; [`crd`] prints the CustomResourceDefinition.

pub mod adapt;
pub mod crd;
pub mod document;
pub mod duration_schema;

pub use adapt::{AdaptSpec, CapSpec, Parameter, ParametersSpec, ReasoningEffort, ShadowSpec, SystemPromptSpec};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;

use crate::llm::{FailureClass, RequestFeature};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of every Backstop resource.
pub const GROUP: &str = "backstop.dev";
/// The API version of `FallbackPolicy`.
pub const API_VERSION: &str = "backstop.dev/v1alpha1";

/// A fallback policy: which provider targets serve each model alias a pod's apps ask for, in
/// what order, and when a failure at one target moves the request on to the next.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "backstop.dev",
    version = "v1alpha1",
    kind = "FallbackPolicy",
    plural = "fallbackpolicies",
    shortname = "fbp",
    category = "backstop",
    namespaced,
    status = "FallbackPolicyStatus",
    doc = "A fallback policy: ordered chains of LLM provider targets per model alias, and when to move on to the next.",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Routes","type":"integer","jsonPath":".status.routes"}"#,
    printcolumn = r#"{"name":"Sidecars","type":"integer","jsonPath":".status.sidecars.connected"}"#,
    printcolumn = r#"{"name":"Degraded","type":"integer","jsonPath":".status.degraded"}"#,
    printcolumn = r#"{"name":"Verified","type":"string","jsonPath":".status.conditions[?(@.type==\"BackupsVerified\")].status"}"#,
    printcolumn = r#"{"name":"Version","type":"string","priority":1,"jsonPath":".status.compiledVersion"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FallbackPolicySpec {
    /// Which pods' sidecars take this policy, by pod label. Omitted: every pod in the
    /// namespace. Ignored when the sidecar reads the policy from a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,

    /// The upstream LLM APIs that chain targets name. Names must be unique.
    #[schemars(length(min = 1, max = 64), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub providers: Vec<ProviderSpec>,

    /// Model aliases the app may send as `model`, each with its ordered chain of targets.
    /// A route whose `model` is `*` catches every alias no other route names.
    #[schemars(length(min = 1, max = 256), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["model"]))]
    pub routes: Vec<RouteSpec>,

    /// Failure classes that move a request on to the next target in the chain. Default: every
    /// class except `badRequest`, `contextWindowExceeded` and `contentFiltered`, which would
    /// fail the same way everywhere and are returned to the app as the provider sent them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 11), extend("x-kubernetes-list-type" = "set"))]
    pub fallback_on: Option<Vec<FailureClass>>,

    /// How often one target is retried before the chain moves on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,

    /// Time limits for one attempt, the first streamed token, and the whole request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<TimeoutsSpec>,

    /// When a target is taken out of rotation, and how it is let back in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreakerSpec>,

    /// Request headers an app may use to tighten this policy for one request: `noFallback`
    /// honours `x-backstop-no-fallback: true`, `maxAttempts` honours `x-backstop-max-attempts:
    /// N` (lower only), `deadline` honours `x-backstop-deadline: 5s` (shorter only), `drill`
    /// honours `x-backstop-drill: primary/gpt-4o` (skip the named targets, to test the fallback
    /// path). Headers not allowed here are ignored and logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub allow_request_overrides: Option<Vec<RequestOverride>>,

    /// Targets forced out of rotation (a drain for an incident or a drill) or kept in it
    /// whatever their breakers say, in every pod the policy selects, optionally until a time.
    /// Sidecars apply a change within a second and end an override at its `until` by their own
    /// clock, with or without the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["target"]))]
    pub overrides: Option<Vec<TargetOverrideSpec>>,

    /// Verification of the chains' targets: a small real request to each target, on a
    /// schedule, so that a backup that quietly stopped working (a revoked key, a retired model,
    /// an exhausted quota) shows in `status.targets[].verified` and the `BackupsVerified`
    /// condition before an outage needs it. One pod per target, chosen by the operator, sends
    /// each probe, however many pods the policy selects. Probes never count as app traffic and
    /// never open a breaker. A chain target's own `verify` overrides these settings or turns
    /// verification off for it. Omitted: no target is verified unless its own `verify` says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifySpec>,
}

/// Verification probes (see `spec.verify`). Every field is optional; `verify: {}` verifies
/// every target every 15 minutes with a one-token answer.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VerifySpec {
    /// `false` leaves the target out of verification (on a chain target: the primary, say,
    /// which live traffic already proves). Default `true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,

    /// How often each target is probed, from `10s` to `24h`. Default `15m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "duration_schema::at_least_10s")]
    pub every: Option<String>,

    /// The probe's one user message. Default `Reply with OK.`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1000))]
    pub prompt: Option<String>,

    /// The most tokens the probe's answer may have, 1 to 4096. Default 1: a probe checks that
    /// the target answers, not what it says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4096))]
    pub max_tokens: Option<u32>,

    /// How long a probe may take before it counts as failed (`timeout`). Default `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "duration_schema::schema")]
    pub timeout: Option<String>,
}

/// A manual override of one target's (or one provider's) state.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetOverrideSpec {
    /// Which targets: `provider/model` (every key of it), `provider/model#2` (its second key),
    /// or `provider` (every target of that provider).
    #[schemars(length(min = 1, max = 200))]
    pub target: String,

    /// `ForcedOpen` sends the target nothing: requests move on down the chain as if its breaker
    /// were open, and it is never tried as a last resort. `ForcedClosed` sends it requests
    /// whatever its breaker and the fleet say, for a breaker that misjudges a target.
    pub state: OverrideState,

    /// When the override ends, as an RFC 3339 time such as `2026-12-01T03:00:00Z`. Omitted: it
    /// lasts until it is removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "timestamp_schema")]
    pub until: Option<String>,

    /// Why, as status, Events and the sidecar's `/health` show it.
    #[schemars(length(min = 1, max = 256))]
    pub reason: String,
}

/// An override's `until` that is not an RFC 3339 time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not an RFC 3339 time such as 2026-12-01T03:00:00Z")]
pub struct NotATime(pub String);

impl TargetOverrideSpec {
    /// `until` in milliseconds since the Unix epoch; `None` when it lasts until removed.
    pub fn until_unix_ms(&self) -> Result<Option<i64>, NotATime> {
        self.until
            .as_deref()
            .map(|until| {
                until
                    .parse::<k8s_openapi::jiff::Timestamp>()
                    .map(|t| t.as_millisecond())
                    .map_err(|_| NotATime(until.to_string()))
            })
            .transpose()
    }
}

impl FallbackPolicySpec {
    /// Why `selector` is not a label selector Kubernetes can evaluate, if it is not.
    pub fn selector_problem(&self) -> Option<String> {
        let selector = self.selector.as_ref()?;
        kube::core::Selector::try_from(selector.clone()).err().map(|error| error.to_string())
    }
}

/// What an override does to its targets.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum OverrideState {
    /// No request goes to the target.
    ForcedOpen,
    /// Requests go to the target whatever its breaker and the fleet say.
    ForcedClosed,
}

impl OverrideState {
    /// The name users write.
    pub fn as_str(self) -> &'static str {
        match self {
            OverrideState::ForcedOpen => "ForcedOpen",
            OverrideState::ForcedClosed => "ForcedClosed",
        }
    }
}

fn timestamp_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "string", "format": "date-time", "maxLength": 64})
}

/// Whose evidence opens a target's breaker.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum BreakerScope {
    /// Every pod's: sidecars report what their targets do, the operator merges the reports, and
    /// a target the fleet's evidence condemns is opened in every pod. A pod's own evidence
    /// still opens its own breaker at once.
    #[default]
    Fleet,
    /// The pod's own only.
    Pod,
}

/// A per-request control an app may send as a header, when the policy allows it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum RequestOverride {
    /// `x-backstop-no-fallback: true`: try only the first step of the chain.
    NoFallback,
    /// `x-backstop-max-attempts: N`: at most N attempts for this request.
    MaxAttempts,
    /// `x-backstop-deadline: DURATION`: a shorter total deadline for this request.
    Deadline,
    /// `x-backstop-drill: TARGET[, TARGET...]`: a fallback drill. The named targets
    /// (`provider/model`, `provider/model#2` or `provider`) are skipped as if drained, so the
    /// request walks the fallback path on purpose; the answer says `x-backstop-drill: true`
    /// and lists them as `=drill` in `x-backstop-fallback-reason`.
    Drill,
}

/// Circuit-breaker settings, applied to every target (provider + model + key) separately.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{"rule": "!has(self.openFor) || !has(self.maxOpenFor) || duration(self.maxOpenFor) >= duration(self.openFor)", "message": "`maxOpenFor` must not be shorter than `openFor`"}]))]
pub struct CircuitBreakerSpec {
    /// Consecutive counted failures that open a target's breaker. Default 5; 0 turns this
    /// rule off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 1_000_000))]
    pub consecutive_failures: Option<u32>,

    /// Opens a breaker when this share of recent requests failed. Default: 50% over `30s`,
    /// once at least 20 requests were seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_rate: Option<FailureRateSpec>,

    /// How long a breaker stays open the first time. Each reopening without a recovery in
    /// between doubles it, up to `maxOpenFor`. A 429 or 503 with `Retry-After` keeps a target
    /// out at least that long. Default `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "duration_schema::schema")]
    pub open_for: Option<String>,

    /// The longest open period. Default `5m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "duration_schema::schema")]
    pub max_open_for: Option<String>,

    /// Probe requests let through at once when the open period ends; a probe's success closes
    /// the breaker. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub half_open_probes: Option<u32>,

    /// Failure classes that count against a target. Default: `rateLimited`, `overloaded`,
    /// `serverError`, `timeout`, `connectError`, `authError`, `quotaExceeded`. `badRequest`
    /// may not be listed: it says nothing about the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 11), extend("x-kubernetes-list-type" = "set", "x-kubernetes-validations" = [{"rule": "!self.exists(c, c == 'badRequest')", "message": "`badRequest` says nothing about the target and cannot count against it"}]))]
    pub count_on: Option<Vec<FailureClass>>,

    /// `fleet` (the default): one pod's evidence of an outage, merged with every other pod's
    /// by the operator, opens the target in every pod within a second, and recovery is probed
    /// by a few pods rather than all. `pod`: each sidecar's breakers act on its own evidence
    /// only. Ignored when the sidecar reads the policy from a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<BreakerScope>,
}

/// The failure-rate rule of a circuit breaker.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FailureRateSpec {
    /// Failure share, 1 to 100, that opens the breaker. Default 50.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub percent: Option<u32>,
    /// How far back requests are counted. Default `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "duration_schema::schema")]
    pub window: Option<String>,
    /// Requests the window must hold before the rule applies. Default 20.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub min_requests: Option<u32>,
}

/// One upstream LLM API endpoint and its credentials.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{"rule": "!(has(self.apiKey) && has(self.apiKeys))", "message": "set either `apiKey` or `apiKeys`, not both"}, {"rule": "!has(self.mock) || self.type == 'mock'", "message": "`mock` is only valid with `type: mock`"}, {"rule": "self.type != 'mock' || !has(self.baseUrl)", "message": "a `mock` provider has no `baseUrl`"}, {"rule": "!(self.type in ['openai-compatible', 'azure-openai']) || has(self.baseUrl)", "message": "`baseUrl` is required for `openai-compatible` and `azure-openai`"}, {"rule": "!has(self.apiVersion) || self.type in ['anthropic', 'azure-openai']", "message": "`apiVersion` is only valid with `type: anthropic` or `type: azure-openai`"}, {"rule": "!has(self.defaultMaxTokens) || self.type == 'anthropic'", "message": "`defaultMaxTokens` is only valid with `type: anthropic`"}]))]
pub struct ProviderSpec {
    /// The name chain targets use to refer to this provider, unique within the policy.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[^/#=,]+$"))]
    pub name: String,

    /// Which wire API this provider speaks.
    #[serde(rename = "type")]
    pub kind: ProviderKind,

    /// The API's base URL, as the provider's SDK takes it. Defaults per type: `openai`
    /// `https://api.openai.com/v1`, `anthropic` `https://api.anthropic.com`, `gemini`
    /// `https://generativelanguage.googleapis.com/v1beta`; `openai-compatible` (for example
    /// `http://vllm.inference:8000/v1`) and `azure-openai` (`https://RESOURCE.openai.azure.com`)
    /// have no default and require it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = r"^https?://[^/?#\s]+"))]
    pub base_url: Option<String>,

    /// Where the provider's API key comes from. Omit for keyless endpoints (a local vLLM or
    /// Ollama) and for `mock`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<ApiKeySource>,

    /// Several keys for one provider, instead of `apiKey`: every chain target that names this
    /// provider is balanced across them, and a 429 or 401 on one key moves to another before
    /// the chain falls through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub api_keys: Option<Vec<ApiKeySource>>,

    /// The API version: `anthropic-version` for `anthropic` (default `2023-06-01`),
    /// `api-version` for `azure-openai` (default `2024-10-21`; `v1` selects Azure's v1 API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub api_version: Option<String>,

    /// `max_tokens` sent to an `anthropic` provider when the app gave none (Messages requires
    /// it). Default 4096.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub default_max_tokens: Option<u64>,

    /// Behaviour of a `mock` provider; only valid with `type: mock`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mock: Option<MockSpec>,

    /// How this provider continues an answer another target began (see [`Continuation`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continuation: Option<Continuation>,
}

/// How a provider continues an answer another target began, for routes with
/// `midStream: continue`: `assistantPrefill` sends the text so far as a final assistant
/// message the model carries on from (Anthropic's Messages API; the default for `anthropic` and
/// `mock`; llama.cpp and Ollama servers do the same), `continueFinalMessage` does so with
/// vLLM's and SGLang's `continue_final_message: true` and `add_generation_prompt: false`, and
/// `none` (the default for every other type) never continues one: OpenAI's own API and Gemini
/// answer a final assistant message with a new turn.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Continuation {
    /// It cannot: the stream fails as it would without `midStream: continue`.
    #[default]
    None,
    /// The text so far as a final assistant message, which the model continues.
    AssistantPrefill,
    /// The same, with `continue_final_message: true` and `add_generation_prompt: false`.
    ContinueFinalMessage,
}

impl Continuation {
    /// How a provider of type `kind` continues an answer when the policy does not say.
    pub fn of_type(kind: ProviderKind) -> Continuation {
        match kind {
            ProviderKind::Anthropic | ProviderKind::Mock => Continuation::AssistantPrefill,
            _ => Continuation::None,
        }
    }

    /// Whether the provider cannot continue an answer.
    pub fn is_none(&self) -> bool {
        *self == Continuation::None
    }

    /// The name users write.
    pub fn as_str(self) -> &'static str {
        match self {
            Continuation::None => "none",
            Continuation::AssistantPrefill => "assistantPrefill",
            Continuation::ContinueFinalMessage => "continueFinalMessage",
        }
    }
}

/// What happens when a stream fails after its first chunk reached the app (a cut connection,
/// an error event, an idle timeout). `fail` (the default) ends the app's stream with an error
/// event. `continue` sends the conversation and the text already streamed to the next target
/// whose provider can continue an answer (its `continuation`), and streams the rest to the app
/// in the same response, with nothing repeated or lost at the seam. Only text answers are
/// continued: a stream with a tool call, a request for JSON output, with `n` above 1, with
/// Anthropic `thinking`, or from the Responses API fails as with `fail`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum MidStream {
    /// The app's stream ends with an error event, never as a silently truncated answer.
    #[default]
    Fail,
    /// A text answer continues on the next target that can continue it, in the same stream.
    Continue,
}

impl MidStream {
    /// Whether it is the default, `fail`.
    pub fn is_fail(&self) -> bool {
        *self == MidStream::Fail
    }
}

/// The wire API a provider speaks.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum ProviderKind {
    /// OpenAI's API (Chat Completions), bearer-key authentication.
    #[serde(rename = "openai")]
    OpenAi,
    /// Any server that speaks OpenAI's Chat Completions API: vLLM, Ollama, Together, Groq ...
    #[serde(rename = "openai-compatible")]
    OpenAiCompatible,
    /// Anthropic's Messages API (`x-api-key`, `anthropic-version`).
    #[serde(rename = "anthropic")]
    Anthropic,
    /// Google's Gemini API (`generateContent`, `x-goog-api-key`).
    #[serde(rename = "gemini")]
    Gemini,
    /// Azure OpenAI: deployment URLs, `api-version`, `api-key`. The target's `model` is the
    /// deployment name.
    #[serde(rename = "azure-openai")]
    AzureOpenAi,
    /// A provider built into the sidecar that answers in-process, for demos, drills and tests.
    #[serde(rename = "mock")]
    #[default]
    Mock,
}

impl ProviderKind {
    /// The base URL a provider of this type has when the policy names none.
    pub fn default_base_url(self) -> Option<&'static str> {
        match self {
            ProviderKind::OpenAi => Some("https://api.openai.com/v1"),
            ProviderKind::Anthropic => Some("https://api.anthropic.com"),
            ProviderKind::Gemini => Some("https://generativelanguage.googleapis.com/v1beta"),
            ProviderKind::OpenAiCompatible | ProviderKind::AzureOpenAi | ProviderKind::Mock => None,
        }
    }

    /// The name users write in `type`.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "openai",
            ProviderKind::OpenAiCompatible => "openai-compatible",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Gemini => "gemini",
            ProviderKind::AzureOpenAi => "azure-openai",
            ProviderKind::Mock => "mock",
        }
    }
}

/// Where an API key comes from. Set exactly one field.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{"rule": "(has(self.value) ? 1 : 0) + (has(self.env) ? 1 : 0) + (has(self.secretKeyRef) ? 1 : 0) == 1", "message": "set exactly one of `value`, `env` or `secretKeyRef`"}]))]
pub struct ApiKeySource {
    /// The key itself. Only sensible in a local policy file; never shown by `/config`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,

    /// The name of an environment variable of the sidecar process that holds the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,

    /// A key in a Secret in the policy's namespace; resolved by the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<SecretKeyRef>,
}

/// A reference to one key of a Secret in the policy's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretKeyRef {
    /// The Secret's name.
    pub name: String,
    /// The key within the Secret's `data`.
    pub key: String,
}

/// Behaviour of a built-in `mock` provider. Every knob is optional; the default answers at
/// once, successfully.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MockSpec {
    /// The text every successful answer carries. Default: `Hello from the mock provider.`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,

    /// Delay before the answer's headers, as a duration such as `150ms` or `2s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "duration_schema::schema")]
    pub latency: Option<String>,

    /// For streams, a further delay between the headers and the first content chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "duration_schema::schema")]
    pub first_token_latency: Option<String>,

    /// How many content chunks a streamed answer is cut into. Default 4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000))]
    pub chunks: Option<u32>,

    /// Share of requests, from 0 to 1, answered with `failureStatus` instead of a reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub failure_rate: Option<f64>,

    /// HTTP status of a failure, for example 429, 500, 503 or 529. Default 503.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 400, max = 599))]
    pub failure_status: Option<u16>,

    /// Seconds sent as `Retry-After` with a 429 or 503 failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u32>,

    /// Seed for the failure draw, so a drill fails the same requests every run. Omitted: a
    /// fresh random sequence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,

    /// Cuts every streamed answer's connection after this many content chunks, as a provider
    /// that drops mid-answer would, to drill `midStream`. A continuation (another target's
    /// answer this mock carries on) is never cut.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000))]
    pub stream_cut_after: Option<u32>,
}

/// One model alias and the chain of targets that serve it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteSpec {
    /// The `model` value the app sends, such as `chat`; `*` matches every alias no other route
    /// names. Unique within the policy.
    #[schemars(length(min = 1, max = 253))]
    pub model: String,

    /// Targets tried in order. Each step is either one target (`provider` and `model`) or a
    /// `group` of targets balanced by weight.
    #[schemars(length(min = 1, max = 32))]
    pub chain: Vec<ChainStepSpec>,

    /// A chain to switch to when a target says the prompt is longer than its context window
    /// (typically models with larger windows). Without it, that error goes back to the app.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32))]
    pub on_context_window_exceeded: Option<Vec<ChainStepSpec>>,

    /// A chain to switch to when a target's content filter refuses the request. Without it,
    /// that error goes back to the app.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32))]
    pub on_content_filtered: Option<Vec<ChainStepSpec>>,

    /// Hedging: when the current target has not produced its first token after a delay, start
    /// the next target too; the first to produce a token answers and the other is cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hedge: Option<HedgeSpec>,

    /// Shadow comparison: a sampled share of the requests this route's first target answered
    /// at once is also sent, in the background, to another target, and both answers are
    /// compared in telemetry (model, latency, tokens, cost, finish reason, length ratio, exact
    /// match of tool calls and JSON output). The app's answer is never delayed or changed, and
    /// no shadow runs while the route is retrying or falling through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowSpec>,

    /// What happens when a stream fails after its first chunk reached the app (see [`MidStream`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mid_stream: Option<MidStream>,
}

/// Hedging on slow first tokens.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HedgeSpec {
    /// How long to wait for a first token (for non-streamed requests, the answer) before
    /// starting the next target, such as `2s`.
    #[schemars(schema_with = "duration_schema::schema")]
    pub after_first_token_delay: String,
    /// Extra targets one request may start this way, 1 to 3. Default 1. Hedges count against
    /// the retry budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3))]
    pub max_extra: Option<u32>,
}

/// One step of a chain: a single target, or a weighted group of equivalent targets.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{"rule": "has(self.group) ? !has(self.provider) && !has(self.model) && !has(self.timeout) && !has(self.price) && !has(self.adapt) && !has(self.spendLimit) && !has(self.verify) : has(self.provider) && has(self.model)", "message": "set either `group`, or `provider` and `model`"}]))]
pub struct ChainStepSpec {
    /// The provider's `name`. Set with `model`, or use `group` instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,

    /// The model name sent to the provider, such as `gpt-4o`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,

    /// Per-attempt time limit for this target, overriding `timeouts.attempt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "duration_schema::schema")]
    pub timeout: Option<String>,

    /// Requests this target should not be sent, such as `[tools]` for a model that handles
    /// them poorly: the chain skips it for them (reason `ineligible`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip_for: Option<Vec<RequestFeature>>,

    /// What this target charges, for the cost on each attempt's span and in the
    /// `backstop.cost` metric. Set with `provider` and `model`; a group's members set their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<PriceSpec>,

    /// How requests to this target are adapted, after they are translated into its API:
    /// parameters set, capped or removed (each named once for every API: `maxTokens` is
    /// `max_completion_tokens` for OpenAI, `max_tokens` for Anthropic, `maxOutputTokens` for
    /// Gemini), and text put before and after the system prompt. A parameter the target's API
    /// cannot take is a policy error. Set with `provider` and `model`; a group's members set
    /// their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapt: Option<AdaptSpec>,

    /// What this target may cost the whole fleet per window (see [`SpendLimitSpec`]). Set with
    /// `provider`, `model` and `price`; a group's members set their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spend_limit: Option<SpendLimitSpec>,

    /// This target's verification, over `spec.verify` (`{enabled: false}` leaves it out). Set
    /// with `provider` and `model`; a group's members set their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifySpec>,

    /// Equivalent targets (keys, regions, endpoints of one model) that share this step; each
    /// request picks one by weight. Set instead of `provider` and `model`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32))]
    pub group: Option<Vec<GroupMemberSpec>>,
}

/// One member of a load-balanced chain step.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GroupMemberSpec {
    /// The provider's `name`.
    pub provider: String,

    /// The model name sent to the provider.
    pub model: String,

    /// Per-attempt time limit for this member, overriding `timeouts.attempt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "duration_schema::schema")]
    pub timeout: Option<String>,

    /// Relative share of the step's requests, 1 to 1000. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub weight: Option<u32>,

    /// Requests this member should not be sent (see the step's `skipFor`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip_for: Option<Vec<RequestFeature>>,

    /// What this member charges (see the step's `price`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<PriceSpec>,

    /// How requests to this member are adapted (see the step's `adapt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapt: Option<AdaptSpec>,

    /// What this member may cost the whole fleet per window (see the step's `spendLimit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spend_limit: Option<SpendLimitSpec>,

    /// This member's verification (see the step's `verify`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifySpec>,
}

/// A cap on what one target (its provider and model, every key) may cost the whole fleet per
/// window, such as `{per: 1h, usd: 50}`: every pod's attempts at it, priced by its `price`, add
/// up, and once they reach `usd` within a window the target is passed over (reason
/// `spendLimit`) by every pod until the window rolls. Windows are aligned to the clock: `1h`
/// windows start on the hour (UTC). Each sidecar also counts its own attempts, so the cap holds
/// while the operator is away, for that pod alone.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SpendLimitSpec {
    /// The window, from `10s` to `24h`, such as `1h`.
    #[schemars(schema_with = "duration_schema::at_least_10s")]
    pub per: String,
    /// US dollars the window may spend.
    #[schemars(range(min = 0.0, max = 10000000.0))]
    pub usd: f64,
}

/// A target's prices, in US dollars per million tokens.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PriceSpec {
    /// Per million input tokens.
    #[schemars(range(min = 0.0, max = 100000.0))]
    pub input: f64,
    /// Per million output tokens.
    #[schemars(range(min = 0.0, max = 100000.0))]
    pub output: f64,
    /// Per million input tokens read from the provider's prompt cache. Default: `input`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 100000.0))]
    pub cached_input: Option<f64>,
    /// Per million input tokens written to the provider's prompt cache (Anthropic's
    /// `cache_creation_input_tokens`). Default: 1.25 × `input`, Anthropic's price for its
    /// 5-minute cache; its 1-hour cache costs 2 × `input`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 100000.0))]
    pub cache_write: Option<f64>,
}

/// Retries of one target before the chain moves on.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetrySpec {
    /// Attempts per target, the first included, for transient failures (`rateLimited`,
    /// `overloaded`, `serverError`, `timeout`, `connectError`). 1 to 10; default 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10))]
    pub attempts: Option<u32>,

    /// Exponential backoff with jitter between attempts at one target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<BackoffSpec>,

    /// Retries, fall-throughs and hedges of a route may add at most this percentage of its
    /// requests over the last 10 s (plus `minRetriesPerSecond`); beyond it a request gets its
    /// own error instead of adding load to an outage. 0 to 1000; default 20.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 1000))]
    pub budget_percent: Option<u32>,

    /// Extra attempts always allowed per second, however little traffic there is. Default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 10_000))]
    pub min_retries_per_second: Option<u32>,

    /// A hard cap on attempts per request, across every target. 1 to 20; default 6.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 20))]
    pub max_request_attempts: Option<u32>,
}

/// Exponential backoff: the n-th retry waits about `base * 2^(n-1)`, capped at `max`, with
/// jitter. A provider's `Retry-After` is honoured: the target is not retried sooner, and if
/// that is later than `max` or the request's deadline the chain moves on at once instead.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{"rule": "!has(self.base) || !has(self.max) || duration(self.max) >= duration(self.base)", "message": "`max` must not be shorter than `base`"}]))]
pub struct BackoffSpec {
    /// The first retry's delay. Default `200ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "duration_schema::schema")]
    pub base: Option<String>,
    /// The longest delay between attempts. Default `2s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "duration_schema::schema")]
    pub max: Option<String>,
}

/// Time limits, as durations such as `500ms`, `30s` or `1m30s`. The defaults let real long
/// generations finish: a reasoning model may think for a minute before its first token and a
/// long answer may take minutes; a stalled target is still left behind, and `hedge` is the
/// tool for routes that cannot wait.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TimeoutsSpec {
    /// A non-streamed answer: from the start of an attempt until the whole answer has come.
    /// Providers send nothing before the answer is complete, so this is also how long a
    /// stalled target keeps a request waiting. Default `10m`, the OpenAI and Anthropic SDKs'
    /// own limit, so that a long generation is never cut and paid for twice. A chain step's
    /// `timeout` overrides it for that target (and caps its `firstToken` too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "duration_schema::schema")]
    pub attempt: Option<String>,

    /// A stream: from the start of an attempt until its first sign of progress, a content chunk
    /// or the model's thinking (events that show nothing, such as role chunks, `message_start`
    /// or pings, do not count). The stream is held, with nothing sent to the app, until its
    /// first content chunk, so a target slower than this falls through invisibly. Default
    /// `2m`: reasoning models often think silently for 10 to 60 s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "duration_schema::schema")]
    pub first_token: Option<String>,

    /// A stream, once it has shown progress: the longest gap between two events, before the
    /// answer is committed (thinking) and after (content). A stream that stalls falls through
    /// while held, and is ended with an error event once committed. Default `60s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "duration_schema::schema")]
    pub idle: Option<String>,

    /// Finding a target that answers: the whole walk down the chain, every attempt and
    /// backoff included, until an answer is committed. A committed stream is not cut by it.
    /// Default `15m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "duration_schema::schema")]
    pub total: Option<String>,

    /// A cap on a committed stream's whole length, for routes that want one. Default: none; a
    /// healthy stream runs as long as its events keep coming within `idle`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "duration_schema::schema")]
    pub max_stream: Option<String>,
}

/// What the operator observed of a policy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FallbackPolicyStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Ready` is `True` once the policy compiled and sidecars can be served it; otherwise its
    /// reason (`InvalidPolicy`, `SecretNotFound`, `SecretKeyNotFound`) and message name the
    /// problem and its field path. An invalid generation leaves the last good one served.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// The version (a content digest) of the compiled policy sidecars are served. It changes
    /// with every change that matters to a sidecar, a rotated key included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compiled_version: Option<String>,

    /// How many routes the served version has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes: Option<u32>,

    /// The sidecars this policy is served to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecars: Option<SidecarsStatus>,

    /// Every target of the policy's chains and its state across the fleet: `Closed` (in
    /// rotation), `Open` or `HalfOpen` (taken out by the fleet's evidence, recovering through
    /// probes), `ForcedOpen` or `ForcedClosed` (by an override).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["target"]))]
    pub targets: Option<Vec<TargetStatus>>,

    /// How many targets are out of rotation fleet-wide now (open, half-open or forced open).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degraded: Option<u32>,
}

/// One target's state across the fleet.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetStatus {
    /// The target, as `provider/model` (with `#n` for the n-th key of a provider with several).
    pub target: String,
    /// Its state.
    pub state: TargetState,
    /// Why it is out of rotation, or forced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Since when it has been out of rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// When an open period or an override ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// Its last verification probe, when the policy verifies it (`spec.verify`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<VerifiedStatus>,
}

/// A target's last verification probe.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VerifiedStatus {
    /// When the operator heard its result.
    pub at: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
    /// `Passed` (the target answered) or `Failed`.
    pub outcome: VerifyOutcome,
    /// Why it failed, as a failure class (`authError`, `notFound`, `quotaExceeded`, `timeout` ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    /// The failure, as the provider put it (never a key, never an authentication error's body).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// How long the probe took, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
}

/// How a verification probe ended.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum VerifyOutcome {
    /// The target answered.
    Passed,
    /// It did not.
    Failed,
}

/// A target's state across the fleet.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum TargetState {
    /// In rotation (each pod's own breaker still acts on its own evidence).
    Closed,
    /// Out for every pod.
    Open,
    /// Out for every pod but the few that probe it.
    HalfOpen,
    /// Drained by an override.
    ForcedOpen,
    /// Kept in rotation by an override.
    ForcedClosed,
    /// Its `spendLimit` window is spent across the fleet: out until the window rolls.
    SpendLimit,
}

impl TargetState {
    /// Whether requests go to it.
    pub fn in_rotation(self) -> bool {
        matches!(self, TargetState::Closed | TargetState::ForcedClosed)
    }
}

/// How many sidecars the policy reaches, and how many run its current version.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SidecarsStatus {
    /// Sidecars connected to the operator and selected by this policy.
    pub connected: u32,
    /// Of those, how many applied `compiledVersion`.
    pub current: u32,
    /// Of those, how many rejected it (they keep serving their last good version).
    pub rejected: u32,
}
