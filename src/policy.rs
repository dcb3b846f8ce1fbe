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

    /// The API's base URL, up to and including the version path, as an SDK's `base_url`
    /// (for example `http://vllm.inference:8000/v1`). Defaults per type: `openai` uses
    /// `https://api.openai.com/v1`; `openai-compatible` has no default and requires it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,

    /// Where the provider's API key comes from. Omit for keyless endpoints (a local vLLM or
    /// Ollama) and for `mock`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<ApiKeySource>,

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
}

/// How one failed request is classified. Each class is a reason a request can fall through.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema,
)]
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
}

impl FailureClass {
    /// Every class, in declaration order.
    pub const ALL: [FailureClass; 10] = [
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
        )
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
        let extension = obj.contains_key("x-kubernetes-int-or-string")
            || obj.contains_key("x-kubernetes-preserve-unknown-fields");
        if in_logic {
            for key in [
                "type",
                "description",
                "default",
                "additionalProperties",
                "nullable",
            ] {
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
        assert!(
            violations.is_empty(),
            "not a structural schema:\n{}",
            violations.join("\n")
        );
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
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some()
        );
        let columns: Vec<_> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(columns, ["Ready", "Reason", "Age"]);
    }

    #[test]
    fn every_field_is_documented() {
        fn undocumented(schema: &Value, path: &str, out: &mut Vec<String>) {
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (name, sub) in props {
                    let here = format!("{path}.{name}");
                    if sub
                        .get("description")
                        .and_then(Value::as_str)
                        .is_none_or(str::is_empty)
                    {
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
        assert!(
            missing.is_empty(),
            "fields without a description: {missing:?}"
        );
    }
}
