//! The `backstop` binary: thin subcommands over the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use backstop::chain::CheckKeys;
use backstop::control::Source;
use backstop::control::file::{self, Unusable};
use backstop::control::stream::{CaSource, StreamSettings};
use backstop::operator::leader::{self, LeaseSettings};
use backstop::operator::served::ServedPolicies;
use backstop::operator::{ConfigServiceSettings, OperatorSettings, WebhookSettings};
use backstop::proxy::passthrough::{Destinations, Passthrough};
use backstop::proxy::{DEFAULT_MAX_REQUEST_BYTES, Sidecar, SidecarSettings};
use backstop::snapshot::PolicyStore;
use backstop::telemetry::{LogFormat, Metrics, Telemetry, init_logging};
use clap::{Parser, Subcommand};

/// mimalloc, chosen by measurement: the request path allocates and frees many small objects
/// (headers, JSON values, telemetry attributes), which glibc's allocator spent over a quarter of
/// the sidecar's instructions on (`cargo bench --bench proxy`, callgrind).
#[cfg(not(feature = "heap-profile"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// With the `heap-profile` feature, dhat's allocator records every allocation's site instead;
/// the profile is written when `main` returns (after a SIGTERM and the drain).
#[cfg(feature = "heap-profile")]
#[global_allocator]
static ALLOCATOR: dhat::Alloc = dhat::Alloc;

#[derive(Parser)]
#[command(name = "backstop", version, about = "LLM fallback layer for Kubernetes")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar: an OpenAI-compatible endpoint on loopback that falls back across providers.
    Sidecar(SidecarArgs),
    /// Check a policy file and report every problem with its field path (a `secretKeyRef` is
    /// checked for its shape; the operator reads the Secret).
    Check {
        /// The `FallbackPolicy` YAML file.
        policy_file: PathBuf,
    },
    /// Print the `FallbackPolicy` CustomResourceDefinition as YAML.
    Crd,
    /// Run the operator: compile `FallbackPolicy` resources, write their status, serve sidecars.
    Operator(OperatorArgs),
}

#[derive(clap::Args)]
struct OperatorArgs {
    /// Namespaces whose policies to serve, comma-separated; all namespaces when omitted.
    #[arg(long, env = "BACKSTOP_NAMESPACES", value_delimiter = ',')]
    namespaces: Vec<String>,
    /// Address of the admin listener (`/healthz`, `/readyz`, `/metrics`).
    #[arg(long, env = "BACKSTOP_ADMIN", default_value = "0.0.0.0:7403")]
    admin: SocketAddr,
    /// The leader-election Lease's name.
    #[arg(long, env = "BACKSTOP_LEASE_NAME", default_value = "backstop-operator")]
    lease_name: String,
    /// The Lease's namespace: the operator's own (`POD_NAMESPACE`, else the in-cluster service
    /// account's namespace, else `backstop-system`).
    #[arg(long, env = "BACKSTOP_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    /// This replica's identity in the Lease (`POD_NAME`, else the host name).
    #[arg(long, env = "BACKSTOP_IDENTITY")]
    identity: Option<String>,
    /// How long a leader that stops renewing keeps the Lease; a standby takes over after it.
    #[arg(long, env = "BACKSTOP_LEASE_DURATION", default_value = "15s", value_parser = duration)]
    lease_duration: Duration,
    /// How often the leader renews the Lease.
    #[arg(long, env = "BACKSTOP_LEASE_RENEW", default_value = "5s", value_parser = duration)]
    lease_renew: Duration,
    /// How long the leader goes on leading without a successful renewal before it steps down;
    /// shorter than the lease duration, so that two replicas never both lead.
    #[arg(long, env = "BACKSTOP_LEASE_RENEW_DEADLINE", default_value = "10s", value_parser = duration)]
    lease_renew_deadline: Duration,
    /// How often a standby tries to take the Lease.
    #[arg(long, env = "BACKSTOP_LEASE_RETRY", default_value = "2s", value_parser = duration)]
    lease_retry: Duration,
    /// Log format.
    #[arg(long, env = "BACKSTOP_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Where sidecars stream their configuration from (HTTPS, HTTP/2); `none` turns the config
    /// service off.
    #[arg(long, env = "BACKSTOP_CONFIG_LISTEN", default_value = "0.0.0.0:7402", value_parser = listen_or_none)]
    config_listen: Listen,
    /// The config service's PEM certificate chain; reloaded when it changes.
    #[arg(long, env = "BACKSTOP_TLS_CERT_FILE", default_value = "/etc/backstop/tls/tls.crt")]
    tls_cert_file: PathBuf,
    /// The config service's PEM private key; reloaded when it changes.
    #[arg(long, env = "BACKSTOP_TLS_KEY_FILE", default_value = "/etc/backstop/tls/tls.key")]
    tls_key_file: PathBuf,
    /// The most sidecar connections the config service holds at once.
    #[arg(long, env = "BACKSTOP_CONFIG_MAX_CONNECTIONS", default_value_t = 20_000)]
    config_max_connections: usize,
    /// This replica's projected ServiceAccount token (audience `backstop`): presented to the
    /// leader when forwarding evidence, and how the leader recognises the other replicas.
    #[arg(long, env = "BACKSTOP_PEER_TOKEN_FILE", default_value = backstop::control::stream::DEFAULT_TOKEN_FILE)]
    peer_token_file: PathBuf,
    /// `HOST:PORT` where the other replicas reach this one's config service while it leads;
    /// default: `POD_IP` and the config port.
    #[arg(long, env = "BACKSTOP_ADVERTISE_ADDRESS")]
    advertise_address: Option<String>,
    /// Where the API server calls the sidecar-injection webhook (TLS, the config service's
    /// certificate); `none` turns it off.
    #[arg(long, env = "BACKSTOP_WEBHOOK_LISTEN", default_value = "0.0.0.0:9443", value_parser = listen_or_none)]
    webhook_listen: Listen,
    /// Read only Secrets labelled `backstop.dev/credentials=true`: a policy's author can then not
    /// send just any Secret of the namespace to a provider URL of their choice.
    #[arg(long, env = "BACKSTOP_REQUIRE_CREDENTIALS_LABEL")]
    require_credentials_label: bool,
    /// The injection settings (image, config service URL, CA file, mode, resources, env), read
    /// for every pod.
    #[arg(long, env = "BACKSTOP_INJECTION_CONFIG", default_value = "/etc/backstop/injection/config.yaml")]
    injection_config: PathBuf,
}

