//! Demand: how many users ask for a session each minute, and for how long
//! they stay. The arrivals of a run are drawn once, up front, from their own
//! seeded generator, so every configuration of a sweep faces exactly the same
//! users (common random numbers: differences between rows are the scaler's,
//! not the dice's).

use std::{fmt, path::Path, time::Duration};

use anyhow::{Context as _, bail, ensure};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::Serialize;

use planner::Millis;

use crate::dist;

const MINUTE: Millis = 60_000;
const LENGTH_STREAM: u64 = 0x5bd1_e995_0000_0003;

/// Expected arrivals per minute, minute by minute; a run longer than the
/// curve wraps around (a day curve repeats the next day).
#[derive(Debug, Clone, PartialEq)]
pub struct DemandCurve {
    per_minute: Vec<f64>,
    source: String,
}

/// The built-in day, as fractions of the peak at each hour (linearly
/// interpolated between hours): a streaming service's shape, a trough before
/// dawn, a morning ramp, a daytime plateau and an evening peak at 20:00.
const DIURNAL: [f64; 24] = [
    0.45, 0.30, 0.18, 0.10, 0.06, 0.06, 0.10, 0.20, 0.35, 0.45, 0.50, 0.52, //
    0.55, 0.55, 0.52, 0.52, 0.58, 0.68, 0.80, 0.92, 1.00, 0.95, 0.80, 0.62,
];

impl DemandCurve {
    /// The built-in day curve with `peak` arrivals per minute at 20:00.
    pub fn diurnal(peak: f64) -> Self {
        let per_minute = (0..24 * 60)
            .map(|minute| {
                let hour = minute / 60;
                let within = f64::from(minute % 60) / 60.0;
                let (from, to) = (DIURNAL[hour as usize], DIURNAL[(hour as usize + 1) % 24]);
                peak * (from + (to - from) * within)
            })
            .collect();
        DemandCurve { per_minute, source: format!("built-in diurnal day, peak {peak}/min at 20:00") }
    }

    /// The same rate every minute.
    pub fn constant(per_minute: f64) -> Self {
        DemandCurve { per_minute: vec![per_minute.max(0.0)], source: format!("constant {per_minute}/min") }
    }

    /// A curve from explicit rates (minute 0 first).
    pub fn from_rates(per_minute: Vec<f64>, source: impl Into<String>) -> anyhow::Result<Self> {
        ensure!(!per_minute.is_empty(), "a demand curve needs at least one minute");
        if let Some((minute, rate)) = per_minute.iter().enumerate().find(|(_, r)| !r.is_finite() || **r < 0.0) {
            bail!("minute {minute}: arrivals must be a finite number ≥ 0, not {rate}");
        }
        Ok(DemandCurve { per_minute, source: source.into() })
    }

    /// Reads `minute,arrivals` lines (a header line, blank lines and `#`
    /// comments are skipped; minutes not listed have no arrivals).
    pub fn load_csv(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse_csv(&text, &path.display().to_string()).with_context(|| format!("in {}", path.display()))
    }

    pub fn parse_csv(text: &str, source: &str) -> anyhow::Result<Self> {
        let mut rows: Vec<(usize, f64)> = Vec::new();
        let mut seen_data = false;
        for (index, raw) in text.lines().enumerate() {
            let line_no = index + 1;
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((minute, arrivals)) = line.split_once(',') else {
                bail!("line {line_no}: expected `minute,arrivals`, got {line:?}");
            };
            let (minute, arrivals) = (minute.trim(), arrivals.trim());
            let Ok(minute) = minute.parse::<usize>() else {
                // Only the first row may be a header.
                if !seen_data && minute.parse::<f64>().is_err() {
                    seen_data = true;
                    continue;
                }
                bail!("line {line_no}: minute {minute:?} is not a whole number ≥ 0");
            };
            seen_data = true;
            let arrivals: f64 =
                arrivals.parse().with_context(|| format!("line {line_no}: arrivals {arrivals:?} is not a number"))?;
            ensure!(arrivals.is_finite() && arrivals >= 0.0, "line {line_no}: arrivals must be ≥ 0, not {arrivals}");
            ensure!(minute < 60 * 24 * 366, "line {line_no}: minute {minute} is beyond a year");
            rows.push((minute, arrivals));
        }
        let Some(last) = rows.iter().map(|(minute, _)| *minute).max() else {
            bail!("no `minute,arrivals` rows");
        };
        let mut per_minute = vec![None; last + 1];
        for (minute, arrivals) in rows {
            ensure!(per_minute[minute].is_none(), "minute {minute} is listed twice");
            per_minute[minute] = Some(arrivals);
        }
        Self::from_rates(per_minute.into_iter().map(Option::unwrap_or_default).collect(), source)
    }

