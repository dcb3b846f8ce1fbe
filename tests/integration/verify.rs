//! Verification probes from a sidecar that reads a policy file (the fleet of one, which keeps
//! its own schedule): real sockets, an Anthropic backup reached through translation, and a
//! breaker that a refused probe leaves alone.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::*;

async fn health_of(sidecar: &TestSidecar, target: &str) -> Value {
    let report = get(&sidecar.admin_url("/health")).await.json();
    report["targets"].as_array().into_iter().flatten().find(|t| t["target"] == target).cloned().unwrap_or(Value::Null)
}

async fn verified_until(sidecar: &TestSidecar, target: &str, within: Duration, passed: bool) -> Value {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let health = health_of(sidecar, target).await;
        if health["verified"]["passed"] == passed {
            return health;
        }
        assert!(tokio::time::Instant::now() < deadline, "{target} was not verified as passed={passed}: {health}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_on_a_policy_file_verifies_its_backup_through_its_own_translation_and_leaves_its_breaker_alone() {
    let primary = Upstream::start(Fault::Ok).await;
    // The backup refuses the first request's key, then answers.
    let claude = Upstream::speaking(Wire::Anthropic, vec![Fault::status(401)], Fault::Ok).await;
    let policy = format!(
        r#"apiVersion: backstop.dev/v1alpha1
kind: FallbackPolicy
metadata: {{name: verified, namespace: tests}}
spec:
  providers:
    - {{name: primary, type: openai-compatible, baseUrl: "{}"}}
    - {{name: claude, type: anthropic, baseUrl: "http://{}", apiKey: {{value: sk-ant-verify-SECRET}}}}
  routes:
    - model: chat
      chain:
        - {{provider: primary, model: up-model, verify: {{enabled: false}}}}
        - {{provider: claude, model: claude-backup, adapt: {{set: {{maxTokens: 2048, thinkingBudget: 1024}}}}}}
  circuitBreaker: {{consecutiveFailures: 1}}
  allowRequestOverrides: [drill]
  verify: {{every: 10s, prompt: Reply with OK., maxTokens: 1}}
"#,
        primary.base_url(),
        claude.addr
    );
    let sidecar = TestSidecar::start(&policy).await;

    // The first probe goes out at once and is refused.
    let failed = verified_until(&sidecar, "claude/claude-backup", Duration::from_secs(5), false).await;
    assert_eq!(failed["verified"]["class"], "authError", "{failed}");
    assert!(!failed.to_string().contains("sk-ant-verify-SECRET"), "{failed}");
    // One counted failure would have opened the breaker; a probe counts for nothing.
    assert_eq!((failed["state"].as_str(), &failed["failures"]), (Some("closed"), &json!({})), "{failed}");
    let drilled =
        post_raw(&sidecar.url("/v1/chat/completions"), chat(false).to_string(), &[("x-backstop-drill", "primary")])
            .await;
    assert_eq!(
        (drilled.status, drilled.header("x-backstop-provider")),
        (200, Some("claude")),
        "the breaker let it through"
    );

    // The probe as the backup received it: its API, its key, the probe's limit, no thinking.
    let probe = &claude.received()[0];
    assert_eq!(probe.path, "/v1/messages");
    assert_eq!(probe.headers.get("x-api-key").and_then(|v| v.to_str().ok()), Some("sk-ant-verify-SECRET"));
    assert_eq!(probe.body["model"], "claude-backup");
    assert_eq!(probe.body["max_tokens"], 1, "the probe's limit over the target's adapt: {}", probe.body);
    assert!(probe.body.get("thinking").is_none(), "{}", probe.body);
    assert_eq!(probe.body["messages"].as_array().map(Vec::len), Some(1));
    assert_eq!(text_of(&probe.body["messages"][0]["content"]), "Reply with OK.");
    assert_eq!(primary.count(), 0, "the primary is left out");

    // The next probe, a period after the first, passes.
    let passed = verified_until(&sidecar, "claude/claude-backup", Duration::from_secs(15), true).await;
    assert!(passed["verified"]["class"].is_null(), "{passed}");
    let probes: Vec<_> = claude.received().into_iter().filter(|r| r.body["max_tokens"] == 1).collect();
    assert_eq!(probes.len(), 2, "one probe per period");
    let spacing = probes[1].at.duration_since(probes[0].at);
    assert!(spacing >= Duration::from_secs(9), "a probe every 10 s: {spacing:?}");
    let metrics = String::from_utf8_lossy(&get(&sidecar.admin_url("/metrics")).await.body).to_string();
    assert!(
        metrics.lines().any(|l| l.starts_with("backstop_verify_probes_total{")
            && l.contains("backstop_outcome=\"failed\"")
            && l.contains("claude/claude-backup")),
        "{metrics}"
    );
    let requests: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("backstop_requests_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(requests, 1.0, "the app's one request; probes are nobody's traffic:\n{metrics}");
}
