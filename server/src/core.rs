//! The components every part of the control plane shares, built once by
//! `Application::build` and passed around behind an `Arc`.

use std::sync::Arc;

use crate::{
    config::Config,
    events::DynEventBus,
    fleet::{ConnectionRegistry, DynRouter},
    maintenance::Maintenance,
    scaling::ScalerHandle,
    store::DynStore,
};

pub struct Core {
    pub store: DynStore,
    pub router: DynRouter,
    pub events: DynEventBus,
    pub registry: Arc<ConnectionRegistry>,
    pub config: Arc<Config>,
    /// URL mandelboxes call ReportDisconnect on.
    pub public_endpoint: String,
    /// Wakes region scalers when allocations and teardowns change a region.
    pub scaling: ScalerHandle,
    /// This process's identity as a lease holder (unique per start).
    pub replica_id: String,
    /// Maintenance mode, shared by every replica.
    pub maintenance: Maintenance,
    /// The Redis link to the other replicas (router and event bus), when configured.
    pub cluster: Option<crate::cluster::RedisCluster>,
    /// Spawn and teardown confirmations, written in batches.
    pub bookkeeping: crate::bookkeeping::Bookkeeper,
    /// ReportDisconnect's session ends, grouped into shared commits.
    pub session_ends: crate::session_ends::SessionEnds,
    /// Allocate's claims, grouped into shared commits.
    pub session_claims: crate::session_claims::SessionClaims,
    /// Warm replacements spawned and not yet written (`crate::replacements`).
    pub unrecorded: crate::replacements::UnrecordedReplacements,
    /// Latency histograms of the hot paths (`/metrics`).
    pub metrics: Arc<crate::metrics::Metrics>,
}

pub type SharedCore = Arc<Core>;
