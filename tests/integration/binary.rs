//! The real `backstop` binary: the README's quickstart, secrets kept out of logs, start-up with
//! a broken policy, and the `check` and `crd` subcommands.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_backstop");

struct Running {
    child: Child,
    llm: SocketAddr,
    admin: SocketAddr,
    log: Arc<Mutex<String>>,
}

impl Running {
    async fn start(policy_file: &std::path::Path, log_level: &str) -> Running {
        Running::start_with(policy_file, log_level, &[]).await
    }

    async fn start_with(policy_file: &std::path::Path, log_level: &str, env: &[(&str, &str)]) -> Running {
        let mut child = Command::new(BIN)
            .args([
                "sidecar",
                "--listen",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
                "--log-format",
                "json",
                "--policy-file",
            ])
            .arg(policy_file)
            .env("BACKSTOP_LOG", log_level)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start backstop");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sink = log.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            let mut tx = Some(tx);
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(event) = serde_json::from_str::<Value>(&line)
                    && event["message"] == "backstop sidecar listening"
                    && let Some(tx) = tx.take()
                {
                    let addr = |k: &str| event[k].as_str().and_then(|a| a.parse::<SocketAddr>().ok());
                    let _ = tx.send((addr("llm"), addr("admin")));
                }
                sink.lock().expect("lock").push_str(&(line + "\n"));
            }
        });
        let (llm, admin) = tokio::time::timeout(Duration::from_secs(10), rx)
            .await
            .expect("the sidecar reports its addresses within 10 s")
            .expect("listening line");
        Running { child, llm: llm.expect("llm addr"), admin: admin.expect("admin addr"), log }
    }

    fn log(&self) -> String {
        self.log.lock().expect("lock").clone()
    }

    async fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("pid");
        let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await.expect("exits on SIGTERM").expect("wait")
    }
}

fn repo_file(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_falls_back_from_the_rate_limited_primary() {
    let sidecar = Running::start(&repo_file("deploy/examples/quickstart.yaml"), "info").await;
    let url = format!("http://{}/v1/chat/completions", sidecar.llm);
    let answer = post(&url, &chat(false)).await;
    assert_eq!(answer.status, 200, "{}", String::from_utf8_lossy(&answer.body));
    assert_eq!(answer.header("x-backstop-provider"), Some("fallback"));
    assert_eq!(answer.header("x-backstop-model"), Some("claude-sonnet-4-5"));
    assert_eq!(answer.header("x-backstop-fallback-reason"), Some("primary/gpt-4o=rateLimited"));
    assert_eq!(answer.header("x-backstop-attempts"), Some("2"));
    let streamed = post_stream(&url, &chat(true)).await;
    assert!(streamed.done());
    assert!(streamed.text().starts_with("Answered by the fallback target"), "{}", streamed.text());
    assert!(sidecar.log().contains("answered after falling through"), "{}", sidecar.log());
    // The 429 asked for 30 s: the primary's breaker is open, and later requests pass it over
    // without an attempt. That is logged once, when it opened, not on every request.
    for _ in 0..3 {
        let answer = post(&url, &chat(false)).await;
        assert_eq!(answer.header("x-backstop-fallback-reason"), Some("primary/gpt-4o=circuitOpen"));
        assert_eq!(answer.header("x-backstop-attempts"), Some("1"));
    }
    let log = sidecar.log();
    assert_eq!(log.matches("answered after falling through").count(), 1, "{log}");
    assert!(!log.contains("passed over"), "{log}");
    let status = sidecar.stop().await;
    assert!(status.success(), "exit status {status}");
}

/// How many threads of tokio's pool process `pid` runs.
fn pool_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim() == "tokio-rt-worker")
        .count()
}

