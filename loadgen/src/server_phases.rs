//! The server's own account of where an Allocate's time went: its phase
//! histograms (`/metrics`, see `switchboard::metrics`), read at a window's
//! start and end and differenced, so the figures cover that window only.
//! Percentiles are interpolated within the histogram's fixed buckets.

use std::collections::BTreeMap;

use serde::Serialize;

/// The histograms and counters of one reading (or of the difference of two).
#[derive(Debug, Clone, Default)]
pub(crate) struct Reading {
    /// By label value (`claim`, `assign`, …, and `claim batch` for the
    /// writer's histogram): cumulative counts per upper bound, in seconds.
    histograms: BTreeMap<String, Histogram>,
    /// `switchboard_claim_batches_total` and `switchboard_claims_batched_total`.
    batches: u64,
    claims: u64,
}

#[derive(Debug, Clone, Default)]
struct Histogram {
    /// (upper bound in seconds, observations at or below it), rising; the
    /// last bound is infinite.
    cumulative: Vec<(f64, u64)>,
    sum_s: f64,
}

/// One phase over a window, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct PhaseFigures {
    pub(crate) phase: String,
    pub(crate) count: u64,
    pub(crate) mean_ms: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p90_ms: f64,
    pub(crate) p99_ms: f64,
    /// The upper bound of the highest bucket holding an observation (the
    /// slowest call took at most this; infinite: beyond the last bound).
    pub(crate) max_bound_ms: f64,
}

/// What the server measured over a window.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct ServerPhases {
    /// Allocate's phases in the order a call passes them, then the claim
    /// writer's store call per batch.
    pub(crate) phases: Vec<PhaseFigures>,
    /// Claims per store write in Allocate's group commit.
    pub(crate) claims_per_batch: f64,
}

/// The order of the phases in reports.
const ORDER: [&str; 7] = ["auth", "checks", "claim", "claim batch", "claim_alone", "assign", "handler"];

/// Reads `endpoint`'s `/metrics` with the admin token; None (and a line on
/// stderr) if it cannot, so that a run goes on without the figures.
pub(crate) async fn read(endpoint: &str, admin_token: &str) -> Option<Reading> {
    let url = format!("{endpoint}/metrics");
    let response = reqwest::Client::new().get(&url).bearer_auth(admin_token).send().await;
    let text = match response {
        Ok(response) if response.status().is_success() => response.text().await.ok(),
        Ok(response) => {
            eprintln!("loadgen: {url} answered {}", response.status());
            None
        }
        Err(error) => {
            eprintln!("loadgen: could not read {url}: {error}");
            None
        }
    };
    text.map(|text| Reading::parse(&text))
}

impl Reading {
    pub(crate) fn parse(text: &str) -> Reading {
        let mut reading = Reading::default();
        for line in text.lines().filter(|line| !line.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else { continue };
            let Ok(value) = value.parse::<f64>() else { continue };
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels.trim_end_matches('}')),
                None => (series, ""),
            };
            let label = |key: &str| {
                labels.split(',').find_map(|pair| pair.strip_prefix(key)?.strip_prefix("=\"")?.strip_suffix('"'))
            };
            let histogram_name = match (label("phase"), label("writer")) {
                (Some(phase), _) => phase.to_owned(),
                (None, Some("claims")) => "claim batch".to_owned(),
                _ => String::new(),
            };
            if name == "switchboard_claim_batches_total" {
                reading.batches = value as u64;
            } else if name == "switchboard_claims_batched_total" {
                reading.claims = value as u64;
            } else if histogram_name.is_empty() {
                continue;
            } else if name.ends_with("_bucket") {
                let bound = match label("le") {
                    Some("+Inf") => f64::INFINITY,
                    Some(bound) => match bound.parse() {
                        Ok(bound) => bound,
                        Err(_) => continue,
                    },
                    None => continue,
                };
                reading.histograms.entry(histogram_name).or_default().cumulative.push((bound, value as u64));
            } else if name.ends_with("_sum") {
                reading.histograms.entry(histogram_name).or_default().sum_s = value;
            }
        }
        reading
    }

    /// What happened between `self` and the `later` reading.
    pub(crate) fn until(&self, later: &Reading) -> Reading {
        let histograms = later
            .histograms
            .iter()
            .map(|(name, after)| {
                let before = self.histograms.get(name);
                let cumulative = after
                    .cumulative
                    .iter()
                    .enumerate()
                    .map(|(index, (bound, count))| {
                        let earlier = before.and_then(|before| before.cumulative.get(index)).map_or(0, |(_, n)| *n);
                        (*bound, count.saturating_sub(earlier))
                    })
                    .collect();
                let sum_s = after.sum_s - before.map_or(0.0, |before| before.sum_s);
                (name.clone(), Histogram { cumulative, sum_s })
            })
            .collect();
        Reading {
            histograms,
            batches: later.batches.saturating_sub(self.batches),
            claims: later.claims.saturating_sub(self.claims),
        }
    }

    /// Adds `other` (a window of another round) to this one.
    pub(crate) fn add(&mut self, other: &Reading) {
        for (name, theirs) in &other.histograms {
            let ours = self.histograms.entry(name.clone()).or_default();
            if ours.cumulative.is_empty() {
                *ours = theirs.clone();
                continue;
            }
            for (mine, (_, count)) in ours.cumulative.iter_mut().zip(&theirs.cumulative) {
                mine.1 += count;
            }
            ours.sum_s += theirs.sum_s;
        }
        self.batches += other.batches;
        self.claims += other.claims;
    }

    pub(crate) fn figures(&self) -> ServerPhases {
        let phases = ORDER
            .iter()
            .filter_map(|phase| Some((phase, self.histograms.get(*phase)?)))
            .map(|(phase, histogram)| {
                let count = histogram.cumulative.last().map_or(0, |(_, count)| *count);
                PhaseFigures {
                    phase: (*phase).to_owned(),
                    count,
                    mean_ms: if count == 0 { 0.0 } else { histogram.sum_s * 1000.0 / count as f64 },
                    p50_ms: histogram.quantile_ms(0.50),
                    p90_ms: histogram.quantile_ms(0.90),
                    p99_ms: histogram.quantile_ms(0.99),
                    max_bound_ms: histogram.max_bound_ms(),
                }
            })
            .collect();
        let claims_per_batch = if self.batches == 0 { 0.0 } else { self.claims as f64 / self.batches as f64 };
        ServerPhases { phases, claims_per_batch }
    }
}

