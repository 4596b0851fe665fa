//! `switchboard.v1.AdminService`; needs scope `admin` (checked by the policy layer).

use switchboard_proto::v1::{self as pb, admin_service_server::AdminService};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::{admin::Admin, auth::Principal};

pub struct AdminApi {
    pub admin: Admin,
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn list_hosts(
        &self,
        request: Request<pb::ListHostsRequest>,
    ) -> Result<Response<pb::ListHostsResponse>, Status> {
        Ok(Response::new(self.admin.list_hosts(request.into_inner()).await?))
    }

    async fn list_mandelboxes(
        &self,
        request: Request<pb::ListMandelboxesRequest>,
    ) -> Result<Response<pb::ListMandelboxesResponse>, Status> {
        Ok(Response::new(self.admin.list_mandelboxes(request.into_inner()).await?))
    }

    async fn list_sessions(
        &self,
        request: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        Ok(Response::new(self.admin.list_sessions(request.into_inner()).await?))
    }

    async fn drain_host(&self, request: Request<pb::DrainHostRequest>) -> Result<Response<pb::HostInfo>, Status> {
        Ok(Response::new(self.admin.drain_host(request.into_inner()).await?))
    }

    async fn list_regions(
        &self,
        _request: Request<pb::ListRegionsRequest>,
    ) -> Result<Response<pb::ListRegionsResponse>, Status> {
        Ok(Response::new(self.admin.list_regions().await?))
    }

    async fn put_region(&self, request: Request<pb::RegionInfo>) -> Result<Response<pb::RegionInfo>, Status> {
        Ok(Response::new(self.admin.put_region(request.into_inner()).await?))
    }

    async fn list_instances(
        &self,
        request: Request<pb::ListInstancesRequest>,
    ) -> Result<Response<pb::ListInstancesResponse>, Status> {
        Ok(Response::new(self.admin.list_instances(request.into_inner()).await?))
    }

    async fn start_rollout(
        &self,
        request: Request<pb::StartRolloutRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        Ok(Response::new(self.admin.start_rollout(request.into_inner()).await?))
    }

    async fn get_operation(
        &self,
        request: Request<pb::GetOperationRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        Ok(Response::new(self.admin.get_operation(request.into_inner()).await?))
    }

    async fn list_operations(
        &self,
        request: Request<pb::ListOperationsRequest>,
    ) -> Result<Response<pb::ListOperationsResponse>, Status> {
        Ok(Response::new(self.admin.list_operations(request.into_inner()).await?))
    }

    async fn set_maintenance(
        &self,
        request: Request<pb::SetMaintenanceRequest>,
    ) -> Result<Response<pb::MaintenanceStatus>, Status> {
        let admin = request.extensions().get::<Principal>().map(|p| p.user_id().to_owned()).unwrap_or_default();
        Ok(Response::new(self.admin.set_maintenance(&admin, request.into_inner()).await?))
    }

    async fn get_maintenance(
        &self,
        _request: Request<pb::GetMaintenanceRequest>,
    ) -> Result<Response<pb::MaintenanceStatus>, Status> {
        Ok(Response::new(self.admin.get_maintenance()))
    }

    type WatchOperationStream = ReceiverStream<Result<pb::Operation, Status>>;

    async fn watch_operation(
        &self,
        request: Request<pb::GetOperationRequest>,
    ) -> Result<Response<Self::WatchOperationStream>, Status> {
        Ok(Response::new(self.admin.watch_operation(request.into_inner()).await?))
    }
}
