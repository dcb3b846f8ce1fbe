//! Telemetry as a collector receives it: the real sidecar binary, configured only by `OTEL_*`
//! variables, exporting OTLP/HTTP protobuf to an in-process receiver; a request that falls
//! back twice, streamed and not, asserted span by span, metric by metric, record by record.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::logs::v1::LogRecord;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::Command;

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_backstop");
const PROMPT: &str = "PROMPT-CANARY-5d1e: what is our refund policy?";

/// An OTLP/HTTP receiver keeping every request's path and body.
pub(crate) struct Receiver {
    pub(crate) addr: SocketAddr,
    received: Arc<Mutex<Vec<(String, Bytes)>>>,
}

impl Receiver {
    pub(crate) async fn start() -> Receiver {
        Receiver::start_on("127.0.0.1:0".parse().expect("address")).await
    }

    /// A receiver on `addr` (one a collector came back on).
    async fn start_on(addr: SocketAddr) -> Receiver {
        let listener = TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = received.clone();
        tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else { return };
                let sink = sink.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                        let sink = sink.clone();
                        async move {
                            let path = request.uri().path().to_string();
                            let body = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            sink.lock().expect("lock").push((path, body));
                            let mut response = hyper::Response::new(Full::new(Bytes::new()));
                            response
                                .headers_mut()
                                .insert("content-type", "application/x-protobuf".parse().expect("header"));
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(socket), service)
                        .await;
                });
            }
        });
        Receiver { addr, received }
    }

    fn bodies(&self, path: &str) -> Vec<Bytes> {
        self.received.lock().expect("lock").iter().filter(|(p, _)| p == path).map(|(_, b)| b.clone()).collect()
    }

    pub(crate) fn spans(&self) -> Vec<Span> {
        self.bodies("/v1/traces")
            .iter()
            .flat_map(|b| ExportTraceServiceRequest::decode(b.as_ref()).expect("traces").resource_spans)
            .flat_map(|r| r.scope_spans)
            .flat_map(|s| s.spans)
            .collect()
    }

    fn log_records(&self) -> Vec<LogRecord> {
        self.bodies("/v1/logs")
            .iter()
            .flat_map(|b| ExportLogsServiceRequest::decode(b.as_ref()).expect("logs").resource_logs)
            .flat_map(|r| r.scope_logs)
            .flat_map(|s| s.log_records)
            .collect()
    }

    fn everything(&self) -> Vec<u8> {
        self.received.lock().expect("lock").iter().flat_map(|(_, b)| b.to_vec()).collect()
    }
}

pub(crate) fn attributes(list: &[KeyValue]) -> BTreeMap<String, String> {
    list.iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.clone()) {
                Some(any_value::Value::StringValue(s)) => s,
                Some(any_value::Value::IntValue(i)) => i.to_string(),
                Some(any_value::Value::DoubleValue(d)) => format!("{d}"),
                Some(any_value::Value::BoolValue(b)) => b.to_string(),
                Some(any_value::Value::ArrayValue(a)) => a
                    .values
                    .iter()
                    .filter_map(|v: &AnyValue| match &v.value {
                        Some(any_value::Value::StringValue(s)) => Some(s.clone()),
                        _ => None,
                    })
                    .collect::<Vec<_>>()
                    .join(","),
                _ => String::new(),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn start_sidecar(
    policy: &std::path::Path,
    receiver: SocketAddr,
) -> (tokio::process::Child, SocketAddr, SocketAddr) {
    let (child, llm, admin, _) = start_sidecar_logged(policy, receiver).await;
    (child, llm, admin)
}

/// A policy file holding `yaml`, in a folder removed when the first value is dropped.
fn policy_file(yaml: impl AsRef<[u8]>) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("dir");
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, yaml).expect("policy");
    (dir, policy)
}

/// The sidecar's stderr lines, kept as they come.
type Lines = Arc<Mutex<Vec<String>>>;

/// [`start_sidecar`], keeping its log lines.
async fn start_sidecar_logged(
    policy: &std::path::Path,
    receiver: SocketAddr,
) -> (tokio::process::Child, SocketAddr, SocketAddr, Lines) {
    start_sidecar_with(policy, receiver, &[]).await
}

