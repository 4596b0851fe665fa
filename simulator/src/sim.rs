//! The simulated clock: one region, step by step, the fleet living its life,
//! users arriving and waiting, and the real `planner::plan` deciding.

use planner::{Millis, Plan, ScalerMemory, TerminateReason};
use std::collections::VecDeque;

use crate::{
    config::SimConfig,
    dist::millis,
    fleet::{Applied, Counts, Fleet},
    provider::Provider,
    report::{EndState, HourRow, Report, Scenario, Totals},
};

const HOUR: Millis = 3_600_000;
/// A launch this soon after an excess drain counts as flapping.
const FLAP_WINDOW: Millis = 10 * 60_000;
/// The window the demand-following what-if measures the arrival rate over.
const RATE_WINDOW: Millis = 10 * 60_000;

// Each part of the model draws from its own generator, so that (say) one
// more launch does not shift every later session length.
const PROVIDER_STREAM: u64 = 0x5bd1_e995_0000_0001;
const HOST_STREAM: u64 = 0x5bd1_e995_0000_0002;

/// A user with no box yet.
struct Waiting {
    since: Millis,
    session: Millis,
}

/// Runs one configuration; `on_hour` sees each simulated hour as it closes
/// (progress output).
pub fn run(config: &SimConfig, mut on_hour: impl FnMut(&HourRow)) -> Report {
    let lead_in_minutes = millis(config.warmup).div_ceil(60_000);
    let measured_from = lead_in_minutes * 60_000;
    let end_of_run = measured_from + millis(config.duration);
    let step = millis(config.step).max(1);
    let interval = millis(config.scaler_interval).max(1);
    let patience = millis(config.patience);
    let arrivals = config.demand.arrivals(lead_in_minutes, millis(config.duration), config.seed);
    let mut provider = Provider::new(config.provider.clone(), config.seed ^ PROVIDER_STREAM);
    let mut fleet = Fleet::new(config.settings.clone(), config.hosts.clone(), config.seed ^ HOST_STREAM);
    let mut memory = ScalerMemory::default();
    let mut figures = Figures::new(config);
    let mut queue: VecDeque<Waiting> = VecDeque::new();
    let mut recent: VecDeque<Millis> = VecDeque::new();
    let mut next_arrival = 0;
    let mut next_tick: Millis = 0;
    let mut backoff: Millis = 0;
    let mut launch_not_before: Millis = 0;
    let mut now: Millis = 0;
    let mut measuring = false;

    while now < end_of_run {
        if !measuring && now >= measured_from {
            // The warm-up's figures go; the fleet and the users stay.
            figures = Figures::new(config);
            measuring = true;
        }
        let advance = fleet.advance(now, step);
        figures.totals.host_losses += u64::from(advance.hosts_lost);
        figures.totals.sessions_cut += advance.cut.len() as u64;
        let mut woken = advance.sessions_ended > 0 || !advance.cut.is_empty();

        // The dispatcher: a box that warmed goes to the longest waiting user.
        while let Some(waiting) = queue.front() {
            if !fleet.claim_warm(now, waiting.session) {
                break;
            }
            figures.waits.push(now - waiting.since);
            queue.pop_front();
            woken = true;
        }
        while queue.front().is_some_and(|waiting| now >= waiting.since + patience) {
            queue.pop_front();
            figures.totals.gave_up += 1;
            figures.hour.gave_up += 1;
        }

        // Users whose host died ask again at once, then this step's arrivals.
        let rerequests = advance.cut.iter().map(|&session| (session, true));
        let due = arrivals[next_arrival..].iter().take_while(|arrival| arrival.at <= now);
        let requests: Vec<(Millis, bool)> = rerequests.chain(due.map(|arrival| (arrival.session, false))).collect();
        next_arrival += requests.iter().filter(|(_, rerequest)| !rerequest).count();
        for (session, rerequest) in requests {
            woken = true;
            figures.totals.allocations += 1;
            if rerequest {
                figures.totals.rerequests += 1;
            } else {
                figures.totals.arrivals += 1;
                figures.hour.arrivals += 1;
                recent.push_back(now);
            }
            if fleet.claim_warm(now, session) {
                continue;
            }
            figures.totals.no_warm_box += 1;
            figures.hour.no_warm_box += 1;
            if let Some(wait) = fleet.reserve_starting(now, session) {
                figures.totals.waited_for_starting_box += 1;
                figures.waits.push(wait);
            } else {
                figures.totals.queued += 1;
                queue.push_back(Waiting { since: now, session });
            }
        }
        while recent.front().is_some_and(|&at| at + RATE_WINDOW <= now) {
            recent.pop_front();
        }

        // The scaler: on its timer, and when the step changed the region.
        let tick = now >= next_tick;
        if tick || (config.wake_on_change && woken) {
            if tick {
                next_tick += interval;
            }
            let buffer = told_buffer(config, recent.len());
            let view = fleet.view(now, buffer, u32::try_from(queue.len()).unwrap_or(u32::MAX));
            let mut plan = planner::plan(&view, &mut memory, &config.timings);
            // The server's launch backoff holds launches (not the rest of
            // the plan) back; the planner has recorded a launch regardless.
            if plan.launch > 0 && now < launch_not_before {
                plan.launch = 0;
                figures.totals.launches_held_by_backoff += 1;
            }
            let before = fleet.counts();
            let applied = fleet.apply(&plan, now, &mut provider);
            if applied.refused > 0 {
                backoff = if backoff == 0 {
                    millis(config.launch_backoff)
                } else {
                    (backoff * 2).min(millis(config.max_launch_backoff))
                };
                launch_not_before = now + backoff;
            } else if applied.launched > 0 {
                backoff = 0;
            }
            figures.planned(now, &plan, &applied, &before);
        }

        let counts = fleet.counts();
        let needed = ideal_instances(config, counts.busy);
        figures.sample(counts, needed, queue.len(), step);
        now += step;
        if measuring && ((now - measured_from).is_multiple_of(HOUR) || now >= end_of_run) {
            on_hour(&figures.close_hour());
        }
    }

    let counts = fleet.counts();
    let capacity = config.capacity().max(1);
    let min = config.settings.min_instances;
    let end = EndState {
        instances: counts.billed,
        live: counts.live,
        sessions: counts.busy,
        warm: counts.warm,
        queued: queue.len() as u32,
        arrivals_last_hour: figures.hours.last().map_or(0, |hour| hour.arrivals),
        needed: ideal_instances(config, counts.busy),
        floor: config.settings.buffer.div_ceil(capacity).max(min),
    };
    figures.totals.still_waiting_at_end = queue.len() as u64;
    Report { scenario: Scenario::of(config), totals: figures.finish(config), end, hours: figures.hours }
}

