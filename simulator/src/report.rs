//! A run's figures, as data (JSON) and as Markdown.

use std::fmt::Write as _;

use serde::Serialize;

use crate::{config::SimConfig, demand::Replay};

/// The inputs of a run, in the units a reader wants.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scenario {
    pub seed: u64,
    pub warmup_hours: f64,
    pub hours: f64,
    pub step_s: f64,
    pub scaler_interval_s: f64,
    pub wake_on_change: bool,
    pub launch_backoff_s: (f64, f64),
    pub buffer: u32,
    pub min_instances: u32,
    pub max_instances: u32,
    pub instance_type: String,
    pub capacity: u32,
    pub launch_timeout_s: f64,
    pub scale_down_delay_s: f64,
    pub scale_down_cooldown_s: f64,
    pub boot_s: (f64, f64),
    pub launch_failure_rate: f64,
    pub never_connect_rate: f64,
    pub terminate_s: (f64, f64),
    pub spawn_s: (f64, f64),
    pub host_loss_per_host_hour: f64,
    pub demand: String,
    pub replay: Replay,
    pub start_hour: f64,
    pub demand_ends_at_hour: Option<f64>,
    pub peak_per_minute: f64,
    pub session_mean_min: f64,
    pub session_sigma: f64,
    pub session_range_min: (f64, f64),
    pub patience_s: f64,
    pub what_if_demand_buffer_lead_s: Option<f64>,
}

impl Scenario {
    pub fn of(config: &SimConfig) -> Self {
        let secs = |d: std::time::Duration| d.as_secs_f64();
        let p = &config.provider;
        let demand = &config.demand;
        Scenario {
            seed: config.seed,
            warmup_hours: secs(config.warmup) / 3600.0,
            hours: secs(config.duration) / 3600.0,
            step_s: secs(config.step),
            scaler_interval_s: secs(config.scaler_interval),
            wake_on_change: config.wake_on_change,
            launch_backoff_s: (secs(config.launch_backoff), secs(config.max_launch_backoff)),
            buffer: config.settings.buffer,
            min_instances: config.settings.min_instances,
            max_instances: config.settings.max_instances,
            instance_type: config.settings.instance_types.first().map(|t| t.name.clone()).unwrap_or_default(),
            capacity: config.capacity(),
            launch_timeout_s: secs(config.timings.launch_timeout),
            scale_down_delay_s: secs(config.timings.scale_down_delay),
            scale_down_cooldown_s: secs(config.timings.scale_down_cooldown),
            boot_s: (secs(p.boot_min), secs(p.boot_max)),
            launch_failure_rate: p.launch_failure_rate,
            never_connect_rate: p.never_connect_rate,
            terminate_s: (secs(p.terminate_min), secs(p.terminate_max)),
            spawn_s: (secs(config.hosts.spawn_min), secs(config.hosts.spawn_max)),
            host_loss_per_host_hour: config.hosts.loss_per_host_hour,
            demand: demand.curve.source().to_owned(),
            replay: demand.replay,
            start_hour: demand.start_minute as f64 / 60.0,
            demand_ends_at_hour: demand.ends_at.map(|at| secs(at) / 3600.0),
            peak_per_minute: demand.curve.peak(),
            session_mean_min: secs(demand.sessions.mean) / 60.0,
            session_sigma: demand.sessions.sigma,
            session_range_min: (secs(demand.sessions.min) / 60.0, secs(demand.sessions.max) / 60.0),
            patience_s: secs(config.patience),
            what_if_demand_buffer_lead_s: config.what_if.demand_buffer_lead.map(secs),
        }
    }

    /// One line naming the what-ifs in force, if any.
    pub fn what_if_markdown(&self) -> Option<String> {
        let mut parts = Vec::new();
        if let Some(lead) = self.what_if_demand_buffer_lead_s {
            parts.push(format!("buffer at least ⌈2·√(2·λ·L)⌉ with L = {lead} s"));
        }
        (!parts.is_empty()).then(|| format!("**What-if (not the planner as it is):** {}.", parts.join("; ")))
    }

    /// The model's assumptions, for a report's reader.
    pub fn assumptions_markdown(&self) -> String {
        let s = self;
        format!(
            "- Demand: {} ({} arrivals), session lengths log-normal with mean {:.0} min and σ {} \
             (clamped to {:.0}–{:.0} min); a user without a warm box gives up after {:.0} s.\n\
             - Provider: boot {:.0}–{:.0} s (uniform) until the host connects; {:.0}% of launches refused \
             (capacity), {:.0}% never connect; termination takes effect after {:.0}–{:.0} s (billed until then).\n\
             - Hosts: a box starts in {:.0}–{:.0} s (every free slot in parallel); {} host losses per host-hour.\n\
             - Scaler: `planner::plan` every {:.0} s{}; after a refused launch no launch for {:.0} s, \
             doubling per failure up to {:.0} s (the server's backoff); step {:.0} s.\n",
            s.demand,
            s.replay,
            s.session_mean_min,
            s.session_sigma,
            s.session_range_min.0,
            s.session_range_min.1,
            s.patience_s,
            s.boot_s.0,
            s.boot_s.1,
            100.0 * s.launch_failure_rate,
            100.0 * s.never_connect_rate,
            s.terminate_s.0,
            s.terminate_s.1,
            s.spawn_s.0,
            s.spawn_s.1,
            s.host_loss_per_host_hour,
            s.scaler_interval_s,
            if s.wake_on_change { " and after every step with an allocation or a teardown" } else { "" },
            s.launch_backoff_s.0,
            s.launch_backoff_s.1,
            s.step_s,
        )
    }
}

