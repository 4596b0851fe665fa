//! Conversions between stored column values and domain values, shared by both
//! backends. A value the domain cannot represent is `StoreError::Corrupt`,
//! never a panic.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, SubsecRound, Utc};
use uuid::Uuid;

use super::{ReportedMandelbox, StoreError, StoreResult};
use crate::model::{MandelboxRecord, MandelboxState, PortSpec, SessionRecord, SessionState};

/// The current time at the precision both databases store (microseconds), so
/// that a record built from bound values equals the one read back.
pub(crate) fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// Parses a stored state or reason with the enum's own `parse`.
pub(super) fn parse_enum<T>(column: &str, text: &str, parse: fn(&str) -> Option<T>) -> StoreResult<T> {
    parse(text).ok_or_else(|| StoreError::Corrupt(format!("{column}: unknown value {text:?}")))
}

pub(super) fn parse_optional_enum<T>(
    column: &str,
    text: Option<&str>,
    parse: fn(&str) -> Option<T>,
) -> StoreResult<Option<T>> {
    text.map(|text| parse_enum(column, text, parse)).transpose()
}

pub(super) fn to_u32(column: &str, value: i64) -> StoreResult<u32> {
    u32::try_from(value).map_err(|_| StoreError::Corrupt(format!("{column}: {value} out of range")))
}

pub(super) fn to_u64(column: &str, value: i64) -> StoreResult<u64> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt(format!("{column}: {value} out of range")))
}

/// A generation as a database parameter. None for a value no row can hold,
/// which therefore matches nothing.
pub(super) fn generation_param(generation: u64) -> Option<i64> {
    i64::try_from(generation).ok()
}

pub(super) fn ports_from_json(value: serde_json::Value) -> StoreResult<Vec<PortSpec>> {
    serde_json::from_value(value).map_err(|error| StoreError::Corrupt(format!("ports: {error}")))
}

pub(super) fn ports_from_text(text: &str) -> StoreResult<Vec<PortSpec>> {
    serde_json::from_str(text).map_err(|error| StoreError::Corrupt(format!("ports: {error}")))
}

pub(super) fn regions_from_json(value: serde_json::Value) -> StoreResult<Vec<String>> {
    serde_json::from_value(value).map_err(|error| StoreError::Corrupt(format!("requested_regions: {error}")))
}

pub(super) fn regions_from_text(text: &str) -> StoreResult<Vec<String>> {
    serde_json::from_str(text).map_err(|error| StoreError::Corrupt(format!("requested_regions: {error}")))
}

/// JSON text of a value we are about to store (ports, region lists); these
/// types always serialise, the error path only exists for the type system.
pub(super) fn to_json_text<T: serde::Serialize + ?Sized>(value: &T) -> StoreResult<String> {
    serde_json::to_string(value).map_err(|error| StoreError::Corrupt(format!("cannot encode JSON: {error}")))
}

/// Rows a `list_sessions` call returns when its filter leaves `limit` at 0.
const DEFAULT_SESSION_LIST_LIMIT: u32 = 1000;

pub(super) fn session_list_limit(limit: u32) -> u32 {
    if limit == 0 { DEFAULT_SESSION_LIST_LIMIT } else { limit }
}

/// `mandelbox_finished` only moves a box to a final state.
pub(super) fn check_finished_state(state: MandelboxState) -> StoreResult<()> {
    if state.is_live() {
        return Err(StoreError::Database(sqlx::Error::InvalidArgument(format!(
            "a finished mandelbox must become DEAD or LOST, not {state}"
        ))));
    }
    Ok(())
}

/// Where a confirmed spawn goes: ALLOCATED to the session it was reserved for
/// while that session still waits for it; otherwise WAITING in the warm pool
/// with no session (the session ended or got another box meanwhile, and an
/// ALLOCATED box nobody attaches to would be stranded).
pub(super) fn spawned_target(
    mandelbox: &MandelboxRecord,
    reserved_for: Option<&SessionRecord>,
) -> (MandelboxState, Option<Uuid>) {
    match reserved_for {
        Some(session) if session.state == SessionState::Pending && mandelbox.session_id == Some(session.id) => {
            (MandelboxState::Allocated, Some(session.id))
        }
        _ => (MandelboxState::Waiting, None),
    }
}

