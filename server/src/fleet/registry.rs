//! The live host connections of this replica, keyed by host id and connection
//! generation. A connection only ever removes its own entry, so a late cleanup
//! of an old stream cannot unregister the newer one that replaced it.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use switchboard_proto::v1::{Command, CommandResult};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::store::HeartbeatMark;

/// A command for a host's connection task, with where to send the result.
#[derive(Debug)]
pub struct OutboundCommand {
    pub command: Command,
    pub reply: oneshot::Sender<CommandResult>,
}

/// Why a connection task was told to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Superseded,
    ShuttingDown,
}

#[derive(Clone)]
pub struct HostConnection {
    pub generation: u64,
    pub region: String,
    /// Boxed commands: the channel's first block of 32 slots is allocated up
    /// front, 5.5 KiB per host unboxed.
    pub commands: mpsc::Sender<Box<OutboundCommand>>,
    stop: CancellationToken,
    /// One allocation per connection for what its clones share.
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    /// Wakes the host's warm-pool filler.
    refill: Notify,
    stop_reason: std::sync::Mutex<Option<StopReason>>,
    /// A heartbeat arrived since the heartbeat writer last looked.
    heard: AtomicBool,
    /// The host is draining (it was DRAINING when it connected, or this
    /// connection relayed it a Drain): no replacement is spawned on it.
    draining: AtomicBool,
}

impl HostConnection {
    pub fn new(
        generation: u64,
        region: String,
        commands: mpsc::Sender<Box<OutboundCommand>>,
        stop: CancellationToken,
    ) -> Self {
        HostConnection { generation, region, commands, stop, shared: Arc::new(Shared::default()) }
    }

    pub fn stop(&self, reason: StopReason) {
        if let Ok(mut slot) = self.shared.stop_reason.lock() {
            slot.get_or_insert(reason);
        }
        self.stop.cancel();
    }

    pub fn stop_reason(&self) -> Option<StopReason> {
        self.shared.stop_reason.lock().ok().and_then(|slot| *slot)
    }

    /// Wakes the host's warm-pool filler (a wake-up while it is busy is kept).
    pub fn refill(&self) {
        self.shared.refill.notify_one();
    }

    /// Waits for the next `refill`.
    pub async fn refill_requested(&self) {
        self.shared.refill.notified().await;
    }

    /// Notes a heartbeat; the heartbeat writer stores it with the next batch.
    pub fn heard(&self) {
        self.shared.heard.store(true, Ordering::Relaxed);
    }

    /// Notes that the host drains (for good: a host never leaves DRAINING).
    pub fn draining(&self) {
        self.shared.draining.store(true, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
pub struct ConnectionRegistry {
    connections: std::sync::Mutex<HashMap<String, HostConnection>>,
}

impl ConnectionRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, HostConnection>> {
        // A panic while holding this lock cannot leave the map half-updated
        // (every operation is a single insert/remove), so poison is harmless.
        self.connections.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers a connection; a connection it replaces is told to stop.
    pub fn register(&self, host_id: &str, connection: HostConnection) {
        let previous = self.lock().insert(host_id.to_owned(), connection);
        if let Some(previous) = previous {
            tracing::info!(host_id, old_generation = previous.generation, "connection superseded");
            previous.stop(StopReason::Superseded);
        }
    }

    /// Removes the entry only if it is still this generation's.
    pub fn unregister(&self, host_id: &str, generation: u64) -> bool {
        let mut connections = self.lock();
        match connections.get(host_id) {
            Some(current) if current.generation == generation => {
                connections.remove(host_id);
                true
            }
            _ => false,
        }
    }

    pub fn get(&self, host_id: &str) -> Option<HostConnection> {
        self.lock().get(host_id).cloned()
    }

    /// Whether a host connected here is known to drain. False for a host
    /// connected elsewhere: the store's check (the host must be ACTIVE) is the
    /// one that holds; this one only saves a spawn that would be refused.
    pub fn is_draining(&self, host_id: &str) -> bool {
        self.lock().get(host_id).is_some_and(HostConnection::is_draining)
    }

    pub fn is_connected(&self, host_id: &str) -> bool {
        self.lock().contains_key(host_id)
    }

    /// Every connected host with its connection generation.
    pub fn generations(&self) -> Vec<(String, u64)> {
        self.lock().iter().map(|(host_id, connection)| (host_id.clone(), connection.generation)).collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Wakes the warm-pool filler of a host connected here.
    pub fn refill(&self, host_id: &str) {
        if let Some(connection) = self.lock().get(host_id) {
            connection.refill();
        }
    }

    /// The hosts heard from since the last call, each with its generation;
    /// clears their marks.
    pub fn take_heard(&self) -> Vec<HeartbeatMark> {
        self.lock()
            .iter()
            .filter(|(_, connection)| connection.shared.heard.swap(false, Ordering::Relaxed))
            .map(|(host_id, connection)| HeartbeatMark { host_id: host_id.clone(), generation: connection.generation })
            .collect()
    }

    /// Tells every connection to stop (shutdown).
    pub fn stop_all(&self, reason: StopReason) {
        for connection in self.lock().values() {
            connection.stop(reason);
        }
    }
}
