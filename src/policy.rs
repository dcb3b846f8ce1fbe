//! The `FallbackPolicy` custom resource: the serde and schema types users write, with no I/O.
//!
//! These types mirror the YAML exactly (strings for durations, optional fields for defaults);
//! [`crate::chain`] turns them into runtime types that cannot hold an invalid state. The `///`
//! docs on every field are what `kubectl explain fallbackpolicy.spec...` shows.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
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
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FallbackPolicySpec {
    /// Which pods' sidecars take this policy, by pod label. Omitted: every pod in the
    /// namespace. Ignored when the sidecar reads the policy from a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,

    /// The upstream LLM APIs that chain targets name. Names must be unique.
    pub providers: Vec<ProviderSpec>,

    /// Model aliases the app may send as `model`, each with its ordered chain of targets.
    /// A route whose `model` is `*` catches every alias no other route names.
    pub routes: Vec<RouteSpec>,

    /// Failure classes that move a request on to the next target in the chain. Default: every
    /// class except `badRequest`, `contextWindowExceeded` and `contentFiltered`, which would
    /// fail the same way everywhere and are returned to the app as the provider sent them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
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
    /// N` (lower only), `deadline` honours `x-backstop-deadline: 5s` (shorter only). Headers not
    /// allowed here are ignored and logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_request_overrides: Option<Vec<RequestOverride>>,
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
}

/// Circuit-breaker settings, applied to every target (provider + model + key) separately.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CircuitBreakerSpec {
    /// Consecutive counted failures that open a target's breaker. Default 5; 0 turns this
    /// rule off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_failures: Option<u32>,

    /// Opens a breaker when this share of recent requests failed. Default: 50% over `30s`,
    /// once at least 20 requests were seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_rate: Option<FailureRateSpec>,

    /// How long a breaker stays open the first time. Each reopening without a recovery in
    /// between doubles it, up to `maxOpenFor`. A 429 or 503 with `Retry-After` keeps a target
    /// out at least that long. Default `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_for: Option<String>,

    /// The longest open period. Default `5m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_open_for: Option<String>,

    /// Probe requests let through at once when the open period ends; a probe's success closes
    /// the breaker. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub half_open_probes: Option<u32>,

    /// Failure classes that count against a target. Default: `rateLimited`, `overloaded`,
    /// `serverError`, `timeout`, `connectError`, `authError`, `quotaExceeded`. `badRequest`
    /// may not be listed: it says nothing about the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count_on: Option<Vec<FailureClass>>,
}

/// The failure-rate rule of a circuit breaker.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FailureRateSpec {
    /// Failure share, 1 to 100, that opens the breaker. Default 50.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u32>,
    /// How far back requests are counted. Default `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
    /// Requests the window must hold before the rule applies. Default 20.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_requests: Option<u32>,
}

/// One upstream LLM API endpoint and its credentials.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProviderSpec {
    /// The name chain targets use to refer to this provider, unique within the policy.
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
    pub base_url: Option<String>,

    /// Where the provider's API key comes from. Omit for keyless endpoints (a local vLLM or
    /// Ollama) and for `mock`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<ApiKeySource>,

    /// Several keys for one provider, instead of `apiKey`: every chain target that names this
    /// provider is balanced across them, and a 429 or 401 on one key moves to another before
    /// the chain falls through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_keys: Option<Vec<ApiKeySource>>,

    /// The API version: `anthropic-version` for `anthropic` (default `2023-06-01`),
    /// `api-version` for `azure-openai` (default `2024-10-21`; `v1` selects Azure's v1 API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,

    /// `max_tokens` sent to an `anthropic` provider when the app gave none (Messages requires
    /// it). Default 4096.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_max_tokens: Option<u64>,

    /// Behaviour of a `mock` provider; only valid with `type: mock`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mock: Option<MockSpec>,
}

/// The wire API a provider speaks.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
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
    Mock,
}

impl ProviderKind {
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
    pub latency: Option<String>,

    /// For streams, a further delay between the headers and the first content chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_token_latency: Option<String>,

    /// How many content chunks a streamed answer is cut into. Default 4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks: Option<u32>,

    /// Share of requests, from 0 to 1, answered with `failureStatus` instead of a reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_rate: Option<f64>,

    /// HTTP status of a failure, for example 429, 500, 503 or 529. Default 503.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_status: Option<u16>,

    /// Seconds sent as `Retry-After` with a 429 or 503 failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u32>,

