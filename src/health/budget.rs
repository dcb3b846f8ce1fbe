//! The retry budget: retries, fall-throughs and hedges together may add at most a share of
//! recent requests, plus a small floor per second, so an outage is never multiplied by retry
//! storms. Linkerd's retry budget, over a ten-second window.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::chain::BudgetSettings;

/// Requests and extra attempts over a sliding window, in one-tenth buckets.
#[derive(Clone, Debug)]
pub struct RetryBudget {
    settings: BudgetSettings,
    bucket: Duration,
    buckets: VecDeque<(Instant, u64, u64)>,
}

impl RetryBudget {
    /// An empty budget.
    pub fn new(settings: BudgetSettings) -> Self {
        RetryBudget {
            settings,
            bucket: (settings.window / 10).max(Duration::from_millis(10)),
            buckets: VecDeque::new(),
        }
    }

    /// Replaces the settings (a policy reload), keeping the counts.
    pub fn reconfigure(&mut self, settings: BudgetSettings) {
        self.settings = settings;
    }

    /// A request arrived.
    pub fn deposit(&mut self, now: Instant) {
        self.slot(now).1 += 1;
    }

    /// Asks for one extra attempt; `false` means the budget is spent.
    pub fn withdraw(&mut self, now: Instant) -> bool {
        if self.available(now) < 1.0 {
            return false;
        }
        self.slot(now).2 += 1;
        true
    }

    /// Extra attempts that would be allowed now.
    pub fn available(&mut self, now: Instant) -> f64 {
        self.expire(now);
        let (requests, extra) = self.totals();
        let floor = f64::from(self.settings.min_per_second) * self.settings.window.as_secs_f64();
        floor + requests as f64 * f64::from(self.settings.percent) / 100.0 - extra as f64
    }

    /// Whether any extra attempt was made within the window.
    pub fn spent(&mut self, now: Instant) -> bool {
        self.expire(now);
        self.totals().1 > 0
    }

    /// Requests and extra attempts in the window.
    pub fn totals(&self) -> (u64, u64) {
        self.buckets.iter().fold((0, 0), |(r, e), (_, requests, extra)| (r + requests, e + extra))
    }

    fn expire(&mut self, now: Instant) {
        while self
            .buckets
            .front()
            .is_some_and(|(start, _, _)| now.saturating_duration_since(*start) >= self.settings.window)
        {
            self.buckets.pop_front();
        }
    }

    fn slot(&mut self, now: Instant) -> &mut (Instant, u64, u64) {
        self.expire(now);
        let fresh =
            self.buckets.back().is_none_or(|(start, _, _)| now.saturating_duration_since(*start) >= self.bucket);
        if fresh {
            self.buckets.push_back((now, 0, 0));
        }
        // Just pushed when empty.
        let last = self.buckets.len() - 1;
        &mut self.buckets[last]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(percent: u32, min_per_second: u32) -> RetryBudget {
        RetryBudget::new(BudgetSettings { percent, min_per_second, window: Duration::from_secs(10) })
    }

    #[tokio::test(start_paused = true)]
    async fn extra_attempts_are_a_share_of_requests() {
        let mut b = budget(20, 0);
        let now = Instant::now();
        for _ in 0..100 {
            b.deposit(now);
        }
        let granted = (0..100).filter(|_| b.withdraw(now)).count();
        assert_eq!(granted, 20);
    }

    #[tokio::test(start_paused = true)]
    async fn the_floor_allows_a_few_with_no_traffic() {
        let mut b = budget(20, 1);
        let now = Instant::now();
        let granted = (0..100).filter(|_| b.withdraw(now)).count();
        assert_eq!(granted, 10, "one per second over a ten-second window");
    }

    #[tokio::test(start_paused = true)]
    async fn spent_budget_returns_as_the_window_moves() {
        let mut b = budget(50, 0);
        let t0 = Instant::now();
        for _ in 0..10 {
            b.deposit(t0);
        }
        assert_eq!((0..10).filter(|_| b.withdraw(t0)).count(), 5);
        assert!(!b.withdraw(t0 + Duration::from_secs(5)));
        let later = t0 + Duration::from_secs(11);
        for _ in 0..4 {
            b.deposit(later);
        }
        assert_eq!(
            (0..10).filter(|_| b.withdraw(later)).count(),
            2,
            "the old requests and retries have left the window"
        );
    }
}
