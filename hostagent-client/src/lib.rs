//! Switchboard host agent.
//!
//! The agent runs on every cloud host. It keeps one bidirectional stream open
//! to the control plane (`switchboard.v1.HostService/Connect`), introduces the
//! host with a `Hello` (including the mandelboxes that are still running, so a
//! reconnect resumes where it left off), heartbeats at the interval the control
//! plane asks for, executes spawn / assign / teardown / drain commands through a
//! [`MandelboxRuntime`], and reports mandelboxes that exit by themselves.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use std::sync::Arc;
//! use hostagent_client::{AgentOptions, HostAgent, LocalRuntime};
//!
//! let options = AgentOptions::new("http://127.0.0.1:50051", "host-1", "us-east-1", "secret");
//! let handle = HostAgent::new(options, Arc::new(LocalRuntime::new())).spawn();
//! handle.wait_connected(1, std::time::Duration::from_secs(5)).await?;
//! handle.shutdown().await;
//! # Ok(()) }
//! ```

mod agent;
mod backoff;
mod commands;
mod connection;
mod handle;
mod metrics;
mod options;
pub mod runtime;

pub use agent::HostAgent;
pub use backoff::Backoff;
pub use handle::{AgentHandle, AgentStatus};
pub use options::AgentOptions;
pub use runtime::local::LocalRuntime;
pub use runtime::{AssignSpec, Assignment, ExitNotice, MandelboxRuntime, RuntimeError, SpawnSpec};

/// Version reported in `Hello.agent_version`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
