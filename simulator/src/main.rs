//! `fleet-sim`: replays a day of demand against the scaler's planner with a
//! simulated clock and cloud. See REPORT.md for what it found.
//!
//! ```text
//! fleet-sim [run] [options]    one run; Markdown on stdout (--out FILE), --json FILE
//! fleet-sim sweep [options]    the same day for a grid of buffers and timings
//! fleet-sim smoke              a few simulated hours at a small scale (CI)
//! ```

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context as _, ensure};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use fleet_sim::{
    SimConfig,
    demand::{DemandCurve, Replay},
    report::HourRow,
    sim,
    sweep::{self, Grid, SweepRow},
};

#[derive(Parser)]
#[command(name = "fleet-sim", about = "Replays a day of demand against the scaler's planner")]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// One run (the default).
    Run(RunArgs),
    /// The same day for every combination of buffers and timings.
    Sweep(SweepArgs),
    /// A few simulated hours at a small scale; prints the figures, asserts nothing.
    Smoke(Output),
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    output: Output,
}

#[derive(Args)]
struct SweepArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    output: Output,
    /// Buffers to try [default: 0,1,2,4,8,12,16].
    #[arg(long, value_delimiter = ',')]
    buffers: Vec<u32>,
    /// Scale-down delays to try, in seconds [default: 60,120,300,600,900,1800].
    #[arg(long, value_delimiter = ',')]
    scale_down_delays_s: Vec<u64>,
    /// Scale-down cooldowns to try, in seconds [default: 300,900].
    #[arg(long, value_delimiter = ',')]
    cooldowns_s: Vec<u64>,
    /// Launch timeouts to try, in seconds [default: the run's].
    #[arg(long, value_delimiter = ',')]
    launch_timeouts_s: Vec<u64>,
    /// Seeds per cell (seed, seed+1, …).
    #[arg(long, default_value_t = 3)]
    seeds: u64,
    /// The share of allocations without a warm box the recommendation may accept.
    #[arg(long, default_value_t = 1.0)]
    target_no_warm_pct: f64,
}

#[derive(Args)]
struct Output {
    /// Writes the Markdown report here instead of stdout.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also writes the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// No progress lines on stderr.
    #[arg(long)]
    quiet: bool,
}

/// The model's knobs; each left out keeps the built-in scenario's value
/// (`SimConfig::default()`, printed at the top of every report).
#[derive(Args)]
struct ModelArgs {
    /// Seed of every random draw (demand, provider, hosts).
    #[arg(long)]
    seed: Option<u64>,
    /// Simulated hours (measured).
    #[arg(long)]
    hours: Option<f64>,
    /// Simulated hours before the measured ones, figures discarded.
    #[arg(long)]
    warmup_hours: Option<f64>,
    /// The demand curve's hour of day the run starts at.
    #[arg(long)]
    start_hour: Option<f64>,
    /// A `minute,arrivals` CSV instead of the built-in day.
    #[arg(long, value_name = "FILE")]
    demand: Option<PathBuf>,
    /// How the curve's numbers become users.
    #[arg(long, value_enum)]
    replay: Option<Replay>,
    /// The busiest minute's arrivals (scales the built-in day or the CSV).
    #[arg(long)]
    peak_per_minute: Option<f64>,
    /// No arrivals from this hour of the run on (drain-out).
    #[arg(long)]
    demand_ends_at_hour: Option<f64>,
    #[arg(long)]
    session_mean_min: Option<f64>,
    /// Shape of the log-normal session lengths.
    #[arg(long)]
    session_sigma: Option<f64>,
    #[arg(long)]
    session_max_min: Option<f64>,
    /// How long a user without a warm box waits before giving up.
    #[arg(long)]
    patience_s: Option<u64>,

    #[arg(long)]
    buffer: Option<u32>,
    #[arg(long)]
    min_instances: Option<u32>,
    #[arg(long)]
    max_instances: Option<u32>,
    /// Mandelbox slots per instance.
    #[arg(long)]
    capacity: Option<u32>,
    #[arg(long)]
    scaler_interval_s: Option<u64>,
    /// Backoff after a refused launch, doubling per failure (0: none).
    #[arg(long)]
    launch_backoff_s: Option<u64>,
    #[arg(long)]
    max_launch_backoff_s: Option<u64>,
    /// Plan on the timer only, not after allocations and teardowns.
    #[arg(long)]
    no_wake: bool,
    #[arg(long)]
    launch_timeout_s: Option<u64>,
    #[arg(long)]
    scale_down_delay_s: Option<u64>,
    #[arg(long)]
    cooldown_s: Option<u64>,

