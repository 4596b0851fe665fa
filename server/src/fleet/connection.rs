//! One task per host connection. It owns the stream's channels and selects on:
//! messages from the host (results go to the commands' waiters), its
//! heartbeat deadline, and being told to stop (superseded or shutdown).
//! Commands are queued on the host's stream by their senders
//! (`HostConnection::send_command`). A failed send means the host is gone.

use std::time::Duration;

use switchboard_proto::v1::{
    ControlMessage, HostMessage, TeardownMandelbox, Welcome, command, control_message, host_message,
};
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};
use uuid::Uuid;

use super::{
    handshake::{check_hello, read_hello},
    pool,
    registry::{HostConnection, Outbound, StopReason},
};
use crate::{
    auth::host_credential::HostCredentials,
    core::SharedCore,
    error::{ApiError, ApiResult},
    model::{EndReason, HostState, MandelboxState},
    regions::RegionCache,
    store::ReportedMandelbox,
};

/// Messages queued per host (commands, and the task's own) before a
/// sender waits.
const OUTBOUND_BUFFER: usize = 256;

/// The response stream of `HostService.Connect`.
pub type ControlStream = futures::stream::Map<ReceiverStream<Outbound>, fn(Outbound) -> Result<ControlMessage, Status>>;

// The box is the point: the channel holds it (see `Outbound`).
#[allow(clippy::boxed_local)]
fn unbox(outbound: Outbound) -> Result<ControlMessage, Status> {
    *outbound
}

/// Accepts host streams; cheap to clone.
#[derive(Clone)]
pub struct Fleet {
    core: SharedCore,
    credentials: HostCredentials,
    regions: RegionCache,
    shutdown: CancellationToken,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// The host closed the stream or it broke.
    Closed,
    Goodbye,
    HeartbeatTimeout,
    Stopped(StopReason),
}

impl Fleet {
    pub fn new(
        core: SharedCore,
        credentials: HostCredentials,
        regions: RegionCache,
        shutdown: CancellationToken,
    ) -> Self {
        Fleet { core, credentials, regions, shutdown }
    }

    /// Runs the handshake and, once the host is registered, hands the stream to
    /// its connection task. Errors end the stream before anything is recorded.
    pub async fn connect(&self, mut inbound: Streaming<HostMessage>) -> ApiResult<ControlStream> {
        if self.shutdown.is_cancelled() {
            return Err(ApiError::ShuttingDown);
        }
        let config = &self.core.config.hosts;
        let hello = read_hello(&mut inbound, Duration::from_millis(config.hello_timeout_ms)).await?;
        let host = check_hello(&hello, &self.credentials)?;
        if !self.regions.exists(&host.region).await? {
            return Err(ApiError::UnknownRegion(host.region));
        }
        // A terminated host is gone for good; one that still calls is a zombie
        // (reconciliation terminates its instance) and must not take sessions.
        if self.core.store.get_host(&host.host_id).await?.is_some_and(|h| h.terminated_at.is_some()) {
            return Err(ApiError::HostTerminated);
        }
        let record = self.core.store.host_connected(&host).await?;
        let generation = record.generation;
        tracing::info!(host_id = %host.host_id, generation, region = %host.region, capacity = host.capacity, "host connected");

        let (outbound, outbound_rx) = mpsc::channel(OUTBOUND_BUFFER);
        let welcome = ControlMessage {
            body: Some(control_message::Body::Welcome(Welcome {
                heartbeat_interval_ms: u32::try_from(config.heartbeat_interval_ms).unwrap_or(u32::MAX),
                generation,
                session_events_endpoint: self.core.public_endpoint.clone(),
            })),
        };
        // Queued before the connection is registered (a command can be sent
        // to it from then on): the host hears Welcome first. The receiver is
        // still in our hands: this cannot fail.
        let _ = outbound.send(Box::new(Ok(welcome))).await;
        let stop = self.shutdown.child_token();
        let connection = HostConnection::new(generation, host.region.clone(), outbound.downgrade(), stop.clone());
        if record.state == HostState::Draining {
            connection.draining();
        }
        self.core.registry.register(&host.host_id, connection.clone());

        let task = ConnectionTask { core: self.core.clone(), host_id: host.host_id.clone(), connection, outbound };
        // The warm pool is topped up only once the database agrees with what
        // the host runs (a box reserved before that would look lost): the
        // connection task starts filling when this reconciliation is done.
        let (reconciled, reconciled_rx) = oneshot::channel();
        let core = self.core.clone();
        tokio::spawn(async move {
            reconcile(core, host.host_id, host.region, hello.mandelboxes).await;
            let _ = reconciled.send(());
        });
        tokio::spawn(task.run(inbound, reconciled_rx, stop));
        Ok(futures::StreamExt::map(
            ReceiverStream::new(outbound_rx),
            unbox as fn(Outbound) -> Result<ControlMessage, Status>,
        ))
    }
}

