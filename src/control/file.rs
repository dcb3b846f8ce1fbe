//! The sidecar's policy file: parsed with field paths in every error, compiled, published, and
//! watched so that a valid change swaps in atomically and an invalid one changes nothing.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::chain::{InvalidPolicy, KeyResolver, PolicySnapshot, PolicyStore};
use crate::health::HealthRegistry;
use crate::policy::{API_VERSION, FallbackPolicy};

/// How often the file is re-read even without a change notification, for file systems that
/// send none (some network and overlay mounts).
const POLL_INTERVAL: Duration = Duration::from_secs(5);
/// Change notifications closer together than this are handled as one.
const SETTLE: Duration = Duration::from_millis(50);

/// Why a policy file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The YAML does not fit the `FallbackPolicy` schema.
    #[error("{0}")]
    Parse(String),
    /// It parsed, but does not compile.
    #[error(transparent)]
    Invalid(#[from] InvalidPolicy),
}

/// Parses one `FallbackPolicy` YAML document, naming the field path of a schema error
/// (for example `` `spec.routes[0].chain[1]`: unknown field `modle` ``).
pub fn parse_policy(yaml: &str) -> Result<FallbackPolicy, LoadError> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Types {
        api_version: Option<String>,
        kind: Option<String>,
    }
    let types: Types =
        serde_yaml_ng::from_str(yaml).map_err(|e| LoadError::Parse(format!("not a FallbackPolicy document: {e}")))?;
    let api_version = types.api_version.unwrap_or_default();
    if api_version != API_VERSION {
        return Err(LoadError::Parse(format!("`apiVersion`: must be `{API_VERSION}`, found `{api_version}`")));
    }
    let kind = types.kind.unwrap_or_default();
    if kind != "FallbackPolicy" {
        return Err(LoadError::Parse(format!("`kind`: must be `FallbackPolicy`, found `{kind}`")));
    }
    serde_yaml_ng::from_str(yaml).map_err(|e| LoadError::Parse(with_quoted_path(&e.to_string())))
}

/// serde_yaml reports `spec.routes[0].chain[1]: unknown field ...`; quote the path the way
/// compile errors do, so every policy error reads alike.
fn with_quoted_path(message: &str) -> String {
    // A key written straight into `apiKey` would be echoed by "invalid type: string ...":
    // never repeat what stands under a key field.
    if let Some((path, _)) = message.split_once(": ")
        && (path.contains("apiKey") || path.contains("value"))
    {
        return format!("`{path}`: must be an object with exactly one of `value`, `env` or `secretKeyRef`");
    }
    match message.split_once(": ") {
        Some((path, rest)) if !path.contains(' ') && path.starts_with(|c: char| c.is_ascii_alphabetic()) => {
            format!("`{path}`: {rest}")
        }
        _ => format!("not a FallbackPolicy document: {message}"),
    }
}

/// Reads, parses and compiles a policy file.
pub fn load(path: &Path, keys: &dyn KeyResolver) -> Result<(PolicySnapshot, String), LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read { path: path.to_path_buf(), source })?;
    let policy = parse_policy(&text)?;
    Ok((PolicySnapshot::compile(&policy, keys, &HealthRegistry::new())?, text))
}

/// Keeps a [`PolicyStore`] in step with a policy file.
pub struct PolicyFile {
    path: PathBuf,
    store: Arc<PolicyStore>,
    keys: Arc<dyn KeyResolver + Send + Sync>,
    last_text: Option<String>,
}

impl PolicyFile {
    /// A watcher for `path` feeding `store`.
    pub fn new(path: PathBuf, store: Arc<PolicyStore>, keys: Arc<dyn KeyResolver + Send + Sync>) -> Self {
        PolicyFile { path, store, keys, last_text: None }
    }

