//! Image rollouts as durable operations. `start_rollout` stores the operation;
//! the [`RolloutRunner`] (one replica at a time, lease `rollouts`) drives every
//! running one from the state stored in the database, so a replica that dies
//! mid-rollout leaves it to the next:
//!
//! 1. LAUNCHING/WAITING: each scaled region gets enough instances on the new
//!    image for its buffer (tagged with the rollout; the scaler neither counts
//!    nor drains them), until each has that many boxes warm.
//! 2. SWITCHED: all ready → one transaction switches every region's image
//!    (and makes the rollout's instances ordinary ones). The scaler then drains
//!    old-image hosts as their sessions end.
//! 3. ROLLING_BACK → ROLLED_BACK: a region not ready by the deadline → the new
//!    instances are terminated; every region keeps its old image.

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

use super::{
    ScalerHandle,
    region::{launch_instances, terminate_instance},
    scaler::ScalerOptions,
};
use crate::{
    cloud::CloudProvider,
    core::SharedCore,
    error::{ApiError, ApiResult},
    model::{HostState, InstanceState, Lease, MandelboxState, OperationRecord, OperationState},
    store::StoreError,
};

pub const ROLLOUT_KIND: &str = "rollout";
const LEASE: &str = "rollouts";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RolloutPhase {
    Launching,
    Waiting,
    Switched,
    RollingBack,
    RolledBack,
}

impl RolloutPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Launching => "LAUNCHING",
            Self::Waiting => "WAITING",
            Self::Switched => "SWITCHED",
            Self::RollingBack => "ROLLING_BACK",
            Self::RolledBack => "ROLLED_BACK",
        }
    }
}

/// How far a rollout got: the operation's `progress`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutProgress {
    pub image: String,
    pub phase: RolloutPhase,
    pub deadline: DateTime<Utc>,
    pub regions: Vec<RegionProgress>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionProgress {
    pub region: String,
    pub previous_image: String,
    pub wanted_mandelboxes: u32,
    pub launched_instances: u32,
    pub connected_instances: u32,
    pub warm_mandelboxes: u32,
    pub ready: bool,
    pub error: Option<String>,
}

impl RolloutProgress {
    pub fn parse(operation: &OperationRecord) -> Result<RolloutProgress, serde_json::Error> {
        serde_json::from_value(operation.progress.clone())
    }
}

/// Validates and stores a new rollout of `image` to every enabled region with
/// instance types; the runner picks it up at once.
pub async fn start_rollout(
    core: &SharedCore,
    scaler: &ScalerHandle,
    image: &str,
    timeout: Option<Duration>,
) -> ApiResult<OperationRecord> {
    if image.is_empty() || image.len() > 256 || !image.chars().all(|c| c.is_ascii_graphic()) {
        return Err(ApiError::InvalidRequest("image must be 1 to 256 printable ASCII characters".into()));
    }
    let timeout = timeout.unwrap_or(Duration::from_millis(core.config.scaling.rollout_timeout_ms));
    if timeout.is_zero() || timeout > Duration::from_secs(7 * 24 * 3600) {
        return Err(ApiError::InvalidRequest("timeout must be between 1 s and 7 days".into()));
    }
    let regions: Vec<RegionProgress> = core
        .store
        .list_regions()
        .await?
        .into_iter()
        .filter(|r| r.enabled && !r.scaling.instance_types.is_empty())
        .map(|r| RegionProgress {
            wanted_mandelboxes: r.scaling.buffer.max(1),
            region: r.name,
            previous_image: r.image,
            launched_instances: 0,
            connected_instances: 0,
            warm_mandelboxes: 0,
            ready: false,
            error: None,
        })
        .collect();
    if regions.is_empty() {
        return Err(ApiError::NoScaledRegions);
    }
    let now = crate::store::now();
    let deadline = now + chrono::Duration::from_std(timeout).map_err(|e| ApiError::InvalidRequest(e.to_string()))?;
    let progress = RolloutProgress { image: image.to_owned(), phase: RolloutPhase::Launching, deadline, regions };
    let operation = OperationRecord {
        id: Uuid::new_v4(),
        kind: ROLLOUT_KIND.into(),
        state: OperationState::Running,
        request: serde_json::json!({ "image": image, "timeout_ms": timeout.as_millis() as u64 }),
        progress: serde_json::to_value(&progress).map_err(|e| ApiError::Internal(e.to_string()))?,
        error: None,
        created_at: now,
        updated_at: now,
        finished_at: None,
    };
    match core.store.create_operation(&operation).await {
        Ok(()) => {}
        Err(StoreError::Conflict(_)) => return Err(ApiError::RolloutInProgress),
        Err(error) => return Err(error.into()),
    }
    info!(operation_id = %operation.id, image, regions = progress.regions.len(), "image rollout started");
    scaler.wake_rollouts();
    Ok(operation)
}