/// The ids of `wanted` that are in `done` (any order), in `wanted`'s order.
pub(super) fn in_order(wanted: &[Uuid], done: Vec<Uuid>) -> Vec<Uuid> {
    let done: HashSet<Uuid> = done.into_iter().collect();
    wanted.iter().copied().filter(|id| done.contains(id)).collect()
}

/// Reported ids without repeats, in the order the host sent them.
pub(super) fn unique_ids(reported: &[ReportedMandelbox]) -> Vec<Uuid> {
    let mut seen = HashSet::new();
    reported.iter().map(|mandelbox| mandelbox.id).filter(|id| seen.insert(*id)).collect()
}

/// What `reconcile_host` will do, decided from what the host reported and the
/// live boxes the database holds for it (a reported box that is not one of
/// them is torn down, whether its row is finished, on another host or absent).
pub(super) struct ReconcilePlan {
    /// Reported boxes the host must tear down, in reported order.
    pub(super) teardown: Vec<Uuid>,
    /// Reported SPAWNING boxes: their spawn was never confirmed; → DEAD.
    pub(super) unconfirmed_spawns: Vec<Uuid>,
    /// Reported boxes claimed (ALLOCATED/RUNNING) since before the cutoff that
    /// the host says are idle; → WAITING, their sessions ended.
    pub(super) unassigned: Vec<Uuid>,
    /// Live boxes the host did not report, oldest first; → LOST. A SPAWNING box
    /// is not among them: its spawn may have been sent after the host's Hello
    /// (the sweep writes off spawns that never complete).
    pub(super) missing: Vec<Uuid>,
}

/// Live and not in flight.
fn is_settled(mandelbox: &MandelboxRecord) -> bool {
    mandelbox.state.is_live() && mandelbox.state != MandelboxState::Spawning
}

impl ReconcilePlan {
    pub(super) fn new(
        reported: &[ReportedMandelbox],
        known: &[MandelboxRecord],
        claimed_before: DateTime<Utc>,
    ) -> Self {
        let by_id: HashMap<Uuid, &MandelboxRecord> = known.iter().map(|mandelbox| (mandelbox.id, mandelbox)).collect();
        let mut plan = ReconcilePlan {
            teardown: Vec::new(),
            unconfirmed_spawns: Vec::new(),
            unassigned: Vec::new(),
            missing: Vec::new(),
        };
        let mut seen = HashSet::new();
        for report in reported.iter().filter(|report| seen.insert(report.id)) {
            let id = report.id;
            match by_id.get(&id) {
                Some(mandelbox)
                    if matches!(mandelbox.state, MandelboxState::Allocated | MandelboxState::Running)
                        && !report.assigned
                        && mandelbox.updated_at < claimed_before =>
                {
                    plan.unassigned.push(id);
                }
                Some(mandelbox) => match mandelbox.state {
                    MandelboxState::Waiting | MandelboxState::Allocated | MandelboxState::Running => {}
                    MandelboxState::Spawning => {
                        plan.unconfirmed_spawns.push(id);
                        plan.teardown.push(id);
                    }
                    MandelboxState::Dying | MandelboxState::Dead | MandelboxState::Lost => plan.teardown.push(id),
                },
                None => plan.teardown.push(id),
            }
        }
        let reported: HashSet<Uuid> = reported.iter().map(|report| report.id).collect();
        let mut missing: Vec<&MandelboxRecord> =
            known.iter().filter(|mandelbox| is_settled(mandelbox) && !reported.contains(&mandelbox.id)).collect();
        missing.sort_by_key(|mandelbox| (mandelbox.created_at, mandelbox.id));
        plan.missing = missing.into_iter().map(|mandelbox| mandelbox.id).collect();
        plan
    }

