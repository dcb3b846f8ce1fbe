//! The per-target parts of a policy that shape what a target is sent ([`AdaptSpec`]) and the
//! route's shadow comparison ([`ShadowSpec`]).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::duration_schema;

/// How requests to one target are adapted, after they are translated into its API: parameters
/// set, capped or removed, and text put around the system prompt. Each parameter is named once,
/// in Backstop's provider-neutral terms, and written in the target's own API (`maxTokens` is
/// `max_completion_tokens` for OpenAI, `max_tokens` for Anthropic, `maxOutputTokens` for
/// Gemini). A parameter the target's API cannot take is a policy error naming the field.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AdaptSpec {
    /// Parameters sent to this target whatever the app asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set: Option<ParametersSpec>,

    /// Upper limits: a larger value the app sent is lowered to the limit. `maxTokens` is also
    /// sent when the app gave none (no limit is larger than any limit); the others are left
    /// unset when the app did not set them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cap: Option<CapSpec>,

    /// Parameters never sent to this target, whatever the app asked for: for a model that
    /// refuses or misreads them (`temperature` for some reasoning models).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 9), extend("x-kubernetes-list-type" = "set"))]
    pub remove: Option<Vec<Parameter>>,

    /// Text put before and after the app's system prompt for this target, each joined to it
    /// by a blank line; a request without a system prompt gets one made of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<SystemPromptSpec>,
}

/// Text around the system prompt.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SystemPromptSpec {
    /// Put before the app's system prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32768))]
    pub prefix: Option<String>,
    /// Put after the app's system prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32768))]
    pub suffix: Option<String>,
}

/// A request parameter, in Backstop's provider-neutral name. A stateful Responses request (sent
/// to an `openai` target as the app wrote it) has no `topK`, `seed` or penalties: those are not
/// sent with it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Parameter {
    /// Sampling temperature: OpenAI and Gemini 0 to 2, Anthropic 0 to 1.
    Temperature,
    /// Nucleus sampling, 0 to 1.
    TopP,
    /// Top-k sampling: Anthropic, Gemini and OpenAI-compatible servers (vLLM); not OpenAI.
    TopK,
    /// The longest answer, in tokens.
    MaxTokens,
    /// OpenAI reasoning models' effort (`reasoning_effort`, or `reasoning.effort` for Responses).
    ReasoningEffort,
    /// Anthropic's extended thinking (`thinking.budget_tokens`, 1024 or more) or Gemini's
    /// `thinkingConfig.thinkingBudget`.
    ThinkingBudget,
    /// OpenAI's and Gemini's sampling seed.
    Seed,
    /// OpenAI's and Gemini's presence penalty, -2 to 2.
    PresencePenalty,
    /// OpenAI's and Gemini's frequency penalty, -2 to 2.
    FrequencyPenalty,
}

impl Parameter {
    /// The name users write.
    pub fn as_str(self) -> &'static str {
        match self {
            Parameter::Temperature => "temperature",
            Parameter::TopP => "topP",
            Parameter::TopK => "topK",
            Parameter::MaxTokens => "maxTokens",
            Parameter::ReasoningEffort => "reasoningEffort",
            Parameter::ThinkingBudget => "thinkingBudget",
            Parameter::Seed => "seed",
            Parameter::PresencePenalty => "presencePenalty",
            Parameter::FrequencyPenalty => "frequencyPenalty",
        }
    }
}

/// Parameter values sent to a target.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ParametersSpec {
    /// Sampling temperature: OpenAI and Gemini 0 to 2, Anthropic 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 2.0))]
    pub temperature: Option<f64>,
    /// Nucleus sampling, 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub top_p: Option<f64>,
    /// Top-k sampling (Anthropic, Gemini, OpenAI-compatible servers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub top_k: Option<u64>,
    /// The longest answer, in tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100_000_000))]
    pub max_tokens: Option<u64>,
    /// OpenAI reasoning effort.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_effort: Option<ReasoningEffort>,
    /// Thinking tokens (Anthropic: 1024 or more, and Backstop raises `max_tokens` above it when
    /// needed; Gemini: 0 turns thinking off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 100_000_000))]
    pub thinking_budget: Option<u64>,
    /// Sampling seed (OpenAI, Gemini).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    /// Presence penalty, -2 to 2 (OpenAI, Gemini).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = -2.0, max = 2.0))]
    pub presence_penalty: Option<f64>,
    /// Frequency penalty, -2 to 2 (OpenAI, Gemini).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = -2.0, max = 2.0))]
    pub frequency_penalty: Option<f64>,
}

/// Upper limits on parameters the app sends.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CapSpec {
    /// The highest temperature sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 2.0))]
    pub temperature: Option<f64>,
    /// The highest `top_p` sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub top_p: Option<f64>,
    /// The highest `top_k` sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub top_k: Option<u64>,
    /// The longest answer, in tokens; sent also when the app gave no limit. With Anthropic's
    /// extended thinking on, `max_tokens` is raised above the thinking budget (the answer keeps
    /// this room besides the thinking).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100_000_000))]
    pub max_tokens: Option<u64>,
    /// The most thinking tokens sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 100_000_000))]
    pub thinking_budget: Option<u64>,
}

/// How hard an OpenAI reasoning model thinks.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ReasoningEffort {
    /// No reasoning (models that allow it).
    None,
    /// Minimal reasoning.
    Minimal,
    /// Low.
    Low,
    /// Medium.
    Medium,
    /// High.
    High,
}

impl ReasoningEffort {
    /// The value OpenAI's API takes.
    pub fn as_str(self) -> &'static str {
        match self {
            ReasoningEffort::None => "none",
            ReasoningEffort::Minimal => "minimal",
            ReasoningEffort::Low => "low",
            ReasoningEffort::Medium => "medium",
            ReasoningEffort::High => "high",
        }
    }
}

/// Shadow comparison: a sampled share of the route's requests that its first target answered
/// at once is also sent, in the background, to another target, and both answers are compared
/// in telemetry (model, latency, tokens, cost, finish reason, length ratio, and exact match of
/// tool calls and JSON output). The app's answer is never delayed or changed; a shadow never
/// runs while the route is falling through, retrying or short of retry budget.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ShadowSpec {
    /// The provider's `name`.
    pub provider: String,

    /// The model name sent to it.
    pub model: String,

    /// Share of eligible requests shadowed, in percent: `1` for 1%, `100` for every one.
    #[schemars(range(min = 0.001, max = 100.0))]
    pub percent: f64,

    /// Shadow requests in flight at once for this route in each sidecar; a request sampled
    /// while all are busy is not shadowed. Default 4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 256))]
    pub max_concurrent: Option<u32>,

    /// How long a shadow request may take. Default `60s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "duration_schema::schema")]
    pub timeout: Option<String>,

    /// What the shadow target charges (see a chain step's `price`), for the cost comparison.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<super::PriceSpec>,

    /// How requests to the shadow target are adapted (see a chain step's `adapt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapt: Option<AdaptSpec>,

    /// Whether the comparison records the prompt's last message and both answers' text (as
    /// span attributes). Default false: only sizes, counts and measures leave the sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture_content: Option<bool>,
}
