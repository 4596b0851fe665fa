//! Fleet administration for operators and the deploy pipeline.

use std::time::Duration;

use switchboard_proto::v1::{self as pb};
use uuid::Uuid;

use crate::{
    allocation::is_valid_name,
    api::convert,
    core::SharedCore,
    error::{ApiError, ApiResult},
    maintenance::MaintenanceState,
    model::{InstanceType, OperationState, Region, RegionScaling},
    regions::RegionCache,
    scaling::rollout,
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
        let drained = self
            .core
            .drain_host(&host_id, "operator request")
            .await?
            .ok_or_else(|| ApiError::HostNotFound(host_id.clone()))?;
        let summary =
            self.core.store.host_summary(&drained.id).await?.ok_or_else(|| ApiError::HostNotFound(host_id.clone()))?;
        Ok(convert::host(&summary, self.core.registry.is_connected(&host_id)))
    }

    pub async fn list_regions(&self) -> ApiResult<pb::ListRegionsResponse> {
        let regions = self.core.store.list_regions().await?;
        Ok(pb::ListRegionsResponse {
            regions: regions
                .iter()
                .map(|region| convert::region(region, self.core.scaling.status(&region.name).as_ref()))
                .collect(),
        })
    }

    pub async fn put_region(&self, request: pb::RegionInfo) -> ApiResult<pb::RegionInfo> {
        let region = validate_region(request)?;
        let stored = self.core.store.put_region(&region).await?;
        self.regions.invalidate();
        self.core.scaling.wake(&stored.name);
        tracing::info!(
            region = %stored.name,
            enabled = stored.enabled,
            image = %stored.image,
            buffer = stored.scaling.buffer,
            min_instances = stored.scaling.min_instances,
            max_instances = stored.scaling.max_instances,
            instance_types = stored.scaling.instance_types.len(),
            "region updated"
        );
        Ok(convert::region(&stored, self.core.scaling.status(&stored.name).as_ref()))
    }

    pub async fn list_instances(&self, request: pb::ListInstancesRequest) -> ApiResult<pb::ListInstancesResponse> {
        let region = Some(request.region.as_str()).filter(|region| !region.is_empty());
        let instances = self.core.store.list_instances(region, request.include_terminated).await?;
        Ok(pb::ListInstancesResponse { instances: instances.iter().map(convert::instance).collect() })
    }

    pub async fn start_rollout(&self, request: pb::StartRolloutRequest) -> ApiResult<pb::Operation> {
        let timeout = Some(Duration::from_secs(u64::from(request.timeout_secs))).filter(|t| !t.is_zero());
        let operation = rollout::start_rollout(&self.core, &self.core.scaling, &request.image, timeout).await?;
        Ok(convert::operation(&operation))
    }

    pub async fn get_operation(&self, request: pb::GetOperationRequest) -> ApiResult<pb::Operation> {
        let record = self.operation(&request.id).await?;
        Ok(convert::operation(&record))
    }

    async fn operation(&self, id: &str) -> ApiResult<crate::model::OperationRecord> {
        let id =
            Uuid::parse_str(id).map_err(|_| ApiError::InvalidRequest(format!("operation id {id:?} is not a UUID")))?;
        self.core.store.get_operation(id).await?.ok_or(ApiError::OperationNotFound)
    }

    pub async fn list_operations(&self, request: pb::ListOperationsRequest) -> ApiResult<pb::ListOperationsResponse> {
        let operations = self.core.store.list_operations(request.running_only, request.limit).await?;
        Ok(pb::ListOperationsResponse { operations: operations.iter().map(convert::operation).collect() })
    }

    /// The operation now, then at every change (polled: operations change at
    /// most a few times a second), until it finishes or the client goes.
    pub async fn watch_operation(
        &self,
        request: pb::GetOperationRequest,
    ) -> ApiResult<tokio_stream::wrappers::ReceiverStream<Result<pb::Operation, tonic::Status>>> {
        let first = self.operation(&request.id).await?;
        let (sender, receiver) = tokio::sync::mpsc::channel(8);
        let store = self.core.store.clone();
        tokio::spawn(async move {
            let mut last = first;
            if sender.send(Ok(convert::operation(&last))).await.is_err() {
                return;
            }
            while last.state == OperationState::Running {
                tokio::select! {
                    _ = sender.closed() => return,
                    _ = tokio::time::sleep(WATCH_POLL) => {}
                }
                let current = match store.get_operation(last.id).await {
                    Ok(Some(current)) => current,
                    Ok(None) => return,
                    Err(error) => {
                        let _ = sender.send(Err(ApiError::from(error).into())).await;
                        return;
                    }
                };
                if current != last {
                    if sender.send(Ok(convert::operation(&current))).await.is_err() {
                        return;
                    }
                    last = current;
                }
            }
        });
        Ok(tokio_stream::wrappers::ReceiverStream::new(receiver))
    }
}