    #[arg(long)]
    boot_min_s: Option<u64>,
    #[arg(long)]
    boot_max_s: Option<u64>,
    /// Share of launches refused for capacity (0–1).
    #[arg(long)]
    launch_failure_rate: Option<f64>,
    /// Share of launched instances whose host never connects (0–1).
    #[arg(long)]
    never_connect_rate: Option<f64>,
    #[arg(long)]
    spawn_min_s: Option<u64>,
    #[arg(long)]
    spawn_max_s: Option<u64>,
    /// Connected hosts dying, per host-hour.
    #[arg(long)]
    host_loss_per_hour: Option<f64>,

    /// What-if: a buffer of at least 2·√(2·λ·LEAD), λ the last 10 minutes' arrival rate.
    #[arg(long)]
    what_if_demand_buffer_lead_s: Option<u64>,
}

impl ModelArgs {
    fn config(&self, mut config: SimConfig) -> anyhow::Result<SimConfig> {
        let secs = Duration::from_secs;
        let hours = |h: f64, what: &str| {
            ensure!(h.is_finite() && h >= 0.0, "{what} must be ≥ 0 hours, not {h}");
            Ok(Duration::from_secs_f64(h * 3600.0))
        };
        let minutes = |m: f64, what: &str| {
            ensure!(m.is_finite() && m > 0.0, "{what} must be > 0 minutes, not {m}");
            Ok(Duration::from_secs_f64(m * 60.0))
        };
        let rate = |r: f64, what: &str| {
            ensure!((0.0..=1.0).contains(&r), "{what} must be between 0 and 1, not {r}");
            Ok(r)
        };
        if let Some(seed) = self.seed {
            config.seed = seed;
        }
        if let Some(h) = self.hours {
            config.duration = hours(h, "--hours")?;
            ensure!(!config.duration.is_zero(), "--hours must be > 0");
        }
        if let Some(h) = self.warmup_hours {
            config.warmup = hours(h, "--warmup-hours")?;
        }
        let demand = &mut config.demand;
        if let Some(h) = self.start_hour {
            demand.start_minute = (hours(h, "--start-hour")?.as_secs() / 60) as usize;
        }
        if let Some(path) = &self.demand {
            demand.curve = DemandCurve::load_csv(path)?;
        }
        if let Some(peak) = self.peak_per_minute {
            ensure!(peak.is_finite() && peak >= 0.0, "--peak-per-minute must be ≥ 0, not {peak}");
            demand.curve = if self.demand.is_some() {
                demand.curve.clone().scaled_to_peak(peak)
            } else {
                DemandCurve::diurnal(peak)
            };
        }
        if let Some(replay) = self.replay {
            demand.replay = replay;
        }
        if let Some(h) = self.demand_ends_at_hour {
            demand.ends_at = Some(hours(h, "--demand-ends-at-hour")?);
        }
        if let Some(m) = self.session_mean_min {
            demand.sessions.mean = minutes(m, "--session-mean-min")?;
        }
        if let Some(sigma) = self.session_sigma {
            ensure!(sigma.is_finite() && sigma >= 0.0, "--session-sigma must be ≥ 0, not {sigma}");
            demand.sessions.sigma = sigma;
        }
        if let Some(m) = self.session_max_min {
            demand.sessions.max = minutes(m, "--session-max-min")?;
        }
        if let Some(s) = self.patience_s {
            config.patience = secs(s);
        }

        let settings = &mut config.settings;
        if let Some(buffer) = self.buffer {
            settings.buffer = buffer;
        }
        if let Some(min) = self.min_instances {
            settings.min_instances = min;
        }
        if let Some(max) = self.max_instances {
            settings.max_instances = max;
        }
        ensure!(settings.min_instances <= settings.max_instances, "--min-instances is above --max-instances");
        if let Some(capacity) = self.capacity {
            ensure!(capacity > 0, "--capacity must be at least 1");
            settings.instance_types.iter_mut().for_each(|kind| kind.capacity = capacity);
        }
        if let Some(s) = self.scaler_interval_s {
            ensure!(s > 0, "--scaler-interval-s must be at least 1");
            config.scaler_interval = secs(s);
        }
        config.wake_on_change &= !self.no_wake;
        if let Some(s) = self.launch_backoff_s {
            config.launch_backoff = secs(s);
        }
        if let Some(s) = self.max_launch_backoff_s {
            config.max_launch_backoff = secs(s);
        }
        let timings = &mut config.timings;
        if let Some(s) = self.launch_timeout_s {
            timings.launch_timeout = secs(s);
        }
        if let Some(s) = self.scale_down_delay_s {
            timings.scale_down_delay = secs(s);
        }
        if let Some(s) = self.cooldown_s {
            timings.scale_down_cooldown = secs(s);
        }

        let provider = &mut config.provider;
        if let Some(s) = self.boot_min_s {
            provider.boot_min = secs(s);
        }
        if let Some(s) = self.boot_max_s {
            provider.boot_max = secs(s);
        }
        ensure!(provider.boot_min <= provider.boot_max, "the boot delay's minimum is above its maximum");
        if let Some(r) = self.launch_failure_rate {
            provider.launch_failure_rate = rate(r, "--launch-failure-rate")?;
        }
        if let Some(r) = self.never_connect_rate {
            provider.never_connect_rate = rate(r, "--never-connect-rate")?;
        }
        let hosts = &mut config.hosts;
        if let Some(s) = self.spawn_min_s {
            hosts.spawn_min = secs(s);
        }
        if let Some(s) = self.spawn_max_s {
            hosts.spawn_max = secs(s);
        }
        ensure!(hosts.spawn_min <= hosts.spawn_max, "the spawn delay's minimum is above its maximum");
        if let Some(r) = self.host_loss_per_hour {
            ensure!(r.is_finite() && r >= 0.0, "--host-loss-per-hour must be ≥ 0, not {r}");
            hosts.loss_per_host_hour = r;
        }
        if let Some(s) = self.what_if_demand_buffer_lead_s {
            config.what_if.demand_buffer_lead = Some(secs(s));
        }
        Ok(config)
    }
}

