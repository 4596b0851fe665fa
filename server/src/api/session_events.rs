//! `switchboard.v1.SessionEventsService`, called from inside mandelboxes.

use switchboard_proto::v1::{
    ReportDisconnectRequest, ReportDisconnectResponse, session_events_service_server::SessionEventsService,
};
use tonic::{Request, Response, Status};

use crate::sessions::Sessions;

pub struct SessionEventsApi {
    pub sessions: Sessions,
}

#[tonic::async_trait]
impl SessionEventsService for SessionEventsApi {
    async fn report_disconnect(
        &self,
        request: Request<ReportDisconnectRequest>,
    ) -> Result<Response<ReportDisconnectResponse>, Status> {
        let request = request.into_inner();
        let session_id = self.sessions.report_disconnect(&request.mandelbox_id, &request.token).await?;
        Ok(Response::new(ReportDisconnectResponse { session_id: session_id.to_string() }))
    }
}