/// [`start_sidecar_logged`] with more environment variables.
async fn start_sidecar_with(
    policy: &std::path::Path,
    receiver: SocketAddr,
    env: &[(&str, &str)],
) -> (tokio::process::Child, SocketAddr, SocketAddr, Lines) {
    let mut child = Command::new(BIN)
        .args(["sidecar", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--log-format", "json", "--policy-file"])
        .arg(policy)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{receiver}"))
        .env("OTEL_METRIC_EXPORT_INTERVAL", "300")
        .env("OTEL_SERVICE_NAME", "support-bot-sidecar")
        .env("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
        .env("BACKSTOP_LOG", "info")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the sidecar");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    // Every line is kept, those before the listening one too (a warning may come that early).
    let kept = Lines::default();
    let (llm, admin) = loop {
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .expect("starts")
            .expect("read")
            .expect("line");
        kept.lock().expect("lock").push(line.clone());
        if let Ok(event) = serde_json::from_str::<serde_json::Value>(&line)
            && event["message"] == "backstop sidecar listening"
        {
            let addr = |k: &str| event[k].as_str().and_then(|a| a.parse::<SocketAddr>().ok()).expect("address");
            break (addr("llm"), addr("admin"));
        }
    };
    let sink = kept.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            sink.lock().expect("lock").push(line);
        }
    });
    (child, llm, admin, kept)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_falls_back_twice_is_traced_measured_and_logged_in_otlp() {
    let receiver = Receiver::start().await;
    let flaky = Upstream::start(Fault::status(500)).await;
    let overloaded = Upstream::start(Fault::status(503)).await;
    let (_dir, policy) = policy_file(format!(
        r#"apiVersion: backstop.dev/v1alpha1
kind: FallbackPolicy
metadata: {{name: traced, namespace: tests}}
spec:
  providers:
    - {{name: flaky, type: openai-compatible, baseUrl: "{}", apiKey: {{value: sk-trace-SECRET-1}}}}
    - {{name: busy, type: openai-compatible, baseUrl: "{}", apiKey: {{value: sk-trace-SECRET-2}}}}
    - {{name: steady, type: mock, mock: {{reply: "Refunds within 30 days.", chunks: 2}}}}
  routes:
    - model: chat
      chain:
        - {{provider: flaky, model: up-a}}
        - {{provider: busy, model: up-b}}
        - {{provider: steady, model: steady-model, price: {{input: 2.5, output: 10}}}}
  retry: {{attempts: 1}}
  circuitBreaker: {{consecutiveFailures: 100}}
"#,
        flaky.base_url(),
        overloaded.base_url()
    ));
    let (_child, llm, admin) = start_sidecar(&policy, receiver.addr).await;
    let url = format!("http://{llm}/v1/chat/completions");
    let app_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traceparent = format!("00-{app_trace}-00f067aa0ba902b7-01");
    let body = json!({"model": "chat", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 64, "temperature": 0.2});
    let answer = post_raw(&url, body.to_string(), &[("traceparent", &traceparent)]).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("x-backstop-fallback-reason"), Some("flaky/up-a=serverError, busy/up-b=overloaded"));
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let stream = post_stream(&url, &streamed).await;
    assert!(stream.done());
    assert!(
        stream.events.iter().all(|e| !e.contains("\"usage\":{")),
        "the app did not ask for usage: the usage Backstop asked for is not passed on"
    );

    // Both requests' spans: 1 SERVER and 3 CLIENT each.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let spans = loop {
        let spans = receiver.spans();
        if spans.len() >= 8 {
            break spans;
        }
        assert!(tokio::time::Instant::now() < deadline, "only {} spans arrived", spans.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let servers: Vec<&Span> = spans.iter().filter(|s| s.kind == 2).collect();
    assert_eq!(servers.len(), 2);
    let server = servers.iter().find(|s| hex(&s.trace_id) == app_trace).expect("the app's trace is continued");
    assert_eq!(hex(&server.parent_span_id), "00f067aa0ba902b7");
    assert_eq!(server.name, "chat chat");
    let attrs = attributes(&server.attributes);
    assert_eq!(attrs["backstop.route"], "chat");
    assert_eq!(attrs["backstop.target"], "steady/steady-model");
    assert_eq!(attrs["backstop.attempts"], "3");
    assert_eq!(attrs["backstop.outcome"], "fell_through");
    assert_eq!(attrs["backstop.fallback_reason"], "flaky/up-a=serverError, busy/up-b=overloaded");
    assert_eq!(attrs["gen_ai.provider.name"], "backstop.mock");
    // The app's own parameters, as the GenAI conventions name them.
    assert_eq!(
        (attrs["gen_ai.request.max_tokens"].as_str(), attrs["gen_ai.request.temperature"].as_str()),
        ("64", "0.2")
    );
    assert_eq!(attrs["gen_ai.request.stream"], "false");
    assert!(!attrs.contains_key("gen_ai.request.top_p"), "a parameter the app did not set is not made up");
    let events: Vec<(String, BTreeMap<String, String>)> =
        server.events.iter().map(|e| (e.name.clone(), attributes(&e.attributes))).collect();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].0, "backstop.fallback");
    assert_eq!(
        (
            events[0].1["backstop.fallback.from"].as_str(),
            events[0].1["backstop.fallback.to"].as_str(),
            events[0].1["backstop.fallback.reason"].as_str()
        ),
        ("flaky/up-a", "busy/up-b", "serverError")
    );
    assert_eq!(
        (
            events[1].1["backstop.fallback.from"].as_str(),
            events[1].1["backstop.fallback.to"].as_str(),
            events[1].1["backstop.fallback.reason"].as_str()
        ),
        ("busy/up-b", "steady/steady-model", "overloaded")
    );

    let clients: Vec<&Span> = spans.iter().filter(|s| s.kind == 3 && s.trace_id == server.trace_id).collect();
    assert_eq!(clients.len(), 3);
    for client in &clients {
        assert_eq!(client.parent_span_id, server.span_id, "attempts are children of the request");
    }
    let by_target = |label: &str| {
        let span = clients.iter().find(|s| attributes(&s.attributes)["backstop.target"] == label).expect(label);
        (*span, attributes(&span.attributes))
    };
    let (flaky_span, a) = by_target("flaky/up-a");
    assert_eq!(flaky_span.name, "chat up-a");
    assert_eq!(a["gen_ai.provider.name"], "openai");
    assert_eq!(a["gen_ai.request.model"], "up-a");
    assert_eq!(a["error.type"], "serverError");
    assert_eq!(a["backstop.outcome"], "failed");
    assert_eq!(a["backstop.attempt"], "1");
    assert_eq!(a["http.response.status_code"], "500");
    assert_eq!(
        (a["server.address"].as_str(), a["server.port"].as_str()),
        ("127.0.0.1", flaky.addr.port().to_string().as_str())
    );
    // The span id each attempt sent upstream is its own.
    let sent = flaky.received()[0].headers.get("traceparent").and_then(|v| v.to_str().ok()).map(str::to_string);
    assert_eq!(sent, Some(format!("00-{app_trace}-{}-01", hex(&flaky_span.span_id))));
    let (_, b) = by_target("busy/up-b");
    assert_eq!((b["error.type"].as_str(), b["backstop.attempt"].as_str()), ("overloaded", "2"));
    let (answering, c) = by_target("steady/steady-model");
    assert_eq!(answering.name, "chat steady-model");
    assert_eq!(c["backstop.outcome"], "answered");
    assert!(!c.contains_key("error.type"));
    assert_eq!(c["gen_ai.response.model"], "steady-model");
    assert!(c["gen_ai.response.id"].starts_with("chatcmpl-"), "{c:?}");
    assert_eq!(c["gen_ai.response.finish_reasons"], "stop");
    let (input, output): (f64, f64) =
        (c["gen_ai.usage.input_tokens"].parse().expect("n"), c["gen_ai.usage.output_tokens"].parse().expect("n"));
    assert!(input > 0.0 && output > 0.0, "{c:?}");
    let cost: f64 = c["backstop.cost"].parse().expect("cost");
    assert!((cost - (input * 2.5 + output * 10.0) / 1e6).abs() < 1e-12, "{cost}");
    assert_eq!(attrs["backstop.cost"], c["backstop.cost"], "the request's total");

    // The streamed request: its answering span has the time to its first chunk, and ends with
    // the stream.
    let stream_server = servers.iter().find(|s| s.trace_id != server.trace_id).expect("the stream's request");
    let stream_answer = spans
        .iter()
        .find(|s| {
            s.trace_id == stream_server.trace_id
                && attributes(&s.attributes).get("backstop.outcome").map(String::as_str) == Some("answered")
                && s.kind == 3
        })
        .expect("the answering attempt");
    let sa = attributes(&stream_answer.attributes);
    assert!(sa.contains_key("gen_ai.response.time_to_first_chunk"), "{sa:?}");
    assert_eq!(sa["gen_ai.request.stream"], "true");
    assert!(sa["gen_ai.usage.output_tokens"].parse::<u64>().expect("tokens") > 0, "usage gathered from the stream");
    assert!(stream_answer.end_time_unix_nano >= stream_answer.start_time_unix_nano);

    // Metrics, credited per attempt to the target that made it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let metrics: Vec<_> = receiver
            .bodies("/v1/metrics")
            .iter()
            .map(|b| ExportMetricsServiceRequest::decode(b.as_ref()).expect("metrics"))
            .collect();
        let names: Vec<String> = metrics
            .iter()
            .flat_map(|m| &m.resource_metrics)
            .flat_map(|r| &r.scope_metrics)
            .flat_map(|s| &s.metrics)
            .map(|m| m.name.clone())
            .collect();
        if names.iter().any(|n| n == "backstop.fallbacks")
            && names.iter().any(|n| n == "gen_ai.client.operation.duration")
        {
            break metrics;
        }
        assert!(tokio::time::Instant::now() < deadline, "metrics never arrived: {names:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let resource = attributes(&metrics[0].resource_metrics[0].resource.clone().expect("resource").attributes);
    assert_eq!(resource["service.name"], "support-bot-sidecar");
    assert_eq!(resource["deployment.environment"], "test");
    let prometheus = get(&format!("http://{admin}/metrics")).await;
    let text = String::from_utf8_lossy(&prometheus.body).into_owned();
    for expected in [
        "backstop_fallbacks_total{backstop_fallback_from=\"flaky/up-a\",backstop_fallback_reason=\"serverError\",backstop_fallback_to=\"busy/up-b\",backstop_route=\"chat\"",
        "gen_ai_client_operation_duration_seconds_count{backstop_route=\"chat\",backstop_target=\"flaky/up-a\",error_type=\"serverError\"",
        "gen_ai_client_token_usage",
        "backstop_requests_total{backstop_outcome=\"fell_through\",backstop_route=\"chat\"",
        "backstop_breaker_state{backstop_target=\"flaky/up-a\"",
        "backstop_retry_budget_available{backstop_route=\"chat\"",
        "backstop_cost_total{backstop_route=\"chat\",backstop_target=\"steady/steady-model\"",
    ] {
        assert!(text.contains(expected), "{expected} missing from /metrics:\n{text}");
    }

    // One log record per fall-through, in the request's trace.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let records = loop {
        let records = receiver.log_records();
        if records.len() >= 4 {
            break records;
        }
        assert!(tokio::time::Instant::now() < deadline, "only {} log records arrived", records.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let in_trace: Vec<_> = records.iter().filter(|r| hex(&r.trace_id) == app_trace).collect();
    assert_eq!(in_trace.len(), 2);
    assert_eq!(attributes(&in_trace[0].attributes)["backstop.fallback.reason"], "serverError");

    // No key, no prompt, no answer text anywhere.
    let everything = receiver.everything();
    for secret in ["sk-trace-SECRET-1", "sk-trace-SECRET-2", "PROMPT-CANARY-5d1e", "Refunds within 30 days"] {
        assert!(!everything.windows(secret.len()).any(|w| w == secret.as_bytes()), "{secret} reached the collector");
    }

    // A trace the app chose not to sample leaves no span, and its request is counted all the
    // same; a sampled one sent after it is exported (spans leave in order).
    let fell_through = |text: &str| {
        prometheus_sample(text, "backstop_requests_total{backstop_outcome=\"fell_through\",backstop_route=\"chat\"")
    };
    let before = fell_through(&text);
    let (unsampled, sampled) = ("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb");
    for (trace, flags) in [(unsampled, "00"), (sampled, "01")] {
        let traceparent = format!("00-{trace}-00f067aa0ba902b7-{flags}");
        assert_eq!(post_raw(&url, body.to_string(), &[("traceparent", &traceparent)]).await.status, 200);
    }
    let text = String::from_utf8_lossy(&get(&format!("http://{admin}/metrics")).await.body).into_owned();
    assert_eq!(fell_through(&text), before + 2.0, "{text}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !receiver.spans().iter().any(|s| hex(&s.trace_id) == sampled) {
        assert!(tokio::time::Instant::now() < deadline, "the sampled request's spans never arrived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!receiver.spans().iter().any(|s| hex(&s.trace_id) == unsampled), "an unsampled trace was exported");
}

/// A collector that refuses connections must not slow the app's calls: the exporter's retries
/// wait on the runtime's timer, never by blocking the thread that serves requests (the sidecar
/// runs one by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_refuses_connections_never_stalls_a_request() {
    let refused = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr")
    };
    let upstream = Upstream::start(Fault::Ok).await;
    let (_dir, policy) = policy_file(format!(
        "apiVersion: backstop.dev/v1alpha1\nkind: FallbackPolicy\nmetadata: {{name: refused, namespace: tests}}\nspec:\n  providers:\n    - {{name: up, type: openai-compatible, baseUrl: \"{}\"}}\n  routes:\n    - {{model: chat, chain: [{{provider: up, model: m}}]}}\n",
        upstream.base_url()
    ));
    // The listener is gone: every export attempt is refused at once, and retried.
    let (_child, llm, _) = start_sidecar(&policy, refused).await;
    let url = format!("http://{llm}/v1/chat/completions");
    let body = json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}).to_string();
    let started = tokio::time::Instant::now();
    let mut slowest = Duration::ZERO;
    let mut sent = 0;
    // Spans leave in batches after at most half a second; three seconds see several exports
    // fail and be retried.
    while started.elapsed() < Duration::from_secs(3) {
        let sent_at = tokio::time::Instant::now();
        let answer =
            post_raw(&url, body.clone(), &[("traceparent", "00-7ef92f3577b34da6a3ce929d0e0e4739-00f067aa0ba902b7-01")])
                .await;
        assert_eq!(answer.status, 200);
        slowest = slowest.max(sent_at.elapsed());
        sent += 1;
    }
    assert!(
        slowest < Duration::from_millis(100),
        "a request took {slowest:?} while the collector refused exports ({sent} sent): the export's retry blocked the runtime"
    );
}

