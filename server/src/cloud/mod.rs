//! The cloud-provider layer: one [`CloudProvider`] trait that launches,
//! terminates and lists the instances of a Switchboard cluster, with two
//! implementations: [`ec2::Ec2Provider`] (aws-sdk-ec2) and
//! [`local::LocalProvider`] (in-process hostagents, for `switchboard dev` and
//! tests). The scaler, host lifecycle and leak reconciliation talk to this trait
//! only.
//!
//! Every instance carries two tags: [`TAG_CLUSTER`] (which Switchboard
//! deployment owns it; reconciliation lists instances by it, so an instance with
//! that tag that the database does not know is a leak) and [`TAG_HOST_ID`] (the
//! host id the instance's hostagent connects with, and its credential is bound to).

pub mod config;
pub mod ec2;
pub mod local;

use std::fmt;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

pub use config::{CloudConfig, InstanceTypeConfig, ProviderKind, RegionCloudConfig};

/// Tag naming the cluster (Switchboard deployment) an instance belongs to.
pub const TAG_CLUSTER: &str = "switchboard:cluster";
/// Tag naming the host id the instance's hostagent connects as.
pub const TAG_HOST_ID: &str = "switchboard:host-id";
/// Tag holding the idempotency token of the launch that created the instance.
pub const TAG_LAUNCH_TOKEN: &str = "switchboard:launch-token";

/// What to launch: one instance per host id, all in one region.
#[derive(Debug, Clone)]
pub struct LaunchRequest {
    pub region: String,
    /// Instance types in preference order; the next is tried when one is
    /// refused (no capacity, not offered in the region).
    pub instance_types: Vec<InstanceTypeConfig>,
    /// Image (AMI id for EC2) the hosts boot; also what the hostagent reports.
    pub image: String,
    /// One instance is launched per host id; `host_ids.len()` is the count.
    /// Each host's credential is bound to its id.
    pub host_ids: Vec<String>,
    /// Cluster name, tagged on every instance.
    pub cluster: String,
    /// Idempotency token: a launch repeated with the same token returns the
    /// instances of the first one instead of launching more.
    pub token: String,
}

impl LaunchRequest {
    /// How many instances this request launches.
    pub fn count(&self) -> usize {
        self.host_ids.len()
    }
}

/// Instance state as the provider reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstanceState {
    Pending,
    Running,
    Stopping,
    Stopped,
    ShuttingDown,
    Terminated,
    Other(String),
}

impl InstanceState {
    /// Not on its way out: pending, running, stopping or stopped (still billed
    /// for storage, and could come back).
    pub fn is_live(&self) -> bool {
        !matches!(self, Self::ShuttingDown | Self::Terminated)
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::ShuttingDown => "shutting-down",
            Self::Terminated => "terminated",
            Self::Other(other) => other,
        }
    }

    pub fn parse(value: &str) -> Self {
        match value {
            "pending" => Self::Pending,
            "running" => Self::Running,
            "stopping" => Self::Stopping,
            "stopped" => Self::Stopped,
            "shutting-down" => Self::ShuttingDown,
            "terminated" => Self::Terminated,
            other => Self::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for InstanceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One cloud instance as the provider sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub instance_id: String,
    /// The [`TAG_HOST_ID`] tag; `None` for an instance tagged with the cluster
    /// but launched outside Switchboard.
    pub host_id: Option<String>,
    /// The [`TAG_CLUSTER`] tag.
    pub cluster: Option<String>,
    pub region: String,
    pub instance_type: String,
    pub image: String,
    pub state: InstanceState,
    pub launched_at: Option<DateTime<Utc>>,
}

/// One instance type refused in a region, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeRefusal {
    pub instance_type: String,
    /// The provider's error code, e.g. `InsufficientInstanceCapacity`.
    pub code: String,
    pub message: String,
}

impl fmt::Display for TypeRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.instance_type, self.code)
    }
}

fn join_refusals(refused: &[TypeRefusal]) -> String {
    refused.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    /// Every configured instance type was refused in the region.
    #[error("insufficient capacity in {region}: {}", join_refusals(refused))]
    InsufficientCapacity { region: String, refused: Vec<TypeRefusal> },
    /// Still throttled after the configured retries.
    #[error("cloud api throttled in {region} after {attempts} attempts ({code})")]
    Throttled { region: String, attempts: u32, code: String },
    /// The provider could not be reached, or answered with a server error, after retries.
    #[error("cloud api unavailable in {region} after {attempts} attempts: {message}")]
    Unavailable { region: String, attempts: u32, message: String },
    #[error("not found in {region}: {message}")]
    NotFound { region: String, message: String },
    /// Credentials, permissions, or configuration (bad image, region, endpoint).
    #[error("cloud api refused the request in {region} ({code}): {message}")]
    Unauthorized { region: String, code: String, message: String },
    #[error("invalid cloud request: {0}")]
    Invalid(String),
    #[error("cloud api error in {region} ({code}): {message}")]
    Other { region: String, code: String, message: String },
}

impl CloudError {
    /// Whether the same call may succeed later (capacity comes back, throttling
    /// ends, the api recovers). Configuration and permission errors are not.
    pub fn retryable(&self) -> bool {
        matches!(self, Self::InsufficientCapacity { .. } | Self::Throttled { .. } | Self::Unavailable { .. })
    }

    /// The region the error is about, when it is about one.
    pub fn region(&self) -> Option<&str> {
        match self {
            Self::InsufficientCapacity { region, .. }
            | Self::Throttled { region, .. }
            | Self::Unavailable { region, .. }
            | Self::NotFound { region, .. }
            | Self::Unauthorized { region, .. }
            | Self::Other { region, .. } => Some(region),
            Self::Invalid(_) => None,
        }
    }
}

