//! The sidecar's policy file: parsed with field paths in every error, compiled, published, and
//! watched so that a valid change swaps in atomically and an invalid one changes nothing.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::chain::{CompiledPolicy, InvalidPolicy, KeyResolver, compile};
use crate::policy::document::{DocumentError, parse_policy};
use crate::provider::InvalidBackend;
use crate::snapshot::PolicyStore;

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
    #[error(transparent)]
    Document(#[from] DocumentError),
    /// It parsed, but does not compile.
    #[error(transparent)]
    Invalid(#[from] InvalidPolicy),
    /// It compiled, but a provider cannot be built from it.
    #[error(transparent)]
    Backend(#[from] InvalidBackend),
}

impl LoadError {
    /// Each problem on its own, for a report with one line each.
    pub fn problems(&self) -> Vec<String> {
        match self {
            LoadError::Document(document) => document.problems(),
            LoadError::Invalid(invalid) => invalid.errors.iter().map(ToString::to_string).collect(),
            other => vec![other.to_string()],
        }
    }
}

/// A policy file that cannot be used, named, with each of its problems: a single problem on
/// the same line, several one to a line.
#[derive(Debug, thiserror::Error)]
pub enum Unusable {
    /// One problem that is not the policy's content (the file cannot be read, say).
    #[error("{path} is not a usable policy: {problem}")]
    One {
        /// The file.
        path: String,
        /// The problem.
        problem: String,
    },
    /// The policy's own problems.
    #[error("{path} is not a valid FallbackPolicy:\n{}", .problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        /// The file.
        path: String,
        /// Its problems, each with its field path.
        problems: Vec<String>,
    },
}

impl Unusable {
    /// Why the policy file at `path` cannot be used.
    pub fn new(path: &Path, error: &LoadError) -> Unusable {
        let path = path.display().to_string();
        let mut problems = error.problems();
        if problems.len() == 1 && !matches!(error, LoadError::Invalid(_) | LoadError::Document(_)) {
            return Unusable::One { path, problem: problems.remove(0) };
        }
        Unusable::Invalid { path, problems }
    }
}

/// Reads, parses and compiles a policy file.
pub fn load(path: &Path, keys: &dyn KeyResolver) -> Result<(CompiledPolicy, String), LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read { path: path.to_path_buf(), source })?;
    let policy = parse_policy(&text)?;
    Ok((compile(&policy, keys)?, text))
}

/// Keeps a [`PolicyStore`] in step with a policy file.
pub struct PolicyFile {
    path: PathBuf,
    store: Arc<PolicyStore>,
    keys: Arc<dyn KeyResolver + Send + Sync>,
    /// The text last read, valid or not: the same text again changes nothing.
    last_text: Option<String>,
    /// The last problem logged, so that a file that stays broken is reported once.
    last_error: Option<String>,
}

impl PolicyFile {
    /// A watcher for `path` feeding `store`.
    pub fn new(path: PathBuf, store: Arc<PolicyStore>, keys: Arc<dyn KeyResolver + Send + Sync>) -> Self {
        PolicyFile { path, store, keys, last_text: None, last_error: None }
    }

    /// Loads the file now. An invalid file leaves the store as it was.
    pub fn reload(&mut self) -> Result<Option<u64>, LoadError> {
        let text = std::fs::read_to_string(&self.path)
            .map_err(|source| LoadError::Read { path: self.path.clone(), source })?;
        if self.last_text.as_deref() == Some(text.as_str()) {
            return Ok(None);
        }
        self.last_text = Some(text);
        let text = self.last_text.as_deref().unwrap_or_default();
        let compiled = compile(&parse_policy(text)?, self.keys.as_ref())?;
        let version = self.store.publish(&compiled)?;
        self.last_error = None;
        tracing::info!(file = %self.path.display(), policy = %compiled.source, version, "policy loaded");
        Ok(Some(version))
    }

    /// Loads the file now and logs the outcome; an invalid file leaves the store as it was.
    pub fn reload_and_log(&mut self) {
        let Err(error) = self.reload() else { return };
        let error = error.to_string();
        if self.last_error.as_deref() == Some(error.as_str()) {
            return;
        }
        match self.store.load() {
            Some(kept) => tracing::error!(file = %self.path.display(), %error, kept_version = kept.version,
                "policy not loaded; the last good policy stays"),
            None => tracing::error!(file = %self.path.display(), %error, "policy not loaded; no policy to serve yet"),
        }
        self.last_error = Some(error);
    }

    /// Reloads the file on every change until `shutdown` fires; load it first with
    /// [`PolicyFile::reload_and_log`]. The parent directory is watched, not the file, so editors
    /// that replace the file and Kubernetes' ConfigMap symlink swaps are seen too.
    pub async fn watch(mut self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let (tx, mut rx) = mpsc::channel::<()>(1);
        let watched_dir =
            self.path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            // Reading the file is an event too (`Access`): reacting to it would re-read the file
            // forever. Anything that can change what is there (a write, a rename, a symlink
            // swap) triggers a reload.
            if event.is_ok_and(|event| !matches!(event.kind, EventKind::Access(_))) {
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
