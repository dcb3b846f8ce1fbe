//! Sidecar overhead benchmark: `cargo bench --bench proxy`.
//!
//! Starts a fast in-process OpenAI-format upstream and the release `backstop` binary in front of
//! it, then measures the same load directly against the upstream and through the sidecar, in
//! one run, so the ratios hold however fast the machine is. Reports, for concurrency 1, 16 and
//! 64: requests/s and p50/p99 latency each way, the overhead in µs and as a ratio; streaming
//! time to first byte each way; and the sidecar's resident memory.
//!
//! `BENCH_SECONDS` sets each measurement's length (default 3); `BACKSTOP_BENCH_BIN` names
//! another sidecar binary to measure instead of this build's.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::time::Instant;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type UpBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

const COMPLETION: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1,"model":"bench-model","choices":[{"index":0,"message":{"role":"assistant","content":"The quick brown fox jumps over the lazy dog."},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":10,"total_tokens":22}}"#;
const CHUNKS: [&str; 4] = [
    "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"bench-model\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n",
    "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"bench-model\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"The quick brown fox\"},\"finish_reason\":null}]}\n\n",
    "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"bench-model\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
    "data: [DONE]\n\n",
];
const REQUEST: &str = r#"{"model":"MODEL","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Say something about foxes."}],"temperature":0.2}"#;

async fn upstream(request: Request<hyper::body::Incoming>) -> Result<Response<UpBody>, Infallible> {
    let body = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let stream = memchr_stream(&body);
    let mut response = if stream {
        let frames = futures_util::stream::iter(
            CHUNKS.iter().map(|c| Ok::<_, BoxError>(Frame::data(Bytes::from_static(c.as_bytes())))),
        );
        let mut r = Response::new(UpBody::new(StreamBody::new(frames)));
        r.headers_mut().insert("content-type", "text/event-stream".parse().expect("header"));
        r
    } else {
        let mut r =
            Response::new(UpBody::new(Full::new(Bytes::from_static(COMPLETION.as_bytes())).map_err(|n| match n {})));
        r.headers_mut().insert("content-type", "application/json".parse().expect("header"));
        r
    };
    response.headers_mut().insert("x-request-id", "bench".parse().expect("header"));
    Ok(response)
}

fn memchr_stream(body: &[u8]) -> bool {
    body.windows(13).any(|w| w == b"\"stream\":true")
}

async fn start_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind upstream");
    let addr = listener.local_addr().expect("addr");
    // Runs for the whole benchmark; the process exit ends it.
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            let _ = socket.set_nodelay(true);
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(socket), service_fn(upstream))
                    .await;
            });
        }
    });
    addr
}

struct Sidecar {
    child: tokio::process::Child,
    llm: SocketAddr,
    _dir: tempfile::TempDir,
}

/// A "dead" upstream that accepts connections and never answers, like a blackholed endpoint.
async fn start_dead_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind dead upstream");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    addr
}

/// An OTLP collector that takes every export at once.
async fn start_collector() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind collector");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(|request: Request<hyper::body::Incoming>| async move {
                    let _ = request.into_body().collect().await;
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(socket), service)
                    .await;
            });
        }
    });
    addr
}

async fn start_sidecar(upstream: SocketAddr, dead: SocketAddr, env: &[(&str, String)]) -> Sidecar {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "apiVersion: backstop.dev/v1alpha1\nkind: FallbackPolicy\nmetadata: {{name: bench}}\nspec:\n  providers:\n    - {{name: up, type: openai-compatible, baseUrl: \"http://{upstream}/v1\", apiKey: {{value: sk-bench}}}}\n    - {{name: dead, type: openai-compatible, baseUrl: \"http://{dead}/v1\"}}\n    - {{name: spare, type: mock}}\n  routes:\n    - model: chat\n      chain:\n        - {{provider: up, model: bench-model}}\n        - {{provider: spare, model: m}}\n    - model: dead-primary\n      chain:\n        - {{provider: dead, model: bench-model, timeout: 200ms}}\n        - {{provider: up, model: bench-model}}\n"
        ),
    )
    .expect("write policy");
    // `BACKSTOP_BENCH_BIN` measures another build of the sidecar (an older commit, say) with
    // this same harness.
    let binary = std::env::var_os("BACKSTOP_BENCH_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_backstop").into());
    let mut child = tokio::process::Command::new(binary)
        .args(["sidecar", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--log-format", "json", "--policy-file"])
        .arg(&policy)
        .env("BACKSTOP_LOG", "warn,backstop=info")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the sidecar");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let llm = loop {
        let line = lines.next_line().await.expect("read stderr").expect("sidecar exited early");
        let event: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if event["message"] == "backstop sidecar listening" {
            break event["llm"].as_str().and_then(|a| a.parse().ok()).expect("llm address");
        }
    };
    // Drain the rest of its log so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Sidecar { child, llm, _dir: dir }
}

