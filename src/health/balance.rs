//! Balancing inputs: a peak-EWMA latency estimate per target, and weighted power of two
//! choices over a step's members.
//!
//! Written here rather than taken from `tower::balance`: that balancer picks among `Service`s
//! that report readiness, with no weights, no saturation from rate-limit headers and no way to
//! exclude members a request already tried or that cannot serve it; here a pick is a pure
//! function of a few numbers, tested directly.

use std::time::Duration;

use tokio::time::Instant;

/// How fast the latency estimate forgets: after this long, an old sample weighs 1/e.
const LATENCY_DECAY: Duration = Duration::from_secs(10);

/// Latency estimate that jumps up at once and decays down slowly (Finagle's and Linkerd's
/// "peak EWMA"), so a slowing target is avoided quickly and trusted again gradually.
#[derive(Clone, Copy, Debug)]
pub struct PeakEwma {
    seconds: f64,
    stamp: Option<Instant>,
}

impl PeakEwma {
    /// No samples yet: an estimate of zero, so a new target gets tried.
    pub fn new() -> Self {
        PeakEwma { seconds: 0.0, stamp: None }
    }

    /// Adds one observed latency.
    pub fn observe(&mut self, now: Instant, latency: Duration) {
        let sample = latency.as_secs_f64();
        match self.stamp {
            Some(stamp) if sample <= self.seconds => {
                let age = now.saturating_duration_since(stamp).as_secs_f64();
                let keep = (-age / LATENCY_DECAY.as_secs_f64()).exp();
                self.seconds = self.seconds * keep + sample * (1.0 - keep);
            }
            _ => self.seconds = sample,
        }
        self.stamp = Some(now);
    }

    /// The estimate, in seconds.
    pub fn seconds(&self) -> f64 {
        self.seconds
    }
}

impl Default for PeakEwma {
    fn default() -> Self {
        PeakEwma::new()
    }
}

/// What the balancer knows of one group member.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Candidate {
    /// Its configured weight.
    pub weight: u32,
    /// Expected cost of one more request: latency × (in flight + 1).
    pub cost: f64,
    /// The provider said it is out of requests or tokens until its reset.
    pub saturated: bool,
}

/// Power of two choices by weight: draws two distinct candidates in proportion to their
/// weights (`draws` uniform in `[0, 1)`) and keeps the cheaper one. Saturated candidates are
/// drawn only when every candidate is saturated.
pub fn pick(candidates: &[Candidate], draws: (f64, f64)) -> Option<usize> {
    let any_fresh = candidates.iter().any(|c| !c.saturated);
    let pool: Vec<usize> = (0..candidates.len()).filter(|&i| !any_fresh || !candidates[i].saturated).collect();
    let weighted = |pool: &[usize], draw: f64| -> Option<usize> {
        let total: u64 = pool.iter().map(|&i| u64::from(candidates[i].weight.max(1))).sum();
        let point = (total as f64 * draw.clamp(0.0, 0.999_999_999)) as u64;
        let mut passed = 0;
        for &i in pool {
            passed += u64::from(candidates[i].weight.max(1));
            if point < passed {
                return Some(i);
            }
        }
        pool.last().copied()
    };
    let first = weighted(&pool, draws.0)?;
    let rest: Vec<usize> = pool.iter().copied().filter(|&i| i != first).collect();
    let Some(second) = weighted(&rest, draws.1) else { return Some(first) };
    Some(if candidates[second].cost < candidates[first].cost { second } else { first })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(weight: u32, cost: f64, saturated: bool) -> Candidate {
        Candidate { weight, cost, saturated }
    }

    #[test]
    fn two_choices_keep_the_cheaper() {
        let c = [candidate(1, 5.0, false), candidate(1, 1.0, false)];
        assert_eq!(pick(&c, (0.1, 0.5)), Some(1));
        assert_eq!(pick(&c, (0.9, 0.5)), Some(1));
        assert_eq!(pick(&[candidate(1, 1.0, false)], (0.3, 0.3)), Some(0));
        assert_eq!(pick(&[], (0.3, 0.3)), None);
    }

    #[test]
    fn weights_decide_who_is_drawn() {
        // Three equal-cost candidates: the first drawn wins ties, so the draw shows the weights.
        let c = [candidate(8, 1.0, false), candidate(1, 1.0, false), candidate(1, 1.0, false)];
        let firsts: Vec<usize> = (0..10).map(|i| pick(&c, (f64::from(i) / 10.0, 0.0)).expect("pick")).collect();
        assert_eq!(firsts, [0, 0, 0, 0, 0, 0, 0, 0, 1, 2]);
    }

    #[test]
    fn saturated_members_are_avoided_while_others_have_headroom() {
        let c = [candidate(100, 0.0, true), candidate(1, 9.0, false)];
        for draw in [0.0, 0.5, 0.99] {
            assert_eq!(pick(&c, (draw, draw)), Some(1));
        }
        let all = [candidate(1, 2.0, true), candidate(1, 1.0, true)];
        assert_eq!(pick(&all, (0.0, 0.9)), Some(1));
    }

    #[tokio::test(start_paused = true)]
    async fn peak_ewma_jumps_up_and_decays_down() {
        let mut e = PeakEwma::new();
        let t0 = Instant::now();
        e.observe(t0, Duration::from_millis(100));
        e.observe(t0, Duration::from_millis(500));
        assert!((e.seconds() - 0.5).abs() < 1e-9, "a slower sample is taken at once");
        e.observe(t0 + LATENCY_DECAY, Duration::from_millis(100));
        let expected = 0.5 / std::f64::consts::E + 0.1 * (1.0 - 1.0 / std::f64::consts::E);
        assert!((e.seconds() - expected).abs() < 1e-9, "{} vs {expected}", e.seconds());
    }
}
