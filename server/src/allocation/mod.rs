//! Allocation: validate the request, claim a warm box atomically (one commit,
//! session and box RUNNING), have its host confirm, answer in one round trip.
//! With no warm box: spawn on a host with free capacity and wait, or leave a
//! pending session that the dispatcher fulfils when a box warms, or refuse with
//! NO_CAPACITY.

mod dispatcher;
mod pending;
mod request;

pub use dispatcher::Dispatcher;
pub use pending::{AssignmentSecrets, PendingSessions};
pub use request::{AllocationInput, is_valid_name, validate_request};

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use switchboard_proto::v1::{AllocateResponse, AssignMandelbox, SpawnMandelbox, command};
use uuid::Uuid;

use crate::{
    auth::{Principal, mandelbox_token},
    core::SharedCore,
    error::{ApiError, ApiResult},
    fleet::RouteError,
    model::{EndReason, MandelboxState, PortSpec, SessionRecord, SessionState},
    regions::RegionCache,
    scaling::DynCapacityPlanner,
    store::{Claim, ClaimOutcome, NewMandelbox, NewSession},
};

#[derive(Clone)]
pub struct Allocator {
    core: SharedCore,
    regions: RegionCache,
    pending: PendingSessions,
    planner: DynCapacityPlanner,
    minimum_version: Arc<semver::Version>,
}

/// What a confirmed assignment gives the client.
#[derive(Debug)]
pub struct Assigned {
    pub session: SessionRecord,
    pub host_address: String,
    pub ports: Vec<PortSpec>,
    pub session_key: String,
}

enum AssignError {
    /// This box failed; another may work.
    Retry,
    Fatal(ApiError),
}

impl Allocator {
    pub fn new(
        core: SharedCore,
        regions: RegionCache,
        pending: PendingSessions,
        planner: DynCapacityPlanner,
    ) -> anyhow::Result<Self> {
        let minimum_version = semver::Version::parse(&core.config.allocation.min_client_version)
            .map_err(|error| anyhow::anyhow!("allocation.min_client_version is not a semantic version: {error}"))?;
        Ok(Allocator { core, regions, pending, planner, minimum_version: Arc::new(minimum_version) })
    }

    pub fn pending(&self) -> &PendingSessions {
        &self.pending
    }

    pub async fn allocate(
        &self,
        principal: &Principal,
        request: switchboard_proto::v1::AllocateRequest,
    ) -> ApiResult<AllocateResponse> {
        let started = Instant::now();
        let answer = self.allocate_from(started, principal, request).await;
        self.core.metrics.allocate.handler.record_since(started);
        answer
    }

    #[tracing::instrument(skip_all, fields(user_id = %principal.user_id(), session_id = tracing::field::Empty))]
    async fn allocate_from(
        &self,
        started: Instant,
        principal: &Principal,
        request: switchboard_proto::v1::AllocateRequest,
    ) -> ApiResult<AllocateResponse> {
        self.core.maintenance.refuse_if_on()?;
        let config = &self.core.config.allocation;
        let input = validate_request(request, config)?;
        if input.client_version < *self.minimum_version {
            return Err(ApiError::ClientOutdated {
                got: input.client_version.to_string(),
                minimum: self.minimum_version.to_string(),
            });
        }
        let regions = self.regions.enabled_in_order(&input.regions).await?;
        let new = NewSession {
            id: Uuid::now_v7(),
            user_id: principal.user_id().to_owned(),
            app: input.app.clone(),
            client_version: input.client_version.to_string(),
            regions,
        };
        tracing::Span::current().record("session_id", tracing::field::display(new.id));
        let secrets = AssignmentSecrets {
            user_id: new.user_id.clone(),
            client_data_json: input.client_data_json,
            config_encryption_token: input.config_encryption_token,
        };
        self.core.metrics.allocate.checks.record_since(started);
        let outcome = self.core.session_claims.create_and_claim(new).await?;
        let (session, claim) = match outcome {
            ClaimOutcome::Claimed(claim) => {
                // A warm box fewer: the region's scaler tops the buffer up.
                self.core.scaling.wake(&claim.host.region);
                (claim.session.clone(), Some(claim))
            }
            ClaimOutcome::Pending(session) => (session, None),
        };
        self.fulfil(session, claim, &secrets).await
    }

