//! The instruments every request records into, the recorder that holds them, and what the
//! health state tells telemetry (breakers opening and closing, budgets as gauges).

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::logs::Severity;
use opentelemetry::metrics::{Counter, Histogram};
use tokio::time::Instant;

use crate::health::HealthObserver;
use crate::policy::TargetState;
use crate::snapshot::PolicyStore;
use crate::telemetry::Telemetry;

/// The instruments every request records into.
#[derive(Debug)]
pub(super) struct Instruments {
    pub(super) duration: Histogram<f64>,
    pub(super) tokens: Histogram<u64>,
    pub(super) first_chunk: Histogram<f64>,
    pub(super) requests: Counter<u64>,
    pub(super) attempts: Histogram<u64>,
    pub(super) fallbacks: Counter<u64>,
    pub(super) hedges: Counter<u64>,
    /// Streams that broke mid-answer and continued (or failed to) on another target.
    pub(super) resumes: Counter<u64>,
    pub(super) cost: Counter<f64>,
    pub(super) transitions: Counter<u64>,
    pub(super) budget_exhausted: Counter<u64>,
}

/// Telemetry and the instruments, shared by every request.
#[derive(Debug)]
pub struct Recorder {
    /// The process's telemetry.
    pub telemetry: Arc<Telemetry>,
    pub(super) instruments: Instruments,
}

impl Recorder {
    /// The recorder of `telemetry`, its instruments registered.
    pub fn new(telemetry: Arc<Telemetry>) -> Recorder {
        let meter = telemetry.metrics.meter("backstop");
        let instruments = Instruments {
            duration: meter
                .f64_histogram("gen_ai.client.operation.duration")
                .with_unit("s")
                .with_description("GenAI operation duration, per attempt, credited to the target that made it")
                .with_boundaries(vec![
                    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
                ])
                .build(),
            tokens: meter
                .u64_histogram("gen_ai.client.token.usage")
                .with_unit("{token}")
                .with_description("Input and output tokens, per attempt")
                .with_boundaries(vec![
                    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
                ])
                .build(),
            first_chunk: meter
                .f64_histogram("gen_ai.client.operation.time_to_first_chunk")
                .with_unit("s")
                .with_description(
                    "Time to a stream's first content chunk, per answering attempt, credited to its target",
                )
                .with_boundaries(vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0])
                .build(),
            requests: meter
                .u64_counter("backstop.requests")
                .with_description("App requests, by route and outcome (answered, fell_through, failed, refused)")
                .build(),
            attempts: meter
                .u64_histogram("backstop.request.attempts")
                .with_unit("{attempt}")
                .with_description("Attempts per app request")
                .with_boundaries(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 20.0])
                .build(),
            fallbacks: meter
                .u64_counter("backstop.fallbacks")
                .with_description("Targets left behind, by route, from, to and reason")
                .build(),
            hedges: meter.u64_counter("backstop.hedges").with_description("Hedged attempts, by route").build(),
            resumes: meter
                .u64_counter("backstop.stream_resumes")
                .with_description(
                    "Streams that broke mid-answer and continued on another target (`to` empty: could not)",
                )
                .build(),
            cost: meter
                .f64_counter("backstop.cost")
                .with_unit("USD")
                .with_description("What attempts cost at the policy's prices, billed failures included")
                .build(),
            transitions: meter
                .u64_counter("backstop.breaker.transitions")
                .with_description("Circuit breakers opening and closing, by target and the state entered")
                .build(),
            budget_exhausted: meter
                .u64_counter("backstop.retry_budget.exhausted")
                .with_description("Requests that stopped short because the route's retry budget was spent")
                .build(),
        };
        Recorder { telemetry, instruments }
    }

    /// Watches `store`'s health: breaker states and retry budgets as gauges, and each breaker
    /// opening and closing as a metric and a log record.
    pub fn watch(self: &Arc<Self>, store: &Arc<PolicyStore>) {
        let meter = self.telemetry.metrics.meter("backstop");
        let states = store.clone();
        meter
            .u64_observable_gauge("backstop.breaker.state")
            .with_description("Each target's circuit breaker: 0 closed, 1 half-open, 2 open")
            .with_callback(move |gauge| {
                for (target, state) in states.health().states(Instant::now()) {
                    let value = match state {
                        TargetState::Open => 2,
                        TargetState::HalfOpen => 1,
                        _ => 0,
                    };
                    gauge.observe(value, &[KeyValue::new("backstop.target", target)]);
                }
            })
            .build();
        let budgets = store.clone();
        meter
            .f64_observable_gauge("backstop.retry_budget.available")
            .with_description("Extra attempts (retries, fall-throughs, hedges) each route may still add now")
            .with_callback(move |gauge| {
                for (route, available) in budgets.health().budgets(Instant::now()) {
                    gauge.observe(available, &[KeyValue::new("backstop.route", route)]);
                }
            })
            .build();
        store.health().observe(self.clone());
    }
}

impl HealthObserver for Recorder {
    fn opened(&self, target: &str, period: Duration, why: &str) {
        self.instruments.transitions.add(
            1,
            &[KeyValue::new("backstop.target", target.to_string()), KeyValue::new("backstop.breaker.state", "open")],
        );
        tracing::warn!(
            target_label = target,
            open_for_ms = period.as_millis() as u64,
            reason = why,
            "circuit breaker opened"
        );
        self.telemetry.log(
            None,
            Severity::Warn,
            "circuit breaker opened",
            vec![
                KeyValue::new("backstop.target", target.to_string()),
                KeyValue::new("backstop.breaker.state", "open"),
                KeyValue::new("backstop.breaker.reason", why.to_string()),
                KeyValue::new("backstop.breaker.open_for", period.as_secs_f64()),
            ],
        );
    }

    fn closed(&self, target: &str) {
        self.instruments.transitions.add(
            1,
            &[KeyValue::new("backstop.target", target.to_string()), KeyValue::new("backstop.breaker.state", "closed")],
        );
        tracing::info!(target_label = target, "circuit breaker closed");
        self.telemetry.log(
            None,
            Severity::Info,
            "circuit breaker closed",
            vec![
                KeyValue::new("backstop.target", target.to_string()),
                KeyValue::new("backstop.breaker.state", "closed"),
            ],
        );
    }
}
