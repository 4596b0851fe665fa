//! `switchboard.v1.AdminService`; needs scope `admin` (checked by the policy layer).

use switchboard_proto::v1::{self as pb, admin_service_server::AdminService};
use tonic::{Request, Response, Status};

use crate::admin::Admin;

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
}