/// The day's totals.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Totals {
    /// Billed: from launch until the termination took effect.
    pub instance_hours: f64,
    /// The billed hours split by what the instance was doing.
    pub booting_hours: f64,
    pub serving_hours: f64,
    pub draining_hours: f64,
    pub lost_hours: f64,
    pub terminating_hours: f64,
    /// What a scaler without hysteresis would have run: `⌈(sessions +
    /// buffer) / capacity⌉` (at least `min_instances`), integrated. The
    /// difference to `instance_hours` is what booting, draining and slack
    /// cost.
    pub needed_instance_hours: f64,
    /// Warm boxes holding no user, integrated over time.
    pub idle_warm_box_hours: f64,
    pub session_hours: f64,
    /// Session-hours over billed slot-hours.
    pub slot_utilization_pct: f64,
    /// Free slots on draining hosts (paid for, unusable), integrated.
    pub draining_free_slot_hours: f64,

    /// Users asking for a session (the demand curve's).
    pub arrivals: u64,
    /// Users whose host died asking again.
    pub rerequests: u64,
    pub allocations: u64,
    pub no_warm_box: u64,
    pub no_warm_box_pct: f64,
    /// Of those: took a box still starting on a connected host.
    pub waited_for_starting_box: u64,
    /// Of those: nothing starting anywhere, queued for the next box.
    pub queued: u64,
    pub served_after_wait: u64,
    pub gave_up: u64,
    pub gave_up_pct: f64,
    pub still_waiting_at_end: u64,
    /// Waits of the users who found no warm box and got one.
    pub wait_p50_s: f64,
    pub wait_p99_s: f64,
    pub wait_max_s: f64,
    /// Queued users, integrated: how much waiting there was.
    pub user_wait_hours: f64,

    pub peak_instances: u32,
    pub peak_live: u32,
    pub peak_sessions: u32,
    pub launches: u64,
    pub launch_failures: u64,
    pub never_connected: u64,
    /// Of those, hosts that would have connected had they been given longer.
    pub slow_boots_terminated: u64,
    /// Launch to termination of the never-connected instances.
    pub never_connected_age_s: Option<(f64, f64)>,
    pub host_losses: u64,
    pub sessions_cut: u64,
    pub drains_excess: u64,
    pub drained_terminations: u64,
    pub host_lost_terminations: u64,
    /// Instances launched within 10 min of an excess drain: flapping.
    pub launches_soon_after_drain: u64,
    /// Instances launched while a draining host had a free slot.
    pub launches_while_draining_had_room: u64,
    pub plan_calls: u64,
    pub plans_capped_by_max: u64,
    /// Plans whose launches the backoff after a refusal held back.
    pub launches_held_by_backoff: u64,
}

/// The fleet when the run stops, against what the demand then needs.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EndState {
    pub instances: u32,
    pub live: u32,
    pub sessions: u32,
    pub warm: u32,
    pub queued: u32,
    pub arrivals_last_hour: u64,
    /// What a scaler with no hysteresis would keep: enough hosts for the
    /// sessions plus the buffer, at least `min_instances`.
    pub needed: u32,
    /// What an idle region settles at: `max(min_instances, ⌈buffer /
    /// capacity⌉)`.
    pub floor: u32,
}

/// One simulated hour.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct HourRow {
    /// Hour of the run (0 = the first), and the demand curve's hour of day.
    pub hour: u32,
    pub clock: u32,
    pub arrivals: u64,
    pub no_warm_box: u64,
    pub gave_up: u64,
    pub launches: u64,
    pub drains: u64,
    pub avg_instances: f64,
    pub max_instances: u32,
    pub avg_warm: f64,
    pub avg_sessions: f64,
    pub max_sessions: u32,
    /// `⌈(sessions + buffer) / capacity⌉`, at least `min_instances`.
    pub avg_needed: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub scenario: Scenario,
    pub totals: Totals,
    pub end: EndState,
    pub hours: Vec<HourRow>,
}

