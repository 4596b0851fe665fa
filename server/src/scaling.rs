//! The seam between allocation and compute scaling. When Allocate finds no
//! warm box and no free slot, it asks the planner whether capacity is on the
//! way; if so the session waits (PENDING), if not it gets NO_CAPACITY. The EC2
//! scaler implements this trait to launch instances; without it, only boxes
//! already warming count.

use std::sync::Arc;

use async_trait::async_trait;

use crate::{error::ApiResult, model::HostState, store::DynStore};

#[async_trait]
pub trait CapacityPlanner: Send + Sync + 'static {
    /// Whether a box will become available in one of `regions` soon, asking
    /// for more capacity if the planner can provide it.
    async fn capacity_coming(&self, regions: &[String]) -> ApiResult<bool>;
}

pub type DynCapacityPlanner = Arc<dyn CapacityPlanner>;

/// No scaling: capacity is coming only if a connected host is warming a box.
pub struct FixedFleet {
    store: DynStore,
}

impl FixedFleet {
    pub fn new(store: DynStore) -> Self {
        FixedFleet { store }
    }
}

#[async_trait]
impl CapacityPlanner for FixedFleet {
    async fn capacity_coming(&self, regions: &[String]) -> ApiResult<bool> {
        for region in regions {
            let hosts = self.store.list_hosts(Some(region)).await?;
            if hosts.iter().any(|summary| summary.host.state == HostState::Active && summary.warm > 0) {
                return Ok(true);
            }
        }
        Ok(false)
    }
}