    /// Seed for the failure draw, so a drill fails the same requests every run. Omitted: a
    /// fresh random sequence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

/// One model alias and the chain of targets that serve it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteSpec {
    /// The `model` value the app sends, such as `chat`; `*` matches every alias no other route
    /// names. Unique within the policy.
    pub model: String,

    /// Targets tried in order. Each step is either one target (`provider` and `model`) or a
    /// `group` of targets balanced by weight.
    pub chain: Vec<ChainStepSpec>,

    /// A chain to switch to when a target says the prompt is longer than its context window
    /// (typically models with larger windows). Without it, that error goes back to the app.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_context_window_exceeded: Option<Vec<ChainStepSpec>>,

    /// A chain to switch to when a target's content filter refuses the request. Without it,
    /// that error goes back to the app.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_content_filtered: Option<Vec<ChainStepSpec>>,

    /// Hedging: when the current target has not produced its first token after a delay, start
    /// the next target too; the first to produce a token answers and the other is cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hedge: Option<HedgeSpec>,
}

/// Hedging on slow first tokens.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HedgeSpec {
    /// How long to wait for a first token (for non-streamed requests, the answer) before
    /// starting the next target, such as `2s`.
    pub after_first_token_delay: String,
    /// Extra targets one request may start this way, 1 to 3. Default 1. Hedges count against
    /// the retry budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_extra: Option<u32>,
}

/// One step of a chain: a single target, or a weighted group of equivalent targets.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ChainStepSpec {
    /// The provider's `name`. Set with `model`, or use `group` instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,

    /// The model name sent to the provider, such as `gpt-4o`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,

    /// Per-attempt time limit for this target, overriding `timeouts.attempt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,

    /// Requests this target should not be sent, such as `[tools]` for a model that handles
    /// them poorly: the chain skips it for them (reason `ineligible`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip_for: Option<Vec<RequestFeature>>,

    /// Equivalent targets (keys, regions, endpoints of one model) that share this step; each
    /// request picks one by weight. Set instead of `provider` and `model`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
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
    pub timeout: Option<String>,

    /// Relative share of the step's requests, 1 to 1000. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,

    /// Requests this member should not be sent (see the step's `skipFor`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip_for: Option<Vec<RequestFeature>>,
}

/// A kind of request a target can be kept out of with `skipFor`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum RequestFeature {
    /// Requests that offer the model tools (function calling).
    Tools,
    /// Requests with image input.
    Images,
    /// Requests for JSON output (`response_format` of `json_object` or `json_schema`).
    StructuredOutput,
}

impl RequestFeature {
    /// The name users write.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestFeature::Tools => "tools",
            RequestFeature::Images => "images",
            RequestFeature::StructuredOutput => "structuredOutput",
        }
    }
}

/// How one failed request is classified. Each class is a reason a request can fall through.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum FailureClass {
    /// HTTP 429: the provider's rate limit.
    RateLimited,
    /// HTTP 503 or 529: the provider is overloaded or down.
    Overloaded,
    /// Any other 5xx, or a malformed answer.
    ServerError,
    /// No answer (or, for streams, no first token) within the time limit.
    Timeout,
    /// The connection could not be made or broke before an answer.
    ConnectError,
    /// HTTP 401 or 403: the key is wrong or lacks access at this provider.
    AuthError,
    /// HTTP 402, or a quota error body: the account is out of credit.
    QuotaExceeded,
    /// The prompt is longer than the model's context window.
    ContextWindowExceeded,
    /// The provider's content filter refused the prompt or the answer.
    ContentFiltered,
    /// Any other 4xx: the request itself is wrong and would fail everywhere.
    BadRequest,
    /// A 200 whose answer has no content and no tool call. Falls through only when listed in
    /// `fallbackOn`.
    EmptyCompletion,
}

impl FailureClass {
    /// Every class, in declaration order.
    pub const ALL: [FailureClass; 11] = [
        FailureClass::RateLimited,
        FailureClass::Overloaded,
        FailureClass::ServerError,
        FailureClass::Timeout,
        FailureClass::ConnectError,
        FailureClass::AuthError,
        FailureClass::QuotaExceeded,
        FailureClass::ContextWindowExceeded,
        FailureClass::ContentFiltered,
        FailureClass::BadRequest,
        FailureClass::EmptyCompletion,
    ];

