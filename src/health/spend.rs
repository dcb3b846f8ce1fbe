//! A target's spend against its `spendLimit`: what this pod's attempts at it cost in the
//! current window (reported to the operator whole, every time, so that an operator that
//! restarts or takes over the lead has the fleet's sum again within a report), and the
//! fleet's word that the window is spent.
//!
//! Windows are aligned to the Unix epoch (a `1h` window starts on the hour), so every pod and
//! the operator agree on them without talking. The pod's own count is a lower bound on the
//! fleet's: it passes the target over once it alone reaches the limit, which keeps the cap
//! while the operator is away; the operator, adding every pod's reports, says when the fleet
//! has. Both end with the window, by each pod's own clock.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

use crate::chain::SpendLimit;

/// Milliseconds since the Unix epoch, now.
pub fn unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The window `at` (Unix ms) falls in, for windows of `per`.
pub fn window_of(at: i64, per: Duration) -> i64 {
    let per = i64::try_from(per.as_millis()).unwrap_or(i64::MAX).max(1);
    at.div_euclid(per)
}

/// When window `window` of `per` ends, in Unix ms.
pub fn window_end(window: i64, per: Duration) -> i64 {
    let per = i64::try_from(per.as_millis()).unwrap_or(i64::MAX).max(1);
    window.saturating_add(1).saturating_mul(per)
}

#[derive(Debug, Default)]
struct Count {
    /// The window counted.
    window: i64,
    /// What this pod spent in it.
    spent: f64,
    /// The window the fleet said is spent (this one, or, when this pod's clock is behind the
    /// operator's, the next), and what it had spent when it said so.
    fleet: Option<(i64, f64)>,
}

/// Why a target is passed over: its window is spent.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spent {
    /// What was spent in the window: the fleet's sum when the fleet said so, else this pod's.
    pub usd: f64,
    /// The limit.
    pub limit: f64,
    /// When the window ends, in Unix ms.
    pub until: i64,
    /// The fleet said so (not only this pod's count).
    pub fleet: bool,
}

/// One target's spend against its limit, shared by every key of its provider and kept across
/// reloads.
#[derive(Debug)]
pub struct SpendGuard {
    limit: Mutex<SpendLimit>,
    count: Mutex<Count>,
}

impl SpendGuard {
    /// A guard for `limit`, nothing spent.
    pub fn new(limit: SpendLimit) -> SpendGuard {
        SpendGuard { limit: Mutex::new(limit), count: Mutex::default() }
    }

    /// What the spend is counted under, fleet-wide.
    pub fn key(&self) -> String {
        self.limit.lock().key.clone()
    }

    /// Takes a reloaded policy's limit.
    pub fn reconfigure(&self, limit: SpendLimit) {
        *self.limit.lock() = limit;
    }

    fn current(&self, at: i64) -> (parking_lot::MutexGuard<'_, Count>, SpendLimit) {
        let limit = self.limit.lock().clone();
        let window = window_of(at, limit.per);
        let mut count = self.count.lock();
        if count.window != window {
            // A new window: what the last one spent, reported or not, no longer counts.
            let fleet = count.fleet.filter(|(w, _)| *w == window);
            *count = Count { window, fleet, ..Count::default() };
        }
        (count, limit)
    }

    /// Counts an attempt that cost `usd` at `at` (Unix ms).
    pub fn charge(&self, at: i64, usd: f64) {
        if !(usd.is_finite() && usd > 0.0) {
            return;
        }
        let (mut count, _) = self.current(at);
        count.spent += usd;
    }

    /// Whether the window `at` falls in is spent, and by how much.
    pub fn spent(&self, at: i64) -> Option<Spent> {
        let (count, limit) = self.current(at);
        let until = window_end(count.window, limit.per);
        if let Some((_, usd)) = count.fleet.filter(|(window, _)| *window == count.window) {
            return Some(Spent { usd: usd.max(count.spent), limit: limit.usd, until, fleet: true });
        }
        (count.spent >= limit.usd).then_some(Spent { usd: count.spent, limit: limit.usd, until, fleet: false })
    }

    /// What this pod has spent in the current window, as `(window, usd)`; `None` when nothing.
    pub fn report(&self, at: i64) -> Option<(i64, f64)> {
        let (count, _) = self.current(at);
        (count.spent > 0.0).then_some((count.window, count.spent))
    }

    /// The fleet's word: window `window` is spent, `usd` of it (`None`: the fleet says nothing).
    /// A word about the next window (the operator's clock is ahead of this pod's) holds once
    /// this pod's clock gets there.
    pub fn set_fleet(&self, at: i64, spent: Option<(i64, f64)>) {
        let (mut count, _) = self.current(at);
        count.fleet = spent.filter(|(window, _)| *window >= count.window);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000;

    fn guard(usd: f64) -> SpendGuard {
        SpendGuard::new(SpendLimit { key: "shop/chat\u{1f}claude/opus".into(), usd, per: Duration::from_secs(3600) })
    }

    #[test]
    fn a_pod_passes_a_target_over_once_it_alone_spent_the_window_and_takes_it_back_when_it_rolls() {
        let spend = guard(10.0);
        let nine = 9 * HOUR;
        spend.charge(nine + 1_000, 6.0);
        assert_eq!(spend.spent(nine + 2_000), None, "6 of 10");
        spend.charge(nine + 3_000, 4.5);
        let spent = spend.spent(nine + 4_000).expect("10.5 of 10");
        assert_eq!((spent.usd, spent.limit, spent.until, spent.fleet), (10.5, 10.0, 10 * HOUR, false));
        assert_eq!(spend.spent(10 * HOUR), None, "a new window starts on the hour");
        assert_eq!(spend.report(10 * HOUR), None, "the last window's spend is not reported into this one");
    }

    #[test]
    fn reports_carry_the_window_s_whole_spend_and_the_fleet_s_word_holds_for_its_window() {
        let spend = guard(100.0);
        spend.charge(HOUR + 10, 1.25);
        spend.charge(HOUR + 20, 0.75);
        assert_eq!(spend.report(HOUR + 30), Some((1, 2.0)));
        spend.charge(HOUR + 35, 1.0);
        assert_eq!(spend.report(HOUR + 40), Some((1, 3.0)), "the window's whole spend, every time");
        spend.set_fleet(HOUR + 50, Some((1, 100.5)));
        let spent = spend.spent(HOUR + 60).expect("the fleet spent it");
        assert_eq!((spent.usd, spent.fleet), (100.5, true));
        spend.set_fleet(HOUR + 70, Some((0, 200.0)));
        assert_eq!(spend.spent(HOUR + 80), None, "a past window's word says nothing of this one");
        spend.set_fleet(HOUR + 90, Some((1, 100.5)));
        assert!(spend.spent(2 * HOUR - 1).is_some());
        assert_eq!(spend.spent(2 * HOUR), None, "the fleet's word ends with its window, by the pod's clock");
        spend.set_fleet(2 * HOUR + 5, None);
        assert_eq!(spend.spent(2 * HOUR + 6), None);
        // The operator's clock is ahead: its word about the next window waits for it.
        spend.set_fleet(3 * HOUR - 10, Some((3, 120.0)));
        assert_eq!(spend.spent(3 * HOUR - 5), None, "not this window");
        assert!(spend.spent(3 * HOUR + 1).is_some_and(|s| s.fleet), "the next one, once this pod gets there");
    }
}
