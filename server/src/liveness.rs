//! Housekeeping on a timer: hosts that stayed disconnected past the reconnect
//! grace period are lost (their sessions end), pending sessions that waited too
//! long end with NO_CAPACITY, spawns that never completed are written off,
//! and the order in which claims try hosts (the fullest first) is recomputed.
//!
//! A connected host that goes silent is caught faster, by its own connection
//! task's heartbeat deadline.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::{allocation::PendingSessions, core::SharedCore};

pub struct Sweeper {
    core: SharedCore,
    pending: PendingSessions,
    passes: std::sync::atomic::AtomicU64,
}

/// With several replicas, hosts whose replica is gone are looked for every
/// this many passes (it reads every connected host's ownership).
const ORPHAN_CHECK_EVERY: u64 = 3;
/// How long the sweeping replica's lease lasts without renewal.
const SWEEPER_LEASE: std::time::Duration = std::time::Duration::from_secs(5);
/// A host that said Hello this recently may not have its ownership written yet.
const ORPHAN_MIN_AGE: chrono::Duration = chrono::Duration::seconds(5);

impl Sweeper {
    pub fn new(core: SharedCore, pending: PendingSessions) -> Self {
        Sweeper { core, pending, passes: std::sync::atomic::AtomicU64::new(0) }
    }

    /// Hosts the database shows connected whose replica is gone (killed):
    /// DISCONNECTED from now, so they get the whole grace period to reconnect
    /// to another replica before their sessions are given up.
    async fn orphans(&self, cluster: &crate::cluster::RedisCluster) -> anyhow::Result<()> {
        let core = &self.core;
        let cutoff = chrono::Utc::now() - ORPHAN_MIN_AGE;
        let candidates: Vec<(String, u64)> = core
            .store
            .connected_hosts_changed_before(cutoff)
            .await?
            .into_iter()
            .filter(|host| !core.registry.is_connected(&host.id))
            .map(|host| (host.id, host.generation))
            .collect();
        let ids: Vec<String> = candidates.iter().map(|(id, _)| id.clone()).collect();
        let orphans = cluster.unowned(&ids).await?;
        for (host_id, generation) in candidates.into_iter().filter(|(id, _)| orphans.contains(id)) {
            if core.store.host_disconnected(&host_id, generation).await? {
                tracing::warn!(%host_id, generation, "the replica holding this host is gone; waiting for it to reconnect elsewhere");
            }
        }
        Ok(())
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let interval = Duration::from_millis(self.core.config.hosts.maintenance_interval_ms);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(error) = self.sweep_once().await {
                tracing::warn!(%error, "sweep failed");
            }
        }
    }

    pub async fn sweep_once(&self) -> anyhow::Result<()> {
        let core = &self.core;
        // With several replicas one sweeps at a time (lease `sweeper`); another
        // takes over within SWEEPER_LEASE of its holder dying.
        if core.cluster.is_some()
            && core.store.acquire_lease("sweeper", &core.replica_id, SWEEPER_LEASE).await?.is_none()
        {
            return Ok(());
        }
        let pass = self.passes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(cluster) = &core.cluster
            && pass.is_multiple_of(ORPHAN_CHECK_EVERY)
            && let Err(error) = self.orphans(cluster).await
        {
            tracing::debug!(%error, "could not look for hosts whose replica is gone");
        }
        let now = chrono::Utc::now();
        let grace = chrono::Duration::milliseconds(i64::try_from(core.config.hosts.reconnect_grace_ms)?);
        for host in core.store.hosts_disconnected_before(now - grace).await? {
            if core.registry.is_connected(&host.id) {
                continue;
            }
            let ended = core.store.mark_host_lost(&host.id, Some(host.generation)).await?;
            tracing::warn!(host_id = %host.id, sessions_lost = ended.len(), "host did not come back within the grace period");
            core.publish_sessions(&ended).await;
        }
        let pending_timeout = chrono::Duration::milliseconds(i64::try_from(core.config.allocation.pending_timeout_ms)?);
        // A spawn gets twice its own timeout before it is written off, so the
        // sweep never races the call still waiting for it.
        let spawn_timeout = chrono::Duration::milliseconds(i64::try_from(core.config.allocation.spawn_timeout_ms)?) * 2;
        let outcome = core.store.sweep(now - pending_timeout, now - spawn_timeout).await?;
        for session in &outcome.expired_pending {
            tracing::info!(session_id = %session.id, "pending session expired");
            self.pending.remove(session.id);
        }
        core.publish_sessions(&outcome.expired_pending).await;
        for mandelbox in &outcome.expired_spawns {
            tracing::warn!(mandelbox_id = %mandelbox.id, host_id = %mandelbox.host_id, "spawn never confirmed");
            core.registry.refill(&mandelbox.host_id);
        }
        // Claims prefer hosts by these ranks, so they are at most a pass old.
        let changed = core.store.refresh_host_ranks().await?;
        tracing::trace!(hosts = changed, "host ranks refreshed");
        Ok(())
    }
}