    /// Loads the file now. An invalid file leaves the store as it was.
    pub fn reload(&mut self) -> Result<Option<u64>, LoadError> {
        let text = std::fs::read_to_string(&self.path)
            .map_err(|source| LoadError::Read { path: self.path.clone(), source })?;
        if self.last_text.as_deref() == Some(text.as_str()) {
            return Ok(None);
        }
        let policy = parse_policy(&text)?;
        let snapshot = PolicySnapshot::compile(&policy, self.keys.as_ref(), self.store.health())?;
        let source = snapshot.source.clone();
        let version = self.store.publish(snapshot);
        self.last_text = Some(text);
        tracing::info!(file = %self.path.display(), policy = %source, version, "policy loaded");
        Ok(Some(version))
    }

    /// Loads the file now and logs the outcome; an invalid file leaves the store as it was.
    pub fn reload_and_log(&mut self) {
        if let Err(error) = self.reload() {
            let kept = self.store.load().map(|s| s.version);
            tracing::error!(file = %self.path.display(), %error, kept_version = ?kept, "policy not loaded; the last good policy stays");
        }
    }

    /// Reloads the file on every change until `shutdown` fires; load it first with
    /// [`PolicyFile::reload_and_log`]. The parent directory is watched, not the file, so editors
    /// that replace the file and Kubernetes' ConfigMap symlink swaps are seen too.
    pub async fn watch(mut self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let (tx, mut rx) = mpsc::channel::<()>(1);
        let watched_dir =
            self.path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if event.is_ok() {
                // A full channel already holds a pending reload; dropping this one loses nothing.
                let _ = tx.try_send(());
            }
        })
        .and_then(|mut watcher| watcher.watch(&watched_dir, RecursiveMode::NonRecursive).map(|()| watcher));
        let _watcher = match watcher {
            Ok(watcher) => Some(watcher),
            Err(error) => {
                tracing::warn!(dir = %watched_dir.display(), %error, "cannot watch the policy directory; polling every {}s", POLL_INTERVAL.as_secs());
                None
            }
        };
        let mut poll = tokio::time::interval(POLL_INTERVAL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                Some(()) = rx.recv() => {
                    tokio::time::sleep(SETTLE).await;
                    while rx.try_recv().is_ok() {}
                    self.reload_and_log();
                }
                _ = poll.tick() => self.reload_and_log(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_errors_name_the_field_path() {
        let base = "apiVersion: backstop.dev/v1alpha1\nkind: FallbackPolicy\nmetadata: {name: x}\nspec:\n  providers: [{name: m, type: mock}]\n  routes: [{model: chat, chain: [{provider: m, model: x}]}]\n";
        assert!(parse_policy(base).is_ok());
        let cases = [
            (base.replace("model: x}", "modle: x}"), "`spec.routes[0].chain[0]`: unknown field `modle`"),
            (base.replace("type: mock", "type: openia"), "`spec.providers[0].type`: unknown variant `openia`"),
            (
                base.replace("[{name: m, type: mock}]", "[{name: m, type: mock, mock: {chunks: many}}]"),
                "`spec.providers[0].mock.chunks`: invalid type",
            ),
            (base.replace("backstop.dev/v1alpha1", "v1"), "`apiVersion`: must be `backstop.dev/v1alpha1`"),
            (base.replace("kind: FallbackPolicy", "kind: ConfigMap"), "`kind`: must be `FallbackPolicy`"),
            (base.replace("  routes:", "  fallbakOn: [timeout]\n  routes:"), "`spec`: unknown field `fallbakOn`"),
            (
                base.replace("  routes: [{model: chat, chain: [{provider: m, model: x}]}]\n", ""),
                "`spec`: missing field `routes`",
            ),
            ("just text".to_string(), "not a FallbackPolicy document"),
            (
                base.replace("type: mock}]", "type: openai, apiKey: sk-live-leaky}]"),
                "`spec.providers[0].apiKey`: must be an object",
            ),
        ];
        for (yaml, expected) in cases {
            let error = parse_policy(&yaml).expect_err(expected).to_string();
            assert!(error.contains(expected), "expected {expected:?} in {error:?}");
            assert!(!error.contains("leaky"), "a key leaked into the error: {error}");
        }
    }
}
