//! The real `backstop operator` binary as a process, running under a ServiceAccount token bound
//! to the RBAC in `deploy/operator/rbac.yaml`: shared by the operator tests and the operator
//! benchmark.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::cluster::Cluster;

const BIN: &str = env!("CARGO_BIN_EXE_backstop");

/// A CA and a certificate for 127.0.0.1 that it signed: what the operator's config service
/// serves in the tests, and what their sidecars trust.
pub struct Pki {
    /// The folder holding `ca.crt`, `tls.crt` and `tls.key`.
    pub dir: PathBuf,
}

impl Pki {
    /// The CA certificate sidecars trust.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
}

/// The tests' PKI, made once per process.
pub fn pki() -> &'static Pki {
    static PKI: std::sync::OnceLock<Pki> = std::sync::OnceLock::new();
    PKI.get_or_init(|| {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let dir = tempfile::Builder::new().prefix("backstop-pki-").tempdir().expect("tempdir").keep();
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).expect("CA");
        let key = KeyPair::generate().expect("key");
        let params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).expect("params");
        let cert = params.signed_by(&key, &Issuer::new(ca_params, ca_key)).expect("cert");
        std::fs::write(dir.join("ca.crt"), ca.pem()).expect("write");
        std::fs::write(dir.join("tls.crt"), cert.pem()).expect("write");
        std::fs::write(dir.join("tls.key"), key.serialize_pem()).expect("write");
        Pki { dir }
    })
}

/// A running `backstop operator`, logging JSON.
pub struct Operator {
    child: Child,
    /// Its admin listener.
    pub admin: SocketAddr,
    /// Its config service.
    pub config: SocketAddr,
    /// Its injection webhook, when started with one.
    pub webhook: Option<SocketAddr>,
    log: Arc<Mutex<String>>,
}

impl Operator {
    /// Starts the operator as `identity`, authenticated by `kubeconfig`, serving `namespaces`,
    /// with its Lease in `lease_namespace` and short lease timings.
    pub async fn start(kubeconfig: &Path, identity: &str, lease_namespace: &str, namespaces: &[&str]) -> Operator {
        Operator::start_on(kubeconfig, identity, lease_namespace, namespaces, "127.0.0.1:0", &[]).await
    }

    /// [`Operator::start`] with its config service on `config_listen` (to come back on the same
    /// address after a restart).
    pub async fn start_on(
        kubeconfig: &Path,
        identity: &str,
        lease_namespace: &str,
        namespaces: &[&str],
        config_listen: &str,
        extra: &[String],
    ) -> Operator {
        let pki = pki();
        let mut child = Command::new(BIN)
            .args(["operator", "--admin", "127.0.0.1:0", "--log-format", "json", "--lease-duration", "3s"])
            .args([
                "--lease-renew",
                "1s",
                "--lease-renew-deadline",
                "2s",
                "--lease-retry",
                "500ms",
                "--identity",
                identity,
            ])
            .args(["--lease-namespace", lease_namespace, "--namespaces", &namespaces.join(",")])
            .args(["--config-listen", config_listen])
            .args(if extra.iter().any(|a| a == "--tls-cert-file") {
                Vec::new()
            } else {
                vec![
                    "--tls-cert-file".into(),
                    pki.dir.join("tls.crt").into_os_string(),
                    "--tls-key-file".into(),
                    pki.dir.join("tls.key").into_os_string(),
                ]
            })
            .args(if extra.iter().any(|a| a == "--webhook-listen") {
                &[][..]
            } else {
                &["--webhook-listen", "none"][..]
            })
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            .env("BACKSTOP_LOG", "debug,kube=info,hyper=info,h2=info,tower=info,rustls=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start backstop operator");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sink = log.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            let mut tx = Some(tx);
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(event) = serde_json::from_str::<Value>(&line)
                    && event["message"] == "backstop operator starting"
                    && let Some(tx) = tx.take()
                {
                    let address = |key: &str| event[key].as_str().and_then(|a| a.parse::<SocketAddr>().ok());
                    let _ = tx.send((address("admin"), address("config"), address("webhook")));
                }
                sink.lock().expect("lock").push_str(&(line + "\n"));
            }
        });
        let (admin, config, webhook) = tokio::time::timeout(Duration::from_secs(20), rx)
            .await
            .expect("the operator starts within 20 s")
            .expect("starting line");
        Operator { child, admin: admin.expect("admin address"), config: config.expect("config address"), webhook, log }
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        self.log.lock().expect("lock").clone()
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// GETs `path` from its admin listener: the status and the body.
    pub async fn get(&self, path: &str) -> (u16, String) {
        let client = HttpClient::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
        let uri: http::Uri = format!("http://{}{path}", self.admin).parse().expect("uri");
        let response = client.get(uri).await.expect("admin answers");
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// Sends `signal` (`-TERM`, `-KILL`) and waits for it to exit.
    pub async fn signal(&mut self, signal: &str) {
        let _ = std::process::Command::new("kill").args([signal, &self.pid().to_string()]).status();
        tokio::time::timeout(Duration::from_secs(15), self.child.wait()).await.expect("exits").expect("wait");
    }
}

/// A namespace for an operator, with the ServiceAccount and RBAC of `deploy/operator/rbac.yaml`
/// (renamed into it, so that tests running side by side do not share a Lease), and a
/// kubeconfig with that ServiceAccount's token.
pub async fn operator_identity(cluster: &Cluster) -> (String, PathBuf) {
    let namespace = cluster.namespace("bs-operator").await;
    let rbac =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/operator/rbac.yaml")).expect("rbac");
    let account = format!("backstop-operator-{namespace}");
    let rbac = rbac
        .replace("namespace: backstop-system", &format!("namespace: {namespace}"))
        .lines()
        .map(|line| {
            if line.trim_end().ends_with("name: backstop-operator") {
                line.replace("backstop-operator", &account)
            } else {
                line.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    cluster.apply_yaml(&rbac).await;
    let kubeconfig = cluster.service_account_kubeconfig(&namespace, &account).await;
    (namespace, kubeconfig)
}
