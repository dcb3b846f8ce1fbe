//! The fallback loop in paused time: scripted targets behind a fake [`Transport`], tokio's
//! clock, and zero jitter, so every retry, backoff, timeout, breaker period, budget and hedge
//! is asserted to the millisecond without a socket or a wall-clock wait.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::stream;
use serde_json::json;
use tokio::time::Instant;

use super::*;
use crate::chain::{LocalKeys, compile};
use crate::health::HealthRegistry;
use crate::llm::{Api, Reply, StreamEvent};
use crate::policy::document::parse_policy;
use crate::provider::Sent;
use crate::provider::openai::stream::chunk_event;
use crate::snapshot::PolicySnapshot;

/// What a scripted target does with one request.
#[derive(Clone, Debug)]
enum Play {
    /// Answers after this long.
    Answer(Duration),
    /// Fails after this long, with this class, status and `Retry-After`.
    Fail(Duration, FailureClass, Option<u16>, Option<Duration>),
    /// Never answers.
    Stall,
    /// Streams: headers at once, a role chunk, then content after this long.
    Stream(Duration),
    /// Streams these events, each after its delay, then keeps the stream open.
    Events(Vec<(Duration, Shows)>),
}

/// What a scripted stream event shows.
#[derive(Clone, Copy, Debug)]
enum Shows {
    /// A role chunk: no content, no progress.
    Role,
    /// Reasoning the app does not see: progress, no content.
    Thinking,
    /// Text: content.
    Content,
}

fn event(shows: Shows) -> StreamEvent {
    let delta = match shows {
        Shows::Role => json!({"role": "assistant"}),
        Shows::Thinking => json!({"reasoning_content": "hmm"}),
        Shows::Content => json!({"content": "hi"}),
    };
    chunk_event(json!({"choices": [{"index": 0, "delta": delta}]}))
}

fn fail(class: FailureClass, status: u16) -> Play {
    Play::Fail(Duration::ZERO, class, Some(status), None)
}

/// Targets that play their script in order (then their last entry forever), recording when
/// each call came and how many were cancelled before they finished.
#[derive(Default)]
struct Fake {
    scripts: Mutex<HashMap<String, VecDeque<Play>>>,
    calls: Mutex<Vec<(String, Duration)>>,
    /// The span each call was sent with.
    spans: Mutex<Vec<opentelemetry::trace::SpanId>>,
    cancelled: Arc<AtomicUsize>,
    start: Option<Instant>,
}

impl Fake {
    fn new(scripts: &[(&str, &[Play])]) -> Fake {
        let scripts =
            scripts.iter().map(|(label, plays)| (label.to_string(), plays.iter().cloned().collect())).collect();
        Fake { scripts: Mutex::new(scripts), start: Some(Instant::now()), ..Fake::default() }
    }

    /// Each call: the target's label and when it came, from the test's start.
    fn calls(&self) -> Vec<(String, Duration)> {
        self.calls.lock().expect("lock").clone()
    }

    fn labels(&self) -> Vec<String> {
        self.calls().into_iter().map(|(label, _)| label).collect()
    }
}

/// Marks a call cancelled when dropped before it finished.
struct Running(Arc<AtomicUsize>, bool);

impl Drop for Running {
    fn drop(&mut self) {
        if !self.1 {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Transport for Fake {
    fn send(
        &self,
        target: &Target,
        request: &ChatRequest,
        span: opentelemetry::trace::SpanId,
    ) -> impl Future<Output = Result<Sent, AttemptError>> + Send {
        let elapsed = self.start.map(|s| Instant::now().saturating_duration_since(s)).unwrap_or_default();
        self.calls.lock().expect("lock").push((target.label.clone(), elapsed));
        self.spans.lock().expect("lock").push(span);
        let play = {
            let mut scripts = self.scripts.lock().expect("lock");
            let script = scripts.get_mut(&target.label).unwrap_or_else(|| panic!("no script for {}", target.label));
            if script.len() > 1 { script.pop_front() } else { script.front().cloned() }
                .unwrap_or_else(|| panic!("empty script for {}", target.label))
        };
        let label = target.label.clone();
        let streaming = request.stream;
        let running = Running(self.cancelled.clone(), false);
        async move {
            // The whole guard moves in: dropped with the future, it counts a cancellation.
            let mut running = running;
            let outcome = match play {
                Play::Answer(after) => {
                    tokio::time::sleep(after).await;
                    let answer = json!({"id": "x", "model": label, "choices": [{"index": 0,
                        "message": {"role": "assistant", "content": format!("from {label}")}, "finish_reason": "stop"}]});
                    Ok(Sent { reply: Reply::Complete(answer.into()), headroom: Headroom::default(), api: Api::OpenAi })
                }
                Play::Fail(after, class, status, retry_after) => {
                    tokio::time::sleep(after).await;
                    let mut error = AttemptError::new(class, format!("{label} failed"));
                    error.status = status;
                    error.retry_after = retry_after;
                    Err(error)
                }
                Play::Stall => std::future::pending().await,
                Play::Stream(first_after) => {
                    assert!(streaming, "a stream was scripted for a request that did not ask for one");
                    let role = chunk_event(json!({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}));
                    let content = chunk_event(json!({"choices": [{"index": 0, "delta": {"content": "hi"}}]}));
                    let events = stream::unfold(0, move |n| {
                        let (role, content) = (role.clone(), content.clone());
                        async move {
                            match n {
                                0 => Some((Ok::<StreamEvent, AttemptError>(role), 1)),
                                1 => {
                                    tokio::time::sleep(first_after).await;
                                    Some((Ok(content), 2))
                                }
                                _ => None,
                            }
                        }
                    });
                    Ok(Sent { reply: Reply::Stream(Box::pin(events)), headroom: Headroom::default(), api: Api::OpenAi })
                }
                Play::Events(script) => {
                    assert!(streaming, "a stream was scripted for a request that did not ask for one");
                    let events = stream::unfold(script.into_iter(), |mut script| async move {
                        match script.next() {
                            Some((after, shows)) => {
                                tokio::time::sleep(after).await;
                                Some((Ok::<StreamEvent, AttemptError>(event(shows)), script))
                            }
                            None => std::future::pending().await,
                        }
                    });
                    Ok(Sent { reply: Reply::Stream(Box::pin(events)), headroom: Headroom::default(), api: Api::OpenAi })
                }
            };
            running.1 = true;
            outcome
        }
    }
}

/// A route named `chat` over targets `a`, `b` and `c` (all `openai-compatible`, never dialled:
/// the fake answers for them), with `extra` appended to the spec.
fn route(chain: &str, extra: &str) -> Arc<Route> {
    route_in(&HealthRegistry::new(), chain, extra)
}

fn route_in(health: &HealthRegistry, chain: &str, extra: &str) -> Arc<Route> {
    let yaml = format!(
        "apiVersion: backstop.dev/v1alpha1\nkind: FallbackPolicy\nmetadata: {{name: t, namespace: tests}}\nspec:\n  providers:\n    - {{name: a, type: openai-compatible, baseUrl: 'http://127.0.0.1:9/v1'}}\n    - {{name: b, type: openai-compatible, baseUrl: 'http://127.0.0.1:9/v1'}}\n    - {{name: c, type: openai-compatible, baseUrl: 'http://127.0.0.1:9/v1'}}\n    - {{name: claude, type: anthropic}}\n  routes:\n    - model: chat\n      chain: {chain}\n{extra}"
    );
    let compiled = compile(&parse_policy(&yaml).expect("parses"), &LocalKeys).expect("compiles");
    let snapshot = PolicySnapshot::assemble(&compiled, health).expect("binds");
    snapshot.route("chat").expect("route").clone()
}

const AB: &str = "[{provider: a, model: m}, {provider: b, model: m}]";
const ABC: &str = "[{provider: a, model: m}, {provider: b, model: m}, {provider: c, model: m}]";

fn request(stream: bool) -> ChatRequest {
    let body = json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}], "stream": stream});
    crate::proxy::ingress::openai::parse_chat(body.to_string().as_bytes()).expect("valid")
}

