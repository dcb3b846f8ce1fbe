//! Azure OpenAI: the Chat Completions wire format at deployment URLs, with an `api-version`
//! query and an `api-key` header. Azure's content-filter refusals (a 400 with code
//! `content_filter`, or a `content_filter` finish with no content) classify as
//! `contentFiltered`, in the OpenAI provider's shared classifier.

use http::Uri;

/// The `api-version` used when the policy names none: the latest GA version.
pub const DEFAULT_API_VERSION: &str = "2024-10-21";

/// Where an Azure OpenAI resource serves chat completions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployments {
    base: String,
    api_version: String,
}

impl Deployments {
    /// A resource at `base_url` (such as `https://my-resource.openai.azure.com`). An
    /// `api_version` of `v1` selects Azure's v1 API, where the model is named in the body.
    pub fn new(base_url: &str, api_version: Option<&str>) -> Result<Self, String> {
        let base = base_url.trim_end_matches('/').trim_end_matches("/openai").to_string();
        let deployments = Deployments { base, api_version: api_version.unwrap_or(DEFAULT_API_VERSION).to_string() };
        let probe = deployments.completions("probe")?;
        if !matches!(probe.scheme_str(), Some("http" | "https")) || probe.host().is_none() {
            return Err("must be an http:// or https:// URL with a host".to_string());
        }
        Ok(deployments)
    }

    /// The chat completions URL for a deployment (the target's `model`).
    pub fn completions(&self, deployment: &str) -> Result<Uri, String> {
        let url = if self.api_version == "v1" {
            format!("{}/openai/v1/chat/completions", self.base)
        } else {
            format!("{}/openai/deployments/{deployment}/chat/completions?api-version={}", self.base, self.api_version)
        };
        url.parse().map_err(|e| format!("not a valid URL: {e}"))
    }

    /// The embeddings URL for a deployment.
    pub fn embeddings(&self, deployment: &str) -> Result<Uri, String> {
        let url = if self.api_version == "v1" {
            format!("{}/openai/v1/embeddings", self.base)
        } else {
            format!("{}/openai/deployments/{deployment}/embeddings?api-version={}", self.base, self.api_version)
        };
        url.parse().map_err(|e| format!("not a valid URL: {e}"))
    }

    /// The base URL, for health identities.
    pub fn base(&self) -> &str {
        &self.base
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_deployment_urls() {
        let d = Deployments::new("https://res.openai.azure.com/", None).expect("valid");
        assert_eq!(
            d.completions("gpt-4o-prod").expect("url").to_string(),
            "https://res.openai.azure.com/openai/deployments/gpt-4o-prod/chat/completions?api-version=2024-10-21"
        );
        let v1 = Deployments::new("https://res.openai.azure.com/openai", Some("v1")).expect("valid");
        assert_eq!(
            v1.completions("x").expect("url").to_string(),
            "https://res.openai.azure.com/openai/v1/chat/completions"
        );
        assert!(Deployments::new("ftp://x", None).is_err());
        assert!(d.completions("has space").is_err());
    }
}