    /// The same shape with its busiest minute at `peak` arrivals per minute.
    pub fn scaled_to_peak(mut self, peak: f64) -> Self {
        let current = self.peak();
        if current > 0.0 {
            let factor = peak / current;
            self.per_minute.iter_mut().for_each(|rate| *rate *= factor);
            self.source = format!("{} scaled to peak {peak}/min", self.source);
        }
        self
    }

    pub fn rate_at(&self, minute: usize) -> f64 {
        self.per_minute[minute % self.per_minute.len()]
    }

    pub fn peak(&self) -> f64 {
        self.per_minute.iter().copied().fold(0.0, f64::max)
    }

    pub fn minutes(&self) -> usize {
        self.per_minute.len()
    }

    pub fn source(&self) -> &str {
        &self.source
    }
}

/// How the curve's numbers become users.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Replay {
    /// Each minute's number is the mean of a Poisson process (the built-in
    /// curve, or a forecast): arrivals come with their natural noise.
    Poisson,
    /// Each minute's number, rounded, is how many users arrive in it, at
    /// uniformly random seconds (a recorded trace replayed as it was).
    Exact,
}

impl fmt::Display for Replay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Replay::Poisson => "poisson",
            Replay::Exact => "exact",
        })
    }
}

/// Session lengths: log-normal with the given mean, clamped to `[min, max]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SessionLengths {
    pub mean: Duration,
    pub sigma: f64,
    pub min: Duration,
    pub max: Duration,
}

impl Default for SessionLengths {
    fn default() -> Self {
        // σ = 0.8: median ≈ 29 min, 10% over 80 min; the 8 h cap stands for
        // the client's idle disconnect.
        SessionLengths {
            mean: Duration::from_secs(40 * 60),
            sigma: 0.8,
            min: Duration::from_secs(60),
            max: Duration::from_secs(8 * 3600),
        }
    }
}

impl SessionLengths {
    fn sample(&self, rng: &mut impl Rng) -> Millis {
        let minutes = dist::log_normal(rng, self.mean.as_secs_f64() / 60.0, self.sigma);
        let ms = (minutes * MINUTE as f64).round() as Millis;
        ms.clamp(dist::millis(self.min), dist::millis(self.max).max(dist::millis(self.min)))
    }
}

/// One user asking for a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Arrival {
    pub(crate) at: Millis,
    /// How long the session lasts once it has a box.
    pub(crate) session: Millis,
}

/// What a run's arrivals are drawn from.
#[derive(Debug, Clone, PartialEq)]
pub struct Demand {
    pub curve: DemandCurve,
    pub replay: Replay,
    /// The curve's minute the simulated clock's 0 falls on.
    pub start_minute: usize,
    /// No arrival from this point of the run on (drain-out scenarios).
    pub ends_at: Option<Duration>,
    pub sessions: SessionLengths,
}

impl Demand {
    /// Every arrival of a run that warms up for `lead_in_minutes` and then
    /// measures for `duration`, in order of time. The clock's 0 is the start
    /// of the lead-in, which ends on the curve's `start_minute`; `ends_at`
    /// counts from there too.
    ///
    /// Times and lengths come from two generators: a longer run, or one whose
    /// demand ends earlier, has the same users as a shorter one up to where
    /// they differ.
    pub(crate) fn arrivals(&self, lead_in_minutes: u64, duration: Millis, seed: u64) -> Vec<Arrival> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut lengths = StdRng::seed_from_u64(seed ^ LENGTH_STREAM);
        let lead_in = lead_in_minutes * MINUTE;
        let end = lead_in + self.ends_at.map_or(duration, |at| dist::millis(at).min(duration));
        let curve_minutes = self.curve.minutes() as u64;
        // The curve's minute at the clock's 0 (it wraps, so go back whole days).
        let first_minute =
            (self.start_minute as u64 % curve_minutes + curve_minutes - lead_in_minutes % curve_minutes) as usize;
        let mut arrivals = Vec::new();
        let mut minute: u64 = 0;
        while minute * MINUTE < end {
            let rate = self.curve.rate_at(first_minute + minute as usize);
            let minute_start = minute * MINUTE;
            match self.replay {
                // One Poisson draw per second keeps the arrival times as fine
                // as the simulation's step.
                Replay::Poisson => {
                    for second in 0..60 {
                        let at = minute_start + second * 1000;
                        for _ in 0..dist::poisson(&mut rng, rate / 60.0) {
                            arrivals.push(Arrival { at, session: 0 });
                        }
                    }
                }
                Replay::Exact => {
                    let mut times: Vec<Millis> =
                        (0..rate.round() as u64).map(|_| minute_start + rng.gen_range(0..60) * 1000).collect();
                    times.sort_unstable();
                    arrivals.extend(times.into_iter().map(|at| Arrival { at, session: 0 }));
                }
            }
            minute += 1;
        }
        arrivals.retain(|arrival| arrival.at < end);
        for arrival in &mut arrivals {
            arrival.session = self.sessions.sample(&mut lengths);
        }
        arrivals
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_day_peaks_in_the_evening_and_is_low_at_night() {
        let curve = DemandCurve::diurnal(10.0);
        assert_eq!(curve.minutes(), 1440);
        assert!((curve.peak() - 10.0).abs() < 1e-9);
        assert!((curve.rate_at(20 * 60) - 10.0).abs() < 1e-9);
        assert!(curve.rate_at(4 * 60) < 1.0);
        assert_eq!(curve.rate_at(1440 + 20 * 60), curve.rate_at(20 * 60), "the day wraps");
    }

