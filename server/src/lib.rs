//! Switchboard control plane.

pub mod model;
pub mod store;
