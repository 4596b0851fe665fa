//! Whole runs of the simulator against the real planner, each asserting one
//! property the scaler must have (and each able to fail: the companion runs
//! show the figure moving when the condition is taken away).

use std::time::Duration;

use fleet_sim::{
    SimConfig,
    demand::DemandCurve,
    report::Report,
    sim,
    sweep::{self, Grid},
};

fn run(config: &SimConfig) -> Report {
    sim::run(config, |_| {})
}

/// A small region: fewer, shorter runs keep the suite fast in a debug build.
fn small(peak_per_minute: f64, hours: u64) -> SimConfig {
    let mut config = SimConfig {
        warmup: Duration::from_secs(3600),
        duration: Duration::from_secs(hours * 3600),
        ..SimConfig::default()
    };
    config.demand.curve = DemandCurve::diurnal(peak_per_minute);
    config
}

/// A cloud that never fails and hosts that start boxes at once.
fn perfect(mut config: SimConfig) -> SimConfig {
    config.provider.boot_min = Duration::ZERO;
    config.provider.boot_max = Duration::ZERO;
    config.provider.launch_failure_rate = 0.0;
    config.provider.never_connect_rate = 0.0;
    config.hosts.spawn_min = Duration::ZERO;
    config.hosts.spawn_max = Duration::ZERO;
    config.hosts.loss_per_host_hour = 0.0;
    config
}

#[test]
fn with_instant_boots_and_a_buffer_above_the_arrivals_of_an_interval_every_user_finds_a_warm_box() {
    let mut config = perfect(small(3.0, 6));
    config.demand.curve = DemandCurve::constant(3.0);
    // Three a minute is one every 20 s on average; ten covers any burst of
    // one scaler interval by far.
    config.settings.buffer = 10;
    let report = run(&config);
    assert!(report.totals.allocations > 900, "{} allocations", report.totals.allocations);
    assert_eq!(report.totals.no_warm_box, 0);
    assert_eq!(report.totals.gave_up, 0);

    // The same users against real boot times and no buffer do wait.
    config.provider.boot_min = Duration::from_secs(240);
    config.provider.boot_max = Duration::from_secs(240);
    config.settings.buffer = 0;
    assert!(run(&config).totals.no_warm_box > 100);
}

#[test]
fn with_no_demand_after_noon_the_region_returns_to_its_floor() {
    // (Not buffer 0: the planner grows a region only to restore its buffer,
    // so with none it never grows past min_instances. REPORT.md has that.)
    for (buffer, floor) in [(2, 1), (8, 4)] {
        let mut config = small(3.0, 24);
        config.settings.buffer = buffer;
        config.hosts.loss_per_host_hour = 0.0;
        config.demand.ends_at = Some(Duration::from_secs(12 * 3600));
        config.demand.sessions.max = Duration::from_secs(2 * 3600);
        let report = run(&config);
        let end = &report.end;
        assert_eq!(end.floor, floor);
        assert!(report.totals.peak_live > 5 * floor, "the day did scale up: peak {}", report.totals.peak_live);
        assert_eq!((end.sessions, end.queued), (0, 0));
        assert_eq!((end.live, end.instances), (floor, floor), "buffer {buffer}: nothing left running beyond the floor");
        let last = report.hours.last().map(|hour| (hour.avg_instances, hour.launches));
        assert_eq!(last, Some((f64::from(floor), 0)), "buffer {buffer}: the last hour is quiet");
    }
}

#[test]
fn never_more_than_max_instances_live() {
    let mut config = small(6.0, 3);
    config.demand.start_minute = 19 * 60;
    config.settings.max_instances = 10;
    let report = run(&config);
    assert!(report.totals.plans_capped_by_max > 0, "demand does press against the cap");
    assert!(report.totals.peak_live <= 10, "peak live {}", report.totals.peak_live);
    assert!(report.totals.gave_up > 0, "users beyond the cap's capacity give up");
}

