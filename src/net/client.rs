//! The outbound HTTP client both halves build on: HTTPS through rustls (ring) with the Mozilla
//! roots plus extra CAs from PEM files, HTTP/2 or HTTP/1.1 by ALPN, pooled connections.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::CertificateDer;

/// The shared upstream HTTP client: pooled connections, HTTPS through rustls, HTTP/1.1 and
/// HTTP/2 (chosen by ALPN).
pub type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Builds the upstream client: HTTPS through rustls (ring) trusting the Mozilla roots plus
/// `extra_roots` (a private gateway's CA), HTTP/1.1 and HTTP/2 chosen by ALPN. Call once per
/// process: its pool is shared by every provider and survives policy reloads.
pub fn http_client(extra_roots: &[CertificateDer<'static>]) -> Result<HttpClient, rustls::Error> {
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    for root in extra_roots {
        roots.add(root.clone())?;
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .build(https_connector(tls, Duration::from_secs(10))))
}

/// The connector of an outbound client: `https://` through rustls with `tls`, plain `http://`
/// too, HTTP/2 or HTTP/1.1 by ALPN, no Nagle delay, connects bounded by `connect_timeout`.
pub fn https_connector(
    tls: rustls::ClientConfig,
    connect_timeout: Duration,
) -> hyper_rustls::HttpsConnector<HttpConnector> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http)
}

/// Why a CA file cannot be trusted.
#[derive(Debug, thiserror::Error)]
pub enum CaFileError {
    /// It could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: rustls::pki_types::pem::Error,
    },
    /// It is not PEM certificates.
    #[error("{path} is not a PEM certificate bundle: {source}")]
    NotPem {
        /// The file.
        path: PathBuf,
        /// Why.
        source: rustls::pki_types::pem::Error,
    },
    /// It holds none.
    #[error("{0} holds no certificate")]
    Empty(PathBuf),
}

/// Reads the certificates of a PEM file, for [`http_client`]'s extra roots.
pub fn load_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaFileError> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|source| CaFileError::Read { path: path.to_path_buf(), source })?
        .collect::<Result<_, _>>()
        .map_err(|source| CaFileError::NotPem { path: path.to_path_buf(), source })?;
    if certs.is_empty() {
        return Err(CaFileError::Empty(path.to_path_buf()));
    }
    Ok(certs)
}
