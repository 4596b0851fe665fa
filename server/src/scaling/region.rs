//! One region's scaler: a task that, at every tick or wake-up, takes the
//! region's lease, reads the region, asks the planner, and carries the plan
//! out through the cloud provider. Every database write is fenced by the lease,
//! so a replica that lost it (paused, partitioned) cannot act on stale beliefs.

use std::{sync::Arc, time::Duration};

use chrono::Utc;
use planner::{DrainReason, Plan, ScalerMemory, TerminateReason};
use tokio::{sync::Notify, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{ScalerHandle, reconcile, scaler::ScalerOptions, snapshot};
use crate::{
    cloud::{CloudError, CloudProvider, LaunchRequest},
    core::SharedCore,
    model::{InstanceRecord, InstanceState, Lease, NewInstance, Region},
    store::StoreError,
};

/// Pending sessions read per look (the oldest); more waiting than this all at
/// once means the region is far behind anyway.
const MAX_WAITING_COUNTED: u32 = 1_000;

/// The lease name of a region's scaler.
pub(super) fn lease_name(region: &str) -> String {
    format!("scaler:{region}")
}

pub(super) struct RegionScaler {
    pub(super) region: String,
    pub(super) core: SharedCore,
    pub(super) provider: Arc<dyn CloudProvider>,
    pub(super) options: ScalerOptions,
    pub(super) handle: ScalerHandle,
    memory: ScalerMemory,
    lease: Option<Lease>,
    next_reconcile: Instant,
    /// No launch before this (after failures), and the current backoff.
    launch_not_before: Instant,
    launch_backoff: Duration,
}

impl RegionScaler {
    pub(super) fn new(
        region: String,
        core: SharedCore,
        provider: Arc<dyn CloudProvider>,
        options: ScalerOptions,
        handle: ScalerHandle,
    ) -> Self {
        let now = Instant::now();
        RegionScaler {
            region,
            core,
            provider,
            options,
            handle,
            memory: ScalerMemory::default(),
            lease: None,
            next_reconcile: now,
            launch_not_before: now,
            launch_backoff: Duration::ZERO,
        }
    }

    pub(super) async fn run(mut self, wake: Arc<Notify>, shutdown: CancellationToken) {
        let tick = self.options.config.tick();
        let min_gap = Duration::from_millis(self.options.config.min_interval_ms);
        loop {
            let started = Instant::now();
            if let Err(error) = self.look().await {
                match error.downcast_ref::<StoreError>() {
                    Some(StoreError::Fenced { .. }) => {
                        info!(region = %self.region, "scaler lease lost to another replica; standing down");
                        self.stand_down();
                    }
                    _ => warn!(region = %self.region, error = %format!("{error:#}"), "scaler pass failed"),
                }
            }
            // Wake-ups within `min_gap` of a pass are merged into the next one.
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep_until(started + min_gap) => {}
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = wake.notified() => {}
                _ = tokio::time::sleep(tick) => {}
            }
        }
        if let Some(lease) = self.lease.take() {
            // Another replica takes over at once instead of after the TTL.
            if let Err(error) = self.core.store.release_lease(&lease).await {
                debug!(region = %self.region, %error, "could not release the scaler lease");
            }
        }
    }

    fn stand_down(&mut self) {
        self.lease = None;
        self.memory = ScalerMemory::default();
        self.handle.update_status(&self.region, |status| status.leader = false);
    }

    /// One pass: lease, read, plan, act, and reconcile when due.
    async fn look(&mut self) -> anyhow::Result<()> {
        let store = &self.core.store;
        let Some(region) = store.list_regions().await?.into_iter().find(|r| r.name == self.region) else {
            return Ok(());
        };
        // A fixed-fleet region with nothing launched has nothing to do: no
        // lease, no writes (allocations wake this task often).
        if region.scaling.instance_types.is_empty()
            && self.lease.is_none()
            && store.list_instances(Some(&self.region), false).await?.is_empty()
        {
            return Ok(());
        }
        let name = lease_name(&self.region);
        let Some(lease) = store.acquire_lease(&name, &self.options.holder, self.options.config.lease_ttl()).await?
        else {
            if self.lease.is_some() {
                info!(region = %self.region, "another replica holds this region's scaler lease");
            }
            self.stand_down();
            return Ok(());
        };
        if self.lease.as_ref().map(|held| held.epoch) != Some(lease.epoch) {
            info!(region = %self.region, epoch = lease.epoch, "scaler lease taken: this replica scales the region");
            self.memory = ScalerMemory::default();
        }
        self.lease = Some(lease.clone());

        // Instances before the region: a rollout switches the region's image
        // and clears its instances' rollout ids in one transaction, so reading
        // in this order never sees the new image with the new hosts not yet
        // marked as ordinary, which would drain them as old-image hosts.
        let instances = store.list_instances(Some(&self.region), false).await?;
        self.finish_terminations(&lease, &instances).await?;
        let hosts = store.list_hosts(Some(&self.region)).await?;
        let Some(region) = store.list_regions().await?.into_iter().find(|r| r.name == self.region) else {
            return Ok(());
        };
        // Users waiting for a box whose first choice is this region.
        let waiting = store
            .pending_sessions(MAX_WAITING_COUNTED)
            .await?
            .iter()
            .filter(|session| session.requested_regions.first() == Some(&self.region))
            .count();
        let waiting = u32::try_from(waiting).unwrap_or(u32::MAX);
        let now = Utc::now();
        let view = snapshot::region_view(&region, &instances, &hosts, waiting, now);
        let last_launch = self.memory.last_launch;
        let plan = planner::plan(&view, &mut self.memory, &self.options.config.timings());
        let was_capped = self.handle.status(&self.region).is_some_and(|s| s.at_max_instances);
        if plan.capped_by_max && !was_capped {
            warn!(region = %self.region, max = region.scaling.max_instances, available = plan.available, buffer = region.scaling.buffer, "the buffer wants more instances than max_instances allows");
        }
        self.handle.update_status(&self.region, |status| {
            status.leader = true;
            status.at_max_instances = plan.capped_by_max;
            status.available = plan.available;
            status.launching = plan.on_the_way;
            status.live_instances = plan.live_instances;
            status.updated_at = Some(now);
        });
        if !plan.is_empty() {
            debug!(region = %self.region, ?plan, "scaler plan");
        }
        self.carry_out(&lease, &region, &instances, &plan, last_launch).await?;

        if Instant::now() >= self.next_reconcile {
            self.next_reconcile = Instant::now() + Duration::from_millis(self.options.config.reconcile_interval_ms);
            reconcile::reconcile_region(self, &lease).await?;
        }
        Ok(())
    }

    async fn carry_out(
        &mut self,
        lease: &Lease,
        region: &Region,
        instances: &[InstanceRecord],
        plan: &Plan,
        last_launch: Option<planner::Millis>,
    ) -> anyhow::Result<()> {
        for (host_id, reason) in &plan.terminate {
            if let Some(instance) = instances.iter().find(|i| &i.host_id == host_id) {
                self.terminate(lease, instance, reason.as_str()).await?;
            }
            if *reason == TerminateReason::NeverConnected {
                warn!(region = %self.region, %host_id, "host never connected; instance terminated");
            }
        }
        for (host_id, reason) in &plan.drain {
            self.drain(lease, host_id, *reason).await?;
        }
        if plan.launch > 0 {
            // A launch held back or refused did not happen: the scale-down
            // cooldown must not count from it.
            if Instant::now() < self.launch_not_before {
                debug!(region = %self.region, "launch waits for its backoff after a failure");
                self.memory.last_launch = last_launch;
            } else if !self.launch(lease, region, plan.launch).await? {
                self.memory.last_launch = last_launch;
            }
        }
        Ok(())
    }

    /// Instances left TERMINATING (a pass that failed half-way, or another
    /// replica's) are terminated again: termination is idempotent.
    async fn finish_terminations(&self, lease: &Lease, instances: &[InstanceRecord]) -> anyhow::Result<()> {
        for instance in instances.iter().filter(|i| i.state == InstanceState::Terminating) {
            let reason = instance.reason.clone().unwrap_or_else(|| "terminating".into());
            self.terminate(lease, instance, &reason).await?;
        }
        Ok(())
    }

    async fn drain(&self, lease: &Lease, host_id: &str, reason: DrainReason) -> anyhow::Result<()> {
        let store = &self.core.store;
        if store.set_instance_state(lease, host_id, InstanceState::Draining, reason.as_str()).await?.is_none() {
            return Ok(());
        }
        info!(region = %self.region, %host_id, reason = reason.as_str(), "scaling down: draining host");
        self.core.drain_host(host_id, &format!("scaler: {}", reason.as_str())).await?;
        Ok(())
    }

    async fn terminate(&self, lease: &Lease, instance: &InstanceRecord, reason: &str) -> anyhow::Result<()> {
        terminate_instance(&self.core, self.provider.as_ref(), lease, instance, reason).await
    }

    /// Launches `count` instances of the region's types on its current image;
    /// a failure is reported in the region's status and backs further launches off.
    /// Returns whether anything was launched.
    async fn launch(&mut self, lease: &Lease, region: &Region, count: u32) -> anyhow::Result<bool> {
        let image = region.image.as_str();
        let outcome =
            launch_instances(&self.core, self.provider.as_ref(), &self.options, lease, region, count, image, None)
                .await?;
        let now = Utc::now();
        match outcome {
            Ok(launched) => {
                self.launch_backoff = Duration::ZERO;
                self.handle.update_status(&self.region, |status| status.last_error = None);
                info!(region = %self.region, count = launched, image, "scaling up: instances launched");
                Ok(launched > 0)
            }
            Err(error) => {
                let config = &self.options.config;
                self.launch_backoff = if self.launch_backoff.is_zero() {
                    Duration::from_millis(config.launch_backoff_ms)
                } else {
                    (self.launch_backoff * 2).min(Duration::from_millis(config.max_launch_backoff_ms))
                };
                self.launch_not_before = Instant::now() + self.launch_backoff;
                warn!(region = %self.region, %error, retry_in_ms = self.launch_backoff.as_millis() as u64, "launch failed");
                let message = error.to_string();
                self.handle.update_status(&self.region, |status| {
                    status.last_error = Some(message);
                    status.last_error_at = Some(now);
                });
                Ok(false)
            }
        }
    }
}

