//! Compute scaling: per region, keep a buffer of warm mandelboxes by launching
//! and terminating cloud instances, reconcile the cloud against the database,
//! and roll images out across regions.
//!
//! * [`FleetScaler`] (`scaler.rs`) runs one [`region::RegionScaler`] task per
//!   region. Each takes the region's lease (`scaler:{region}`) at every look, so
//!   only one replica acts per region; every write it makes is fenced by that
//!   lease. Decisions come from the pure `planner` crate (the fleet simulator
//!   runs the same function); `snapshot.rs` turns the database into its input,
//!   `region.rs` carries its plan out, `reconcile.rs` compares with the cloud.
//! * [`rollout::RolloutRunner`] drives image rollouts (durable operations).
//! * [`CapacityPlanner`] is the seam allocation asks when it finds no warm box.

pub mod config;
mod reconcile;
mod region;
pub mod rollout;
mod scaler;
mod snapshot;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::Notify;

pub use config::ScalingConfig;
pub use scaler::{FleetScaler, ScalerOptions};

use crate::{error::ApiResult, store::DynStore};

#[async_trait]
pub trait CapacityPlanner: Send + Sync + 'static {
    /// Whether a box will become available in one of `regions` soon, asking
    /// for more capacity if the planner can provide it.
    async fn capacity_coming(&self, regions: &[String]) -> ApiResult<bool>;
}

pub type DynCapacityPlanner = Arc<dyn CapacityPlanner>;

/// Capacity is coming if an active host is warming a box or tearing one down
/// (a torn-down box's replacement is spawned before it is written: its slot
/// shows DYING until the replacement is warm), or if the region is scaled (it
/// has instance types and room below its maximum): the region's scaler is
/// woken and launches.
pub struct ScalingPlanner {
    store: DynStore,
    scaler: ScalerHandle,
}

impl ScalingPlanner {
    pub fn new(store: DynStore, scaler: ScalerHandle) -> Self {
        ScalingPlanner { store, scaler }
    }
}

#[async_trait]
impl CapacityPlanner for ScalingPlanner {
    async fn capacity_coming(&self, regions: &[String]) -> ApiResult<bool> {
        for region in regions {
            self.scaler.wake(region);
        }
        if self.store.box_coming_in(regions).await? {
            return Ok(true);
        }
        let scaled = self.store.list_regions().await?;
        for region in scaled.iter().filter(|r| r.enabled && regions.contains(&r.name)) {
            if region.scaling.instance_types.is_empty() {
                continue;
            }
            if self.store.region_can_grow(&region.name, region.scaling.max_instances).await? {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// What the scaler last saw and did in a region (this replica's view).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegionStatus {
    pub available: u32,
    pub launching: u32,
    pub live_instances: u32,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
    /// The buffer wants more instances than `max_instances` allows.
    pub at_max_instances: bool,
    /// Whether this replica holds the region's lease.
    pub leader: bool,
}

#[derive(Default)]
struct Slot {
    wake: Arc<Notify>,
    status: RegionStatus,
}

/// Wakes region scalers and reads their status; cheap to clone. Allocation
/// and session endings wake the region they touched.
#[derive(Clone, Default)]
pub struct ScalerHandle {
    slots: Arc<Mutex<HashMap<String, Slot>>>,
    rollouts: Arc<Notify>,
}

impl ScalerHandle {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        // A poisoned lock only means a panic elsewhere; the map stays usable.
        self.slots.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Asks the region's scaler to look now (merged with other wake-ups).
    pub fn wake(&self, region: &str) {
        if let Some(slot) = self.lock().get(region) {
            slot.wake.notify_one();
        }
    }

    /// Asks the rollout runner to look now.
    pub fn wake_rollouts(&self) {
        self.rollouts.notify_one();
    }

    pub fn status(&self, region: &str) -> Option<RegionStatus> {
        self.lock().get(region).map(|slot| slot.status.clone()).filter(|status| status.leader)
    }

    fn register(&self, region: &str) -> Arc<Notify> {
        self.lock().entry(region.to_owned()).or_default().wake.clone()
    }

    fn update_status(&self, region: &str, update: impl FnOnce(&mut RegionStatus)) {
        if let Some(slot) = self.lock().get_mut(region) {
            update(&mut slot.status);
        }
    }

    fn rollout_wakeups(&self) -> Arc<Notify> {
        self.rollouts.clone()
    }
}
