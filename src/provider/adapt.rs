//! A target's [`Adaptation`] applied to a request already in its API's wire format: each
//! provider-neutral parameter written where that API keeps it, and the system prompt wrapped
//! where that API puts it. It runs after translation, so an app of any API gets the same
//! adaptation at the same target.

use serde_json::{Map, Value, json};

use crate::chain::Adaptation;
use crate::policy::Parameter;

/// A wire format a request is adapted in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    /// Chat Completions; `completion_tokens` when a limit the app did not set is written as
    /// `max_completion_tokens` (OpenAI, Azure) rather than `max_tokens` (other servers).
    Chat {
        /// Whether to write `max_completion_tokens`.
        completion_tokens: bool,
    },
    /// OpenAI's Responses API (a stateful request sent as the app wrote it).
    Responses,
    /// Anthropic's Messages API.
    Messages,
    /// Gemini's `generateContent`.
    Gemini,
}

/// Where `wire` keeps `parameter`, as a path of object keys; `None` when it has no such field.
/// Chat Completions' answer limit, kept in one of two fields, is [`chat_limit`]'s.
fn path(wire: Wire, parameter: Parameter) -> Option<&'static [&'static str]> {
    use Parameter::*;
    Some(match (wire, parameter) {
        (Wire::Chat { .. }, Temperature) => &["temperature"],
        (Wire::Chat { .. }, TopP) => &["top_p"],
        (Wire::Chat { .. }, TopK) => &["top_k"],
        (Wire::Chat { .. }, ReasoningEffort) => &["reasoning_effort"],
        (Wire::Chat { .. }, Seed) => &["seed"],
        (Wire::Chat { .. }, PresencePenalty) => &["presence_penalty"],
        (Wire::Chat { .. }, FrequencyPenalty) => &["frequency_penalty"],
        (Wire::Responses, Temperature) => &["temperature"],
        (Wire::Responses, TopP) => &["top_p"],
        (Wire::Responses, MaxTokens) => &["max_output_tokens"],
        (Wire::Responses, ReasoningEffort) => &["reasoning", "effort"],
        (Wire::Messages, Temperature) => &["temperature"],
        (Wire::Messages, TopP) => &["top_p"],
        (Wire::Messages, TopK) => &["top_k"],
        (Wire::Messages, MaxTokens) => &["max_tokens"],
        (Wire::Messages, ThinkingBudget) => &["thinking", "budget_tokens"],
        (Wire::Gemini, Temperature) => &["generationConfig", "temperature"],
        (Wire::Gemini, TopP) => &["generationConfig", "topP"],
        (Wire::Gemini, TopK) => &["generationConfig", "topK"],
        (Wire::Gemini, MaxTokens) => &["generationConfig", "maxOutputTokens"],
        (Wire::Gemini, ThinkingBudget) => &["generationConfig", "thinkingConfig", "thinkingBudget"],
        (Wire::Gemini, Seed) => &["generationConfig", "seed"],
        (Wire::Gemini, PresencePenalty) => &["generationConfig", "presencePenalty"],
        (Wire::Gemini, FrequencyPenalty) => &["generationConfig", "frequencyPenalty"],
        _ => return None,
    })
}

/// Whether `parameter` takes whole numbers.
fn integral(parameter: Parameter) -> bool {
    matches!(parameter, Parameter::TopK | Parameter::MaxTokens | Parameter::ThinkingBudget | Parameter::Seed)
}

