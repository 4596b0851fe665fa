//! Events between the parts of the control plane: session changes (for
//! WatchSession), and warm boxes becoming available (for pending sessions).
//! The in-process bus is a broadcast channel; a Redis bus implements the same
//! trait for several replicas.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::model::{PortSpec, SessionRecord};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// A session changed state.
    Session(Box<SessionChange>),
    /// A box became WAITING in `region`.
    MandelboxWarm { region: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionChange {
    pub session: SessionRecord,
    pub host_address: Option<String>,
    pub ports: Vec<PortSpec>,
}

pub trait EventBus: Send + Sync + 'static {
    fn publish(&self, event: Event);
    /// Events published after this call. A receiver that falls behind gets
    /// `Lagged` and must re-read durable state.
    fn subscribe(&self) -> broadcast::Receiver<Event>;
}

pub type DynEventBus = Arc<dyn EventBus>;

pub struct LocalEventBus {
    sender: broadcast::Sender<Event>,
}

impl LocalEventBus {
    pub fn new(capacity: usize) -> Self {
        LocalEventBus { sender: broadcast::channel(capacity).0 }
    }
}

impl EventBus for LocalEventBus {
    fn publish(&self, event: Event) {
        // No subscriber is not an error: nobody is watching.
        let _ = self.sender.send(event);
    }

    fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.sender.subscribe()
    }
}
