//! The same day for a grid of buffers and timings: what each costs
//! (instance-hours) against how often a user finds no warm box, to choose
//! defaults. Every cell runs the same seeds, hence the same users.

use std::{fmt::Write as _, time::Duration};

use serde::Serialize;

use crate::{
    config::SimConfig,
    report::{Report, Scenario},
    sim,
};

/// The grid: every combination of these values runs, for every seed.
#[derive(Debug, Clone, PartialEq)]
pub struct Grid {
    pub buffers: Vec<u32>,
    pub scale_down_delays: Vec<Duration>,
    pub scale_down_cooldowns: Vec<Duration>,
    pub launch_timeouts: Vec<Duration>,
    pub seeds: Vec<u64>,
}

impl Grid {
    /// The buffers (and 12, the recommended one) and timings around
    /// the planner's defaults; cooldowns below and above most delays, as a
    /// cooldown only binds above the delay.
    pub fn standard(base: &SimConfig) -> Self {
        Grid {
            buffers: vec![0, 1, 2, 4, 8, 12, 16],
            scale_down_delays: [60, 120, 300, 600, 900, 1800].map(Duration::from_secs).to_vec(),
            scale_down_cooldowns: [300, 900].map(Duration::from_secs).to_vec(),
            launch_timeouts: vec![base.timings.launch_timeout],
            seeds: vec![base.seed, base.seed + 1, base.seed + 2],
        }
    }

    pub fn cells(&self) -> usize {
        self.buffers.len() * self.scale_down_delays.len() * self.scale_down_cooldowns.len() * self.launch_timeouts.len()
    }
}

/// One cell of the grid, averaged over the seeds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SweepRow {
    pub buffer: u32,
    pub scale_down_delay_s: u64,
    pub scale_down_cooldown_s: u64,
    pub launch_timeout_s: u64,
    pub instance_hours: f64,
    pub idle_warm_box_hours: f64,
    pub no_warm_box_pct: f64,
    pub gave_up: f64,
    pub gave_up_pct: f64,
    /// The mean over seeds of each run's p99 / max wait.
    pub wait_p99_s: f64,
    pub wait_max_s: f64,
    pub launches: f64,
    pub drains: f64,
    pub launches_soon_after_drain: f64,
    pub never_connected: f64,
    pub slow_boots_terminated: f64,
    pub draining_hours: f64,
    pub slot_utilization_pct: f64,
    pub end_live: f64,
}

