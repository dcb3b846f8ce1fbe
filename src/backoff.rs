//! Doubling waits, capped, and the two ways Backstop spreads them: one rule for every place
//! that waits longer after each failure (retries between attempts, breaker and fleet open
//! periods, the sidecar's reconnects, a replica's forwarding to the leader, the operator's
//! reconcile requeues).
//!
//! Pure arithmetic over a draw the caller supplies, so each use is tested with fixed draws in
//! paused time. (A backoff crate's iterator draws its own jitter and adds it on top of the
//! delay, which fits neither the retry walk's injected chance nor the spread kept below the
//! cap here.)

use std::time::Duration;

/// Waits that double from `first` up to `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The first wait.
    pub first: Duration,
    /// The longest.
    pub max: Duration,
}

impl Backoff {
    /// Doubling from `first` up to `max`.
    pub const fn new(first: Duration, max: Duration) -> Backoff {
        Backoff { first, max }
    }

    /// The wait after `doublings` doublings: `first · 2^doublings`, capped at `max`.
    pub fn after(&self, doublings: u32) -> Duration {
        self.first.saturating_mul(1u32 << doublings.min(31)).min(self.max)
    }

    /// The `n`-th wait, counted from 1 (the first is `first`); 0 counts as 1.
    pub fn nth(&self, n: u32) -> Duration {
        self.after(n.saturating_sub(1))
    }
}

/// Half of `delay` fixed, half drawn ("equal jitter"): waits spread out but never shrink below
/// half. `draw` is uniform in `[0, 1)`.
pub fn equal_jitter(delay: Duration, draw: f64) -> Duration {
    let half = delay / 2;
    half + half.mul_f64(draw.clamp(0.0, 1.0))
}

/// `delay` scaled into `[10%, 100%]` by `draw` in `[0, 1]`: reconnecting clients spread out
/// after a shared outage instead of returning together.
pub fn spread(delay: Duration, draw: f64) -> Duration {
    delay.mul_f64(0.1 + 0.9 * draw.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_to_their_cap_and_never_overflow() {
        let backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
        let waits: Vec<u128> = (0..9).map(|n| backoff.after(n).as_millis()).collect();
        assert_eq!(waits, [250, 500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]);
        assert_eq!(backoff.after(u32::MAX), Duration::from_secs(30));
        assert_eq!(
            (backoff.nth(0), backoff.nth(1), backoff.nth(3)),
            (backoff.after(0), backoff.after(0), backoff.after(2))
        );
        let minutes = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));
        assert_eq!(minutes.nth(10), Duration::from_secs(300), "the cap is reached, not a shorter power of two");
    }

    #[test]
    fn jitter_stays_within_its_bounds() {
        let delay = Duration::from_secs(8);
        assert_eq!(
            (equal_jitter(delay, 0.0), equal_jitter(delay, 0.5)),
            (Duration::from_secs(4), Duration::from_secs(6))
        );
        assert!(equal_jitter(delay, 0.999_999) < delay);
        assert_eq!(equal_jitter(delay, 7.0), delay, "a draw out of range is clamped");
        assert_eq!((spread(delay, 0.0), spread(delay, 1.0)), (Duration::from_millis(800), delay));
    }
}
