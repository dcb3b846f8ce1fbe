//! `adapt` compiled: what a target's requests get set, capped and removed, and the text put
//! around their system prompt, checked against what the target's API can take. Applying it to
//! a request in the target's wire format is [`crate::provider::adapt`]'s business.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::error::Errors;
use crate::policy::{AdaptSpec, Parameter, ProviderKind};

/// A target's adaptation, valid for its provider's API.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Adaptation {
    /// Parameters set, each once, with their values (numbers, or an effort's name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<(Parameter, Value)>,
    /// Upper limits.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap: Vec<(Parameter, f64)>,
    /// Parameters never sent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<Parameter>,
    /// Text before the system prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_prefix: Option<String>,
    /// Text after the system prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_suffix: Option<String>,
}

/// Whether a provider of `kind` has `parameter`.
pub fn supports(kind: ProviderKind, parameter: Parameter) -> bool {
    use ProviderKind::*;
    match parameter {
        Parameter::Temperature | Parameter::TopP | Parameter::MaxTokens => true,
        Parameter::TopK => matches!(kind, Anthropic | Gemini | OpenAiCompatible),
        Parameter::ReasoningEffort => matches!(kind, OpenAi | AzureOpenAi | OpenAiCompatible | Mock),
        Parameter::ThinkingBudget => matches!(kind, Anthropic | Gemini),
        Parameter::Seed | Parameter::PresencePenalty | Parameter::FrequencyPenalty => kind != Anthropic,
    }
}

/// Why a provider `provider` of type `kind` cannot take `parameter`.
fn unsupported(kind: ProviderKind, provider: &str, parameter: Parameter) -> String {
    format!(
        "provider `{provider}` (type `{}`) has no `{}` parameter; it is for {}",
        kind.as_str(),
        parameter.as_str(),
        who_supports(parameter)
    )
}

/// Which provider types have `parameter`, for an error message.
fn who_supports(parameter: Parameter) -> String {
    let kinds = [
        ProviderKind::OpenAi,
        ProviderKind::OpenAiCompatible,
        ProviderKind::AzureOpenAi,
        ProviderKind::Anthropic,
        ProviderKind::Gemini,
    ];
    let names: Vec<&str> = kinds.iter().filter(|k| supports(**k, parameter)).map(|k| k.as_str()).collect();
    names.join(", ")
}