fn main() -> ExitCode {
    // The error's chain on one line, not a `Debug` dump with a backtrace.
    match try_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("fleet-sim: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn try_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        None => run(&cli.run.model.config(SimConfig::default())?, &cli.run.output),
        Some(Command::Run(args)) => run(&args.model.config(SimConfig::default())?, &args.output),
        Some(Command::Sweep(args)) => run_sweep(&args),
        Some(Command::Smoke(output)) => run(&SimConfig::smoke(), &output),
    }
}

fn run(config: &SimConfig, output: &Output) -> anyhow::Result<()> {
    let report = sim::run(config, |hour| progress_hour(output.quiet, hour));
    let text = format!("{}\n{}", report.scenario.assumptions_markdown(), report.markdown());
    emit(output, &text, &report)
}

fn progress_hour(quiet: bool, hour: &HourRow) {
    if !quiet {
        eprintln!(
            "fleet-sim: hour {:>2} ({:02}:00) arrivals {:>4}, instances {:>6.1} (max {}), warm {:>5.1}, no warm box {}",
            hour.hour,
            hour.clock,
            hour.arrivals,
            hour.avg_instances,
            hour.max_instances,
            hour.avg_warm,
            hour.no_warm_box
        );
    }
}

fn run_sweep(args: &SweepArgs) -> anyhow::Result<()> {
    let base = args.model.config(SimConfig::default())?;
    let standard = Grid::standard(&base);
    let or = |given: &[u64], default: Vec<Duration>| {
        if given.is_empty() { default } else { given.iter().map(|&s| Duration::from_secs(s)).collect() }
    };
    ensure!(args.seeds > 0, "--seeds must be at least 1");
    let grid = Grid {
        buffers: if args.buffers.is_empty() { standard.buffers } else { args.buffers.clone() },
        scale_down_delays: or(&args.scale_down_delays_s, standard.scale_down_delays),
        scale_down_cooldowns: or(&args.cooldowns_s, standard.scale_down_cooldowns),
        launch_timeouts: or(&args.launch_timeouts_s, standard.launch_timeouts),
        seeds: (0..args.seeds).map(|i| base.seed + i).collect(),
    };
    let cells = grid.cells();
    let mut done = 0;
    let report = sweep::sweep(&base, &grid, args.target_no_warm_pct, |row: &SweepRow| {
        done += 1;
        if !args.output.quiet {
            eprintln!(
                "fleet-sim sweep: {done}/{cells} buffer {} delay {} s cooldown {} s timeout {} s: \
                 {:.1} instance-h, {:.2}% no warm box",
                row.buffer,
                row.scale_down_delay_s,
                row.scale_down_cooldown_s,
                row.launch_timeout_s,
                row.instance_hours,
                row.no_warm_box_pct
            );
        }
    });
    let text = format!("{}\n{}", report.base.assumptions_markdown(), report.markdown());
    emit(&args.output, &text, &report)
}

fn emit(output: &Output, markdown: &str, figures: &impl Serialize) -> anyhow::Result<()> {
    match &output.out {
        Some(path) => std::fs::write(path, markdown).with_context(|| format!("writing {}", path.display()))?,
        None => print!("{markdown}"),
    }
    if let Some(path) = &output.json {
        let json = serde_json::to_string_pretty(figures).context("encoding the figures as JSON")?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn bad_values_are_refused_not_panicked_on() {
        for args in [
            &["fleet-sim", "--launch-failure-rate", "1.5"][..],
            &["fleet-sim", "--min-instances", "5", "--max-instances", "2"],
            &["fleet-sim", "--hours", "-1"],
            &["fleet-sim", "--capacity", "0"],
            &["fleet-sim", "--demand", "/nonexistent/demand.csv"],
        ] {
            let cli = Cli::try_parse_from(args).map_err(|e| e.to_string());
            let Ok(cli) = cli else {
                continue; // refused by clap itself
            };
            assert!(cli.run.model.config(SimConfig::default()).is_err(), "{args:?}");
        }
    }
}
