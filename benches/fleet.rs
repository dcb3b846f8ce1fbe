//! Fleet benchmark: `cargo bench --bench fleet` (needs `KUBEBUILDER_ASSETS`, which
//! `tests/tools/build envtest` prints, or `BACKSTOP_TEST_KUBECONFIG`).
//!
//! Runs the real `backstop operator` under its least-privilege ServiceAccount against a real
//! API server, with `BENCH_SIDECARS` (default 1,000) light simulated sidecars: each is a Pod in
//! that API server with a pod-bound token it issued, and one HTTP/2 stream to the operator
//! speaking the real protocol (it acknowledges each configuration at once and notes each
//! fleet message). Measures, in one run:
//! - a policy change: from just before the apply to each sidecar receiving (and acknowledging)
//!   the new version, p50, p99 and the last; and until `status.sidecars.current` counts them
//!   all;
//! - a fleet ejection: from one sidecar's report of failures to each sidecar holding the
//!   decision that takes the target out, p50, p99 and the last;
//! - the operator's CPU time and memory (resident now and peak) through each phase.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/integration/cluster.rs"]
#[allow(dead_code)]
mod cluster;
#[path = "../tests/integration/operator_process.rs"]
#[allow(dead_code)]
mod operator_process;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use backstop::configstream::{
    FleetTarget, Lines, MAX_CONFIG_BYTES, PROTOCOL_HEADER, Protocol, Report, STREAM_PATH, ServerMessage, TargetReport,
    line, v2,
};
use backstop::policy::FallbackPolicy;
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use kube::Api;
use tokio::sync::mpsc;
use tokio::time::Instant;

use operator_process::{Operator, operator_identity, pki};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn policy(namespace: &str, reply: &str) -> String {
    format!(
        "apiVersion: backstop.dev/v1alpha1\nkind: FallbackPolicy\nmetadata: {{name: chat, namespace: {namespace}}}\nspec:\n  providers:\n    - {{name: primary, type: mock, mock: {{reply: '{reply}'}}}}\n    - {{name: backup, type: mock}}\n  routes:\n    - model: chat\n      chain: [{{provider: primary, model: m}}, {{provider: backup, model: m}}]\n"
    )
}

/// What a simulated sidecar saw.
enum Seen {
    /// A configuration: its version, its first policy's version and first target's identity.
    Config(String, Option<(String, String)>, Instant),
    /// A fleet message: the targets it says are open.
    Fleet(usize, Vec<String>, Instant),
}