fn client() -> Client<HttpConnector, Full<Bytes>> {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    Client::builder(TokioExecutor::new()).pool_max_idle_per_host(1024).build(http)
}

fn request(addr: SocketAddr, model: &str, stream: bool) -> Request<Full<Bytes>> {
    let mut body = REQUEST.replace("MODEL", model);
    if stream {
        body = body.replacen('{', "{\"stream\":true,", 1);
    }
    Request::post(format!("http://{addr}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("request")
}

struct Load {
    rps: f64,
    p50: Duration,
    p99: Duration,
    errors: usize,
}

async fn load(addr: SocketAddr, model: &'static str, concurrency: usize, seconds: f64) -> Load {
    let client = client();
    // Warm the connection pool.
    for _ in 0..concurrency.min(8) {
        let _ = client.request(request(addr, model, false)).await.map(|r| r.into_body());
    }
    let started = Instant::now();
    let end = started + Duration::from_secs_f64(seconds);
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let client = client.clone();
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(4096);
            let mut errors = 0;
            while Instant::now() < end {
                let sent = Instant::now();
                match client.request(request(addr, model, false)).await {
                    Ok(response) if response.status().is_success() => {
                        if response.into_body().collect().await.is_ok() {
                            latencies.push(sent.elapsed());
                        } else {
                            errors += 1;
                        }
                    }
                    _ => errors += 1,
                }
            }
            (latencies, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for worker in workers {
        let (latencies, e) = worker.await.expect("worker");
        all.extend(latencies);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    let pick = |q: f64| {
        all.get(((all.len() as f64 * q) as usize).min(all.len().saturating_sub(1))).copied().unwrap_or_default()
    };
    Load { rps: all.len() as f64 / elapsed, p50: pick(0.50), p99: pick(0.99), errors }
}

/// Median time to the first body byte of a streamed answer, over `n` sequential requests.
async fn ttfb(addr: SocketAddr, model: &str, n: usize) -> Duration {
    let client = client();
    let mut samples = Vec::with_capacity(n);
    for i in 0..n + 10 {
        let sent = Instant::now();
        let response = client.request(request(addr, model, true)).await.expect("stream answers");
        let mut body = response.into_body();
        let _ = body.frame().await;
        let first = sent.elapsed();
        while body.frame().await.is_some() {}
        if i >= 10 {
            samples.push(first);
        }
    }
    samples.sort();
    samples[samples.len() / 2]
}

/// The latency a request pays for a dead primary (never answers; 200 ms attempt timeout,
/// two attempts), before and after its breaker opens (default: 5 consecutive failures).
async fn dead_primary(upstream: SocketAddr, sidecar: SocketAddr) {
    let client = client();
    let mut before = Vec::new();
    let mut after = Vec::new();
    for _ in 0..203 {
        let sent = Instant::now();
        let response = client.request(request(sidecar, "dead-primary", false)).await.expect("answer");
        let opened = response.headers().get("x-backstop-fallback-reason").and_then(|v| v.to_str().ok())
            == Some("dead/bench-model=circuitOpen");
        assert!(response.status().is_success());
        let _ = response.into_body().collect().await;
        let took = sent.elapsed();
        if opened { after.push(took) } else { before.push(took) }
    }
    let direct = {
        let mut samples = Vec::new();
        for _ in 0..200 {
            let sent = Instant::now();
            let response = client.request(request(upstream, "bench-model", false)).await.expect("answer");
            let _ = response.into_body().collect().await;
            samples.push(sent.elapsed());
        }
        samples.sort();
        samples[samples.len() / 2]
    };
    before.sort();
    after.sort();
    let median = |v: &[Duration]| v.get(v.len() / 2).copied().unwrap_or_default();
    println!(
        "\ndead primary (never answers, 200 ms attempt timeout): {} request(s) before its breaker opened paid a median {:.0} ms; \
         the {} after it opened paid a median {:.0} µs (direct call {:.0} µs, ratio {:.2})",
        before.len(),
        median(&before).as_secs_f64() * 1e3,
        after.len(),
        us(median(&after)),
        us(direct),
        us(median(&after)) / us(direct)
    );
}

fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    let seconds: f64 = std::env::var("BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    runtime.block_on(async move {
        let upstream = start_upstream().await;
        let dead = start_dead_upstream().await;
        let sidecar = start_sidecar(upstream, dead, &[]).await;
        let pid = sidecar.child.id().expect("pid");
        let (idle_rss, _) = rss_kib(pid);
        println!("backstop sidecar overhead: {seconds} s per measurement, same machine, same run\n");
        println!("| concurrency | direct req/s | sidecar req/s | throughput ratio | direct p50 µs | sidecar p50 µs | p50 overhead µs | p50 ratio | direct p99 µs | sidecar p99 µs | p99 ratio | errors |");
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
        for concurrency in [1, 16, 64] {
            let direct = load(upstream, "bench-model", concurrency, seconds).await;
            let proxied = load(sidecar.llm, "chat", concurrency, seconds).await;
            println!(
                "| {concurrency} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} | {:.2} | {} |",
                direct.rps,
                proxied.rps,
                proxied.rps / direct.rps,
                us(direct.p50),
                us(proxied.p50),
                us(proxied.p50) - us(direct.p50),
                us(proxied.p50) / us(direct.p50),
                us(direct.p99),
                us(proxied.p99),
                us(proxied.p99) / us(direct.p99),
                direct.errors + proxied.errors,
            );
        }
        let direct_ttfb = ttfb(upstream, "bench-model", 300).await;
        let proxied_ttfb = ttfb(sidecar.llm, "chat", 300).await;
        println!(
            "\nstreaming time to first byte (median of 300): direct {:.0} µs, sidecar {:.0} µs, overhead {:.0} µs, ratio {:.2}",
            us(direct_ttfb),
            us(proxied_ttfb),
            us(proxied_ttfb) - us(direct_ttfb),
            us(proxied_ttfb) / us(direct_ttfb)
        );
        dead_primary(upstream, sidecar.llm).await;
        let (rss, peak) = rss_kib(pid);
        println!("sidecar memory: {:.1} MiB resident idle, {:.1} MiB after the run, {:.1} MiB peak", idle_rss as f64 / 1024.0, rss as f64 / 1024.0, peak as f64 / 1024.0);
        drop(sidecar);

        // Telemetry: metrics only (the run above) against traces, metrics and logs exported to a
        // collector that takes them, and to one that accepts connections and never answers.
        let collector = start_collector().await;
        let silent = start_dead_upstream().await;
        println!("\ntelemetry: the same load through sidecars exporting OTLP, against metrics only\n");
        println!("| telemetry | concurrency | req/s | p50 µs | p99 µs | req/s ratio to metrics only | p50 overhead µs | errors |");
        println!("|---|---|---|---|---|---|---|---|");
        let mut baseline = Vec::new();
        for (mode, endpoint) in [("metrics only", None), ("OTLP, collector up", Some(collector)), ("OTLP, collector silent", Some(silent))] {
            let env: Vec<(&str, String)> = endpoint
                .map(|e| vec![("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{e}")), ("OTEL_METRIC_EXPORT_INTERVAL", "1000".to_string())])
                .unwrap_or_default();
            let sidecar = start_sidecar(upstream, dead, &env).await;
            let pid = sidecar.child.id().expect("pid");
            for (i, concurrency) in [1usize, 64].into_iter().enumerate() {
                let measured = load(sidecar.llm, "chat", concurrency, seconds).await;
                if endpoint.is_none() {
                    baseline.push((measured.rps, measured.p50));
                }
                let (base_rps, base_p50) = baseline[i];
                println!(
                    "| {mode} | {concurrency} | {:.0} | {:.0} | {:.0} | {:.2} | {:.0} | {} |",
                    measured.rps,
                    us(measured.p50),
                    us(measured.p99),
                    measured.rps / base_rps,
                    us(measured.p50) - us(base_p50),
                    measured.errors
                );
            }
            let (rss, peak) = rss_kib(pid);
            println!("| {mode}: memory after the load | | {:.1} MiB resident | {:.1} MiB peak | | | | |", rss as f64 / 1024.0, peak as f64 / 1024.0);
        }
    });
}
