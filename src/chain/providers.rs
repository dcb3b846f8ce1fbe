//! `spec.providers` compiled: each provider's wire API, base URL (defaults filled in, checked
//! that it can reach an API), resolved keys (checked that a header can carry them) and, for
//! `mock`, its behaviour. Plain data: the sidecar builds live clients from it.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::Errors;
use super::keys::{ApiKey, KeyError, KeyResolver};
use crate::policy::{ApiKeySource, Continuation, FallbackPolicySpec, MockSpec, ProviderKind, ProviderSpec};

/// One compiled entry of `spec.providers`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CompiledProvider {
    /// The policy's name for it.
    pub name: String,
    /// Its wire API.
    pub kind: ProviderKind,
    /// Its base URL, the type's default when the policy names none; empty for `mock`.
    pub base_url: String,
    /// Its keys, balanced across; none for a keyless endpoint.
    pub api_keys: Vec<ApiKey>,
    /// `anthropic-version` or Azure's `api-version`, when the policy names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    /// `max_tokens` for an `anthropic` provider when the app gives none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_max_tokens: Option<u64>,
    /// A `mock` provider's behaviour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mock: Option<MockBehaviour>,
    /// How it continues an answer another target began, when the policy says; otherwise its
    /// type's way ([`Continuation::of_type`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continuation: Option<Continuation>,
}

impl CompiledProvider {
    /// Keys balanced across (keyless counts as one).
    pub fn key_count(&self) -> usize {
        self.api_keys.len().max(1)
    }

    /// A stable identity for key `key` at this provider's endpoint, for health state that
    /// survives reloads and is shared across pods: name, kind, URL and a fingerprint of the key
    /// (never the key itself). A mock's behaviour is part of its identity.
    pub fn endpoint_id(&self, key: usize) -> String {
        let fingerprint = self.api_keys.get(key).map(ApiKey::fingerprint).unwrap_or_default();
        let mut id = format!("{}:{}:{}:{fingerprint}", self.name, self.kind.as_str(), self.base_url);
        if let Some(mock) = &self.mock {
            id.push_str(&format!(":{mock:?}"));
        }
        id
    }
}

/// The text a mock answers with when the policy sets none.
pub const DEFAULT_MOCK_REPLY: &str = "Hello from the mock provider.";

/// A mock provider's behaviour, compiled from `spec.providers[].mock`. Its `Debug` form is
/// part of the provider's identity, and stays what it was before `stream_cut_after` while
/// that is unset: health state keyed by it survives an upgrade.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MockBehaviour {
    /// The answer's text.
    pub reply: String,
    /// Delay before the answer's headers.
    pub latency: Duration,
    /// Further delay before a stream's first content chunk.
    pub first_token_latency: Duration,
    /// Content chunks in a streamed answer (at least 1).
    pub chunks: u32,
    /// Share of requests that fail, 0 to 1.
    pub failure_rate: f64,
    /// Status of a failure.
    pub failure_status: u16,
    /// `Retry-After` seconds sent with a 429 or 503.
    pub retry_after: Option<u32>,
    /// Seed for the failure draw.
    pub seed: Option<u64>,
    /// Content chunks after which a stream's connection is cut.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_cut_after: Option<u32>,
}

impl std::fmt::Debug for MockBehaviour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut out = f.debug_struct("MockBehaviour");
        out.field("reply", &self.reply)
            .field("latency", &self.latency)
            .field("first_token_latency", &self.first_token_latency)
            .field("chunks", &self.chunks)
            .field("failure_rate", &self.failure_rate)
            .field("failure_status", &self.failure_status)
            .field("retry_after", &self.retry_after)
            .field("seed", &self.seed);
        if let Some(cut) = &self.stream_cut_after {
            out.field("stream_cut_after", cut);
        }
        out.finish()
    }
}

impl Default for MockBehaviour {
    fn default() -> Self {
        MockBehaviour {
            reply: DEFAULT_MOCK_REPLY.to_string(),
            latency: Duration::ZERO,
            first_token_latency: Duration::ZERO,
            chunks: 4,
            failure_rate: 0.0,
            failure_status: 503,
            retry_after: None,
            seed: None,
            stream_cut_after: None,
        }
    }
}