/// Records and launches `count` instances in `region` on `image` (tagged with
/// `rollout_id` when a rollout launches them). The outer error is the
/// database's (e.g. `Fenced`: nothing launched); the inner one the cloud's
/// (the recorded instances are then marked TERMINATED). Returns how many launched.
#[allow(clippy::too_many_arguments)]
pub(super) async fn launch_instances(
    core: &SharedCore,
    provider: &dyn CloudProvider,
    options: &ScalerOptions,
    lease: &Lease,
    region: &Region,
    count: u32,
    image: &str,
    rollout_id: Option<uuid::Uuid>,
) -> anyhow::Result<Result<u32, CloudError>> {
    let store = &core.store;
    let Some(first) = region.scaling.instance_types.first() else {
        return Ok(Ok(0));
    };
    let already = store.count_instances(&region.name).await?;
    let token = uuid::Uuid::new_v4().simple().to_string();
    let new: Vec<NewInstance> = (1..=u64::from(count))
        .map(|n| NewInstance {
            host_id: format!("{}-{}-{}", options.config.host_name_prefix, region.name, already + n),
            region: region.name.clone(),
            instance_type: first.name.clone(),
            capacity: first.capacity,
            image: image.to_owned(),
            launch_token: token.clone(),
            rollout_id,
        })
        .collect();
    // Recorded first, under the lease: a replica that lost its lease launches
    // nothing, and an instance is never running without a row that names it.
    store.record_launch(lease, &new).await?;
    let request = LaunchRequest {
        region: region.name.clone(),
        instance_types: region.scaling.instance_types.clone(),
        image: image.to_owned(),
        host_ids: new.iter().map(|n| n.host_id.clone()).collect(),
        cluster: options.cluster.clone(),
        token,
    };
    let result = provider.launch(request).await;
    let launched = match &result {
        Ok(instances) => instances.as_slice(),
        Err(_) => &[],
    };
    for instance in launched {
        let Some(host_id) = &instance.host_id else { continue };
        let capacity = region
            .scaling
            .instance_types
            .iter()
            .find(|t| t.name == instance.instance_type)
            .map_or(first.capacity, |t| t.capacity);
        store.instance_launched(host_id, &instance.instance_id, &instance.instance_type, capacity).await?;
    }
    let reason = match &result {
        Ok(_) => "launch returned no instance".to_owned(),
        Err(error) => format!("launch failed: {error}"),
    };
    for missing in new.iter().filter(|n| !launched.iter().any(|i| i.host_id.as_deref() == Some(n.host_id.as_str()))) {
        store.set_instance_state(lease, &missing.host_id, InstanceState::Terminated, &reason).await?;
    }
    Ok(result.map(|instances| u32::try_from(instances.len()).unwrap_or(u32::MAX)))
}

