//! Where policies come from and how they reach the request path: a local file, watched and
//! reloaded ([`file`]), or the operator's authenticated config stream ([`stream`], whose
//! contract is [`crate::configstream`]) with the last configuration applied kept on local disk
//! ([`state`]).

pub mod file;
pub mod state;
pub mod stream;

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;

use crate::chain::LocalKeys;
use crate::snapshot::PolicyStore;
use file::{PolicyFile, Unusable};
use stream::{ControlStream, StreamError, StreamSettings};

/// Where a sidecar's policies come from.
pub enum Source {
    /// The operator's config stream. Until it is first reached, the configuration kept from
    /// the last run, else the policy file if one is given, else nothing (calls pass through).
    Operator {
        /// The stream.
        stream: StreamSettings,
        /// A policy file to serve until the operator is reached.
        until_reached: Option<PathBuf>,
    },
    /// A policy file alone, watched.
    File(PathBuf),
}

/// Why a sidecar's policies cannot start.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The config stream cannot be set up.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The policy file cannot be used.
    #[error(transparent)]
    File(#[from] Unusable),
}

/// A source whose first policies are in the store, ready to keep them current.
pub enum Started {
    /// Following the config stream.
    Stream(Box<ControlStream>),
    /// Watching the policy file.
    File(PolicyFile),
}

impl Source {
    /// Puts the first policies in `store` before the sidecar listens: a policy file that
    /// cannot be served stops the sidecar at once, with every problem; a later change that is
    /// invalid only keeps the last good policy.
    pub fn start(self, store: &Arc<PolicyStore>) -> Result<Started, SourceError> {
        let load_file = |path: PathBuf| {
            let mut file = PolicyFile::new(path.clone(), store.clone(), Arc::new(LocalKeys));
            file.reload().map_err(|error| Unusable::new(&path, &error))?;
            Ok::<_, SourceError>(file)
        };
        match self {
            Source::Operator { stream, until_reached } => {
                let url = stream.url.clone();
                let mut stream = ControlStream::new(stream, store.clone())?;
                if stream.restore().is_none() {
                    match until_reached {
                        Some(path) => {
                            load_file(path.clone())?;
                            tracing::info!(file = %path.display(), "serving the policy file until the operator is reached");
                        }
                        None => store.set_unavailable(format!("waiting for the operator at {url}")),
                    }
                }
                Ok(Started::Stream(Box::new(stream)))
            }
            Source::File(path) => Ok(Started::File(load_file(path)?)),
        }
    }
}

impl Started {
    /// Keeps the store current until `shutdown` turns true.
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        match self {
            Started::Stream(stream) => stream.run(shutdown).await,
            Started::File(file) => file.watch(shutdown).await,
        }
    }
}
