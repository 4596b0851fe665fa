//! Ending sessions and tearing mandelboxes down, whoever asks: the user
//! (EndSession), the protocol server (ReportDisconnect), the host (exited
//! notice) or liveness (host lost).

use std::{sync::Arc, time::Duration};

use switchboard_proto::v1::{DrainHost, TeardownMandelbox, command};
use uuid::Uuid;

use crate::{
    core::Core,
    error::ApiResult,
    events::{Event, SessionChange},
    fleet::{RouteError, pool},
    model::{EndReason, HostRecord, MandelboxRecord, MandelboxState, SessionRecord},
    store::{EndedSession, Recycled, TornDown},
};

impl Core {
    /// Stops new sessions on a host: DRAINING, told so, its idle boxes torn
    /// down; running sessions finish normally. None if the host is unknown.
    pub async fn drain_host(self: &Arc<Self>, host_id: &str, reason: &str) -> ApiResult<Option<HostRecord>> {
        let Some(drained) = self.store.drain_host(host_id).await? else {
            return Ok(None);
        };
        tracing::info!(%host_id, reason, "draining host");
        let timeout = Duration::from_millis(self.config.hosts.command_timeout_ms);
        let drain = command::Kind::Drain(DrainHost { reason: reason.to_owned() });
        if let Err(error) = self.router.send(host_id, drain, timeout).await {
            tracing::warn!(%host_id, %error, "host did not confirm drain");
        }
        let idle = self.store.host_mandelboxes(host_id, &[MandelboxState::Waiting, MandelboxState::Spawning]).await?;
        for mandelbox in idle {
            if let Some((before, _)) =
                self.store.mandelbox_finished(mandelbox.id, MandelboxState::Dead, EndReason::HostDrained).await?
            {
                self.spawn_teardown(before, "host draining");
            }
        }
        Ok(Some(drained))
    }

    /// Ends a live session; its box is torn down in the background and a
    /// replacement warmed once the host confirms.
    pub async fn end_session(self: &Arc<Self>, session_id: Uuid, reason: EndReason) -> ApiResult<Option<EndedSession>> {
        let Some(ended) = self.store.end_session(session_id, reason).await? else {
            return Ok(None);
        };
        self.session_ended(&ended, reason).await;
        Ok(Some(ended))
    }

    /// What follows a session's end in the store: the event, the scaler's
    /// wake-up and the box's teardown.
    pub async fn session_ended(self: &Arc<Self>, ended: &EndedSession, reason: EndReason) {
        if ended.changed {
            tracing::info!(session_id = %ended.session.id, reason = %reason, "session ended");
            self.publish_session(&ended.session).await;
            if let Some(region) = &ended.session.region {
                self.scaling.wake(region);
            }
        }
        if let Some(mandelbox) = &ended.teardown {
            self.spawn_teardown(mandelbox.clone(), reason.as_str());
        }
    }

    /// Tells the box's host to tear it down, in the background. On the host's
    /// confirmation the box is DEAD and its slot refilled with a warm box in the
    /// same transaction (`recycle_torn_down`). If the host is unreachable the
    /// box stays DYING, and the host's next Hello reconciles it.
    pub fn spawn_teardown(self: &Arc<Self>, mandelbox: MandelboxRecord, reason: &str) {
        let core = self.clone();
        let timeout = Duration::from_millis(self.config.hosts.command_timeout_ms);
        let kind = command::Kind::Teardown(TeardownMandelbox {
            mandelbox_id: mandelbox.id.to_string(),
            reason: reason.to_owned(),
        });
        tokio::spawn(async move {
            match core.router.send(&mandelbox.host_id, kind, timeout).await {
                Ok(_) => core.torn_down(&mandelbox).await,
                Err(RouteError::NotConnected) => {
                    tracing::info!(mandelbox_id = %mandelbox.id, host_id = %mandelbox.host_id, "host offline; teardown waits for its reconnect");
                }
                Err(error) => {
                    tracing::warn!(mandelbox_id = %mandelbox.id, host_id = %mandelbox.host_id, %error, "teardown not confirmed");
                }
            }
        });
    }

    /// The host confirmed a teardown: the box is DEAD and, with the warm pool
    /// on, a replacement is reserved in the same transaction and spawned. A box
    /// that was not DYING (already written off) goes through
    /// `mandelbox_finished`, and the host's filler refills the slot.
    async fn torn_down(self: &Arc<Self>, mandelbox: &MandelboxRecord) {
        let replacement = self.config.allocation.warm_pool.then(|| pool::new_warm_box(self));
        let recycled = self
            .bookkeeping
            .torn_down(TornDown {
                host_id: mandelbox.host_id.clone(),
                id: mandelbox.id,
                replacement: replacement.as_ref().map(|(new, _)| new.clone()),
            })
            .await;
        match (recycled, replacement) {
            (Ok(Recycled { finished: true, replacement: Some(reserved) }), Some((_, token))) => {
                tokio::spawn(pool::spawn_warm(self.clone(), reserved, token));
            }
            (Ok(Recycled { finished: true, .. }), _) => {}
            (Ok(Recycled { finished: false, .. }), _) => {
                if let Err(error) =
                    self.store.mandelbox_finished(mandelbox.id, MandelboxState::Dead, EndReason::MandelboxExited).await
                {
                    tracing::warn!(mandelbox_id = %mandelbox.id, %error, "could not record teardown");
                }
                self.registry.refill(&mandelbox.host_id);
            }
            (Err(error), _) => {
                tracing::warn!(mandelbox_id = %mandelbox.id, %error, "could not record teardown");
                self.registry.refill(&mandelbox.host_id);
            }
        }
    }

    /// Publishes a session's current state to watchers (looking up where it
    /// runs, unless it has ended: where it ran is of no use to a watcher, and
    /// the lookups would cost two reads on every session's end).
    pub async fn publish_session(&self, session: &SessionRecord) {
        let change = if session.state == crate::model::SessionState::Ended {
            SessionChange { session: session.clone(), host_address: None, ports: Vec::new() }
        } else {
            self.session_change(session).await
        };
        self.publish_change(change);
    }

    /// Publishes a change whose address and ports the caller already knows.
    pub fn publish_change(&self, change: SessionChange) {
        self.events.publish(Event::Session(Box::new(change)));
    }

    /// Publishes several ended sessions (host lost, reconciliation).
    pub async fn publish_sessions(&self, sessions: &[SessionRecord]) {
        for session in sessions {
            self.publish_session(session).await;
        }
    }

    /// A session with where to reach it (host address and ports).
    pub async fn session_change(&self, session: &SessionRecord) -> SessionChange {
        let mut change = SessionChange { session: session.clone(), host_address: None, ports: Vec::new() };
        if let Some(host_id) = &session.host_id
            && let Ok(Some(host)) = self.store.get_host(host_id).await
        {
            change.host_address = Some(host.address);
        }
        if let Some(mandelbox_id) = session.mandelbox_id
            && let Ok(Some(mandelbox)) = self.store.get_mandelbox(mandelbox_id).await
        {
            change.ports = mandelbox.ports;
        }
        change
    }
}
