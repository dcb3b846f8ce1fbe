//! Verified targets as the fleet's decisions carry them: the operator's schedule of probes
//! (one [`Schedule`] per verified target of a namespace), published with the decisions so that
//! each sidecar's stream sends its pod the orders it is to probe, the leader's orders reach the
//! followers' pods, and status shows the last results.
//!
//! Each target a policy verifies (`spec.verify`, a target's own `verify`) is probed once per
//! `every`, whatever the fleet's size: the candidates are the connected pods whose policies use
//! the target, in the rendezvous order of half-open probes. The schedule lives in memory: a new
//! leader probes every target once at once, then keeps the period; status keeps the last result
//! meanwhile.

use serde::{Deserialize, Serialize};

use crate::configstream::VerifyOrder;
pub use crate::health::verify::{Schedule, Verified};

/// One target's verification as the fleet's decisions carry it: the order out, if any, and the
/// last result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Verification {
    /// The target's label.
    pub label: String,
    /// The probe ordered and not yet reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<Order>,
    /// How the last probe ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<Verified>,
}

/// A probe ordered from one pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Order {
    /// The pod's uid.
    pub prober: String,
    /// What it is to send.
    #[serde(flatten)]
    pub probe: VerifyOrder,
}

impl Verification {
    /// `schedule` as the decisions carry it.
    pub fn of(schedule: &Schedule) -> Verification {
        Verification {
            label: schedule.label().to_string(),
            order: schedule.order().map(|(prober, probe)| Order { prober: prober.to_string(), probe: probe.clone() }),
            last: schedule.last().cloned(),
        }
    }
}
