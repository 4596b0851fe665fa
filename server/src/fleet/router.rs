//! Sending a command to a host and waiting for its result, wherever the host's
//! stream lives. `LocalRouter` reaches hosts connected to this process; a
//! Redis-backed router (several replicas) implements the same trait.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use switchboard_proto::v1::{Command, CommandResult, command};

use super::registry::ConnectionRegistry;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    #[error("host is not connected")]
    NotConnected,
    #[error("host connection closed before it answered")]
    Gone,
    #[error("host did not answer within {0:?}")]
    Timeout(Duration),
    #[error("host refused the command: {0}")]
    Refused(String),
    /// The host's replica cannot be reached (Redis down): the command was not sent.
    #[error("command routing unavailable: {0}")]
    Unavailable(String),
}

#[async_trait]
pub trait CommandRouter: Send + Sync + 'static {
    /// Sends `kind` to the host and waits up to `timeout` for its result.
    /// A result with `ok == false` is returned as `RouteError::Refused`.
    async fn send(&self, host_id: &str, kind: command::Kind, timeout: Duration) -> Result<CommandResult, RouteError>;
}

pub type DynRouter = Arc<dyn CommandRouter>;

/// A W3C trace context for a command, so the host's log lines for it can be
/// joined with ours (the host records it in its command span).
fn traceparent() -> String {
    use rand::RngCore;
    let mut ids = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut ids);
    format!("00-{}-{}-01", hex::encode(&ids[..16]), hex::encode(&ids[16..]))
}

pub struct LocalRouter {
    registry: Arc<ConnectionRegistry>,
}

impl LocalRouter {
    pub fn new(registry: Arc<ConnectionRegistry>) -> Self {
        LocalRouter { registry }
    }
}

#[async_trait]
impl CommandRouter for LocalRouter {
    async fn send(&self, host_id: &str, kind: command::Kind, timeout: Duration) -> Result<CommandResult, RouteError> {
        let connection = self.registry.get(host_id).ok_or(RouteError::NotConnected)?;
        let command_id = uuid::Uuid::new_v4().to_string();
        let command = Command { command_id: command_id.clone(), kind: Some(kind), traceparent: traceparent() };
        tracing::debug!(host_id, %command_id, traceparent = %command.traceparent, "sending command");
        // A full queue means a stuck host: that counts against the deadline too.
        let deadline = tokio::time::Instant::now() + timeout;
        let answer = match tokio::time::timeout_at(deadline, connection.send_command(command)).await {
            Err(_) => {
                connection.forget(&command_id);
                return Err(RouteError::Timeout(timeout));
            }
            Ok(Err(_)) => return Err(RouteError::Gone),
            Ok(Ok(answer)) => answer,
        };
        match tokio::time::timeout_at(deadline, answer).await {
            Err(_) => {
                connection.forget(&command_id);
                Err(RouteError::Timeout(timeout))
            }
            Ok(Err(_)) => Err(RouteError::Gone),
            Ok(Ok(result)) if result.ok => Ok(result),
            Ok(Ok(result)) => Err(RouteError::Refused(result.error)),
        }
    }
}

/// Times every command this process sends (`Metrics::host_commands`), in
/// front of whichever router reaches the host.
pub struct TimedRouter {
    inner: DynRouter,
    metrics: Arc<crate::metrics::Metrics>,
}

impl TimedRouter {
    pub fn new(inner: DynRouter, metrics: Arc<crate::metrics::Metrics>) -> Self {
        TimedRouter { inner, metrics }
    }
}

#[async_trait]
impl CommandRouter for TimedRouter {
    async fn send(&self, host_id: &str, kind: command::Kind, timeout: Duration) -> Result<CommandResult, RouteError> {
        let label = crate::metrics::CommandKind::from(&kind);
        let started = std::time::Instant::now();
        let result = self.inner.send(host_id, kind, timeout).await;
        self.metrics.host_commands.record(label, started.elapsed(), result.is_ok());
        result
    }
}

#[cfg(test)]
mod tests {
    use switchboard_proto::v1::TeardownMandelbox;

    use super::*;

    #[tokio::test]
    async fn a_command_that_fails_is_timed_and_counted_as_failed() {
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let local: DynRouter = Arc::new(LocalRouter::new(Arc::new(ConnectionRegistry::default())));
        let router = TimedRouter::new(local, metrics.clone());
        let kind = command::Kind::Teardown(TeardownMandelbox::default());
        let result = router.send("host-nowhere", kind, Duration::from_secs(1)).await;
        assert_eq!(result.err(), Some(RouteError::NotConnected));
        let text = metrics.render();
        assert!(text.contains("switchboard_host_command_seconds_count{kind=\"teardown\"} 1\n"), "{text}");
        assert!(text.contains("switchboard_host_command_failures_total{kind=\"teardown\"} 1\n"), "{text}");
        assert!(text.contains("switchboard_host_command_seconds_count{kind=\"assign\"} 0\n"), "{text}");
    }
}