/// Compiles `spec.providers`, keyed by name; a provider with a problem is noted and left out.
pub(crate) fn compile_providers(
    spec: &FallbackPolicySpec,
    keys: &dyn KeyResolver,
    errors: &mut Errors,
) -> BTreeMap<String, (usize, CompiledProvider)> {
    let mut providers = BTreeMap::new();
    if spec.providers.is_empty() {
        errors.push("spec.providers", "must name at least one provider");
    }
    for (i, provider) in spec.providers.iter().enumerate() {
        let path = format!("spec.providers[{i}]");
        if provider.name.is_empty() || provider.name.contains(['/', '#', '=', ',']) {
            errors.push(format!("{path}.name"), "must be non-empty and contain none of `/`, `#`, `=`, `,`");
            continue;
        }
        if providers.contains_key(&provider.name) {
            errors.push(format!("{path}.name"), format!("`{}` is defined twice", provider.name));
            continue;
        }
        if let Some(config) = compile_provider(provider, &path, keys, errors) {
            let index = providers.len();
            providers.insert(provider.name.clone(), (index, config));
        }
    }
    providers
}

fn compile_provider(
    spec: &ProviderSpec,
    path: &str,
    keys: &dyn KeyResolver,
    errors: &mut Errors,
) -> Option<CompiledProvider> {
    let api_keys: Vec<ApiKey> = match (&spec.api_key, &spec.api_keys) {
        (Some(_), Some(_)) => {
            errors.push(format!("{path}.apiKeys"), "set either `apiKey` or `apiKeys`, not both");
            return None;
        }
        (Some(source), None) => resolve_key(source, &format!("{path}.apiKey"), keys, errors).into_iter().collect(),
        (None, Some(sources)) => {
            if sources.is_empty() {
                errors.push(format!("{path}.apiKeys"), "must list at least one key");
            }
            sources
                .iter()
                .enumerate()
                .filter_map(|(k, source)| resolve_key(source, &format!("{path}.apiKeys[{k}]"), keys, errors))
                .collect()
        }
        (None, None) => Vec::new(),
    };
    if spec.mock.is_some() && spec.kind != ProviderKind::Mock {
        errors.push(format!("{path}.mock"), "only valid with `type: mock`");
    }
    match (&spec.api_version, spec.kind) {
        (Some(_), ProviderKind::Anthropic | ProviderKind::AzureOpenAi) if !header_safe(spec.api_version.as_deref()) => {
            errors.push(format!("{path}.apiVersion"), "holds characters not allowed in an HTTP header");
        }
        (Some(_), ProviderKind::Anthropic | ProviderKind::AzureOpenAi) | (None, _) => {}
        (Some(_), _) => {
            errors.push(format!("{path}.apiVersion"), "only valid with `type: anthropic` or `type: azure-openai`")
        }
    }
    match spec.default_max_tokens {
        Some(_) if spec.kind != ProviderKind::Anthropic => {
            errors.push(format!("{path}.defaultMaxTokens"), "only valid with `type: anthropic`");
        }
        Some(0) => errors.push(format!("{path}.defaultMaxTokens"), "must be at least 1"),
        _ => {}
    }
    let base_url = match (spec.kind, &spec.base_url, spec.kind.default_base_url()) {
        (ProviderKind::Mock, Some(_), _) => {
            errors.push(format!("{path}.baseUrl"), "a `mock` provider has no URL");
            return None;
        }
        (ProviderKind::Mock, None, _) => String::new(),
        (_, Some(url), _) => match check_base_url(url) {
            Ok(url) => url,
            Err(problem) => {
                errors.push(format!("{path}.baseUrl"), problem);
                return None;
            }
        },
        (kind, None, Some(default)) => {
            debug_assert!(check_base_url(default).is_ok(), "{kind:?}");
            default.to_string()
        }
        (ProviderKind::AzureOpenAi, None, None) => {
            errors
                .push(format!("{path}.baseUrl"), "is required for `azure-openai` (https://RESOURCE.openai.azure.com)");
            return None;
        }
        (kind, None, None) => {
            errors.push(format!("{path}.baseUrl"), format!("is required for `{}`", kind.as_str()));
            return None;
        }
    };
    let mock =
        (spec.kind == ProviderKind::Mock).then(|| compile_mock(spec.mock.as_ref(), &format!("{path}.mock"), errors));
    let continuation = compile_continuation(spec, &format!("{path}.continuation"), errors);
    Some(CompiledProvider {
        name: spec.name.clone(),
        kind: spec.kind,
        base_url,
        api_keys,
        api_version: spec.api_version.clone(),
        default_max_tokens: spec.default_max_tokens,
        mock,
        continuation,
    })
}