    /// The boxes actually marked LOST (`lost`, in any order), in the order of
    /// `missing`.
    pub(super) fn order(&self, lost: Vec<Uuid>) -> Vec<Uuid> {
        in_order(&self.missing, lost)
    }
}

// Column lists and state sets as macros so that queries stay `&'static str`
// built with `concat!`; both schemas use the same column names.

macro_rules! host_columns {
    () => {
        "id, region, state, image, agent_version, address, capacity, generation, \
         last_heartbeat_at, disconnected_at, terminated_at, created_at, updated_at"
    };
}

macro_rules! mandelbox_columns {
    () => {
        "id, host_id, region, app, state, session_id, ports, created_at, updated_at"
    };
}

macro_rules! session_columns {
    () => {
        "id, user_id, state, app, client_version, requested_regions, region, mandelbox_id, \
         host_id, end_reason, created_at, updated_at, ended_at"
    };
}

/// SQL list of the box states that occupy a slot (`LIVE_MANDELBOX_STATES`).
macro_rules! live_box_states {
    () => {
        "('SPAWNING', 'WAITING', 'ALLOCATED', 'RUNNING', 'DYING')"
    };
}

/// SQL list of the session states that count against a user's limit
/// (`SessionState::is_live`): named, rather than `<> 'ENDED'`, so that an
/// index on (user_id, state) is read by seeks.
macro_rules! live_session_states {
    () => {
        "('PENDING', 'ASSIGNING', 'RUNNING')"
    };
}

macro_rules! instance_columns {
    () => {
        "host_id, region, instance_id, instance_type, capacity, image, state, launch_token, rollout_id, \
         reason, launched_at, connected_at, terminated_at, updated_at"
    };
}

macro_rules! operation_columns {
    () => {
        "id, kind, state, request, progress, error, created_at, updated_at, finished_at"
    };
}

macro_rules! region_columns {
    () => {
        "name, enabled, image, buffer, min_instances, max_instances, instance_types"
    };
}

pub(super) use {
    host_columns, instance_columns, live_box_states, live_session_states, mandelbox_columns, operation_columns,
    region_columns, session_columns,
};

/// A lease epoch as a database parameter (epochs start at 1 and grow by one,
/// so they never come near `i64::MAX`; saturating keeps a corrupt one harmless).
pub(super) fn epoch_param(epoch: u64) -> i64 {
    i64::try_from(epoch).unwrap_or(i64::MAX)
}

/// A std duration as a chrono one (a lease TTL).
pub(super) fn chrono_duration(duration: std::time::Duration) -> StoreResult<chrono::Duration> {
    chrono::Duration::from_std(duration).map_err(|error| StoreError::Corrupt(format!("duration {duration:?}: {error}")))
}

/// Maps a unique-constraint violation to `Conflict(what)`, anything else as usual.
pub(super) fn conflict_on_unique(what: &'static str) -> impl Fn(sqlx::Error) -> StoreError {
    move |error| match &error {
        sqlx::Error::Database(database) if database.is_unique_violation() => StoreError::Conflict(what.to_owned()),
        _ => StoreError::from(error),
    }
}

/// A list limit: 0 means 100, at most 1000.
pub(super) fn list_limit(limit: u32) -> u32 {
    match limit {
        0 => 100,
        limit => limit.min(1000),
    }
}

#[cfg(test)]
mod tests {
    use crate::model::SessionState;

    #[test]
    fn live_session_states_lists_exactly_the_live_states() {
        let all = [SessionState::Pending, SessionState::Assigning, SessionState::Running, SessionState::Ended];
        let live: Vec<String> =
            all.into_iter().filter(|state| state.is_live()).map(|state| format!("'{}'", state.as_str())).collect();
        assert_eq!(live_session_states!(), format!("({})", live.join(", ")));
    }
}
