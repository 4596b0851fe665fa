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

use switchboard_proto::v1::{Command, CommandResult, ControlMessage, command, control_message};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::store::HeartbeatMark;

/// What a host's stream carries to it, queued by its connection's task and
/// by whoever sends it a command. Boxed: a channel allocates room for 32
/// items up front, and unboxed that is 5 KiB per host.
pub type Outbound = Box<Result<ControlMessage, Status>>;

/// The connection ended before the command was queued on its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("host connection closed")]
pub struct ConnectionClosed;

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
    /// The host stream's queue. A sender queues its command there itself
    /// (not through the connection's task: one hand-off less for every
    /// command, BENCHMARKS.md run AD). Weak, so that the stream ends when
    /// the connection's task lets go of it, whoever still holds a clone of
    /// this connection.
    outbound: mpsc::WeakSender<Outbound>,
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
    /// The host is draining (it was DRAINING when it connected, or a Drain
    /// was sent to it on this connection): no replacement is spawned on it.
    draining: AtomicBool,
    /// The commands sent and not answered yet, each with its waiter.
    awaiting: std::sync::Mutex<Awaiting>,
}

#[derive(Default)]
struct Awaiting {
    /// The connection's task is done: no command is answered any more.
    closed: bool,
    replies: HashMap<String, oneshot::Sender<CommandResult>>,
}

impl HostConnection {
    pub fn new(generation: u64, region: String, outbound: mpsc::WeakSender<Outbound>, stop: CancellationToken) -> Self {
        HostConnection { generation, region, outbound, stop, shared: Arc::new(Shared::default()) }
    }

    fn awaiting(&self) -> std::sync::MutexGuard<'_, Awaiting> {
        // Every operation under this lock is a single insert, remove or
        // clear: a panic elsewhere cannot leave it half done.
        self.shared.awaiting.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues `command` on the host's stream and returns where its result
    /// will arrive; the result's sender is dropped (the host is gone) if the
    /// connection ends first. Waits while the stream's queue is full.
    pub async fn send_command(&self, command: Command) -> Result<oneshot::Receiver<CommandResult>, ConnectionClosed> {
        if matches!(command.kind, Some(command::Kind::Drain(_))) {
            self.draining();
        }
        let command_id = command.command_id.clone();
        let (reply, answer) = oneshot::channel();
        // Awaited before it is queued, so that its result cannot come back
        // before anyone waits for it.
        {
            let mut awaiting = self.awaiting();
            if awaiting.closed {
                return Err(ConnectionClosed);
            }
            awaiting.replies.insert(command_id.clone(), reply);
        }
        let message = ControlMessage { body: Some(control_message::Body::Command(command)) };
        let queued = match self.outbound.upgrade() {
            Some(outbound) => outbound.send(Box::new(Ok(message))).await.is_ok(),
            None => false,
        };
        if !queued {
            self.forget(&command_id);
            return Err(ConnectionClosed);
        }
        Ok(answer)
    }

    /// The waiter of command `command_id`'s result, taken (the connection's
    /// task hands the host's answer to it).
    pub fn answered(&self, command_id: &str) -> Option<oneshot::Sender<CommandResult>> {
        self.awaiting().replies.remove(command_id)
    }

    /// Stops waiting for command `command_id` (its sender gave up).
    pub fn forget(&self, command_id: &str) {
        self.awaiting().replies.remove(command_id);
    }

    /// The connection's task is done: every waiter learns the host is gone,
    /// and a command sent from now on is refused.
    pub fn close_commands(&self) {
        let mut awaiting = self.awaiting();
        awaiting.closed = true;
        awaiting.replies.clear();
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use switchboard_proto::v1::{DrainHost, TeardownMandelbox};

    use super::*;

    fn command(id: &str, kind: command::Kind) -> Command {
        Command { command_id: id.into(), kind: Some(kind), traceparent: String::new() }
    }

    fn teardown(id: &str) -> Command {
        command(id, command::Kind::Teardown(TeardownMandelbox::default()))
    }

    /// A waiter's outcome, within a bound (a mutant must fail, not hang).
    async fn outcome(answer: oneshot::Receiver<CommandResult>) -> Result<CommandResult, oneshot::error::RecvError> {
        tokio::time::timeout(std::time::Duration::from_secs(5), answer).await.expect("the waiter was left waiting")
    }

    fn connection() -> (HostConnection, mpsc::Sender<Outbound>, mpsc::Receiver<Outbound>) {
        let (outbound, stream) = mpsc::channel(8);
        let connection = HostConnection::new(1, "r1".into(), outbound.downgrade(), CancellationToken::new());
        (connection, outbound, stream)
    }

    fn queued_command_id(message: Outbound) -> String {
        match message.as_ref() {
            Ok(ControlMessage { body: Some(control_message::Body::Command(command)) }) => command.command_id.clone(),
            other => panic!("not a command: {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_command_goes_on_the_stream_and_its_answer_to_its_sender() {
        let (connection, _task, mut stream) = connection();
        let answer = connection.send_command(teardown("c1")).await.unwrap();
        assert_eq!(queued_command_id(stream.recv().await.unwrap()), "c1");
        assert!(connection.answered("c2").is_none(), "only the command sent is awaited");
        let reply = connection.answered("c1").unwrap();
        reply.send(CommandResult { command_id: "c1".into(), ok: true, ..Default::default() }).unwrap();
        assert!(outcome(answer).await.unwrap().ok);
        assert!(connection.answered("c1").is_none(), "an answer is handed over once");
    }

    #[tokio::test]
    async fn waiters_learn_the_host_is_gone_when_the_connection_closes() {
        let (connection, _task, _stream) = connection();
        let answer = connection.send_command(teardown("c1")).await.unwrap();
        connection.close_commands();
        assert!(outcome(answer).await.is_err(), "the waiter is told, not left to its timeout");
        assert_eq!(connection.send_command(teardown("c2")).await.err(), Some(ConnectionClosed));
        assert!(connection.answered("c2").is_none());
    }

    #[tokio::test]
    async fn the_stream_ends_with_the_task_whoever_holds_the_connection() {
        let (connection, task, mut stream) = connection();
        let held = connection.clone();
        drop(task);
        assert!(stream.recv().await.is_none(), "a held connection does not keep the host's stream open");
        assert_eq!(held.send_command(teardown("c1")).await.err(), Some(ConnectionClosed));
        assert!(held.answered("c1").is_none(), "a command that was not queued is not awaited");
    }

    #[tokio::test]
    async fn a_drain_sent_marks_the_host_draining() {
        let (connection, _task, _stream) = connection();
        assert!(!connection.is_draining());
        connection.send_command(teardown("c1")).await.unwrap();
        assert!(!connection.is_draining());
        connection.send_command(command("c2", command::Kind::Drain(DrainHost::default()))).await.unwrap();
        assert!(connection.is_draining());
    }

    #[tokio::test]
    async fn a_forgotten_command_is_not_awaited() {
        let (connection, _task, _stream) = connection();
        let answer = connection.send_command(teardown("c1")).await.unwrap();
        connection.forget("c1");
        assert!(connection.answered("c1").is_none());
        assert!(outcome(answer).await.is_err());
    }
}