    /// Drives a session to RUNNING: assign (retrying other boxes), spawn on
    /// demand, then pending or NO_CAPACITY.
    async fn fulfil(
        &self,
        session: SessionRecord,
        mut claim: Option<Claim>,
        secrets: &AssignmentSecrets,
    ) -> ApiResult<AllocateResponse> {
        let config = &self.core.config.allocation;
        let mut excluded_hosts: Vec<String> = Vec::new();
        let mut attempts = 0;
        let mut spawned_on_demand = false;
        loop {
            if claim.is_none() && !spawned_on_demand {
                spawned_on_demand = true;
                claim = self.spawn_on_demand(&session, &excluded_hosts).await?;
            }
            let Some(current) = claim.take() else {
                return self.pending_or_no_capacity(session, secrets).await;
            };
            attempts += 1;
            let assigning = Instant::now();
            let assigned = self.assign(&current, secrets).await;
            self.core.metrics.allocate.assign.record_since(assigning);
            match assigned {
                Ok(assigned) => {
                    self.core.publish_change(assigned.change());
                    return Ok(response(assigned));
                }
                Err(AssignError::Fatal(error)) => return Err(error),
                Err(AssignError::Retry) if attempts >= config.max_assign_attempts => {
                    self.core.end_session(session.id, EndReason::AssignFailed).await?;
                    return Err(ApiError::AllocationTimeout);
                }
                Err(AssignError::Retry) => {
                    excluded_hosts.push(current.host.id.clone());
                    claim = self.core.store.claim_for_session(session.id, &excluded_hosts).await?;
                }
            }
        }
    }

    /// Sends Assign to the claimed box's host and records the confirmation.
    /// On failure the claim is released (session back to PENDING).
    async fn assign(&self, claim: &Claim, secrets: &AssignmentSecrets) -> Result<Assigned, AssignError> {
        let core = &self.core;
        let timeout = Duration::from_millis(core.config.allocation.assign_timeout_ms);
        let kind = command::Kind::Assign(AssignMandelbox {
            mandelbox_id: claim.mandelbox.id.to_string(),
            session_id: claim.session.id.to_string(),
            user_id: secrets.user_id.clone(),
            client_data_json: secrets.client_data_json.clone(),
            config_encryption_token: secrets.config_encryption_token.clone(),
        });
        match core.router.send(&claim.host.id, kind, timeout).await {
            Ok(result) => {
                // Allocate's own claim is written RUNNING with the claim (one
                // commit on the client's path); a pending session's claim is
                // confirmed here, before its watcher hears of it.
                let session = if claim.session.state == SessionState::Running {
                    claim.session.clone()
                } else {
                    let confirmed = core
                        .store
                        .confirm_assignment(claim.session.id, claim.mandelbox.id)
                        .await
                        .map_err(|error| AssignError::Fatal(error.into()))?;
                    // None: ended while the host was confirming (EndSession raced us).
                    confirmed.ok_or(AssignError::Fatal(ApiError::SessionEnded))?
                };
                let ports = if result.ports.is_empty() {
                    claim.mandelbox.ports.clone()
                } else {
                    result.ports.iter().filter_map(crate::api::convert::port_from_proto).collect()
                };
                tracing::info!(session_id = %session.id, mandelbox_id = %claim.mandelbox.id, host_id = %claim.host.id, "session running");
                Ok(Assigned {
                    session,
                    host_address: claim.host.address.clone(),
                    ports,
                    session_key: result.session_key,
                })
            }
            Err(error) => {
                tracing::warn!(host_id = %claim.host.id, mandelbox_id = %claim.mandelbox.id, %error, "assignment not confirmed; releasing the claim");
                // A host that is gone cannot hold the box; one that answered
                // late or refused may, so it is told to tear it down.
                let box_state = match error {
                    RouteError::NotConnected | RouteError::Gone => MandelboxState::Lost,
                    RouteError::Timeout(_) | RouteError::Refused(_) | RouteError::Unavailable(_) => {
                        MandelboxState::Dying
                    }
                };
                core.store
                    .release_claim(claim.session.id, claim.mandelbox.id, box_state)
                    .await
                    .map_err(|error| AssignError::Fatal(error.into()))?;
                if box_state == MandelboxState::Dying {
                    let mut dying = claim.mandelbox.clone();
                    dying.state = MandelboxState::Dying;
                    core.spawn_teardown(dying, "assignment not confirmed");
                }
                Err(AssignError::Retry)
            }
        }
    }

