//! The sidecar's verification probes: each order (see [`crate::health::verify`]) is sent once,
//! as a small real request to its target through the target's own translation, adaptation and
//! key, and its result is left for whoever ordered it: the operator, through the next report,
//! or, for a sidecar reading a policy file, its own schedule ([`Verifier::schedule_locally`]).
//! `/health` shows each target's last probe from this pod.
//!
//! A probe is nobody's traffic: it takes no breaker permit, so it never opens a breaker or
//! lands in the fleet's tallies; it is not counted in the request metrics, the retry budget or
//! a spend limit. What it leaves is its own: a CLIENT span `verify {model}` marked
//! `backstop.verify=true` (with the tokens and cost it spent), a log record, and the counter
//! `backstop.verify.probes` by target and outcome. The probe asks for at most the order's
//! `maxTokens` (whatever the target's `adapt` sets) and without a thinking budget, so that a
//! one-token probe is a request every model takes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use opentelemetry::KeyValue;
use opentelemetry::logs::Severity;
use opentelemetry::metrics::Counter;
use opentelemetry::trace::SpanKind;
use serde_json::{Map, Value};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::configstream::{VerifyOrder, VerifyResult};
use crate::health::verify::{Schedule, Verified};
use crate::llm::request::Message;
use crate::llm::{ChatRequest, Operation, Reply};
use crate::net::client::HttpClient;
use crate::policy::Parameter;
use crate::provider::Call;
use crate::snapshot::{PolicyStore, Target};
use crate::telemetry::Telemetry;
use crate::telemetry::genai::AnswerInfo;
use crate::telemetry::spans::{SpanRecord, new_span_id};

/// How long past its time limit an order's id is remembered: longer than any operator keeps an
/// order out.
const REMEMBER: Duration = Duration::from_secs(120);

/// Sends the probes ordered from this pod.
pub struct Verifier {
    store: Arc<PolicyStore>,
    http: HttpClient,
    telemetry: Arc<Telemetry>,
    probes: Counter<u64>,
}

impl Verifier {
    /// A verifier of `store`'s targets, sending over `http`, recording into `telemetry`.
    pub fn new(store: Arc<PolicyStore>, http: HttpClient, telemetry: Arc<Telemetry>) -> Verifier {
        let probes = telemetry
            .metrics
            .meter("backstop")
            .u64_counter("backstop.verify.probes")
            .with_description("Verification probes this sidecar sent, by target and outcome (passed, failed)")
            .build();
        Verifier { store, http, telemetry, probes }
    }