/// What a scaler without hysteresis, whose sessions could move, would run:
/// enough instances for the sessions and the buffer, at least the minimum.
fn ideal_instances(config: &SimConfig, sessions: u32) -> u32 {
    (sessions + config.settings.buffer).div_ceil(config.capacity().max(1)).max(config.settings.min_instances)
}

/// The buffer put in the scaler's view: the setting, raised by a what-if.
fn told_buffer(config: &SimConfig, recent_arrivals: usize) -> u32 {
    let mut buffer = config.settings.buffer;
    if let Some(lead) = config.what_if.demand_buffer_lead {
        let expected = recent_arrivals as f64 / RATE_WINDOW as f64 * millis(lead) as f64;
        buffer = buffer.max((2.0 * (2.0 * expected).sqrt()).ceil() as u32);
    }
    buffer
}

/// The figures as the run goes.
struct Figures {
    totals: Totals,
    waits: Vec<Millis>,
    never_connected_ages: Vec<Millis>,
    hours: Vec<HourRow>,
    hour: HourRow,
    /// Integrals over the current hour, in step-milliseconds.
    hour_instances: f64,
    hour_warm: f64,
    hour_sessions: f64,
    hour_needed: f64,
    hour_length: Millis,
    last_excess_drain: Option<Millis>,
    /// Billed milliseconds by phase, and other integrals.
    booting: f64,
    serving: f64,
    draining: f64,
    lost: f64,
    terminating: f64,
    warm: f64,
    sessions: f64,
    draining_free: f64,
    waiting: f64,
    needed: f64,
    start_minute: usize,
}

impl Figures {
    fn new(config: &SimConfig) -> Self {
        let start_minute = config.demand.start_minute;
        Figures {
            totals: Totals::default(),
            waits: Vec::new(),
            never_connected_ages: Vec::new(),
            hours: Vec::new(),
            hour: HourRow { clock: ((start_minute / 60) % 24) as u32, ..HourRow::default() },
            hour_instances: 0.0,
            hour_warm: 0.0,
            hour_sessions: 0.0,
            hour_needed: 0.0,
            hour_length: 0,
            last_excess_drain: None,
            booting: 0.0,
            serving: 0.0,
            draining: 0.0,
            lost: 0.0,
            terminating: 0.0,
            warm: 0.0,
            sessions: 0.0,
            draining_free: 0.0,
            waiting: 0.0,
            needed: 0.0,
            start_minute,
        }
    }

    fn planned(&mut self, now: Millis, plan: &Plan, applied: &Applied, before: &Counts) {
        let t = &mut self.totals;
        t.plan_calls += 1;
        t.plans_capped_by_max += u64::from(plan.capped_by_max);
        t.launches += u64::from(applied.launched);
        t.launch_failures += u64::from(applied.refused);
        self.hour.launches += u64::from(applied.launched);
        if applied.launched > 0 {
            if self.last_excess_drain.is_some_and(|at| now - at <= FLAP_WINDOW) {
                t.launches_soon_after_drain += u64::from(applied.launched);
            }
            if before.draining_free > 0 {
                t.launches_while_draining_had_room += u64::from(applied.launched);
            }
        }
        if applied.drained_for_excess > 0 {
            t.drains_excess += u64::from(applied.drained_for_excess);
            self.hour.drains += u64::from(applied.drained_for_excess);
            self.last_excess_drain = Some(now);
        }
        for terminated in &applied.terminated {
            match terminated.reason {
                TerminateReason::NeverConnected => {
                    t.never_connected += 1;
                    t.slow_boots_terminated += u64::from(terminated.slow_boot);
                    self.never_connected_ages.push(terminated.age);
                }
                TerminateReason::HostLost => t.host_lost_terminations += 1,
                TerminateReason::Drained => t.drained_terminations += 1,
            }
        }
    }