    /// The name users write in `fallbackOn`.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::RateLimited => "rateLimited",
            FailureClass::Overloaded => "overloaded",
            FailureClass::ServerError => "serverError",
            FailureClass::Timeout => "timeout",
            FailureClass::ConnectError => "connectError",
            FailureClass::AuthError => "authError",
            FailureClass::QuotaExceeded => "quotaExceeded",
            FailureClass::ContextWindowExceeded => "contextWindowExceeded",
            FailureClass::ContentFiltered => "contentFiltered",
            FailureClass::BadRequest => "badRequest",
            FailureClass::EmptyCompletion => "emptyCompletion",
        }
    }

    /// Transient classes: retrying the same target later may succeed.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            FailureClass::RateLimited
                | FailureClass::Overloaded
                | FailureClass::ServerError
                | FailureClass::Timeout
                | FailureClass::ConnectError
        )
    }

    /// Classes that fall through when `fallbackOn` is not set.
    pub fn falls_through_by_default(self) -> bool {
        !matches!(
            self,
            FailureClass::BadRequest
                | FailureClass::ContextWindowExceeded
                | FailureClass::ContentFiltered
                | FailureClass::EmptyCompletion
        )
    }

    /// Classes that count against a target's circuit breaker when `countOn` is not set: the
    /// ones that say something about the target rather than the request.
    pub fn counts_against_target_by_default(self) -> bool {
        self.is_transient() || matches!(self, FailureClass::AuthError | FailureClass::QuotaExceeded)
    }
}

/// A set of failure classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ClassSet(u16);

impl ClassSet {
    /// The classes that fall through when `fallbackOn` is not set.
    pub fn default_fallback() -> Self {
        FailureClass::ALL.into_iter().filter(|c| c.falls_through_by_default()).collect()
    }

    /// The classes a breaker counts when `circuitBreaker.countOn` is not set.
    pub fn breaker_default() -> Self {
        FailureClass::ALL.into_iter().filter(|c| c.counts_against_target_by_default()).collect()
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

impl std::fmt::Display for FailureClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Retries of one target before the chain moves on.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetrySpec {
    /// Attempts per target, the first included, for transient failures (`rateLimited`,
    /// `overloaded`, `serverError`, `timeout`, `connectError`). 1 to 10; default 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,

    /// Exponential backoff with jitter between attempts at one target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<BackoffSpec>,

    /// Retries, fall-throughs and hedges of a route may add at most this percentage of its
    /// requests over the last 10 s (plus `minRetriesPerSecond`); beyond it a request gets its
    /// own error instead of adding load to an outage. 0 to 1000; default 20.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_percent: Option<u32>,

    /// Extra attempts always allowed per second, however little traffic there is. Default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_retries_per_second: Option<u32>,

    /// A hard cap on attempts per request, across every target. 1 to 20; default 6.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_request_attempts: Option<u32>,
}

/// Exponential backoff: the n-th retry waits about `base * 2^(n-1)`, capped at `max`, with
/// jitter. A provider's `Retry-After` is honoured: the target is not retried sooner, and if
/// that is later than `max` or the request's deadline the chain moves on at once instead.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackoffSpec {
    /// The first retry's delay. Default `200ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// The longest delay between attempts. Default `2s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<String>,
}

/// Time limits, as durations such as `500ms`, `30s` or `1m30s`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TimeoutsSpec {
    /// One attempt: until a complete answer, or for streams until the response headers and
    /// then between any two chunks. Default `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<String>,

    /// Streams only: from the start of an attempt until its first content chunk. A target that
    /// is slower falls through before the app has seen a byte. Default `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_token: Option<String>,

    /// The whole request across every attempt and backoff. Default `90s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<String>,
}

