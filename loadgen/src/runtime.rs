//! A mandelbox runtime whose boxes answer at once: no process, no listener.
//! It records what the control plane told it (disconnect tokens, the time each
//! command arrived) so the scenarios can act as the protocol server and time
//! the control plane.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Instant,
};

use async_trait::async_trait;
use hostagent_client::{AssignSpec, Assignment, ExitNotice, MandelboxRuntime, RuntimeError, SpawnSpec};
use switchboard_proto::v1::{Port, RunningMandelbox};
use tokio::sync::broadcast;

/// What reached a host, and when.
#[derive(Debug, Clone)]
pub(crate) struct RuntimeEvent {
    pub(crate) host_id: String,
    pub(crate) kind: EventKind,
    pub(crate) mandelbox_id: String,
    pub(crate) at: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventKind {
    Spawn,
    Teardown,
}

/// Shared by every simulated host of a run: disconnect tokens by box id, and
/// the stream of spawn/teardown events.
#[derive(Clone)]
pub(crate) struct Observatory {
    tokens: Arc<Mutex<HashMap<String, String>>>,
    events: broadcast::Sender<RuntimeEvent>,
}

impl Observatory {
    pub(crate) fn new() -> Self {
        let (events, _) = broadcast::channel(65_536);
        Observatory { tokens: Arc::default(), events }
    }

    pub(crate) fn token_of(&self, mandelbox_id: &str) -> Option<String> {
        self.tokens.lock().ok()?.get(mandelbox_id).cloned()
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<RuntimeEvent> {
        self.events.subscribe()
    }
}

/// One host's boxes.
pub(crate) struct InstantRuntime {
    host_id: String,
    observatory: Observatory,
    boxes: Mutex<HashMap<String, Option<String>>>,
    exits: broadcast::Sender<ExitNotice>,
}

impl InstantRuntime {
    pub(crate) fn new(host_id: &str, observatory: Observatory) -> Self {
        let (exits, _) = broadcast::channel(4);
        InstantRuntime { host_id: host_id.to_owned(), observatory, boxes: Mutex::default(), exits }
    }

    fn event(&self, kind: EventKind, mandelbox_id: &str) {
        let _ = self.observatory.events.send(RuntimeEvent {
            host_id: self.host_id.clone(),
            kind,
            mandelbox_id: mandelbox_id.to_owned(),
            at: Instant::now(),
        });
    }
}

fn ports() -> Vec<Port> {
    vec![Port { name: "tcp_32262".into(), port: 32262, protocol: "tcp".into() }]
}

#[async_trait]
impl MandelboxRuntime for InstantRuntime {
    async fn spawn(&self, spec: SpawnSpec) -> Result<Vec<Port>, RuntimeError> {
        self.event(EventKind::Spawn, &spec.mandelbox_id);
        if let Ok(mut tokens) = self.observatory.tokens.lock() {
            tokens.insert(spec.mandelbox_id.clone(), spec.disconnect_token.clone());
        }
        if let Ok(mut boxes) = self.boxes.lock() {
            boxes.entry(spec.mandelbox_id).or_insert(None);
        }
        Ok(ports())
    }

    async fn assign(&self, spec: AssignSpec) -> Result<Assignment, RuntimeError> {
        let mut boxes = self.boxes.lock().map_err(|_| RuntimeError::NotFound(spec.mandelbox_id.clone()))?;
        match boxes.get_mut(&spec.mandelbox_id) {
            None => Err(RuntimeError::NotFound(spec.mandelbox_id)),
            Some(Some(session)) if *session != spec.session_id => {
                Err(RuntimeError::AlreadyAssigned { mandelbox_id: spec.mandelbox_id })
            }
            Some(slot) => {
                *slot = Some(spec.session_id);
                Ok(Assignment { ports: ports(), session_key: "00112233445566778899aabbccddeeff".into() })
            }
        }
    }

    async fn teardown(&self, mandelbox_id: &str) -> Result<(), RuntimeError> {
        self.event(EventKind::Teardown, mandelbox_id);
        if let Ok(mut boxes) = self.boxes.lock() {
            boxes.remove(mandelbox_id);
        }
        if let Ok(mut tokens) = self.observatory.tokens.lock() {
            tokens.remove(mandelbox_id);
        }
        Ok(())
    }

    fn running(&self) -> Vec<RunningMandelbox> {
        let Ok(boxes) = self.boxes.lock() else {
            return Vec::new();
        };
        boxes
            .iter()
            .map(|(id, session)| RunningMandelbox {
                mandelbox_id: id.clone(),
                assigned: session.is_some(),
                session_id: session.clone().unwrap_or_default(),
            })
            .collect()
    }

    fn exits(&self) -> broadcast::Receiver<ExitNotice> {
        self.exits.subscribe()
    }

    async fn teardown_all(&self) {
        if let Ok(mut boxes) = self.boxes.lock() {
            boxes.clear();
        }
    }

    fn kill_all(&self) {
        if let Ok(mut boxes) = self.boxes.lock() {
            boxes.clear();
        }
    }
}
