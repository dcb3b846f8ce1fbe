//! Fixtures the unit tests share: a policy that exercises most of the spec, and the check
//! that each broken variant of a document fails with its field path.

use std::fmt::Display;

use crate::chain::{CompiledPolicy, LocalKeys, compile};
use crate::policy::document::parse_policy;

/// A valid policy: an `openai` primary with a key, a balanced group of an
/// `openai-compatible` server and a mock, a catch-all route, and non-default settings.
pub(crate) const DEMO_POLICY: &str = r#"
apiVersion: backstop.dev/v1alpha1
kind: FallbackPolicy
metadata: {name: demo, namespace: shop}
spec:
  providers:
    - {name: primary, type: openai, apiKey: {value: sk-secret-123}}
    - {name: local, type: openai-compatible, baseUrl: "http://127.0.0.1:8000/v1"}
    - {name: fake, type: mock, mock: {reply: hi, latency: 10ms}}
  routes:
    - model: chat
      chain:
        - {provider: primary, model: gpt-4o, timeout: 20s}
        - group:
            - {provider: local, model: llama, weight: 3}
            - {provider: fake, model: m}
    - model: "*"
      chain: [{provider: fake, model: any}]
  fallbackOn: [rateLimited, timeout]
  retry: {attempts: 3, backoff: {base: 100ms, max: 1s}}
  timeouts: {attempt: 5s, firstToken: 2s, total: 1m30s}
"#;

/// `yaml` parsed and compiled with local keys.
pub(crate) fn compiled(yaml: &str) -> CompiledPolicy {
    compile(&parse_policy(yaml).expect("test policy parses"), &LocalKeys).expect("test policy compiles")
}

/// Each case's document fails `check` with an error that contains the expected text, and no
/// error repeats the canary `leaky`.
pub(crate) fn assert_errors<T, E: Display>(cases: &[(String, &str)], check: impl Fn(&str) -> Result<T, E>) {
    for (document, expected) in cases {
        let error = match check(document) {
            Ok(_) => panic!("expected an error containing {expected:?}"),
            Err(error) => error.to_string(),
        };
        assert!(error.contains(expected), "expected {expected:?} in {error:?}");
        assert!(!error.contains("leaky"), "a key leaked into the error: {error}");
    }
}
