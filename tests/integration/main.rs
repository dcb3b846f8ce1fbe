//! Integration tests: the real sidecar on 127.0.0.1 against fault-injecting upstreams, and the
//! real binary. One test binary, one module per area.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod binary;
mod chart;
mod cluster;
mod donoharm;
mod faults;
mod fleet;
mod golden;
mod health;
mod ingress;
mod jaeger;
mod operator;
mod operator_process;
mod otlp;
mod reload;
mod resume;
mod shadow;
mod sidecar_process;
mod support;
mod tls;
mod translate;
mod verify;