#[test]
fn a_never_connecting_instance_is_terminated_after_the_launch_timeout() {
    let mut config = small(1.0, 1);
    config.provider.never_connect_rate = 1.0;
    config.timings.launch_timeout = Duration::from_secs(300);
    let report = run(&config);
    let t = &report.totals;
    assert!(t.never_connected > 0);
    let Some((youngest, oldest)) = t.never_connected_age_s else {
        panic!("never-connected terminations have ages");
    };
    // Terminated at the first plan at or after the timeout: within one
    // scaler interval (10 s) and one step of it.
    assert!(youngest >= 300.0 && oldest <= 311.0, "terminated {youngest}–{oldest} s after launch");
    assert_eq!(t.allocations, t.no_warm_box, "no host ever connected");
    assert_eq!(report.end.warm, 0);
}

#[test]
fn the_same_seed_gives_the_same_report() {
    let config = small(2.0, 2);
    let first = run(&config);
    assert_eq!(first, run(&config));
    let other = run(&SimConfig { seed: config.seed + 1, ..config });
    assert_ne!(first.totals, other.totals, "another seed is another day");
}

#[test]
fn a_lost_host_is_terminated_and_its_users_ask_again() {
    let mut config = small(3.0, 6);
    config.warmup = Duration::ZERO;
    config.hosts.loss_per_host_hour = 0.05;
    let t = run(&config).totals;
    assert!(t.host_losses > 3, "{} losses", t.host_losses);
    assert!(t.host_lost_terminations + 1 >= t.host_losses && t.host_lost_terminations <= t.host_losses);
    assert!(t.sessions_cut > 0);
    assert_eq!(t.rerequests, t.sessions_cut);
}

#[test]
fn the_hour_table_adds_up_to_the_totals() {
    let report = run(&small(2.0, 5));
    assert_eq!(report.hours.len(), 5);
    assert_eq!(report.hours.iter().map(|hour| hour.arrivals).sum::<u64>(), report.totals.arrivals);
    assert_eq!(report.hours.iter().map(|hour| hour.no_warm_box).sum::<u64>(), report.totals.no_warm_box);
    let t = &report.totals;
    let mean_instances = report.hours.iter().map(|hour| hour.avg_instances).sum::<f64>();
    assert!((mean_instances - t.instance_hours).abs() < 1e-6, "{mean_instances} vs {}", t.instance_hours);
    assert!(t.session_hours <= t.instance_hours * 2.0, "two slots per instance");
}

#[test]
fn a_bigger_buffer_costs_more_and_starves_less() {
    let mut base = small(4.0, 3);
    base.demand.start_minute = 6 * 60; // the morning ramp
    let grid = Grid {
        buffers: vec![0, 8],
        scale_down_delays: vec![base.timings.scale_down_delay],
        scale_down_cooldowns: vec![base.timings.scale_down_cooldown],
        launch_timeouts: vec![base.timings.launch_timeout],
        seeds: vec![1, 2],
    };
    let report = sweep::sweep(&base, &grid, 1.0, |_| {});
    let [none, eight] = report.rows.as_slice() else {
        panic!("two rows, got {}", report.rows.len());
    };
    assert!(none.no_warm_box_pct > 5.0 * eight.no_warm_box_pct.max(0.1), "{none:?} vs {eight:?}");
    assert!(none.instance_hours < eight.instance_hours);
    assert!(report.cheapest_within_target.as_ref().is_some_and(|row| row.buffer == 8));
}

#[test]
fn a_region_without_buffer_grows_with_its_waiting_users() {
    // The planner counts users waiting for a box as demand (REPORT.md's first
    // finding, since fixed): with no buffer at all, the region still grows.
    let mut config = small(3.0, 3);
    config.demand.start_minute = 18 * 60;
    config.settings.buffer = 0;
    let report = run(&config);
    assert!(report.totals.peak_live > 20, "grows to {}", report.totals.peak_live);
    assert!(report.totals.gave_up_pct < 2.0, "{}% gave up", report.totals.gave_up_pct);
}
