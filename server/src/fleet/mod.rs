//! Hosts: their streams, the registry of live connections, command routing,
//! the warm pool each host is kept filled with, and liveness.

pub mod connection;
pub mod handshake;
pub mod heartbeats;
pub mod pool;
pub mod registry;
pub mod router;

pub use registry::ConnectionRegistry;
pub use router::{CommandRouter, DynRouter, LocalRouter, RouteError};
