//! The exact API calls of a reconcile, in order, against a mock API server
//! (`tower_test::mock::pair`, the controller-rs `ApiServerVerifier` pattern). The real API
//! server tests (`tests/integration/operator.rs`) show the behaviour; these pin the traffic:
//! what a reconcile reads, and that a steady or standby reconcile writes nothing.

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use kube::runtime::events::{Recorder, Reporter};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::watch;

use super::reconcile;
use crate::operator::served::ServedPolicies;
use crate::operator::{Context, Instruments};
use crate::policy::{FallbackPolicy, FallbackPolicyStatus};
use crate::telemetry::Metrics;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// A policy `shop/chat` whose key comes from Secret `llm-keys`.
fn policy(status: Option<FallbackPolicyStatus>) -> FallbackPolicy {
    let mut policy: FallbackPolicy = serde_yaml_ng::from_str(
        "apiVersion: backstop.dev/v1alpha1\nkind: FallbackPolicy\nmetadata: {name: chat, namespace: shop, generation: 2, uid: 1f}\nspec:\n  providers:\n    - {name: openai, type: openai, apiKey: {secretKeyRef: {name: llm-keys, key: openai}}}\n  routes: [{model: chat, chain: [{provider: openai, model: gpt-4o}]}]\n",
    )
    .expect("test policy");
    policy.status = status;
    policy
}

fn secret() -> Value {
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "llm-keys", "namespace": "shop"},
           "data": {"openai": "c2stbGl2ZQ=="}})
}

fn context(leader: bool) -> (Arc<Context>, Handle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let (_, leadership) = watch::channel(leader);
    let metrics = Metrics::new("backstop-test").expect("metrics");
    let ctx = Context {
        client: client.clone(),
        served: Arc::new(ServedPolicies::new()),
        recorder: Recorder::new(client, Reporter { controller: "backstop-operator".into(), instance: None }),
        leader: leadership.clone(),
        instruments: Instruments::new(&metrics, leadership),
        require_credentials_label: false,
        failures: Mutex::default(),
    };
    (Arc::new(ctx), handle)
}

/// Answers the next call after checking its method and path; returns its body.
async fn expect(handle: &mut Handle, method: Method, path: &str, status: StatusCode, answer: Value) -> Value {
    let Some((request, respond)) = handle.next_request().await else {
        panic!("the reconcile made no further call; {method} {path} was expected")
    };
    assert_eq!((request.method(), request.uri().path()), (&method, path), "{}", request.uri());
    let body = request.into_body().collect_bytes().await.expect("request body");
    let sent = if body.is_empty() { Value::Null } else { serde_json::from_slice(&body).expect("a JSON body") };
    let response =
        Response::builder().status(status).body(Body::from(answer.to_string().into_bytes())).expect("response");
    respond.send_response(response);
    sent
}

fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})
}

/// The first reconcile of a valid policy, answered: its Secret read, its status applied, one
/// Event recorded. Returns the status patch and the Event.
async fn first_reconcile(handle: &mut Handle) -> (Value, Value) {
    expect(handle, Method::GET, SECRET_PATH, StatusCode::OK, secret()).await;
    let patch =
        expect(handle, Method::PATCH, STATUS_PATH, StatusCode::OK, serde_json::to_value(policy(None)).expect("json"))
            .await;
    let event = expect(handle, Method::POST, EVENTS_PATH, StatusCode::OK, json!({})).await;
    (patch, event)
}

const EVENTS_PATH: &str = "/apis/events.k8s.io/v1/namespaces/shop/events";
const SECRET_PATH: &str = "/api/v1/namespaces/shop/secrets/llm-keys";
const STATUS_PATH: &str = "/apis/backstop.dev/v1alpha1/namespaces/shop/fallbackpolicies/chat/status";

