//! In-process runtime for dev mode and tests: every mandelbox is a tokio task
//! with a real TCP listener on 127.0.0.1 that stands in for the protocol server.
//!
//! A box's life: spawned (listening, warm) → assigned (accepts one client and
//! echoes its bytes) → the client leaves (the box reports the disconnect to the
//! control plane) → torn down, or, with
//! [`LocalRuntime::with_exit_after_disconnect`], exits by itself a while later.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use async_trait::async_trait;
use switchboard_proto::v1::{Port, RunningMandelbox};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::report::report_disconnect;
use super::{AssignSpec, Assignment, ExitNotice, MandelboxRuntime, RuntimeError, SpawnSpec, new_session_key};

/// Name of the port a local box reports (the protocol server's main port in the
/// system Switchboard replaces).
pub const MAIN_PORT_NAME: &str = "tcp_32262";

const EXIT_CHANNEL_CAPACITY: usize = 256;

/// Runs mandelboxes as tokio tasks on this process. Cloning shares the boxes.
#[derive(Clone)]
pub struct LocalRuntime {
    inner: Arc<Inner>,
}

struct Inner {
    boxes: Mutex<HashMap<String, LocalBox>>,
    exits: broadcast::Sender<ExitNotice>,
    exit_after_disconnect: Option<Duration>,
    next_instance: AtomicU64,
}

/// The runtime's record of one box; the box itself is `task`.
struct LocalBox {
    /// Tells apart two boxes that had the same id one after the other.
    instance: u64,
    ports: Vec<Port>,
    /// Set once by `assign`; the task waits on it.
    session: watch::Sender<Option<SessionInfo>>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

#[derive(Clone)]
struct SessionInfo {
    session_id: String,
    session_key: String,
}

impl LocalRuntime {
    /// Boxes that run until torn down.
    pub fn new() -> Self {
        Self::build(None)
    }

    /// Boxes that also exit by themselves `delay` after their client left (like
    /// the real protocol server), which the agent reports as `MandelboxExited`.
    pub fn with_exit_after_disconnect(delay: Duration) -> Self {
        Self::build(Some(delay))
    }

    fn build(exit_after_disconnect: Option<Duration>) -> Self {
        let (exits, _) = broadcast::channel(EXIT_CHANNEL_CAPACITY);
        Self {
            inner: Arc::new(Inner {
                boxes: Mutex::new(HashMap::new()),
                exits,
                exit_after_disconnect,
                next_instance: AtomicU64::new(1),
            }),
        }
    }

    /// Stops every box at once, with no cleanup and no exit notices (the
    /// machine died): their listeners and client connections close.
    pub fn kill_all(&self) {
        let boxes: Vec<LocalBox> = self.inner.lock().drain().map(|(_, b)| b).collect();
        for b in &boxes {
            b.stop.cancel();
            b.task.abort();
        }
        if !boxes.is_empty() {
            info!(count = boxes.len(), "killed every mandelbox");
        }
    }
}

impl Default for LocalRuntime {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for LocalRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalRuntime")
            .field("mandelboxes", &self.inner.lock().len())
            .field("exit_after_disconnect", &self.inner.exit_after_disconnect)
            .finish()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, LocalBox>> {
        self.boxes.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let boxes = self.boxes.get_mut().unwrap_or_else(PoisonError::into_inner);
        for (_, b) in boxes.drain() {
            b.stop.cancel();
            b.task.abort();
        }
    }
}

#[async_trait]
impl MandelboxRuntime for LocalRuntime {
    async fn spawn(&self, spec: SpawnSpec) -> Result<Vec<Port>, RuntimeError> {
        if spec.mandelbox_id.is_empty() {
            return Err(RuntimeError::Invalid("empty mandelbox_id".into()));
        }
        if let Some(existing) = self.inner.lock().get(&spec.mandelbox_id) {
            return Ok(existing.ports.clone());
        }
        // The only await: cancelling spawn here leaves nothing behind.
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let port = listener.local_addr()?.port();
        let ports = vec![Port { name: MAIN_PORT_NAME.to_owned(), port: u32::from(port), protocol: "tcp".to_owned() }];

        let mut boxes = self.inner.lock();
        if let Some(existing) = boxes.get(&spec.mandelbox_id) {
            // A concurrent spawn of the same id won; ours closes with `listener`.
            return Ok(existing.ports.clone());
        }
        let instance = self.inner.next_instance.fetch_add(1, Ordering::Relaxed);
        let (session, session_rx) = watch::channel(None);
        let stop = CancellationToken::new();
        let life = BoxLife {
            runtime: Arc::downgrade(&self.inner),
            mandelbox_id: spec.mandelbox_id.clone(),
            instance,
            disconnect_token: spec.disconnect_token,
            session_events_endpoint: spec.session_events_endpoint,
            exit_after_disconnect: self.inner.exit_after_disconnect,
        };
        let span = info_span!("mandelbox", mandelbox_id = spec.mandelbox_id);
        let task = tokio::spawn(life.run(listener, session_rx, stop.clone()).instrument(span));
        boxes.insert(spec.mandelbox_id.clone(), LocalBox { instance, ports: ports.clone(), session, stop, task });
        debug!(mandelbox_id = spec.mandelbox_id, app = spec.app, port, "mandelbox spawned");
        Ok(ports)
    }