/// A collector that is down is told once, not once per batch: one warning line, `/health`
/// and `backstop_telemetry_export_failing` say the exports fail and the dropped count grows;
/// when the collector comes back on its address, one line says so and spans arrive again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_is_said_once_shown_in_health_and_recovered_from() {
    let down = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr")
    };
    let (_dir, policy) = policy_file(
        "apiVersion: backstop.dev/v1alpha1\nkind: FallbackPolicy\nmetadata: {name: down, namespace: tests}\nspec:\n  providers:\n    - {name: fake, type: mock}\n  routes:\n    - {model: chat, chain: [{provider: fake, model: m}]}\n",
    );
    let (_child, llm, admin, lines) = start_sidecar_logged(&policy, down).await;
    let url = format!("http://{llm}/v1/chat/completions");
    let body = json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}).to_string();
    let traced = [("traceparent", "00-5ef92f3577b34da6a3ce929d0e0e4739-00f067aa0ba902b7-01")];
    let health =
        || async { serde_json::from_slice::<Value>(&get(&format!("http://{admin}/health")).await.body).expect("json") };
    let dropped = |health: &Value| health["telemetry"]["otlp"]["spans"]["dropped"].as_u64().expect("spans dropped");

    // Requests keep coming while export after export fails: the dropped count grows at least
    // three times (three failed batches).
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen.len() < 3 {
        assert!(tokio::time::Instant::now() < deadline, "exports never failed three times: {seen:?}");
        assert_eq!(post_raw(&url, body.clone(), &traced).await.status, 200);
        let now = dropped(&health().await);
        if now > seen.last().copied().unwrap_or(0) {
            seen.push(now);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let shown = health().await;
    assert_eq!(shown["telemetry"]["otlp"]["spans"]["failing"], true, "{shown}");
    assert_eq!(shown["telemetry"]["otlp"]["logs"]["failing"], false, "no log record was sent yet: {shown}");
    let text = String::from_utf8_lossy(&get(&format!("http://{admin}/metrics")).await.body).into_owned();
    assert_eq!(prometheus_sample(&text, "backstop_telemetry_export_failing{signal=\"spans\""), 1.0, "{text}");
    assert!(prometheus_sample(&text, "backstop_telemetry_dropped_total{signal=\"spans\"") >= seen[2] as f64, "{text}");
    // Metrics export every 300 ms here, and fail as often: one line each all the same.
    let said = |lines: &Lines, what: &str, signal: &str| {
        let signal = format!("\"signal\":\"{signal}\"");
        lines
            .lock()
            .expect("lock")
            .iter()
            .filter(|l| l.contains(what) && l.contains(&signal))
            .cloned()
            .collect::<Vec<_>>()
    };
    let outage = "cannot export telemetry over OTLP";
    assert!(prometheus_sample(&text, "backstop_telemetry_dropped_total{signal=\"metrics\"") >= 2.0, "{text}");
    assert_eq!(said(&lines, outage, "metrics").len(), 1, "{:?}", lines.lock().expect("lock"));
    let said = said(&lines, outage, "spans");
    assert_eq!(said.len(), 1, "one line for the outage, not one per batch: {said:?}");
    let line: Value = serde_json::from_str(&said[0]).expect("a JSON log line");
    assert_eq!((line["level"].as_str(), line["signal"].as_str()), (Some("WARN"), Some("spans")), "{line}");
    assert!(line["error"].as_str().is_some_and(|e| !e.is_empty()), "the line names the error: {line}");

    // The collector comes back on the same address: the next batch goes through, one line says
    // so, and `/health` stops saying the exports fail.
    let receiver = Receiver::start_on(down).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while receiver.spans().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no span reached the collector after it came back");
        assert_eq!(post_raw(&url, body.clone(), &traced).await.status, 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while health().await["telemetry"]["otlp"]["spans"]["failing"] != false {
        assert!(tokio::time::Instant::now() < deadline, "/health still says the exports fail");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let said = |what: &str| {
        let lines = lines.lock().expect("lock");
        lines.iter().filter(|l| l.contains(what) && l.contains("\"signal\":\"spans\"")).count()
    };
    assert_eq!(said("exporting telemetry over OTLP again"), 1, "{:?}", lines.lock().expect("lock"));
    assert_eq!(said(outage), 1, "the recovery is no new outage");
}

/// The `backstop.requests` sums every metric export carried, with their temporality.
fn request_sums(receiver: &Receiver) -> Vec<(i32, f64)> {
    use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
    receiver
        .bodies("/v1/metrics")
        .iter()
        .map(|b| ExportMetricsServiceRequest::decode(b.as_ref()).expect("metrics"))
        .flat_map(|m| m.resource_metrics)
        .flat_map(|r| r.scope_metrics)
        .flat_map(|s| s.metrics)
        .filter(|m| m.name == "backstop.requests")
        .filter_map(|m| match m.data {
            Some(metric::Data::Sum(sum)) => Some((
                sum.aggregation_temporality,
                sum.data_points
                    .iter()
                    .map(|p| match p.value {
                        Some(number_data_point::Value::AsInt(i)) => i as f64,
                        Some(number_data_point::Value::AsDouble(d)) => d,
                        None => 0.0,
                    })
                    .sum(),
            )),
            _ => None,
        })
        .collect()
}

/// Metrics leave over OTLP as the cumulative sums `/metrics` serves (one aggregation), and as
/// deltas when the standard variable asks for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_pushed_as_the_prometheus_sums_or_as_deltas_when_asked() {
    let (_dir, policy) = policy_file(
        "apiVersion: backstop.dev/v1alpha1\nkind: FallbackPolicy\nmetadata: {name: sums, namespace: tests}\nspec:\n  providers:\n    - {name: fake, type: mock}\n  routes:\n    - {model: chat, chain: [{provider: fake, model: m}]}\n",
    );
    let body = json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}).to_string();
    // Cumulative (2) by default; delta (1) when asked.
    for (preference, temporality) in [(None, 2), (Some("delta"), 1)] {
        let receiver = Receiver::start().await;
        let env: Vec<(&str, &str)> =
            preference.map(|p| ("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", p)).into_iter().collect();
        let (_child, llm, admin, _) = start_sidecar_with(&policy, receiver.addr, &env).await;
        for _ in 0..3 {
            assert_eq!(post_raw(&format!("http://{llm}/v1/chat/completions"), body.clone(), &[]).await.status, 200);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        let sums = loop {
            let sums = request_sums(&receiver);
            let total =
                if temporality == 2 { sums.last().map_or(0.0, |s| s.1) } else { sums.iter().map(|s| s.1).sum() };
            if total >= 3.0 {
                break sums;
            }
            assert!(tokio::time::Instant::now() < deadline, "3 requests never summed up: {sums:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(sums.iter().all(|(t, _)| *t == temporality), "{preference:?}: {sums:?}");
        let text = String::from_utf8_lossy(&get(&format!("http://{admin}/metrics")).await.body).into_owned();
        let served = prometheus_sample(&text, "backstop_requests_total{backstop_outcome=\"answered\"");
        assert_eq!(served, 3.0, "{text}");
        if temporality == 2 {
            assert_eq!(sums.last().map(|s| s.1), Some(served), "the push carries the sums /metrics serves");
        } else {
            assert_eq!(sums.iter().map(|s| s.1).sum::<f64>(), served, "the deltas add up to the sum: {sums:?}");
        }
    }
}

/// A chain that runs out with targets passed over for different reasons: each is exported
/// under its own reason, as an event of the request's span and as a fallback metric.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_chain_names_each_passed_over_target_s_own_reason() {
    let receiver = Receiver::start().await;
    let failing = Upstream::start(Fault::status(500)).await;
    let (_dir, policy) = policy_file(format!(
        r#"apiVersion: backstop.dev/v1alpha1
kind: FallbackPolicy
metadata: {{name: passed-over, namespace: tests}}
spec:
  providers:
    - {{name: drained, type: mock}}
    - {{name: drilled, type: mock}}
    - {{name: failing, type: openai-compatible, baseUrl: "{}"}}
  routes:
    - model: chat
      chain: [{{provider: drained, model: m}}, {{provider: drilled, model: m}}, {{provider: failing, model: up}}]
  retry: {{attempts: 1}}
  overrides:
    - {{target: drained/m, state: ForcedOpen, reason: maintenance}}
  allowRequestOverrides: [drill]
"#,
        failing.base_url(),
    ));
    let (_child, llm, admin) = start_sidecar(&policy, receiver.addr).await;
    let app_trace = "6df92f3577b34da6a3ce929d0e0e4738";
    let body = json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}]});
    let answer = post_raw(
        &format!("http://{llm}/v1/chat/completions"),
        body.to_string(),
        &[("traceparent", &format!("00-{app_trace}-00f067aa0ba902b7-01")), ("x-backstop-drill", "drilled")],
    )
    .await;
    assert_eq!(answer.status, 502, "{}", answer.text());

    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let server = loop {
        let found = receiver.spans().into_iter().find(|s| hex(&s.trace_id) == app_trace && s.kind == 2);
        if let Some(server) = found {
            break server;
        }
        assert!(tokio::time::Instant::now() < deadline, "the request's span never arrived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let events: Vec<(String, BTreeMap<String, String>)> =
        server.events.iter().map(|e| (e.name.clone(), attributes(&e.attributes))).collect();
    let named = |name: &str, target_key: &str, reason_key: &str| -> Vec<(String, String)> {
        events.iter().filter(|(n, _)| n == name).map(|(_, a)| (a[target_key].clone(), a[reason_key].clone())).collect()
    };
    assert_eq!(
        named("backstop.skipped", "backstop.target", "backstop.skip.reason"),
        [("drained/m".to_string(), "forcedOpen".to_string()), ("drilled/m".to_string(), "drill".to_string())],
        "{events:?}"
    );
    assert_eq!(
        named("backstop.fallback", "backstop.fallback.from", "backstop.fallback.reason"),
        [],
        "the last target's failure is the request's error, not a fall-through: {events:?}"
    );
    let attrs = attributes(&server.attributes);
    assert_eq!(
        (attrs["backstop.outcome"].as_str(), attrs["error.type"].as_str(), attrs["backstop.attempts"].as_str()),
        ("failed", "all_targets_failed", "1")
    );
    assert_eq!(attrs["backstop.fallback_reason"], "drained/m=forcedOpen, drilled/m=drill");

    let text = String::from_utf8_lossy(&get(&format!("http://{admin}/metrics")).await.body).into_owned();
    for (from, reason) in [("drained/m", "forcedOpen"), ("drilled/m", "drill")] {
        let series = format!(
            "backstop_fallbacks_total{{backstop_fallback_from=\"{from}\",backstop_fallback_reason=\"{reason}\","
        );
        assert_eq!(prometheus_sample(&text, &series), 1.0, "{series} in:\n{text}");
    }
    assert!(!text.contains("backstop_fallback_reason=\"circuitOpen\""), "no breaker opened:\n{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_charts_is_one_the_sidecar_exports() {
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../../deploy/grafana/backstop.json")).expect("the dashboard is JSON");
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_string))
        .collect();
    assert!(exprs.len() >= 12, "{exprs:?}");
    let mut names: Vec<String> = exprs
        .iter()
        .flat_map(|e| {
            e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).map(str::to_string).collect::<Vec<_>>()
        })
        .filter(|w| w.starts_with("backstop_") || w.starts_with("gen_ai_client"))
        .filter(|w| {
            !w.ends_with("_route")
                && !w.ends_with("_target")
                && !w.ends_with("_reason")
                && !w.ends_with("_state")
                && !w.ends_with("_outcome")
                && !w.ends_with("_type")
                && !w.ends_with("_drill")
        })
        .collect();
    names.sort();
    names.dedup();
    // A sidecar whose primary is rate limited (its breaker opens) and whose fallback is priced,
    // asked streamed and not.
    let receiver = Receiver::start().await;
    let quickstart = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/examples/quickstart.yaml"))
        .expect("quickstart");
    let priced = quickstart.replace(
        "{provider: fallback, model: claude-sonnet-4-5}",
        "{provider: fallback, model: claude-sonnet-4-5, price: {input: 3, output: 15}}",
    );
    assert_ne!(priced, quickstart, "the quickstart's fallback step is priced");
    let (_dir, policy) = policy_file(priced);
    let (_child, llm, admin) = start_sidecar(&policy, receiver.addr).await;
    let url = format!("http://{llm}/v1/chat/completions");
    assert_eq!(post(&url, &chat(false)).await.status, 200);
    assert!(post_stream(&url, &chat(true)).await.done());
    let text = String::from_utf8_lossy(&get(&format!("http://{admin}/metrics")).await.body).into_owned();
    for name in &names {
        assert!(text.contains(name.as_str()), "the dashboard charts {name}, which /metrics does not have:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_comparison_reaches_the_collector_with_both_answers_facts() {
    let receiver = Receiver::start().await;
    let primary = Upstream::start(Fault::Ok).await;
    let shadow = Upstream::speaking(Wire::Anthropic, vec![], Fault::Ok).await;
    let shadow_of = |capture: bool| {
        format!(
            "{{provider: claude, model: claude-shadow, percent: 100, price: {{input: 3, output: 15}}, captureContent: {capture}}}"
        )
    };
    let (_dir, policy) = policy_file(format!(
        r#"apiVersion: backstop.dev/v1alpha1
kind: FallbackPolicy
metadata: {{name: shadowed, namespace: tests}}
spec:
  providers:
    - {{name: primary, type: openai-compatible, baseUrl: "{}"}}
    - {{name: claude, type: anthropic, baseUrl: "http://{}", apiKey: {{value: sk-ant-shadow-SECRET}}}}
  routes:
    - model: chat
      chain: [{{provider: primary, model: up-model, price: {{input: 1, output: 2}}}}]
      shadow: {}
    - model: captured
      chain: [{{provider: primary, model: up-model}}, {{provider: claude, model: claude-backup}}]
      shadow: {}
  allowRequestOverrides: [drill]
"#,
        primary.base_url(),
        shadow.addr,
        shadow_of(false),
        shadow_of(true),
    ));
    let (_child, llm, admin) = start_sidecar(&policy, receiver.addr).await;
    let url = format!("http://{llm}/v1/chat/completions");
    let app_trace = "5cf92f3577b34da6a3ce929d0e0e4737";
    let body = json!({"model": "chat", "messages": [{"role": "user", "content": PROMPT}]});
    let answer =
        post_raw(&url, body.to_string(), &[("traceparent", &format!("00-{app_trace}-00f067aa0ba902b7-01"))]).await;
    assert_eq!((answer.status, answer.text().as_str()), (200, "from upstream"));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let (server, comparison) = loop {
        let spans = receiver.spans();
        let in_trace: Vec<Span> = spans.into_iter().filter(|s| hex(&s.trace_id) == app_trace).collect();
        let server = in_trace.iter().find(|s| s.kind == 2).cloned();
        let comparison = in_trace.iter().find(|s| s.name == "shadow claude-shadow").cloned();
        if let (Some(server), Some(comparison)) = (server, comparison) {
            break (server, comparison);
        }
        assert!(tokio::time::Instant::now() < deadline, "the shadow's span never arrived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(comparison.parent_span_id, server.span_id, "the comparison is part of the request's trace");
    let sent = shadow.received()[0].headers.get("traceparent").and_then(|v| v.to_str().ok()).map(str::to_string);
    assert_eq!(sent, Some(format!("00-{app_trace}-{}-01", hex(&comparison.span_id))));
    let a = attributes(&comparison.attributes);
    let expected = [
        ("backstop.route", "chat"),
        ("backstop.shadow.primary.target", "primary/up-model"),
        ("backstop.shadow.primary.model", "up-model"),
        ("backstop.shadow.primary.finish_reason", "stop"),
        ("backstop.shadow.primary.chars", "13"),
        ("backstop.shadow.target", "claude/claude-shadow"),
        ("backstop.shadow.model", "claude-up"),
        ("backstop.shadow.finish_reason", "end_turn"),
        ("backstop.shadow.input_tokens", "11"),
        ("backstop.shadow.output_tokens", "3"),
        ("backstop.shadow.chars", "14"),
    ];
    for (key, value) in expected {
        assert_eq!(a.get(key).map(String::as_str), Some(value), "{key} in {a:?}");
    }
    let number = |key: &str| a.get(key).and_then(|v| v.parse::<f64>().ok()).unwrap_or_else(|| panic!("{key} in {a:?}"));
    assert!((number("backstop.shadow.length_ratio") - 14.0 / 13.0).abs() < 1e-9);
    assert!((number("backstop.shadow.cost") - (11.0 * 3.0 + 3.0 * 15.0) / 1e6).abs() < 1e-12);
    assert!(number("backstop.shadow.primary.cost") > 0.0);
    assert!(number("backstop.shadow.latency") > 0.0 && number("backstop.shadow.primary.latency") > 0.0);
    assert!(number("backstop.shadow.latency_ratio") > 0.0);
    assert!(!a.contains_key("backstop.shadow.exact_match"), "prose is compared by length, not for a match");
    assert!(!a.contains_key("backstop.shadow.prompt") && !a.contains_key("backstop.shadow.text"), "no capture: {a:?}");

    // The same comparison as a log record, in the trace, and as metrics.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let records: Vec<_> = receiver
            .log_records()
            .into_iter()
            .filter(|r| {
                r.body.as_ref().and_then(|b| b.value.clone())
                    == Some(any_value::Value::StringValue("shadow comparison".into()))
            })
            .collect();
        if let Some(record) = records.first() {
            assert_eq!(hex(&record.trace_id), app_trace);
            assert_eq!(
                attributes(&record.attributes)["backstop.shadow.length_ratio"],
                a["backstop.shadow.length_ratio"]
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no shadow comparison log record");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = String::from_utf8_lossy(&get(&format!("http://{admin}/metrics")).await.body).into_owned();
    assert!(
        text.contains("backstop_shadow_requests_total{backstop_route=\"chat\",backstop_shadow_outcome=\"compared\""),
        "{text}"
    );
    assert!(
        text.contains(
            "backstop_shadow_cost_total{backstop_route=\"chat\",backstop_shadow_target=\"claude/claude-shadow\""
        ),
        "{text}"
    );

    // Content is recorded only where the policy says so.
    let everything = receiver.everything();
    assert!(!everything.windows(PROMPT.len()).any(|w| w == PROMPT.as_bytes()), "the prompt left without consent");
    assert!(!everything.windows(17).any(|w| w == b"sk-ant-shadow-SEC"), "a key reached the collector");
    let captured = json!({"model": "captured", "messages": [{"role": "user", "content": PROMPT}]});
    assert_eq!(post(&url, &captured).await.status, 200);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let shown = loop {
        let found = receiver
            .spans()
            .into_iter()
            .find(|s| s.name == "shadow claude-shadow" && attributes(&s.attributes)["backstop.route"] == "captured");
        if let Some(span) = found {
            break attributes(&span.attributes);
        }
        assert!(tokio::time::Instant::now() < deadline, "the captured comparison never arrived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(shown["backstop.shadow.prompt"], PROMPT);
    assert_eq!(
        (shown["backstop.shadow.primary.text"].as_str(), shown["backstop.shadow.text"].as_str()),
        ("from upstream", "from anthropic")
    );

    // A drill is never shadowed, and its request span says it was a drill.
    let before = shadow.count();
    let drill_trace = "6df92f3577b34da6a3ce929d0e0e4738";
    let drill = post_raw(
        &url,
        captured.to_string(),
        &[("x-backstop-drill", "primary"), ("traceparent", &format!("00-{drill_trace}-00f067aa0ba902b7-01"))],
    )
    .await;
    assert_eq!((drill.status, drill.header("x-backstop-drill")), (200, Some("true")));
    assert_eq!(drill.header("x-backstop-model"), Some("claude-backup"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let drilled = loop {
        let found = receiver.spans().into_iter().find(|s| hex(&s.trace_id) == drill_trace && s.kind == 2);
        if let Some(span) = found {
            break attributes(&span.attributes);
        }
        assert!(tokio::time::Instant::now() < deadline, "the drill's span never arrived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        (drilled["backstop.drill"].as_str(), drilled["backstop.fallback_reason"].as_str()),
        ("true", "primary/up-model=drill")
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let models: Vec<Value> = shadow.received()[before..].iter().map(|r| r.body["model"].clone()).collect();
    assert_eq!(models, [json!("claude-backup")], "the drill's own attempt, and no shadow of it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_continued_after_a_cut_shows_its_seam_and_both_attempts() {
    let receiver = Receiver::start().await;
    let reply = "The quick brown fox jumps";
    let (_dir, policy) = policy_file(format!(
        r#"apiVersion: backstop.dev/v1alpha1
kind: FallbackPolicy
metadata: {{name: resumed, namespace: tests}}
spec:
  providers:
    - {{name: cut, type: mock, mock: {{reply: "{reply}", chunks: 5, streamCutAfter: 2}}}}
    - {{name: whole, type: mock, mock: {{reply: "{reply}", chunks: 3}}}}
  routes:
    - model: chat
      midStream: continue
      chain:
        - {{provider: cut, model: m, price: {{input: 1, output: 1}}}}
        - {{provider: whole, model: m, price: {{input: 1, output: 1}}}}
"#
    ));
    let (_child, llm, admin) = start_sidecar(&policy, receiver.addr).await;
    let app_trace = "7cf92f3577b34da6a3ce929d0e0e4739";
    let body = json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}], "stream": true});
    let stream = crate::support::post_stream_with(
        &format!("http://{llm}/v1/chat/completions"),
        &body,
        &[("traceparent", &format!("00-{app_trace}-00f067aa0ba902b7-01"))],
    )
    .await;
    assert!(stream.broken.is_none() && stream.done(), "{}", stream.raw);
    assert_eq!(stream.text(), reply);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let spans = loop {
        let spans: Vec<Span> = receiver.spans().into_iter().filter(|s| hex(&s.trace_id) == app_trace).collect();
        if spans.len() >= 3 {
            break spans;
        }
        assert!(tokio::time::Instant::now() < deadline, "only {} spans arrived", spans.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let server = spans.iter().find(|s| s.kind == 2).expect("a SERVER span");
    let seam = server.events.iter().find(|e| e.name == "backstop.stream_resumed").expect("the seam's event");
    let seam = attributes(&seam.attributes);
    assert_eq!(
        (
            seam["backstop.resume.from"].as_str(),
            seam["backstop.resume.to"].as_str(),
            seam["backstop.resume.reason"].as_str(),
            seam["backstop.resume.chars"].as_str(),
        ),
        ("cut/m", "whole/m", "serverError", "10"),
        "{seam:?}"
    );
    let server_attrs = attributes(&server.attributes);
    assert_eq!(server_attrs["backstop.outcome"], "fell_through");
    assert_eq!(server_attrs["backstop.target"], "whole/m");
    let clients: BTreeMap<String, BTreeMap<String, String>> = spans
        .iter()
        .filter(|s| s.kind == 3)
        .map(|s| attributes(&s.attributes))
        .map(|a| (a["backstop.target"].clone(), a))
        .collect();
    assert_eq!(clients["cut/m"]["backstop.outcome"], "broke");
    assert_eq!(clients["cut/m"]["error.type"], "serverError");
    assert_eq!(clients["whole/m"]["backstop.outcome"], "answered");
    assert!(clients["whole/m"].contains_key("backstop.cost"), "{:?}", clients["whole/m"]);

    let text = String::from_utf8_lossy(&get(&format!("http://{admin}/metrics")).await.body).into_owned();
    let series = "backstop_stream_resumes_total{backstop_resume_from=\"cut/m\",backstop_resume_to=\"whole/m\",";
    assert_eq!(prometheus_sample(&text, series), 1.0, "{series} in:\n{text}");
}

/// A sidecar told to stop exports what it still holds before it exits: the metrics since its
/// last push (an hour away) and the spans still lingering for their batch, both temporalities.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_sidecar_exports_its_last_metrics_and_spans_before_it_exits() {
    let (_dir, policy) = policy_file(
        "apiVersion: backstop.dev/v1alpha1\nkind: FallbackPolicy\nmetadata: {name: last, namespace: tests}\nspec:\n  providers:\n    - {name: fake, type: mock}\n  routes:\n    - {model: chat, chain: [{provider: fake, model: m}]}\n",
    );
    let body = json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}).to_string();
    for preference in ["cumulative", "delta"] {
        let receiver = Receiver::start().await;
        let env = [
            ("OTEL_METRIC_EXPORT_INTERVAL", "3600000"),
            ("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", preference),
        ];
        let (mut child, llm, _, lines) = start_sidecar_with(&policy, receiver.addr, &env).await;
        let app_trace = "8af92f3577b34da6a3ce929d0e0e4730";
        let traceparent = format!("00-{app_trace}-00f067aa0ba902b7-01");
        for _ in 0..2 {
            let answer =
                post_raw(&format!("http://{llm}/v1/chat/completions"), body.clone(), &[("traceparent", &traceparent)])
                    .await;
            assert_eq!(answer.status, 200);
        }
        assert!(request_sums(&receiver).is_empty(), "{preference}: nothing pushed yet, an hour before the first push");
        let pid = child.id().expect("pid");
        let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        let status = tokio::time::timeout(Duration::from_secs(15), child.wait()).await.expect("exits").expect("wait");
        assert!(status.success(), "{preference}: {status:?}\n{}", lines.lock().expect("lock").join("\n"));
        let sums = request_sums(&receiver);
        assert_eq!(
            sums.iter().map(|s| s.1).sum::<f64>(),
            2.0,
            "{preference}: the last metrics were pushed on the way out: {sums:?}"
        );
        let servers = receiver.spans().into_iter().filter(|s| hex(&s.trace_id) == app_trace && s.kind == 2).count();
        assert_eq!(servers, 2, "{preference}: both requests' spans were exported on the way out");
    }
}