/// Launches, terminates and lists a cluster's instances.
#[async_trait]
pub trait CloudProvider: Send + Sync {
    /// Launches one instance per host id in `request.region`, tagged with the
    /// cluster and its host id. Idempotent per `request.token`. Returns the
    /// instances launched (or found, for a repeated token); an error only when
    /// none could be launched.
    async fn launch(&self, request: LaunchRequest) -> Result<Vec<Instance>, CloudError>;

    /// Terminates the given instances. Already terminated ones are fine; ids
    /// that do not exist (in this region) are reported as
    /// [`CloudError::NotFound`] after every other one has been terminated.
    async fn terminate(&self, region: &str, instance_ids: &[String]) -> Result<(), CloudError>;

    /// Every instance in `region` tagged with `cluster`, in any state
    /// (terminated ones linger for a while on EC2; see [`InstanceState::is_live`]).
    async fn describe_by_tag(&self, region: &str, cluster: &str) -> Result<Vec<Instance>, CloudError>;
}

/// The provider the `[cloud]` section names. `endpoint` is the control-plane
/// URL hosts connect to; `credentials` issue each host's credential.
pub fn provider(
    config: &CloudConfig,
    endpoint: String,
    credentials: crate::auth::host_credential::HostCredentials,
) -> Result<std::sync::Arc<dyn CloudProvider>, CloudError> {
    Ok(match config.provider {
        ProviderKind::Local => std::sync::Arc::new(local::LocalProvider::new(endpoint, credentials)),
        ProviderKind::Ec2 => std::sync::Arc::new(ec2::Ec2Provider::new(config, endpoint, credentials)?),
    })
}

/// Checks what every provider requires of a launch request.
pub(crate) fn validate_launch(request: &LaunchRequest) -> Result<(), CloudError> {
    if request.region.is_empty() {
        return Err(CloudError::Invalid("region is empty".into()));
    }
    if request.cluster.is_empty() {
        return Err(CloudError::Invalid("cluster is empty".into()));
    }
    if request.instance_types.is_empty() {
        return Err(CloudError::Invalid(format!("no instance types for {}", request.region)));
    }
    if request.token.is_empty() || request.token.len() > 64 || !request.token.is_ascii() {
        return Err(CloudError::Invalid("token must be 1..=64 ascii characters".into()));
    }
    let mut seen = std::collections::HashSet::new();
    for host_id in &request.host_ids {
        if host_id.is_empty() || !host_id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(CloudError::Invalid(format!("invalid host id {host_id:?}")));
        }
        if !seen.insert(host_id) {
            return Err(CloudError::Invalid(format!("duplicate host id {host_id:?}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> LaunchRequest {
        LaunchRequest {
            region: "us-east-1".into(),
            instance_types: vec![InstanceTypeConfig { name: "g4dn.xlarge".into(), capacity: 1 }],
            image: "ami-1".into(),
            host_ids: vec!["h-1".into(), "h-2".into()],
            cluster: "test".into(),
            token: "t-1".into(),
        }
    }

    #[test]
    fn launch_requests_are_checked() {
        assert!(validate_launch(&request()).is_ok());
        let mut r = request();
        r.host_ids = vec!["h-1".into(), "h-1".into()];
        assert!(matches!(validate_launch(&r), Err(CloudError::Invalid(_))));
        let mut r = request();
        r.host_ids = vec!["h 1\nX=1".into()];
        assert!(matches!(validate_launch(&r), Err(CloudError::Invalid(_))));
        let mut r = request();
        r.instance_types.clear();
        assert!(validate_launch(&r).is_err());
        let mut r = request();
        r.token = "x".repeat(65);
        assert!(validate_launch(&r).is_err());
    }

    #[tokio::test]
    async fn the_configured_provider_is_built() -> Result<(), CloudError> {
        let credentials = crate::auth::host_credential::HostCredentials::new(crate::config::Secret::new("test-secret"));
        let local = provider(&CloudConfig::default(), "http://127.0.0.1:1".into(), credentials.clone())?;
        assert!(local.describe_by_tag("us-east-1", "switchboard-dev").await?.is_empty());
        let mut config = CloudConfig { provider: ProviderKind::Ec2, ..Default::default() };
        config.ec2.access_key_id = crate::config::Secret::new("only-one-half");
        assert!(matches!(provider(&config, String::new(), credentials), Err(CloudError::Invalid(_))));
        Ok(())
    }

    #[test]
    fn retryable_errors() {
        let capacity = CloudError::InsufficientCapacity {
            region: "r".into(),
            refused: vec![TypeRefusal {
                instance_type: "g4dn.xlarge".into(),
                code: "InsufficientInstanceCapacity".into(),
                message: String::new(),
            }],
        };
        assert!(capacity.retryable());
        assert!(capacity.to_string().contains("g4dn.xlarge (InsufficientInstanceCapacity)"));
        assert!(CloudError::Throttled { region: "r".into(), attempts: 3, code: "Throttling".into() }.retryable());
        assert!(
            !CloudError::Unauthorized { region: "r".into(), code: "AuthFailure".into(), message: String::new() }
                .retryable()
        );
        assert!(!CloudError::NotFound { region: "r".into(), message: String::new() }.retryable());
        assert_eq!(InstanceState::parse("shutting-down"), InstanceState::ShuttingDown);
        assert!(!InstanceState::Terminated.is_live());
        assert!(InstanceState::Pending.is_live());
    }
}
