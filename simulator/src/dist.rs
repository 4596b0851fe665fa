//! The few random distributions the model needs, written out here rather than
//! pulling in `rand_distr`: each is a handful of lines, and owning them keeps a
//! seed's figures stable for as long as `rand`'s `StdRng` is pinned.

use std::time::Duration;

use rand::Rng;

use planner::Millis;

/// Poisson-distributed count with mean `lambda`. Knuth's product method is
/// exact and cheap for the small means of one simulated step; beyond 30 the
/// normal approximation is within rounding of the real thing and does not
/// underflow `exp(-lambda)`.
pub(crate) fn poisson(rng: &mut impl Rng, lambda: f64) -> u32 {
    if lambda <= 0.0 {
        return 0;
    }
    if lambda > 30.0 {
        let draw = lambda + lambda.sqrt() * standard_normal(rng);
        return draw.round().max(0.0) as u32;
    }
    let limit = (-lambda).exp();
    let mut product: f64 = rng.r#gen();
    let mut count = 0;
    while product > limit {
        product *= rng.r#gen::<f64>();
        count += 1;
    }
    count
}

/// Standard normal by Box–Muller (one of the pair is enough here).
pub(crate) fn standard_normal(rng: &mut impl Rng) -> f64 {
    // 1 - u keeps the logarithm's argument in (0, 1].
    let u1: f64 = 1.0 - rng.r#gen::<f64>();
    let u2: f64 = rng.r#gen();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Log-normal with the given *mean* (not median) and shape `sigma`: the
/// median is `mean / exp(sigma² / 2)`, so most sessions are shorter than the
/// mean and a long tail holds the rest, as streaming sessions do.
pub(crate) fn log_normal(rng: &mut impl Rng, mean: f64, sigma: f64) -> f64 {
    let mu = mean.ln() - sigma * sigma / 2.0;
    (mu + sigma * standard_normal(rng)).exp()
}

/// A uniformly random duration in `[low, high]`, in milliseconds; `high <
/// low` reads as `low`.
pub(crate) fn uniform_millis(rng: &mut impl Rng, low: Duration, high: Duration) -> Millis {
    let low = millis(low);
    let high = millis(high).max(low);
    rng.gen_range(low..=high)
}

/// A probability draw; 0 never fires, 1 always does.
pub(crate) fn chance(rng: &mut impl Rng, probability: f64) -> bool {
    probability > 0.0 && rng.r#gen::<f64>() < probability
}

/// A duration on the simulated clock.
pub(crate) fn millis(duration: Duration) -> Millis {
    u64::try_from(duration.as_millis()).unwrap_or(Millis::MAX)
}

#[cfg(test)]
mod tests {
    use rand::{SeedableRng, rngs::StdRng};

    use super::*;

    fn mean_of(samples: impl Iterator<Item = f64>) -> f64 {
        let (sum, n) = samples.fold((0.0, 0u32), |(sum, n), x| (sum + x, n + 1));
        sum / f64::from(n)
    }

    #[test]
    fn poisson_has_its_mean_for_small_and_large_lambdas() {
        let mut rng = StdRng::seed_from_u64(1);
        for lambda in [0.05, 1.5, 12.0, 80.0] {
            let mean = mean_of((0..40_000).map(|_| f64::from(poisson(&mut rng, lambda))));
            assert!((mean - lambda).abs() < 0.05 * lambda + 0.01, "lambda {lambda}: mean {mean}");
        }
        assert_eq!(poisson(&mut rng, 0.0), 0);
    }

    #[test]
    fn log_normal_has_the_mean_it_is_given() {
        let mut rng = StdRng::seed_from_u64(2);
        let mean = mean_of((0..100_000).map(|_| log_normal(&mut rng, 40.0, 0.8)));
        assert!((mean - 40.0).abs() < 1.0, "mean {mean}");
    }

    #[test]
    fn uniform_millis_stays_in_its_bounds() {
        let mut rng = StdRng::seed_from_u64(3);
        let (low, high) = (Duration::from_secs(90), Duration::from_secs(240));
        assert!((0..1000).map(|_| uniform_millis(&mut rng, low, high)).all(|ms| (90_000..=240_000).contains(&ms)));
        assert_eq!(uniform_millis(&mut rng, high, low), 240_000, "an inverted range is its low end");
    }
}
