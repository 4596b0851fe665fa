//! Everything one run depends on. `SimConfig::default()` is the scenario the
//! committed report's main run uses (REPORT.md): a region of g4dn.2xlarge
//! hosts (2 mandelboxes each, as deploy/EC2.md configures them) facing the
//! built-in day at 6 arrivals per minute at its peak.

use std::time::Duration;

use planner::{InstanceType, RegionSettings, Timings};

use crate::{
    demand::{Demand, DemandCurve, Replay, SessionLengths},
    fleet::HostModel,
    provider::ProviderModel,
};

/// The buffer the report recommends (see REPORT.md, "Recommended defaults").
pub const RECOMMENDED_BUFFER: u32 = 12;

#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// One seed for everything; demand, provider and hosts draw from their own
    /// generators derived from it.
    pub seed: u64,
    /// Simulated before the measured part, figures discarded: the measured
    /// day starts with the sessions and hosts the night before left, not
    /// with an empty region.
    pub warmup: Duration,
    /// The measured part.
    pub duration: Duration,
    /// The simulated clock's tick: events within one step happen together.
    pub step: Duration,
    /// The scaler plans every region this often...
    pub scaler_interval: Duration,
    /// ...and, as the server wakes a region's scaler on every allocation and
    /// teardown, also at the end of any step that had one (the wake-ups of one
    /// step coalesce, as a `Notify` does).
    pub wake_on_change: bool,
    /// After a plan's launches met a refusal, the server launches nothing
    /// for this long, doubling per failure up to `max_launch_backoff`
    /// (`[scaling] launch_backoff_ms`); zero: retry at the next plan.
    pub launch_backoff: Duration,
    pub max_launch_backoff: Duration,
    pub settings: RegionSettings,
    pub timings: Timings,
    pub provider: ProviderModel,
    pub hosts: HostModel,
    pub demand: Demand,
    /// How long a user who found no warm box waits before giving up.
    pub patience: Duration,
    pub what_if: WhatIf,
}

/// Changes to what the scaler is told, to measure a proposed change to
/// `planner::plan` without making it: the simulator raises the buffer it puts
/// in the `RegionView`. All off: the scaler exactly as it is.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WhatIf {
    /// A buffer that follows demand: at least `⌈2·√(2·λ·L)⌉`, λ the arrival
    /// rate of the last 10 minutes and L this lead time (from a launch to a
    /// warm box). Over L, arrivals and departures are each about Poisson(λL),
    /// so their difference, what the buffer must absorb, has a standard
    /// deviation of √(2λL); two of them cover 98% of lead times.
    pub demand_buffer_lead: Option<Duration>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            seed: 1,
            warmup: Duration::from_secs(3 * 3600),
            duration: Duration::from_secs(24 * 3600),
            step: Duration::from_secs(1),
            scaler_interval: Duration::from_secs(10),
            wake_on_change: true,
            launch_backoff: Duration::from_secs(5),
            max_launch_backoff: Duration::from_secs(300),
            settings: RegionSettings {
                buffer: RECOMMENDED_BUFFER,
                min_instances: 1,
                max_instances: 400,
                instance_types: vec![InstanceType { name: "g4dn.2xlarge".into(), capacity: 2 }],
                image: "ami-sim".into(),
            },
            timings: Timings::default(),
            provider: ProviderModel::default(),
            hosts: HostModel::default(),
            demand: Demand {
                curve: DemandCurve::diurnal(6.0),
                replay: Replay::Poisson,
                start_minute: 0,
                ends_at: None,
                sessions: SessionLengths::default(),
            },
            patience: Duration::from_secs(300),
            what_if: WhatIf::default(),
        }
    }
}

impl SimConfig {
    /// A few simulated hours at a small scale, through the evening peak: the
    /// CI smoke run (well under a second in a debug build).
    pub fn smoke() -> Self {
        let mut config = SimConfig {
            warmup: Duration::from_secs(2 * 3600),
            duration: Duration::from_secs(4 * 3600),
            ..SimConfig::default()
        };
        config.demand.curve = DemandCurve::diurnal(2.0);
        config.demand.start_minute = 17 * 60;
        config.settings.max_instances = 100;
        config
    }

    /// Slots per instance of the type the scaler launches.
    pub fn capacity(&self) -> u32 {
        self.settings.instance_types.first().map_or(0, |kind| kind.capacity)
    }
}
