//! End to end with a real OpenTelemetry backend: Jaeger (built from the Go module proxy by
//! `tests/tools/build jaeger`, in-memory storage, on 127.0.0.1) receives the sidecar's OTLP
//! export, and the fallback trace is read back through Jaeger's query API, as its UI reads it.

use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_backstop");

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// The Jaeger binary, or `None` (with why) where there is none; in CI there must be one.
fn jaeger() -> Option<PathBuf> {
    match std::env::var_os("BACKSTOP_JAEGER") {
        Some(path) => Some(path.into()),
        None => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI runs the Jaeger test: set BACKSTOP_JAEGER (tests/tools/build jaeger)"
            );
            eprintln!(
                "no Jaeger for the end-to-end trace test: set BACKSTOP_JAEGER (tests/tools/build jaeger); it passes without running"
            );
            None
        }
    }
}

/// Jaeger's configuration: OTLP/HTTP in, traces kept in memory, the query API out.
fn config(otlp: u16, query: u16, query_grpc: u16) -> String {
    format!(
        r#"service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: warn
extensions:
  jaeger_query:
    storage:
      traces: memstore
    http:
      endpoint: 127.0.0.1:{query}
    grpc:
      endpoint: 127.0.0.1:{query_grpc}
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 10000
receivers:
  otlp:
    protocols:
      http:
        endpoint: 127.0.0.1:{otlp}
processors:
  batch:
    timeout: 100ms
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
"#
    )
}

fn tag<'a>(tags: &'a Value, key: &str) -> Option<&'a Value> {
    tags.as_array()?.iter().find(|t| t["key"] == key).map(|t| &t["value"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jaeger_shows_the_fallback_trace_with_every_attempt() {
    let Some(jaeger) = jaeger() else { return };
    let dir = tempfile::tempdir().expect("dir");
    let (otlp, query, query_grpc) = (free_port(), free_port(), free_port());
    std::fs::write(dir.path().join("jaeger.yaml"), config(otlp, query, query_grpc)).expect("config");
    let _jaeger = tokio::process::Command::new(&jaeger)
        .arg(format!("--config=file:{}", dir.path().join("jaeger.yaml").display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("jaeger.log")).expect("log"))
        .kill_on_drop(true)
        .spawn()
        .expect("start jaeger");
    let api = format!("http://127.0.0.1:{query}/api");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let listening = tokio::net::TcpStream::connect(("127.0.0.1", query)).await.is_ok()
            && tokio::net::TcpStream::connect(("127.0.0.1", otlp)).await.is_ok();
        if listening && get(&format!("{api}/services")).await.status == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "Jaeger did not start: {}",
            std::fs::read_to_string(dir.path().join("jaeger.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The sidecar, its primary failing, exporting to Jaeger.
    let primary = Upstream::start(Fault::status(500)).await;
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, two_target_policy(&primary.base_url(), "  retry: {attempts: 1}\n")).expect("policy");
    let mut sidecar = tokio::process::Command::new(BIN);
    sidecar
        .args(["sidecar", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--log-format", "json", "--policy-file"])
        .arg(&policy)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://127.0.0.1:{otlp}"))
        .env("OTEL_SERVICE_NAME", "checkout-sidecar");
    let sidecar = crate::sidecar_process::SidecarProcess::from_command(sidecar).await;
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let answer = post_raw(
        &format!("http://{}/v1/chat/completions", sidecar.llm),
        chat(false).to_string(),
        &[("traceparent", &format!("00-{trace_id}-b7ad6b7169203331-01"))],
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("x-backstop-fallback-reason"), Some("primary/up-model=serverError"));

    // Read back as Jaeger's UI reads it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let trace = loop {
        let found = get(&format!("{api}/traces/{trace_id}")).await;
        if found.status == 200 {
            let body = found.json();
            if body["data"][0]["spans"].as_array().is_some_and(|s| s.len() >= 3) {
                break body["data"][0].clone();
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "the trace never reached Jaeger");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let services = get(&format!("{api}/services")).await.json();
    assert!(services["data"].as_array().is_some_and(|s| s.contains(&json!("checkout-sidecar"))), "{services}");
    let spans = trace["spans"].as_array().expect("spans");
    let named = |name: &str| {
        spans.iter().find(|s| s["operationName"] == name).unwrap_or_else(|| panic!("no span {name}: {trace}"))
    };
    let server = named("chat chat");
    assert_eq!(tag(&server["tags"], "span.kind"), Some(&json!("server")));
    assert_eq!(tag(&server["tags"], "backstop.target"), Some(&json!("fallback/mock-model")));
    assert_eq!(tag(&server["tags"], "backstop.attempts"), Some(&json!(2)));
    let fallback = server["logs"]
        .as_array()
        .and_then(|logs| logs.iter().find(|l| tag(&l["fields"], "event") == Some(&json!("backstop.fallback"))))
        .unwrap_or_else(|| panic!("no fallback event: {server}"));
    assert_eq!(tag(&fallback["fields"], "backstop.fallback.from"), Some(&json!("primary/up-model")));
    assert_eq!(tag(&fallback["fields"], "backstop.fallback.to"), Some(&json!("fallback/mock-model")));
    assert_eq!(tag(&fallback["fields"], "backstop.fallback.reason"), Some(&json!("serverError")));
    let failed = named("chat up-model");
    assert_eq!(tag(&failed["tags"], "span.kind"), Some(&json!("client")));
    assert_eq!(tag(&failed["tags"], "error.type"), Some(&json!("serverError")));
    assert_eq!(tag(&failed["tags"], "error"), Some(&json!(true)));
    assert_eq!(tag(&failed["tags"], "gen_ai.provider.name"), Some(&json!("openai")));
    let answered = named("chat mock-model");
    assert_eq!(tag(&answered["tags"], "backstop.outcome"), Some(&json!("answered")));
    for attempt in [failed, answered] {
        let parent = attempt["references"][0]["spanID"].clone();
        assert_eq!(parent, server["spanID"], "attempts are children of the request's span");
    }
    assert_eq!(tag(&server["tags"], "span.kind"), Some(&json!("server")));
    let _ = sidecar;
}