/// Applies `adaptation` to `body`, a request in `wire`'s format.
pub fn apply(adaptation: &Adaptation, wire: Wire, body: &mut Map<String, Value>) {
    for &parameter in &adaptation.remove {
        if parameter == Parameter::MaxTokens && matches!(wire, Wire::Chat { .. }) {
            body.remove("max_tokens");
            body.remove("max_completion_tokens");
        } else if parameter == Parameter::ThinkingBudget && wire == Wire::Messages {
            body.remove("thinking");
        } else if let Some(path) = path(wire, parameter) {
            remove(body, path);
        }
    }
    for (parameter, value) in &adaptation.set {
        if let (Parameter::MaxTokens, Wire::Chat { completion_tokens }) = (parameter, wire) {
            chat_limit(body, completion_tokens, value.clone());
        } else if let Some(path) = path(wire, *parameter) {
            if *parameter == Parameter::ThinkingBudget && wire == Wire::Messages {
                thinking_on(body);
            }
            insert(body, path, value.clone());
        }
    }
    for &(parameter, cap) in &adaptation.cap {
        let limit = if integral(parameter) { json!(cap as u64) } else { json!(cap) };
        if let (Parameter::MaxTokens, Wire::Chat { completion_tokens }) = (parameter, wire) {
            let current = ["max_completion_tokens", "max_tokens"]
                .iter()
                .filter_map(|field| body.get(*field).and_then(Value::as_f64))
                .fold(None, |lowest: Option<f64>, v| Some(lowest.map_or(v, |l| l.min(v))));
            if current.is_none_or(|current| current > cap) {
                chat_limit(body, completion_tokens, limit);
            }
            continue;
        }
        let Some(path) = path(wire, parameter) else { continue };
        match get(body, path).and_then(Value::as_f64) {
            Some(current) if current > cap => insert(body, path, limit),
            None if parameter == Parameter::MaxTokens => insert(body, path, limit),
            _ => {}
        }
    }
    if wire == Wire::Messages {
        // Thinking tokens count within `max_tokens`, which must exceed the budget: the answer
        // keeps the room the app asked for.
        let budget = body.get("thinking").and_then(|t| t.get("budget_tokens")).and_then(Value::as_u64);
        let max = body.get("max_tokens").and_then(Value::as_u64);
        if let (Some(budget), Some(max)) = (budget, max)
            && max <= budget
        {
            body.insert("max_tokens".into(), json!(budget.saturating_add(max)));
        }
    }
    if adaptation.system_prefix.is_some() || adaptation.system_suffix.is_some() {
        wrap_system(wire, body, adaptation.system_prefix.as_deref(), adaptation.system_suffix.as_deref());
    }
}

/// Writes the answer's limit of a Chat Completions request: in `max_completion_tokens` for
/// OpenAI and Azure (their reasoning models refuse `max_tokens`, which it replaces), else in the
/// field the app used (`max_tokens` when it used none), so that one limit is sent.
fn chat_limit(body: &mut Map<String, Value>, completion_tokens: bool, limit: Value) {
    if completion_tokens {
        body.remove("max_tokens");
        body.insert("max_completion_tokens".into(), limit);
        return;
    }
    let fields: Vec<&str> =
        ["max_completion_tokens", "max_tokens"].into_iter().filter(|field| body.contains_key(*field)).collect();
    if fields.is_empty() {
        body.insert("max_tokens".into(), limit.clone());
    }
    for field in fields {
        body.insert(field.into(), limit.clone());
    }
}

/// Turns on Anthropic's extended thinking, and takes from the request what Anthropic refuses
/// alongside it: a temperature or top-k (thinking samples its own way), a top-p below 0.95,
/// and a forced tool choice (it may only be `auto` or `none`).
fn thinking_on(body: &mut Map<String, Value>) {
    body.insert("thinking".into(), json!({"type": "enabled"}));
    body.remove("temperature");
    body.remove("top_k");
    if body.get("top_p").and_then(Value::as_f64).is_some_and(|p| p < 0.95) {
        body.remove("top_p");
    }
    if let Some(choice) = body.get_mut("tool_choice")
        && matches!(choice["type"].as_str(), Some("any" | "tool"))
    {
        let parallel = choice.get("disable_parallel_tool_use").cloned();
        *choice = json!({"type": "auto"});
        if let Some(parallel) = parallel {
            choice["disable_parallel_tool_use"] = parallel;
        }
    }
}

fn get<'b>(body: &'b Map<String, Value>, path: &[&str]) -> Option<&'b Value> {
    let (last, parents) = path.split_last()?;
    let mut object = body;
    for key in parents {
        object = object.get(*key)?.as_object()?;
    }
    object.get(*last).filter(|v| !v.is_null())
}

fn insert(body: &mut Map<String, Value>, path: &[&str], value: Value) {
    let Some((last, parents)) = path.split_last() else { return };
    let mut object = body;
    for key in parents {
        let entry = object.entry(*key).or_insert_with(|| Value::Object(Map::new()));
        if !entry.is_object() {
            *entry = Value::Object(Map::new());
        }
        let Value::Object(inner) = entry else { return };
        object = inner;
    }
    object.insert((*last).into(), value);
}

fn remove(body: &mut Map<String, Value>, path: &[&str]) {
    let Some((last, parents)) = path.split_last() else { return };
    let mut object = body;
    for key in parents {
        match object.get_mut(*key) {
            Some(Value::Object(inner)) => object = inner,
            _ => return,
        }
    }
    object.remove(*last);
}

