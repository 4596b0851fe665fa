//! Controlling a running agent: status, shutdown, and fault injection for tests.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::anyhow;
use tokio::sync::{Mutex, watch};
use tokio::task::{AbortHandle, JoinHandle};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::runtime::MandelboxRuntime;

/// What the agent is doing now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentStatus {
    /// A stream is open and the control plane welcomed it.
    pub connected: bool,
    /// Generation of the latest Welcome.
    pub generation: u64,
    /// Welcomes accepted so far (1 after the first connection, 2 after one reconnect, ...).
    pub connections: u64,
    /// The control plane told this host to drain.
    pub draining: bool,
    /// The most recent connection error; kept after a successful reconnect.
    pub last_error: Option<String>,
}

/// State shared by the agent task and its handles.
pub(crate) struct Shared {
    pub(crate) status: watch::Sender<AgentStatus>,
    pub(crate) heartbeats_paused: AtomicBool,
    /// Commands received from the control plane, over every connection.
    pub(crate) commands_received: AtomicU64,
    /// Bumped to drop the current stream.
    pub(crate) drop_connection: watch::Sender<u64>,
}

impl Shared {
    pub(crate) fn new() -> Self {
        Self {
            status: watch::Sender::new(AgentStatus::default()),
            heartbeats_paused: AtomicBool::new(false),
            commands_received: AtomicU64::new(0),
            drop_connection: watch::Sender::new(0),
        }
    }

    pub(crate) fn heartbeats_paused(&self) -> bool {
        self.heartbeats_paused.load(Ordering::Relaxed)
    }
}

/// Handle on an agent started with [`HostAgent::spawn`](crate::HostAgent::spawn).
#[derive(Clone)]
pub struct AgentHandle {
    inner: Arc<HandleInner>,
}

struct HandleInner {
    shared: Arc<Shared>,
    runtime: Arc<dyn MandelboxRuntime>,
    shutdown: CancellationToken,
    /// Cancelled when the agent task ends, however it ends.
    finished: CancellationToken,
    abort: AbortHandle,
    task: Mutex<Option<JoinHandle<anyhow::Result<()>>>>,
}

impl AgentHandle {
    pub(crate) fn new(
        shared: Arc<Shared>,
        runtime: Arc<dyn MandelboxRuntime>,
        shutdown: CancellationToken,
        finished: CancellationToken,
        task: JoinHandle<anyhow::Result<()>>,
    ) -> Self {
        Self {
            inner: Arc::new(HandleInner {
                shared,
                runtime,
                shutdown,
                finished,
                abort: task.abort_handle(),
                task: Mutex::new(Some(task)),
            }),
        }
    }

    /// The agent's status, updated on every change.
    pub fn status(&self) -> watch::Receiver<AgentStatus> {
        self.inner.shared.status.subscribe()
    }

    /// Waits until the agent is connected and has accepted at least
    /// `min_connections` Welcomes in all.
    pub async fn wait_connected(&self, min_connections: u64, timeout: Duration) -> anyhow::Result<AgentStatus> {
        let mut status = self.status();
        let wait = async {
            tokio::select! {
                result = status.wait_for(|s| s.connected && s.connections >= min_connections) => {
                    result.map(|s| s.clone()).map_err(|_| anyhow!("agent stopped"))
                }
                _ = self.inner.finished.cancelled() => Err(anyhow!("agent stopped")),
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(result) => result,
            Err(_) => {
                let now = self.inner.shared.status.borrow().clone();
                Err(anyhow!("agent not connected with {min_connections} connection(s) after {timeout:?}: {now:?}"))
            }
        }
    }

    /// Graceful shutdown: sends Goodbye, tears every box down, and returns once
    /// the agent task has finished.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        let mut task = self.inner.task.lock().await;
        if let Some(task) = task.take() {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(error = %e, "agent ended with an error"),
                Err(e) if e.is_cancelled() => {}
                Err(e) => warn!(error = %e, "agent task failed"),
            }
        }
    }

    /// The machine dies: aborts the agent task (no Goodbye) and stops every box
    /// at once.
    pub fn kill(&self) {
        info!("killing agent");
        // Not through `shutdown`: a cancelled token would make the agent say Goodbye.
        self.inner.abort.abort();
        self.inner.runtime.kill_all();
        self.inner.shared.status.send_modify(|s| {
            s.connected = false;
            s.last_error = Some("killed".to_owned());
        });
    }

    /// Fault injection: drops the current stream abruptly (no Goodbye). The agent
    /// reconnects by itself with backoff; its boxes keep running.
    pub fn drop_connection(&self) {
        self.inner.shared.drop_connection.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Fault injection: keep the stream open but stop (or resume) heartbeats.
    pub fn pause_heartbeats(&self, paused: bool) {
        self.inner.shared.heartbeats_paused.store(paused, Ordering::Relaxed);
    }

    /// Commands received from the control plane so far, over every
    /// connection (each gets one result).
    pub fn commands_received(&self) -> u64 {
        self.inner.shared.commands_received.load(Ordering::Relaxed)
    }

    /// Whether the agent task has ended.
    pub fn is_finished(&self) -> bool {
        self.inner.finished.is_cancelled()
    }
}
