//! Operator benchmark: `cargo bench --bench operator` (needs `KUBEBUILDER_ASSETS`, which
//! `tests/tools/build envtest` prints, or `BACKSTOP_TEST_KUBECONFIG`).
//!
//! Runs the real `backstop operator` under its least-privilege ServiceAccount against a real
//! API server and measures, in one run:
//! - reconcile latency: one policy applied, then the time until the API server holds its
//!   `Ready=True`, for `BENCH_POLICIES` policies (default 100) one after another; p50 and p99;
//! - a burst: the same number applied at once, time until every one is Ready;
//! - API calls per reconcile, from the API server's own request counters (Secret reads, status
//!   writes, Event writes) against the operator's reconcile counter;
//! - the operator's resident memory idle and with `BENCH_MANY` policies (default 1,000) served.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/integration/cluster.rs"]
#[allow(dead_code)]
mod cluster;
#[path = "../tests/integration/operator_process.rs"]
#[allow(dead_code)]
mod operator_process;

use std::collections::BTreeMap;
use std::time::Duration;

use backstop::policy::FallbackPolicy;
use futures_util::StreamExt;
use kube::Api;
use kube::runtime::watcher::{self, Event, watcher};
use tokio::time::Instant;

use cluster::Cluster;
use operator_process::{Operator, operator_identity};

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn policy(namespace: &str, name: &str) -> String {
    format!(
        "apiVersion: backstop.dev/v1alpha1\nkind: FallbackPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  providers:\n    - {{name: primary, type: openai, apiKey: {{secretKeyRef: {{name: llm-keys, key: openai}}}}}}\n    - {{name: spare, type: mock}}\n  routes:\n    - model: chat\n      chain: [{{provider: primary, model: gpt-4o}}, {{provider: spare, model: m}}]\n"
    )
}

fn secret(namespace: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: llm-keys, namespace: {namespace}}}\nstringData: {{openai: sk-bench}}\n"
    )
}