async fn walk(route: &Route, fake: &Fake) -> Result<Answered, Unanswered> {
    run(route, &request(false), fake, Controls::default(), Chance::Fixed(0.0)).await
}

fn answered_by(outcome: &Result<Answered, Unanswered>) -> &str {
    match outcome {
        Ok(answered) => &answered.target.label,
        Err(Unanswered::Final { error, .. }) => panic!("final error: {error}"),
        Err(Unanswered::Ineligible { reasons }) => panic!("ineligible: {reasons:?}"),
        Err(Unanswered::Exhausted { record }) => panic!("exhausted: {:?}", record.attempts),
    }
}

fn fell_through(outcome: &Result<Answered, Unanswered>) -> Vec<(String, &'static str)> {
    outcome
        .as_ref()
        .map(|a| a.record.left.iter().map(|l| (l.target.clone(), l.why.as_str())).collect())
        .unwrap_or_default()
}

/// A target's health as the admin endpoint shows it.
fn shown(health: &crate::health::TargetHealth) -> serde_json::Value {
    crate::proxy::admin::target_json(&health.view(Instant::now()))
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[tokio::test(start_paused = true)]
async fn a_transient_failure_is_retried_after_its_backoff() {
    let fake = Fake::new(&[
        ("a/m", &[fail(FailureClass::Overloaded, 503), Play::Answer(ms(0))]),
        ("b/m", &[Play::Answer(ms(0))]),
    ]);
    let outcome = walk(&route(AB, "  retry: {attempts: 2, backoff: {base: 200ms, max: 2s}}\n"), &fake).await;
    assert_eq!(answered_by(&outcome), "a/m");
    // Zero jitter: half the first backoff.
    assert_eq!(fake.calls(), [("a/m".into(), ms(0)), ("a/m".into(), ms(100))]);
}

#[tokio::test(start_paused = true)]
async fn retry_after_within_the_backoff_cap_is_waited_for_on_the_same_target() {
    let limited = Play::Fail(ms(0), FailureClass::RateLimited, Some(429), Some(ms(1500)));
    let fake = Fake::new(&[("a/m", &[limited, Play::Answer(ms(0))]), ("b/m", &[Play::Answer(ms(0))])]);
    let outcome = walk(&route(AB, "  retry: {attempts: 2, backoff: {base: 200ms, max: 2s}}\n"), &fake).await;
    assert_eq!(answered_by(&outcome), "a/m");
    assert_eq!(fake.calls(), [("a/m".into(), ms(0)), ("a/m".into(), ms(1500))]);
}

#[tokio::test(start_paused = true)]
async fn retry_after_beyond_the_backoff_cap_or_the_deadline_moves_on_at_once() {
    for (retry_after, extra) in [
        (ms(10_000), "  retry: {attempts: 3, backoff: {max: 2s}}\n"),
        (ms(4_000), "  retry: {attempts: 3, backoff: {max: 10s}}\n  timeouts: {total: 3s}\n"),
    ] {
        let limited = Play::Fail(ms(0), FailureClass::RateLimited, Some(429), Some(retry_after));
        let fake = Fake::new(&[("a/m", &[limited]), ("b/m", &[Play::Answer(ms(0))])]);
        let outcome = walk(&route(AB, extra), &fake).await;
        assert_eq!(answered_by(&outcome), "b/m", "{extra}");
        assert_eq!(fake.calls(), [("a/m".into(), ms(0)), ("b/m".into(), ms(0))], "{extra}");
        assert_eq!(fell_through(&outcome), [("a/m".to_string(), "rateLimited")]);
    }
}

#[tokio::test(start_paused = true)]
async fn every_target_rate_limited_reports_the_shortest_retry_after() {
    let fake = Fake::new(&[
        ("a/m", &[Play::Fail(ms(0), FailureClass::RateLimited, Some(429), Some(Duration::from_secs(30)))]),
        ("b/m", &[Play::Fail(ms(0), FailureClass::RateLimited, Some(429), Some(Duration::from_secs(7)))]),
    ]);
    let outcome = walk(&route(AB, "  retry: {attempts: 1}\n"), &fake).await;
    let Err(Unanswered::Exhausted { record }) = outcome else { panic!("exhausted") };
    assert_eq!(record.attempts.len(), 2);
    assert_eq!(record.retry_after, Some(Duration::from_secs(7)));
    assert!(!record.deadline_exceeded());
}

#[tokio::test(start_paused = true)]
async fn the_attempt_timeout_falls_through_and_counts_against_the_target() {
    let fake = Fake::new(&[("a/m", &[Play::Stall]), ("b/m", &[Play::Answer(ms(0))])]);
    let route = route("[{provider: a, model: m, timeout: 2s}, {provider: b, model: m}]", "  retry: {attempts: 1}\n");
    let outcome = walk(&route, &fake).await;
    assert_eq!(answered_by(&outcome), "b/m");
    assert_eq!(fake.calls(), [("a/m".into(), ms(0)), ("b/m".into(), ms(2000))]);
    assert_eq!(fell_through(&outcome), [("a/m".to_string(), "timeout")]);
    assert_eq!(shown(&route.steps[0].members[0].health)["failures"]["timeout"], 1);
}

#[tokio::test(start_paused = true)]
async fn a_stream_without_a_first_token_in_time_falls_through_before_the_app_sees_a_byte() {
    let fake = Fake::new(&[("a/m", &[Play::Stream(Duration::from_secs(20))]), ("b/m", &[Play::Stream(ms(10))])]);
    let route = route(AB, "  retry: {attempts: 1}\n  timeouts: {firstToken: 5s}\n");
    let outcome = run(&route, &request(true), &fake, Controls::default(), Chance::Fixed(0.0)).await;
    assert_eq!(answered_by(&outcome), "b/m");
    assert_eq!(fake.calls(), [("a/m".into(), ms(0)), ("b/m".into(), ms(5000))]);
    let Ok(Answered { reply: Committed::Stream { held, .. }, .. }) = outcome else { panic!("a stream") };
    assert!(held.last().is_some_and(|e| e.content), "committed at its first content chunk");
}

#[tokio::test(start_paused = true)]
async fn the_total_deadline_ends_the_walk_and_counts_nothing_against_the_last_target() {
    let fake = Fake::new(&[("a/m", &[Play::Stall]), ("b/m", &[Play::Stall])]);
    let route = route(AB, "  retry: {attempts: 1}\n  timeouts: {attempt: 2s, total: 3s}\n");
    let started = Instant::now();
    let outcome = walk(&route, &fake).await;
    assert_eq!(Instant::now() - started, Duration::from_secs(3));
    let Err(Unanswered::Exhausted { record }) = outcome else { panic!("exhausted") };
    assert!(record.deadline_exceeded());
    assert_eq!(record.attempts.len(), 2);
    let b = &shown(&route.steps[1].members[0].health);
    assert_eq!(b["failures"], json!({}), "the request's deadline, not b, cut b's attempt: {b}");
}

#[tokio::test(start_paused = true)]
async fn an_open_breaker_is_skipped_until_its_period_ends_then_one_probe_goes_through() {
    let health = HealthRegistry::new();
    let route =
        route_in(&health, AB, "  retry: {attempts: 1}\n  circuitBreaker: {consecutiveFailures: 1, openFor: 30s}\n");
    let fake = Fake::new(&[
        ("a/m", &[fail(FailureClass::ServerError, 500), Play::Answer(ms(0))]),
        ("b/m", &[Play::Answer(ms(0))]),
    ]);
    assert_eq!(answered_by(&walk(&route, &fake).await), "b/m");
    let skipped = walk(&route, &fake).await;
    assert_eq!(answered_by(&skipped), "b/m");
    assert_eq!(fell_through(&skipped), [("a/m".to_string(), "circuitOpen")]);
    assert_eq!(fake.labels(), ["a/m", "b/m", "b/m"], "an open target gets no attempt");
    tokio::time::advance(Duration::from_secs(30)).await;
    assert_eq!(answered_by(&walk(&route, &fake).await), "a/m", "the probe answered");
    assert_eq!(shown(&route.steps[0].members[0].health)["state"], "closed");
}

#[tokio::test(start_paused = true)]
async fn when_every_target_is_open_the_earliest_opened_is_tried() {
    let route = route(AB, "  retry: {attempts: 1}\n  circuitBreaker: {consecutiveFailures: 1, openFor: 1m}\n");
    let fake = Fake::new(&[
        ("a/m", &[fail(FailureClass::ServerError, 500), Play::Answer(ms(0))]),
        ("b/m", &[fail(FailureClass::ServerError, 500)]),
    ]);
    assert!(walk(&route, &fake).await.is_err());
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(answered_by(&walk(&route, &fake).await), "a/m");
    assert_eq!(fake.labels(), ["a/m", "b/m", "a/m"]);
}

#[tokio::test(start_paused = true)]
async fn a_spent_retry_budget_stops_the_walk_with_its_reason() {
    let fake = Fake::new(&[("a/m", &[fail(FailureClass::ServerError, 500)]), ("b/m", &[Play::Answer(ms(0))])]);
    let route = route(AB, "  retry: {attempts: 1, budgetPercent: 0, minRetriesPerSecond: 0}\n");
    let Err(Unanswered::Exhausted { record }) = walk(&route, &fake).await else { panic!("exhausted") };
    assert_eq!(record.stopped(), Some("the route's retry budget is spent"));
    assert_eq!(record.attempts.len(), 1);
    assert_eq!(fake.labels(), ["a/m"]);
}

#[tokio::test(start_paused = true)]
async fn the_attempt_cap_holds_across_targets() {
    let failing: &[Play] = &[fail(FailureClass::ServerError, 500)];
    let fake = Fake::new(&[("a/m", failing), ("b/m", failing), ("c/m", failing)]);
    let route = route(ABC, "  retry: {attempts: 2, maxRequestAttempts: 3}\n");
    let Err(Unanswered::Exhausted { record }) = walk(&route, &fake).await else { panic!("exhausted") };
    assert_eq!(record.stopped(), Some("the per-request attempt cap was reached"));
    assert_eq!(fake.labels(), ["a/m", "a/m", "b/m"]);
}

#[tokio::test(start_paused = true)]
async fn a_hedge_starts_the_next_target_after_the_delay_and_cancels_the_slow_one() {
    let fake = Fake::new(&[("a/m", &[Play::Answer(Duration::from_secs(10))]), ("b/m", &[Play::Answer(ms(500))])]);
    let route = route(AB, "      hedge: {afterFirstTokenDelay: 2s}\n  retry: {attempts: 1}\n");
    let started = Instant::now();
    let outcome = walk(&route, &fake).await;
    assert_eq!(answered_by(&outcome), "b/m");
    assert_eq!(Instant::now() - started, ms(2500));
    assert_eq!(fake.calls(), [("a/m".into(), ms(0)), ("b/m".into(), ms(2000))]);
    assert_eq!(fell_through(&outcome), [("a/m".to_string(), "hedged")]);
    assert_eq!(fake.cancelled.load(Ordering::SeqCst), 1, "the slow attempt was dropped");
}

#[tokio::test(start_paused = true)]
async fn a_hedge_that_fails_leaves_the_slow_target_to_answer() {
    let fake = Fake::new(&[
        ("a/m", &[Play::Answer(Duration::from_secs(5))]),
        ("b/m", &[Play::Fail(ms(100), FailureClass::ServerError, Some(500), None)]),
    ]);
    let route = route(AB, "      hedge: {afterFirstTokenDelay: 2s}\n  retry: {attempts: 1}\n");
    let outcome = walk(&route, &fake).await;
    assert_eq!(answered_by(&outcome), "a/m");
    assert_eq!(fake.calls(), [("a/m".into(), ms(0)), ("b/m".into(), ms(2000))]);
    let Ok(answered) = outcome else { panic!("answered") };
    assert_eq!(answered.record.attempts.len(), 2, "{:?}", answered.record.attempts);
}

#[tokio::test(start_paused = true)]
async fn targets_that_cannot_serve_the_request_are_skipped_as_ineligible() {
    let fake = Fake::new(&[("b/m", &[Play::Answer(ms(0))])]);
    let route = route("[{provider: claude, model: sonnet}, {provider: b, model: m}]", "");
    let mut with_n = request(false);
    with_n.rest.insert("n".into(), json!(2));
    let outcome = run(&route, &with_n, &fake, Controls::default(), Chance::Fixed(0.0)).await;
    assert_eq!(answered_by(&outcome), "b/m");
    assert_eq!(fell_through(&outcome), [("claude/sonnet".to_string(), "ineligible")]);
    let only_claude = self::route("[{provider: claude, model: sonnet}]", "");
    let Err(Unanswered::Ineligible { reasons }) =
        run(&only_claude, &with_n, &fake, Controls::default(), Chance::Fixed(0.0)).await
    else {
        panic!("ineligible")
    };
    assert!(reasons[0].1.contains("`n` above 1"), "{reasons:?}");
    assert_eq!(fake.labels(), ["b/m"]);
}

#[tokio::test(start_paused = true)]
async fn a_failure_that_would_fail_everywhere_is_final() {
    let fake = Fake::new(&[("a/m", &[fail(FailureClass::BadRequest, 400)]), ("b/m", &[Play::Answer(ms(0))])]);
    let Err(Unanswered::Final { target, error, record }) = walk(&route(AB, ""), &fake).await else { panic!("final") };
    assert_eq!((target.label.as_str(), error.status, record.attempts.len()), ("a/m", Some(400), 1));
    assert_eq!(fake.labels(), ["a/m"]);
}

#[tokio::test(start_paused = true)]
async fn a_context_window_error_switches_to_the_special_chain() {
    let fake =
        Fake::new(&[("a/m", &[fail(FailureClass::ContextWindowExceeded, 400)]), ("c/big", &[Play::Answer(ms(0))])]);
    let route = route(AB, "      onContextWindowExceeded: [{provider: c, model: big}]\n");
    let outcome = walk(&route, &fake).await;
    assert_eq!(answered_by(&outcome), "c/big");
    assert_eq!(fell_through(&outcome), [("a/m".to_string(), "contextWindowExceeded")]);
}

#[tokio::test(start_paused = true)]
async fn request_controls_tighten_the_walk() {
    let failing: &[Play] = &[fail(FailureClass::ServerError, 500)];
    let fake = Fake::new(&[("a/m", failing), ("b/m", failing), ("c/m", failing)]);
    let route = route(ABC, "  retry: {attempts: 2}\n");
    let no_fallback = Controls { no_fallback: true, ..Controls::default() };
    assert!(run(&route, &request(false), &fake, no_fallback, Chance::Fixed(0.0)).await.is_err());
    assert_eq!(fake.labels(), ["a/m", "a/m"], "retries at the first step only");
    let capped = Controls { max_attempts: Some(1), ..Controls::default() };
    let fake = Fake::new(&[("a/m", failing), ("b/m", failing), ("c/m", failing)]);
    assert!(run(&route, &request(false), &fake, capped, Chance::Fixed(0.0)).await.is_err());
    assert_eq!(fake.labels(), ["a/m"]);
    let stalled = Fake::new(&[("a/m", &[Play::Stall]), ("b/m", &[Play::Stall]), ("c/m", &[Play::Stall])]);
    let short = Controls { deadline: Some(ms(1500)), ..Controls::default() };
    let started = Instant::now();
    let Err(Unanswered::Exhausted { record }) = run(&route, &request(false), &stalled, short, Chance::Fixed(0.0)).await
    else {
        panic!("exhausted")
    };
    assert!(record.deadline_exceeded());
    assert_eq!(Instant::now() - started, ms(1500));
}

#[tokio::test(start_paused = true)]
async fn another_key_of_the_same_step_is_tried_before_falling_through() {
    // A group stands in for two keys: both are members of one step.
    let group = "[{group: [{provider: a, model: m}, {provider: c, model: m}]}, {provider: b, model: m}]";
    let fake = Fake::new(&[
        ("a/m", &[fail(FailureClass::AuthError, 401)]),
        ("c/m", &[Play::Answer(ms(0))]),
        ("b/m", &[Play::Answer(ms(0))]),
    ]);
    let outcome = walk(&route(group, "  retry: {attempts: 1}\n"), &fake).await;
    assert_eq!(answered_by(&outcome), "c/m");
    assert_eq!(fake.labels(), ["a/m", "c/m"]);
}

#[tokio::test(start_paused = true)]
async fn half_open_lets_exactly_its_probes_through_and_each_reopening_doubles_the_period() {
    let health = HealthRegistry::new();
    let extra = "  retry: {attempts: 1}\n  circuitBreaker: {consecutiveFailures: 3, openFor: 1s, maxOpenFor: 10s, halfOpenProbes: 1}\n";
    let route = route_in(&health, AB, extra);
    let failing = fail(FailureClass::ServerError, 500);
    let slow_failure = Play::Fail(ms(300), FailureClass::ServerError, Some(500), None);
    let fake = Fake::new(&[
        ("a/m", &[failing.clone(), failing.clone(), failing, slow_failure, Play::Answer(ms(0))]),
        ("b/m", &[Play::Answer(ms(0))]),
    ]);
    for _ in 0..3 {
        assert_eq!(fell_through(&walk(&route, &fake).await), [("a/m".to_string(), "serverError")]);
    }
    assert_eq!(shown(&route.steps[0].members[0].health)["state"], "open");
    tokio::time::advance(Duration::from_secs(1)).await;
    // Four at once while half-open: one probes (and fails slowly), three skip it.
    let concurrent = futures_util::future::join_all((0..4).map(|_| walk(&route, &fake))).await;
    assert!(concurrent.iter().all(|o| answered_by(o) == "b/m"));
    let probes = fake.labels().iter().filter(|l| *l == "a/m").count();
    assert_eq!(probes, 4, "three failures and exactly one probe");
    // The probe failed 300 ms in, reopening it for twice the first period: still open 1.9 s
    // later, a probe again at 2 s, which succeeds and closes it.
    tokio::time::advance(ms(1900)).await;
    assert_eq!(fell_through(&walk(&route, &fake).await), [("a/m".to_string(), "circuitOpen")]);
    tokio::time::advance(ms(100)).await;
    assert_eq!(answered_by(&walk(&route, &fake).await), "a/m");
    assert_eq!(shown(&route.steps[0].members[0].health)["state"], "closed");
}

#[tokio::test(start_paused = true)]
async fn a_429_with_retry_after_keeps_the_target_out_exactly_that_long() {
    let route = route(AB, "");
    let limited = Play::Fail(ms(0), FailureClass::RateLimited, Some(429), Some(Duration::from_secs(5)));
    let fake = Fake::new(&[("a/m", &[limited, Play::Answer(ms(0))]), ("b/m", &[Play::Answer(ms(0))])]);
    let first = walk(&route, &fake).await;
    assert_eq!(fell_through(&first), [("a/m".to_string(), "rateLimited")], "5 s is beyond the 2 s backoff cap");
    let shown = shown(&route.steps[0].members[0].health);
    assert_eq!(shown["state"], "open");
    assert_eq!(shown["retryInMs"], 5000, "{shown}");
    assert_eq!(shown["openedBecause"], "the provider asked to wait 5s (Retry-After)", "{shown}");
    tokio::time::advance(ms(4999)).await;
    assert_eq!(fell_through(&walk(&route, &fake).await), [("a/m".to_string(), "circuitOpen")]);
    tokio::time::advance(ms(1)).await;
    assert_eq!(answered_by(&walk(&route, &fake).await), "a/m");
    assert_eq!(fake.labels(), ["a/m", "b/m", "b/m", "a/m"], "nothing reached it in between");
}

#[tokio::test(start_paused = true)]
async fn an_apps_own_retry_earns_no_budget_and_walks_only_if_the_budget_allows() {
    let failing: &[Play] = &[fail(FailureClass::ServerError, 500)];
    let fake = Fake::new(&[("a/m", failing), ("b/m", failing)]);
    let route = route(AB, "  retry: {attempts: 1, budgetPercent: 0, minRetriesPerSecond: 0}\n");
    let retry = Controls { client_retry: true, ..Controls::default() };
    let Err(Unanswered::Exhausted { record }) =
        run(&route, &request(false), &fake, retry.clone(), Chance::Fixed(0.0)).await
    else {
        panic!("exhausted")
    };
    assert!(record.attempts.is_empty(), "not one upstream call for a retry the budget cannot pay for");
    assert_eq!(record.stop, Some(Stop::ClientRetryBudget));
    assert!(record.stopped().is_some_and(|s| s.contains("the app's own retry")), "{:?}", record.stop);
    assert!(fake.labels().is_empty());
    // With budget to spare, a client retry walks the chain like any request.
    let generous = self::route(AB, "  retry: {attempts: 1, minRetriesPerSecond: 10}\n");
    assert!(run(&generous, &request(false), &fake, retry, Chance::Fixed(0.0)).await.is_err());
    assert_eq!(fake.labels(), ["a/m", "b/m"]);
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

async fn stream_walk(route: &Route, fake: &Fake) -> Result<Answered, Unanswered> {
    run(route, &request(true), fake, Controls::default(), Chance::Fixed(0.0)).await
}

#[tokio::test(start_paused = true)]
async fn under_the_defaults_a_minute_of_silent_reasoning_is_waited_for() {
    let fake = Fake::new(&[
        ("a/m", &[Play::Events(vec![(ms(0), Shows::Role), (secs(60), Shows::Content)])]),
        ("b/m", &[Play::Answer(ms(0))]),
    ]);
    let outcome = stream_walk(&route(AB, ""), &fake).await;
    assert_eq!(answered_by(&outcome), "a/m");
    assert!(fell_through(&outcome).is_empty());
    assert_eq!(fake.labels(), ["a/m"], "no second, billed, attempt");
}

#[tokio::test(start_paused = true)]
async fn under_the_defaults_three_minutes_of_visible_thinking_is_waited_for() {
    let mut script = vec![(ms(0), Shows::Role)];
    script.extend((0..18).map(|_| (secs(10), Shows::Thinking)));
    script.push((secs(10), Shows::Content));
    let fake = Fake::new(&[("a/m", &[Play::Events(script)]), ("b/m", &[Play::Answer(ms(0))])]);
    let started = Instant::now();
    let outcome = stream_walk(&route(AB, ""), &fake).await;
    assert_eq!(answered_by(&outcome), "a/m");
    assert_eq!(Instant::now() - started, secs(190));
}

#[tokio::test(start_paused = true)]
async fn under_the_defaults_a_stream_that_shows_nothing_falls_through_at_the_first_token_timeout() {
    let fake = Fake::new(&[
        ("a/m", &[Play::Events(vec![(ms(0), Shows::Role)])]),
        ("b/m", &[Play::Events(vec![(ms(0), Shows::Content)])]),
    ]);
    let outcome = stream_walk(&route(AB, "  retry: {attempts: 1}\n"), &fake).await;
    assert_eq!(answered_by(&outcome), "b/m");
    assert_eq!(fake.calls(), [("a/m".into(), ms(0)), ("b/m".into(), secs(120))]);
}

#[tokio::test(start_paused = true)]
async fn under_the_defaults_a_stream_that_stops_thinking_falls_through_at_the_idle_timeout() {
    let thinking_then_silence = vec![(ms(0), Shows::Role), (secs(5), Shows::Thinking)];
    let fake = Fake::new(&[
        ("a/m", &[Play::Events(thinking_then_silence)]),
        ("b/m", &[Play::Events(vec![(ms(0), Shows::Content)])]),
    ]);
    let outcome = stream_walk(&route(AB, "  retry: {attempts: 1}\n"), &fake).await;
    assert_eq!(answered_by(&outcome), "b/m");
    assert_eq!(fake.calls()[1], ("b/m".into(), secs(65)), "60 s after the last sign of life");
    let Ok(answered) = outcome else { panic!("answered") };
    let first = &answered.record.attempts[0];
    assert!(first.message().contains("stalled before its first content chunk"), "{first:?}");
}

#[tokio::test(start_paused = true)]
async fn under_the_defaults_a_two_minute_answer_is_waited_for_and_a_stalled_one_is_left_at_ten() {
    let fake = Fake::new(&[("a/m", &[Play::Answer(secs(120))]), ("b/m", &[Play::Answer(ms(0))])]);
    let outcome = walk(&route(AB, ""), &fake).await;
    assert_eq!(answered_by(&outcome), "a/m");
    assert_eq!(fake.labels(), ["a/m"]);
    let stalled = Fake::new(&[("a/m", &[Play::Stall]), ("b/m", &[Play::Answer(ms(0))])]);
    let outcome = walk(&route(AB, "  retry: {attempts: 1}\n"), &stalled).await;
    assert_eq!(answered_by(&outcome), "b/m");
    assert_eq!(stalled.calls()[1], ("b/m".into(), secs(600)));
}

#[tokio::test(start_paused = true)]
async fn an_override_drains_a_target_until_it_ends_and_a_drained_target_is_never_a_last_resort() {
    let until = k8s_openapi::jiff::Timestamp::now() + std::time::Duration::from_secs(10);
    let drain_a = format!("  overrides:\n    - {{target: a, state: ForcedOpen, until: '{until}', reason: drill}}\n");
    let route = route(AB, &drain_a);
    let fake = Fake::new(&[("a/m", &[Play::Answer(ms(0))]), ("b/m", &[Play::Answer(ms(0))])]);
    let drained = walk(&route, &fake).await;
    assert_eq!(answered_by(&drained), "b/m");
    assert_eq!(fell_through(&drained), [("a/m".to_string(), "forcedOpen")]);
    let shown = shown(&route.steps[0].members[0].health);
    assert_eq!(
        (shown["state"].as_str(), shown["openedBecause"].as_str()),
        (Some("forcedOpen"), Some("override: drill"))
    );
    tokio::time::advance(ms(9_800)).await;
    assert_eq!(answered_by(&walk(&route, &fake).await), "b/m", "still drained just before its end");
    tokio::time::advance(ms(300)).await;
    assert_eq!(answered_by(&walk(&route, &fake).await), "a/m", "the override ended by the pod's own clock");

    let both = route_in(
        &HealthRegistry::new(),
        AB,
        "  overrides:\n    - {target: a/m, state: ForcedOpen, reason: x}\n    - {target: b, state: ForcedOpen, reason: y}\n",
    );
    let Err(Unanswered::Exhausted { record }) = walk(&both, &fake).await else { panic!("nothing to try") };
    assert!(record.attempts.is_empty());
    assert_eq!(record.out_of_rotation(), ["a/m", "b/m"]);
}

#[tokio::test(start_paused = true)]
async fn forced_closed_sends_to_a_target_its_breaker_keeps_out() {
    let route = route(
        AB,
        "  retry: {attempts: 1}\n  circuitBreaker: {consecutiveFailures: 1}\n  overrides:\n    - {target: a/m, state: ForcedClosed, reason: the breaker misjudges it}\n",
    );
    let fake = Fake::new(&[("a/m", &[fail(FailureClass::ServerError, 500)]), ("b/m", &[Play::Answer(ms(0))])]);
    for _ in 0..3 {
        assert_eq!(fell_through(&walk(&route, &fake).await), [("a/m".to_string(), "serverError")]);
    }
    assert_eq!(fake.labels(), ["a/m", "b/m", "a/m", "b/m", "a/m", "b/m"]);
}

#[tokio::test(start_paused = true)]
async fn the_fleet_keeps_a_target_out_and_lets_only_a_prober_probe_it() {
    use crate::health::gate::FleetState;
    let health = HealthRegistry::new();
    let route = route_in(&health, AB, "  retry: {attempts: 1}\n");
    let a = |identity: &str| identity.starts_with("a:");
    let fake = Fake::new(&[("a/m", &[Play::Answer(ms(50))]), ("b/m", &[Play::Answer(ms(0))])]);
    let now = Instant::now();
    let reason = "5 pods saw serverError".to_string();
    health.apply_fleet(|id| {
        a(id).then(|| FleetState::Open { since: now, until: now + Duration::from_secs(10), reason: reason.clone() })
    });
    assert_eq!(fell_through(&walk(&route, &fake).await), [("a/m".to_string(), "fleetOpen")]);
    health.apply_fleet(|id| a(id).then(|| FleetState::HalfOpen { since: now, probe: false, reason: reason.clone() }));
    assert_eq!(fell_through(&walk(&route, &fake).await), [("a/m".to_string(), "fleetOpen")], "another pod probes");
    health.apply_fleet(|id| a(id).then(|| FleetState::HalfOpen { since: now, probe: true, reason: reason.clone() }));
    let both = futures_util::future::join_all((0..2).map(|_| walk(&route, &fake))).await;
    let mut answered: Vec<&str> = both.iter().map(answered_by).collect();
    answered.sort_unstable();
    assert_eq!(answered, ["a/m", "b/m"], "one probe at a time (halfOpenProbes: 1)");
    health.apply_fleet(|_| None);
    assert_eq!(answered_by(&walk(&route, &fake).await), "a/m", "closed fleet-wide");
    // What the operator hears: successes and counted failures per target, once.
    let tallies = health.take_tallies();
    let a_tally = tallies.iter().find(|(id, _)| a(id)).map(|(_, t)| t.successes);
    assert_eq!(a_tally, Some(2));
    assert!(health.take_tallies().is_empty(), "each outcome is reported once");
}

#[tokio::test(start_paused = true)]
async fn every_attempt_is_recorded_with_the_span_it_sent_upstream() {
    let route = route(AB, "  retry: {attempts: 2, backoff: {base: 100ms, max: 100ms}}\n");
    let fake = Fake::new(&[
        ("a/m", &[fail(FailureClass::ServerError, 500), fail(FailureClass::ServerError, 500)]),
        ("b/m", &[Play::Answer(ms(10))]),
    ]);
    let answered = walk(&route, &fake).await.ok().expect("answered");
    let attempts = &answered.record.attempts;
    let recorded: Vec<_> = attempts.iter().map(|a| (a.target.clone(), a.span)).collect();
    let sent: Vec<_> = fake.labels().into_iter().zip(fake.spans.lock().expect("lock").iter().copied()).collect();
    assert_eq!(recorded, sent);
    assert_eq!(recorded.len(), 3);
    assert!(recorded.windows(2).all(|w| w[0].1 != w[1].1), "each attempt has a span of its own");
    let starts: Vec<Duration> = attempts.iter().map(|a| a.started - attempts[0].started).collect();
    assert_eq!(starts[1], ms(50), "the retry started after its backoff (half of 100 ms with no jitter)");
}

#[tokio::test(start_paused = true)]
async fn a_drill_walks_past_the_targets_it_names_without_trying_them() {
    const OK: &[Play] = &[Play::Answer(Duration::ZERO)];
    let fake = Fake::new(&[("a/m", OK), ("b/m", OK), ("c/m", OK)]);
    let route = route(ABC, "");
    let drill = Controls { drill: vec!["a".into(), "b/m".into()], ..Controls::default() };
    let outcome = run(&route, &request(false), &fake, drill, Chance::Fixed(0.0)).await;
    assert_eq!(answered_by(&outcome), "c/m");
    assert_eq!(fell_through(&outcome), [("a/m".to_string(), "drill"), ("b/m".to_string(), "drill")]);
    assert_eq!(fake.labels(), ["c/m"], "drilled targets get no attempt");

    // A drill of every target leaves nothing to try: no last resort, and the reason is named.
    let fake = Fake::new(&[("a/m", OK), ("b/m", OK), ("c/m", OK)]);
    let everything = Controls { drill: vec!["a".into(), "b".into(), "c".into()], ..Controls::default() };
    let Err(Unanswered::Ineligible { reasons }) =
        run(&route, &request(false), &fake, everything, Chance::Fixed(0.0)).await
    else {
        panic!("nothing to try")
    };
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(reasons.iter().all(|(_, why)| why.contains("drill")), "{reasons:?}");
    assert!(fake.labels().is_empty());
}

#[test]
fn a_drill_header_needs_the_policy_s_permission_and_must_name_a_target() {
    let headers = |value: &str| {
        let mut headers = http::HeaderMap::new();
        headers.insert("x-backstop-drill", value.parse().expect("header"));
        headers
    };
    let forbidden = route(ABC, "");
    let (ignored, logged) = crate::testing::logged(|| Controls::from_headers(&forbidden, &headers("a")));
    assert_eq!(ignored, Ok(Controls::default()), "not allowed: no drill");
    assert!(logged.contains("ignoring a request control header") && logged.contains("x-backstop-drill"), "{logged}");

    let allowed = route(ABC, "  allowRequestOverrides: [drill]\n");
    let controls = Controls::from_headers(&allowed, &headers(" a/m , b ")).expect("valid drill");
    assert_eq!(controls.drill, ["a/m", "b"]);
    let typo = Controls::from_headers(&allowed, &headers("a/m, primary")).expect_err("no such target");
    assert_eq!(
        typo.to_string(),
        "`x-backstop-drill` names `primary`, which is no target of route `chat`; its targets: a/m, b/m, c/m"
    );
}

#[tokio::test(start_paused = true)]
async fn a_continuation_starts_at_the_broken_target_and_only_targets_that_can_continue_take_it() {
    let provider = |name: &str, continuation: &str| {
        format!("    - {{name: {name}, type: openai-compatible, baseUrl: 'http://127.0.0.1:9/v1'{continuation}}}\n")
    };
    let yaml = format!(
        "apiVersion: backstop.dev/v1alpha1\nkind: FallbackPolicy\nmetadata: {{name: t, namespace: tests}}\nspec:\n  providers:\n{}{}{}{}  routes:\n    - model: chat\n      midStream: continue\n      chain: [{{provider: a, model: m}}, {{provider: b, model: m}}, {{provider: c, model: m}}, {{provider: d, model: m}}]\n",
        provider("a", ", continuation: assistantPrefill"),
        provider("b", ", continuation: assistantPrefill"),
        provider("c", ""),
        provider("d", ", continuation: continueFinalMessage"),
    );
    let compiled = compile(&parse_policy(&yaml).expect("parses"), &LocalKeys).expect("compiles");
    let snapshot = PolicySnapshot::assemble(&compiled, &HealthRegistry::new()).expect("binds");
    let route = snapshot.route("chat").expect("route").clone();
    let fake = Fake::new(&[("a/m", &[Play::Answer(ms(0))]), ("d/m", &[Play::Answer(ms(0))])]);
    let mut continuing = request(false);
    continuing.continues = true;
    let controls = Controls { resume_after: vec!["b/m".into()], ..Controls::default() };
    let outcome = run(&route, &continuing, &fake, controls, Chance::Fixed(0.0)).await;
    assert_eq!(answered_by(&outcome), "d/m");
    assert_eq!(fake.labels(), ["d/m"], "not `a` before the break, not `b` that broke, not `c` that cannot continue");
    assert!(fell_through(&outcome).contains(&("c/m".into(), "ineligible")), "{:?}", fell_through(&outcome));

    // Without a target that can continue after the break, nothing is sent.
    let controls = Controls { resume_after: vec!["d/m".into()], ..Controls::default() };
    let outcome = run(&route, &continuing, &fake, controls, Chance::Fixed(0.0)).await;
    assert!(matches!(outcome, Err(Unanswered::Ineligible { .. })), "{:?}", fake.labels());
    assert_eq!(fake.labels(), ["d/m"]);
}

#[tokio::test(start_paused = true)]
async fn a_target_whose_spend_window_is_spent_is_passed_over_and_never_forced() {
    let chain = "[{provider: a, model: m, price: {input: 1, output: 1}, spendLimit: {per: 24h, usd: 5}}, {provider: b, model: m}]";
    let route = route(chain, "");
    let fake = Fake::new(&[("a/m", &[Play::Answer(ms(0))]), ("b/m", &[Play::Answer(ms(0))])]);
    assert_eq!(answered_by(&walk(&route, &fake).await), "a/m", "$0 of $5");
    let spend = route.steps[0].members[0].spend.clone().expect("a spend guard");
    spend.charge(crate::health::spend::unix_ms(), 5.0);
    let outcome = walk(&route, &fake).await;
    assert_eq!(answered_by(&outcome), "b/m");
    assert_eq!(fell_through(&outcome), [("a/m".to_string(), "spendLimit")]);
    assert_eq!(outcome.as_ref().map(|a| a.record.fallback_reason()).ok().as_deref(), Some("a/m=spendLimit"));
    assert_eq!(fake.labels(), ["a/m", "b/m"], "a spent target is sent nothing");

    // Alone in its chain, it is not tried as a last resort either: the app hears why.
    let alone =
        self::route("[{provider: a, model: m, price: {input: 1, output: 1}, spendLimit: {per: 24h, usd: 5}}]", "");
    alone.steps[0].members[0].spend.clone().expect("guard").charge(crate::health::spend::unix_ms(), 6.0);
    let outcome = walk(&alone, &fake).await;
    let Err(Unanswered::Exhausted { record }) = outcome else { panic!("exhausted") };
    assert_eq!(record.out_of_rotation(), ["a/m"]);
    assert_eq!(record.fallback_reason(), "a/m=spendLimit");
    assert_eq!(fake.labels(), ["a/m", "b/m"]);
}