/// Compares what a (re)connecting host runs with what the database holds:
/// unknown boxes are torn down, missing ones are lost.
async fn reconcile(
    core: SharedCore,
    host_id: String,
    region: String,
    reported: Vec<switchboard_proto::v1::RunningMandelbox>,
) {
    let mut known = Vec::new();
    let mut foreign = Vec::new();
    for mandelbox in reported {
        match Uuid::parse_str(&mandelbox.mandelbox_id) {
            Ok(id) => known.push(ReportedMandelbox { id, assigned: mandelbox.assigned }),
            Err(_) => foreign.push(mandelbox.mandelbox_id),
        }
    }
    // A claim younger than this may still have its Assign on the way (from
    // any replica: each gives up after its assign timeout).
    let assign_timeout = Duration::from_millis(core.config.allocation.assign_timeout_ms);
    let claimed_before = chrono::Utc::now() - assign_timeout * 2;
    let outcome = match core.store.reconcile_host(&host_id, &known, claimed_before).await {
        Ok(outcome) => outcome,
        Err(error) => {
            tracing::warn!(%host_id, %error, "reconciliation failed");
            return;
        }
    };
    if !outcome.teardown.is_empty() || !outcome.lost.is_empty() || !outcome.unassigned.is_empty() || !foreign.is_empty()
    {
        tracing::info!(
            %host_id,
            teardown = outcome.teardown.len() + foreign.len(),
            lost = outcome.lost.len(),
            unassigned = outcome.unassigned.len(),
            "reconciled host"
        );
    }
    core.publish_sessions(&outcome.ended_sessions).await;
    if !outcome.unassigned.is_empty() {
        // Boxes back in the pool: a session pending in this region can take
        // one now, not at the dispatcher's next tick.
        core.events.publish(crate::events::Event::MandelboxWarm { region });
    }
    let timeout = Duration::from_millis(core.config.hosts.command_timeout_ms);
    let ids = outcome.teardown.iter().map(Uuid::to_string).chain(foreign);
    for mandelbox_id in ids {
        let kind = command::Kind::Teardown(TeardownMandelbox {
            mandelbox_id,
            reason: "unknown to the control plane".into(),
            replacement: None,
        });
        if let Err(error) = core.router.send(&host_id, kind, timeout).await {
            tracing::warn!(%host_id, %error, "reconciliation teardown failed");
        }
    }
}