    /// The fleet as it stands for the step `[now, now + step)`.
    fn sample(&mut self, counts: Counts, needed: u32, queued: usize, step: Millis) {
        let dt = step as f64;
        self.needed += f64::from(needed) * dt;
        self.hour_needed += f64::from(needed) * dt;
        self.booting += f64::from(counts.launching) * dt;
        self.serving += f64::from(counts.active) * dt;
        self.draining += f64::from(counts.draining) * dt;
        self.lost += f64::from(counts.lost) * dt;
        self.terminating += f64::from(counts.terminating) * dt;
        self.warm += f64::from(counts.warm) * dt;
        self.sessions += f64::from(counts.busy) * dt;
        self.draining_free += f64::from(counts.draining_free) * dt;
        self.waiting += queued as f64 * dt;
        self.hour_instances += f64::from(counts.billed) * dt;
        self.hour_warm += f64::from(counts.warm) * dt;
        self.hour_sessions += f64::from(counts.busy) * dt;
        self.hour_length += step;
        self.hour.max_instances = self.hour.max_instances.max(counts.billed);
        self.hour.max_sessions = self.hour.max_sessions.max(counts.busy);
        let t = &mut self.totals;
        t.peak_instances = t.peak_instances.max(counts.billed);
        t.peak_live = t.peak_live.max(counts.live);
        t.peak_sessions = t.peak_sessions.max(counts.busy);
    }

    fn close_hour(&mut self) -> HourRow {
        let length = self.hour_length.max(1) as f64;
        self.hour.avg_instances = self.hour_instances / length;
        self.hour.avg_warm = self.hour_warm / length;
        self.hour.avg_sessions = self.hour_sessions / length;
        self.hour.avg_needed = self.hour_needed / length;
        let index = self.hours.len() as u32 + 1;
        let next = HourRow {
            hour: index,
            clock: ((self.start_minute / 60 + index as usize) % 24) as u32,
            ..HourRow::default()
        };
        let closed = std::mem::replace(&mut self.hour, next);
        (self.hour_instances, self.hour_warm, self.hour_sessions, self.hour_needed) = (0.0, 0.0, 0.0, 0.0);
        self.hour_length = 0;
        self.hours.push(closed.clone());
        closed
    }

    fn finish(&mut self, config: &SimConfig) -> Totals {
        let hours = |ms: f64| ms / HOUR as f64;
        let mut t = std::mem::take(&mut self.totals);
        t.booting_hours = hours(self.booting);
        t.serving_hours = hours(self.serving);
        t.draining_hours = hours(self.draining);
        t.lost_hours = hours(self.lost);
        t.terminating_hours = hours(self.terminating);
        t.instance_hours = t.booting_hours + t.serving_hours + t.draining_hours + t.lost_hours + t.terminating_hours;
        t.idle_warm_box_hours = hours(self.warm);
        t.session_hours = hours(self.sessions);
        t.draining_free_slot_hours = hours(self.draining_free);
        t.user_wait_hours = hours(self.waiting);
        t.needed_instance_hours = hours(self.needed);
        let slot_hours = t.instance_hours * f64::from(config.capacity());
        t.slot_utilization_pct = if slot_hours > 0.0 { 100.0 * t.session_hours / slot_hours } else { 0.0 };
        let pct = |part: u64| if t.allocations == 0 { 0.0 } else { 100.0 * part as f64 / t.allocations as f64 };
        t.no_warm_box_pct = pct(t.no_warm_box);
        t.gave_up_pct = pct(t.gave_up);
        t.served_after_wait = self.waits.len() as u64;
        self.waits.sort_unstable();
        let seconds = |ms: Millis| ms as f64 / 1000.0;
        t.wait_p50_s = percentile(&self.waits, 50.0).map_or(0.0, seconds);
        t.wait_p99_s = percentile(&self.waits, 99.0).map_or(0.0, seconds);
        t.wait_max_s = self.waits.last().copied().map_or(0.0, seconds);
        let ages = &self.never_connected_ages;
        t.never_connected_age_s = ages.iter().min().zip(ages.iter().max()).map(|(lo, hi)| (seconds(*lo), seconds(*hi)));
        t
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[Millis], p: f64) -> Option<Millis> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&values, 50.0), Some(50));
        assert_eq!(percentile(&values, 99.0), Some(99));
        assert_eq!(percentile(&values, 100.0), Some(100));
        assert_eq!(percentile(&[7], 99.0), Some(7));
        assert_eq!(percentile(&[], 50.0), None);
    }
}
