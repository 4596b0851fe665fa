//! PostgreSQL: a box, a host or a session returned beside other columns by
//! the statements of the allocation cycle (the claim, the disconnect batch,
//! the recycle), as prefixed columns that are all NULL when the statement had
//! none to return.
//!
//! Why columns and not `to_jsonb(row)`: PostgreSQL spends about 6 µs
//! building and printing a box's and a host's objects, the server parses
//! them again, and these statements return three such pairs per allocation
//! (BENCHMARKS.md, run U). Columns travel in binary and decode in place.
//!
//! Each set has its `SELECT` list as a macro that takes the alias of the row
//! it reads (`box_columns_of!("c")`), beside its struct: a missing or
//! misspelt column fails the statement's decode in every test that runs it.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::postgres::{HostRow, MandelboxRow, SessionRow};
use super::{StoreError, StoreResult};

/// A NOT NULL column of a row that is there (its id was not NULL).
fn required<T>(what: &str, column: &str, value: Option<T>) -> StoreResult<T> {
    value.ok_or_else(|| StoreError::Corrupt(format!("{what} returned without its {column}")))
}

/// A box's columns, `box_*`.
#[derive(sqlx::FromRow)]
pub(super) struct BoxColumns {
    box_id: Option<Uuid>,
    box_host_id: Option<String>,
    box_region: Option<String>,
    box_app: Option<String>,
    box_state: Option<String>,
    box_session_id: Option<Uuid>,
    box_ports: Option<serde_json::Value>,
    box_created_at: Option<DateTime<Utc>>,
    box_updated_at: Option<DateTime<Utc>>,
}

/// `BoxColumns`' `SELECT` list, from the box aliased `$alias`.
#[rustfmt::skip]
macro_rules! box_columns_of {
    ($alias:literal) => {
        concat!(
            $alias, ".id AS box_id, ",
            $alias, ".host_id AS box_host_id, ",
            $alias, ".region AS box_region, ",
            $alias, ".app AS box_app, ",
            $alias, ".state AS box_state, ",
            $alias, ".session_id AS box_session_id, ",
            $alias, ".ports AS box_ports, ",
            $alias, ".created_at AS box_created_at, ",
            $alias, ".updated_at AS box_updated_at"
        )
    };
}
pub(super) use box_columns_of;

impl BoxColumns {
    /// The box, or None if the statement returned none.
    pub(super) fn into_row(self) -> StoreResult<Option<MandelboxRow>> {
        const WHAT: &str = "a box";
        let Some(id) = self.box_id else {
            return Ok(None);
        };
        Ok(Some(MandelboxRow {
            id,
            host_id: required(WHAT, "host_id", self.box_host_id)?,
            region: required(WHAT, "region", self.box_region)?,
            app: required(WHAT, "app", self.box_app)?,
            state: required(WHAT, "state", self.box_state)?,
            session_id: self.box_session_id,
            ports: required(WHAT, "ports", self.box_ports)?,
            created_at: required(WHAT, "created_at", self.box_created_at)?,
            updated_at: required(WHAT, "updated_at", self.box_updated_at)?,
        }))
    }
}

/// A host's columns, `claimed_host_*` (`host_id` is a session column).
#[derive(sqlx::FromRow)]
pub(super) struct ClaimedHostColumns {
    claimed_host_id: Option<String>,
    claimed_host_region: Option<String>,
    claimed_host_state: Option<String>,
    claimed_host_image: Option<String>,
    claimed_host_agent_version: Option<String>,
    claimed_host_address: Option<String>,
    claimed_host_capacity: Option<i64>,
    claimed_host_generation: Option<i64>,
    claimed_host_last_heartbeat_at: Option<DateTime<Utc>>,
    claimed_host_disconnected_at: Option<DateTime<Utc>>,
    claimed_host_terminated_at: Option<DateTime<Utc>>,
    claimed_host_created_at: Option<DateTime<Utc>>,
    claimed_host_updated_at: Option<DateTime<Utc>>,
}