/// A listen address, or `none`.
#[derive(Clone, Copy, Debug)]
struct Listen(Option<SocketAddr>);

fn listen_or_none(text: &str) -> Result<Listen, String> {
    if text.eq_ignore_ascii_case("none") {
        return Ok(Listen(None));
    }
    text.parse().map(|address| Listen(Some(address))).map_err(|e| format!("`{text}` is not HOST:PORT or `none`: {e}"))
}

fn duration(text: &str) -> Result<Duration, String> {
    backstop::chain::parse_duration(text).map_err(|e| e.to_string())
}

#[derive(clap::Args)]
struct SidecarArgs {
    /// The `FallbackPolicy` YAML file to serve, reloaded when it changes. With
    /// `--control-plane`, served only until the operator is reached, when nothing is persisted.
    #[arg(long, env = "BACKSTOP_POLICY_FILE", required_unless_present = "control_plane")]
    policy_file: Option<PathBuf>,
    /// The operator's config service, `https://HOST:PORT`: the configuration, fleet health and
    /// overrides stream from it.
    #[arg(long, env = "BACKSTOP_CONTROL_PLANE")]
    control_plane: Option<http::Uri>,
    /// A PEM bundle to trust for the control plane (the Mozilla roots when omitted).
    #[arg(long, env = "BACKSTOP_CONTROL_PLANE_CA")]
    control_plane_ca: Option<PathBuf>,
    /// The same as PEM text, as the injection webhook passes it.
    #[arg(long, env = "BACKSTOP_CONTROL_PLANE_CA_DATA", conflicts_with = "control_plane_ca", hide_env_values = true)]
    control_plane_ca_data: Option<String>,
    /// The pod's projected ServiceAccount token (audience `backstop`), read at every connection.
    #[arg(long, env = "BACKSTOP_TOKEN_FILE", default_value = backstop::control::stream::DEFAULT_TOKEN_FILE)]
    token_file: PathBuf,
    /// Where the last configuration applied is kept (mode 0600, keys included; mount an
    /// in-memory `emptyDir`), to serve it when the operator is unreachable at start.
    #[arg(long, env = "BACKSTOP_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Address of the LLM listener apps send requests to.
    #[arg(long, env = "BACKSTOP_LISTEN", default_value = "127.0.0.1:7400")]
    listen: SocketAddr,
    /// Address of the admin listener (`/healthz`, `/readyz`, `/health`, `/config`). Loopback by
    /// default; the injected sidecar listens pod-wide for its probes.
    #[arg(long, env = "BACKSTOP_ADMIN", default_value = "127.0.0.1:7401")]
    admin: SocketAddr,
    /// How long requests in flight may finish after SIGTERM or SIGINT; a second signal exits at
    /// once.
    #[arg(long, env = "BACKSTOP_DRAIN_TIMEOUT", default_value = "30s", value_parser = duration)]
    drain_timeout: Duration,
    /// Largest request body accepted, in bytes; larger ones get a 413.
    #[arg(long, env = "BACKSTOP_MAX_REQUEST_BYTES", default_value_t = DEFAULT_MAX_REQUEST_BYTES)]
    max_request_bytes: usize,
    /// Log format.
    #[arg(long, env = "BACKSTOP_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// A PEM bundle of extra CA certificates to trust for upstream HTTPS (a private gateway's
    /// CA), besides the Mozilla roots.
    #[arg(long, env = "BACKSTOP_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Threads serving requests. One, the default, costs the least CPU per request (no
    /// hand-offs between threads) and passes through over 20,000 requests a second, far more
    /// than a pod sends to LLMs; raise it only for a sidecar that is CPU-bound with more than
    /// one core to spare.
    #[arg(long, env = "BACKSTOP_WORKER_THREADS", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    worker_threads: u16,
    /// Where OpenAI API calls go while no policy applies (no policy selects the pod, or none has
    /// arrived): the base URL the app had before injection, which the webhook passes here.
    #[arg(long, env = "BACKSTOP_PASSTHROUGH_OPENAI", default_value = backstop::proxy::passthrough::OPENAI_DEFAULT)]
    passthrough_openai: String,
    /// Where Anthropic API calls go while no policy applies.
    #[arg(long, env = "BACKSTOP_PASSTHROUGH_ANTHROPIC", default_value = backstop::proxy::passthrough::ANTHROPIC_DEFAULT)]
    passthrough_anthropic: String,
    /// With `--control-plane`: how long a sidecar with nothing to serve waits for the operator
    /// before it reports ready and passes calls through (the app's pod starts either way).
    #[arg(long, env = "BACKSTOP_STARTUP_TIMEOUT", default_value = "10s", value_parser = duration)]
    startup_timeout: Duration,
}

