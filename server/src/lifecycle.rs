//! Ending sessions and tearing mandelboxes down, whoever asks: the user
//! (EndSession), the protocol server (ReportDisconnect), the host (exited
//! notice) or liveness (host lost).

use std::{sync::Arc, time::Duration};

use switchboard_proto::v1::{DrainHost, SpawnMandelbox, TeardownMandelbox, command};
use uuid::Uuid;

use crate::{
    api::convert::port_from_proto,
    core::Core,
    error::ApiResult,
    events::{Event, SessionChange},
    fleet::{RouteError, pool},
    model::{EndReason, HostRecord, MandelboxRecord, MandelboxState, SessionRecord},
    store::{EndedSession, NewMandelbox, Recycled, TornDown, WarmReplacement},
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

    /// Tells the box's host to tear it down, in the background, and (with the
    /// warm pool on and the host not known to drain) to spawn a warm
    /// replacement in its slot in the same command; the box's death and the
    /// replacement are then written together (`record_teardown`). If the
    /// host is unreachable the box stays DYING, and the host's next Hello
    /// reconciles it.
    pub fn spawn_teardown(self: &Arc<Self>, mandelbox: MandelboxRecord, reason: &str) {
        let core = self.clone();
        let reason = reason.to_owned();
        tokio::spawn(async move { core.teardown_and_replace(mandelbox, reason).await });
    }

    /// One host round trip per recycled slot: the teardown names the
    /// replacement, the host spawns it once the old box is gone and answers
    /// both at once. The replacement is listed as unrecorded
    /// (`crate::replacements`) from before the command until its write. An
    /// agent that does not know replacements ignores the field and answers
    /// the teardown alone; the replacement is then spawned on its own.
    async fn teardown_and_replace(self: &Arc<Self>, mandelbox: MandelboxRecord, reason: String) {
        let host_id = &mandelbox.host_id;
        let replacing = self.config.allocation.warm_pool && !self.registry.is_draining(host_id);
        let new = replacing.then(|| pool::new_warm_box(self));
        let mut timeout = Duration::from_millis(self.config.hosts.command_timeout_ms);
        if let Some((new, _)) = &new {
            self.unrecorded.spawning(host_id, new.id);
            timeout += Duration::from_millis(self.config.allocation.spawn_timeout_ms);
        }
        let kind = command::Kind::Teardown(TeardownMandelbox {
            mandelbox_id: mandelbox.id.to_string(),
            reason,
            replacement: new.as_ref().map(|(new, token)| spawn_command(new, token)),
        });
        let result = match self.router.send(host_id, kind, timeout).await {
            Ok(result) => result,
            Err(error) => {
                match &error {
                    RouteError::NotConnected => {
                        tracing::info!(mandelbox_id = %mandelbox.id, %host_id, "host offline; teardown waits for its reconnect");
                    }
                    error => tracing::warn!(mandelbox_id = %mandelbox.id, %host_id, %error, "teardown not confirmed"),
                }
                if let Some((new, _)) = new {
                    self.unrecorded.settled(new.id);
                    // A host that answers late may still start it.
                    if matches!(error, RouteError::Timeout(_)) {
                        self.teardown_unrecorded(host_id, new.id).await;
                    }
                }
                return;
            }
        };
        let replacement = match (new, result.replacement) {
            (None, _) => None,
            (Some((new, _)), Some(outcome)) if outcome.spawned => Some(warm_replacement(new, &result.ports)),
            (Some((new, _)), Some(outcome)) => {
                tracing::warn!(%host_id, mandelbox_id = %new.id, error = %outcome.error, "replacement not spawned");
                self.unrecorded.settled(new.id);
                None
            }
            (Some((new, token)), None) => self.spawn_replacement(host_id, new, token).await,
        };
        self.record_teardown(&mandelbox, replacement).await;
    }

    /// The host confirmed a teardown, and spawned the replacement if there is
    /// one (the DYING box kept the slot meanwhile): one bookkeeping write marks
    /// the box DEAD and inserts the replacement WAITING
    /// (`Store::recycle_torn_down`). A replacement the store refuses (the box
    /// was written off meanwhile, the host drains or is full) is torn down
    /// again; a box that was not DYING any more goes through
    /// `mandelbox_finished`; a slot left empty is refilled by the host's
    /// filler.
    async fn record_teardown(self: &Arc<Self>, mandelbox: &MandelboxRecord, replacement: Option<WarmReplacement>) {
        let host_id = &mandelbox.host_id;
        let recycled = self
            .bookkeeping
            .torn_down(TornDown { host_id: host_id.clone(), id: mandelbox.id, replacement: replacement.clone() })
            .await;
        let exited = replacement.as_ref().is_some_and(|warm| self.unrecorded.settled(warm.id));
        let (finished, recorded) = match recycled {
            Ok(Recycled { finished, replacement }) => (finished, replacement),
            Err(error) => {
                tracing::warn!(mandelbox_id = %mandelbox.id, %error, "could not record teardown");
                (true, None)
            }
        };
        match (recorded, &replacement) {
            (Some(recorded), _) if exited => {
                tracing::info!(%host_id, mandelbox_id = %recorded.id, "replacement exited before it was recorded");
                self.finish_exited(recorded.id).await;
            }
            (Some(recorded), _) => {
                tracing::debug!(%host_id, mandelbox_id = %recorded.id, "warm replacement ready");
                self.events.publish(Event::MandelboxWarm { region: recorded.region });
                return;
            }
            (None, Some(refused)) if !exited => self.teardown_unrecorded(host_id, refused.id).await,
            (None, _) => {}
        }
        if !finished
            && let Err(error) =
                self.store.mandelbox_finished(mandelbox.id, MandelboxState::Dead, EndReason::MandelboxExited).await
        {
            tracing::warn!(mandelbox_id = %mandelbox.id, %error, "could not record teardown");
        }
        if !self.registry.is_draining(host_id) {
            self.registry.refill(host_id);
        }
    }

    /// Spawns a torn-down box's replacement with a command of its own (for an
    /// agent that does not know replacements); the caller listed it as
    /// unrecorded. None if the host did not confirm.
    async fn spawn_replacement(&self, host_id: &str, new: NewMandelbox, token: String) -> Option<WarmReplacement> {
        let timeout = Duration::from_millis(self.config.allocation.spawn_timeout_ms);
        let kind = command::Kind::Spawn(spawn_command(&new, &token));
        match self.router.send(host_id, kind, timeout).await {
            Ok(result) => Some(warm_replacement(new, &result.ports)),
            Err(error) => {
                tracing::warn!(%host_id, mandelbox_id = %new.id, %error, "replacement spawn failed");
                self.unrecorded.settled(new.id);
                // A host that answers late may still start it.
                if matches!(error, RouteError::Timeout(_)) {
                    self.teardown_unrecorded(host_id, new.id).await;
                }
                None
            }
        }
    }

    /// Tears down a box its host runs and the database does not hold (a
    /// refused replacement); what it was is of no further interest.
    async fn teardown_unrecorded(&self, host_id: &str, id: Uuid) {
        let timeout = Duration::from_millis(self.config.hosts.command_timeout_ms);
        let kind = command::Kind::Teardown(TeardownMandelbox {
            mandelbox_id: id.to_string(),
            reason: "replacement not recorded".to_owned(),
            replacement: None,
        });
        if let Err(error) = self.router.send(host_id, kind, timeout).await {
            tracing::debug!(%host_id, mandelbox_id = %id, %error, "teardown of an unrecorded replacement failed");
        }
    }

    /// A box the host said exited before it was recorded: DEAD now.
    async fn finish_exited(&self, id: Uuid) {
        if let Err(error) = self.store.mandelbox_finished(id, MandelboxState::Dead, EndReason::MandelboxExited).await {
            tracing::warn!(mandelbox_id = %id, %error, "could not record exit");
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

/// The command that starts a warm box (its disconnect token goes only to the host).
fn spawn_command(new: &NewMandelbox, token: &str) -> SpawnMandelbox {
    SpawnMandelbox { mandelbox_id: new.id.to_string(), app: new.app.clone(), disconnect_token: token.to_owned() }
}

/// A replacement the host confirmed, with the ports it published.
fn warm_replacement(new: NewMandelbox, ports: &[switchboard_proto::v1::Port]) -> WarmReplacement {
    WarmReplacement {
        id: new.id,
        app: new.app,
        token_hash: new.token_hash,
        ports: ports.iter().filter_map(port_from_proto).collect(),
    }
}
