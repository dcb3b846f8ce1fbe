//! The API keys a policy names in Secrets of its namespace: which Secrets a policy references,
//! and a [`KeyResolver`] over those Secrets as read for one reconcile.
//!
//! The operator reads each referenced Secret when it reconciles (one GET each) rather than
//! caching every Secret of every watched namespace: it only ever holds the keys its policies
//! use, and a rotated key is seen at the next reconcile, which the Secret watch triggers.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Secret;
use kube::Api;

use crate::chain::{ApiKey, KeyError, KeyResolver};
use crate::policy::{ApiKeySource, FallbackPolicySpec};

/// The label an operator started with `--require-credentials-label` requires of every Secret it
/// reads (value `true`).
pub const CREDENTIALS_LABEL: &str = "backstop.dev/credentials";

/// The names of the Secrets a policy's keys come from.
pub fn referenced(spec: &FallbackPolicySpec) -> BTreeSet<String> {
    spec.providers
        .iter()
        .flat_map(|p| p.api_key.iter().chain(p.api_keys.iter().flatten()))
        .filter_map(|source| source.secret_key_ref.as_ref().map(|r| r.name.clone()))
        .collect()
}

/// Whether a policy takes a key from Secret `name`.
pub fn references(spec: &FallbackPolicySpec, name: &str) -> bool {
    spec.providers
        .iter()
        .flat_map(|p| p.api_key.iter().chain(p.api_keys.iter().flatten()))
        .any(|source| source.secret_key_ref.as_ref().is_some_and(|r| r.name == name))
}

/// One Secret as a reconcile read it.
enum Read {
    /// It does not exist.
    Missing,
    /// It exists without the required label: its data was not kept.
    Unlabelled,
    /// Its data.
    Data(BTreeMap<String, Vec<u8>>),
}

/// The Secrets one reconcile read, by name.
#[derive(Default)]
pub struct SecretKeys {
    secrets: BTreeMap<String, Read>,
}

impl SecretKeys {
    /// Reads the Secrets `names` from `api` (the policy's namespace); with `require_label`, a
    /// Secret without [`CREDENTIALS_LABEL`]`=true` is not used.
    pub async fn read(api: &Api<Secret>, names: BTreeSet<String>, require_label: bool) -> kube::Result<SecretKeys> {
        let mut secrets = BTreeMap::new();
        for name in names {
            let read = match api.get_opt(&name).await? {
                None => Read::Missing,
                Some(secret) if require_label && !labelled(&secret) => Read::Unlabelled,
                Some(secret) => {
                    Read::Data(secret.data.unwrap_or_default().into_iter().map(|(key, bytes)| (key, bytes.0)).collect())
                }
            };
            secrets.insert(name, read);
        }
        Ok(SecretKeys { secrets })
    }

    /// The keys `spec`'s `secretKeyRef`s name, by `SECRET/KEY`: what the config stream sends
    /// with the policy (those that resolve; a compiled policy has them all).
    pub fn named_by(&self, spec: &FallbackPolicySpec) -> BTreeMap<String, ApiKey> {
        spec.providers
            .iter()
            .flat_map(|p| p.api_key.iter().chain(p.api_keys.iter().flatten()))
            .filter_map(|source| {
                let reference = source.secret_key_ref.as_ref()?;
                let key = self.resolve(source).ok()?;
                Some((crate::configstream::v2::key_name(&reference.name, &reference.key), key))
            })
            .collect()
    }
}

fn labelled(secret: &Secret) -> bool {
    secret.metadata.labels.as_ref().and_then(|labels| labels.get(CREDENTIALS_LABEL)).is_some_and(|v| v == "true")
}

impl KeyResolver for SecretKeys {
    fn resolve(&self, source: &ApiKeySource) -> Result<ApiKey, KeyError> {
        if source.value.is_some() {
            return Err(KeyError::InlineInCluster);
        }
        if source.env.is_some() {
            return Err(KeyError::EnvInCluster);
        }
        let Some(reference) = &source.secret_key_ref else { return Err(KeyError::SecretRefInFile) };
        let data = match self.secrets.get(&reference.name) {
            Some(Read::Data(data)) => data,
            Some(Read::Unlabelled) => return Err(KeyError::SecretNotLabelled(reference.name.clone())),
            _ => return Err(KeyError::SecretNotFound(reference.name.clone())),
        };
        let bytes = data
            .get(&reference.key)
            .ok_or_else(|| KeyError::SecretKeyNotFound { name: reference.name.clone(), key: reference.key.clone() })?;
        // `kubectl create secret --from-file` keeps a file's trailing newline; no key has one.
        let text = std::str::from_utf8(bytes).map_err(|_| KeyError::NotHeaderSafe)?.trim();
        Ok(ApiKey::new(text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::SecretKeyRef;

    /// The keys of these Secrets (`None`: the Secret does not exist).
    fn secret_keys(secrets: BTreeMap<String, Option<BTreeMap<String, Vec<u8>>>>) -> SecretKeys {
        let secrets = secrets.into_iter().map(|(name, data)| (name, data.map_or(Read::Missing, Read::Data))).collect();
        SecretKeys { secrets }
    }

    fn reference(name: &str, key: &str) -> ApiKeySource {
        ApiKeySource {
            value: None,
            env: None,
            secret_key_ref: Some(SecretKeyRef { name: name.into(), key: key.into() }),
        }
    }

    #[test]
    fn resolves_secret_keys_and_names_what_is_missing() {
        let secrets = secret_keys(BTreeMap::from([
            ("llm-keys".to_string(), Some(BTreeMap::from([("openai".to_string(), b"sk-live\n".to_vec())]))),
            ("gone".to_string(), None),
        ]));
        assert_eq!(
            secrets.resolve(&reference("llm-keys", "openai")).map(|k| k.expose().to_string()),
            Ok("sk-live".into())
        );
        assert_eq!(
            secrets.resolve(&reference("llm-keys", "anthropic")),
            Err(KeyError::SecretKeyNotFound { name: "llm-keys".into(), key: "anthropic".into() })
        );
        assert_eq!(secrets.resolve(&reference("gone", "x")), Err(KeyError::SecretNotFound("gone".into())));
        assert_eq!(secrets.resolve(&reference("never-read", "x")), Err(KeyError::SecretNotFound("never-read".into())));
        let env = ApiKeySource { value: None, env: Some("OPENAI_API_KEY".into()), secret_key_ref: None };
        assert_eq!(secrets.resolve(&env), Err(KeyError::EnvInCluster));
        let inline = ApiKeySource { value: Some("sk-inline".into()), env: None, secret_key_ref: None };
        assert_eq!(secrets.resolve(&inline), Err(KeyError::InlineInCluster), "inline keys are for policy files");
        let unlabelled = SecretKeys { secrets: BTreeMap::from([("plain".to_string(), Read::Unlabelled)]) };
        assert_eq!(unlabelled.resolve(&reference("plain", "x")), Err(KeyError::SecretNotLabelled("plain".into())));
    }
}
