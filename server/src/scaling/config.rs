//! The `[scaling]` configuration section: how often the scaler looks at each
//! region and the timings that keep it from flapping or waiting forever.
//! Per-region settings (buffer, bounds, instance types, image) live in the
//! database and are edited through AdminService.PutRegion.

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScalingConfig {
    /// Run the scaler, reconciliation and rollouts in this process (one replica
    /// acts per region at a time, whatever this says on the others).
    pub enabled: bool,
    /// How often each region is looked at without being woken (allocations
    /// and teardowns wake it at once).
    pub interval_ms: u64,
    /// Wake-ups closer together than this are merged into one look.
    pub min_interval_ms: u64,
    /// How often the cloud's tagged instances are compared with the database.
    pub reconcile_interval_ms: u64,
    /// An instance the database does not know is a leak only once it is this
    /// old (a launch may be in flight), and a database instance the cloud does
    /// not list is gone only once it is this old (listings lag launches).
    pub leak_grace_ms: u64,
    /// Lease of a region's scaler; renewed at every look, taken over by another
    /// replica this long after its holder stopped renewing.
    pub lease_ttl_ms: u64,
    /// An instance whose host has not said Hello this long after launch is terminated.
    pub launch_timeout_ms: u64,
    /// Excess capacity must last this long before a host is drained.
    pub scale_down_delay_ms: u64,
    /// No scale-down this long after a launch.
    pub scale_down_cooldown_ms: u64,
    /// After a failed launch, wait this long before the next one in that
    /// region (doubling per failure up to `max_launch_backoff_ms`).
    pub launch_backoff_ms: u64,
    pub max_launch_backoff_ms: u64,
    /// Default time every region gets to be ready in an image rollout.
    pub rollout_timeout_ms: u64,
    /// New hosts are named `{host_name_prefix}-{region}-{n}`.
    pub host_name_prefix: String,
}

impl Default for ScalingConfig {
    fn default() -> Self {
        let planner = planner::Timings::default();
        ScalingConfig {
            enabled: true,
            interval_ms: 10_000,
            min_interval_ms: 1_000,
            reconcile_interval_ms: 60_000,
            leak_grace_ms: 300_000,
            lease_ttl_ms: 15_000,
            launch_timeout_ms: millis(planner.launch_timeout),
            scale_down_delay_ms: millis(planner.scale_down_delay),
            scale_down_cooldown_ms: millis(planner.scale_down_cooldown),
            launch_backoff_ms: 5_000,
            max_launch_backoff_ms: 300_000,
            rollout_timeout_ms: 1_800_000,
            host_name_prefix: "sb".into(),
        }
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl ScalingConfig {
    pub fn timings(&self) -> planner::Timings {
        planner::Timings {
            launch_timeout: Duration::from_millis(self.launch_timeout_ms),
            scale_down_delay: Duration::from_millis(self.scale_down_delay_ms),
            scale_down_cooldown: Duration::from_millis(self.scale_down_cooldown_ms),
        }
    }

    /// How often a region's loop runs: its interval, but often enough to renew
    /// its lease well before it expires.
    pub fn tick(&self) -> Duration {
        Duration::from_millis(self.interval_ms.min(self.lease_ttl_ms / 3).max(1))
    }

    pub fn lease_ttl(&self) -> Duration {
        Duration::from_millis(self.lease_ttl_ms)
    }
}
