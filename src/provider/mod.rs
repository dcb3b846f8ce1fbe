//! Upstream providers: one folder per wire API, behind one closed enum.
//!
//! A provider turns the neutral [`ChatRequest`] into its API's request (`to_wire`), sends it,
//! and reads the answer: whole answers and stream events stay in the provider's own format
//! (the ingress renders them for the app), errors become an [`AttemptError`] that has
//! classified itself (`error`). `from_wire` and [`neutral`] turn a provider's answers into the
//! neutral (OpenAI Chat Completions) shape where another API needs them. Timeouts, retries and
//! fall-through are the fallback loop's business, not the provider's.
//!
//! Providers are built from a compiled [`CompiledProvider`] (plain data) when the sidecar
//! assembles a snapshot; building one is where a config that cannot work is refused
//! ([`InvalidBackend`]), so a bad config from any source never reaches the request path.

pub mod adapt;
pub mod anthropic;
pub mod credentials;
pub mod gemini;
pub mod http;
pub mod mock;
pub mod neutral;
pub mod openai;
pub mod sse;
pub mod turns;

pub use crate::net::client::HttpClient;

use crate::chain::CompiledProvider;
use crate::llm::ratelimit::Headroom;
use crate::llm::{Api, AttemptError, ChatRequest, Reply};
use crate::policy::{Continuation, ProviderKind};

/// A compiled provider that cannot be turned into a live one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidBackend {
    /// The base URL does not make the API's request URLs.
    #[error("provider `{provider}`: `baseUrl` `{url}` is not a usable http:// or https:// URL: {reason}")]
    BaseUrl {
        /// The provider's name.
        provider: String,
        /// The URL.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A key or a version holds characters an HTTP header cannot carry.
    #[error("provider `{provider}`: `{field}` holds characters not allowed in an HTTP header")]
    HeaderValue {
        /// The provider's name.
        provider: String,
        /// `apiKey` or `apiVersion`.
        field: &'static str,
    },
    /// A target names a provider the compiled policy does not have.
    #[error("target `{target}` names a provider the policy does not define")]
    UnknownProvider {
        /// The target's label.
        target: String,
    },
}

/// A configured upstream: one entry of `spec.providers`, ready to send.
#[derive(Debug)]
pub struct Provider {
    /// The policy's name for it.
    pub name: String,
    /// Its `gen_ai.provider.name` in the OpenTelemetry GenAI conventions.
    pub system: &'static str,
    /// The host and port it is reached at (`server.address`, `server.port`), when remote.
    pub server: Option<(String, u16)>,
    /// How it continues an answer another target began.
    pub continuation: Continuation,
    backend: Backend,
}

#[derive(Debug)]
enum Backend {
    OpenAi(openai::OpenAi),
    Anthropic(anthropic::Anthropic),
    Gemini(gemini::Gemini),
    Mock(Box<mock::Mock>),
}

/// One attempt's request, as a provider sends it.
#[derive(Clone, Copy)]
pub struct Call<'a> {
    /// The shared upstream client.
    pub http: &'a HttpClient,
    /// The model name sent to the provider.
    pub model: &'a str,
    /// The neutral request.
    pub request: &'a ChatRequest,
    /// Which of the provider's keys to use.
    pub key: usize,
    /// Trace headers (`traceparent`, `tracestate`) for the provider request.
    pub trace: &'a [(&'static str, ::http::HeaderValue)],
    /// How the target's requests are adapted, if the policy says.
    pub adapt: Option<&'a crate::chain::Adaptation>,
}

/// A successful send: the reply and what the provider said about its rate limits.
#[derive(Debug)]
pub struct Sent {
    /// The reply, in the provider's own wire format.
    pub reply: Reply,
    /// Rate-limit headroom from the response headers.
    pub headroom: Headroom,
    /// The wire format of `reply`.
    pub api: Api,
}