/// `ClaimedHostColumns`' `SELECT` list, from the host aliased `$alias`.
#[rustfmt::skip]
macro_rules! claimed_host_columns_of {
    ($alias:literal) => {
        concat!(
            $alias, ".id AS claimed_host_id, ",
            $alias, ".region AS claimed_host_region, ",
            $alias, ".state AS claimed_host_state, ",
            $alias, ".image AS claimed_host_image, ",
            $alias, ".agent_version AS claimed_host_agent_version, ",
            $alias, ".address AS claimed_host_address, ",
            $alias, ".capacity AS claimed_host_capacity, ",
            $alias, ".generation AS claimed_host_generation, ",
            $alias, ".last_heartbeat_at AS claimed_host_last_heartbeat_at, ",
            $alias, ".disconnected_at AS claimed_host_disconnected_at, ",
            $alias, ".terminated_at AS claimed_host_terminated_at, ",
            $alias, ".created_at AS claimed_host_created_at, ",
            $alias, ".updated_at AS claimed_host_updated_at"
        )
    };
}
pub(super) use claimed_host_columns_of;

impl ClaimedHostColumns {
    /// The host, or None if the statement returned none.
    pub(super) fn into_row(self) -> StoreResult<Option<HostRow>> {
        const WHAT: &str = "a host";
        let Some(id) = self.claimed_host_id else {
            return Ok(None);
        };
        Ok(Some(HostRow {
            id,
            region: required(WHAT, "region", self.claimed_host_region)?,
            state: required(WHAT, "state", self.claimed_host_state)?,
            image: required(WHAT, "image", self.claimed_host_image)?,
            agent_version: required(WHAT, "agent_version", self.claimed_host_agent_version)?,
            address: required(WHAT, "address", self.claimed_host_address)?,
            capacity: required(WHAT, "capacity", self.claimed_host_capacity)?,
            generation: required(WHAT, "generation", self.claimed_host_generation)?,
            last_heartbeat_at: self.claimed_host_last_heartbeat_at,
            disconnected_at: self.claimed_host_disconnected_at,
            terminated_at: self.claimed_host_terminated_at,
            created_at: required(WHAT, "created_at", self.claimed_host_created_at)?,
            updated_at: required(WHAT, "updated_at", self.claimed_host_updated_at)?,
        }))
    }
}

/// A session's columns, `ended_*`.
#[derive(sqlx::FromRow)]
pub(super) struct EndedSessionColumns {
    ended_id: Option<Uuid>,
    ended_user_id: Option<String>,
    ended_state: Option<String>,
    ended_app: Option<String>,
    ended_client_version: Option<String>,
    ended_requested_regions: Option<serde_json::Value>,
    ended_region: Option<String>,
    ended_mandelbox_id: Option<Uuid>,
    ended_host_id: Option<String>,
    ended_end_reason: Option<String>,
    ended_created_at: Option<DateTime<Utc>>,
    ended_updated_at: Option<DateTime<Utc>>,
    ended_ended_at: Option<DateTime<Utc>>,
}

/// `EndedSessionColumns`' `SELECT` list, from the session aliased `$alias`.
#[rustfmt::skip]
macro_rules! ended_session_columns_of {
    ($alias:literal) => {
        concat!(
            $alias, ".id AS ended_id, ",
            $alias, ".user_id AS ended_user_id, ",
            $alias, ".state AS ended_state, ",
            $alias, ".app AS ended_app, ",
            $alias, ".client_version AS ended_client_version, ",
            $alias, ".requested_regions AS ended_requested_regions, ",
            $alias, ".region AS ended_region, ",
            $alias, ".mandelbox_id AS ended_mandelbox_id, ",
            $alias, ".host_id AS ended_host_id, ",
            $alias, ".end_reason AS ended_end_reason, ",
            $alias, ".created_at AS ended_created_at, ",
            $alias, ".updated_at AS ended_updated_at, ",
            $alias, ".ended_at AS ended_ended_at"
        )
    };
}
pub(super) use ended_session_columns_of;

impl EndedSessionColumns {
    /// The session, or None if the statement returned none.
    pub(super) fn into_row(self) -> StoreResult<Option<SessionRow>> {
        const WHAT: &str = "a session";
        let Some(id) = self.ended_id else {
            return Ok(None);
        };
        Ok(Some(SessionRow {
            id,
            user_id: required(WHAT, "user_id", self.ended_user_id)?,
            state: required(WHAT, "state", self.ended_state)?,
            app: required(WHAT, "app", self.ended_app)?,
            client_version: required(WHAT, "client_version", self.ended_client_version)?,
            requested_regions: required(WHAT, "requested_regions", self.ended_requested_regions)?,
            region: self.ended_region,
            mandelbox_id: self.ended_mandelbox_id,
            host_id: self.ended_host_id,
            end_reason: self.ended_end_reason,
            created_at: required(WHAT, "created_at", self.ended_created_at)?,
            updated_at: required(WHAT, "updated_at", self.ended_updated_at)?,
            ended_at: self.ended_ended_at,
        }))
    }
}
