//! Hot reload: valid rewrites swap in atomically under load, requests in flight finish on the
//! snapshot they started with, and an invalid rewrite changes nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::support::*;

fn mock_policy(reply: &str, latency: &str) -> String {
    format!(
        r#"apiVersion: backstop.dev/v1alpha1
kind: FallbackPolicy
metadata: {{name: reload, namespace: tests}}
spec:
  providers:
    - {{name: m, type: mock, mock: {{reply: "{reply}", latency: {latency}, chunks: 3}}}}
  routes:
    - model: chat
      chain: [{{provider: m, model: mock-model}}]
"#
    )
}

async fn wait_for_version(sidecar: &TestSidecar, version: u64) {
    let until = Instant::now() + Duration::from_secs(10);
    while sidecar.version() < version {
        assert!(Instant::now() < until, "policy version {version} never loaded (at {})", sidecar.version());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_finish_on_their_snapshot() {
    let sidecar = TestSidecar::start(&mock_policy("old", "400ms")).await;
    let url = sidecar.url("/v1/chat/completions");
    let in_flight = tokio::spawn({
        let url = url.clone();
        async move { post(&url, &chat(false)).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    std::fs::write(&sidecar.policy_path, mock_policy("new", "1ms")).expect("rewrite");
    wait_for_version(&sidecar, 2).await;
    let old = in_flight.await.expect("request task");
    assert_eq!((old.status, old.text().as_str()), (200, "old"), "the request in flight kept its snapshot");
    let new = post(&url, &chat(false)).await;
    assert_eq!(new.text(), "new");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_fails_no_request_and_an_invalid_rewrite_changes_nothing() {
    let sidecar = Arc::new(TestSidecar::start(&mock_policy("v0", "2ms")).await);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut load = Vec::new();
    for worker in 0..6 {
        let (sidecar, stop, ok, failed) = (sidecar.clone(), stop.clone(), ok.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            let url = sidecar.url("/v1/chat/completions");
            let deadline = Instant::now() + Duration::from_secs(30);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let passed = if worker % 2 == 0 {
                    let a = post(&url, &chat(false)).await;
                    a.status == 200 && a.text().starts_with('v')
                } else {
                    let a = post_stream(&url, &chat(true)).await;
                    a.status == 200 && a.done() && a.broken.is_none() && a.text().starts_with('v')
                };
                let counter = if passed { &ok } else { &failed };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Many rewrites while the load runs, each waited for so every one is really applied.
    let rewrites = 40;
    for n in 1..=rewrites {
        let latency = if n % 2 == 0 { "1ms" } else { "3ms" };
        let temp = sidecar.policy_path.with_extension("tmp");
        std::fs::write(&temp, mock_policy(&format!("v{n}"), latency)).expect("write");
        std::fs::rename(&temp, &sidecar.policy_path).expect("swap in");
        wait_for_version(&sidecar, n + 1).await;
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    // An invalid rewrite: logged, and the last good policy stays.
    std::fs::write(&sidecar.policy_path, mock_policy("broken", "-5ms")).expect("write invalid");
    tokio::time::sleep(Duration::from_millis(400)).await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.expect("load task");
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(failed, 0, "{failed} of {} requests failed during reloads", ok + failed);
    assert!(ok >= 100, "only {ok} requests ran during the reloads");
    assert_eq!(sidecar.version(), rewrites + 1, "the invalid rewrite must not replace the last good policy");
    let after = post(&sidecar.url("/v1/chat/completions"), &chat(false)).await;
    assert_eq!(after.text(), format!("v{rewrites}"));
    let ready = get(&sidecar.admin_url("/readyz")).await;
    assert_eq!(ready.status, 200);
}