    /// No warm box: start one for this session on a host with free capacity
    /// and wait for it (bounded).
    async fn spawn_on_demand(&self, session: &SessionRecord, excluded_hosts: &[String]) -> ApiResult<Option<Claim>> {
        let core = &self.core;
        let token = mandelbox_token::generate();
        let new = NewMandelbox {
            id: Uuid::now_v7(),
            app: session.app.clone(),
            token_hash: mandelbox_token::hash(&token),
            session_id: Some(session.id),
        };
        let Some(reserved) =
            core.store.reserve_mandelbox_in_regions(&session.requested_regions, excluded_hosts, &new).await?
        else {
            return Ok(None);
        };
        let timeout = Duration::from_millis(core.config.allocation.spawn_timeout_ms);
        let kind = command::Kind::Spawn(SpawnMandelbox {
            mandelbox_id: reserved.id.to_string(),
            app: reserved.app.clone(),
            disconnect_token: token,
        });
        tracing::info!(session_id = %session.id, host_id = %reserved.host_id, "no warm box; spawning on demand");
        match core.router.send(&reserved.host_id, kind, timeout).await {
            Ok(result) => {
                let ports: Vec<PortSpec> =
                    result.ports.iter().filter_map(crate::api::convert::port_from_proto).collect();
                if core.store.mandelbox_spawned(reserved.id, &ports).await?.is_none() {
                    return Ok(None);
                }
                Ok(core.store.attach_reserved(session.id, reserved.id).await?)
            }
            Err(error) => {
                tracing::warn!(host_id = %reserved.host_id, %error, "on-demand spawn failed");
                core.store.mandelbox_finished(reserved.id, MandelboxState::Dead, EndReason::AssignFailed).await?;
                Ok(None)
            }
        }
    }

    async fn pending_or_no_capacity(
        &self,
        session: SessionRecord,
        secrets: &AssignmentSecrets,
    ) -> ApiResult<AllocateResponse> {
        let coming = self.planner.capacity_coming(&session.requested_regions).await?;
        if coming {
            tracing::info!(session_id = %session.id, "no warm box yet; session pending");
            self.pending.insert(session.id, session.requested_regions.clone(), secrets.clone());
            return Ok(AllocateResponse {
                session_id: session.id.to_string(),
                state: switchboard_proto::v1::SessionState::Pending as i32,
                ..Default::default()
            });
        }
        self.core.end_session(session.id, EndReason::NoCapacity).await?;
        Err(ApiError::NoCapacity(session.requested_regions))
    }

    /// Tries to fulfil a pending session of this replica with a newly warm
    /// box. Returns whether it got one.
    pub async fn fulfil_pending(&self, session_id: Uuid) -> ApiResult<bool> {
        let Some(secrets) = self.pending.secrets(session_id) else {
            return Ok(false);
        };
        let Some(claim) = self.core.store.claim_for_session(session_id, &[]).await? else {
            // Forget sessions that ended meanwhile (expired, or ended by the user).
            let still_pending = self
                .core
                .store
                .get_session(session_id)
                .await?
                .is_some_and(|session| session.state == crate::model::SessionState::Pending);
            if !still_pending {
                self.pending.remove(session_id);
            }
            return Ok(false);
        };
        match self.assign(&claim, &secrets).await {
            Ok(assigned) => {
                self.pending.remove(session_id);
                // The key waits for the owner's watcher, which this publish wakes.
                let change = assigned.change();
                self.pending.hand_over_key(session_id, assigned.session_key);
                self.core.publish_change(change);
                Ok(true)
            }
            Err(AssignError::Retry) => Ok(false),
            Err(AssignError::Fatal(ApiError::SessionEnded)) => {
                self.pending.remove(session_id);
                Ok(false)
            }
            Err(AssignError::Fatal(error)) => Err(error),
        }
    }
}

impl Assigned {
    /// The event for watchers, from what the assignment already knows (no lookups).
    fn change(&self) -> crate::events::SessionChange {
        crate::events::SessionChange {
            session: self.session.clone(),
            host_address: Some(self.host_address.clone()),
            ports: self.ports.clone(),
        }
    }
}

fn response(assigned: Assigned) -> AllocateResponse {
    AllocateResponse {
        session_id: assigned.session.id.to_string(),
        mandelbox_id: assigned.session.mandelbox_id.map(|id| id.to_string()).unwrap_or_default(),
        host_address: assigned.host_address,
        ports: assigned.ports.iter().map(crate::api::convert::port_to_proto).collect(),
        session_key: assigned.session_key,
        region: assigned.session.region.clone().unwrap_or_default(),
        state: switchboard_proto::v1::SessionState::Running as i32,
    }
}
