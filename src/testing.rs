//! Fixtures the unit tests share: a policy that exercises most of the spec, and the check
//! that each broken variant of a document fails with its field path.

use std::fmt::Display;

use std::collections::BTreeMap;

use crate::chain::{ApiKey, CompiledPolicy, KeyError, KeyResolver, LocalKeys, compile};
use crate::configstream::v2;
use crate::operator::served::ServedPolicy;
use crate::policy::ApiKeySource;
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

/// A policy as a cluster holds it: its key in a Secret.
pub(crate) const CLUSTER_POLICY: &str = r#"
apiVersion: backstop.dev/v1alpha1
kind: FallbackPolicy
metadata: {name: chat, namespace: shop}
spec:
  providers:
    - {name: primary, type: openai, apiKey: {secretKeyRef: {name: llm-keys, key: openai}}}
    - {name: backup, type: mock, mock: {reply: from backup}}
  routes:
    - model: chat
      chain: [{provider: primary, model: gpt-4o}, {provider: backup, model: m}]
"#;

/// Keys as a test cluster's Secrets hold them: `key-of-SECRET/KEY`.
struct TestSecrets;

impl KeyResolver for TestSecrets {
    fn resolve(&self, source: &ApiKeySource) -> Result<ApiKey, KeyError> {
        match &source.secret_key_ref {
            Some(reference) => Ok(ApiKey::new(format!("key-of-{}/{}", reference.name, reference.key))),
            None => LocalKeys.resolve(source),
        }
    }
}

/// `yaml` as the operator serves it as `name`: compiled with the test Secrets, and with the
/// protocol-2 message that carries its spec and keys.
pub(crate) fn served(name: &str, yaml: &str) -> ServedPolicy {
    let policy = parse_policy(yaml).expect("test policy parses");
    let compiled = compile(&policy, &TestSecrets).expect("test policy compiles");
    let keys: BTreeMap<String, ApiKey> = policy
        .spec
        .providers
        .iter()
        .flat_map(|p| p.api_key.iter().chain(p.api_keys.iter().flatten()))
        .filter_map(|source| {
            let reference = source.secret_key_ref.as_ref()?;
            Some((v2::key_name(&reference.name, &reference.key), TestSecrets.resolve(source).ok()?))
        })
        .collect();
    ServedPolicy {
        name: name.into(),
        selector: policy.spec.selector.clone(),
        wire: v2::Policy::new(name, &policy.spec, keys),
        version: compiled.digest(),
        compiled,
        generation: 1,
        uid: "u".into(),
    }
}

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

/// A span, for tests of the export path.
pub(crate) fn span_data() -> opentelemetry_sdk::trace::SpanData {
    use crate::telemetry::spans::{Sampler, SpanRecord, TraceContext, new_span_id};
    let context = TraceContext::start(&http::HeaderMap::new(), Sampler::AlwaysOn, true);
    let now = std::time::SystemTime::now();
    SpanRecord {
        id: new_span_id(),
        parent: None,
        remote_parent: false,
        kind: opentelemetry::trace::SpanKind::Server,
        name: "chat test".into(),
        start: now,
        end: now,
        attributes: Vec::new(),
        events: Vec::new(),
        error: None,
    }
    .into_data(&context, &opentelemetry::InstrumentationScope::builder("backstop").build())
}

/// A log line sink for one test's subscriber.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<parking_lot::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs `f` with its `tracing` events (debug and above) written as text: what `f` returned,
/// and the lines.
pub(crate) fn logged<R>(f: impl FnOnce() -> R) -> (R, String) {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .finish();
    let value = tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8_lossy(&logs.0.lock()).into_owned();
    (value, text)
}
