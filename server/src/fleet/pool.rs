//! The warm pool: every connected, active host is kept filled with warm
//! (WAITING) mandelboxes up to its capacity. Each connection task runs one
//! fill at a time for its host, so fills of one host never overlap; the slot
//! reservation itself is atomic in the store, so an on-demand spawn or a
//! recycled teardown racing a fill cannot overfill a host.

use std::time::Duration;

use switchboard_proto::v1::{SpawnMandelbox, command};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    api::convert::port_from_proto,
    auth::mandelbox_token,
    core::SharedCore,
    events::Event,
    model::{EndReason, MandelboxRecord, MandelboxState, PortSpec},
    store::{NewMandelbox, SpawnReport},
};

/// How often the replica looks for hosts with free slots that nothing woke.
const REFILL_SWEEP_FACTOR: u32 = 5;

/// The safety net behind the wake-ups, for every host of this replica in one
/// query: a slot freed where no wake-up reached (a teardown confirmed through
/// another replica, a box expired by the sweep) is refilled within a period.
/// One read per period for the whole fleet, instead of a reservation attempt
/// per host, which with 15,000 hosts was half of the server's CPU; and a read
/// of the hosts with room only, not of every host with its counts (on
/// PostgreSQL as of the last rank refresh, a maintenance pass old, which
/// this sweep's period of five passes covers).
pub async fn run_refill_sweep(core: SharedCore, shutdown: CancellationToken) {
    let period = Duration::from_millis(core.config.hosts.maintenance_interval_ms.max(1)) * REFILL_SWEEP_FACTOR;
    crate::shutdown::run_every(period, shutdown, || wake_hosts_with_free_slots(&core)).await;
}

async fn wake_hosts_with_free_slots(core: &SharedCore) {
    if !core.config.allocation.warm_pool || core.registry.is_empty() {
        return;
    }
    let hosts = match core.store.hosts_with_open_slots().await {
        Ok(hosts) => hosts,
        Err(error) => {
            tracing::debug!(%error, "refill sweep could not list hosts with room");
            return;
        }
    };
    for host_id in hosts {
        core.registry.refill(&host_id);
    }
}

/// Boxes reserved per transaction: a refill after a teardown needs one, a
/// fresh host as many as its capacity.
const RESERVE_BATCH: usize = 4;

/// A warm box to reserve, with its disconnect token (which only the host gets).
pub(crate) fn new_warm_box(core: &SharedCore) -> (NewMandelbox, String) {
    let token = mandelbox_token::generate();
    let new = NewMandelbox {
        id: Uuid::now_v7(),
        app: core.config.allocation.warm_app.clone(),
        token_hash: mandelbox_token::hash(&token),
        session_id: None,
    };
    (new, token)
}

/// Reserves every free slot of the host and spawns a warm box in each. Each
/// host's connection task runs this when the host connects (once reconciled)
/// and whenever it is woken (a box torn down or exited, a spawn failed, the
/// refill sweep), one fill at a time.
pub(crate) async fn fill(core: &SharedCore, host_id: &str) {
    if !core.config.allocation.warm_pool {
        return;
    }
    loop {
        let (news, tokens): (Vec<NewMandelbox>, Vec<String>) = (0..RESERVE_BATCH).map(|_| new_warm_box(core)).unzip();
        let reserved = match core.store.reserve_mandelboxes(host_id, &news).await {
            Ok(reserved) => reserved,
            Err(error) => {
                tracing::warn!(%host_id, %error, "could not reserve warm slots");
                return;
            }
        };
        let full = reserved.len() < RESERVE_BATCH;
        // The store reserves `news` from the front, so the i-th box has the i-th token.
        for (mandelbox, token) in reserved.into_iter().zip(tokens) {
            tokio::spawn(spawn_warm(core.clone(), mandelbox, token));
        }
        // Fewer than asked: the host has no free slot left.
        if full {
            return;
        }
    }
}

/// Spawns a reserved warm box on its host and records the outcome.
pub(crate) async fn spawn_warm(core: SharedCore, reserved: MandelboxRecord, token: String) {
    let timeout = Duration::from_millis(core.config.allocation.spawn_timeout_ms);
    let kind = command::Kind::Spawn(SpawnMandelbox {
        mandelbox_id: reserved.id.to_string(),
        app: reserved.app.clone(),
        disconnect_token: token,
    });
    match core.router.send(&reserved.host_id, kind, timeout).await {
        Ok(result) => {
            let ports: Vec<PortSpec> = result.ports.iter().filter_map(port_from_proto).collect();
            match core.bookkeeping.spawned(SpawnReport { id: reserved.id, ports }).await {
                Ok(Some(mandelbox)) if mandelbox.state == MandelboxState::Waiting => {
                    tracing::debug!(host_id = %reserved.host_id, mandelbox_id = %reserved.id, "warm mandelbox ready");
                    core.events.publish(Event::MandelboxWarm { region: mandelbox.region });
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(mandelbox_id = %reserved.id, %error, "could not record spawn")
                }
            }
        }
        Err(error) => {
            tracing::warn!(host_id = %reserved.host_id, mandelbox_id = %reserved.id, %error, "warm spawn failed");
            if let Err(error) =
                core.store.mandelbox_finished(reserved.id, MandelboxState::Dead, EndReason::MandelboxExited).await
            {
                tracing::warn!(mandelbox_id = %reserved.id, %error, "could not record failed spawn");
            }
        }
    }
}
