//! What runs mandelboxes: the runtime trait the agent drives, and its inputs and outputs.

use std::fmt;

use async_trait::async_trait;
use rand::RngCore;
use switchboard_proto::v1::{Port, RunningMandelbox};
use tokio::sync::broadcast;

pub mod local;
mod report;

/// Runs mandelboxes on this host. The agent calls it from many tasks at once.
#[async_trait]
pub trait MandelboxRuntime: Send + Sync + 'static {
    /// Starts a warm (unassigned) mandelbox and returns its ports.
    ///
    /// Spawning an id that is already running should return that box's ports
    /// (the control plane may repeat a command whose result it never saw).
    async fn spawn(&self, spec: SpawnSpec) -> Result<Vec<Port>, RuntimeError>;

    /// Attaches a user to a warm mandelbox and returns its ports and a fresh session key.
    ///
    /// Assigning the same session again should return the same assignment.
    async fn assign(&self, spec: AssignSpec) -> Result<Assignment, RuntimeError>;

    /// Stops a mandelbox. Stopping an unknown or already stopped box is `Ok`.
    async fn teardown(&self, mandelbox_id: &str) -> Result<(), RuntimeError>;

    /// The boxes running now.
    fn running(&self) -> Vec<RunningMandelbox>;

    /// Boxes that exited by themselves (not through `teardown`).
    fn exits(&self) -> broadcast::Receiver<ExitNotice>;

    /// Stops every box (graceful agent shutdown).
    async fn teardown_all(&self);

    /// Stops every box at once, with no cleanup: the machine died
    /// ([`AgentHandle::kill`](crate::AgentHandle::kill)). The default does
    /// nothing, for runtimes whose boxes cannot be stopped synchronously.
    fn kill_all(&self) {}
}

/// Inputs of [`MandelboxRuntime::spawn`].
#[derive(Clone, PartialEq, Eq)]
pub struct SpawnSpec {
    pub mandelbox_id: String,
    pub app: String,
    /// Token the box presents to `SessionEventsService/ReportDisconnect`. Secret.
    pub disconnect_token: String,
    /// URL of the control plane's `SessionEventsService`.
    pub session_events_endpoint: String,
}

impl fmt::Debug for SpawnSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpawnSpec")
            .field("mandelbox_id", &self.mandelbox_id)
            .field("app", &self.app)
            .field("disconnect_token", &REDACTED)
            .field("session_events_endpoint", &self.session_events_endpoint)
            .finish()
    }
}

/// Inputs of [`MandelboxRuntime::assign`].
#[derive(Clone, PartialEq, Eq)]
pub struct AssignSpec {
    pub mandelbox_id: String,
    pub session_id: String,
    pub user_id: String,
    /// Opaque JSON object from the client (timezone, locale, ...).
    pub client_data_json: String,
    /// The user's config-encryption token. Secret: never stored or logged.
    pub config_encryption_token: String,
}

impl fmt::Debug for AssignSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AssignSpec")
            .field("mandelbox_id", &self.mandelbox_id)
            .field("session_id", &self.session_id)
            .field("user_id", &self.user_id)
            .field("client_data_json", &self.client_data_json)
            .field("config_encryption_token", &REDACTED)
            .finish()
    }
}

/// Output of [`MandelboxRuntime::assign`].
#[derive(Clone, PartialEq, Eq)]
pub struct Assignment {
    pub ports: Vec<Port>,
    /// Per-session key (16 random bytes, hex) shared with the box. Secret.
    pub session_key: String,
}

impl fmt::Debug for Assignment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Assignment").field("ports", &self.ports).field("session_key", &REDACTED).finish()
    }
}

/// A mandelbox that exited by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitNotice {
    pub mandelbox_id: String,
    pub reason: String,
}

/// Why a runtime operation failed. The message goes back to the control plane
/// in `CommandResult.error`, so it never contains secrets.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("mandelbox {0} not found")]
    NotFound(String),
    #[error("mandelbox {mandelbox_id} is already assigned to another session")]
    AlreadyAssigned { mandelbox_id: String },
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("runtime is shut down")]
    ShutDown,
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Other(String),
}

/// A fresh per-session key: 16 random bytes as 32 lowercase hex characters.
pub fn new_session_key() -> String {
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

const REDACTED: &str = "<redacted>";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_secrets() {
        let spawn = SpawnSpec {
            mandelbox_id: "mb-1".into(),
            app: "chrome".into(),
            disconnect_token: "dtok-secret".into(),
            session_events_endpoint: "http://x".into(),
        };
        let assign = AssignSpec {
            mandelbox_id: "mb-1".into(),
            session_id: "s-1".into(),
            user_id: "u-1".into(),
            client_data_json: "{}".into(),
            config_encryption_token: "cet-secret".into(),
        };
        let assignment = Assignment { ports: vec![], session_key: "key-secret".into() };
        let all = format!("{spawn:?} {assign:?} {assignment:?}");
        assert!(!all.contains("secret"), "{all}");
        assert!(all.contains("mb-1") && all.contains("s-1"));
    }

    #[test]
    fn session_keys_are_fresh_32_hex() {
        let a = new_session_key();
        let b = new_session_key();
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(a, b);
    }
}
