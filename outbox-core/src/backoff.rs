//! Exponential backoff with jitter.

use std::time::Duration;

use rand::Rng;

/// Exponential backoff: `base · 2^attempt`, capped at `max`, then scaled by a
/// random factor in `[0.5, 1.0]` so that many failing rows or processes do not
/// retry in lockstep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first delay.
    pub base: Duration,
    /// The largest delay.
    pub max: Duration,
}

impl Backoff {
    /// A backoff from `base` up to `max`.
    pub const fn new(base: Duration, max: Duration) -> Backoff {
        Backoff { base, max }
    }

    /// The delay before retry number `attempt` (0 for the first retry).
    pub fn delay(&self, attempt: u32) -> Duration {
        self.delay_scaled(attempt, Backoff::jitter())
    }

    /// A random factor in `[0.5, 1.0]` for [`delay_scaled`](Self::delay_scaled).
    pub(crate) fn jitter() -> f64 {
        rand::thread_rng().gen_range(0.5..=1.0)
    }

    /// The delay before retry number `attempt`, scaled by `jitter` (in
    /// `[0.5, 1.0]`) instead of a random factor: for decisions that take their
    /// randomness as an argument.
    pub(crate) fn delay_scaled(&self, attempt: u32, jitter: f64) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(30)).unwrap_or(u32::MAX);
        let full = self.base.saturating_mul(factor).min(self.max);
        full.mul_f64(jitter.clamp(0.5, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_until_the_cap_and_jitter_stays_within_half() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        for (attempt, full) in [
            (0, 100),
            (1, 200),
            (2, 400),
            (3, 800),
            (4, 1000),
            (40, 1000),
        ] {
            for _ in 0..50 {
                let d = b.delay(attempt).as_millis() as u64;
                assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d} ms");
            }
        }
    }
}
