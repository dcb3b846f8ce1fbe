//! Sidecar overhead benchmark: `cargo bench --bench proxy`.
//!
//! Starts a fast in-process OpenAI-format upstream and the release `backstop` binary in front of
//! it (exporting traces, metrics and logs over OTLP to an in-process collector, as users run
//! it), then measures each scenario directly against the upstream and through the sidecar in one
//! run, so the ratios hold however fast the machine is:
//!
//! - passthrough at concurrency 1, 16 and 64: requests/s, p50 and p99, each way;
//! - fixed rates of 1,000 and 5,000 requests/s (an open loop: latency from when each request was
//!   due): p50, p99 and p99.9, each way;
//! - streaming: time to first byte, and how late each later chunk arrives compared with the
//!   direct call (chunks are forwarded as they arrive, or this grows by the chunk spacing);
//! - a fall-through: the first target answers 503 at once, the second answers; the cost beyond
//!   the two upstream calls;
//! - a primary whose breaker is open (it never answers): the cost of passing it over;
//! - shadow comparison at 100%: app latency on a route whose shadow target never answers (its
//!   pool full, the rest shed) and on one whose shadow answers, against the same route without
//!   a shadow;
//! - a stream cut after two content chunks and finished by the next target (`midStream:
//!   continue`): the seam's cost beyond the upstream calls; and a stream armed to continue that
//!   never breaks, against one that is not armed;
//! - memory idle, after the load, and holding 1,000 open streams; start to ready;
//! - telemetry: metrics only, against OTLP to a collector that takes everything and to one that
//!   never answers.
//!
//! Settings, all optional:
//!
//! - `BENCH_SECONDS`: each load measurement's length (default 3);
//! - `BENCH_JSON`: where the results go as JSON (default `target/bench/proxy.json`);
//! - `BENCH_CHECK`: a JSON file of floors and ceilings (`benches/proxy-limits.json`); the run
//!   fails if a measured ratio crosses one (CI's regression step);
//! - `BENCH_QUICK=1`: only the passthrough, fixed-rate, streaming, fall-through, shadow and
//!   resumed-stream scenarios;
//! - `BACKSTOP_BENCH_BIN`: another sidecar binary to measure with this harness;
//! - head to head: `BENCH_COMPARE_URL=http://127.0.0.1:4000/v1` measures another proxy's
//!   passthrough beside the sidecar's. Pin the upstream with `BENCH_UPSTREAM=127.0.0.1:18080`
//!   and point that proxy's route for `BENCH_COMPARE_MODEL` (default `bench-model`) at
//!   `http://127.0.0.1:18080/v1` (OpenAI format, any API key).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type UpBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

