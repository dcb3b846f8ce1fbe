//! A real Kubernetes API server for the tests: `etcd` and `kube-apiserver` started from the
//! folder `KUBEBUILDER_ASSETS` names (the envtest convention; `tests/tools/build envtest`
//! builds them), or an existing cluster named by `BACKSTOP_TEST_KUBECONFIG`. One per test
//! binary run, shared by every test, each of which works in namespaces of its own.
//!
//! The servers outlive no test run: a watchdog stops exactly the processes started here when
//! the test process exits, however it exits.

use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DynamicObject, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::discovery::ApiResource;
use kube::{Api, Client, Config, ResourceExt};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use tokio::sync::OnceCell;

/// The test API server.
pub struct Cluster {
    /// A kubeconfig with admin rights.
    pub kubeconfig: PathBuf,
    /// Where the servers keep their state and logs (kept when the cluster is external: none).
    pub dir: PathBuf,
    /// The folder of `kubectl`, when the assets have one.
    kubectl: Option<PathBuf>,
    /// etcd, kube-apiserver and the watchdog that stops them when this process exits (a static
    /// is never dropped, so the watchdog, not a `Drop`, is what stops them).
    _processes: Vec<std::process::Child>,
}

static CLUSTER: OnceCell<Option<Arc<Cluster>>> = OnceCell::const_new();

/// The shared test cluster, started on first use; `None` (with one line saying why) where
/// there is none to be had. In CI there must be one.
pub async fn cluster() -> Option<Arc<Cluster>> {
    CLUSTER
        .get_or_init(|| async {
            if let Some(kubeconfig) = std::env::var_os("BACKSTOP_TEST_KUBECONFIG") {
                return Some(Arc::new(Cluster {
                    kubeconfig: kubeconfig.into(),
                    dir: std::env::temp_dir(),
                    kubectl: None,
                    _processes: Vec::new(),
                }));
            }
            let Some(assets) = std::env::var_os("KUBEBUILDER_ASSETS").map(PathBuf::from) else {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "CI runs every Kubernetes test: set KUBEBUILDER_ASSETS (tests/tools/build envtest prints it)"
                );
                eprintln!(
                    "no Kubernetes API server for the operator tests: set KUBEBUILDER_ASSETS (run `tests/tools/build envtest`) \
                     or BACKSTOP_TEST_KUBECONFIG; those tests pass without running"
                );
                return None;
            };
            let started = Instant::now();
            let cluster = tokio::task::spawn_blocking(move || start(&assets)).await.expect("start the API server");
            eprintln!("test API server ready in {:?} ({})", started.elapsed(), cluster.dir.display());
            Some(Arc::new(cluster))
        })
        .await
        .clone()
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

