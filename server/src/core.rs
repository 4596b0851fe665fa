//! The components every part of the control plane shares, built once by
//! `Application::build` and passed around behind an `Arc`.

use std::sync::Arc;

use crate::{
    config::Config,
    events::DynEventBus,
    fleet::{ConnectionRegistry, DynRouter},
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
}

pub type SharedCore = Arc<Core>;
