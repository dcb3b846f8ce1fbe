//! The config service's certificate: read from PEM files, served to every new connection, and
//! reloaded when the files change (cert-manager or the chart rotating the Secret they are
//! mounted from), without a restart. A change that does not load keeps the certificate that
//! works, and is logged once.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;

/// How often the files are compared with what is loaded. Kubernetes updates a mounted Secret
/// about a minute after it changes, so a few seconds more is lost in the noise.
pub const RELOAD_EVERY: Duration = Duration::from_secs(5);

/// Why a certificate and key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The certificate file holds no PEM certificate.
    #[error("{0} holds no PEM certificate")]
    NoCertificate(PathBuf),
    /// The key file holds no usable PEM private key.
    #[error("{path} holds no usable PEM private key: {problem}")]
    Key {
        /// The file.
        path: PathBuf,
        /// Why.
        problem: String,
    },
}

/// The certificate in force, and the files it comes from.
#[derive(Debug)]
pub struct ReloadingCert {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: ArcSwap<CertifiedKey>,
    /// The bytes last read, loaded or not, and the last problem logged.
    seen: Mutex<(Vec<u8>, Vec<u8>, Option<String>)>,
}

fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|source| CertError::Read { path: path.to_path_buf(), source })
}

fn certified(cert_file: &Path, cert: &[u8], key_file: &Path, key: &[u8]) -> Result<CertifiedKey, CertError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert).filter_map(Result::ok).collect();
    if chain.is_empty() {
        return Err(CertError::NoCertificate(cert_file.to_path_buf()));
    }
    let bad_key = |problem: String| CertError::Key { path: key_file.to_path_buf(), problem };
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| bad_key(e.to_string()))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| bad_key(e.to_string()))?;
    Ok(CertifiedKey::new(chain, signer))
}

impl ReloadingCert {
    /// Loads the certificate chain and key; fails if they do not load now.
    pub fn load(cert_file: PathBuf, key_file: PathBuf) -> Result<ReloadingCert, CertError> {
        let (cert, key) = (read(&cert_file)?, read(&key_file)?);
        let loaded = certified(&cert_file, &cert, &key_file, &key)?;
        Ok(ReloadingCert {
            cert_file,
            key_file,
            current: ArcSwap::from_pointee(loaded),
            seen: Mutex::new((cert, key, None)),
        })
    }

    /// The end-entity certificate in force.
    pub fn leaf(&self) -> Option<CertificateDer<'static>> {
        self.current.load().cert.first().cloned()
    }

    /// Loads the files again if they changed; returns whether a new certificate is in force.
    pub fn reload(&self) -> bool {
        let mut seen = self.seen.lock();
        let loaded =
            read(&self.cert_file).and_then(|cert| Ok((cert, read(&self.key_file)?))).and_then(|(cert, key)| {
                if (&cert, &key) == (&seen.0, &seen.1) {
                    return Ok(None);
                }
                seen.0.clone_from(&cert);
                seen.1.clone_from(&key);
                certified(&self.cert_file, &cert, &self.key_file, &key).map(Some)
            });
        match loaded {
            Ok(None) => false,
            Ok(Some(certified)) => {
                self.current.store(Arc::new(certified));
                seen.2 = None;
                tracing::info!(cert = %self.cert_file.display(), "serving a new certificate");
                true
            }
            Err(error) => {
                let error = error.to_string();
                if seen.2.as_deref() != Some(error.as_str()) {
                    tracing::error!(%error, "the certificate files changed but do not load; the previous certificate stays");
                    seen.2 = Some(error);
                }
                false
            }
        }
    }

    /// Reloads every [`RELOAD_EVERY`] until `shutdown`.
    pub async fn watch(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut ticks = tokio::time::interval(RELOAD_EVERY);
        ticks.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = ticks.tick() => { self.reload(); }
            }
        }
    }

    /// A server configuration that serves the certificate in force and speaks HTTP/2 only (the
    /// config stream is full duplex).
    pub fn server_config(self: &Arc<Self>) -> rustls::ServerConfig {
        self.server_config_for(&[b"h2"])
    }

    /// A server configuration that serves the certificate in force, offering `alpn`.
    pub fn server_config_for(self: &Arc<Self>, alpn: &[&[u8]]) -> rustls::ServerConfig {
        let mut config =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map(|builder| builder.with_no_client_auth().with_cert_resolver(self.clone()))
                .unwrap_or_else(|_| {
                    rustls::ServerConfig::builder().with_no_client_auth().with_cert_resolver(self.clone())
                });
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert =
            rcgen::CertificateParams::new(vec![name.to_string()]).expect("params").self_signed(&key).expect("cert");
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn a_changed_pair_is_served_and_a_broken_one_keeps_the_last_good() {
        let dir = tempfile::tempdir().expect("dir");
        let (cert_file, key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let (cert, key) = pair("one.example");
        std::fs::write(&cert_file, &cert).expect("write");
        std::fs::write(&key_file, &key).expect("write");
        let tls = ReloadingCert::load(cert_file.clone(), key_file.clone()).expect("loads");
        let first = tls.leaf().expect("leaf");
        assert!(!tls.reload(), "nothing changed");
        std::fs::write(&cert_file, "not a certificate").expect("write");
        assert!(!tls.reload());
        assert_eq!(tls.leaf(), Some(first.clone()), "the working certificate stays");
        let (cert, key) = pair("two.example");
        std::fs::write(&key_file, &key).expect("write");
        std::fs::write(&cert_file, &cert).expect("write");
        assert!(tls.reload());
        assert_ne!(tls.leaf(), Some(first));
        let missing = ReloadingCert::load(dir.path().join("nope.crt"), key_file).expect_err("no file");
        assert!(missing.to_string().contains("nope.crt"), "{missing}");
    }
}