/// `prefix`, `text` and `suffix`, those present joined by a blank line.
fn joined(prefix: Option<&str>, text: Option<&str>, suffix: Option<&str>) -> String {
    [prefix, text, suffix].into_iter().flatten().filter(|t| !t.is_empty()).collect::<Vec<_>>().join("\n\n")
}

/// Wraps a list of text parts (`{key: text}` objects, and `type: text` where the API types its
/// blocks) with the prefix first and the suffix last.
fn wrap_parts(parts: &mut Vec<Value>, typed: bool, prefix: Option<&str>, suffix: Option<&str>) {
    let part = |text: &str| if typed { json!({"type": "text", "text": text}) } else { json!({"text": text}) };
    if let Some(prefix) = prefix {
        parts.insert(0, part(prefix));
    }
    if let Some(suffix) = suffix {
        parts.push(part(suffix));
    }
}

fn wrap_system(wire: Wire, body: &mut Map<String, Value>, prefix: Option<&str>, suffix: Option<&str>) {
    match wire {
        Wire::Chat { .. } => {
            let Some(Value::Array(messages)) = body.get_mut("messages") else { return };
            let first = messages.iter().position(|m| matches!(m["role"].as_str(), Some("system" | "developer")));
            match first.and_then(|i| messages[i].as_object_mut()) {
                Some(message) => match message.get_mut("content") {
                    Some(Value::String(text)) => *text = joined(prefix, Some(text), suffix),
                    Some(Value::Array(parts)) => wrap_parts(parts, true, prefix, suffix),
                    _ => {
                        message.insert("content".into(), json!(joined(prefix, None, suffix)));
                    }
                },
                None => messages.insert(0, json!({"role": "system", "content": joined(prefix, None, suffix)})),
            }
        }
        Wire::Responses => {
            let instructions = body.get("instructions").and_then(Value::as_str);
            let text = joined(prefix, instructions, suffix);
            body.insert("instructions".into(), json!(text));
        }
        Wire::Messages => match body.get_mut("system") {
            Some(Value::String(text)) => *text = joined(prefix, Some(text), suffix),
            Some(Value::Array(blocks)) => wrap_parts(blocks, true, prefix, suffix),
            _ => {
                body.insert("system".into(), json!(joined(prefix, None, suffix)));
            }
        },
        Wire::Gemini => {
            let instruction = body.entry("systemInstruction").or_insert_with(|| json!({"parts": []}));
            if !instruction.get("parts").is_some_and(Value::is_array) {
                *instruction = json!({"parts": []});
            }
            if let Some(Value::Array(parts)) = instruction.get_mut("parts") {
                if parts.is_empty() {
                    parts.push(json!({"text": joined(prefix, None, suffix)}));
                } else {
                    wrap_parts(parts, false, prefix, suffix);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adaptation(yaml: &str) -> Adaptation {
        serde_yaml_ng::from_str(yaml).expect("adaptation")
    }

    #[test]
    fn caps_lower_only_what_is_higher_and_fill_a_missing_answer_limit() {
        let cap = adaptation("cap: [[temperature, 0.5], [maxTokens, 100]]");
        let mut body = json!({"temperature": 0.2, "max_tokens": 500}).as_object().cloned().expect("object");
        apply(&cap, Wire::Chat { completion_tokens: true }, &mut body);
        assert_eq!(
            Value::Object(body),
            json!({"temperature": 0.2, "max_completion_tokens": 100}),
            "OpenAI's reasoning models refuse `max_tokens`"
        );
        let mut body = json!({"max_tokens": 500, "max_completion_tokens": 50}).as_object().cloned().expect("object");
        apply(&cap, Wire::Chat { completion_tokens: false }, &mut body);
        assert_eq!(Value::Object(body), json!({"max_tokens": 500, "max_completion_tokens": 50}), "within the cap");
        let mut body = json!({"max_tokens": 500, "max_completion_tokens": 400}).as_object().cloned().expect("object");
        apply(&cap, Wire::Chat { completion_tokens: false }, &mut body);
        assert_eq!(Value::Object(body), json!({"max_tokens": 100, "max_completion_tokens": 100}), "both capped");
        let set = adaptation("set: [[maxTokens, 64]]");
        let mut body = json!({"max_tokens": 500, "max_completion_tokens": 400}).as_object().cloned().expect("object");
        apply(&set, Wire::Chat { completion_tokens: true }, &mut body);
        assert_eq!(Value::Object(body), json!({"max_completion_tokens": 64}), "one limit is sent");
        let mut body = json!({"temperature": 1.5}).as_object().cloned().expect("object");
        apply(&cap, Wire::Chat { completion_tokens: true }, &mut body);
        assert_eq!(Value::Object(body), json!({"temperature": 0.5, "max_completion_tokens": 100}));
        let mut body = json!({"generationConfig": {"temperature": 0.9}}).as_object().cloned().expect("object");
        apply(&cap, Wire::Gemini, &mut body);
        assert_eq!(Value::Object(body), json!({"generationConfig": {"temperature": 0.5, "maxOutputTokens": 100}}));
    }

    #[test]
    fn anthropic_thinking_keeps_room_for_the_answer() {
        let set = adaptation("set: [[thinkingBudget, 2048]]");
        let mut body = json!({"max_tokens": 1000}).as_object().cloned().expect("object");
        apply(&set, Wire::Messages, &mut body);
        assert_eq!(
            Value::Object(body),
            json!({"max_tokens": 3048, "thinking": {"type": "enabled", "budget_tokens": 2048}})
        );
        let mut body = json!({"max_tokens": u64::MAX, "temperature": 0.2, "top_k": 5, "top_p": 0.5,
                              "tool_choice": {"type": "tool", "name": "f", "disable_parallel_tool_use": true}})
        .as_object()
        .cloned()
        .expect("object");
        apply(&set, Wire::Messages, &mut body);
        assert_eq!(
            Value::Object(body),
            json!({"max_tokens": u64::MAX, "thinking": {"type": "enabled", "budget_tokens": 2048},
                   "tool_choice": {"type": "auto", "disable_parallel_tool_use": true}}),
            "what Anthropic refuses beside thinking is taken out, and nothing overflows"
        );
        let wrap = adaptation("systemSuffix: S");
        let mut body = json!({"max_tokens": 5, "thinking": {"type": "enabled", "budget_tokens": u64::MAX}})
            .as_object()
            .cloned()
            .expect("object");
        apply(&wrap, Wire::Messages, &mut body);
        assert_eq!(body["max_tokens"], json!(u64::MAX), "an app's huge budget saturates");
        let remove = adaptation("remove: [thinkingBudget, temperature]");
        let mut body =
            json!({"max_tokens": 10, "temperature": 1, "thinking": {"type": "enabled", "budget_tokens": 1024}})
                .as_object()
                .cloned()
                .expect("object");
        apply(&remove, Wire::Messages, &mut body);
        assert_eq!(Value::Object(body), json!({"max_tokens": 10}));
    }

    #[test]
    fn the_system_prompt_is_wrapped_where_each_api_keeps_it() {
        let wrap = adaptation("systemPrefix: P\nsystemSuffix: S");
        let cases = [
            (
                Wire::Chat { completion_tokens: false },
                json!({"messages": [{"role": "user", "content": "u"}]}),
                json!({"messages": [{"role": "system", "content": "P\n\nS"}, {"role": "user", "content": "u"}]}),
            ),
            (
                Wire::Chat { completion_tokens: false },
                json!({"messages": [{"role": "developer", "content": [{"type": "text", "text": "D"}]}]}),
                json!({"messages": [{"role": "developer", "content": [{"type": "text", "text": "P"}, {"type": "text", "text": "D"}, {"type": "text", "text": "S"}]}]}),
            ),
            (Wire::Responses, json!({"instructions": "I"}), json!({"instructions": "P\n\nI\n\nS"})),
            (Wire::Messages, json!({"system": "A"}), json!({"system": "P\n\nA\n\nS"})),
            (Wire::Messages, json!({}), json!({"system": "P\n\nS"})),
            (
                Wire::Gemini,
                json!({"systemInstruction": {"parts": [{"text": "G"}]}}),
                json!({"systemInstruction": {"parts": [{"text": "P"}, {"text": "G"}, {"text": "S"}]}}),
            ),
            (Wire::Gemini, json!({}), json!({"systemInstruction": {"parts": [{"text": "P\n\nS"}]}})),
        ];
        for (wire, before, after) in cases {
            let mut body = before.as_object().cloned().expect("object");
            apply(&wrap, wire, &mut body);
            assert_eq!(Value::Object(body), after, "{wire:?}");
        }
    }
}