#[tokio::test]
async fn a_new_policy_reads_its_secret_then_applies_its_status_and_records_one_event() {
    let (ctx, mut handle) = context(true);
    let served = ctx.served.clone();
    let reconciling = tokio::spawn(reconcile(Arc::new(policy(None)), ctx));
    let (patch, event) = first_reconcile(&mut handle).await;
    assert_eq!(patch["status"]["conditions"][0]["reason"], "Compiled");
    assert_eq!(patch["status"]["observedGeneration"], 2);
    let version = served.get("shop", "chat").expect("served").version.clone();
    assert_eq!(patch["status"]["compiledVersion"], version.as_str());
    assert!(!patch.to_string().contains("sk-live"), "the key stays out of the status: {patch}");
    assert_eq!(event["reason"], "Compiled");
    reconciling.await.expect("task").expect("reconciled");
}

#[tokio::test]
async fn a_policy_whose_status_is_current_is_only_read() {
    let (first, mut handle) = context(true);
    let served = first.served.clone();
    let reconciling = tokio::spawn(reconcile(Arc::new(policy(None)), first));
    let (patch, _) = first_reconcile(&mut handle).await;
    reconciling.await.expect("task").expect("reconciled");
    // The same policy with the status that reconcile wrote: one GET, nothing written.
    let status: FallbackPolicyStatus = serde_json::from_value(patch["status"].clone()).expect("status");
    let (again, mut handle) = context(true);
    let reconciling = tokio::spawn(reconcile(Arc::new(policy(Some(status))), again));
    expect(&mut handle, Method::GET, SECRET_PATH, StatusCode::OK, secret()).await;
    if let Some((request, _)) =
        tokio::time::timeout(std::time::Duration::from_secs(1), handle.next_request()).await.ok().flatten()
    {
        let (method, uri) = (request.method().clone(), request.uri().clone());
        panic!("unexpected {method} {uri}: {:?}", request.into_body().collect_bytes().await);
    }
    reconciling.await.expect("task").expect("reconciled");
    assert!(handle.next_request().await.is_none(), "a steady reconcile writes nothing");
    assert!(served.get("shop", "chat").is_some());
}

#[tokio::test]
async fn a_standby_compiles_and_serves_but_writes_nothing() {
    let (ctx, mut handle) = context(false);
    let served = ctx.served.clone();
    let reconciling = tokio::spawn(reconcile(Arc::new(policy(None)), ctx));
    expect(&mut handle, Method::GET, SECRET_PATH, StatusCode::OK, secret()).await;
    reconciling.await.expect("task").expect("reconciled");
    assert!(handle.next_request().await.is_none(), "a standby writes no status and no event");
    assert!(served.get("shop", "chat").is_some(), "it keeps its served policies warm");
}

#[tokio::test]
async fn a_missing_secret_is_the_reason_and_nothing_is_served() {
    let (ctx, mut handle) = context(true);
    let served = ctx.served.clone();
    let reconciling = tokio::spawn(reconcile(Arc::new(policy(None)), ctx));
    expect(&mut handle, Method::GET, SECRET_PATH, StatusCode::NOT_FOUND, not_found()).await;
    if reconciling.is_finished() {
        panic!("{:?}", reconciling.await);
    }
    let patch = expect(
        &mut handle,
        Method::PATCH,
        STATUS_PATH,
        StatusCode::OK,
        serde_json::to_value(policy(None)).expect("json"),
    )
    .await;
    assert_eq!(patch["status"]["conditions"][0]["reason"], "SecretNotFound");
    assert_eq!(patch["status"]["conditions"][0]["status"], "False");
    assert!(patch["status"].get("compiledVersion").is_none());
    let event =
        expect(&mut handle, Method::POST, "/apis/events.k8s.io/v1/namespaces/shop/events", StatusCode::OK, json!({}))
            .await;
    assert_eq!((event["reason"].as_str(), event["type"].as_str()), (Some("SecretMissing"), Some("Warning")));
    reconciling.await.expect("task").expect("reconciled");
    assert!(served.get("shop", "chat").is_none());
}