impl Admin {
    pub async fn set_maintenance(
        &self,
        admin: &str,
        request: pb::SetMaintenanceRequest,
    ) -> ApiResult<pb::MaintenanceStatus> {
        let state = if request.enabled {
            if request.reason.len() > 512 {
                return Err(ApiError::InvalidRequest("reason is longer than 512 characters".into()));
            }
            if request.retry_after_secs > 24 * 3600 {
                return Err(ApiError::InvalidRequest("retry_after_secs is more than a day".into()));
            }
            Some(MaintenanceState {
                reason: if request.reason.is_empty() { "maintenance".into() } else { request.reason },
                retry_after_secs: if request.retry_after_secs == 0 { 60 } else { request.retry_after_secs },
                since: chrono::Utc::now(),
                set_by: admin.to_owned(),
            })
        } else {
            None
        };
        let state = self.core.maintenance.set(state).await?;
        Ok(maintenance_status(state.as_ref()))
    }

    pub fn get_maintenance(&self) -> pb::MaintenanceStatus {
        maintenance_status(self.core.maintenance.current().as_ref())
    }
}

fn maintenance_status(state: Option<&MaintenanceState>) -> pb::MaintenanceStatus {
    match state {
        Some(state) => pb::MaintenanceStatus {
            enabled: true,
            reason: state.reason.clone(),
            retry_after_secs: state.retry_after_secs,
            since: Some(convert::timestamp(state.since)),
            set_by: state.set_by.clone(),
        },
        None => pb::MaintenanceStatus::default(),
    }
}

const WATCH_POLL: Duration = Duration::from_millis(250);
const MAX_INSTANCES: u32 = 10_000;

/// A PutRegion request as a region, or why not.
fn validate_region(request: pb::RegionInfo) -> ApiResult<Region> {
    let invalid = |message: String| Err(ApiError::InvalidRequest(message));
    if !is_valid_name(&request.name) {
        return invalid(format!("region name {:?} is not valid", request.name));
    }
    if request.image.len() > 256 || !request.image.chars().all(|c| c.is_ascii_graphic()) {
        return invalid("image must be at most 256 printable ASCII characters".into());
    }
    if request.max_instances > MAX_INSTANCES {
        return invalid(format!("max_instances must be at most {MAX_INSTANCES}"));
    }
    if request.min_instances > request.max_instances && !request.instance_types.is_empty() {
        return invalid(format!(
            "min_instances ({}) is above max_instances ({})",
            request.min_instances, request.max_instances
        ));
    }
    if request.instance_types.len() > 8 {
        return invalid("at most 8 instance types".into());
    }
    let mut instance_types = Vec::with_capacity(request.instance_types.len());
    for instance_type in request.instance_types {
        let name_ok = !instance_type.name.is_empty()
            && instance_type.name.len() <= 64
            && instance_type.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !name_ok {
            return invalid(format!("instance type {:?} is not a valid name", instance_type.name));
        }
        if instance_type.capacity == 0 || instance_type.capacity > 1024 {
            return invalid(format!("instance type {}: capacity must be 1 to 1024", instance_type.name));
        }
        instance_types.push(InstanceType { name: instance_type.name, capacity: instance_type.capacity });
    }
    Ok(Region {
        name: request.name,
        enabled: request.enabled,
        image: request.image,
        scaling: RegionScaling {
            buffer: request.buffer,
            min_instances: request.min_instances,
            max_instances: request.max_instances,
            instance_types,
        },
    })
}
