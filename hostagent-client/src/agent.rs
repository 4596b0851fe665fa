//! The agent: connects, reconnects with backoff, and shuts down cleanly.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;
use tracing::{Instrument, info, info_span, warn};

use crate::backoff::BackoffSchedule;
use crate::connection::{self, ConnectionContext, Outcome};
use crate::handle::{AgentHandle, AgentStatus, Shared};
use crate::options::AgentOptions;
use crate::runtime::MandelboxRuntime;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 pings notice a dead control plane (or network) that sends no reset.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The host agent. Build it, then [`run`](Self::run) it or [`spawn`](Self::spawn) it.
pub struct HostAgent {
    options: AgentOptions,
    runtime: Arc<dyn MandelboxRuntime>,
    shared: Arc<Shared>,
}

impl HostAgent {
    pub fn new(options: AgentOptions, runtime: Arc<dyn MandelboxRuntime>) -> Self {
        Self { options, runtime, shared: Arc::new(Shared::new()) }
    }

    /// The agent's status, updated on every change.
    pub fn status(&self) -> watch::Receiver<AgentStatus> {
        self.shared.status.subscribe()
    }

    /// Runs until `shutdown` is cancelled, reconnecting as needed; then says
    /// Goodbye (if connected) and tears down every box. Fails only on settings
    /// that can never work (an unparsable endpoint).
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        // Every log line of this agent (and of its boxes) names the host: dev
        // mode runs several agents in one process.
        let span = info_span!("hostagent", host_id = self.options.host_id);
        self.run_inner(shutdown).instrument(span).await
    }

    async fn run_inner(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let options = &self.options;
        let endpoint = Endpoint::from_shared(options.endpoint.clone())
            .with_context(|| format!("invalid control plane endpoint {:?}", options.endpoint))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        info!(
            region = options.region,
            endpoint = options.endpoint,
            version = crate::AGENT_VERSION,
            "host agent starting"
        );
        let cx = ConnectionContext { options, endpoint: &endpoint, runtime: &self.runtime, shared: &self.shared };
        let backoff = options.backoff;
        let mut schedule = BackoffSchedule::new(backoff);
        let mut failures = 0u64;
        // Command tasks outlive a dropped stream (their results are then lost,
        // and the next Hello tells the truth), but not the agent.
        let mut tasks = JoinSet::new();
        loop {
            let lost = match connection::run(&cx, &mut tasks, &shutdown).await {
                Outcome::Shutdown => break,
                Outcome::Lost(lost) => lost,
            };
            self.shared.status.send_modify(|s| {
                s.connected = false;
                s.last_error = Some(lost.error.clone());
            });
            if lost.connected_for.is_some_and(|d| d >= backoff.reset_after()) {
                schedule.reset();
            }
            failures = if lost.connected_for.is_some() { 1 } else { failures + 1 };
            let delay = if lost.is_rejection() { backoff.max } else { schedule.next_delay(&mut rand::thread_rng()) };
            let delay_ms = delay.as_millis() as u64;
            if lost.is_rejection() {
                warn!(error = lost.error, delay_ms, "rejected by the control plane, retrying later");
            } else if lost.connected_for.is_some() {
                warn!(error = lost.error, delay_ms, "connection lost, reconnecting");
            } else {
                warn!(error = lost.error, delay_ms, failures, "connection failed, retrying");
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }

        info!("shutting down");
        tasks.shutdown().await;
        self.runtime.teardown_all().await;
        self.shared.status.send_modify(|s| s.connected = false);
        info!("host agent stopped");
        Ok(())
    }

    /// Runs the agent on a tokio task and returns a handle on it.
    pub fn spawn(self) -> AgentHandle {
        let shared = Arc::clone(&self.shared);
        let runtime = Arc::clone(&self.runtime);
        let shutdown = CancellationToken::new();
        let finished = CancellationToken::new();
        let done = finished.clone().drop_guard();
        let token = shutdown.clone();
        let task = tokio::spawn(async move {
            let _done = done;
            self.run(token).await
        });
        AgentHandle::new(shared, runtime, shutdown, finished, task)
    }
}