/// Compiles the `adapt` at `path` of a target whose provider `provider` is of type `kind`.
pub(crate) fn compile_adapt(
    spec: Option<&AdaptSpec>,
    kind: ProviderKind,
    provider: &str,
    path: &str,
    errors: &mut Errors,
) -> Option<Adaptation> {
    let spec = spec?;
    let path = format!("{path}.adapt");
    let mut adaptation = Adaptation::default();
    let check = |parameter: Parameter, field: &str, errors: &mut Errors| {
        let supported = supports(kind, parameter);
        if !supported {
            errors.push(format!("{path}.{field}.{}", parameter.as_str()), unsupported(kind, provider, parameter));
        }
        supported
    };
    if let Some(set) = &spec.set {
        let values: [(Parameter, Option<Value>); 9] = [
            (Parameter::Temperature, set.temperature.map(|v| json!(v))),
            (Parameter::TopP, set.top_p.map(|v| json!(v))),
            (Parameter::TopK, set.top_k.map(|v| json!(v))),
            (Parameter::MaxTokens, set.max_tokens.map(|v| json!(v))),
            (Parameter::ReasoningEffort, set.reasoning_effort.map(|v| json!(v.as_str()))),
            (Parameter::ThinkingBudget, set.thinking_budget.map(|v| json!(v))),
            (Parameter::Seed, set.seed.map(|v| json!(v))),
            (Parameter::PresencePenalty, set.presence_penalty.map(|v| json!(v))),
            (Parameter::FrequencyPenalty, set.frequency_penalty.map(|v| json!(v))),
        ];
        for (parameter, value) in values {
            let Some(value) = value else { continue };
            if check(parameter, "set", errors) {
                check_value(kind, parameter, value.as_f64(), &format!("{path}.set.{}", parameter.as_str()), errors);
                adaptation.set.push((parameter, value));
            }
        }
    }
    if let Some(cap) = &spec.cap {
        let values = [
            (Parameter::Temperature, cap.temperature),
            (Parameter::TopP, cap.top_p),
            (Parameter::TopK, cap.top_k.map(|v| v as f64)),
            (Parameter::MaxTokens, cap.max_tokens.map(|v| v as f64)),
            (Parameter::ThinkingBudget, cap.thinking_budget.map(|v| v as f64)),
        ];
        for (parameter, value) in values {
            let Some(value) = value else { continue };
            let field = format!("{path}.cap.{}", parameter.as_str());
            if adaptation.set.iter().any(|(p, _)| *p == parameter) {
                errors.push(field, "is also in `set`: a value that is set needs no cap");
            } else if check(parameter, "cap", errors) {
                check_value(kind, parameter, Some(value), &field, errors);
                adaptation.cap.push((parameter, value));
            }
        }
    }
    for (i, &parameter) in spec.remove.as_deref().unwrap_or_default().iter().enumerate() {
        let field = format!("{path}.remove[{i}]");
        if adaptation.set.iter().any(|(p, _)| *p == parameter) || adaptation.cap.iter().any(|(p, _)| *p == parameter) {
            errors.push(field, format!("`{}` is also set or capped", parameter.as_str()));
        } else if parameter == Parameter::MaxTokens && kind == ProviderKind::Anthropic {
            errors.push(field, "Anthropic's Messages API requires `max_tokens`; cap it instead");
        } else if !supports(kind, parameter) {
            errors.push(field, unsupported(kind, provider, parameter));
        } else if !adaptation.remove.contains(&parameter) {
            adaptation.remove.push(parameter);
        }
    }
    let set = |parameter: Parameter| adaptation.set.iter().any(|(p, _)| *p == parameter);
    if kind == ProviderKind::Anthropic && set(Parameter::ThinkingBudget) {
        for parameter in [Parameter::Temperature, Parameter::TopK] {
            if set(parameter) {
                errors.push(
                    format!("{path}.set.{}", parameter.as_str()),
                    "Anthropic's extended thinking (`thinkingBudget`) cannot be combined with it; remove it instead",
                );
            }
        }
    }
    if let Some(system) = &spec.system_prompt {
        for (field, text) in [("prefix", &system.prefix), ("suffix", &system.suffix)] {
            if text.as_ref().is_some_and(|t| t.trim().is_empty()) {
                errors.push(format!("{path}.systemPrompt.{field}"), "must not be empty");
            }
        }
        adaptation.system_prefix = system.prefix.clone().filter(|t| !t.trim().is_empty());
        adaptation.system_suffix = system.suffix.clone().filter(|t| !t.trim().is_empty());
    }
    Some(adaptation)
}

/// Checks a value against what `kind`'s API accepts for `parameter`.
fn check_value(kind: ProviderKind, parameter: Parameter, value: Option<f64>, path: &str, errors: &mut Errors) {
    let Some(value) = value else { return };
    let range = match (parameter, kind) {
        (Parameter::Temperature, ProviderKind::Anthropic) => (0.0, 1.0),
        (Parameter::Temperature, _) => (0.0, 2.0),
        (Parameter::TopP, _) => (0.0, 1.0),
        (Parameter::TopK | Parameter::MaxTokens, _) => (1.0, 1e8),
        (Parameter::ThinkingBudget, ProviderKind::Anthropic) => (1024.0, 1e8),
        (Parameter::ThinkingBudget, _) => (0.0, 1e8),
        (Parameter::PresencePenalty | Parameter::FrequencyPenalty, _) => (-2.0, 2.0),
        (Parameter::Seed | Parameter::ReasoningEffort, _) => return,
    };
    if !value.is_finite() || value < range.0 || value > range.1 {
        let api = if kind == ProviderKind::Anthropic { " for Anthropic" } else { "" };
        errors.push(path, format!("{value} is not between {} and {}{api}", range.0, range.1));
    }
}