impl Provider {
    /// The live provider for a compiled one.
    pub fn build(config: &CompiledProvider) -> Result<Provider, InvalidBackend> {
        let backend = match config.kind {
            ProviderKind::OpenAi | ProviderKind::OpenAiCompatible | ProviderKind::AzureOpenAi => {
                Backend::OpenAi(openai::OpenAi::new(config)?)
            }
            ProviderKind::Anthropic => Backend::Anthropic(anthropic::Anthropic::new(config)?),
            ProviderKind::Gemini => Backend::Gemini(gemini::Gemini::new(config)?),
            ProviderKind::Mock => Backend::Mock(Box::new(mock::Mock::new(config.mock.clone().unwrap_or_default()))),
        };
        let system = match config.kind {
            ProviderKind::OpenAi | ProviderKind::OpenAiCompatible => "openai",
            ProviderKind::AzureOpenAi => "azure.ai.openai",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Gemini => "gcp.gemini",
            ProviderKind::Mock => "backstop.mock",
        };
        let server = (config.kind != ProviderKind::Mock)
            .then(|| config.base_url.parse::<::http::Uri>().ok())
            .flatten()
            .and_then(|uri| {
                let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("http") { 80 } else { 443 });
                Some((uri.host()?.to_string(), port))
            });
        let continuation = config.continuation.unwrap_or_else(|| Continuation::of_type(config.kind));
        Ok(Provider { name: config.name.clone(), system, server, continuation, backend })
    }

    /// The wire format of its answers.
    pub fn api(&self) -> Api {
        match &self.backend {
            Backend::OpenAi(_) | Backend::Mock(_) => Api::OpenAi,
            Backend::Anthropic(_) => Api::Anthropic,
            Backend::Gemini(_) => Api::Gemini,
        }
    }

    /// Why this provider cannot serve `request` faithfully, if it cannot: a parameter or
    /// content its API has no way to express. The chain skips it rather than send a request
    /// that means something else.
    pub fn unsupported(&self, request: &ChatRequest) -> Option<String> {
        if request.continues && self.continuation.is_none() {
            return Some("its provider cannot continue an answer another target began (`continuation: none`)".into());
        }
        match &self.backend {
            Backend::OpenAi(o)
                if o.speaks_responses() && request.origin.as_ref().is_some_and(|r| r.api == Api::Responses) =>
            {
                None
            }
            Backend::OpenAi(_) | Backend::Mock(_) => openai::unsupported(request),
            Backend::Anthropic(_) => anthropic::to_wire::unsupported(request),
            Backend::Gemini(_) => gemini::to_wire::unsupported(request),
        }
    }

    /// Sends the call's request to its model at this provider with its key. A `Stream`
    /// reply has answered with a 2xx but may still fail before its first chunk; the caller
    /// bounds every wait.
    pub async fn send(&self, call: Call<'_>) -> Result<Sent, AttemptError> {
        match &self.backend {
            Backend::OpenAi(upstream) => upstream.send(call).await,
            Backend::Anthropic(upstream) => upstream.send(call).await,
            Backend::Gemini(upstream) => upstream.send(call).await,
            Backend::Mock(mock) => mock.send(call.model, call.request).await.map(|reply| Sent {
                reply,
                headroom: Headroom::default(),
                api: Api::OpenAi,
            }),
        }
    }
}

/// Parses the URL `base` + `path` for provider `config`, refusing what cannot reach an API.
pub(crate) fn endpoint(config: &CompiledProvider, url: String) -> Result<::http::Uri, InvalidBackend> {
    let invalid = |reason: String| InvalidBackend::BaseUrl {
        provider: config.name.clone(),
        url: config.base_url.clone(),
        reason,
    };
    let uri: ::http::Uri = url.parse().map_err(|e| invalid(format!("{e}")))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(invalid("it must start with http:// or https://".into()));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(invalid("it has no host".into()));
    }
    Ok(uri)
}
