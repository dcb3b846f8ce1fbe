//! API keys and where they come from: the sidecar resolves `value` and `env` itself, the
//! operator resolves `secretKeyRef` from the policy's namespace.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::policy::ApiKeySource;

/// An API key. Its `Debug` never shows the key, so it cannot leak through a log line. It is
/// serialized as itself: only onto the authenticated config stream and into the sidecar's
/// owner-only state file, never into `/config`, status or logs (see [`super::redact`]).
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ApiKey(Arc<str>);

impl ApiKey {
    /// Wraps a key.
    pub fn new(key: impl Into<Arc<str>>) -> Self {
        ApiKey(key.into())
    }

    /// The key itself, for the one header that carries it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A SHA-256 prefix of the key that tells keys apart (in health identities, in the
    /// compiled version) without revealing them; the same on every pod and every run.
    pub fn fingerprint(&self) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, self.0.as_bytes());
        digest.as_ref()[..6].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Whether the key can be sent in an HTTP header (visible ASCII, no line breaks).
    pub fn is_header_safe(&self) -> bool {
        !self.0.is_empty() && self.0.bytes().all(|b| (0x20..0x7f).contains(&b) || b == b'\t')
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// Why a key could not be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// `env` names a variable this process does not have.
    #[error("environment variable `{0}` is not set")]
    EnvUnset(String),
    /// `env` in a policy the operator serves: it cannot read a sidecar's environment.
    #[error("`env` names a variable of the sidecar's environment, which the operator cannot read; use `secretKeyRef`")]
    EnvInCluster,
    /// `value` in a policy a cluster serves: anyone who can read the policy could read the key.
    #[error(
        "an inline `value` key is refused in a cluster, where anyone who can read the policy could read it; put it in a Secret and use `secretKeyRef`"
    )]
    InlineInCluster,
    /// `secretKeyRef` in a policy the sidecar reads itself.
    #[error("`secretKeyRef` is resolved by the operator; a policy file must use `value` or `env`")]
    SecretRefInFile,
    /// The Secret does not exist (yet).
    #[error("Secret `{0}` not found in the policy's namespace")]
    SecretNotFound(String),
    /// The Secret lacks the label the operator requires of the Secrets it reads.
    #[error(
        "Secret `{0}` is not labelled `backstop.dev/credentials=true`, which this operator requires of the Secrets it reads"
    )]
    SecretNotLabelled(String),
    /// The Secret has no such key.
    #[error("Secret `{name}` has no key `{key}`")]
    SecretKeyNotFound {
        /// The Secret.
        name: String,
        /// The missing key.
        key: String,
    },
    /// A local policy's key is not usable in a header.
    #[error("the key holds characters not allowed in an HTTP header")]
    NotHeaderSafe,
}

/// Finds the API key an `apiKey` names (exactly one of its fields is set).
pub trait KeyResolver {
    /// The key, or why it cannot be had.
    fn resolve(&self, source: &ApiKeySource) -> Result<ApiKey, KeyError>;
}

/// Resolves `value` and `env` keys from the policy and this process's environment, as a
/// sidecar running from a policy file does.
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalKeys;

impl KeyResolver for LocalKeys {
    fn resolve(&self, source: &ApiKeySource) -> Result<ApiKey, KeyError> {
        if let Some(value) = &source.value {
            return Ok(ApiKey::new(value.as_str()));
        }
        if let Some(name) = &source.env {
            return match std::env::var(name) {
                Ok(value) if !value.is_empty() => Ok(ApiKey::new(value)),
                _ => Err(KeyError::EnvUnset(name.clone())),
            };
        }
        Err(KeyError::SecretRefInFile)
    }
}

/// Resolves keys as `backstop check` sees them: `value` and `env` as a sidecar would, and
/// `secretKeyRef` as a placeholder, since only the operator can read the Secret; so that one
/// command checks policy files and cluster policies alike.
#[derive(Debug, Default, Clone, Copy)]
pub struct CheckKeys;

impl KeyResolver for CheckKeys {
    fn resolve(&self, source: &ApiKeySource) -> Result<ApiKey, KeyError> {
        match &source.secret_key_ref {
            Some(reference) => Ok(ApiKey::new(format!("secret:{}/{}", reference.name, reference.key))),
            None => LocalKeys.resolve(source),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_never_show_and_fingerprints_are_stable() {
        let key = ApiKey::new("sk-live-123");
        assert_eq!(format!("{key:?}"), "ApiKey(<redacted>)");
        assert_eq!(key.fingerprint(), ApiKey::new("sk-live-123").fingerprint());
        assert_ne!(key.fingerprint(), ApiKey::new("sk-live-124").fingerprint());
        assert_eq!(key.fingerprint().len(), 12);
        assert!(!key.fingerprint().contains("123"));
        assert!(key.is_header_safe());
        assert!(!ApiKey::new("bad\nkey").is_header_safe());
    }
}