fn is_ready(policy: &FallbackPolicy) -> bool {
    policy.status.as_ref().is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Watches `namespace` and reports each policy's first Ready, by name, as it happens.
fn ready_times(cluster: &Cluster, namespace: &str) -> tokio::sync::mpsc::UnboundedReceiver<(String, Instant)> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let kubeconfig = cluster.kubeconfig.clone();
    let namespace = namespace.to_string();
    tokio::spawn(async move {
        let client = cluster::client_for(&kubeconfig).await.expect("client");
        let api = Api::<FallbackPolicy>::namespaced(client, &namespace);
        let mut seen = std::collections::HashSet::new();
        let mut events = watcher(api, watcher::Config::default()).boxed();
        while let Some(event) = events.next().await {
            let policies = match event {
                Ok(Event::Apply(p) | Event::InitApply(p)) => vec![p],
                _ => continue,
            };
            for p in policies {
                let name = p.metadata.name.clone().unwrap_or_default();
                if is_ready(&p) && seen.insert(name.clone()) && tx.send((name, Instant::now())).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

/// The API server's request counters the operator alone moves: Secret GETs, status PATCHes,
/// Event POSTs.
async fn api_counters(cluster: &Cluster) -> BTreeMap<&'static str, f64> {
    let client = cluster.client().await;
    let text =
        client.request_text(http::Request::get("/metrics").body(Vec::new()).expect("request")).await.expect("metrics");
    let mut counts = BTreeMap::from([("secret reads", 0.0), ("status writes", 0.0), ("event writes", 0.0)]);
    for line in text.lines().filter(|l| l.starts_with("apiserver_request_total{")) {
        let value: f64 = line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
        let has = |label: &str| line.contains(label);
        let key = if has("resource=\"secrets\"") && has("verb=\"GET\"") {
            "secret reads"
        } else if has("resource=\"fallbackpolicies\"") && has("subresource=\"status\"") && has("verb=\"APPLY\"") {
            "status writes"
        } else if has("resource=\"events\"") && has("verb=\"POST\"") {
            "event writes"
        } else {
            continue;
        };
        *counts.entry(key).or_default() += value;
    }
    counts
}

fn reconciles(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("backstop_operator_reconciles_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    runtime.block_on(async {
        let Some(cluster) = cluster::cluster().await else {
            eprintln!("set KUBEBUILDER_ASSETS (tests/tools/build envtest) to run the operator benchmark");
            return;
        };
        cluster.install_crd().await;
        let policies = env_number("BENCH_POLICIES", 100);
        let many = env_number("BENCH_MANY", 1000);
        let (operator_ns, kubeconfig) = operator_identity(&cluster).await;
        let (one, burst, bulk) = (
            cluster.namespace("bench-one").await,
            cluster.namespace("bench-burst").await,
            cluster.namespace("bench-many").await,
        );
        for namespace in [&one, &burst, &bulk] {
            cluster.apply_yaml(&secret(namespace)).await;
        }
        let operator = Operator::start(&kubeconfig, "bench", &operator_ns, &[&one, &burst, &bulk]).await;
        while operator.get("/readyz").await.0 != 200 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_secs(4)).await; // the Lease
        let idle = rss_mib(operator.pid());

        // One at a time: applied -> Ready.
        let mut ready = ready_times(&cluster, &one);
        let before = (api_counters(&cluster).await, reconciles(&operator.get("/metrics").await.1));
        let mut latencies = Vec::new();
        for i in 0..policies {
            let name = format!("p{i}");
            let applied = Instant::now();
            cluster.apply_yaml(&policy(&one, &name)).await;
            loop {
                let (ready_name, at) = tokio::time::timeout(Duration::from_secs(30), ready.recv())
                    .await
                    .expect("Ready in 30 s")
                    .expect("watch");
                if ready_name == name {
                    latencies.push(at - applied);
                    break;
                }
            }
        }
        let after = (api_counters(&cluster).await, reconciles(&operator.get("/metrics").await.1));
        latencies.sort();

        // A burst: all at once.
        let mut ready = ready_times(&cluster, &burst);
        let yaml: String = (0..policies).map(|i| policy(&burst, &format!("p{i}")) + "---\n").collect();
        let started = Instant::now();
        cluster.apply_yaml(&yaml).await;
        let mut count = 0;
        while count < policies {
            tokio::time::timeout(Duration::from_secs(60), ready.recv()).await.expect("Ready in 60 s").expect("watch");
            count += 1;
        }
        let burst_time = started.elapsed();

        // Many: memory with every one served.
        let mut ready = ready_times(&cluster, &bulk);
        for chunk in (0..many).collect::<Vec<_>>().chunks(100) {
            let yaml: String = chunk.iter().map(|i| policy(&bulk, &format!("p{i}")) + "---\n").collect();
            cluster.apply_yaml(&yaml).await;
        }
        let mut count = 0;
        while count < many {
            tokio::time::timeout(Duration::from_secs(120), ready.recv()).await.expect("Ready in 120 s").expect("watch");
            count += 1;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let loaded = rss_mib(operator.pid());

        println!(
            "backstop operator, real kube-apiserver 1.36 + etcd on this machine, least-privilege ServiceAccount\n"
        );
        println!("| measurement | value |\n|---|---|");
        println!(
            "| applied -> Ready, one at a time (p50 / p99 of {policies}) | {:.0} ms / {:.0} ms |",
            percentile(&latencies, 0.5).as_secs_f64() * 1e3,
            percentile(&latencies, 0.99).as_secs_f64() * 1e3
        );
        println!("| {policies} applied at once -> all Ready | {:.2} s |", burst_time.as_secs_f64());
        let reconciled = (after.1 - before.1).max(1.0);
        for (what, count) in &after.0 {
            let delta = count - before.0.get(what).copied().unwrap_or(0.0);
            println!("| {what} per reconcile ({reconciled:.0} reconciles) | {:.2} |", delta / reconciled);
        }
        println!("| operator memory idle | {idle:.1} MiB |");
        println!("| operator memory serving {} policies | {loaded:.1} MiB |", many + 2 * policies);
    });
}