fn main() -> std::process::ExitCode {
    #[cfg(feature = "heap-profile")]
    let _profiler = dhat::Profiler::new_heap();
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Crd => {
            print!("{}", backstop::policy::crd::crd_yaml()?);
            Ok(())
        }
        Command::Check { policy_file } => {
            let (compiled, _) = file::load(&policy_file, &CheckKeys).map_err(|e| Unusable::new(&policy_file, &e))?;
            println!(
                "{}: ok, policy {} routes {}",
                policy_file.display(),
                compiled.source,
                compiled.aliases().collect::<Vec<_>>().join(", ")
            );
            Ok(())
        }
        Command::Sidecar(args) => {
            init_logging(args.log_format);
            let runtime = match args.worker_threads {
                1 => tokio::runtime::Builder::new_current_thread().enable_all().build()?,
                n => tokio::runtime::Builder::new_multi_thread().worker_threads(n.into()).enable_all().build()?,
            };
            runtime.block_on(sidecar(args))
        }
        Command::Operator(args) => {
            init_logging(args.log_format);
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(operator(args))
        }
    }
}

async fn sidecar(args: SidecarArgs) -> anyhow::Result<()> {
    let store = Arc::new(PolicyStore::new());
    let extra_roots = match &args.ca_file {
        Some(path) => backstop::net::client::load_ca_file(path)?,
        None => Vec::new(),
    };
    let http = backstop::net::client::http_client(&extra_roots).context("cannot set up upstream TLS")?;
    let destinations = Destinations::new(&args.passthrough_openai, &args.passthrough_anthropic, args.listen)?;
    let settings = SidecarSettings {
        listen: args.listen,
        admin: args.admin,
        max_request_bytes: args.max_request_bytes,
        drain: args.drain_timeout,
        passthrough: Some(Passthrough::new(destinations, &extra_roots)?),
        verify_locally: args.control_plane.is_none(),
    };
    let source = match &args.control_plane {
        Some(url) => Source::Operator {
            stream: StreamSettings {
                url: url.clone(),
                ca: match (&args.control_plane_ca, &args.control_plane_ca_data) {
                    (Some(path), _) => Some(CaSource::File(path.clone())),
                    (None, Some(pem)) => Some(CaSource::Pem(pem.clone())),
                    (None, None) => None,
                },
                token_file: args.token_file.clone(),
                state_dir: args.state_dir.clone(),
                startup_timeout: args.startup_timeout,
            },
            until_reached: args.policy_file.clone(),
        },
        None => Source::File(args.policy_file.clone().context("--policy-file or --control-plane is required")?),
    };
    let policies = source.start(&store)?;
    let telemetry = Arc::new(Telemetry::from_env(Metrics::new("backstop-sidecar")?));
    let sidecar = Sidecar::bind(&settings, store, http, telemetry.clone()).await?;
    tracing::info!(llm = %sidecar.llm_addr()?, admin = %sidecar.admin_addr()?, "backstop sidecar listening");
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let policies = tokio::spawn(policies.run(shutdown_rx.clone()));
    let server = tokio::spawn(sidecar.run(shutdown_rx));

    shutdown_signal().await;
    tracing::info!(
        drain_seconds = args.drain_timeout.as_secs(),
        "shutting down: no new connections; finishing requests in flight"
    );
    let _ = shutdown_tx.send(true);
    let _ = policies.await;
    tokio::select! {
        finished = server => finished.context("server task failed")?,
        () = shutdown_signal() => {
            tracing::warn!("a second signal: exiting now, without waiting for requests in flight");
            std::process::exit(130);
        }
    }
    flush_telemetry(&telemetry.metrics).await;
    tracing::info!("stopped");
    Ok(())
}