impl Report {
    pub fn markdown(&self) -> String {
        let t = &self.totals;
        let s = &self.scenario;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Buffer {}, min {} / max {} instances of {} ({} slots); launch_timeout {} s, scale_down_delay {} s, \
             scale_down_cooldown {} s; {:.0} h from {:02.0}:00 after a {:.0} h warm-up, seed {}.\n",
            s.buffer,
            s.min_instances,
            s.max_instances,
            s.instance_type,
            s.capacity,
            s.launch_timeout_s,
            s.scale_down_delay_s,
            s.scale_down_cooldown_s,
            s.hours,
            s.start_hour,
            s.warmup_hours,
            s.seed
        );
        if let Some(line) = s.what_if_markdown() {
            let _ = writeln!(out, "{line}\n");
        }
        let pct = |part: u64, whole: u64| if whole == 0 { 0.0 } else { 100.0 * part as f64 / whole as f64 };
        let rows: Vec<(&str, String)> = vec![
            (
                "Instance-hours (billed)",
                format!(
                    "{:.1} (booting {:.1}, serving {:.1}, draining {:.1}, lost {:.1}, terminating {:.1})",
                    t.instance_hours,
                    t.booting_hours,
                    t.serving_hours,
                    t.draining_hours,
                    t.lost_hours,
                    t.terminating_hours
                ),
            ),
            (
                "Needed instance-hours (sessions + buffer, no hysteresis)",
                format!(
                    "{:.1} (actual is {:+.1}%)",
                    t.needed_instance_hours,
                    if t.needed_instance_hours > 0.0 {
                        100.0 * (t.instance_hours / t.needed_instance_hours - 1.0)
                    } else {
                        0.0
                    }
                ),
            ),
            ("Idle warm-box-hours", format!("{:.1}", t.idle_warm_box_hours)),
            ("Session-hours", format!("{:.1} (slot utilization {:.1}%)", t.session_hours, t.slot_utilization_pct)),
            ("Free slot-hours on draining hosts", format!("{:.1}", t.draining_free_slot_hours)),
            (
                "Allocations",
                format!("{} ({} arrivals + {} after a host loss)", t.allocations, t.arrivals, t.rerequests),
            ),
            (
                "Found no warm box",
                format!(
                    "{} ({:.2}%): {} took a box still starting, {} queued",
                    t.no_warm_box, t.no_warm_box_pct, t.waited_for_starting_box, t.queued
                ),
            ),
            (
                "Wait of those served (p50 / p99 / max)",
                format!(
                    "{:.0} s / {:.0} s / {:.0} s ({} served)",
                    t.wait_p50_s, t.wait_p99_s, t.wait_max_s, t.served_after_wait
                ),
            ),
            (
                "Gave up (waited > patience)",
                format!(
                    "{} ({:.2}% of allocations); {} still waiting at the end",
                    t.gave_up, t.gave_up_pct, t.still_waiting_at_end
                ),
            ),
            (
                "Peak instances (billed / live) · peak sessions",
                format!("{} / {} · {}", t.peak_instances, t.peak_live, t.peak_sessions),
            ),
            (
                "Launches · refused · never connected",
                format!(
                    "{} · {} ({:.1}% of attempts) · {} ({} of them slow boots){}",
                    t.launches,
                    t.launch_failures,
                    pct(t.launch_failures, t.launches + t.launch_failures),
                    t.never_connected,
                    t.slow_boots_terminated,
                    t.never_connected_age_s
                        .map_or(String::new(), |(lo, hi)| format!(" (terminated {lo:.0}–{hi:.0} s after launch)"))
                ),
            ),
            ("Host losses · sessions cut", format!("{} · {}", t.host_losses, t.sessions_cut)),
            (
                "Excess drains · drained terminations · lost terminations",
                format!("{} · {} · {}", t.drains_excess, t.drained_terminations, t.host_lost_terminations),
            ),
            (
                "Launched ≤ 10 min after a drain · while a draining host had room",
                format!("{} · {}", t.launches_soon_after_drain, t.launches_while_draining_had_room),
            ),
            (
                "Plan calls · capped by max_instances · launches held by backoff",
                format!("{} · {} · {}", t.plan_calls, t.plans_capped_by_max, t.launches_held_by_backoff),
            ),
        ];
        out.push_str("| Figure | Value |\n|---|---|\n");
        for (name, value) in rows {
            let _ = writeln!(out, "| {name} | {value} |");
        }
        let e = &self.end;
        let _ = writeln!(
            out,
            "\n**At the end:** {} instances ({} live), {} sessions, {} warm boxes, {} users queued; \
             {} arrivals in the last hour. Needed for the sessions + buffer: {}; an idle region's floor: {}.\n",
            e.instances, e.live, e.sessions, e.warm, e.queued, e.arrivals_last_hour, e.needed, e.floor
        );
        out.push_str(
            "| Hour | Clock | Arrivals | No warm box | Gave up | Launches | Drains | Instances avg / max | Needed avg \
             | Warm avg | Sessions avg / max |\n\
             |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for h in &self.hours {
            let _ = writeln!(
                out,
                "| {} | {:02}:00 | {} | {} | {} | {} | {} | {:.1} / {} | {:.1} | {:.1} | {:.1} / {} |",
                h.hour,
                h.clock,
                h.arrivals,
                h.no_warm_box,
                h.gave_up,
                h.launches,
                h.drains,
                h.avg_instances,
                h.max_instances,
                h.avg_needed,
                h.avg_warm,
                h.avg_sessions,
                h.max_sessions
            );
        }
        out
    }
}
