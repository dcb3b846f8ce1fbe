//! What stands above a target's own breaker: the policy's manual override first, then the
//! fleet's decision from the operator, then the pod's breaker. A pure state machine over
//! explicit instants, like the breaker.
//!
//! - `ForcedOpen` refuses every request until the override ends; `ForcedClosed` lets every
//!   request through whatever the fleet and the breaker say.
//! - The fleet's `Open` refuses until its end; past it (an operator that went quiet) the pod's
//!   own breaker decides again. `HalfOpen` lets a bounded number of probes through at the pods
//!   the operator chose as probers and refuses at the others. A sidecar that loses its
//!   operator clears the fleet's decisions, so a stale one never outlives the connection.

use std::time::Duration;

use tokio::time::Instant;

use super::breaker::RefusedBy;

/// How far "until it is removed" reaches, as an instant.
const FOREVER: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// A manual override in force at this pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forced {
    /// `ForcedOpen` (true) or `ForcedClosed`.
    pub open: bool,
    /// When this pod applied it.
    pub since: Instant,
    /// When it ends, if it does.
    pub until: Option<Instant>,
    /// Why, from the policy.
    pub reason: String,
}

/// The fleet's decision on a target, as this pod holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FleetState {
    /// Out for every pod until `until`.
    Open {
        /// When this pod learnt it.
        since: Instant,
        /// When it ends.
        until: Instant,
        /// Why.
        reason: String,
    },
    /// Recovering through probes that only some pods send.
    HalfOpen {
        /// When this pod learnt it.
        since: Instant,
        /// Whether this pod is one of the probers.
        probe: bool,
        /// Why it was open.
        reason: String,
    },
}

/// The gates' answer for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Let it through without asking the breaker (`ForcedClosed`).
    Allow,
    /// Refuse it.
    Refuse {
        /// Since when.
        since: Instant,
        /// Until when, as far as is known.
        until: Instant,
        /// Which gate.
        by: RefusedBy,
    },
    /// Let it through as one of the fleet's probes, if the breaker agrees.
    Probe,
    /// Nothing above the breaker has a say.
    Breaker,
}

/// The override and fleet state of one target.
#[derive(Clone, Debug, Default)]
pub struct Gates {
    /// The policy's override, if any.
    pub forced: Option<Forced>,
    /// The fleet's decision, if any.
    pub fleet: Option<FleetState>,
    /// Fleet probes in flight from this pod.
    pub probes: u32,
}

impl Gates {
    /// What the gates say about a request at `now`; `probe_limit` is the breaker's
    /// `halfOpenProbes`.
    pub fn verdict(&self, now: Instant, probe_limit: u32) -> Verdict {
        if let Some(forced) = self.forced_at(now) {
            return match forced.open {
                true => Verdict::Refuse {
                    since: forced.since,
                    until: forced.until.unwrap_or(now + FOREVER),
                    by: RefusedBy::Override,
                },
                false => Verdict::Allow,
            };
        }
        match &self.fleet {
            Some(FleetState::Open { since, until, .. }) if now < *until => {
                Verdict::Refuse { since: *since, until: *until, by: RefusedBy::Fleet }
            }
            Some(FleetState::HalfOpen { probe: true, .. }) if self.probes < probe_limit => Verdict::Probe,
            Some(FleetState::HalfOpen { since, .. }) => {
                Verdict::Refuse { since: *since, until: now, by: RefusedBy::Fleet }
            }
            Some(FleetState::Open { .. }) | None => Verdict::Breaker,
        }
    }

    /// The override, while it is in force.
    pub fn forced_at(&self, now: Instant) -> Option<&Forced> {
        self.forced.as_ref().filter(|forced| forced.until.is_none_or(|until| now < until))
    }

    /// The fleet's decision, while it has a say.
    pub fn fleet_at(&self, now: Instant) -> Option<&FleetState> {
        self.fleet.as_ref().filter(|state| !matches!(state, FleetState::Open { until, .. } if now >= *until))
    }

    /// Takes the fleet's new decision, keeping `since` when it is the same state.
    pub fn set_fleet(&mut self, state: Option<FleetState>) {
        self.fleet = match (self.fleet.take(), state) {
            (Some(FleetState::Open { since, .. }), Some(FleetState::Open { until, reason, .. })) => {
                Some(FleetState::Open { since, until, reason })
            }
            (Some(FleetState::HalfOpen { since, .. }), Some(FleetState::HalfOpen { probe, reason, .. })) => {
                Some(FleetState::HalfOpen { since, probe, reason })
            }
            (_, state) => state,
        };
    }

    /// Takes the policy's override, keeping `since` when it is the same one.
    pub fn set_forced(&mut self, forced: Option<Forced>) {
        self.forced = match (self.forced.take(), forced) {
            (Some(old), Some(new)) if old.open == new.open && old.reason == new.reason => {
                Some(Forced { since: old.since, ..new })
            }
            (_, forced) => forced,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(now: Instant, secs: u64) -> FleetState {
        FleetState::Open { since: now, until: now + Duration::from_secs(secs), reason: "fleet".into() }
    }

    #[test]
    fn an_override_outranks_the_fleet_and_ends_on_time() {
        let now = Instant::now();
        let mut gates = Gates { fleet: Some(open(now, 60)), ..Gates::default() };
        assert!(matches!(gates.verdict(now, 1), Verdict::Refuse { by: RefusedBy::Fleet, .. }));
        gates.set_forced(Some(Forced {
            open: false,
            since: now,
            until: Some(now + Duration::from_secs(5)),
            reason: "the breaker misjudges it".into(),
        }));
        assert_eq!(gates.verdict(now, 1), Verdict::Allow);
        assert!(
            matches!(gates.verdict(now + Duration::from_secs(5), 1), Verdict::Refuse { by: RefusedBy::Fleet, .. }),
            "the override ended; the fleet's decision stands again"
        );
        gates.set_forced(Some(Forced { open: true, since: now, until: None, reason: "drill".into() }));
        let Verdict::Refuse { by, until, .. } = gates.verdict(now + Duration::from_secs(3600), 1) else {
            panic!("drained")
        };
        assert_eq!((by, until > now + Duration::from_secs(3600 * 24 * 365)), (RefusedBy::Override, true));
    }

    #[test]
    fn the_fleet_lets_only_its_probers_through_and_a_stale_open_hands_back_to_the_breaker() {
        let now = Instant::now();
        let mut gates = Gates { fleet: Some(open(now, 10)), ..Gates::default() };
        assert_eq!(gates.verdict(now + Duration::from_secs(10), 1), Verdict::Breaker);
        assert!(gates.fleet_at(now + Duration::from_secs(10)).is_none());
        gates.set_fleet(Some(FleetState::HalfOpen { since: now, probe: false, reason: "r".into() }));
        assert!(matches!(gates.verdict(now, 1), Verdict::Refuse { by: RefusedBy::Fleet, .. }));
        gates.set_fleet(Some(FleetState::HalfOpen {
            since: now + Duration::from_secs(1),
            probe: true,
            reason: "r".into(),
        }));
        assert!(
            matches!(gates.fleet, Some(FleetState::HalfOpen { since, .. }) if since == now),
            "same state, same since"
        );
        assert_eq!(gates.verdict(now, 2), Verdict::Probe);
        gates.probes = 2;
        assert!(matches!(gates.verdict(now, 2), Verdict::Refuse { .. }), "out of probe slots");
        gates.set_fleet(None);
        assert_eq!(gates.verdict(now, 2), Verdict::Breaker);
    }
}