fn start(assets: &Path) -> Cluster {
    let dir = tempfile::Builder::new().prefix("backstop-envtest-").tempdir().expect("tempdir").keep();
    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki).expect("pki dir");
    // A CA, the API server's certificate, the service-account signing key, an admin token.
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("CA cert");
    let server_key = KeyPair::generate().expect("server key");
    let names = ["127.0.0.1", "localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"];
    let server_params = CertificateParams::new(names.map(String::from).to_vec()).expect("params");
    let server = server_params.signed_by(&server_key, &rcgen::Issuer::new(ca_params, ca_key)).expect("cert");
    let sa_key = KeyPair::generate().expect("service-account key");
    let token = format!("{:032x}", rand::random::<u128>());
    let write = |name: &str, text: &str| std::fs::write(pki.join(name), text).expect("write pki");
    write("ca.crt", &ca.pem());
    write("apiserver.crt", &server.pem());
    write("apiserver.key", &server_key.serialize_pem());
    write("sa.key", &sa_key.serialize_pem());
    write("sa.pub", &sa_key.public_key_pem());
    write("tokens.csv", &format!("{token},envtest-admin,envtest-admin,\"system:masters\"\n"));

    let (etcd_port, peer_port, api_port) = (free_port(), free_port(), free_port());
    let log = |name: &str| std::fs::File::create(dir.join(format!("{name}.log"))).expect("log file");
    let etcd = Command::new(assets.join("etcd"))
        .args([
            "--name=envtest".to_string(),
            format!("--data-dir={}", dir.join("etcd").display()),
            format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"),
            format!("--advertise-client-urls=http://127.0.0.1:{etcd_port}"),
            format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"),
            format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"),
            format!("--initial-cluster=envtest=http://127.0.0.1:{peer_port}"),
            "--unsafe-no-fsync".to_string(),
            "--log-level=warn".to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(log("etcd"))
        .stderr(log("etcd"))
        .spawn()
        .expect("start etcd (KUBEBUILDER_ASSETS)");
    let p = |name: &str| pki.join(name).display().to_string();
    let apiserver = Command::new(assets.join("kube-apiserver"))
        .args([
            format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
            format!("--secure-port={api_port}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--cert-dir={}", pki.display()),
            format!("--tls-cert-file={}", p("apiserver.crt")),
            format!("--tls-private-key-file={}", p("apiserver.key")),
            format!("--client-ca-file={}", p("ca.crt")),
            format!("--token-auth-file={}", p("tokens.csv")),
            "--authorization-mode=RBAC".into(),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            format!("--service-account-key-file={}", p("sa.pub")),
            format!("--service-account-signing-key-file={}", p("sa.key")),
            "--api-audiences=https://kubernetes.default.svc,backstop".into(),
            "--service-cluster-ip-range=127.254.0.0/24".into(),
            "--allow-privileged=true".into(),
            "--endpoint-reconciler-type=none".into(),
        ])
        .stdin(Stdio::null())
        .stdout(log("kube-apiserver"))
        .stderr(log("kube-apiserver"))
        .spawn()
        .expect("start kube-apiserver (KUBEBUILDER_ASSETS)");
    // Stop exactly these two when this test process exits, however it exits, and remove etcd's
    // data (64 MiB of preallocated log a run); the servers' logs stay for a failure's reader.
    let pids = format!("{} {}", apiserver.id(), etcd.id());
    let watchdog = Command::new("sh")
        .args([
            "-c",
            &format!(
                "while kill -0 {parent} 2>/dev/null; do sleep 1; done; kill {pids} 2>/dev/null; sleep 10; kill -9 {pids} 2>/dev/null; rm -rf '{data}'",
                parent = std::process::id(),
                data = dir.join("etcd").display()
            ),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the watchdog");
    let ca_data = base64::engine::general_purpose::STANDARD.encode(ca.pem());
    let kubeconfig = dir.join("kubeconfig");
    write_kubeconfig(&kubeconfig, &format!("https://127.0.0.1:{api_port}"), &ca_data, &token);
    wait_ready(&kubeconfig, &dir);
    let kubectl = assets.join("kubectl").exists().then(|| assets.to_path_buf());
    Cluster { kubeconfig, dir, kubectl, _processes: vec![etcd, apiserver, watchdog] }
}

/// Writes a kubeconfig for `server` that authenticates with `token`.
pub fn write_kubeconfig(path: &Path, server: &str, ca_data: &str, token: &str) {
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca_data}\nusers:\n- name: test\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context: {{cluster: test, user: test, namespace: default}}\ncurrent-context: test\n"
    );
    std::fs::write(path, text).expect("write kubeconfig");
}

fn wait_ready(kubeconfig: &Path, dir: &Path) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let deadline = Instant::now() + Duration::from_secs(90);
    runtime.block_on(async {
        loop {
            if let Ok(client) = client_for(kubeconfig).await
                && let Ok(text) =
                    client.request_text(http::Request::get("/readyz").body(Vec::new()).expect("request")).await
                && text == "ok"
            {
                return;
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(dir.join("kube-apiserver.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                panic!(
                    "the test API server did not become ready in 90 s:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
}

/// A client that authenticates as the kubeconfig at `path` says.
pub async fn client_for(path: &Path) -> kube::Result<Client> {
    let kubeconfig = Kubeconfig::read_from(path).map_err(kube::Error::InferKubeconfig)?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(kube::Error::InferKubeconfig)?;
    Client::try_from(config)
}

impl Cluster {
    /// An admin client.
    pub async fn client(&self) -> Client {
        client_for(&self.kubeconfig).await.expect("admin client")
    }

    /// A new namespace named `prefix-N`, unique in this run.
    pub async fn namespace(&self, prefix: &str) -> String {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name =
            format!("{prefix}-{}-{}", std::process::id(), NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let namespace: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).expect("ns");
        let api = Api::<Namespace>::all(self.client().await);
        if api.get_opt(&name).await.expect("namespaces").is_none() {
            api.create(&PostParams::default(), &namespace).await.expect("create namespace");
        }
        name
    }

    /// Applies every document of a YAML file with server-side apply, as admin.
    pub async fn apply_file(&self, path: &Path) {
        let text = std::fs::read_to_string(path).expect("read manifest");
        self.apply_yaml(&text).await;
    }

    /// Applies every document of `yaml` with server-side apply, as admin.
    pub async fn apply_yaml(&self, yaml: &str) {
        let client = self.client().await;
        for document in serde_yaml_ng::Deserializer::from_str(yaml) {
            let value: serde_json::Value = serde::Deserialize::deserialize(document).expect("yaml document");
            if value.is_null() {
                continue;
            }
            let object: DynamicObject = serde_json::from_value(value.clone()).expect("a Kubernetes object");
            let types = object.types.clone().expect("apiVersion and kind");
            let (group, version) = types.api_version.rsplit_once('/').unwrap_or(("", &types.api_version));
            let (resource, namespaced) = plural(&types.kind);
            let api_resource = ApiResource {
                group: group.into(),
                version: version.into(),
                api_version: types.api_version.clone(),
                kind: types.kind.clone(),
                plural: resource.into(),
            };
            let api: Api<DynamicObject> = match (namespaced, object.namespace()) {
                (true, Some(ns)) => Api::namespaced_with(client.clone(), &ns, &api_resource),
                (true, None) => Api::default_namespaced_with(client.clone(), &api_resource),
                (false, _) => Api::all_with(client.clone(), &api_resource),
            };
            api.patch(&object.name_any(), &PatchParams::apply("backstop-tests").force(), &Patch::Apply(&value))
                .await
                .unwrap_or_else(|e| panic!("apply {} {}: {e}", types.kind, object.name_any()));
        }
    }

    /// Installs the checked-in CRD and waits until the API server serves it.
    pub async fn install_crd(&self) {
        static CRD: OnceCell<()> = OnceCell::const_new();
        CRD.get_or_init(|| async {
            self.apply_file(&PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/crds/fallbackpolicy.yaml"))).await;
            let api = Api::<CustomResourceDefinition>::all(self.client().await);
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let crd = api.get("fallbackpolicies.backstop.dev").await.expect("the CRD");
                let established = crd
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True");
                if established {
                    break;
                }
                assert!(Instant::now() < deadline, "the CRD was never established");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
    }

    /// A kubeconfig that authenticates as ServiceAccount `namespace/name` with a token from
    /// the TokenRequest API (so RBAC applies to it), for `audience` when given.
    pub async fn service_account_kubeconfig(&self, namespace: &str, name: &str) -> PathBuf {
        let client = self.client().await;
        let accounts = Api::<ServiceAccount>::namespaced(client, namespace);
        if accounts.get_opt(name).await.expect("service accounts").is_none() {
            let account: ServiceAccount =
                serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).expect("sa");
            accounts.create(&PostParams::default(), &account).await.expect("create service account");
        }
        let request: TokenRequest =
            serde_json::from_value(serde_json::json!({"spec": {"audiences": [], "expirationSeconds": 3600}}))
                .expect("tr");
        let token = accounts
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .expect("token request")
            .status
            .expect("token")
            .token;
        let admin = Kubeconfig::read_from(&self.kubeconfig).expect("kubeconfig");
        let cluster = admin.clusters[0].cluster.clone().expect("cluster");
        let path = self.dir.join(format!("kubeconfig-{namespace}-{name}"));
        write_kubeconfig(
            &path,
            cluster.server.as_deref().unwrap_or_default(),
            cluster.certificate_authority_data.as_deref().unwrap_or_default(),
            &token,
        );
        path
    }

    /// A Pod `name` in `namespace` (it stays Pending: no kubelet), running as ServiceAccount
    /// `account`, labelled `labels`, and a token bound to it for `audience`, as the kubelet
    /// projects one; returns the pod's uid and the token.
    pub async fn pod_with_token(
        &self,
        namespace: &str,
        account: &str,
        name: &str,
        labels: &[(&str, &str)],
        audience: &str,
    ) -> (String, String) {
        let client = self.client().await;
        let accounts = Api::<ServiceAccount>::namespaced(client.clone(), namespace);
        if accounts.get_opt(account).await.expect("service accounts").is_none() {
            let sa: ServiceAccount =
                serde_json::from_value(serde_json::json!({"metadata": {"name": account}})).expect("sa");
            // Two tests may race to create it.
            let _ = accounts.create(&PostParams::default(), &sa).await;
        }
        let labels: serde_json::Map<String, serde_json::Value> =
            labels.iter().map(|(k, v)| (k.to_string(), serde_json::Value::from(*v))).collect();
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": labels},
            "spec": {"serviceAccountName": account, "containers": [{"name": "app", "image": "registry.invalid/app"}]},
        }))
        .expect("pod");
        let pod =
            Api::<Pod>::namespaced(client, namespace).create(&PostParams::default(), &pod).await.expect("create pod");
        let uid = pod.metadata.uid.expect("uid");
        let request: TokenRequest = serde_json::from_value(serde_json::json!({"spec": {
            "audiences": [audience],
            "expirationSeconds": 3600,
            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": name, "uid": uid},
        }}))
        .expect("token request");
        let token = accounts
            .create_token_request(account, &PostParams::default(), &request)
            .await
            .expect("token request")
            .status
            .expect("token")
            .token;
        (uid, token)
    }

    /// A token of ServiceAccount `account` for `audience`, bound to nothing.
    pub async fn unbound_token(&self, namespace: &str, account: &str, audience: &str) -> String {
        let accounts = Api::<ServiceAccount>::namespaced(self.client().await, namespace);
        let request: TokenRequest =
            serde_json::from_value(serde_json::json!({"spec": {"audiences": [audience], "expirationSeconds": 3600}}))
                .expect("token request");
        accounts
            .create_token_request(account, &PostParams::default(), &request)
            .await
            .expect("token request")
            .status
            .expect("token")
            .token
    }

    /// Runs `kubectl` as admin with `args`; its stdout, or its stderr as the error.
    pub fn kubectl(&self, args: &[&str]) -> Result<String, String> {
        let program = self.kubectl.as_ref().map_or_else(|| PathBuf::from("kubectl"), |dir| dir.join("kubectl"));
        let output = Command::new(program)
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .output()
            .map_err(|e| format!("cannot run kubectl: {e}"))?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).into_owned())
        }
    }
}

/// The resource name of a kind the tests apply, and whether it is namespaced.
fn plural(kind: &str) -> (&'static str, bool) {
    match kind {
        "Namespace" => ("namespaces", false),
        "ServiceAccount" => ("serviceaccounts", true),
        "Secret" => ("secrets", true),
        "ClusterRole" => ("clusterroles", false),
        "ClusterRoleBinding" => ("clusterrolebindings", false),
        "Role" => ("roles", true),
        "RoleBinding" => ("rolebindings", true),
        "CustomResourceDefinition" => ("customresourcedefinitions", false),
        "FallbackPolicy" => ("fallbackpolicies", true),
        "Pod" => ("pods", true),
        other => panic!("the test harness does not apply `{other}` yet"),
    }
}