const COMPLETION: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1,"model":"bench-model","choices":[{"index":0,"message":{"role":"assistant","content":"The quick brown fox jumps over the lazy dog."},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":10,"total_tokens":22}}"#;
const ROLE_CHUNK: &str = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"bench-model\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n";
const CONTENT_CHUNK: &str = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"bench-model\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"The quick brown fox\"},\"finish_reason\":null}]}\n\n";
const STOP_CHUNK: &str = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"bench-model\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n";
const USAGE_CHUNK: &str = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"bench-model\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":10,\"total_tokens\":22}}\n\n";
const DONE: &str = "data: [DONE]\n\n";
const OVERLOADED: &str = r#"{"error":{"message":"overloaded","type":"server_error","code":null}}"#;
const REQUEST: &str = r#"{"model":"MODEL","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Say something about foxes."}],"temperature":0.2}"#;
/// Chunks of the paced stream, and the time between them.
const PACED_CHUNKS: usize = 6;
const PACE: Duration = Duration::from_millis(5);

fn frame(s: &'static str) -> Result<Frame<Bytes>, BoxError> {
    Ok(Frame::data(Bytes::from_static(s.as_bytes())))
}

/// What the upstream's streams do, picked by the model the request names.
#[derive(Clone)]
struct Upstream {
    /// Released when the held streams may end.
    release: watch::Receiver<bool>,
}

async fn upstream(state: Upstream, request: Request<hyper::body::Incoming>) -> Result<Response<UpBody>, Infallible> {
    if request.uri().path().starts_with("/down/") {
        let _ = request.into_body().collect().await;
        let mut r =
            Response::new(UpBody::new(Full::new(Bytes::from_static(OVERLOADED.as_bytes())).map_err(|n| match n {})));
        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        r.headers_mut().insert("content-type", "application/json".parse().expect("header"));
        return Ok(r);
    }
    let body = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let has = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
    let mut response = if has(b"\"stream\":true") {
        let body = if has(b"cut-model") {
            // Two content chunks, then the connection breaks: a stream cut mid-answer. The
            // break waits a millisecond, or hyper would abort before flushing what came first.
            let head = futures_util::stream::iter([ROLE_CHUNK, CONTENT_CHUNK, CONTENT_CHUNK].map(frame));
            let cut = futures_util::stream::once(async {
                tokio::time::sleep(Duration::from_millis(1)).await;
                Err::<Frame<Bytes>, BoxError>("connection reset".into())
            });
            UpBody::new(StreamBody::new(futures_util::StreamExt::chain(head, cut)))
        } else if has(b"paced-model") {
            // Chunks `PACE` apart: the relay must forward each as it arrives.
            let stream = futures_util::stream::unfold(0usize, |i| async move {
                if i >= PACED_CHUNKS {
                    return None;
                }
                if i > 0 {
                    tokio::time::sleep(PACE).await;
                }
                let chunk = match i {
                    0 => ROLE_CHUNK,
                    i if i + 1 == PACED_CHUNKS => STOP_CHUNK,
                    _ => CONTENT_CHUNK,
                };
                Some((frame(chunk), i + 1))
            });
            let tail = futures_util::stream::iter([frame(USAGE_CHUNK), frame(DONE)]);
            UpBody::new(StreamBody::new(futures_util::StreamExt::chain(stream, tail)))
        } else if has(b"hold-model") {
            // One content chunk, then nothing until the benchmark releases it: an open stream.
            let mut release = state.release.clone();
            let head = futures_util::stream::iter([frame(ROLE_CHUNK), frame(CONTENT_CHUNK)]);
            let tail = futures_util::stream::once(async move {
                let _ = release.wait_for(|r| *r).await;
                frame(STOP_CHUNK)
            });
            let done = futures_util::stream::iter([frame(USAGE_CHUNK), frame(DONE)]);
            UpBody::new(StreamBody::new(futures_util::StreamExt::chain(
                futures_util::StreamExt::chain(head, tail),
                done,
            )))
        } else {
            let frames = [ROLE_CHUNK, CONTENT_CHUNK, STOP_CHUNK, USAGE_CHUNK, DONE].map(frame);
            UpBody::new(StreamBody::new(futures_util::stream::iter(frames)))
        };
        let mut r = Response::new(body);
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

async fn start_upstream(bind: SocketAddr, release: watch::Receiver<bool>) -> SocketAddr {
    let listener = TcpListener::bind(bind).await.expect("bind upstream");
    let addr = listener.local_addr().expect("addr");
    let state = Upstream { release };
    // Runs for the whole benchmark; the process exit ends it.
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            let _ = socket.set_nodelay(true);
            let state = state.clone();
            tokio::spawn(async move {
                let service = service_fn(move |r| upstream(state.clone(), r));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(socket), service)
                    .await;
            });
        }
    });
    addr
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

struct Sidecar {
    child: tokio::process::Child,
    llm: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Sidecar {
    fn rss(&self) -> Memory {
        rss(self.child.id().expect("pid"))
    }
}

/// The benchmark's policy. `flaky` falls through from a target that answers 503 at once (kept
/// in rotation by a `ForcedClosed` override, so its breaker never takes it out);
/// `dead-primary` starts at a target that never answers, whose breaker opens; `shadowed` and
/// `shadow-stalled` are `chat` shadowed on every request, to a target that answers and to one
/// that never does.
fn policy(upstream: SocketAddr, dead: SocketAddr) -> String {
    format!(
        "apiVersion: backstop.dev/v1alpha1
kind: FallbackPolicy
metadata: {{name: bench}}
spec:
  retry: {{attempts: 1, budgetPercent: 1000}}
  providers:
    - {{name: up, type: openai-compatible, baseUrl: \"http://{upstream}/v1\", apiKey: {{value: sk-bench}}}}
    - {{name: down, type: openai-compatible, baseUrl: \"http://{upstream}/down/v1\", apiKey: {{value: sk-bench}}}}
    - {{name: dead, type: openai-compatible, baseUrl: \"http://{dead}/v1\"}}
    - {{name: spare, type: mock}}
  routes:
    - model: chat
      chain:
        - {{provider: up, model: bench-model}}
        - {{provider: spare, model: m}}
    - model: paced
      chain:
        - {{provider: up, model: paced-model}}
    - model: hold
      chain:
        - {{provider: up, model: hold-model}}
    - model: flaky
      chain:
        - {{provider: down, model: bench-model}}
        - {{provider: up, model: bench-model}}
    - model: dead-primary
      chain:
        - {{provider: dead, model: bench-model, timeout: 200ms}}
        - {{provider: up, model: bench-model}}
    - model: shadowed
      chain:
        - {{provider: up, model: bench-model}}
      shadow: {{provider: up, model: shadow-model, percent: 100}}
    - model: shadow-stalled
      chain:
        - {{provider: up, model: bench-model}}
      shadow: {{provider: dead, model: bench-model, percent: 100, timeout: 1m}}
  overrides:
    - {{target: down, state: ForcedClosed, reason: the benchmark's always-503 target}}
"
    )
}

fn binary() -> std::ffi::OsString {
    // `BACKSTOP_BENCH_BIN` measures another build of the sidecar (an older commit, say) with
    // this same harness.
    std::env::var_os("BACKSTOP_BENCH_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_backstop").into())
}

async fn start_sidecar(policy_text: &str, env: &[(&str, String)]) -> Sidecar {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, policy_text).expect("write policy");
    let mut child = tokio::process::Command::new(binary())
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
        let event: Value = serde_json::from_str(&line).unwrap_or_default();
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
    Client::builder(TokioExecutor::new()).pool_max_idle_per_host(2048).build(http)
}

/// Where requests go: a base URL (`http://host:port/v1`) and the model to name.
#[derive(Clone)]
struct Endpoint {
    base: String,
    model: String,
}

impl Endpoint {
    fn direct(addr: SocketAddr, model: &str) -> Endpoint {
        Endpoint { base: format!("http://{addr}/v1"), model: model.into() }
    }
    fn request(&self, stream: bool) -> Request<Full<Bytes>> {
        let mut body = REQUEST.replace("MODEL", &self.model);
        if stream {
            body = body.replacen('{', "{\"stream\":true,", 1);
        }
        Request::post(format!("{}/chat/completions", self.base))
            .header("content-type", "application/json")
            .header("authorization", "Bearer sk-bench")
            .body(Full::new(Bytes::from(body)))
            .expect("request")
    }
}

struct Load {
    rps: f64,
    p50: Duration,
    p99: Duration,
    errors: usize,
}

async fn load(to: &Endpoint, concurrency: usize, seconds: f64) -> Load {
    let client = client();
    // Warm the connection pool.
    for _ in 0..concurrency.min(8) {
        let _ = client.request(to.request(false)).await.map(|r| r.into_body());
    }
    let started = Instant::now();
    let end = started + Duration::from_secs_f64(seconds);
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (client, to) = (client.clone(), to.clone());
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(4096);
            let mut errors = 0;
            while Instant::now() < end {
                let sent = Instant::now();
                match client.request(to.request(false)).await {
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
    Load { rps: all.len() as f64 / elapsed, p50: quantile(&all, 0.50), p99: quantile(&all, 0.99), errors }
}

/// Latencies at a fixed request rate.
struct OpenLoop {
    p50: Duration,
    p99: Duration,
    p999: Duration,
    sent: usize,
    errors: usize,
}

/// `rate` requests a second for `seconds`, each sent on its schedule on a task of its own
/// whether or not earlier ones have been answered (an open loop), its latency taken from when
/// it was due: time spent queued behind a slow answer counts. A thread of its own keeps the
/// schedule (the runtime's timer has a millisecond grain; a thread's sleep is about 60 µs late
/// at most), alike for every endpoint measured.
async fn open_loop(to: &Endpoint, rate: f64, seconds: f64) -> OpenLoop {
    let client = client();
    for _ in 0..8 {
        let _ = client.request(to.request(false)).await.map(|r| r.into_body());
    }
    let total = (rate * seconds) as usize;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let runtime = tokio::runtime::Handle::current();
    let to = to.clone();
    let pacer = std::thread::spawn(move || {
        let started = Instant::now();
        let mut tasks = Vec::with_capacity(total);
        for next in 0..total {
            let due = started + interval * next as u32;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            let (client, request) = (client.clone(), to.request(false));
            tasks.push(runtime.spawn(async move {
                match client.request(request).await {
                    Ok(response) if response.status().is_success() => {
                        response.into_body().collect().await.ok().map(|_| due.elapsed())
                    }
                    _ => None,
                }
            }));
        }
        tasks
    });
    let tasks = tokio::task::spawn_blocking(move || pacer.join().expect("pacer")).await.expect("pacer");
    let mut latencies = Vec::with_capacity(total);
    for task in tasks {
        if let Ok(Some(latency)) = task.await {
            latencies.push(latency);
        }
    }
    latencies.sort();
    OpenLoop {
        p50: quantile(&latencies, 0.50),
        p99: quantile(&latencies, 0.99),
        p999: quantile(&latencies, 0.999),
        errors: total - latencies.len(),
        sent: total,
    }
}

/// The fixed-rate row: the latency the sidecar adds at `rate` requests a second.
fn fixed_rate_row(rate: f64, direct: &OpenLoop, proxied: &OpenLoop) -> Value {
    println!(
        "| {rate:.0} | {:.0} / {:.0} / {:.0} | {:.0} / {:.0} / {:.0} | {:.0} / {:.0} / {:.0} | {} |",
        us(direct.p50),
        us(direct.p99),
        us(direct.p999),
        us(proxied.p50),
        us(proxied.p99),
        us(proxied.p999),
        us(proxied.p50) - us(direct.p50),
        us(proxied.p99) - us(direct.p99),
        us(proxied.p999) - us(direct.p999),
        direct.errors + proxied.errors,
    );
    json!({
        "rate": rate,
        "sent": direct.sent + proxied.sent,
        "direct_p50_us": us(direct.p50),
        "direct_p99_us": us(direct.p99),
        "direct_p999_us": us(direct.p999),
        "proxied_p50_us": us(proxied.p50),
        "proxied_p99_us": us(proxied.p99),
        "proxied_p999_us": us(proxied.p999),
        "p50_added_us": us(proxied.p50) - us(direct.p50),
        "p99_added_us": us(proxied.p99) - us(direct.p99),
        "p999_added_us": us(proxied.p999) - us(direct.p999),
        "errors": direct.errors + proxied.errors,
    })
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    sorted.get(((sorted.len() as f64 * q) as usize).min(sorted.len().saturating_sub(1))).copied().unwrap_or_default()
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    quantile(&samples, 0.5)
}

/// Sequential latencies of `n` requests (after 20 to warm up).
async fn latencies(to: &Endpoint, n: usize) -> Vec<Duration> {
    let client = client();
    let mut samples = Vec::with_capacity(n);
    for i in 0..n + 20 {
        let sent = Instant::now();
        let response = client.request(to.request(false)).await.expect("answer");
        assert!(response.status().is_success(), "{} answered {}", to.model, response.status());
        let _ = response.into_body().collect().await;
        if i >= 20 {
            samples.push(sent.elapsed());
        }
    }
    samples
}

/// For `n` sequential streams: the median time to the first body byte, and for each later
/// body frame, the median time from the request to its arrival.
async fn stream_timing(to: &Endpoint, n: usize) -> (Duration, Vec<Duration>) {
    let client = client();
    let mut first = Vec::with_capacity(n);
    let mut frames: Vec<Vec<Duration>> = Vec::new();
    for i in 0..n + 10 {
        let sent = Instant::now();
        let response = client.request(to.request(true)).await.expect("stream answers");
        assert!(response.status().is_success());
        let mut body = response.into_body();
        let mut arrivals = Vec::new();
        while let Some(frame) = body.frame().await {
            if frame.map(|f| f.is_data()).unwrap_or(false) {
                arrivals.push(sent.elapsed());
            }
        }
        if i >= 10 {
            first.push(arrivals.first().copied().unwrap_or_default());
            for (k, at) in arrivals.into_iter().enumerate() {
                if frames.len() <= k {
                    frames.push(Vec::new());
                }
                frames[k].push(at);
            }
        }
    }
    (median(first), frames.into_iter().filter(|f| f.len() * 2 > n).map(median).collect())
}

#[derive(Clone, Copy)]
struct Memory {
    rss_mib: f64,
    /// Resident anonymous memory: the heap and stacks, without the mapped binary.
    anon_mib: f64,
    peak_mib: f64,
}

fn rss(pid: u32) -> Memory {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    Memory { rss_mib: field("VmRSS:"), anon_mib: field("RssAnon:"), peak_mib: field("VmHWM:") }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Opens `n` streams through the sidecar that stay open, measures its memory holding them,
/// then lets them end.
async fn open_streams(sidecar: &Sidecar, n: usize, release: &watch::Sender<bool>) -> Memory {
    let client = client();
    let to = Endpoint::direct(sidecar.llm, "hold");
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(n);
    let mut streams = Vec::with_capacity(n);
    for _ in 0..n {
        let (client, to, ready) = (client.clone(), to.clone(), ready_tx.clone());
        streams.push(tokio::spawn(async move {
            let response = client.request(to.request(true)).await.expect("stream answers");
            assert!(response.status().is_success());
            let mut body = response.into_body();
            let _ = body.frame().await;
            let _ = ready.send(()).await;
            while body.frame().await.is_some() {}
        }));
    }
    for _ in 0..n {
        ready_rx.recv().await.expect("a stream opened");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let memory = sidecar.rss();
    release.send_replace(true);
    for stream in streams {
        stream.await.expect("stream ended");
    }
    release.send_replace(false);
    memory
}

/// Median time from starting the sidecar to its `/readyz` answering 200, over `n` starts.
async fn start_to_ready(policy_text: &str, n: usize) -> Duration {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, policy_text).expect("write policy");
    let admin = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("pick a port");
        probe.local_addr().expect("addr")
    };
    let client = client();
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let mut child = tokio::process::Command::new(binary())
            .args(["sidecar", "--listen", "127.0.0.1:0", "--admin", &admin.to_string(), "--policy-file"])
            .arg(&policy)
            .env("BACKSTOP_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start the sidecar");
        loop {
            let probe = Request::get(format!("http://{admin}/readyz")).body(Full::new(Bytes::new())).expect("probe");
            if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(1), client.request(probe)).await
                && r.status().is_success()
            {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "the sidecar never became ready");
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        samples.push(started.elapsed());
        let _ = child.kill().await;
    }
    median(samples)
}

/// The passthrough row of one measured proxy against the direct call.
fn passthrough_row(name: &str, concurrency: usize, direct: &Load, proxied: &Load) -> Value {
    println!(
        "| {name} | {concurrency} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} |",
        direct.rps,
        proxied.rps,
        proxied.rps / direct.rps,
        us(direct.p50),
        us(proxied.p50),
        us(proxied.p50) - us(direct.p50),
        us(direct.p99),
        us(proxied.p99),
        us(proxied.p99) - us(direct.p99),
        direct.errors + proxied.errors,
    );
    json!({
        "proxy": name,
        "concurrency": concurrency,
        "direct_rps": direct.rps,
        "proxied_rps": proxied.rps,
        "throughput_ratio": proxied.rps / direct.rps,
        "direct_p50_us": us(direct.p50),
        "proxied_p50_us": us(proxied.p50),
        "p50_added_us": us(proxied.p50) - us(direct.p50),
        "direct_p99_us": us(direct.p99),
        "proxied_p99_us": us(proxied.p99),
        "p99_added_us": us(proxied.p99) - us(direct.p99),
        "errors": direct.errors + proxied.errors,
    })
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0")
}

fn main() {
    let seconds: f64 = std::env::var("BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let quick = env_flag("BENCH_QUICK");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let results = runtime.block_on(run(seconds, quick));
    let path = std::env::var("BENCH_JSON").unwrap_or_else(|_| {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
        std::fs::create_dir_all(&dir).expect("create target/bench");
        dir.join("proxy.json").display().to_string()
    });
    std::fs::write(&path, serde_json::to_string_pretty(&results).expect("json")).expect("write the results");
    println!("\nresults written to {path}");
    if let Ok(limits) = std::env::var("BENCH_CHECK") {
        let limits: Value =
            serde_json::from_str(&std::fs::read_to_string(&limits).expect("read BENCH_CHECK")).expect("limits JSON");
        let failures = check(&results, &limits);
        if failures.is_empty() {
            println!("regression check: every ratio within {}", limits["about"].as_str().unwrap_or("its limits"));
        } else {
            for failure in &failures {
                eprintln!("regression: {failure}");
            }
            std::process::exit(1);
        }
    }
}

/// Each limit is `{"path": "/json/pointer", "min": x}` or `"max"`; every crossing is reported.
fn check(results: &Value, limits: &Value) -> Vec<String> {
    let mut failures = Vec::new();
    for limit in limits["limits"].as_array().into_iter().flatten() {
        let path = limit["path"].as_str().unwrap_or_default();
        let Some(measured) = results.pointer(path).and_then(Value::as_f64) else {
            failures.push(format!("{path} was not measured"));
            continue;
        };
        if let Some(min) = limit["min"].as_f64().filter(|min| measured < *min) {
            failures.push(format!("{path} is {measured:.3}, below its floor {min}"));
        }
        if let Some(max) = limit["max"].as_f64().filter(|max| measured > *max) {
            failures.push(format!("{path} is {measured:.3}, above its ceiling {max}"));
        }
    }
    failures
}

async fn run(seconds: f64, quick: bool) -> Value {
    let (release, released) = watch::channel(false);
    let upstream_bind = std::env::var("BENCH_UPSTREAM").ok().and_then(|a| a.parse().ok());
    let upstream =
        start_upstream(upstream_bind.unwrap_or_else(|| "127.0.0.1:0".parse().expect("addr")), released).await;
    let dead = start_dead_upstream().await;
    let collector = start_collector().await;
    let otlp = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{collector}")),
        ("OTEL_METRIC_EXPORT_INTERVAL", "1000".to_string()),
    ];
    let policy = policy(upstream, dead);
    let sidecar = start_sidecar(&policy, &otlp).await;
    let idle = sidecar.rss();
    let mut results = BTreeMap::<&str, Value>::new();
    results.insert(
        "setup",
        json!({
            "seconds_per_load": seconds,
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "telemetry": "traces, metrics and logs over OTLP to an in-process collector",
        }),
    );
    println!("backstop sidecar overhead: {seconds} s per load, same machine, same run, telemetry exported over OTLP\n");

    // Passthrough.
    println!(
        "| proxy | concurrency | direct req/s | proxied req/s | throughput ratio | direct p50 µs | proxied p50 µs | p50 added µs | direct p99 µs | proxied p99 µs | p99 added µs | errors |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let direct_to = Endpoint::direct(upstream, "bench-model");
    let sidecar_to = Endpoint::direct(sidecar.llm, "chat");
    let compare = std::env::var("BENCH_COMPARE_URL").ok().map(|base| Endpoint {
        base: base.trim_end_matches('/').to_string(),
        model: std::env::var("BENCH_COMPARE_MODEL").unwrap_or_else(|_| "bench-model".into()),
    });
    let mut passthrough = Vec::new();
    let mut compared = Vec::new();
    for concurrency in [1, 16, 64] {
        let direct = load(&direct_to, concurrency, seconds).await;
        let proxied = load(&sidecar_to, concurrency, seconds).await;
        passthrough.push(passthrough_row("backstop", concurrency, &direct, &proxied));
        if let Some(other) = &compare {
            let theirs = load(other, concurrency, seconds).await;
            compared.push(passthrough_row("compared", concurrency, &direct, &theirs));
        }
    }
    results.insert("passthrough", Value::Array(passthrough));
    if compare.is_some() {
        results.insert("compared", Value::Array(compared));
    }

    // Fixed rates: the latency added when requests arrive on a schedule, as users size a
    // deployment, rather than as fast as a closed loop can send them.
    println!(
        "\n| requests/s | direct p50 / p99 / p99.9 µs | proxied p50 / p99 / p99.9 µs | added p50 / p99 / p99.9 µs | errors |"
    );
    println!("|---|---|---|---|---|");
    let mut fixed = Vec::new();
    // At least three seconds each: on two shared cores a one-second run at 5,000 requests/s
    // can spend most of itself queued behind one stall, with any binary.
    let fixed_seconds = seconds.max(3.0);
    for rate in [1000.0, 5000.0] {
        let direct = open_loop(&direct_to, rate, fixed_seconds).await;
        let proxied = open_loop(&sidecar_to, rate, fixed_seconds).await;
        fixed.push(fixed_rate_row(rate, &direct, &proxied));
    }
    results.insert("fixed_rate", Value::Array(fixed));

    // Streaming: first byte, then each chunk against the direct call's.
    let (direct_first, _) = stream_timing(&Endpoint::direct(upstream, "bench-model"), 300).await;
    let (proxied_first, _) = stream_timing(&Endpoint::direct(sidecar.llm, "chat"), 300).await;
    let (_, paced_direct) = stream_timing(&Endpoint::direct(upstream, "paced-model"), 60).await;
    let (_, paced_proxied) = stream_timing(&Endpoint::direct(sidecar.llm, "paced"), 60).await;
    // The role chunk is held until the first content chunk (the commit point): compare the
    // chunks after it.
    let chunk_added: Vec<f64> = paced_direct.iter().zip(&paced_proxied).skip(2).map(|(d, p)| us(*p) - us(*d)).collect();
    let worst_chunk = chunk_added.iter().copied().fold(f64::MIN, f64::max);
    println!(
        "\nstreaming: time to first byte direct {:.0} µs, through the sidecar {:.0} µs, added {:.0} µs; \
         after the commit point, chunks {} ms apart arrive at most {:.0} µs later than directly (per chunk: {})",
        us(direct_first),
        us(proxied_first),
        us(proxied_first) - us(direct_first),
        PACE.as_millis(),
        worst_chunk,
        chunk_added.iter().map(|a| format!("{a:.0}")).collect::<Vec<_>>().join(", ")
    );
    results.insert(
        "streaming",
        json!({
            "direct_ttfb_us": us(direct_first),
            "proxied_ttfb_us": us(proxied_first),
            "ttfb_added_us": us(proxied_first) - us(direct_first),
            "chunk_spacing_ms": PACE.as_millis() as u64,
            "chunk_added_us": chunk_added,
            "worst_chunk_added_us": worst_chunk,
        }),
    );

    // A fall-through from a 503 to the next target, against the two upstream calls it makes.
    let n = 400;
    let direct_503 = median(latencies_of_503(upstream, n).await);
    let direct_ok = median(latencies(&direct_to, n).await);
    let flaky = median(latencies(&Endpoint::direct(sidecar.llm, "flaky"), n).await);
    let plain = median(latencies(&sidecar_to, n).await);
    let fallthrough_added = us(flaky) - us(direct_503) - us(direct_ok);
    println!(
        "fall-through on a 503: {:.0} µs through the sidecar; the two upstream calls take {:.0} + {:.0} µs directly, \
         so the sidecar adds {:.0} µs (a plain request: {:.0} µs added)",
        us(flaky),
        us(direct_503),
        us(direct_ok),
        fallthrough_added,
        us(plain) - us(direct_ok)
    );
    results.insert(
        "fallthrough",
        json!({
            "proxied_p50_us": us(flaky),
            "direct_503_p50_us": us(direct_503),
            "direct_ok_p50_us": us(direct_ok),
            "added_us": fallthrough_added,
            "plain_added_us": us(plain) - us(direct_ok),
        }),
    );

    results.insert("shadow", shadow(&sidecar, &direct_to).await);
    results.insert("resumed", resumed(upstream).await);

    if !quick {
        dead_primary(&sidecar, &direct_to, &mut results).await;
        let after = sidecar.rss();
        let streams = open_streams(&sidecar, 1000, &release).await;
        let per_stream_kib = (streams.rss_mib - after.rss_mib) * 1024.0 / 1000.0;
        println!(
            "memory: {:.1} MiB resident idle ({:.1} MiB anonymous), {:.1} MiB after the load, {:.1} MiB holding 1,000 open streams \
             ({per_stream_kib:.1} KiB a stream beyond the loaded sidecar), {:.1} MiB peak",
            idle.rss_mib, idle.anon_mib, after.rss_mib, streams.rss_mib, streams.peak_mib
        );
        results.insert(
            "memory",
            json!({
                "idle_mib": idle.rss_mib,
                "after_load_mib": after.rss_mib,
                "open_streams": 1000,
                "open_streams_mib": streams.rss_mib,
                "per_stream_kib": per_stream_kib,
                "idle_anon_mib": idle.anon_mib,
                "peak_mib": streams.peak_mib,
            }),
        );
        let ready = start_to_ready(&policy, 20).await;
        println!("start to ready (median of 20, policy file): {:.1} ms", ready.as_secs_f64() * 1e3);
        results.insert("start_to_ready_ms", json!(ready.as_secs_f64() * 1e3));
    } else {
        results.insert("memory", json!({ "idle_mib": idle.rss_mib }));
    }
    drop(sidecar);

    if !quick {
        results.insert("telemetry", telemetry(&policy, collector, seconds).await);
    }
    serde_json::to_value(results).expect("results")
}

/// A stream cut after two content chunks and finished by the next target, against the same
/// stream answered whole and the two upstream calls it makes; and a stream armed to continue
/// that never breaks, against one that is not armed. Its own sidecar, whose breakers count only
/// rate limits: every stream of the cut route breaks, and must keep reaching its target.
async fn resumed(upstream: SocketAddr) -> Value {
    let policy = format!(
        "apiVersion: backstop.dev/v1alpha1
kind: FallbackPolicy
metadata: {{name: bench-resumed}}
spec:
  retry: {{attempts: 1, budgetPercent: 1000}}
  circuitBreaker: {{countOn: [rateLimited]}}
  providers:
    - {{name: up, type: openai-compatible, baseUrl: \"http://{upstream}/v1\", apiKey: {{value: sk-bench}},
       continuation: assistantPrefill}}
  routes:
    - model: whole
      chain: [{{provider: up, model: bench-model}}]
    - model: armed
      midStream: continue
      chain: [{{provider: up, model: bench-model}}, {{provider: up, model: spare-model}}]
    - model: resumed
      midStream: continue
      chain: [{{provider: up, model: cut-model}}, {{provider: up, model: bench-model}}]
"
    );
    let sidecar = start_sidecar(&policy, &[]).await;
    let total = |frames: &[Duration]| frames.last().copied().unwrap_or_default();
    let (mut whole, mut resumed, mut direct, mut cut) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut plain_first, mut armed_first) = (Vec::new(), Vec::new());
    // Interleaved, so every measure sees the same machine.
    for _ in 0..6 {
        let (first, frames) = stream_timing(&Endpoint::direct(sidecar.llm, "whole"), 40).await;
        whole.push(total(&frames));
        plain_first.push(first);
        resumed.push(total(&stream_timing(&Endpoint::direct(sidecar.llm, "resumed"), 40).await.1));
        direct.push(total(&stream_timing(&Endpoint::direct(upstream, "bench-model"), 40).await.1));
        cut.push(stream_cut_timing(&Endpoint::direct(upstream, "cut-model"), 40).await);
        armed_first.push(stream_timing(&Endpoint::direct(sidecar.llm, "armed"), 40).await.0);
    }
    let (whole, resumed, direct, cut) = (median(whole), median(resumed), median(direct), median(cut));
    let (plain_first, armed_first) = (median(plain_first), median(armed_first));
    let seam_added = us(resumed) - us(whole) - us(cut);
    println!(
        "stream cut mid-answer and continued: {:.0} µs to its end through the sidecar, against {:.0} µs for the same \
         stream whole; the cut call takes {:.0} µs directly (a whole one {:.0} µs), so the seam adds {:.0} µs beyond \
         its upstream call; armed to continue, an unbroken stream's first byte: {:.0} µs against {:.0} µs unarmed",
        us(resumed),
        us(whole),
        us(cut),
        us(direct),
        seam_added,
        us(armed_first),
        us(plain_first)
    );
    json!({
        "resumed_total_us": us(resumed),
        "whole_total_us": us(whole),
        "direct_cut_us": us(cut),
        "direct_whole_us": us(direct),
        "seam_added_us": seam_added,
        "armed_ttfb_us": us(armed_first),
        "unarmed_ttfb_us": us(plain_first),
        "armed_ttfb_added_us": us(armed_first) - us(plain_first),
    })
}

/// The median time from sending a streamed request until its body breaks off.
async fn stream_cut_timing(to: &Endpoint, n: usize) -> Duration {
    let client = client();
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let sent = Instant::now();
        let response = client.request(to.request(true)).await.expect("stream answers");
        let mut body = response.into_body();
        while let Some(Ok(_)) = body.frame().await {}
        samples.push(sent.elapsed());
    }
    median(samples)
}

/// App latency with a shadow on every request, against the same route without one, taken in
/// alternating rounds so drift on the machine touches all three alike.
async fn shadow(sidecar: &Sidecar, direct: &Endpoint) -> Value {
    let routes = ["chat", "shadow-stalled", "shadowed"];
    let mut samples: [Vec<Duration>; 3] = Default::default();
    for _ in 0..4 {
        for (route, into) in routes.iter().zip(samples.iter_mut()) {
            into.extend(latencies(&Endpoint::direct(sidecar.llm, route), 100).await);
        }
    }
    let direct = median(latencies(direct, 200).await);
    let stats = |mut s: Vec<Duration>| {
        s.sort();
        (quantile(&s, 0.5), quantile(&s, 0.99))
    };
    let [plain, stalled, shadowed] = samples.map(stats);
    println!(
        "shadow at 100%: app p50/p99 {:.0}/{:.0} µs without a shadow, {:.0}/{:.0} µs with a shadow that never answers, \
         {:.0}/{:.0} µs with one that answers (direct {:.0} µs)",
        us(plain.0),
        us(plain.1),
        us(stalled.0),
        us(stalled.1),
        us(shadowed.0),
        us(shadowed.1),
        us(direct)
    );
    json!({
        "plain_p50_us": us(plain.0),
        "plain_p99_us": us(plain.1),
        "stalled_p50_us": us(stalled.0),
        "stalled_p99_us": us(stalled.1),
        "answering_p50_us": us(shadowed.0),
        "answering_p99_us": us(shadowed.1),
        "stalled_p50_ratio": us(stalled.0) / us(plain.0),
        "answering_p50_ratio": us(shadowed.0) / us(plain.0),
        "direct_p50_us": us(direct),
    })
}

async fn latencies_of_503(upstream: SocketAddr, n: usize) -> Vec<Duration> {
    let client = client();
    let to = Endpoint { base: format!("http://{upstream}/down/v1"), model: "bench-model".into() };
    let mut samples = Vec::with_capacity(n);
    for i in 0..n + 20 {
        let sent = Instant::now();
        let response = client.request(to.request(false)).await.expect("answer");
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let _ = response.into_body().collect().await;
        if i >= 20 {
            samples.push(sent.elapsed());
        }
    }
    samples
}

/// The latency a request pays for a dead primary (never answers; 200 ms attempt timeout), before
/// its breaker opens (default: 5 consecutive failures), and the cost of passing it over after.
async fn dead_primary(sidecar: &Sidecar, direct: &Endpoint, results: &mut BTreeMap<&str, Value>) {
    let client = client();
    let to = Endpoint::direct(sidecar.llm, "dead-primary");
    let mut before = Vec::new();
    loop {
        let sent = Instant::now();
        let response = client.request(to.request(false)).await.expect("answer");
        let opened = response.headers().get("x-backstop-fallback-reason").and_then(|v| v.to_str().ok())
            == Some("dead/bench-model=circuitOpen");
        assert!(response.status().is_success());
        let _ = response.into_body().collect().await;
        if opened {
            break;
        }
        before.push(sent.elapsed());
        assert!(before.len() < 50, "the dead primary's breaker never opened");
    }
    // Interleaved, so both see the same machine: the route with the open breaker and the plain one.
    let plain_to = Endpoint::direct(sidecar.llm, "chat");
    let (mut skipping, mut plain) = (Vec::new(), Vec::new());
    for _ in 0..10 {
        skipping.extend(latencies(&to, 100).await);
        plain.extend(latencies(&plain_to, 100).await);
    }
    let direct = median(latencies(direct, 400).await);
    let (skipping, plain) = (median(skipping), median(plain));
    println!(
        "dead primary (never answers, 200 ms attempt timeout): {} request(s) before its breaker opened paid a median {:.0} ms; \
         after, {:.0} µs against {:.0} µs for a route without it: passing the open breaker costs {:.0} µs (direct call {:.0} µs)",
        before.len(),
        median(before.clone()).as_secs_f64() * 1e3,
        us(skipping),
        us(plain),
        us(skipping) - us(plain),
        us(direct)
    );
    results.insert(
        "breaker_open",
        json!({
            "requests_before_open": before.len(),
            "before_open_p50_ms": median(before).as_secs_f64() * 1e3,
            "skipping_p50_us": us(skipping),
            "plain_p50_us": us(plain),
            "added_us": us(skipping) - us(plain),
            "direct_p50_us": us(direct),
        }),
    );
}

/// Metrics only, against traces, metrics and logs exported to a collector that takes them, and
/// to one that accepts connections and never answers.
async fn telemetry(policy: &str, collector: SocketAddr, seconds: f64) -> Value {
    let silent = start_dead_upstream().await;
    println!("\ntelemetry: the same load through sidecars exporting OTLP, against metrics only\n");
    println!(
        "| telemetry | concurrency | req/s | p50 µs | p99 µs | req/s ratio to metrics only | p50 added µs | errors |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut baseline = Vec::new();
    let mut rows = Vec::new();
    for (mode, endpoint) in
        [("metrics only", None), ("OTLP, collector up", Some(collector)), ("OTLP, collector silent", Some(silent))]
    {
        let env: Vec<(&str, String)> = endpoint
            .map(|e| {
                vec![
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{e}")),
                    ("OTEL_METRIC_EXPORT_INTERVAL", "1000".to_string()),
                ]
            })
            .unwrap_or_default();
        let sidecar = start_sidecar(policy, &env).await;
        let to = Endpoint::direct(sidecar.llm, "chat");
        for (i, concurrency) in [1usize, 64].into_iter().enumerate() {
            let measured = load(&to, concurrency, seconds).await;
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
            rows.push(json!({
                "mode": mode,
                "concurrency": concurrency,
                "rps": measured.rps,
                "p50_us": us(measured.p50),
                "p99_us": us(measured.p99),
                "rps_ratio_to_metrics_only": measured.rps / base_rps,
                "errors": measured.errors,
            }));
        }
        let memory = sidecar.rss();
        println!(
            "| {mode}: memory after the load | | {:.1} MiB resident | {:.1} MiB peak | | | | |",
            memory.rss_mib, memory.peak_mib
        );
        rows.push(json!({ "mode": mode, "rss_mib": memory.rss_mib, "peak_mib": memory.peak_mib }));
    }
    Value::Array(rows)
}
