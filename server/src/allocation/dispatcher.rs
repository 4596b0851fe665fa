//! Fulfils pending sessions when boxes warm up: wakes on `MandelboxWarm`
//! events and on a timer, oldest session first.

use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::Allocator;
use crate::events::{DynEventBus, Event};

pub struct Dispatcher {
    allocator: Allocator,
    events: DynEventBus,
    interval: Duration,
}

impl Dispatcher {
    pub fn new(allocator: Allocator, events: DynEventBus, interval: Duration) -> Self {
        Dispatcher { allocator, events, interval }
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let mut events = self.events.subscribe();
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let region = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => None,
                event = events.recv() => match event {
                    Ok(Event::MandelboxWarm { region }) => Some(region),
                    Ok(_) => continue,
                    Err(RecvError::Lagged(_)) => None,
                    Err(RecvError::Closed) => return,
                },
            };
            if self.allocator.pending().is_empty() {
                continue;
            }
            for session_id in self.allocator.pending().waiting_for(region.as_deref()) {
                match self.allocator.fulfil_pending(session_id).await {
                    // One warm box serves one session; the rest wait for the next.
                    Ok(true) if region.is_some() => break,
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(%session_id, %error, "pending session not fulfilled")
                    }
                }
            }
        }
    }
}
