//! `spec.overrides`, compiled: each manual override resolved to the targets it names, with its
//! end as a wall-clock instant, so that every sidecar ends it on time by its own clock.

use serde::{Deserialize, Serialize};

use super::CompiledTarget;
use super::error::Errors;
use crate::policy::{OverrideState, TargetOverrideSpec};

/// One override, resolved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TargetOverride {
    /// The `target` as the policy names it.
    pub target: String,
    /// Forced open or closed.
    pub state: OverrideState,
    /// When it ends, in milliseconds since the Unix epoch; `None`: when it is removed.
    pub until_ms: Option<i64>,
    /// Why.
    pub reason: String,
    /// The health identities of the targets it applies to.
    pub identities: Vec<String>,
}

impl TargetOverride {
    /// Whether it is in force at `unix_ms`.
    pub fn active_at(&self, unix_ms: i64) -> bool {
        self.until_ms.is_none_or(|until| unix_ms < until)
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn unix_ms_now() -> i64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}

/// Whether `label` (`provider/model`, `provider/model#n`) is one `target` names.
fn names(target: &str, label: &str) -> bool {
    let (model_label, _) = label.split_once('#').unwrap_or((label, ""));
    let provider = model_label.split_once('/').map_or(model_label, |(provider, _)| provider);
    target == label || target == model_label || target == provider
}

/// Resolves `spec.overrides` against the compiled routes; every problem goes to `errors`.
pub(crate) fn compile_target_overrides(
    specs: Option<&[TargetOverrideSpec]>,
    targets: &[&CompiledTarget],
    errors: &mut Errors,
) -> Vec<TargetOverride> {
    let labels: Vec<(&str, &str)> = targets.iter().map(|t| (t.label.as_str(), t.identity.as_str())).collect();
    let mut compiled = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, spec) in specs.unwrap_or_default().iter().enumerate() {
        let path = format!("spec.overrides[{i}]");
        if !seen.insert(spec.target.as_str()) {
            errors.push(format!("{path}.target"), format!("`{}` is overridden twice", spec.target));
            continue;
        }
        let identities: Vec<String> = labels
            .iter()
            .filter(|(label, _)| names(&spec.target, label))
            .map(|(_, identity)| identity.to_string())
            .collect();
        if identities.is_empty() && !labels.is_empty() {
            let mut known: Vec<&str> = labels.iter().map(|(label, _)| *label).collect();
            known.dedup();
            errors.push(
                format!("{path}.target"),
                format!("`{}` names no target of this policy's chains; they are {}", spec.target, known.join(", ")),
            );
        }
        let reason = spec.reason.trim();
        if reason.is_empty() {
            errors.push(format!("{path}.reason"), "must say why");
        }
        let until_ms = match spec.until_unix_ms() {
            Ok(until) => until,
            Err(not_a_time) => {
                errors.push(format!("{path}.until"), not_a_time);
                None
            }
        };
        compiled.push(TargetOverride {
            target: spec.target.clone(),
            state: spec.state,
            until_ms,
            reason: reason.to_string(),
            identities,
        });
    }
    compiled
}

#[cfg(test)]
mod tests {
    use crate::chain::{LocalKeys, compile};
    use crate::policy::document::parse_policy;
    use crate::testing::compiled;

    const TWO_KEYS: &str = "apiVersion: backstop.dev/v1alpha1
kind: FallbackPolicy
metadata: {name: p, namespace: shop}
spec:
  providers:
  - {name: openai, type: mock, apiKeys: [{value: k1}, {value: k2}]}
  - {name: backup, type: mock}
  routes:
  - model: chat
    chain:
    - {provider: openai, model: gpt-4o}
    - {provider: openai, model: gpt-4o-mini}
    - {provider: backup, model: m}
";

    #[test]
    fn an_override_names_one_key_a_model_or_a_whole_provider() {
        let with = |target: &str| {
            let yaml = format!(
                "{TWO_KEYS}  overrides:\n  - {{target: '{target}', state: ForcedOpen, until: '2026-12-01T03:00:00Z', reason: drill}}\n"
            );
            compiled(&yaml).overrides.remove(0)
        };
        assert_eq!(with("openai/gpt-4o#2").identities.len(), 1);
        assert_eq!(with("openai/gpt-4o").identities.len(), 2);
        assert_eq!(with("openai").identities.len(), 4);
        let backup = with("backup/m");
        assert_eq!(backup.until_ms, Some(1_796_094_000_000));
        assert!(backup.active_at(1_796_093_999_999) && !backup.active_at(1_796_094_000_000));
    }

    #[test]
    fn overrides_that_name_nothing_or_cannot_end_are_refused_with_their_paths() {
        let yaml = format!(
            "{TWO_KEYS}  overrides:\n  - {{target: anthropic/claude, state: ForcedOpen, reason: x}}\n  - {{target: backup, state: ForcedClosed, until: tomorrow, reason: ' '}}\n  - {{target: backup, state: ForcedOpen, reason: again}}\n"
        );
        let invalid = compile(&parse_policy(&yaml).expect("parses"), &LocalKeys).expect_err("refused");
        let problems: Vec<String> = invalid.errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            problems,
            [
                "`spec.overrides[0].target`: `anthropic/claude` names no target of this policy's chains; they are openai/gpt-4o#1, openai/gpt-4o#2, openai/gpt-4o-mini#1, openai/gpt-4o-mini#2, backup/m",
                "`spec.overrides[1].reason`: must say why",
                "`spec.overrides[1].until`: `tomorrow` is not an RFC 3339 time such as 2026-12-01T03:00:00Z",
                "`spec.overrides[2].target`: `backup` is overridden twice",
            ]
        );
    }
}
