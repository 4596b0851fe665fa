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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    pub name: String,
    pub enabled: bool,
    /// Image a host must run to receive sessions here; empty means any.
    pub image: String,
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

#[derive(Debug, Clone, PartialEq)]
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