impl Histogram {
    fn max_bound_ms(&self) -> f64 {
        let mut below = 0;
        for (bound, count) in &self.cumulative {
            if *count == self.cumulative.last().map_or(0, |(_, total)| *total) {
                return if *count == below { 0.0 } else { bound * 1000.0 };
            }
            below = *count;
        }
        0.0
    }

    /// The `q` quantile, interpolated linearly inside its bucket; a quantile
    /// in the open last bucket is reported as the last finite bound.
    fn quantile_ms(&self, q: f64) -> f64 {
        let Some((_, total)) = self.cumulative.last() else { return 0.0 };
        if *total == 0 {
            return 0.0;
        }
        let rank = q * *total as f64;
        let mut lower = (0.0, 0_u64);
        for (bound, count) in &self.cumulative {
            if *count as f64 >= rank {
                if bound.is_infinite() {
                    return lower.0 * 1000.0;
                }
                let inside = (*count - lower.1) as f64;
                let fraction = if inside == 0.0 { 1.0 } else { (rank - lower.1 as f64) / inside };
                return (lower.0 + (bound - lower.0) * fraction) * 1000.0;
            }
            lower = (*bound, *count);
        }
        lower.0 * 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "\
# TYPE switchboard_allocate_phase_seconds histogram
switchboard_allocate_phase_seconds_bucket{phase=\"claim\",le=\"0.001\"} 10
switchboard_allocate_phase_seconds_bucket{phase=\"claim\",le=\"0.002\"} 10
switchboard_allocate_phase_seconds_bucket{phase=\"claim\",le=\"+Inf\"} 10
switchboard_allocate_phase_seconds_sum{phase=\"claim\"} 0.005
switchboard_allocate_phase_seconds_count{phase=\"claim\"} 10
switchboard_claim_batches_total 4
switchboard_claims_batched_total 10
";

    const AFTER: &str = "\
switchboard_allocate_phase_seconds_bucket{phase=\"claim\",le=\"0.001\"} 10
switchboard_allocate_phase_seconds_bucket{phase=\"claim\",le=\"0.002\"} 110
switchboard_allocate_phase_seconds_bucket{phase=\"claim\",le=\"+Inf\"} 110
switchboard_allocate_phase_seconds_sum{phase=\"claim\"} 0.155
switchboard_allocate_phase_seconds_count{phase=\"claim\"} 110
switchboard_claim_batch_seconds_bucket{writer=\"claims\",le=\"0.001\"} 3
switchboard_claim_batch_seconds_bucket{writer=\"claims\",le=\"+Inf\"} 4
switchboard_claim_batch_seconds_sum{writer=\"claims\"} 0.01
switchboard_claim_batches_total 24
switchboard_claims_batched_total 110
";

    #[test]
    fn a_window_counts_only_what_happened_in_it() {
        let window = Reading::parse(BEFORE).until(&Reading::parse(AFTER));
        let figures = window.figures();
        let claim = figures.phases.iter().find(|phase| phase.phase == "claim").cloned().unwrap_or_default();
        assert_eq!(claim.count, 100);
        // All 100 fell between 1 and 2 ms: the median is interpolated to 1.5 ms.
        assert!((claim.p50_ms - 1.5).abs() < 1e-9, "{claim:?}");
        assert!((claim.p99_ms - 1.99).abs() < 1e-9, "{claim:?}");
        assert!((claim.mean_ms - 1.5).abs() < 1e-9, "{claim:?}");
        assert!((figures.claims_per_batch - 5.0).abs() < 1e-9, "{figures:?}");
        // The batch histogram first appeared in the later reading.
        let batch = figures.phases.iter().find(|phase| phase.phase == "claim batch").cloned().unwrap_or_default();
        assert_eq!(batch.count, 4);
        // The slowest of four is beyond the last finite bound: reported as that bound.
        assert!((batch.p99_ms - 1.0).abs() < 1e-9, "{batch:?}");
        assert!(batch.max_bound_ms.is_infinite(), "{batch:?}");
        assert!((claim.max_bound_ms - 2.0).abs() < 1e-9, "{claim:?}");
        let assign = figures.phases.iter().find(|phase| phase.phase == "assign");
        assert!(assign.is_none(), "no assign histogram was read: {figures:?}");
    }

    #[test]
    fn rounds_add_up() {
        let window = Reading::parse(BEFORE).until(&Reading::parse(AFTER));
        let mut both = window.clone();
        both.add(&window);
        let claim = both.figures().phases.into_iter().find(|phase| phase.phase == "claim").unwrap_or_default();
        assert_eq!(claim.count, 200);
        assert!((claim.mean_ms - 1.5).abs() < 1e-9, "{claim:?}");
    }
}
