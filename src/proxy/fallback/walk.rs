//! Where a request stands in its route's chain: which step, which members of it were tried,
//! which targets cannot serve it. Picking a member is weighted power of two choices over those
//! whose breaker lets a request through.

use std::sync::Arc;

use tokio::time::Instant;

use super::Chance;
use super::controls::drill_names;
use super::record::{Left, Skip, Why};
use crate::health::Permit;
use crate::health::balance::pick;
use crate::health::breaker::{Admission, RefusedBy};
use crate::llm::ChatRequest;
use crate::snapshot::{Route, Step, Target};

/// Where the walk stands in the chain.
#[derive(Clone)]
pub(super) struct Walk<'r> {
    request: &'r ChatRequest,
    chance: Chance,
    chain: &'r [Step],
    /// On a special-purpose chain (`onContextWindowExceeded`, `onContentFiltered`).
    pub(super) switched: bool,
    step: usize,
    tried: Vec<usize>,
    /// Attempts at the current target, the first included.
    pub(super) attempts_here: u32,
    /// Targets that cannot serve this request, and why; filled as steps are reached.
    pub(super) ineligible: Vec<(String, String)>,
    /// A drill's selectors: the targets they name are skipped.
    drill: Vec<String>,
    /// The step the walk starts at.
    start: usize,
}

impl<'r> Walk<'r> {
    pub(super) fn new(route: &'r Route, request: &'r ChatRequest, chance: Chance, drill: Vec<String>) -> Self {
        Walk {
            request,
            chance,
            chain: &route.steps,
            switched: false,
            step: 0,
            tried: Vec::new(),
            attempts_here: 0,
            ineligible: Vec::new(),
            drill,
            start: 0,
        }
    }

    /// Continues a stream that broke at the targets labelled `broken` (the latest last): the
    /// walk starts at the latest one's step (the other members of a group may take over) and
    /// passes them all over.
    pub(super) fn resume_after(&mut self, broken: &[String]) {
        let Some(latest) = broken.last() else { return };
        self.start = self.chain.iter().position(|step| step.members.iter().any(|m| m.label == *latest)).unwrap_or(0);
        let why = "its stream broke mid-answer; the answer continues on another target";
        self.ineligible.extend(broken.iter().map(|label| (label.clone(), why.to_string())));
    }

    fn drilled(&self, target: &Target) -> bool {
        self.drill.iter().any(|selector| drill_names(selector, target))
    }

    /// Whether a target can serve the request faithfully; notes why not, once.
    fn eligible(&mut self, target: &Target) -> bool {
        if self.ineligible.iter().any(|(label, _)| *label == target.label) {
            return false;
        }
        let drilled = self.drilled(target).then(|| "skipped by a fallback drill (`x-backstop-drill`)".to_string());
        match drilled.or_else(|| target.provider.unsupported(self.request)).or_else(|| target.skip_for(self.request)) {
            None => true,
            Some(reason) => {
                self.ineligible.push((target.label.clone(), reason));
                false
            }
        }
    }

    /// Why `target` was passed over without an attempt.
    fn skip_reason(&self, target: &Target, now: Instant) -> Skip {
        if self.drilled(target) {
            return Skip::Drill;
        }
        if self.ineligible.iter().any(|(l, _)| *l == target.label) {
            return Skip::Ineligible;
        }
        if target.spent().is_some() {
            return Skip::SpendLimit;
        }
        match target.health.peek(now) {
            Admission::Refused { by: RefusedBy::Fleet, .. } => Skip::FleetOpen,
            Admission::Refused { by: RefusedBy::Override, .. } => Skip::ForcedOpen,
            _ => Skip::CircuitOpen,
        }
    }

