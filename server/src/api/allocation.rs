//! `switchboard.v1.AllocationService`; error codes are documented in the proto.

use switchboard_proto::v1::{
    AllocateRequest, AllocateResponse, EndSessionRequest, GetSessionRequest, Session, WatchSessionRequest,
    allocation_service_server::AllocationService,
};
use tonic::{Request, Response, Status};

use crate::{
    allocation::Allocator,
    auth::Principal,
    sessions::{SessionUpdates, Sessions},
};

pub struct AllocationApi {
    pub allocator: Allocator,
    pub sessions: Sessions,
}

#[tonic::async_trait]
impl AllocationService for AllocationApi {
    async fn allocate(&self, request: Request<AllocateRequest>) -> Result<Response<AllocateResponse>, Status> {
        let principal = Principal::from_request(&request)?;
        Ok(Response::new(self.allocator.allocate(&principal, request.into_inner()).await?))
    }

    async fn get_session(&self, request: Request<GetSessionRequest>) -> Result<Response<Session>, Status> {
        let principal = Principal::from_request(&request)?;
        Ok(Response::new(self.sessions.get(&principal, &request.get_ref().session_id).await?))
    }

    type WatchSessionStream = SessionUpdates;

    async fn watch_session(&self, request: Request<WatchSessionRequest>) -> Result<Response<SessionUpdates>, Status> {
        let principal = Principal::from_request(&request)?;
        Ok(Response::new(self.sessions.watch(&principal, &request.get_ref().session_id).await?))
    }

    async fn end_session(&self, request: Request<EndSessionRequest>) -> Result<Response<Session>, Status> {
        let principal = Principal::from_request(&request)?;
        Ok(Response::new(self.sessions.end(&principal, &request.get_ref().session_id).await?))
    }
}