/// How a provider continues an answer, when the policy says: what its type can do.
fn compile_continuation(spec: &ProviderSpec, path: &str, errors: &mut Errors) -> Option<Continuation> {
    let asked = spec.continuation?;
    let possible = match (asked, spec.kind) {
        (Continuation::None, _) | (_, ProviderKind::OpenAiCompatible) => true,
        (Continuation::AssistantPrefill, kind) => Continuation::of_type(kind) == Continuation::AssistantPrefill,
        _ => false,
    };
    if !possible {
        let why = match spec.kind {
            ProviderKind::OpenAi | ProviderKind::AzureOpenAi => {
                "OpenAI's API answers a final assistant message with a new turn instead of continuing it"
            }
            ProviderKind::Gemini => "Gemini answers a final model turn with a new turn instead of continuing it",
            _ => "only `openai-compatible` servers (vLLM, SGLang) take `continue_final_message`",
        };
        errors.push(path, format!("`{}` is not possible with `type: {}`: {why}", asked.as_str(), spec.kind.as_str()));
        return None;
    }
    Some(asked)
}

fn header_safe(value: Option<&str>) -> bool {
    value.is_none_or(|v| http::HeaderValue::from_str(v).is_ok())
}

/// Why a base URL cannot reach an API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BaseUrlError {
    /// Not a URL.
    #[error("is not a valid URL (`{0}`)")]
    Unparsable(String),
    /// Another scheme.
    #[error("must start with http:// or https:// (found `{0}`)")]
    Scheme(String),
    /// No host.
    #[error("has no host (`{0}`)")]
    NoHost(String),
    /// A query, which the API's paths would be appended after.
    #[error("must not have a query (`{0}`)")]
    Query(String),
}

/// A base URL that can reach an API: http or https, with a host, no query. Returned without a
/// trailing `/`.
fn check_base_url(url: &str) -> Result<String, BaseUrlError> {
    let uri: http::Uri = url.parse().map_err(|_| BaseUrlError::Unparsable(url.to_string()))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(BaseUrlError::Scheme(url.to_string()));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(BaseUrlError::NoHost(url.to_string()));
    }
    if uri.query().is_some() {
        return Err(BaseUrlError::Query(url.to_string()));
    }
    Ok(url.trim_end_matches('/').to_string())
}

fn resolve_key(source: &ApiKeySource, path: &str, keys: &dyn KeyResolver, errors: &mut Errors) -> Option<ApiKey> {
    let set = [source.value.is_some(), source.env.is_some(), source.secret_key_ref.is_some()];
    if set.iter().filter(|s| **s).count() != 1 {
        errors.push(path, "set exactly one of `value`, `env` or `secretKeyRef`");
        return None;
    }
    match keys.resolve(source) {
        Ok(key) if key.is_header_safe() => Some(key),
        Ok(_) => {
            errors.push_key(path, KeyError::NotHeaderSafe);
            None
        }
        Err(problem) => {
            errors.push_key(path, problem);
            None
        }
    }
}

fn compile_mock(spec: Option<&MockSpec>, path: &str, errors: &mut Errors) -> MockBehaviour {
    let mut behaviour = MockBehaviour::default();
    let Some(spec) = spec else { return behaviour };
    if let Some(reply) = &spec.reply {
        behaviour.reply = reply.clone();
    }
    behaviour.latency = errors.duration(spec.latency.as_ref(), format!("{path}.latency"), Duration::ZERO);
    behaviour.first_token_latency =
        errors.duration(spec.first_token_latency.as_ref(), format!("{path}.firstTokenLatency"), Duration::ZERO);
    match spec.chunks {
        Some(0) => errors.push(format!("{path}.chunks"), "must be at least 1"),
        Some(chunks) => behaviour.chunks = chunks,
        None => {}
    }
    match spec.failure_rate {
        Some(rate) if !(0.0..=1.0).contains(&rate) => {
            errors.push(format!("{path}.failureRate"), format!("{rate} is not between 0 and 1"));
        }
        Some(rate) => behaviour.failure_rate = rate,
        None => {}
    }
    match spec.failure_status {
        Some(status) if !(400..=599).contains(&status) => {
            errors.push(format!("{path}.failureStatus"), format!("{status} is not an HTTP error status (400-599)"));
        }
        Some(status) => behaviour.failure_status = status,
        None => {}
    }
    behaviour.retry_after = spec.retry_after;
    behaviour.seed = spec.seed;
    match spec.stream_cut_after {
        Some(0) => errors.push(format!("{path}.streamCutAfter"), "must be at least 1"),
        cut => behaviour.stream_cut_after = cut,
    }
    behaviour
}
