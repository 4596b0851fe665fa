//! `FleetScaler`: starts a [`RegionScaler`] task for every region (regions added
//! later get one at the next look) and the rollout runner, all stopped by one
//! cancellation token.

use std::{collections::HashSet, sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{ScalerHandle, ScalingConfig, region::RegionScaler, rollout::RolloutRunner};
use crate::{cloud::CloudProvider, core::SharedCore};

/// What the scaler needs besides the shared core.
#[derive(Debug, Clone)]
pub struct ScalerOptions {
    pub config: ScalingConfig,
    /// The `switchboard:cluster` tag value of this deployment's instances.
    pub cluster: String,
    /// This scaler's identity as a lease holder; unique per process.
    pub holder: String,
}

pub struct FleetScaler {
    core: SharedCore,
    provider: Arc<dyn CloudProvider>,
    options: ScalerOptions,
    handle: ScalerHandle,
}

impl FleetScaler {
    /// `handle` is the one allocation and session endings wake (`Core::scaling`).
    pub fn new(
        core: SharedCore,
        provider: Arc<dyn CloudProvider>,
        options: ScalerOptions,
        handle: ScalerHandle,
    ) -> Self {
        FleetScaler { core, provider, options, handle }
    }

    pub fn handle(&self) -> ScalerHandle {
        self.handle.clone()
    }

    /// Runs until `shutdown`; region scalers give their leases up on the way out.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut started: HashSet<String> = HashSet::new();
        let mut tasks = tokio::task::JoinSet::new();
        let rollouts =
            RolloutRunner::new(self.core.clone(), self.provider.clone(), self.options.clone(), self.handle.clone());
        tasks.spawn(rollouts.run(self.handle.rollout_wakeups(), shutdown.clone()));
        let discover_every = Duration::from_millis(self.options.config.interval_ms.max(100));
        loop {
            match self.core.store.list_regions().await {
                Ok(regions) => {
                    for region in regions {
                        if started.insert(region.name.clone()) {
                            let wake = self.handle.register(&region.name);
                            let scaler = RegionScaler::new(
                                region.name.clone(),
                                self.core.clone(),
                                self.provider.clone(),
                                self.options.clone(),
                                self.handle.clone(),
                            );
                            tasks.spawn(scaler.run(wake, shutdown.clone()));
                        }
                    }
                }
                Err(error) => warn!(%error, "could not list regions for the scaler"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(discover_every) => {}
            }
        }
        // Each task releases its lease when it sees the cancellation.
        while tasks.join_next().await.is_some() {}
    }
}
