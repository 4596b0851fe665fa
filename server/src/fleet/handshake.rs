//! Hello/Welcome: the first message of a host stream must be a Hello, within a
//! timeout, with a credential issued for the host id it claims.

use std::time::Duration;

use switchboard_proto::v1::{Hello, HostMessage, host_message};
use tonic::Streaming;

use crate::{
    auth::host_credential::HostCredentials,
    error::{ApiError, ApiResult},
    model::HostHello,
};

const MAX_HOST_ID_LEN: usize = 128;
const MAX_CAPACITY: u32 = 1024;
const MAX_TEXT_LEN: usize = 256;

/// Reads the Hello that must open the stream.
pub async fn read_hello(inbound: &mut Streaming<HostMessage>, timeout: Duration) -> ApiResult<Hello> {
    let first = tokio::time::timeout(timeout, inbound.message())
        .await
        .map_err(|_| ApiError::HelloTimeout(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX)))?;
    match first {
        Ok(Some(HostMessage { body: Some(host_message::Body::Hello(hello)) })) => Ok(hello),
        Ok(_) => Err(ApiError::HelloRequired),
        Err(status) => Err(ApiError::InvalidRequest(format!("host stream failed before Hello: {}", status.message()))),
    }
}

fn is_valid_host_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_HOST_ID_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Checks the Hello's fields and credential; returns what the store records.
pub fn check_hello(hello: &Hello, credentials: &HostCredentials) -> ApiResult<HostHello> {
    if !is_valid_host_id(&hello.host_id) {
        return Err(ApiError::InvalidRequest("host_id must be 1-128 characters of [A-Za-z0-9._-]".into()));
    }
    // Before anything else about the host is believed.
    if !credentials.verify(&hello.host_id, &hello.credential) {
        return Err(ApiError::BadHostCredential(hello.host_id.clone()));
    }
    if !crate::allocation::is_valid_name(&hello.region) {
        return Err(ApiError::InvalidRequest(format!("region {:?} is not a valid name", hello.region)));
    }
    if hello.capacity > MAX_CAPACITY {
        return Err(ApiError::InvalidRequest(format!("capacity {} is over {MAX_CAPACITY}", hello.capacity)));
    }
    for (field, value) in
        [("image", &hello.image), ("agent_version", &hello.agent_version), ("address", &hello.address)]
    {
        if value.len() > MAX_TEXT_LEN {
            return Err(ApiError::InvalidRequest(format!("{field} is longer than {MAX_TEXT_LEN}")));
        }
    }
    if hello.address.is_empty() {
        return Err(ApiError::InvalidRequest("address must not be empty".into()));
    }
    Ok(HostHello {
        host_id: hello.host_id.clone(),
        region: hello.region.clone(),
        image: hello.image.clone(),
        agent_version: hello.agent_version.clone(),
        address: hello.address.clone(),
        capacity: hello.capacity,
    })
}
