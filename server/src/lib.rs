//! Switchboard control plane: hands out warm mandelboxes in one call, keeps a
//! bidirectional stream to every host, and keeps each host's warm pool full.
//! See ARCHITECTURE.md for the picture.

pub mod accounts;
pub mod admin;
pub mod allocation;
pub mod api;
pub mod app;
pub mod auth;
mod batcher;
pub mod billing;
pub mod bookkeeping;
pub mod cloud;
pub mod cluster;
pub mod config;
pub mod core;
pub mod dev;
pub mod error;
pub mod events;
pub mod fleet;
pub mod fleet_page;
pub mod lifecycle;
pub mod liveness;
pub mod maintenance;
pub mod metrics;
pub mod model;
pub mod regions;
pub mod replacements;
pub mod scaling;
pub mod session_claims;
pub mod session_ends;
pub mod sessions;
pub mod shutdown;
pub mod store;
pub mod telemetry;

pub use app::{Application, ApplicationOptions};

/// Stripe and JWKS fetching (ring) and the EC2 SDK (aws-lc-rs) both link rustls
/// crypto providers, so rustls cannot pick one by itself: pick ring. Call it
/// before making any TLS client; calling it again is harmless.
pub fn install_tls_provider() {
    // Err means a provider is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
