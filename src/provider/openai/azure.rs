//! Azure OpenAI: the Chat Completions wire format at deployment URLs, with an `api-version`
//! query and an `api-key` header. Azure's content-filter refusals (a 400 with code
//! `content_filter`, or a `content_filter` finish with no content) classify as
//! `contentFiltered`, in the OpenAI provider's shared classifier.

use http::Uri;

use crate::chain::CompiledProvider;
use crate::llm::AttemptError;
use crate::llm::FailureClass;
use crate::provider::{InvalidBackend, endpoint};

/// The `api-version` used when the policy names none: the latest GA version.
pub const DEFAULT_API_VERSION: &str = "2024-10-21";

/// Where an Azure OpenAI resource serves chat completions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployments {
    base: String,
    api_version: String,
}

impl Deployments {
    /// The resource a compiled `azure-openai` provider names (`baseUrl` such as
    /// `https://my-resource.openai.azure.com`). An `apiVersion` of `v1` selects Azure's v1 API,
    /// where the model is named in the body.
    pub fn new(config: &CompiledProvider) -> Result<Self, InvalidBackend> {
        let base = config.base_url.trim_end_matches('/').trim_end_matches("/openai").to_string();
        let api_version = config.api_version.clone().unwrap_or_else(|| DEFAULT_API_VERSION.to_string());
        let deployments = Deployments { base, api_version };
        endpoint(config, deployments.url("probe", "chat/completions"))?;
        Ok(deployments)
    }

    fn url(&self, deployment: &str, operation: &str) -> String {
        if self.api_version == "v1" {
            format!("{}/openai/v1/{operation}", self.base)
        } else {
            format!("{}/openai/deployments/{deployment}/{operation}?api-version={}", self.base, self.api_version)
        }
    }

    fn uri(&self, deployment: &str, operation: &str) -> Result<Uri, AttemptError> {
        self.url(deployment, operation).parse().map_err(|e| {
            AttemptError::new(FailureClass::BadRequest, format!("deployment `{deployment}` does not fit in a URL: {e}"))
        })
    }

    /// The chat completions URL for a deployment (the target's `model`).
    pub fn completions(&self, deployment: &str) -> Result<Uri, AttemptError> {
        self.uri(deployment, "chat/completions")
    }

    /// The embeddings URL for a deployment.
    pub fn embeddings(&self, deployment: &str) -> Result<Uri, AttemptError> {
        self.uri(deployment, "embeddings")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::ProviderKind;

    fn azure(base_url: &str, api_version: Option<&str>) -> Result<Deployments, InvalidBackend> {
        Deployments::new(&CompiledProvider {
            name: "azure".into(),
            kind: ProviderKind::AzureOpenAi,
            base_url: base_url.into(),
            api_version: api_version.map(str::to_string),
            ..CompiledProvider::default()
        })
    }

    #[test]
    fn builds_deployment_urls() {
        let d = azure("https://res.openai.azure.com/", None).expect("valid");
        assert_eq!(
            d.completions("gpt-4o-prod").expect("url").to_string(),
            "https://res.openai.azure.com/openai/deployments/gpt-4o-prod/chat/completions?api-version=2024-10-21"
        );
        let v1 = azure("https://res.openai.azure.com/openai", Some("v1")).expect("valid");
        assert_eq!(
            v1.completions("x").expect("url").to_string(),
            "https://res.openai.azure.com/openai/v1/chat/completions"
        );
        assert!(azure("ftp://x", None).is_err());
        assert!(d.completions("has space").is_err());
    }
}