impl SweepRow {
    fn of(reports: &[Report]) -> Self {
        let mean = |f: &dyn Fn(&Report) -> f64| reports.iter().map(f).sum::<f64>() / reports.len().max(1) as f64;
        let s = &reports[0].scenario;
        SweepRow {
            buffer: s.buffer,
            scale_down_delay_s: s.scale_down_delay_s as u64,
            scale_down_cooldown_s: s.scale_down_cooldown_s as u64,
            launch_timeout_s: s.launch_timeout_s as u64,
            instance_hours: mean(&|r| r.totals.instance_hours),
            idle_warm_box_hours: mean(&|r| r.totals.idle_warm_box_hours),
            no_warm_box_pct: mean(&|r| r.totals.no_warm_box_pct),
            gave_up: mean(&|r| r.totals.gave_up as f64),
            gave_up_pct: mean(&|r| r.totals.gave_up_pct),
            wait_p99_s: mean(&|r| r.totals.wait_p99_s),
            wait_max_s: mean(&|r| r.totals.wait_max_s),
            launches: mean(&|r| r.totals.launches as f64),
            drains: mean(&|r| r.totals.drains_excess as f64),
            launches_soon_after_drain: mean(&|r| r.totals.launches_soon_after_drain as f64),
            never_connected: mean(&|r| r.totals.never_connected as f64),
            slow_boots_terminated: mean(&|r| r.totals.slow_boots_terminated as f64),
            draining_hours: mean(&|r| r.totals.draining_hours),
            slot_utilization_pct: mean(&|r| r.totals.slot_utilization_pct),
            end_live: mean(&|r| f64::from(r.end.live)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SweepReport {
    /// The configuration every cell starts from.
    pub base: Scenario,
    pub seeds: Vec<u64>,
    pub target_no_warm_box_pct: f64,
    pub rows: Vec<SweepRow>,
    /// The cheapest row within the target, if any is.
    pub cheapest_within_target: Option<SweepRow>,
}

/// Runs the grid on `base`; `on_row` sees each cell when it is done.
pub fn sweep(
    base: &SimConfig,
    grid: &Grid,
    target_no_warm_box_pct: f64,
    mut on_row: impl FnMut(&SweepRow),
) -> SweepReport {
    let mut rows = Vec::with_capacity(grid.cells());
    for &buffer in &grid.buffers {
        for &delay in &grid.scale_down_delays {
            for &cooldown in &grid.scale_down_cooldowns {
                for &timeout in &grid.launch_timeouts {
                    let reports: Vec<Report> = grid
                        .seeds
                        .iter()
                        .map(|&seed| {
                            let mut config = base.clone();
                            config.seed = seed;
                            config.settings.buffer = buffer;
                            config.timings.scale_down_delay = delay;
                            config.timings.scale_down_cooldown = cooldown;
                            config.timings.launch_timeout = timeout;
                            sim::run(&config, |_| {})
                        })
                        .collect();
                    if reports.is_empty() {
                        continue;
                    }
                    let row = SweepRow::of(&reports);
                    on_row(&row);
                    rows.push(row);
                }
            }
        }
    }
    let cheapest_within_target = rows
        .iter()
        .filter(|row| row.no_warm_box_pct <= target_no_warm_box_pct)
        .min_by(|a, b| a.instance_hours.total_cmp(&b.instance_hours))
        .cloned();
    SweepReport {
        base: Scenario::of(base),
        seeds: grid.seeds.clone(),
        target_no_warm_box_pct,
        rows,
        cheapest_within_target,
    }
}

impl SweepReport {
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "Each row is the mean of seeds {:?} (the same users in every row).", self.seeds);
        if let Some(line) = self.base.what_if_markdown() {
            let _ = writeln!(out, "{line}");
        }
        out.push('\n');
        out.push_str(
            "| Buffer | Scale-down delay s | Cooldown s | Launch timeout s | Instance-h | Idle warm-box-h | No warm box % \
             | Gave up (%) | Wait p99 / max s | Launches | Drains | Relaunch ≤10 min | Never conn. (slow) | Slot use % \
             | Live at end |\n\
             |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for row in &self.rows {
            let _ = writeln!(out, "{}", row_markdown(row));
        }
        match &self.cheapest_within_target {
            Some(row) => {
                let _ = writeln!(
                    out,
                    "\nCheapest with no warm box ≤ {}%: buffer {}, scale_down_delay {} s, cooldown {} s, \
                     launch_timeout {} s: {:.1} instance-hours, {:.2}% without a warm box.",
                    self.target_no_warm_box_pct,
                    row.buffer,
                    row.scale_down_delay_s,
                    row.scale_down_cooldown_s,
                    row.launch_timeout_s,
                    row.instance_hours,
                    row.no_warm_box_pct
                );
            }
            None => {
                let _ = writeln!(out, "\nNo row has no warm box ≤ {}%.", self.target_no_warm_box_pct);
            }
        }
        out
    }
}

fn row_markdown(row: &SweepRow) -> String {
    format!(
        "| {} | {} | {} | {} | {:.1} | {:.1} | {:.2} | {:.1} ({:.2}) | {:.0} / {:.0} | {:.0} | {:.0} | {:.0} | {:.1} ({:.1}) \
         | {:.1} | {:.1} |",
        row.buffer,
        row.scale_down_delay_s,
        row.scale_down_cooldown_s,
        row.launch_timeout_s,
        row.instance_hours,
        row.idle_warm_box_hours,
        row.no_warm_box_pct,
        row.gave_up,
        row.gave_up_pct,
        row.wait_p99_s,
        row.wait_max_s,
        row.launches,
        row.drains,
        row.launches_soon_after_drain,
        row.never_connected,
        row.slow_boots_terminated,
        row.slot_utilization_pct,
        row.end_live
    )
}