/// How many tokio worker threads process `pid` runs, once it runs `expected`. tokio names its
/// blocking threads (a file read, a name lookup) as it names its workers, and a blocking thread
/// lingers for ten seconds after its last task, so the count is taken again until it is
/// `expected` or fifteen seconds have passed; then the last count is returned.
async fn worker_threads(pid: u32, expected: usize) -> usize {
    let give_up = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let count = pool_threads(pid);
        if count == expected || tokio::time::Instant::now() >= give_up {
            return count;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_thread_serves_requests_unless_told_otherwise() {
    let policy = repo_file("deploy/examples/quickstart.yaml");
    for (env, workers) in [(None, 0), (Some("3"), 3)] {
        let env: Vec<(&str, &str)> = env.map(|n| ("BACKSTOP_WORKER_THREADS", n)).into_iter().collect();
        let sidecar = Running::start_with(&policy, "info", &env).await;
        // The default runs every task on the main thread: no worker threads at all.
        assert_eq!(worker_threads(sidecar.child.id().expect("pid"), workers).await, workers, "{env:?}");
        let url = format!("http://{}/v1/chat/completions", sidecar.llm);
        let request = chat(false);
        let answers = futures_util::future::join_all((0..8).map(|_| post(&url, &request))).await;
        assert!(answers.iter().all(|a| a.status == 200 && a.header("x-backstop-provider") == Some("fallback")));
        assert!(sidecar.stop().await.success());
    }
    let refused = std::process::Command::new(BIN)
        .args(["sidecar", "--worker-threads", "0", "--policy-file"])
        .arg(&policy)
        .output()
        .expect("run backstop");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--worker-threads") && stderr.contains("1..=256"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_log_pipe_loses_log_lines_not_requests() {
    let mut child = Command::new(BIN)
        .args(["sidecar", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--log-format", "json"])
        .arg("--policy-file")
        .arg(repo_file("deploy/examples/quickstart.yaml"))
        .env("BACKSTOP_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start backstop");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let llm = loop {
        let line = lines.next_line().await.expect("read").expect("a listening line");
        if let Ok(event) = serde_json::from_str::<Value>(&line)
            && event["message"] == "backstop sidecar listening"
        {
            break event["llm"].as_str().expect("llm").to_string();
        }
    };
    // The log collector goes away: every later log line meets a broken pipe.
    drop(lines);
    let url = format!("http://{llm}/v1/chat/completions");
    for _ in 0..5 {
        let answer = post(&url, &chat(false)).await;
        assert_eq!(answer.status, 200, "{}", String::from_utf8_lossy(&answer.body));
        assert_eq!(answer.header("x-backstop-provider"), Some("fallback"));
    }
    let _ = std::process::Command::new("kill").args(["-TERM", &child.id().expect("pid").to_string()]).status();
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await.expect("exits").expect("wait");
    assert!(status.success(), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_never_reach_logs_or_config() {
    let upstream = Upstream::start(Fault::status(401)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, two_target_policy(&upstream.base_url(), "")).expect("write");
    let sidecar = Running::start(&policy, "trace").await;
    let url = format!("http://{}/v1/chat/completions", sidecar.llm);
    let answer = post(&url, &chat(false)).await;
    assert_eq!(answer.status, 200);
    let config = get(&format!("http://{}/config", sidecar.admin)).await;
    assert_eq!(config.status, 200);
    // A rejected reload must not print the key either.
    std::fs::write(&policy, two_target_policy(&upstream.base_url(), "  retry: {attempts: 0}\n")).expect("write");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = sidecar.log();
    assert!(log.contains("policy not loaded"), "the invalid rewrite should be logged:\n{log}");
    assert!(upstream.received()[0].headers.get("authorization").is_some(), "the key was sent upstream");
    for (place, text) in [
        ("log", log.as_str()),
        ("/config", &String::from_utf8_lossy(&config.body)),
        ("answer", &String::from_utf8_lossy(&answer.body)),
    ] {
        assert!(!text.contains("sk-test-primary-SECRET"), "the API key leaked into the {place}:\n{text}");
        assert!(!text.contains("sk-upstream-echo-SECRET"), "the upstream's 401 body leaked into the {place}:\n{text}");
    }
    sidecar.stop().await;
}

#[test]
fn a_broken_first_policy_stops_the_sidecar_with_every_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("policy.yaml");
    let good = std::fs::read_to_string(repo_file("deploy/examples/quickstart.yaml")).expect("quickstart");
    let broken = good.replace("total: 15m", "total: never").replace("type: mock", "type: mokc");
    std::fs::write(&policy, broken).expect("write");
    let started = std::time::Instant::now();
    let out = std::process::Command::new(BIN)
        .args(["sidecar", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--policy-file"])
        .arg(&policy)
        .stdin(Stdio::null())
        .output()
        .expect("run the sidecar");
    assert!(!out.status.success(), "a sidecar with nothing valid to serve exits");
    assert!(started.elapsed() < Duration::from_secs(5), "at once: {:?}", started.elapsed());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("`spec.timeouts.total`"), "{stderr}");
    assert!(stderr.contains("`spec.providers[0].type`: unknown variant `mokc`"), "every problem in one run: {stderr}");
}

#[test]
fn check_reports_field_paths_and_crd_matches_the_checked_in_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.yaml");
    let good = std::fs::read_to_string(repo_file("deploy/examples/quickstart.yaml")).expect("quickstart");
    std::fs::write(&bad, good.replace("provider: fallback,", "provider: nowhere,")).expect("write");
    let out = std::process::Command::new(BIN).arg("check").arg(&bad).output().expect("run check");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("`spec.routes[0].chain[1].provider`: `nowhere` is not defined"), "{stderr}");
    let ok = std::process::Command::new(BIN)
        .arg("check")
        .arg(repo_file("deploy/examples/quickstart.yaml"))
        .output()
        .expect("run check");
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let cross = std::process::Command::new(BIN)
        .arg("check")
        .arg(repo_file("deploy/examples/cross-provider.yaml"))
        .envs(
            ["OPENAI_API_KEY", "ANTHROPIC_API_KEY_1", "ANTHROPIC_API_KEY_2", "GEMINI_API_KEY", "AZURE_OPENAI_API_KEY"]
                .map(|name| (name, "test-key")),
        )
        .output()
        .expect("run check");
    assert!(cross.status.success(), "{}", String::from_utf8_lossy(&cross.stderr));
    let crd = std::process::Command::new(BIN).arg("crd").output().expect("run crd");
    let checked_in = std::fs::read(repo_file("crds/fallbackpolicy.yaml")).expect("crd file");
    assert!(crd.stdout == checked_in, "crds/fallbackpolicy.yaml differs from `backstop crd`");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_requests_in_flight_finish() {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("policy.yaml");
    let quickstart = std::fs::read_to_string(repo_file("deploy/examples/quickstart.yaml")).expect("quickstart");
    std::fs::write(&policy, quickstart.replace("latency: 40ms", "latency: 600ms")).expect("write");
    let sidecar = Running::start(&policy, "info").await;
    let url = format!("http://{}/v1/chat/completions", sidecar.llm);
    let in_flight = tokio::spawn(async move { post(&url, &chat(false)).await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let status = sidecar.stop().await;
    let answer = in_flight.await.expect("request task");
    assert_eq!(answer.status, 200, "the request in flight was answered: {}", String::from_utf8_lossy(&answer.body));
    assert!(status.success(), "exit status {status}");
}

/// Read system calls the process has made so far (`/proc/PID/io`).
fn read_syscalls(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    io.lines().find_map(|l| l.strip_prefix("syscr:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_sidecar_leaves_its_policy_file_alone_and_reports_a_broken_change_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("policy.yaml");
    let good = std::fs::read_to_string(repo_file("deploy/examples/quickstart.yaml")).expect("quickstart");
    std::fs::write(&policy, &good).expect("write");
    let sidecar = Running::start(&policy, "info").await;
    let pid = sidecar.child.id().expect("pid");
    // The same text again, once the watch is up: one reload, which must not set off another
    // by its own read.
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(&policy, &good).expect("rewrite");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = read_syscalls(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let reads = read_syscalls(pid) - before;
    assert!(reads < 20, "an idle sidecar made {reads} reads in 2 s: it is reacting to its own reads");
    std::fs::write(&policy, good.replace("attempts: 2", "attempts: 0")).expect("break it");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let log = sidecar.log();
    assert_eq!(log.matches("policy not loaded").count(), 1, "one report of one broken change:\n{log}");
    assert!(log.contains("`spec.retry.attempts`"), "{log}");
    assert!(log.contains("\"kept_version\":1"), "fields print as values: {log}");
    sidecar.stop().await;
}