    #[test]
    fn csv_rows_fill_their_minutes_and_the_rest_is_zero() -> anyhow::Result<()> {
        let curve = DemandCurve::parse_csv("minute,arrivals\n# night\n0, 1.5\n\n3,2\n", "test")?;
        assert_eq!(curve.minutes(), 4);
        assert_eq!((curve.rate_at(0), curve.rate_at(1), curve.rate_at(3)), (1.5, 0.0, 2.0));
        Ok(())
    }

    #[test]
    fn bad_csv_rows_are_refused_with_their_line() {
        for (text, needle) in [
            ("0,1\nx,2\n", "line 2"),
            ("0,1\n1,-3\n", "line 2"),
            ("0,1\n0,2\n", "listed twice"),
            ("0;1\n", "line 1"),
            ("minute,arrivals\n", "no `minute,arrivals` rows"),
            ("0,abc\n", "line 1"),
        ] {
            let error = DemandCurve::parse_csv(text, "test").map(|_| ()).expect_err("refused");
            assert!(format!("{error:#}").contains(needle), "{text:?}: {error:#}");
        }
    }

    #[test]
    fn scaling_keeps_the_shape() {
        let curve = DemandCurve::diurnal(10.0).scaled_to_peak(2.0);
        assert!((curve.peak() - 2.0).abs() < 1e-9);
        assert!((curve.rate_at(10 * 60) - 1.0).abs() < 1e-9);
    }

    fn demand(curve: DemandCurve, replay: Replay) -> Demand {
        Demand { curve, replay, start_minute: 0, ends_at: None, sessions: SessionLengths::default() }
    }

    #[test]
    fn poisson_arrivals_follow_the_rate() {
        let arrivals = demand(DemandCurve::constant(6.0), Replay::Poisson).arrivals(0, 10 * 60 * MINUTE, 7);
        let n = arrivals.len() as f64;
        assert!((n - 3600.0).abs() < 200.0, "{n} arrivals in 10 h at 6/min");
        assert!(arrivals.windows(2).all(|pair| pair[0].at <= pair[1].at));
        let mean_minutes = arrivals.iter().map(|a| a.session as f64).sum::<f64>() / n / MINUTE as f64;
        assert!((mean_minutes - 40.0).abs() < 3.0, "mean session {mean_minutes} min");
    }

    #[test]
    fn exact_replay_places_each_minutes_count_in_it() -> anyhow::Result<()> {
        let curve = DemandCurve::from_rates(vec![3.0, 0.0, 2.0], "test")?;
        let arrivals = demand(curve, Replay::Exact).arrivals(0, 3 * MINUTE, 7);
        let per_minute: Vec<usize> = (0..3).map(|m| arrivals.iter().filter(|a| a.at / MINUTE == m).count()).collect();
        assert_eq!(per_minute, [3, 0, 2]);
        Ok(())
    }

    #[test]
    fn the_lead_in_ends_on_the_start_minute() -> anyhow::Result<()> {
        // Minutes 0..60 busy, 60..120 silent: a run starting at minute 60
        // after an hour's lead-in sees arrivals only in its lead-in.
        let rates: Vec<f64> = (0..120).map(|minute| if minute < 60 { 30.0 } else { 0.0 }).collect();
        let mut demand = demand(DemandCurve::from_rates(rates, "test")?, Replay::Exact);
        demand.start_minute = 60;
        let arrivals = demand.arrivals(60, 60 * MINUTE, 7);
        assert_eq!(arrivals.len(), 60 * 30);
        assert!(arrivals.iter().all(|a| a.at < 60 * MINUTE));
        Ok(())
    }

    #[test]
    fn a_longer_run_has_the_same_users_first() {
        let demand = demand(DemandCurve::diurnal(5.0), Replay::Poisson);
        let short = demand.arrivals(60, 2 * 60 * MINUTE, 3);
        let long = demand.arrivals(60, 5 * 60 * MINUTE, 3);
        assert!(long.len() > short.len());
        assert_eq!(short, long[..short.len()]);
    }

    #[test]
    fn demand_can_end_before_the_run_does() {
        let mut demand = demand(DemandCurve::constant(6.0), Replay::Poisson);
        demand.ends_at = Some(Duration::from_secs(3600));
        let arrivals = demand.arrivals(0, 2 * 60 * MINUTE, 7);
        assert!(!arrivals.is_empty());
        assert!(arrivals.iter().all(|a| a.at < 60 * MINUTE));
    }
}