    async fn assign(&self, spec: AssignSpec) -> Result<Assignment, RuntimeError> {
        if spec.session_id.is_empty() {
            return Err(RuntimeError::Invalid("empty session_id".into()));
        }
        let boxes = self.inner.lock();
        let b = boxes.get(&spec.mandelbox_id).ok_or_else(|| RuntimeError::NotFound(spec.mandelbox_id.clone()))?;
        let current = b.session.borrow().clone();
        let session_key = match current {
            Some(s) if s.session_id == spec.session_id => s.session_key,
            Some(_) => {
                return Err(RuntimeError::AlreadyAssigned { mandelbox_id: spec.mandelbox_id });
            }
            None => {
                let session_key = new_session_key();
                b.session.send_replace(Some(SessionInfo {
                    session_id: spec.session_id.clone(),
                    session_key: session_key.clone(),
                }));
                info!(
                    mandelbox_id = spec.mandelbox_id,
                    session_id = spec.session_id,
                    user_id = spec.user_id,
                    "mandelbox assigned"
                );
                session_key
            }
        };
        Ok(Assignment { ports: b.ports.clone(), session_key })
    }

    async fn teardown(&self, mandelbox_id: &str) -> Result<(), RuntimeError> {
        let Some(b) = self.inner.lock().remove(mandelbox_id) else {
            debug!(mandelbox_id, "teardown of unknown mandelbox");
            return Ok(());
        };
        b.stop.cancel();
        // The task stops at its next await; once it has, the port is closed.
        if let Err(e) = b.task.await
            && e.is_panic()
        {
            warn!(mandelbox_id, "mandelbox task panicked");
        }
        info!(mandelbox_id, "mandelbox torn down");
        Ok(())
    }

    fn running(&self) -> Vec<RunningMandelbox> {
        let mut running: Vec<RunningMandelbox> = self
            .inner
            .lock()
            .iter()
            .map(|(id, b)| {
                let session = b.session.borrow();
                RunningMandelbox {
                    mandelbox_id: id.clone(),
                    assigned: session.is_some(),
                    session_id: session.as_ref().map(|s| s.session_id.clone()).unwrap_or_default(),
                }
            })
            .collect();
        running.sort_by(|a, b| a.mandelbox_id.cmp(&b.mandelbox_id));
        running
    }

    fn exits(&self) -> broadcast::Receiver<ExitNotice> {
        self.inner.exits.subscribe()
    }

    async fn teardown_all(&self) {
        let boxes: Vec<(String, LocalBox)> = self.inner.lock().drain().collect();
        for (_, b) in &boxes {
            b.stop.cancel();
        }
        let count = boxes.len();
        for (mandelbox_id, b) in boxes {
            if let Err(e) = b.task.await
                && e.is_panic()
            {
                warn!(mandelbox_id, "mandelbox task panicked");
            }
        }
        if count > 0 {
            info!(count, "every mandelbox torn down");
        }
    }

    fn kill_all(&self) {
        LocalRuntime::kill_all(self);
    }
}

/// What a box's task needs; owns the box's secrets.
struct BoxLife {
    runtime: Weak<Inner>,
    mandelbox_id: String,
    instance: u64,
    disconnect_token: String,
    session_events_endpoint: String,
    exit_after_disconnect: Option<Duration>,
}

impl BoxLife {
    async fn run(self, listener: TcpListener, session: watch::Receiver<Option<SessionInfo>>, stop: CancellationToken) {
        tokio::select! {
            _ = stop.cancelled() => {}
            exit_reason = self.serve(&listener, session) => {
                if let Some(reason) = exit_reason {
                    drop(listener);
                    self.exit(reason);
                }
            }
        }
    }

    /// Serves one session. Returns the reason when the box exits by itself;
    /// otherwise waits (for teardown) forever.
    async fn serve(&self, listener: &TcpListener, mut session: watch::Receiver<Option<SessionInfo>>) -> Option<String> {
        let mandelbox_id = self.mandelbox_id.as_str();
        let assigned = session
            .wait_for(Option::is_some)
            .await
            .map(|s| s.as_ref().map(|s| s.session_id.clone()).unwrap_or_default());
        let Ok(session_id) = assigned else {
            // The runtime dropped the box record: teardown is on its way.
            return std::future::pending().await;
        };
        let (stream, peer) = loop {
            match listener.accept().await {
                Ok(accepted) => break accepted,
                Err(e) => {
                    warn!(mandelbox_id, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        info!(mandelbox_id, session_id, %peer, "client connected");
        let bytes = echo(stream).await;
        info!(mandelbox_id, session_id, bytes, "client disconnected");
        let left_at = Instant::now();
        report_disconnect(&self.session_events_endpoint, mandelbox_id, &self.disconnect_token).await;
        match self.exit_after_disconnect {
            Some(delay) => {
                tokio::time::sleep_until(left_at + delay).await;
                Some("client disconnected".to_owned())
            }
            None => std::future::pending().await,
        }
    }

    /// Removes this box from the runtime and announces the exit, unless a
    /// teardown removed it first.
    fn exit(&self, reason: String) {
        let Some(runtime) = self.runtime.upgrade() else {
            return;
        };
        let removed = {
            let mut boxes = runtime.lock();
            match boxes.get(&self.mandelbox_id) {
                Some(b) if b.instance == self.instance => boxes.remove(&self.mandelbox_id),
                _ => None,
            }
        };
        if removed.is_some() {
            info!(mandelbox_id = self.mandelbox_id, reason, "mandelbox exited");
            // No subscriber means nobody to tell; the next Hello omits the box.
            let _ = runtime.exits.send(ExitNotice { mandelbox_id: self.mandelbox_id.clone(), reason });
        }
    }
}

/// Echoes the client's bytes back until it leaves; returns how many were echoed.
async fn echo(mut stream: TcpStream) -> u64 {
    let (mut reader, mut writer) = stream.split();
    tokio::io::copy(&mut reader, &mut writer).await.unwrap_or(0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