/// What the operator observed of a policy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FallbackPolicyStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Ready` is `True` once the policy compiled; otherwise its message names the problem.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// The CRD manifest generated from these types, as YAML.
pub fn crd_yaml() -> Result<String, serde_yaml_ng::Error> {
    use kube::CustomResourceExt;
    serde_yaml_ng::to_string(&FallbackPolicy::crd())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;
    use serde_json::Value;

    /// Collects every way `schema` breaks Kubernetes' structural-schema rules.
    fn structural_violations(schema: &Value, path: &str, in_logic: bool, out: &mut Vec<String>) {
        let Some(obj) = schema.as_object() else {
            out.push(format!("{path}: schema node is not an object"));
            return;
        };
        for key in ["$ref", "$defs", "definitions", "$schema"] {
            if obj.contains_key(key) {
                out.push(format!("{path}: has `{key}`"));
            }
        }
        let extension =
            obj.contains_key("x-kubernetes-int-or-string") || obj.contains_key("x-kubernetes-preserve-unknown-fields");
        if in_logic {
            for key in ["type", "description", "default", "additionalProperties", "nullable"] {
                if obj.contains_key(key) {
                    out.push(format!("{path}: `{key}` inside anyOf/oneOf/allOf/not"));
                }
            }
        } else if !obj.contains_key("type") && !extension {
            out.push(format!("{path}: no `type`"));
        }
        if let Some(Value::String(t)) = obj.get("type")
            && t == "array"
            && !obj.contains_key("items")
        {
            out.push(format!("{path}: array without `items`"));
        }
        if let Some(types) = obj.get("type")
            && !types.is_string()
        {
            out.push(format!("{path}: `type` must be one string, got {types}"));
        }
        if let Some(props) = obj.get("properties").and_then(Value::as_object) {
            for (name, sub) in props {
                structural_violations(sub, &format!("{path}.{name}"), in_logic, out);
            }
        }
        if let Some(items) = obj.get("items") {
            structural_violations(items, &format!("{path}[]"), in_logic, out);
        }
        if let Some(extra) = obj.get("additionalProperties")
            && extra.is_object()
        {
            structural_violations(extra, &format!("{path}{{}}"), in_logic, out);
        }
        for key in ["anyOf", "oneOf", "allOf"] {
            if let Some(list) = obj.get(key).and_then(Value::as_array) {
                for (i, sub) in list.iter().enumerate() {
                    structural_violations(sub, &format!("{path}.{key}[{i}]"), true, out);
                }
            }
        }
    }

    #[test]
    fn generated_schema_is_structural() {
        let crd = serde_json::to_value(FallbackPolicy::crd()).expect("crd serializes");
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        assert!(schema.is_object(), "CRD has no openAPIV3Schema");
        let mut violations = Vec::new();
        structural_violations(schema, "openAPIV3Schema", false, &mut violations);
        assert!(violations.is_empty(), "not a structural schema:\n{}", violations.join("\n"));
        // The checker itself must be able to fail.
        let mut bad = Vec::new();
        structural_violations(
            &serde_json::json!({"type":"object","properties":{"a":{"$ref":"#/x"},"b":{"anyOf":[{"type":"string"}]}}}),
            "t",
            false,
            &mut bad,
        );
        assert_eq!(bad.len(), 4, "{bad:?}");
    }

    #[test]
    fn checked_in_crd_matches_the_code() {
        let generated = crd_yaml().expect("crd renders");
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/fallbackpolicy.yaml");
        let checked_in = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            generated == checked_in,
            "crds/fallbackpolicy.yaml is stale: run `cargo run -- crd > crds/fallbackpolicy.yaml`"
        );
    }

    #[test]
    fn crd_names_and_columns() {
        let crd = FallbackPolicy::crd();
        assert_eq!(crd.spec.group, GROUP);
        assert_eq!(crd.spec.names.short_names, Some(vec!["fbp".to_string()]));
        assert_eq!(crd.spec.scope, "Namespaced");
        let version = &crd.spec.versions[0];
        assert!(version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some());
        let columns: Vec<_> = version.additional_printer_columns.iter().flatten().map(|c| c.name.as_str()).collect();
        assert_eq!(columns, ["Ready", "Reason", "Age"]);
    }

    #[test]
    fn every_field_is_documented() {
        fn undocumented(schema: &Value, path: &str, out: &mut Vec<String>) {
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (name, sub) in props {
                    let here = format!("{path}.{name}");
                    if sub.get("description").and_then(Value::as_str).is_none_or(str::is_empty) {
                        out.push(here.clone());
                    }
                    undocumented(sub, &here, out);
                }
            }
            if let Some(items) = schema.get("items") {
                undocumented(items, path, out);
            }
        }
        let crd = serde_json::to_value(FallbackPolicy::crd()).expect("crd serializes");
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        let mut missing = Vec::new();
        undocumented(spec, "spec", &mut missing);
        // `selector` comes from Kubernetes' own LabelSelector, whose inner docs are upstream's.
        missing.retain(|p| !p.starts_with("spec.selector."));
        assert!(missing.is_empty(), "fields without a description: {missing:?}");
    }
}
