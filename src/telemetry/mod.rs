//! Telemetry: logs to stderr ([`logs`]) and metrics ([`metrics`]) through OpenTelemetry,
//! served as Prometheus text on the admin port.

pub mod logs;
pub mod metrics;

pub use logs::{LogFormat, init_logging};
pub use metrics::Metrics;
