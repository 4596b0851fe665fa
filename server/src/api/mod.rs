//! gRPC services. Each handler delegates in one line to domain code; errors
//! become statuses through `From<ApiError> for Status`.

pub mod account;
pub mod admin;
pub mod allocation;
pub mod convert;
pub mod host;
pub mod session_events;
