//! Heartbeat times reach the database in one batch per replica and interval,
//! not one write per host: connection tasks only mark their host heard (an
//! atomic store), and this task writes every marked host at once. Liveness
//! itself is decided in memory by each connection's deadline; the stored time
//! is for people and for other replicas, so a few seconds of lag are fine.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::core::SharedCore;

/// Hosts per statement, so one batch never holds a huge parameter list.
const HOSTS_PER_WRITE: usize = 2_000;

pub async fn run_heartbeat_writer(core: SharedCore, shutdown: CancellationToken) {
    let every = Duration::from_millis(core.config.hosts.heartbeat_write_interval_ms.max(1));
    crate::shutdown::run_every(every, shutdown, || write_heard(&core)).await;
}

async fn write_heard(core: &SharedCore) {
    let heard = core.registry.take_heard();
    let at = chrono::Utc::now();
    for batch in heard.chunks(HOSTS_PER_WRITE) {
        if let Err(error) = core.store.record_heartbeats(batch, at).await {
            tracing::warn!(hosts = batch.len(), %error, "heartbeat times not recorded");
        }
    }
    if !heard.is_empty() {
        tracing::trace!(hosts = heard.len(), "heartbeat times recorded");
    }
}