    /// Picks and admits an untried, eligible member of the current step: weighted power of two
    /// choices over the members whose breaker lets a request through.
    pub(super) fn admit_member(&mut self, now: Instant) -> Option<(Arc<Target>, Permit)> {
        let step = self.chain.get(self.step)?;
        let mut excluded = self.tried.clone();
        for (i, member) in step.members.iter().enumerate() {
            // A target whose spend window is spent is out until it rolls, like an open one.
            if !self.eligible(member) || member.spent().is_some() {
                excluded.push(i);
            }
        }
        loop {
            let open: Vec<usize> = (0..step.members.len())
                .filter(|i| !excluded.contains(i))
                .filter(|&i| !matches!(step.members[i].health.peek(now), Admission::Refused { .. }))
                .collect();
            let candidates: Vec<_> =
                open.iter().map(|&i| step.members[i].health.candidate(step.members[i].weight, now)).collect();
            let chosen = open[pick(&candidates, (self.chance.draw(), self.chance.draw()))?];
            let member = &step.members[chosen];
            match member.health.admit(now) {
                Some(permit) => {
                    self.tried.push(chosen);
                    self.attempts_here = 1;
                    return Some((member.clone(), permit));
                }
                // Lost a race for the last probe slot.
                None => excluded.push(chosen),
            }
        }
    }

    fn note_skipped(&self, step: &Step, now: Instant, skipped: &mut Vec<Left>) {
        skipped.extend(
            step.members.iter().map(|m| Left { target: m.label.clone(), why: Why::Skipped(self.skip_reason(m, now)) }),
        );
    }

    /// Moves to the next step that has an admitted member, noting the steps skipped.
    pub(super) fn advance(&mut self, now: Instant, skipped: &mut Vec<Left>) -> Option<(Arc<Target>, Permit)> {
        loop {
            self.step += 1;
            self.tried.clear();
            let step = self.chain.get(self.step)?;
            if let Some(admitted) = self.admit_member(now) {
                return Some(admitted);
            }
            self.note_skipped(step, now, skipped);
        }
    }

    /// The first target: the first admitted one in chain order, or, when every eligible target
    /// is open, the one whose breaker opened earliest (better than failing without trying; a
    /// target an override drains is never tried). `None` when no target can serve the request.
    pub(super) fn first(
        &mut self,
        now: Instant,
        no_fallback: bool,
        skipped: &mut Vec<Left>,
    ) -> Option<(Arc<Target>, Permit)> {
        self.step = self.start;
        if let Some(admitted) = self.admit_member(now) {
            return Some(admitted);
        }
        self.note_skipped(&self.chain[self.start], now, skipped);
        if !no_fallback && let Some(admitted) = self.advance(now, skipped) {
            return Some(admitted);
        }
        let eligible: Vec<(usize, usize)> = self
            .chain
            .iter()
            .enumerate()
            .skip(self.start)
            .take(if no_fallback { 1 } else { usize::MAX })
            .flat_map(|(s, step)| (0..step.members.len()).map(move |m| (s, m)))
            .filter(|&(s, m)| !self.ineligible.iter().any(|(l, _)| *l == self.chain[s].members[m].label))
            .filter(|&(s, m)| {
                !matches!(self.chain[s].members[m].health.peek(now), Admission::Refused { by: RefusedBy::Override, .. })
            })
            // Nor is a target whose spend is capped sent one as a last resort.
            .filter(|&(s, m)| self.chain[s].members[m].spent().is_none())
            .collect();
        let (step, member) =
            eligible.into_iter().min_by_key(|&(s, m)| match self.chain[s].members[m].health.peek(now) {
                Admission::Refused { since, .. } => since,
                _ => now,
            })?;
        self.step = step;
        self.tried = vec![member];
        let target = self.chain[step].members[member].clone();
        skipped.retain(|left| left.target != target.label);
        self.attempts_here = 1;
        let permit = target.health.admit_forced(now);
        Some((target, permit))
    }

    /// Switches to a special-purpose chain (`onContextWindowExceeded`, `onContentFiltered`).
    pub(super) fn switch(
        &mut self,
        chain: &'r [Step],
        now: Instant,
        skipped: &mut Vec<Left>,
    ) -> Option<(Arc<Target>, Permit)> {
        self.chain = chain;
        self.switched = true;
        self.step = 0;
        self.tried.clear();
        if let Some(admitted) = self.admit_member(now) {
            return Some(admitted);
        }
        self.note_skipped(chain.first()?, now, skipped);
        self.advance(now, skipped)
    }
}
