//! Fleet administration for operators and the deploy pipeline.

use std::time::Duration;

use switchboard_proto::v1::{self as pb, DrainHost, command};

use crate::{
    allocation::is_valid_name,
    api::convert,
    core::SharedCore,
    error::{ApiError, ApiResult},
    model::{EndReason, MandelboxState, Region},
    regions::RegionCache,
    store::{MandelboxFilter, SessionFilter},
};

#[derive(Clone)]
pub struct Admin {
    core: SharedCore,
    regions: RegionCache,
}

const DEFAULT_LIST_LIMIT: u32 = 100;
const MAX_LIST_LIMIT: u32 = 1000;

impl Admin {
    pub fn new(core: SharedCore, regions: RegionCache) -> Self {
        Admin { core, regions }
    }

    pub async fn list_hosts(&self, request: pb::ListHostsRequest) -> ApiResult<pb::ListHostsResponse> {
        let region = Some(request.region.as_str()).filter(|region| !region.is_empty());
        let hosts = self.core.store.list_hosts(region).await?;
        Ok(pb::ListHostsResponse {
            hosts: hosts
                .iter()
                .map(|summary| convert::host(summary, self.core.registry.is_connected(&summary.host.id)))
                .collect(),
        })
    }

    pub async fn list_mandelboxes(
        &self,
        request: pb::ListMandelboxesRequest,
    ) -> ApiResult<pb::ListMandelboxesResponse> {
        let state = convert::mandelbox_state_from_proto(request.state)
            .ok_or_else(|| ApiError::InvalidRequest(format!("unknown mandelbox state {}", request.state)))?;
        let filter = MandelboxFilter {
            host_id: Some(request.host_id).filter(|id| !id.is_empty()),
            state,
            include_finished: request.include_finished,
        };
        let boxes = self.core.store.list_mandelboxes(&filter).await?;
        Ok(pb::ListMandelboxesResponse { mandelboxes: boxes.iter().map(convert::mandelbox).collect() })
    }

    pub async fn list_sessions(&self, request: pb::ListSessionsRequest) -> ApiResult<pb::ListSessionsResponse> {
        let limit = match request.limit {
            0 => DEFAULT_LIST_LIMIT,
            limit => limit.min(MAX_LIST_LIMIT),
        };
        let filter = SessionFilter {
            user_id: Some(request.user_id).filter(|id| !id.is_empty()),
            include_ended: request.include_ended,
            limit,
        };
        let sessions = self.core.store.list_sessions(&filter).await?;
        let mut out = Vec::with_capacity(sessions.len());
        for session in &sessions {
            out.push(convert::session(&self.core.session_change(session).await));
        }
        Ok(pb::ListSessionsResponse { sessions: out })
    }

    /// No new sessions on the host; its warm boxes are torn down; running
    /// sessions finish normally.
    pub async fn drain_host(&self, request: pb::DrainHostRequest) -> ApiResult<pb::HostInfo> {
        let host_id = request.host_id;
        let drained =
            self.core.store.drain_host(&host_id).await?.ok_or_else(|| ApiError::HostNotFound(host_id.clone()))?;
        tracing::info!(%host_id, "draining host");
        let timeout = Duration::from_millis(self.core.config.hosts.command_timeout_ms);
        let drain = command::Kind::Drain(DrainHost { reason: "operator request".into() });
        if let Err(error) = self.core.router.send(&host_id, drain, timeout).await {
            tracing::warn!(%host_id, %error, "host did not confirm drain");
        }
        let idle =
            self.core.store.host_mandelboxes(&host_id, &[MandelboxState::Waiting, MandelboxState::Spawning]).await?;
        for mandelbox in idle {
            if let Some((before, _)) =
                self.core.store.mandelbox_finished(mandelbox.id, MandelboxState::Dead, EndReason::HostDrained).await?
            {
                self.core.spawn_teardown(before, "host draining");
            }
        }
        let summary = self
            .core
            .store
            .list_hosts(Some(&drained.region))
            .await?
            .into_iter()
            .find(|summary| summary.host.id == host_id)
            .ok_or_else(|| ApiError::HostNotFound(host_id.clone()))?;
        Ok(convert::host(&summary, self.core.registry.is_connected(&host_id)))
    }

    pub async fn list_regions(&self) -> ApiResult<pb::ListRegionsResponse> {
        let regions = self.core.store.list_regions().await?;
        Ok(pb::ListRegionsResponse { regions: regions.iter().map(convert::region).collect() })
    }

    pub async fn put_region(&self, request: pb::RegionInfo) -> ApiResult<pb::RegionInfo> {
        if !is_valid_name(&request.name) {
            return Err(ApiError::InvalidRequest(format!("region name {:?} is not valid", request.name)));
        }
        if request.image.len() > 256 {
            return Err(ApiError::InvalidRequest("image is longer than 256 characters".into()));
        }
        let region = Region { name: request.name, enabled: request.enabled, image: request.image };
        let stored = self.core.store.put_region(&region).await?;
        self.regions.invalidate();
        tracing::info!(region = %stored.name, enabled = stored.enabled, image = %stored.image, "region updated");
        Ok(convert::region(&stored))
    }
}