/// A warm-pool fill in progress inside a connection task.
type Filling = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Completes with the future in `slot`; never, when the slot is empty (the
/// `select!` branch that polls it is disabled then anyway).
async fn until<F: std::future::Future + Unpin>(slot: &mut Option<F>) -> F::Output {
    match slot {
        Some(future) => future.await,
        None => std::future::pending().await,
    }
}

struct ConnectionTask {
    core: SharedCore,
    host_id: String,
    connection: HostConnection,
    /// The only strong sender of the host's stream (senders of commands
    /// hold a weak one): the stream ends when the task drops it.
    outbound: mpsc::Sender<Outbound>,
}

impl ConnectionTask {
    #[tracing::instrument(name = "host_connection", skip_all, fields(host_id = %self.host_id, generation = self.connection.generation))]
    async fn run(
        mut self,
        mut inbound: Streaming<HostMessage>,
        reconciled: oneshot::Receiver<()>,
        stop: CancellationToken,
    ) {
        let deadline = self.core.config.hosts.heartbeat_deadline();
        let heartbeat_due = tokio::time::sleep(deadline);
        tokio::pin!(heartbeat_due);
        // The warm-pool filler runs inside this task, as a future that exists
        // only while a fill is under way: a task of its own per host cost
        // about a KiB for each connection's whole life.
        let mut reconciled = Some(reconciled);
        let mut filling: Option<Filling> = None;
        let ending = loop {
            tokio::select! {
                _ = until(&mut reconciled), if reconciled.is_some() => {
                    reconciled = None;
                    filling = Some(self.fill());
                }
                _ = self.connection.refill_requested(), if reconciled.is_none() && filling.is_none() => {
                    filling = Some(self.fill());
                }
                _ = until(&mut filling), if filling.is_some() => filling = None,
                _ = stop.cancelled() => {
                    break Ending::Stopped(self.connection.stop_reason().unwrap_or(StopReason::ShuttingDown));
                }
                message = inbound.message() => match message {
                    Ok(Some(message)) => {
                        if self.on_message(message, &mut heartbeat_due, deadline) {
                            break Ending::Goodbye;
                        }
                    }
                    Ok(None) => break Ending::Closed,
                    Err(status) => {
                        tracing::debug!(code = ?status.code(), "host stream broke");
                        break Ending::Closed;
                    }
                },
                _ = &mut heartbeat_due => break Ending::HeartbeatTimeout,
            }
        };
        // Whatever hangs off the connection's token ends with it, and every
        // command still awaited is answered "gone".
        stop.cancel();
        self.connection.close_commands();
        // Boxed: its state would otherwise sit in every connection's task for
        // the connection's whole life (see BENCHMARKS.md, memory per host).
        Box::pin(self.finish(ending)).await;
    }

    /// A fill of this host's free slots (`pool::fill`), to be polled by `run`.
    fn fill(&self) -> Filling {
        let (core, host_id) = (self.core.clone(), self.host_id.clone());
        Box::pin(async move { pool::fill(&core, &host_id).await })
    }

    /// Returns true when the host said goodbye.
    fn on_message(
        &mut self,
        message: HostMessage,
        heartbeat_due: &mut std::pin::Pin<&mut tokio::time::Sleep>,
        deadline: Duration,
    ) -> bool {
        // Any message proves the host is alive.
        heartbeat_due.as_mut().reset(Instant::now() + deadline);
        match message.body {
            // Written with the replica's next batch (`fleet::heartbeats`).
            Some(host_message::Body::Heartbeat(_)) => self.connection.heard(),
            Some(host_message::Body::Result(result)) => match self.connection.answered(&result.command_id) {
                Some(reply) => {
                    let _ = reply.send(result);
                }
                None => {
                    tracing::debug!(command_id = %result.command_id, "result for an unknown command")
                }
            },
            Some(host_message::Body::Exited(exited)) => {
                let core = self.core.clone();
                let host_id = self.host_id.clone();
                tokio::spawn(async move { mandelbox_exited(core, host_id, exited.mandelbox_id, exited.reason).await });
            }
            Some(host_message::Body::Goodbye(goodbye)) => {
                tracing::info!(reason = %goodbye.reason, "host said goodbye");
                return true;
            }
            Some(host_message::Body::Hello(_)) => tracing::warn!("second hello ignored"),
            None => tracing::debug!("empty host message ignored"),
        }
        false
    }

    async fn finish(self, ending: Ending) {
        let core = &self.core;
        let generation = self.connection.generation;
        core.registry.unregister(&self.host_id, generation);
        let farewell: Option<ApiError> = match ending {
            Ending::HeartbeatTimeout => {
                tracing::warn!(
                    deadline_ms = u64::try_from(core.config.hosts.heartbeat_deadline().as_millis()).unwrap_or(u64::MAX),
                    "host missed its heartbeats; its sessions are lost"
                );
                match core.store.mark_host_lost(&self.host_id, Some(generation)).await {
                    Ok(ended) => core.publish_sessions(&ended).await,
                    Err(error) => tracing::error!(%error, "could not mark host lost"),
                }
                Some(ApiError::HeartbeatTimeout)
            }
            Ending::Stopped(StopReason::Superseded) => Some(ApiError::Superseded),
            Ending::Stopped(StopReason::ShuttingDown) => {
                self.mark_disconnected().await;
                Some(ApiError::ShuttingDown)
            }
            Ending::Closed | Ending::Goodbye => {
                tracing::info!(?ending, "host disconnected");
                self.mark_disconnected().await;
                None
            }
        };
        if let Some(error) = farewell {
            let _ = self.outbound.send(Box::new(Err(error.into()))).await;
        }
    }

    async fn mark_disconnected(&self) {
        if let Err(error) = self.core.store.host_disconnected(&self.host_id, self.connection.generation).await {
            tracing::error!(%error, "could not mark host disconnected");
        }
    }
}

/// The host says a box exited by itself: its session ends and the slot refills.
async fn mandelbox_exited(core: SharedCore, host_id: String, mandelbox_id: String, reason: String) {
    let Ok(id) = Uuid::parse_str(&mandelbox_id) else {
        tracing::warn!(%host_id, %mandelbox_id, "exit notice for a malformed mandelbox id");
        return;
    };
    // Before the database: a replacement not written yet is finished by its
    // writer (see `crate::replacements`).
    if core.unrecorded.exited(&host_id, id) {
        tracing::info!(%host_id, %mandelbox_id, %reason, "replacement mandelbox exited before it was recorded");
        return;
    }
    match core.store.get_mandelbox(id).await {
        Ok(Some(mandelbox)) if mandelbox.host_id == host_id => {}
        Ok(_) => {
            tracing::warn!(%host_id, %mandelbox_id, "exit notice for a mandelbox this host does not hold");
            return;
        }
        Err(error) => {
            tracing::warn!(%host_id, %error, "could not read exited mandelbox");
            return;
        }
    }
    match core.store.mandelbox_finished(id, MandelboxState::Dead, EndReason::MandelboxExited).await {
        Ok(Some((_, ended))) => {
            tracing::info!(%host_id, %mandelbox_id, %reason, "mandelbox exited");
            if let Some(session) = ended {
                core.publish_session(&session).await;
            }
        }
        Ok(None) => {}
        Err(error) => tracing::warn!(%host_id, %error, "could not record exit"),
    }
    core.registry.refill(&host_id);
}