/// How long a process on its way out waits for its last telemetry to be exported.
const FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Exports the telemetry a process still holds (the spans and logs of the requests it drained,
/// the metrics since the last push) before it exits.
async fn flush_telemetry(metrics: &Metrics) {
    if !metrics.flush(FLUSH_TIMEOUT).await {
        tracing::warn!(
            timeout_seconds = FLUSH_TIMEOUT.as_secs(),
            "the last telemetry was not all exported before exit: the collector did not answer in time"
        );
    }
}

async fn operator(args: OperatorArgs) -> anyhow::Result<()> {
    let (identity, holders_are_pods) = leader::identity(args.identity);
    let settings = OperatorSettings {
        webhook: args
            .webhook_listen
            .0
            .map(|listen| WebhookSettings { listen, injection_config: args.injection_config }),
        config_service: args.config_listen.0.map(|listen| ConfigServiceSettings {
            listen,
            cert_file: args.tls_cert_file,
            key_file: args.tls_key_file,
            max_connections: args.config_max_connections,
            peer_token_file: args.peer_token_file,
            advertise: args.advertise_address,
        }),
        namespaces: args.namespaces.into_iter().filter(|ns| !ns.is_empty()).collect(),
        admin: args.admin,
        require_credentials_label: args.require_credentials_label,
        lease_namespace: leader::namespace(args.lease_namespace),
        lease: LeaseSettings {
            endpoint: None,
            name: args.lease_name,
            identity,
            duration: args.lease_duration,
            renew: args.lease_renew,
            renew_deadline: args.lease_renew_deadline,
            retry: args.lease_retry,
            holders_are_pods,
        },
    };
    // Unsafe Lease timings stop the operator before it reaches the API server.
    settings.lease.check()?;
    let client = kube::Client::try_default()
        .await
        .context("cannot reach the Kubernetes API (KUBECONFIG, then the in-cluster service account)")?;
    let metrics = Metrics::new("backstop-operator")?;
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let served = Arc::new(ServedPolicies::for_namespaces(&settings.namespaces));
    let operator = tokio::spawn(backstop::operator::run(settings, client, metrics.clone(), served, shutdown_rx));
    shutdown_signal().await;
    tracing::info!("shutting down: releasing the leader lease");
    let _ = shutdown_tx.send(true);
    operator.await.context("operator task failed")??;
    flush_telemetry(&metrics).await;
    Ok(())
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(_) => {
                let _ = interrupt.await;
                return;
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