    /// Sends each new order once, until `shutdown`.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut orders = self.store.health().verify().orders();
        // Orders sent, by id, until they cannot come back: an order the operator sends again
        // (after a reconnect, say) is not a new probe.
        let mut sent: HashMap<u64, Instant> = HashMap::new();
        loop {
            let current = orders.borrow_and_update().clone();
            let now = Instant::now();
            sent.retain(|_, forget_at| now < *forget_at);
            for (identity, order) in current {
                if let std::collections::hash_map::Entry::Vacant(entry) = sent.entry(order.id) {
                    entry.insert(now + Duration::from_millis(order.timeout_ms) + REMEMBER);
                    let verifier = self.clone();
                    tokio::spawn(async move { verifier.probe(&identity, &order).await });
                }
            }
            tokio::select! {
                _ = shutdown.changed() => return,
                changed = orders.changed() => if changed.is_err() { return },
            }
        }
    }

    /// Orders this sidecar's own probes, for a sidecar that reads a policy file (the fleet of
    /// one), on the schedule the operator keeps for a fleet, until `shutdown`.
    pub async fn schedule_locally(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        const SELF: &str = "self";
        let mut schedules: HashMap<String, Schedule> = HashMap::new();
        let mut ticks = tokio::time::interval(Duration::from_secs(1));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = ticks.tick() => {}
            }
            let now = Instant::now();
            let snapshot = self.store.load();
            let verified: HashMap<&str, (&crate::chain::Verify, &str)> = snapshot
                .iter()
                .flat_map(|snapshot| snapshot.targets())
                .filter_map(|t| Some((t.identity.as_str(), (t.verify.as_ref()?, t.label.as_str()))))
                .collect();
            schedules.retain(|identity, _| verified.contains_key(identity.as_str()));
            for (identity, (verify, label)) in verified {
                match schedules.get_mut(identity) {
                    Some(schedule) => schedule.reconfigure(verify, label, now),
                    None => {
                        schedules.insert(identity.to_string(), Schedule::new(verify.clone(), label.to_string(), now));
                    }
                }
            }
            for (identity, result) in self.store.health().verify().take_results(usize::MAX) {
                if let Some(schedule) = schedules.get_mut(&identity) {
                    schedule.take(SELF, &result, now, k8s_openapi::jiff::Timestamp::now());
                }
            }
            for schedule in schedules.values_mut() {
                schedule.advance(now, |_| true, || vec![SELF.to_string()]);
            }
            let orders: BTreeMap<String, VerifyOrder> = schedules
                .iter()
                .filter_map(|(identity, schedule)| Some((identity.clone(), schedule.order()?.1.clone())))
                .collect();
            self.store.health().verify().set_orders(&orders);
        }
    }

    /// Sends one probe and leaves its result; nothing when this pod no longer has the target
    /// (the operator gives the order to another pod).
    async fn probe(&self, identity: &str, order: &VerifyOrder) {
        let Some(target) = self.store.load().and_then(|snapshot| snapshot.target(identity)) else {
            tracing::debug!(identity, "a verification probe for a target this pod no longer has");
            return;
        };
        let request = probe_request(&target, order);
        let adapt = probe_adaptation(&target, order.max_tokens);
        let trace = self.telemetry.trace(&http::HeaderMap::new());
        let span = new_span_id();
        let headers = trace.upstream(span);
        let call = Call {
            http: &self.http,
            model: &target.model,
            request: &request,
            key: target.key,
            trace: &headers,
            adapt: Some(&adapt),
        };
        let (wall, started) = (SystemTime::now(), Instant::now());
        let sent = tokio::time::timeout(Duration::from_millis(order.timeout_ms), target.provider.send(call)).await;
        let latency = started.elapsed();
        let (info, failure) = match sent {
            Ok(Ok(sent)) => match sent.reply {
                Reply::Complete(whole) => (AnswerInfo::of_whole(sent.api, &whole), None),
                Reply::Stream(_) => {
                    (AnswerInfo::default(), Some(("serverError", "answered with a stream".to_string())))
                }
            },
            Ok(Err(error)) => (AnswerInfo::default(), Some((error.class.as_str(), error.message))),
            Err(_) => {
                let message = format!("no answer within {} ms", order.timeout_ms);
                (AnswerInfo::default(), Some(("timeout", message)))
            }
        };
        let result = VerifyResult {
            id: order.id,
            passed: failure.is_none(),
            class: failure.as_ref().map(|(class, _)| (*class).to_string()),
            message: failure.as_ref().map(|(_, message)| crate::configstream::bounded_reason(message)),
            latency_ms: u64::try_from(latency.as_millis()).unwrap_or(u64::MAX),
        };
        self.record(&target, &result, &info, order, (wall, latency), (&trace, span));
        target.health.note_verified(Verified::of(&result, k8s_openapi::jiff::Timestamp::now()));
        self.store.health().verify().record(identity, result);
    }

    fn record(
        &self,
        target: &Target,
        result: &VerifyResult,
        info: &AnswerInfo,
        order: &VerifyOrder,
        (start, latency): (SystemTime, Duration),
        (trace, span): (&crate::telemetry::spans::TraceContext, opentelemetry::trace::SpanId),
    ) {
        let outcome = if result.passed { "passed" } else { "failed" };
        self.probes.add(
            1,
            &[KeyValue::new("backstop.target", target.label.clone()), KeyValue::new("backstop.outcome", outcome)],
        );
        let mut attributes = vec![
            KeyValue::new("backstop.verify", true),
            KeyValue::new("backstop.target", target.label.clone()),
            KeyValue::new("backstop.outcome", outcome),
            KeyValue::new("gen_ai.operation.name", "chat"),
            KeyValue::new("gen_ai.provider.name", target.provider.system),
            KeyValue::new("gen_ai.request.model", target.model.clone()),
            KeyValue::new("gen_ai.request.max_tokens", i64::from(order.max_tokens)),
        ];
        for (name, value) in
            [("gen_ai.usage.input_tokens", info.input_tokens), ("gen_ai.usage.output_tokens", info.output_tokens)]
        {
            if let Some(value) = value {
                attributes.push(KeyValue::new(name, i64::try_from(value).unwrap_or(i64::MAX)));
            }
        }
        if let Some(cost) = info.cost(target.price.as_ref()) {
            attributes.push(KeyValue::new("backstop.cost", cost));
        }
        if let Some(class) = &result.class {
            attributes.push(KeyValue::new("error.type", class.clone()));
        }
        let error = result.message.as_ref().map(|message| format!("{}: {message}", target.label));
        match &error {
            Some(error) => tracing::warn!(target_label = %target.label, %error, latency_ms = result.latency_ms,
                "a verification probe failed"),
            None => tracing::debug!(target_label = %target.label, latency_ms = result.latency_ms,
                "a verification probe passed"),
        }
        let severity = if result.passed { Severity::Info } else { Severity::Warn };
        self.telemetry.log(Some((trace, span)), severity, "verification probe", attributes.clone());
        if trace.sampled {
            let record = SpanRecord {
                id: span,
                parent: None,
                remote_parent: false,
                kind: SpanKind::Client,
                name: format!("verify {}", target.model),
                start,
                end: start + latency,
                attributes,
                events: Vec::new(),
                error,
            };
            self.telemetry.export(trace, vec![record]);
        }
    }
}

/// The probe: one user message, a whole answer.
fn probe_request(target: &Target, order: &VerifyOrder) -> ChatRequest {
    let message = Message { role: "user".into(), content: Some(Value::String(order.prompt.clone())), rest: Map::new() };
    ChatRequest {
        model: target.model.clone(),
        messages: vec![message],
        stream: false,
        rest: Map::new(),
        origin: None,
        operation: Operation::Chat,
        continues: false,
    }
}

/// The target's adaptation with the probe's answer limit set, whatever it sets or caps, and no
/// thinking budget (which needs a larger limit than a probe's).
fn probe_adaptation(target: &Target, max_tokens: u32) -> crate::chain::Adaptation {
    let mut adapt = target.adapt.clone().unwrap_or_default();
    let probe_owned = |parameter: &Parameter| matches!(parameter, Parameter::MaxTokens | Parameter::ThinkingBudget);
    adapt.set.retain(|(parameter, _)| !probe_owned(parameter));
    adapt.cap.retain(|(parameter, _)| !probe_owned(parameter));
    adapt.set.push((Parameter::MaxTokens, Value::from(max_tokens)));
    adapt.remove.push(Parameter::ThinkingBudget);
    adapt
}