/// Terminates one instance: TERMINATING, the cloud call, TERMINATED; its host
/// (if it ever connected) is gone for good and its sessions end as HOST_LOST.
pub(super) async fn terminate_instance(
    core: &SharedCore,
    provider: &dyn CloudProvider,
    lease: &Lease,
    instance: &InstanceRecord,
    reason: &str,
) -> anyhow::Result<()> {
    let store = &core.store;
    if instance.state != InstanceState::Terminating
        && store.set_instance_state(lease, &instance.host_id, InstanceState::Terminating, reason).await?.is_none()
    {
        return Ok(());
    }
    if let Some(instance_id) = &instance.instance_id {
        match provider.terminate(&instance.region, std::slice::from_ref(instance_id)).await {
            Ok(()) | Err(CloudError::NotFound { .. }) => {}
            Err(error) => {
                warn!(region = %instance.region, host_id = %instance.host_id, %instance_id, %error, "terminate failed; retried at the next pass");
                return Ok(());
            }
        }
    }
    store.set_instance_state(lease, &instance.host_id, InstanceState::Terminated, reason).await?;
    let ended = store.mark_host_lost(&instance.host_id, None).await?;
    core.publish_sessions(&ended).await;
    info!(
        region = %instance.region,
        host_id = %instance.host_id,
        instance_id = instance.instance_id.as_deref().unwrap_or(""),
        reason,
        sessions_ended = ended.len(),
        "instance terminated"
    );
    Ok(())
}
