//! The last configuration a sidecar applied, kept in `--state-dir` so that a sidecar that
//! restarts while the operator is unreachable serves it rather than nothing. The file holds
//! API keys: it is written with mode 0600 (its directory 0700), atomically (a crash leaves the
//! old file or the new one, never half of one), and the chart mounts the directory from an
//! in-memory `emptyDir`, so it never reaches a disk and dies with the pod.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::configstream::v1::Config;

/// The file's name inside the state directory.
pub const FILE: &str = "config.json";

/// Why the persisted configuration could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// An I/O error on the file or its directory.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a configuration this release can read.
    #[error("{path} is not a configuration this sidecar can read: {source}")]
    Unreadable {
        /// The path.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io { path: path.to_path_buf(), source }
}

/// Writes `config` to `dir`.
pub fn save(dir: &Path, config: &Config) -> Result<(), StateError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(io(dir))?;
    let path = dir.join(FILE);
    let temporary = dir.join(format!(".{FILE}.{}", std::process::id()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let written = options.open(&temporary).and_then(|mut file| {
        file.write_all(&serde_json::to_vec(config).unwrap_or_default())?;
        file.sync_all()
    });
    if let Err(source) = written.and_then(|()| std::fs::rename(&temporary, &path)) {
        let _ = std::fs::remove_file(&temporary);
        return Err(StateError::Io { path, source });
    }
    Ok(())
}

/// Reads the configuration in `dir`, if there is one.
pub fn load(dir: &Path) -> Result<Option<Config>, StateError> {
    let path = dir.join(FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StateError::Io { path, source }),
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|source| StateError::Unreadable { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{DEMO_POLICY, compiled};

    #[test]
    fn a_saved_configuration_reads_back_and_only_its_owner_can_read_it() {
        let dir = tempfile::tempdir().expect("dir");
        let state = dir.path().join("state");
        assert!(load(&state).expect("no file is no error").is_none());
        let config = Config::new("shop", "web-1", vec![compiled(DEMO_POLICY)]);
        save(&state, &config).expect("saves");
        assert_eq!(load(&state).expect("reads"), Some(config.clone()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(state.join(FILE)).expect("file").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            let mode = std::fs::metadata(&state).expect("dir").permissions().mode();
            assert_eq!(mode & 0o777, 0o700);
        }
        std::fs::write(state.join(FILE), "{\"version\": 1").expect("write");
        let error = load(&state).expect_err("truncated");
        assert!(error.to_string().contains("config.json is not a configuration"), "{error}");
    }
}
