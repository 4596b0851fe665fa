//! Domain errors and their one mapping to gRPC statuses.
//!
//! The set of codes is deliberately small; each error also carries a stable
//! reason that clients match on. The reason goes in the `x-switchboard-reason`
//! metadata key and starts the message ("NO_CAPACITY: ...").

use tonic::{Code, Status, metadata::MetadataValue};

use crate::store::StoreError;

/// Metadata key that carries the stable reason of an error.
pub const REASON_METADATA_KEY: &str = "x-switchboard-reason";
/// Metadata key with the seconds after which a refused call may be retried.
pub const RETRY_AFTER_METADATA_KEY: &str = "x-switchboard-retry-after-secs";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("unknown region {0:?}")]
    UnknownRegion(String),
    #[error("client version {got} is older than the minimum {minimum}; update the app")]
    ClientOutdated { got: String, minimum: String },
    #[error("none of the requested regions {0:?} is enabled")]
    RegionNotEnabled(Vec<String>),
    #[error("the user already has {limit} live sessions")]
    UserSessionLimit { limit: u32 },
    #[error("no warm mandelbox and no free capacity in {0:?}")]
    NoCapacity(Vec<String>),
    #[error("no host confirmed the assignment in time")]
    AllocationTimeout,
    #[error("session not found")]
    SessionNotFound,
    #[error("the session ended while it was being assigned")]
    SessionEnded,
    #[error("host {0:?} not found")]
    HostNotFound(String),
    #[error("wrong or already used mandelbox token")]
    BadMandelboxToken,
    #[error("the mandelbox has no session")]
    MandelboxNotAssigned,
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("streaming needs an active or trialing subscription (subscription is {0})")]
    SubscriptionRequired(&'static str),
    #[error("the subscription could not be checked: {0}")]
    BillingUnavailable(String),
    #[error("{0}")]
    BillingNotConfigured(String),
    #[error("the first message on a host stream must be Hello")]
    HelloRequired,
    #[error("no Hello within {0} ms")]
    HelloTimeout(u64),
    #[error("the host credential is missing or not valid for host {0:?}")]
    BadHostCredential(String),
    #[error("a newer connection of this host replaced this one")]
    Superseded,
    #[error("the host missed its heartbeats")]
    HeartbeatTimeout,
    #[error("the control plane is shutting down")]
    ShuttingDown,
    #[error("an image rollout is already running")]
    RolloutInProgress,
    #[error("no enabled region has instance types to roll out to")]
    NoScaledRegions,
    #[error("operation not found")]
    OperationNotFound,
    #[error("this host's instance was terminated")]
    HostTerminated,
    #[error("allocations are paused for maintenance ({reason}); retry in {retry_after_secs} s")]
    Maintenance { reason: String, retry_after_secs: u32 },
    #[error("{0}")]
    RedisUnavailable(String),
    #[error("database unavailable")]
    StorageUnavailable,
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    /// The stable, machine-readable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest(_) => "INVALID_REQUEST",
            ApiError::UnknownRegion(_) => "UNKNOWN_REGION",
            ApiError::ClientOutdated { .. } => "CLIENT_OUTDATED",
            ApiError::RegionNotEnabled(_) => "REGION_NOT_ENABLED",
            ApiError::UserSessionLimit { .. } => "USER_SESSION_LIMIT",
            ApiError::NoCapacity(_) => "NO_CAPACITY",
            ApiError::AllocationTimeout => "ALLOCATION_TIMEOUT",
            ApiError::SessionNotFound => "SESSION_NOT_FOUND",
            ApiError::SessionEnded => "SESSION_ENDED",
            ApiError::HostNotFound(_) => "HOST_NOT_FOUND",
            ApiError::BadMandelboxToken => "BAD_MANDELBOX_TOKEN",
            ApiError::MandelboxNotAssigned => "MANDELBOX_NOT_ASSIGNED",
            ApiError::Unauthenticated(_) => "UNAUTHENTICATED",
            ApiError::Forbidden(_) => "FORBIDDEN",
            ApiError::SubscriptionRequired(_) => "SUBSCRIPTION_REQUIRED",
            ApiError::BillingUnavailable(_) => "BILLING_UNAVAILABLE",
            ApiError::BillingNotConfigured(_) => "BILLING_NOT_CONFIGURED",
            ApiError::HelloRequired => "HELLO_REQUIRED",
            ApiError::HelloTimeout(_) => "HELLO_TIMEOUT",
            ApiError::BadHostCredential(_) => "BAD_HOST_CREDENTIAL",
            ApiError::Superseded => "SUPERSEDED",
            ApiError::HeartbeatTimeout => "HEARTBEAT_TIMEOUT",
            ApiError::ShuttingDown => "SHUTTING_DOWN",
            ApiError::RolloutInProgress => "ROLLOUT_IN_PROGRESS",
            ApiError::NoScaledRegions => "NO_SCALED_REGIONS",
            ApiError::OperationNotFound => "OPERATION_NOT_FOUND",
            ApiError::HostTerminated => "HOST_TERMINATED",
            ApiError::Maintenance { .. } => "MAINTENANCE",
            ApiError::RedisUnavailable(_) => "REDIS_UNAVAILABLE",
            ApiError::StorageUnavailable => "STORAGE_UNAVAILABLE",
            ApiError::Internal(_) => "INTERNAL",
        }
    }

    pub fn code(&self) -> Code {
        match self {
            ApiError::InvalidRequest(_) | ApiError::UnknownRegion(_) | ApiError::HelloRequired => Code::InvalidArgument,
            ApiError::ClientOutdated { .. } | ApiError::RegionNotEnabled(_) | ApiError::MandelboxNotAssigned => {
                Code::FailedPrecondition
            }
            ApiError::UserSessionLimit { .. } | ApiError::NoCapacity(_) => Code::ResourceExhausted,
            ApiError::AllocationTimeout | ApiError::HelloTimeout(_) => Code::DeadlineExceeded,
            ApiError::SessionNotFound | ApiError::HostNotFound(_) | ApiError::OperationNotFound => Code::NotFound,
            ApiError::BadMandelboxToken | ApiError::Forbidden(_) | ApiError::SubscriptionRequired(_) => {
                Code::PermissionDenied
            }
            ApiError::BillingNotConfigured(_)
            | ApiError::RolloutInProgress
            | ApiError::NoScaledRegions
            | ApiError::HostTerminated => Code::FailedPrecondition,
            ApiError::BillingUnavailable(_) => Code::Unavailable,
            ApiError::Unauthenticated(_) | ApiError::BadHostCredential(_) => Code::Unauthenticated,
            ApiError::Superseded | ApiError::SessionEnded => Code::Aborted,
            ApiError::HeartbeatTimeout
            | ApiError::ShuttingDown
            | ApiError::StorageUnavailable
            | ApiError::Maintenance { .. }
            | ApiError::RedisUnavailable(_) => Code::Unavailable,
            ApiError::Internal(_) => Code::Internal,
        }
    }
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Status {
        if let ApiError::Internal(detail) = &error {
            // The detail may name tables or hosts; it goes to the log, not the client.
            tracing::error!(%detail, "internal error");
        }
        let reason = error.reason();
        let mut status = Status::new(error.code(), format!("{reason}: {error}"));
        status.metadata_mut().insert(REASON_METADATA_KEY, MetadataValue::from_static(reason));
        if let ApiError::Maintenance { retry_after_secs, .. } = &error {
            // A hint for people and scripts, and gRPC's own retry pushback for clients that retry.
            status.metadata_mut().insert(RETRY_AFTER_METADATA_KEY, MetadataValue::from(*retry_after_secs));
            let pushback_ms = u64::from(*retry_after_secs) * 1000;
            status.metadata_mut().insert("grpc-retry-pushback-ms", MetadataValue::from(pushback_ms));
        }
        status
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> ApiError {
        match error {
            StoreError::SessionLimit { limit } => ApiError::UserSessionLimit { limit },
            StoreError::Unavailable(source) => {
                tracing::warn!(error = %source, "database unavailable");
                ApiError::StorageUnavailable
            }
            other => ApiError::Internal(other.to_string()),
        }
    }
}

/// The reason of a status produced by this server, if any.
pub fn reason_of(status: &Status) -> Option<&str> {
    status.metadata().get(REASON_METADATA_KEY).and_then(|value| value.to_str().ok())
}

impl From<crate::billing::BillingError> for ApiError {
    fn from(error: crate::billing::BillingError) -> ApiError {
        match error {
            crate::billing::BillingError::NotConfigured(what) => ApiError::BillingNotConfigured(what.to_owned()),
            other => ApiError::BillingUnavailable(other.to_string()),
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
