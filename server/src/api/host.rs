//! `switchboard.v1.HostService`: the host stream; see `fleet::connection`.

use switchboard_proto::v1::{HostMessage, host_service_server::HostService};
use tonic::{Request, Response, Status, Streaming};

use crate::fleet::connection::{ControlStream, Fleet};

pub struct HostApi {
    pub fleet: Fleet,
}

#[tonic::async_trait]
impl HostService for HostApi {
    type ConnectStream = ControlStream;

    async fn connect(&self, request: Request<Streaming<HostMessage>>) -> Result<Response<ControlStream>, Status> {
        Ok(Response::new(self.fleet.connect(request.into_inner()).await?))
    }
}
