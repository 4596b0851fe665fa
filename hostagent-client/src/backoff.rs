//! Reconnect backoff: exponential growth with full jitter.

use std::time::Duration;

use rand::Rng;

/// Exponential backoff between reconnect attempts.
///
/// Attempt `n` (counting from 0) waits a uniformly random time in
/// `[0, min(max, initial * multiplier^n)]` ("full jitter"), so a fleet of hosts
/// that lost the control plane at the same moment does not come back in lockstep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Ceiling of the first delay.
    pub initial: Duration,
    /// Largest delay; also the delay after a rejection that retrying fast cannot fix.
    pub max: Duration,
    /// Growth factor of the ceiling per consecutive failure (values below 1 count as 1).
    pub multiplier: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { initial: Duration::from_millis(50), max: Duration::from_secs(5), multiplier: 2.0 }
    }
}

impl Backoff {
    /// Upper bound of the delay before attempt `attempt` (0-based).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let max = self.max;
        let initial = self.initial.min(max);
        let multiplier = if self.multiplier.is_finite() && self.multiplier >= 1.0 { self.multiplier } else { 1.0 };
        let exponent = i32::try_from(attempt).unwrap_or(i32::MAX);
        let secs = initial.as_secs_f64() * multiplier.powi(exponent);
        if !secs.is_finite() || secs >= max.as_secs_f64() {
            return max;
        }
        Duration::try_from_secs_f64(secs).map_or(max, |d| d.min(max))
    }

    /// A jittered delay before attempt `attempt`: uniform in `[0, ceiling(attempt)]`.
    pub fn delay(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling(attempt);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.gen_range(0..=nanos))
    }

    /// How long a connection must have lasted for the next failure to start
    /// again from `initial`: longer than the longest delay (at least a second).
    pub fn reset_after(&self) -> Duration {
        self.max.max(Duration::from_secs(1))
    }
}

/// Consecutive-failure counter over a [`Backoff`].
#[derive(Debug, Clone)]
pub(crate) struct BackoffSchedule {
    backoff: Backoff,
    attempt: u32,
}

impl BackoffSchedule {
    pub(crate) fn new(backoff: Backoff) -> Self {
        Self { backoff, attempt: 0 }
    }

    /// Delay before the next attempt; each call grows the ceiling until it reaches `max`.
    pub(crate) fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let delay = self.backoff.delay(self.attempt, rng);
        if self.backoff.ceiling(self.attempt) < self.backoff.max {
            self.attempt = self.attempt.saturating_add(1);
        }
        delay
    }

    /// Consecutive failures counted so far (stops growing once the ceiling is `max`).
    #[cfg(test)]
    pub(crate) fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Starts over from `initial` (after a connection that lasted a while).
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn default_is_50ms_5s_x2() {
        let b = Backoff::default();
        assert_eq!(b.initial, 50 * MS);
        assert_eq!(b.max, Duration::from_secs(5));
        assert_eq!(b.multiplier, 2.0);
    }

    #[test]
    fn ceiling_grows_then_caps() {
        let b = Backoff::default();
        let ceilings: Vec<_> = (0..10).map(|n| b.ceiling(n)).collect();
        assert_eq!(
            ceilings,
            vec![
                50 * MS,
                100 * MS,
                200 * MS,
                400 * MS,
                800 * MS,
                1600 * MS,
                3200 * MS,
                5000 * MS,
                5000 * MS,
                5000 * MS
            ]
        );
        assert_eq!(b.ceiling(u32::MAX), b.max);
    }

    #[test]
    fn odd_settings_are_tamed() {
        let shrinking = Backoff { initial: 10 * MS, max: 100 * MS, multiplier: 0.5 };
        assert_eq!(shrinking.ceiling(5), 10 * MS);
        let nan = Backoff { multiplier: f64::NAN, ..shrinking };
        assert_eq!(nan.ceiling(5), 10 * MS);
        let initial_above_max =
            Backoff { initial: Duration::from_secs(9), max: Duration::from_secs(1), multiplier: 2.0 };
        assert_eq!(initial_above_max.ceiling(0), Duration::from_secs(1));
        let huge = Backoff { multiplier: 1e300, ..Backoff::default() };
        assert_eq!(huge.ceiling(3), huge.max);
    }

    #[test]
    fn jitter_stays_within_bounds_and_varies() {
        let b = Backoff::default();
        let mut rng = StdRng::seed_from_u64(7);
        for attempt in 0..12 {
            let ceiling = b.ceiling(attempt);
            let delays: Vec<_> = (0..200).map(|_| b.delay(attempt, &mut rng)).collect();
            assert!(delays.iter().all(|d| *d <= ceiling), "attempt {attempt}");
            let distinct: std::collections::HashSet<_> = delays.iter().collect();
            assert!(distinct.len() > 100, "jitter should spread delays");
            // Full jitter: some delays fall in the lower half of the range.
            assert!(delays.iter().any(|d| *d < ceiling / 2));
        }
    }

    #[test]
    fn schedule_grows_caps_and_resets() {
        let b = Backoff { initial: 10 * MS, max: 40 * MS, multiplier: 2.0 };
        let mut schedule = BackoffSchedule::new(b);
        let mut rng = StdRng::seed_from_u64(1);
        let mut attempts = Vec::new();
        for _ in 0..6 {
            attempts.push(schedule.attempt());
            let delay = schedule.next_delay(&mut rng);
            assert!(delay <= 40 * MS);
        }
        // 10, 20, 40 ms ceilings, then stays at the cap.
        assert_eq!(attempts, vec![0, 1, 2, 2, 2, 2]);
        schedule.reset();
        assert_eq!(schedule.attempt(), 0);
        assert!(schedule.next_delay(&mut rng) <= 10 * MS);
    }

    #[test]
    fn zero_initial_never_waits() {
        let b = Backoff { initial: Duration::ZERO, max: Duration::from_secs(1), multiplier: 2.0 };
        let mut rng = StdRng::seed_from_u64(3);
        assert_eq!(b.delay(4, &mut rng), Duration::ZERO);
    }

    #[test]
    fn reset_after_is_at_least_a_second() {
        assert_eq!(Backoff::default().reset_after(), Duration::from_secs(5));
        let short = Backoff { max: 100 * MS, ..Backoff::default() };
        assert_eq!(short.reset_after(), Duration::from_secs(1));
    }
}