/// Drives running rollouts; one replica at a time.
pub(super) struct RolloutRunner {
    core: SharedCore,
    provider: Arc<dyn CloudProvider>,
    options: ScalerOptions,
    scaler: ScalerHandle,
}

impl RolloutRunner {
    pub(super) fn new(
        core: SharedCore,
        provider: Arc<dyn CloudProvider>,
        options: ScalerOptions,
        scaler: ScalerHandle,
    ) -> Self {
        RolloutRunner { core, provider, options, scaler }
    }

    pub(super) async fn run(self, wake: Arc<Notify>, shutdown: CancellationToken) {
        let tick = self.options.config.tick();
        let mut held: Option<Lease> = None;
        loop {
            match self.pass().await {
                Ok(lease) => held = lease,
                Err(error) => warn!(error = %format!("{error:#}"), "rollout pass failed"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = wake.notified() => {}
                _ = tokio::time::sleep(tick) => {}
            }
        }
        if let Some(lease) = held
            && let Err(error) = self.core.store.release_lease(&lease).await
        {
            tracing::debug!(%error, "could not release the rollout lease");
        }
    }

    async fn pass(&self) -> anyhow::Result<Option<Lease>> {
        let store = &self.core.store;
        let running: Vec<OperationRecord> =
            store.list_operations(true, 10).await?.into_iter().filter(|op| op.kind == ROLLOUT_KIND).collect();
        if running.is_empty() {
            return Ok(None);
        }
        let Some(lease) = store.acquire_lease(LEASE, &self.options.holder, self.options.config.lease_ttl()).await?
        else {
            return Ok(None);
        };
        for operation in running {
            self.step(&lease, operation).await?;
        }
        Ok(Some(lease))
    }

    async fn step(&self, lease: &Lease, mut operation: OperationRecord) -> anyhow::Result<()> {
        let store = &self.core.store;
        let mut progress = match RolloutProgress::parse(&operation) {
            Ok(progress) => progress,
            Err(error) => {
                operation.error = Some(format!("unreadable progress: {error}"));
                finish(&mut operation, OperationState::Failed);
                store.update_operation(Some(lease), &operation).await?;
                return Ok(());
            }
        };
        let now = Utc::now();
        let mine: Vec<_> = store
            .list_instances(None, false)
            .await?
            .into_iter()
            .filter(|i| i.rollout_id == Some(operation.id))
            .collect();

        if progress.phase == RolloutPhase::RollingBack {
            for instance in &mine {
                terminate_instance(&self.core, self.provider.as_ref(), lease, instance, "rollout rolled back").await?;
            }
            let left = store
                .list_instances(None, false)
                .await?
                .iter()
                .filter(|i| i.rollout_id == Some(operation.id) && i.state != InstanceState::Terminated)
                .count();
            if left == 0 {
                progress.phase = RolloutPhase::RolledBack;
                finish(&mut operation, OperationState::RolledBack);
                warn!(operation_id = %operation.id, image = %progress.image, error = operation.error.as_deref().unwrap_or(""), "image rollout rolled back");
            }
            return self.save(lease, &mut operation, &progress).await;
        }

        let regions = store.list_regions().await?;
        let hosts = store.list_hosts(None).await?;
        for entry in progress.regions.iter_mut() {
            let Some(region) = regions.iter().find(|r| r.name == entry.region) else {
                entry.error = Some("region was removed".into());
                continue;
            };
            let ours: Vec<_> = mine.iter().filter(|i| i.region == entry.region).collect();
            let per_instance = region.scaling.instance_types.first().map_or(1, |t| t.capacity.max(1));
            let needed = entry.wanted_mandelboxes.div_ceil(per_instance);
            let live = u32::try_from(ours.len()).unwrap_or(u32::MAX);
            if live < needed && now < progress.deadline {
                let launched = launch_instances(
                    &self.core,
                    self.provider.as_ref(),
                    &self.options,
                    lease,
                    region,
                    needed - live,
                    &progress.image,
                    Some(operation.id),
                )
                .await?;
                match launched {
                    Ok(count) => entry.launched_instances += count,
                    Err(error) => {
                        warn!(operation_id = %operation.id, region = %entry.region, %error, "rollout launch failed");
                        entry.error = Some(error.to_string());
                    }
                }
            }
            let mut connected = 0;
            let mut warm = 0;
            for instance in &ours {
                let Some(host) = hosts.iter().find(|h| h.host.id == instance.host_id) else { continue };
                if host.host.state != HostState::Active || host.host.image != progress.image {
                    continue;
                }
                connected += 1;
                warm += store.host_mandelboxes(&host.host.id, &[MandelboxState::Waiting]).await?.len();
            }
            entry.connected_instances = connected;
            entry.warm_mandelboxes = u32::try_from(warm).unwrap_or(u32::MAX);
            entry.ready = connected > 0 && entry.warm_mandelboxes >= entry.wanted_mandelboxes;
        }

        if progress.regions.iter().all(|r| r.ready) {
            progress.phase = RolloutPhase::Switched;
            finish(&mut operation, OperationState::Succeeded);
            operation.progress = serde_json::to_value(&progress)?;
            let images: Vec<(String, String)> =
                progress.regions.iter().map(|r| (r.region.clone(), progress.image.clone())).collect();
            store.complete_rollout(lease, &operation, &images).await?;
            info!(operation_id = %operation.id, image = %progress.image, regions = images.len(), "image rollout switched every region");
            for (region, _) in &images {
                self.scaler.wake(region);
            }
            return Ok(());
        }
        if now >= progress.deadline {
            let late: Vec<String> = progress
                .regions
                .iter()
                .filter(|r| !r.ready)
                .map(|r| {
                    let why = r.error.as_deref().map(|e| format!(", {e}")).unwrap_or_default();
                    format!("{} ({}/{} warm{why})", r.region, r.warm_mandelboxes, r.wanted_mandelboxes)
                })
                .collect();
            operation.error = Some(format!("not ready by the deadline: {}", late.join("; ")));
            progress.phase = RolloutPhase::RollingBack;
            warn!(operation_id = %operation.id, image = %progress.image, error = operation.error.as_deref().unwrap_or(""), "image rollout failed; rolling back");
        } else {
            progress.phase = RolloutPhase::Waiting;
        }
        self.save(lease, &mut operation, &progress).await
    }

    async fn save(
        &self,
        lease: &Lease,
        operation: &mut OperationRecord,
        progress: &RolloutProgress,
    ) -> anyhow::Result<()> {
        let value = serde_json::to_value(progress)?;
        if value != operation.progress || operation.state != OperationState::Running {
            operation.progress = value;
            operation.updated_at = crate::store::now();
            self.core.store.update_operation(Some(lease), operation).await?;
        }
        Ok(())
    }
}

fn finish(operation: &mut OperationRecord, state: OperationState) {
    let now = crate::store::now();
    operation.state = state;
    operation.updated_at = now;
    operation.finished_at = Some(now);
}
