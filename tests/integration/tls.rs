//! Upstream HTTPS through rustls: a private CA trusted with `--ca-file`, HTTP/2 and HTTP/1.1
//! chosen by ALPN, and an untrusted certificate refused (and fallen through).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::support::*;

struct TlsUpstream {
    addr: SocketAddr,
    versions: Arc<Mutex<Vec<Version>>>,
}

/// A private CA (its PEM) and a TLS upstream on 127.0.0.1 with a certificate it signed,
/// offering `alpn`.
async fn tls_upstream(alpn: &[&[u8]]) -> (String, TlsUpstream) {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("CA cert");
    let server_key = KeyPair::generate().expect("server key");
    let server_params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).expect("params");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let server = server_params.signed_by(&server_key, &issuer).expect("server cert");

    let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(
        vec![CertificateDer::from(server.der().to_vec())],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
    )
    .expect("server config");
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let versions = Arc::new(Mutex::new(Vec::new()));
    let seen = versions.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(socket).await else { return };
                let service = service_fn(move |request: Request<Incoming>| {
                    let seen = seen.clone();
                    async move {
                        seen.lock().expect("lock").push(request.version());
                        let _ = request.into_body().collect().await;
                        let body = json!({"id": "c", "object": "chat.completion", "created": 1, "model": "tls-model",
                                          "choices": [{"index": 0, "message": {"role": "assistant", "content": "over tls"}, "finish_reason": "stop"}]});
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body.to_string()))))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (ca.pem(), TlsUpstream { addr, versions })
}

fn policy(addr: SocketAddr) -> String {
    two_target_policy(&format!("https://127.0.0.1:{}/v1", addr.port()), "").replace("attempts: 2", "attempts: 1")
}

fn client_trusting(ca_pem: &str) -> backstop::net::client::HttpClient {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ca.pem");
    std::fs::write(&path, ca_pem).expect("write CA");
    let roots = backstop::net::client::load_ca_file(&path).expect("CA file");
    backstop::net::client::http_client(&roots).expect("client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstreams_negotiate_http2_and_http1_with_a_private_ca() {
    for (alpn, expected) in [(&[&b"h2"[..]][..], Version::HTTP_2), (&[&b"http/1.1"[..]][..], Version::HTTP_11)] {
        let (ca, upstream) = tls_upstream(alpn).await;
        let sidecar = TestSidecar::start_with(&policy(upstream.addr), client_trusting(&ca)).await;
        for stream in [false, false] {
            let answer = post(&sidecar.url("/v1/chat/completions"), &chat(stream)).await;
            assert_eq!(answer.status, 200, "{}", String::from_utf8_lossy(&answer.body));
            assert_eq!((answer.header("x-backstop-provider"), answer.text().as_str()), (Some("primary"), "over tls"));
        }
        assert_eq!(*upstream.versions.lock().expect("lock"), vec![expected, expected], "ALPN picked {expected:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_is_refused_and_falls_through() {
    let (_ca, upstream) = tls_upstream(&[b"h2", b"http/1.1"]).await;
    let sidecar = TestSidecar::start(&policy(upstream.addr)).await;
    let answer = post(&sidecar.url("/v1/chat/completions"), &chat(false)).await;
    assert_eq!(answer.header("x-backstop-provider"), Some("fallback"));
    assert_eq!(answer.header("x-backstop-fallback-reason"), Some("primary/up-model=connectError"));
    assert!(upstream.versions.lock().expect("lock").is_empty(), "no request crossed an untrusted connection");
    let missing = backstop::net::client::load_ca_file(std::path::Path::new("/nonexistent/ca.pem"));
    assert!(missing.is_err_and(|e| e.to_string().contains("cannot read")));
}