/// One light sidecar: a stream, acknowledgements, and reports on command.
async fn simulate(
    index: usize,
    operator: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    token: String,
    seen: mpsc::UnboundedSender<Seen>,
    mut commands: mpsc::UnboundedReceiver<Report>,
) {
    let tcp = tokio::net::TcpStream::connect(operator).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let stream = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.expect("TLS");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.expect("HTTP/2");
    tokio::spawn(connection);
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|bytes| (Ok::<_, BoxError>(Frame::data(bytes)), rx))
    });
    let request = http::Request::post(format!("https://{operator}{STREAM_PATH}"))
        .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
        .header(PROTOCOL_HEADER, Protocol::NEWEST.as_str())
        .body(Body::new(StreamBody::new(frames)))
        .expect("request");
    let response = sender.send_request(request).await.expect("stream");
    assert_eq!(response.status(), 200, "sidecar {index} refused");
    let mut body = response.into_body();
    let mut lines = Lines::new(MAX_CONFIG_BYTES);
    loop {
        tokio::select! {
            Some(report) = commands.recv() => {
                let _ = tx.send(line(&report)).await;
            }
            frame = body.frame() => {
                let Some(Ok(frame)) = frame else { return };
                let Ok(data) = frame.into_data() else { continue };
                for text in lines.push(&data).expect("line") {
                    let now = Instant::now();
                    match serde_json::from_slice::<ServerMessage<v2::Config>>(&text).expect("message") {
                        ServerMessage::Config(config) => {
                            let report = Report { applied: Some(config.version.clone()), ..Report::default() };
                            let _ = tx.send(line(&report)).await;
                            // What a real sidecar does with it: compile the policy it was sent.
                            let first = config.policies.first().and_then(|p| {
                                let compiled = p.compile(&config.namespace).expect("compiles");
                                Some((compiled.digest(), compiled.targets().first()?.identity.clone()))
                            });
                            let _ = seen.send(Seen::Config(config.version, first, now));
                        }
                        ServerMessage::Fleet(fleet) => {
                            let open = fleet
                                .targets
                                .iter()
                                .filter(|(_, t)| matches!(t, FleetTarget::Open { .. }))
                                .map(|(id, _)| id.clone())
                                .collect();
                            let _ = seen.send(Seen::Fleet(index, open, now));
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn summary(mut samples: Vec<Duration>) -> String {
    samples.sort();
    format!(
        "p50 {:>7.1} ms   p99 {:>7.1} ms   last {:>7.1} ms",
        percentile(&samples, 0.5).as_secs_f64() * 1000.0,
        percentile(&samples, 0.99).as_secs_f64() * 1000.0,
        samples.last().copied().unwrap_or_default().as_secs_f64() * 1000.0
    )
}

/// The operator's CPU seconds so far, resident memory now and at its peak (MiB).
fn usage(pid: u32) -> (f64, f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the command; 100 Hz.
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (cpu, kib("VmRSS:"), kib("VmHWM:"))
}

async fn sidecars_current(api: &Api<FallbackPolicy>, count: u32, version: &str) -> bool {
    let policy = api.get("chat").await.expect("policy");
    let status = policy.status.unwrap_or_default();
    status.compiled_version.as_deref() == Some(version) && status.sidecars.is_some_and(|s| s.current == count)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    runtime.block_on(async {
        let Some(cluster) = cluster::cluster().await else {
            eprintln!("set KUBEBUILDER_ASSETS (tests/tools/build envtest) to run the fleet benchmark");
            return;
        };
        cluster.install_crd().await;
        let count = env_number("BENCH_SIDECARS", 1000);
        let (operator_ns, kubeconfig) = operator_identity(&cluster).await;
        let namespace = cluster.namespace("bench-fleet").await;
        cluster.apply_yaml(&policy(&namespace, "one")).await;
        let operator = Operator::start(&kubeconfig, "bench", &operator_ns, &[&namespace]).await;
        let pid = operator.pid();

        eprintln!("creating {count} pods and their pod-bound tokens...");
        let started = Instant::now();
        let cluster_ref = &cluster;
        let namespace_ref = &namespace;
        let tokens: Vec<String> = futures_util::stream::iter(0..count)
            .map(|i| async move {
                cluster_ref
                    .pod_with_token(namespace_ref, "app", &format!("sim-{i}"), &[("app", "web")], "backstop")
                    .await
                    .1
            })
            .buffered(32)
            .collect()
            .await;
        eprintln!("  done in {:.1}s", started.elapsed().as_secs_f64());

        let mut roots = rustls::RootCertStore::empty();
        for cert in backstop::net::client::load_ca_file(&pki().ca()).expect("CA") {
            roots.add(cert).expect("root");
        }
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("TLS")
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let tls = Arc::new(tls);

        let (idle_cpu, idle_rss, _) = usage(pid);
        let (seen_tx, mut seen) = mpsc::unbounded_channel();
        let mut commands = Vec::new();
        let connecting = Instant::now();
        for (i, token) in tokens.into_iter().enumerate() {
            let (command_tx, command_rx) = mpsc::unbounded_channel();
            commands.push(command_tx);
            tokio::spawn(simulate(i, operator.config, tls.clone(), token, seen_tx.clone(), command_rx));
        }
        eprintln!("{count} simulated sidecars connecting...");
        // Every sidecar's first configuration.
        let mut first_version = String::new();
        let mut identity: Option<String> = None;
        let mut configured = 0;
        while configured < count {
            let next = tokio::time::timeout(Duration::from_secs(60), seen.recv()).await;
            let Ok(next) = next else {
                let log = operator.log();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                panic!("{configured} of {count} sidecars configured after 60 s; the operator's log ends:\n{}", tail.join("\n"));
            };
            match next.expect("open") {
                Seen::Config(version, first, _) => {
                    configured += 1;
                    first_version = version;
                    identity = identity.or(first.map(|(_, identity)| identity));
                }
                Seen::Fleet(..) => {}
            }
        }
        let connected_in = connecting.elapsed();
        let (connect_cpu, connected_rss, _) = usage(pid);

        // A policy change.
        let api = Api::<FallbackPolicy>::namespaced(cluster.client().await, &namespace);
        let changed = Instant::now();
        cluster.apply_yaml(&policy(&namespace, "two")).await;
        let mut acks = Vec::with_capacity(count);
        let mut compiled_version = String::new();
        while acks.len() < count {
            match tokio::time::timeout(Duration::from_secs(60), seen.recv()).await.expect("acknowledged").expect("open") {
                Seen::Config(version, first, at) if version != first_version => {
                    // The mock's reply is part of its identity: the changed policy's target.
                    if let Some((digest, target)) = first {
                        compiled_version = digest;
                        identity = Some(target);
                    }
                    acks.push(at - changed);
                }
                _ => {}
            }
        }
        while !sidecars_current(&api, count as u32, &compiled_version).await {
            assert!(changed.elapsed() < Duration::from_secs(60), "status never counted every sidecar");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let in_status = changed.elapsed();
        let (change_cpu, _, _) = usage(pid);

        // A fleet ejection: sidecar 0 reports failures of the first target.
        let identity = identity.expect("a target identity");
        let report = Report {
            targets: BTreeMap::from([(
                identity.clone(),
                TargetReport { failures: 10, last_failure: Some("serverError: 500".into()), ..TargetReport::default() },
            )]),
            ..Report::default()
        };
        let reported = Instant::now();
        commands[0].send(report).expect("command");
        let mut ejected = Vec::with_capacity(count);
        let mut done = vec![false; count];
        while ejected.len() < count {
            match tokio::time::timeout(Duration::from_secs(60), seen.recv()).await.expect("ejection reaches all").expect("open") {
                Seen::Fleet(i, open, at) if open.contains(&identity) && !done[i] => {
                    done[i] = true;
                    ejected.push(at - reported);
                }
                _ => {}
            }
        }
        let (eject_cpu, rss, peak) = usage(pid);

        println!("fleet benchmark: {count} simulated sidecars, one operator (2 cores shared with the API server and the sidecars)");
        println!("  connect (TLS, token review, pod read, first config): all in {:.2}s", connected_in.as_secs_f64());
        println!("  policy change -> each sidecar has it:   {}", summary(acks));
        println!("  policy change -> status counts all {count}: {:.0} ms", in_status.as_secs_f64() * 1000.0);
        println!("  failure report -> each sidecar ejects:  {}", summary(ejected));
        println!(
            "  operator CPU: {:.2}s connecting, {:.2}s for the change, {:.2}s for the ejection",
            connect_cpu - idle_cpu,
            change_cpu - connect_cpu,
            eject_cpu - change_cpu
        );
        println!("  operator memory: {idle_rss:.1} MiB idle, {connected_rss:.1} MiB with {count} streams, {rss:.1} MiB now, {peak:.1} MiB peak");
        drop(operator);
    });
}
