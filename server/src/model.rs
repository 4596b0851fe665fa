//! Domain records shared by storage, allocation and the host streams.
//!
//! States are stored as their upper-case names in both databases.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($variant),+ }

        impl $name {
            /// The name stored in the database.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }

            /// Parses a stored name; `None` for anything else.
            pub fn parse(text: &str) -> Option<Self> {
                match text { $($text => Some(Self::$variant),)+ _ => None }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                Self::parse(&text).ok_or_else(|| serde::de::Error::custom(format!("unknown value {text:?}")))
            }
        }
    };
}

string_enum! {
    /// Life of a user's session.
    SessionState {
        Pending => "PENDING",
        Assigning => "ASSIGNING",
        Running => "RUNNING",
        Ended => "ENDED",
    }
}

impl SessionState {
    /// Whether the session still counts against the user's limit.
    pub fn is_live(self) -> bool {
        !matches!(self, Self::Ended)
    }
}

string_enum! {
    /// Why a session ended.
    EndReason {
        UserEnded => "USER_ENDED",
        ClientDisconnected => "CLIENT_DISCONNECTED",
        MandelboxExited => "MANDELBOX_EXITED",
        HostLost => "HOST_LOST",
        NoCapacity => "NO_CAPACITY",
        AssignFailed => "ASSIGN_FAILED",
        HostDrained => "HOST_DRAINED",
    }
}

string_enum! {
    /// Life of a mandelbox. SPAWNING → WAITING → ALLOCATED → RUNNING → DYING → DEAD,
    /// or LOST from any live state when its host vanishes.
    MandelboxState {
        Spawning => "SPAWNING",
        Waiting => "WAITING",
        Allocated => "ALLOCATED",
        Running => "RUNNING",
        Dying => "DYING",
        Dead => "DEAD",
        Lost => "LOST",
    }
}

impl MandelboxState {
    /// Occupies a slot of its host's capacity.
    pub fn is_live(self) -> bool {
        !matches!(self, Self::Dead | Self::Lost)
    }

    /// Carries (or is about to carry) a user.
    pub fn is_assigned(self) -> bool {
        matches!(self, Self::Allocated | Self::Running)
    }
}

string_enum! {
    /// A host as the control plane sees it.
    HostState {
        Active => "ACTIVE",
        Draining => "DRAINING",
        Disconnected => "DISCONNECTED",
        Unhealthy => "UNHEALTHY",
    }
}

/// A named port of a mandelbox, as the client must reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortSpec {
    pub name: String,
    pub port: u16,
    pub protocol: String,
}

/// A region and its settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Region {
    pub name: String,
    pub enabled: bool,
    /// The current image: a host must run it to receive sessions here; empty
    /// means any. Image rollouts switch it.
    pub image: String,
    pub scaling: RegionScaling,
}

/// How the scaler sizes a region. No instance types: a fixed fleet, never
/// scaled (hosts that connect on their own still serve).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionScaling {
    /// Desired idle (warm) mandelboxes.
    pub buffer: u32,
    pub min_instances: u32,
    pub max_instances: u32,
    /// In preference order: the next one is tried when the cloud refuses one.
    pub instance_types: Vec<InstanceType>,
}

/// An instance type and how many mandelboxes one instance of it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceType {
    pub name: String,
    pub capacity: u32,
}

string_enum! {
    /// Life of a cloud instance the scaler launched.
    InstanceState {
        Launching => "LAUNCHING",
        Running => "RUNNING",
        Draining => "DRAINING",
        Terminating => "TERMINATING",
        Terminated => "TERMINATED",
    }
}

/// A cloud instance the scaler launched, keyed by the host id it connects as.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceRecord {
    pub host_id: String,
    pub region: String,
    /// The provider's id; None while the launch call is in flight.
    pub instance_id: Option<String>,
    pub instance_type: String,
    pub capacity: u32,
    pub image: String,
    pub state: InstanceState,
    /// Idempotency token of the launch.
    pub launch_token: String,
    /// The rollout that launched it, while that rollout runs.
    pub rollout_id: Option<Uuid>,
    /// Why it was drained or terminated.
    pub reason: Option<String>,
    pub launched_at: DateTime<Utc>,
    pub connected_at: Option<DateTime<Utc>>,
    pub terminated_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

/// An instance to record before it is launched.
#[derive(Debug, Clone, PartialEq)]
pub struct NewInstance {
    pub host_id: String,
    pub region: String,
    pub instance_type: String,
    pub capacity: u32,
    pub image: String,
    pub launch_token: String,
    pub rollout_id: Option<Uuid>,
}

/// A lease held on a singleton job. Writes made under it are refused once
/// another holder has taken it (its epoch moved on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub name: String,
    pub holder: String,
    pub epoch: u64,
    pub expires_at: DateTime<Utc>,
}

string_enum! {
    /// Life of a long-running admin operation.
    OperationState {
        Running => "RUNNING",
        Succeeded => "SUCCEEDED",
        Failed => "FAILED",
        RolledBack => "ROLLED_BACK",
    }
}

/// A long-running admin operation (an image rollout), durable and pollable.
#[derive(Debug, Clone, PartialEq)]
pub struct OperationRecord {
    pub id: Uuid,
    pub kind: String,
    pub state: OperationState,
    /// What was asked, a JSON object.
    pub request: serde_json::Value,
    /// How far it got, a JSON object.
    pub progress: serde_json::Value,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// A registered user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub id: String,
    pub email: Option<String>,
    /// The Stripe customer Switchboard created for this user, if any (a
    /// customer id in the user's token takes precedence).
    pub stripe_customer_id: Option<String>,
}

/// What a host says about itself in its Hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostHello {
    pub host_id: String,
    pub region: String,
    pub image: String,
    pub agent_version: String,
    pub address: String,
    pub capacity: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HostRecord {
    pub id: String,
    pub region: String,
    pub state: HostState,
    pub image: String,
    pub agent_version: String,
    pub address: String,
    pub capacity: u32,
    /// Incremented at every accepted Hello; a connection only acts on its own generation.
    pub generation: u64,
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    pub disconnected_at: Option<DateTime<Utc>>,
    /// Set once its instance was terminated: the host is gone for good.
    pub terminated_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A host with the counts operators and the warm pool need.
#[derive(Debug, Clone, PartialEq)]
pub struct HostSummary {
    pub host: HostRecord,
    /// SPAWNING + WAITING.
    pub warm: u32,
    /// ALLOCATED + RUNNING.
    pub assigned: u32,
    /// Every live box (SPAWNING, WAITING, ALLOCATED, RUNNING, DYING).
    pub live: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MandelboxRecord {
    pub id: Uuid,
    pub host_id: String,
    pub region: String,
    pub app: String,
    pub state: MandelboxState,
    /// The session it was claimed or reserved for.
    pub session_id: Option<Uuid>,
    pub ports: Vec<PortSpec>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub id: Uuid,
    pub user_id: String,
    pub state: SessionState,
    pub app: String,
    pub client_version: String,
    /// Regions the client asked for, best first.
    pub requested_regions: Vec<String>,
    /// Region of the claimed mandelbox; None while PENDING.
    pub region: Option<String>,
    pub mandelbox_id: Option<Uuid>,
    pub host_id: Option<String>,
    pub end_reason: Option<EndReason>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
}
