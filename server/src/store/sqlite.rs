//! SQLite store: the embedded default (`switchboard dev`, single replica).
//!
//! Concurrency: every write goes through one writer connection, in
//! `BEGIN IMMEDIATE` transactions, so write transactions run one after another
//! and a transaction never has to upgrade a read lock (the source of
//! SQLITE_BUSY deadlocks). The checks-then-writes that PostgreSQL guards with
//! row locks are therefore atomic here by construction. Pure reads use a
//! separate pool that WAL lets run alongside the writer.
//!
//! Representations (see migrations/sqlite): timestamps are INTEGER unix
//! microseconds, UUIDs hyphenated TEXT, lists JSON TEXT (queried with
//! `json_each`).

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use uuid::Uuid;

use super::rows::{self, host_columns, live_box_states, mandelbox_columns, now, session_columns};
use super::sqlite_batches as batches;
use super::sqlite_fleet as fleet;
use super::{
    Claim, ClaimOutcome, DisconnectReport, EndedSession, HeartbeatMark, MandelboxAuth, MandelboxFilter, NewMandelbox,
    NewSession, Reconciliation, Recycled, ReportedMandelbox, SessionFilter, SpawnReport, Store, StoreError,
    StoreResult, SweepOutcome, TokenEnd, TornDown, WarmReplacement,
};
use crate::model::{
    EndReason, HostHello, HostRecord, HostState, HostSummary, InstanceRecord, InstanceState, Lease, MandelboxRecord,
    MandelboxState, NewInstance, OperationRecord, PortSpec, Region, SessionRecord, SessionState, UserRecord,
};

/// Connections that serve pure reads.
const READER_CONNECTIONS: u32 = 4;

pub struct SqliteStore {
    /// The only connection that writes; see the module comment.
    writer: SqlitePool,
    reader: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if missing) the database a `sqlite:` URL names, e.g.
    /// `sqlite:///var/lib/switchboard/switchboard.db` or `sqlite://switchboard.db`.
    pub async fn open(url: &str) -> StoreResult<Self> {
        let options = SqliteConnectOptions::from_str(url)?.busy_timeout(Duration::from_secs(5)).foreign_keys(true);
        if is_in_memory(url) {
            // Every connection would get its own empty database, and the
            // database would vanish with its last connection: one connection,
            // kept forever, serves reads and writes.
            let pool = SqlitePoolOptions::new()
                .test_before_acquire(false)
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
                .connect_with(options)
                .await?;
            return Ok(Self { writer: pool.clone(), reader: pool });
        }
        // No ping before each use: a file's connection does not die, and each
        // ping is a round trip to the connection's worker thread.
        let writer = SqlitePoolOptions::new()
            .test_before_acquire(false)
            .max_connections(1)
            .connect_with(
                options
                    .clone()
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Normal),
            )
            .await?;
        // WAL mode is stored in the file, which the writer has created and
        // switched by now; readers only need to open it.
        let reader = SqlitePoolOptions::new()
            .test_before_acquire(false)
            .max_connections(READER_CONNECTIONS)
            .connect_with(options.read_only(true))
            .await?;
        Ok(Self { writer, reader })
    }

    pub async fn migrate(&self) -> StoreResult<()> {
        sqlx::migrate!("../migrations/sqlite").run(&self.writer).await?;
        Ok(())
    }

    async fn begin_write(&self) -> StoreResult<sqlx::Transaction<'static, sqlx::Sqlite>> {
        Ok(self.writer.begin_with("BEGIN IMMEDIATE").await?)
    }
}

fn is_in_memory(url: &str) -> bool {
    url.contains(":memory:") || url.contains("mode=memory")
}

// ----- representations -------------------------------------------------------

pub(super) fn micros(at: DateTime<Utc>) -> i64 {
    at.timestamp_micros()
}

pub(super) fn time(column: &str, micros: i64) -> StoreResult<DateTime<Utc>> {
    DateTime::from_timestamp_micros(micros)
        .ok_or_else(|| StoreError::Corrupt(format!("{column}: timestamp {micros} out of range")))
}

pub(super) fn optional_time(column: &str, micros: Option<i64>) -> StoreResult<Option<DateTime<Utc>>> {
    micros.map(|micros| time(column, micros)).transpose()
}

pub(super) fn uuid(column: &str, text: &str) -> StoreResult<Uuid> {
    Uuid::parse_str(text).map_err(|error| StoreError::Corrupt(format!("{column}: {text:?}: {error}")))
}

pub(super) fn optional_uuid(column: &str, text: Option<&str>) -> StoreResult<Option<Uuid>> {
    text.map(|text| uuid(column, text)).transpose()
}

/// A list parameter, as the JSON array `json_each` reads.
pub(super) fn json_list<T: ToString>(items: &[T]) -> StoreResult<String> {
    let items: Vec<String> = items.iter().map(ToString::to_string).collect();
    rows::to_json_text(&items)
}

// ----- rows ------------------------------------------------------------------

/// Also read from JSON (`host_json!`), where a statement returns a host
/// beside another table's row.
#[derive(sqlx::FromRow, serde::Deserialize)]
pub(super) struct HostRow {
    id: String,
    region: String,
    state: String,
    image: String,
    agent_version: String,
    address: String,
    capacity: i64,
    generation: i64,
    last_heartbeat_at: Option<i64>,
    disconnected_at: Option<i64>,
    terminated_at: Option<i64>,
    created_at: i64,
    updated_at: i64,
}

impl HostRow {
    pub(super) fn into_record(self) -> StoreResult<HostRecord> {
        Ok(HostRecord {
            state: rows::parse_enum("hosts.state", &self.state, HostState::parse)?,
            capacity: rows::to_u32("hosts.capacity", self.capacity)?,
            generation: rows::to_u64("hosts.generation", self.generation)?,
            last_heartbeat_at: optional_time("hosts.last_heartbeat_at", self.last_heartbeat_at)?,
            disconnected_at: optional_time("hosts.disconnected_at", self.disconnected_at)?,
            terminated_at: optional_time("hosts.terminated_at", self.terminated_at)?,
            created_at: time("hosts.created_at", self.created_at)?,
            updated_at: time("hosts.updated_at", self.updated_at)?,
            id: self.id,
            region: self.region,
            image: self.image,
            agent_version: self.agent_version,
            address: self.address,
        })
    }
}

#[derive(sqlx::FromRow)]
struct HostSummaryRow {
    #[sqlx(flatten)]
    host: HostRow,
    warm: i64,
    assigned: i64,
    live: i64,
}

impl HostSummaryRow {
    fn into_summary(self) -> StoreResult<HostSummary> {
        Ok(HostSummary {
            host: self.host.into_record()?,
            warm: rows::to_u32("warm", self.warm)?,
            assigned: rows::to_u32("assigned", self.assigned)?,
            live: rows::to_u32("live", self.live)?,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct MandelboxRow {
    pub(super) id: String,
    host_id: String,
    region: String,
    app: String,
    state: String,
    session_id: Option<String>,
    ports: String,
    created_at: i64,
    updated_at: i64,
}

impl MandelboxRow {
    pub(super) fn into_record(self) -> StoreResult<MandelboxRecord> {
        Ok(MandelboxRecord {
            id: uuid("mandelboxes.id", &self.id)?,
            state: rows::parse_enum("mandelboxes.state", &self.state, MandelboxState::parse)?,
            session_id: optional_uuid("mandelboxes.session_id", self.session_id.as_deref())?,
            ports: rows::ports_from_text(&self.ports)?,
            created_at: time("mandelboxes.created_at", self.created_at)?,
            updated_at: time("mandelboxes.updated_at", self.updated_at)?,
            host_id: self.host_id,
            region: self.region,
            app: self.app,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct MandelboxAuthRow {
    #[sqlx(flatten)]
    pub(super) mandelbox: MandelboxRow,
    pub(super) token_hash: String,
}

/// A session and, as JSON (`host_json!`), the host it was put on.
#[derive(sqlx::FromRow)]
struct SessionWithHostRow {
    #[sqlx(flatten)]
    session: SessionRow,
    host_json: Option<String>,
}

/// A host row as one JSON object, in `HostRow`'s fields.
macro_rules! host_json {
    () => {
        "json_object('id', id, 'region', region, 'state', state, 'image', image, \
         'agent_version', agent_version, 'address', address, 'capacity', capacity, \
         'generation', generation, 'last_heartbeat_at', last_heartbeat_at, \
         'disconnected_at', disconnected_at, 'terminated_at', terminated_at, \
         'created_at', created_at, 'updated_at', updated_at)"
    };
}

#[derive(sqlx::FromRow)]
pub(super) struct SessionRow {
    id: String,
    user_id: String,
    state: String,
    app: String,
    client_version: String,
    requested_regions: String,
    region: Option<String>,
    mandelbox_id: Option<String>,
    host_id: Option<String>,
    end_reason: Option<String>,
    created_at: i64,
    updated_at: i64,
    ended_at: Option<i64>,
}

impl SessionRow {
    pub(super) fn into_record(self) -> StoreResult<SessionRecord> {
        Ok(SessionRecord {
            id: uuid("sessions.id", &self.id)?,
            state: rows::parse_enum("sessions.state", &self.state, SessionState::parse)?,
            requested_regions: rows::regions_from_text(&self.requested_regions)?,
            mandelbox_id: optional_uuid("sessions.mandelbox_id", self.mandelbox_id.as_deref())?,
            end_reason: rows::parse_optional_enum("sessions.end_reason", self.end_reason.as_deref(), EndReason::parse)?,
            created_at: time("sessions.created_at", self.created_at)?,
            updated_at: time("sessions.updated_at", self.updated_at)?,
            ended_at: optional_time("sessions.ended_at", self.ended_at)?,
            user_id: self.user_id,
            app: self.app,
            client_version: self.client_version,
            region: self.region,
            host_id: self.host_id,
        })
    }
}

fn hosts(rows: Vec<HostRow>) -> StoreResult<Vec<HostRecord>> {
    rows.into_iter().map(HostRow::into_record).collect()
}

pub(super) fn mandelboxes(rows: Vec<MandelboxRow>) -> StoreResult<Vec<MandelboxRecord>> {
    rows.into_iter().map(MandelboxRow::into_record).collect()
}

pub(super) fn sessions(rows: Vec<SessionRow>) -> StoreResult<Vec<SessionRecord>> {
    rows.into_iter().map(SessionRow::into_record).collect()
}

// ----- queries shared by several methods -------------------------------------
//
// These run inside a writer transaction; being the only writer, they need no
// row locks to keep what they read true until commit.

async fn select_host(conn: &mut SqliteConnection, host_id: &str) -> StoreResult<Option<HostRecord>> {
    sqlx::query_as::<_, HostRow>(concat!("SELECT ", host_columns!(), " FROM hosts WHERE id = ?1"))
        .bind(host_id)
        .fetch_optional(conn)
        .await?
        .map(HostRow::into_record)
        .transpose()
}

/// The host a claimed or reserved box lives on; the foreign key guarantees it.
async fn host_of(conn: &mut SqliteConnection, mandelbox: &MandelboxRecord) -> StoreResult<HostRecord> {
    select_host(conn, &mandelbox.host_id).await?.ok_or_else(|| {
        StoreError::Corrupt(format!("mandelbox {} is on unknown host {}", mandelbox.id, mandelbox.host_id))
    })
}

async fn select_session(conn: &mut SqliteConnection, id: Uuid) -> StoreResult<Option<SessionRecord>> {
    sqlx::query_as::<_, SessionRow>(concat!("SELECT ", session_columns!(), " FROM sessions WHERE id = ?1"))
        .bind(id.to_string())
        .fetch_optional(conn)
        .await?
        .map(SessionRow::into_record)
        .transpose()
}

async fn select_mandelbox(conn: &mut SqliteConnection, id: Uuid) -> StoreResult<Option<MandelboxRecord>> {
    sqlx::query_as::<_, MandelboxRow>(concat!("SELECT ", mandelbox_columns!(), " FROM mandelboxes WHERE id = ?1"))
        .bind(id.to_string())
        .fetch_optional(conn)
        .await?
        .map(MandelboxRow::into_record)
        .transpose()
}

/// Ends every live session on `mandelbox_ids`; returns them oldest first.
///
/// A live session on a box is ASSIGNING or RUNNING (a PENDING one has no box).
/// The condition is written as `sessions_one_per_mandelbox`'s, term for term,
/// so that SQLite's planner uses it: it is the only index on `mandelbox_id`.
async fn end_sessions_on(
    conn: &mut SqliteConnection,
    mandelbox_ids: &[Uuid],
    reason: EndReason,
    at: DateTime<Utc>,
) -> StoreResult<Vec<SessionRecord>> {
    let rows = sqlx::query_as::<_, SessionRow>(concat!(
        "UPDATE sessions SET state = 'ENDED', end_reason = ?2, ended_at = ?3, updated_at = ?3 \
         WHERE mandelbox_id IN (SELECT value FROM json_each(?1)) AND state IN ('ASSIGNING', 'RUNNING') RETURNING ",
        session_columns!()
    ))
    .bind(json_list(mandelbox_ids)?)
    .bind(reason.as_str())
    .bind(micros(at))
    .fetch_all(conn)
    .await?;
    let mut ended = sessions(rows)?;
    ended.sort_by_key(|session| (session.created_at, session.id));
    Ok(ended)
}

/// `Store::end_session` inside the caller's write transaction.
async fn ended_in(
    conn: &mut SqliteConnection,
    session_id: Uuid,
    reason: EndReason,
    at: DateTime<Utc>,
) -> StoreResult<Option<EndedSession>> {
    // The common case in one statement; a session already ended (or
    // unknown) is told apart afterwards.
    let ended = sqlx::query_as::<_, SessionRow>(concat!(
        "UPDATE sessions SET state = 'ENDED', end_reason = ?2, ended_at = ?3, updated_at = ?3 \
         WHERE id = ?1 AND state <> 'ENDED' RETURNING ",
        session_columns!()
    ))
    .bind(session_id.to_string())
    .bind(reason.as_str())
    .bind(micros(at))
    .fetch_optional(&mut *conn)
    .await?;
    let Some(session) = ended else {
        return Ok(select_session(&mut *conn, session_id).await?.map(|session| EndedSession {
            session,
            teardown: None,
            changed: false,
        }));
    };
    let session = session.into_record()?;
    let teardown = match session.mandelbox_id {
        Some(mandelbox_id) => sqlx::query_as::<_, MandelboxRow>(concat!(
            "UPDATE mandelboxes SET state = 'DYING', updated_at = ?3 \
             WHERE id = ?1 AND session_id = ?2 AND state IN ",
            live_box_states!(),
            " RETURNING ",
            mandelbox_columns!()
        ))
        .bind(mandelbox_id.to_string())
        .bind(session_id.to_string())
        .bind(micros(at))
        .fetch_optional(&mut *conn)
        .await?
        .map(MandelboxRow::into_record)
        .transpose()?,
        None => None,
    };
    Ok(Some(EndedSession { session, teardown, changed: true }))
}

/// A box and its token hash, read on the reader pool or inside a write
/// transaction.
async fn mandelbox_auth_on<'c>(
    executor: impl sqlx::SqliteExecutor<'c>,
    id: Uuid,
) -> StoreResult<Option<MandelboxAuth>> {
    let Some(row) = sqlx::query_as::<_, MandelboxAuthRow>(concat!(
        "SELECT ",
        mandelbox_columns!(),
        ", token_hash FROM mandelboxes WHERE id = ?1"
    ))
    .bind(id.to_string())
    .fetch_optional(executor)
    .await?
    else {
        return Ok(None);
    };
    Ok(Some(MandelboxAuth { mandelbox: row.mandelbox.into_record()?, token_hash: row.token_hash }))
}

/// `Store::end_session_by_token` inside the caller's write transaction.
async fn ended_by_token_in(
    conn: &mut SqliteConnection,
    mandelbox_id: Uuid,
    token_hash: &str,
    reason: EndReason,
    at: DateTime<Utc>,
) -> StoreResult<TokenEnd> {
    let auth = mandelbox_auth_on(&mut *conn, mandelbox_id).await?;
    let session_id = match TokenEnd::session_for_report(auth.as_ref(), token_hash) {
        Ok(session_id) => session_id,
        Err(answer) => return Ok(answer),
    };
    let ended = ended_in(conn, session_id, reason, at).await?.filter(|ended| ended.changed).map(Box::new);
    Ok(TokenEnd::Ended { session_id, ended })
}

/// The claim statement up to its RETURNING clause. Loadgen's "bare claim"
/// runs exactly this (`CLAIM_WAITING_SQL`) to measure the database's limit.
macro_rules! sqlite_claim_waiting {
    ($state:literal) => {
        // The host first (region order, fullest, id), each candidate host's
        // load counted once, then its oldest WAITING box: the same choice as
        // one ORDER BY over every candidate box, for a fraction of the work
        // (that form counted a host's load once per candidate box and sorted
        // the whole warm pool: 2.6× the textbook claim at 384 warm boxes,
        // run R). SQLite has one writer, so the chosen host's box cannot be
        // taken between the two steps.
        concat!(
            "UPDATE mandelboxes SET state = '",
            $state,
            "', session_id = ?4, updated_at = ?5 \
         WHERE id = ( \
             SELECT m.id FROM mandelboxes m \
             WHERE m.state = 'WAITING' AND m.app = ?2 \
               AND m.region IN (SELECT value FROM json_each(?1)) \
               AND m.host_id = ( \
                 SELECT h.id FROM (SELECT DISTINCT host_id, region FROM mandelboxes \
                                   WHERE state = 'WAITING' AND app = ?2 \
                                     AND region IN (SELECT value FROM json_each(?1))) c \
                 JOIN (SELECT value, min(key) AS position FROM json_each(?1) GROUP BY value) wanted \
                   ON wanted.value = c.region \
                 JOIN hosts h ON h.id = c.host_id \
                 LEFT JOIN regions r ON r.name = c.region \
                 WHERE h.state = 'ACTIVE' \
                   AND (COALESCE(r.image, '') = '' OR h.image = r.image) \
                   AND h.id NOT IN (SELECT value FROM json_each(?3)) \
                 ORDER BY wanted.position, \
                          h.capacity - (SELECT count(*) FROM mandelboxes a \
                                        WHERE a.host_id = h.id AND a.state IN ('ALLOCATED', 'RUNNING')), \
                          h.id \
                 LIMIT 1) \
             ORDER BY m.created_at, m.id \
             LIMIT 1) \
         "
        )
    };
}

/// Allocate's claim as one statement returning only the id (for benchmarks);
/// `claim_for_user` runs it with the session-limit check added.
pub const CLAIM_WAITING_SQL: &str = concat!(sqlite_claim_waiting!("RUNNING"), " RETURNING id");

/// Takes the best WAITING box for a session and marks it ALLOCATED to it.
///
/// Best = first region in `regions` (position in the JSON array), then the
/// fullest host (fewest free slots, counting assigned boxes), then host id and
/// box age for a stable order. Same choice as the PostgreSQL store.
async fn claim_waiting(
    conn: &mut SqliteConnection,
    regions: &[String],
    app: &str,
    exclude_hosts: &[String],
    session_id: Uuid,
    at: DateTime<Utc>,
) -> StoreResult<Option<MandelboxRecord>> {
    sqlx::query_as::<_, MandelboxRow>(concat!(sqlite_claim_waiting!("ALLOCATED"), " RETURNING ", mandelbox_columns!()))
        .bind(json_list(regions)?)
        .bind(app)
        .bind(json_list(exclude_hosts)?)
        .bind(session_id.to_string())
        .bind(micros(at))
        .fetch_optional(conn)
        .await?
        .map(MandelboxRow::into_record)
        .transpose()
}

/// Allocate's claim: `claim_waiting` (RUNNING) for a user that has a row and
/// is under `limit`; None otherwise, as when no box matched.
async fn claim_for_user(
    conn: &mut SqliteConnection,
    new: &NewSession,
    limit: u32,
    at: DateTime<Utc>,
) -> StoreResult<Option<MandelboxRecord>> {
    sqlx::query_as::<_, MandelboxRow>(concat!(
        sqlite_claim_waiting!("RUNNING"),
        " AND (SELECT live_sessions FROM users WHERE id = ?6) < ?7 RETURNING ",
        mandelbox_columns!()
    ))
    .bind(json_list(&new.regions)?)
    .bind(&new.app)
    .bind("[]")
    .bind(new.id.to_string())
    .bind(micros(at))
    .bind(&new.user_id)
    .bind(i64::from(limit))
    .fetch_optional(conn)
    .await?
    .map(MandelboxRow::into_record)
    .transpose()
}

/// `Store::create_session_and_claim` inside the caller's write transaction.
async fn create_session_and_claim_in(
    tx: &mut SqliteConnection,
    new: &NewSession,
    limit: u32,
    at: DateTime<Utc>,
) -> StoreResult<ClaimOutcome> {
    // `live_sessions` is kept by triggers (migration 0005); the write
    // lock serialises this with every other session change. The common
    // case, a user under the limit and a warm box, is the claim alone
    // (one hand-off to the writer fewer than reading the user first).
    let mut claimed = claim_for_user(tx, new, limit, at).await?;
    if claimed.is_none() {
        // No box, the user at the limit, or no user row: told apart here.
        // The row exists from the user's first authenticated call on; it
        // is created here only for a caller that skipped that, and the
        // claim tried once more.
        let live: Option<i64> = sqlx::query_scalar("SELECT live_sessions FROM users WHERE id = ?1")
            .bind(&new.user_id)
            .fetch_optional(&mut *tx)
            .await?;
        if live.is_none() {
            sqlx::query("INSERT INTO users (id, created_at) VALUES (?1, ?2)")
                .bind(&new.user_id)
                .bind(micros(at))
                .execute(&mut *tx)
                .await?;
        }
        if live.unwrap_or(0) >= i64::from(limit) {
            return Err(StoreError::SessionLimit { limit });
        }
        if live.is_none() {
            claimed = claim_for_user(tx, new, limit, at).await?;
        }
    }
    // The claimed box's host comes back with the session (one hand-off
    // to the writer fewer than reading it after).
    let inserted = sqlx::query_as::<_, SessionWithHostRow>(concat!(
        "INSERT INTO sessions (id, user_id, state, app, client_version, requested_regions, \
             region, mandelbox_id, host_id, created_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?10) RETURNING ",
        session_columns!(),
        ", (SELECT ",
        host_json!(),
        " FROM hosts WHERE hosts.id = sessions.host_id) AS host_json"
    ))
    .bind(new.id.to_string())
    .bind(&new.user_id)
    .bind(if claimed.is_some() { SessionState::Running } else { SessionState::Pending }.as_str())
    .bind(&new.app)
    .bind(&new.client_version)
    .bind(rows::to_json_text(&new.regions)?)
    .bind(claimed.as_ref().map(|mandelbox| mandelbox.region.as_str()))
    .bind(claimed.as_ref().map(|mandelbox| mandelbox.id.to_string()))
    .bind(claimed.as_ref().map(|mandelbox| mandelbox.host_id.as_str()))
    .bind(micros(at))
    .fetch_one(&mut *tx)
    .await?;
    let session = inserted.session.into_record()?;

    let outcome = match (claimed, inserted.host_json) {
        (Some(mandelbox), Some(host)) => {
            let host: HostRow = serde_json::from_str(&host)
                .map_err(|error| StoreError::Corrupt(format!("the claimed box's host: {error}")))?;
            ClaimOutcome::Claimed(Claim { session, mandelbox, host: host.into_record()? })
        }
        (Some(mandelbox), None) => {
            return Err(StoreError::Corrupt(format!(
                "mandelbox {} is on unknown host {}",
                mandelbox.id, mandelbox.host_id
            )));
        }
        (None, _) => ClaimOutcome::Pending(session),
    };
    Ok(outcome)
}

/// Puts a PENDING session onto a claimed box.
async fn assign_session(
    conn: &mut SqliteConnection,
    session_id: Uuid,
    mandelbox: &MandelboxRecord,
    at: DateTime<Utc>,
) -> StoreResult<SessionRecord> {
    sqlx::query_as::<_, SessionRow>(concat!(
        "UPDATE sessions SET state = 'ASSIGNING', region = ?2, mandelbox_id = ?3, host_id = ?4, \
         updated_at = ?5 WHERE id = ?1 RETURNING ",
        session_columns!()
    ))
    .bind(session_id.to_string())
    .bind(&mandelbox.region)
    .bind(mandelbox.id.to_string())
    .bind(&mandelbox.host_id)
    .bind(micros(at))
    .fetch_one(conn)
    .await?
    .into_record()
}

/// Inserts SPAWNING boxes on `host_id`, as many of `news` as the host has free
/// slots, if it is ACTIVE (the write transaction serialises reservations).
/// `mandelbox_spawned` inside the caller's write transaction.
async fn spawned_in(
    conn: &mut SqliteConnection,
    id: Uuid,
    ports: &[PortSpec],
    at: DateTime<Utc>,
) -> StoreResult<Option<MandelboxRecord>> {
    // The common case, a warm box reserved for no session, in one statement.
    let warm = sqlx::query_as::<_, MandelboxRow>(concat!(
        "UPDATE mandelboxes SET state = 'WAITING', ports = ?2, updated_at = ?3 \
         WHERE id = ?1 AND state = 'SPAWNING' AND session_id IS NULL RETURNING ",
        mandelbox_columns!()
    ))
    .bind(id.to_string())
    .bind(rows::to_json_text(ports)?)
    .bind(micros(at))
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(warm) = warm {
        return Ok(Some(warm.into_record()?));
    }
    let Some(mandelbox) = select_mandelbox(conn, id).await? else {
        return Ok(None);
    };
    if mandelbox.state != MandelboxState::Spawning {
        return Ok(None);
    }
    let session = match mandelbox.session_id {
        Some(session_id) => select_session(conn, session_id).await?,
        None => None,
    };
    let (state, session_id) = rows::spawned_target(&mandelbox, session.as_ref());
    let spawned = sqlx::query_as::<_, MandelboxRow>(concat!(
        "UPDATE mandelboxes SET state = ?2, session_id = ?3, ports = ?4, updated_at = ?5 \
         WHERE id = ?1 RETURNING ",
        mandelbox_columns!()
    ))
    .bind(id.to_string())
    .bind(state.as_str())
    .bind(session_id.map(|id| id.to_string()))
    .bind(rows::to_json_text(ports)?)
    .bind(micros(at))
    .fetch_one(&mut *conn)
    .await?
    .into_record()?;
    Ok(Some(spawned))
}

/// `recycle_torn_down` inside the caller's write transaction (which changes
/// nothing when the box is not a DYING box of that host).
async fn recycled_in(
    conn: &mut SqliteConnection,
    host_id: &str,
    id: Uuid,
    replacement: Option<&WarmReplacement>,
    at: DateTime<Utc>,
) -> StoreResult<Recycled> {
    let finished = sqlx::query(
        "UPDATE mandelboxes SET state = 'DEAD', updated_at = ?3 \
         WHERE id = ?1 AND host_id = ?2 AND state = 'DYING'",
    )
    .bind(id.to_string())
    .bind(host_id)
    .bind(micros(at))
    .execute(&mut *conn)
    .await?
    .rows_affected()
        == 1;
    if !finished {
        return Ok(Recycled { finished, replacement: recorded_earlier(conn, host_id, replacement).await? });
    }
    let replacement = match (replacement, select_host(conn, host_id).await?) {
        (Some(warm), Some(host)) => warm_on_locked_host(conn, &host, warm, at).await?,
        _ => None,
    };
    Ok(Recycled { finished, replacement })
}

/// The replacement as an earlier application of the same write recorded it
/// (a retry after a lost commit acknowledgement): its id is new to every
/// write but that one, so a row with it on that host is that write's.
pub(super) async fn recorded_earlier(
    conn: &mut SqliteConnection,
    host_id: &str,
    replacement: Option<&WarmReplacement>,
) -> StoreResult<Option<MandelboxRecord>> {
    let Some(warm) = replacement else { return Ok(None) };
    Ok(select_mandelbox(conn, warm.id).await?.filter(|recorded| recorded.host_id == host_id))
}

/// Inserts a box its host has already spawned, WAITING with its ports, if the
/// host is ACTIVE and has a free slot (the write transaction holds the host).
async fn warm_on_locked_host(
    conn: &mut SqliteConnection,
    host: &HostRecord,
    warm: &WarmReplacement,
    at: DateTime<Utc>,
) -> StoreResult<Option<MandelboxRecord>> {
    if host.state != HostState::Active {
        return Ok(None);
    }
    let live = live_boxes_on(conn, &host.id).await?;
    if live >= i64::from(host.capacity) {
        return Ok(None);
    }
    let record = sqlx::query_as::<_, MandelboxRow>(concat!(
        "INSERT INTO mandelboxes (id, host_id, region, app, state, session_id, token_hash, ports, \
         created_at, updated_at) VALUES (?1, ?2, ?3, ?4, 'WAITING', NULL, ?5, ?6, ?7, ?7) RETURNING ",
        mandelbox_columns!()
    ))
    .bind(warm.id.to_string())
    .bind(&host.id)
    .bind(&host.region)
    .bind(&warm.app)
    .bind(&warm.token_hash)
    .bind(rows::to_json_text(&warm.ports)?)
    .bind(micros(at))
    .fetch_one(&mut *conn)
    .await?
    .into_record()?;
    Ok(Some(record))
}

/// The host's live boxes (the ones that take a slot).
async fn live_boxes_on(conn: &mut SqliteConnection, host_id: &str) -> StoreResult<i64> {
    Ok(sqlx::query_scalar(concat!(
        "SELECT count(*) FROM mandelboxes WHERE host_id = ?1 AND state IN ",
        live_box_states!()
    ))
    .bind(host_id)
    .fetch_one(&mut *conn)
    .await?)
}

async fn reserve_on_host(
    conn: &mut SqliteConnection,
    host_id: &str,
    news: &[NewMandelbox],
    at: DateTime<Utc>,
) -> StoreResult<Vec<MandelboxRecord>> {
    match select_host(conn, host_id).await? {
        Some(host) => reserve_on_locked_host(conn, &host, news, at).await,
        None => Ok(Vec::new()),
    }
}

/// `reserve_on_host` for a host the transaction has locked (read) already.
async fn reserve_on_locked_host(
    conn: &mut SqliteConnection,
    host: &HostRecord,
    news: &[NewMandelbox],
    at: DateTime<Utc>,
) -> StoreResult<Vec<MandelboxRecord>> {
    if host.state != HostState::Active {
        return Ok(Vec::new());
    }
    let live = live_boxes_on(conn, &host.id).await?;
    let free = usize::try_from(i64::from(host.capacity).saturating_sub(live)).unwrap_or(0);
    let mut reserved = Vec::with_capacity(free.min(news.len()));
    for new in news.iter().take(free) {
        let record = sqlx::query_as::<_, MandelboxRow>(concat!(
            "INSERT INTO mandelboxes (id, host_id, region, app, state, session_id, token_hash, ports, \
             created_at, updated_at) VALUES (?1, ?2, ?3, ?4, 'SPAWNING', ?5, ?6, '[]', ?7, ?7) RETURNING ",
            mandelbox_columns!()
        ))
        .bind(new.id.to_string())
        .bind(&host.id)
        .bind(&host.region)
        .bind(&new.app)
        .bind(new.session_id.map(|id| id.to_string()))
        .bind(&new.token_hash)
        .bind(micros(at))
        .fetch_one(&mut *conn)
        .await?
        .into_record()?;
        reserved.push(record);
    }
    Ok(reserved)
}

/// A host with its box counts, up to the WHERE clause (`list_hosts`,
/// `host_summary`). The live boxes are the count the triggers keep
/// (migration 0008), so only the warm and assigned ones are counted here.
macro_rules! host_summary_select {
    () => {
        "SELECT h.id, h.region, h.state, h.image, h.agent_version, h.address, h.capacity, \
         h.generation, h.last_heartbeat_at, h.disconnected_at, h.terminated_at, h.created_at, h.updated_at, \
         (SELECT count(*) FROM mandelboxes m WHERE m.host_id = h.id \
            AND m.state IN ('SPAWNING', 'WAITING')) AS warm, \
         (SELECT count(*) FROM mandelboxes m WHERE m.host_id = h.id \
            AND m.state IN ('ALLOCATED', 'RUNNING')) AS assigned, \
         h.live_boxes AS live \
         FROM hosts h"
    };
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    // ----- regions -----------------------------------------------------

    async fn put_region(&self, region: &Region) -> StoreResult<Region> {
        fleet::put_region(&self.writer, region).await
    }

    async fn list_regions(&self) -> StoreResult<Vec<Region>> {
        fleet::list_regions(&self.reader).await
    }

    // ----- leases, instances, operations ---------------------------------

    async fn acquire_lease(&self, name: &str, holder: &str, ttl: Duration) -> StoreResult<Option<Lease>> {
        fleet::acquire_lease(&self.writer, name, holder, ttl).await
    }

    async fn release_lease(&self, lease: &Lease) -> StoreResult<()> {
        fleet::release_lease(&self.writer, lease).await
    }

    async fn record_launch(&self, lease: &Lease, instances: &[NewInstance]) -> StoreResult<Vec<InstanceRecord>> {
        fleet::record_launch(&self.writer, lease, instances).await
    }

    async fn instance_launched(
        &self,
        host_id: &str,
        instance_id: &str,
        instance_type: &str,
        capacity: u32,
    ) -> StoreResult<Option<InstanceRecord>> {
        fleet::instance_launched(&self.writer, host_id, instance_id, instance_type, capacity).await
    }

    async fn set_instance_state(
        &self,
        lease: &Lease,
        host_id: &str,
        state: InstanceState,
        reason: &str,
    ) -> StoreResult<Option<InstanceRecord>> {
        fleet::set_instance_state(&self.writer, lease, host_id, state, reason).await
    }

    async fn list_instances(&self, region: Option<&str>, include_terminated: bool) -> StoreResult<Vec<InstanceRecord>> {
        fleet::list_instances(&self.reader, region, include_terminated).await
    }

    async fn count_instances(&self, region: &str) -> StoreResult<u64> {
        fleet::count_instances(&self.reader, region).await
    }

    async fn region_can_grow(&self, region: &str, max_instances: u32) -> StoreResult<bool> {
        fleet::region_can_grow(&self.reader, region, max_instances).await
    }

    async fn create_operation(&self, operation: &OperationRecord) -> StoreResult<()> {
        fleet::create_operation(&self.writer, operation).await
    }

    async fn update_operation(&self, lease: Option<&Lease>, operation: &OperationRecord) -> StoreResult<()> {
        fleet::update_operation(&self.writer, lease, operation).await
    }

    async fn get_operation(&self, id: Uuid) -> StoreResult<Option<OperationRecord>> {
        fleet::get_operation(&self.reader, id).await
    }

    async fn list_operations(&self, running_only: bool, limit: u32) -> StoreResult<Vec<OperationRecord>> {
        fleet::list_operations(&self.reader, running_only, limit).await
    }

    async fn complete_rollout(
        &self,
        lease: &Lease,
        operation: &OperationRecord,
        images: &[(String, String)],
    ) -> StoreResult<()> {
        fleet::complete_rollout(&self.writer, lease, operation, images).await
    }

    // ----- configuration -------------------------------------------------

    async fn config_entries(&self) -> StoreResult<Vec<(String, String)>> {
        Ok(sqlx::query_as::<_, (String, String)>("SELECT key, value FROM config ORDER BY key")
            .fetch_all(&self.reader)
            .await?)
    }

    // ----- users -------------------------------------------------------

    async fn ensure_user(&self, user_id: &str, email: Option<&str>) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO users (id, email, created_at) VALUES (?1, ?2, ?3) \
             ON CONFLICT (id) DO UPDATE SET email = excluded.email \
             WHERE excluded.email IS NOT NULL AND users.email IS NOT excluded.email",
        )
        .bind(user_id)
        .bind(email)
        .bind(micros(now()))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn get_user(&self, user_id: &str) -> StoreResult<Option<UserRecord>> {
        let row = sqlx::query_as::<_, (String, Option<String>, Option<String>)>(
            "SELECT id, email, stripe_customer_id FROM users WHERE id = ?1",
        )
        .bind(user_id)
        .fetch_optional(&self.reader)
        .await?;
        Ok(row.map(|(id, email, stripe_customer_id)| UserRecord { id, email, stripe_customer_id }))
    }

    async fn set_stripe_customer(&self, user_id: &str, customer_id: &str) -> StoreResult<Option<String>> {
        // Keep the first customer remembered: COALESCE makes a second writer a no-op.
        let row = sqlx::query_scalar::<_, Option<String>>(
            "UPDATE users SET stripe_customer_id = COALESCE(stripe_customer_id, ?2) WHERE id = ?1 \
             RETURNING stripe_customer_id",
        )
        .bind(user_id)
        .bind(customer_id)
        .fetch_optional(&self.writer)
        .await?;
        Ok(row.flatten())
    }

    // ----- hosts -------------------------------------------------------

    async fn host_connected(&self, hello: &HostHello) -> StoreResult<HostRecord> {
        let record = sqlx::query_as::<_, HostRow>(concat!(
            "INSERT INTO hosts (id, region, state, draining, image, agent_version, address, capacity, \
             generation, last_heartbeat_at, disconnected_at, created_at, updated_at) \
             VALUES (?1, ?2, 'ACTIVE', 0, ?3, ?4, ?5, ?6, 1, ?7, NULL, ?7, ?7) \
             ON CONFLICT (id) DO UPDATE SET region = excluded.region, image = excluded.image, \
             agent_version = excluded.agent_version, address = excluded.address, \
             capacity = excluded.capacity, generation = hosts.generation + 1, \
             state = CASE WHEN hosts.draining = 1 THEN 'DRAINING' ELSE 'ACTIVE' END, \
             last_heartbeat_at = excluded.last_heartbeat_at, disconnected_at = NULL, \
             updated_at = excluded.updated_at \
             RETURNING ",
            host_columns!()
        ))
        .bind(&hello.host_id)
        .bind(&hello.region)
        .bind(&hello.image)
        .bind(&hello.agent_version)
        .bind(&hello.address)
        .bind(i64::from(hello.capacity))
        .bind(micros(now()))
        .fetch_one(&self.writer)
        .await?
        .into_record()?;
        fleet::instance_connected(&self.writer, &hello.host_id).await?;
        Ok(record)
    }

    async fn host_disconnected(&self, host_id: &str, generation: u64) -> StoreResult<bool> {
        let Some(generation) = rows::generation_param(generation) else {
            return Ok(false);
        };
        let result = sqlx::query(
            "UPDATE hosts SET state = 'DISCONNECTED', disconnected_at = ?3, updated_at = ?3 \
             WHERE id = ?1 AND generation = ?2 AND state IN ('ACTIVE', 'DRAINING')",
        )
        .bind(host_id)
        .bind(generation)
        .bind(micros(now()))
        .execute(&self.writer)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    async fn record_heartbeats(&self, beats: &[HeartbeatMark], at: DateTime<Utc>) -> StoreResult<()> {
        if beats.is_empty() {
            return Ok(());
        }
        // One write transaction for the batch: the single writer is taken once.
        let mut tx = self.begin_write().await?;
        for beat in beats {
            let Some(generation) = rows::generation_param(beat.generation) else {
                continue;
            };
            sqlx::query("UPDATE hosts SET last_heartbeat_at = ?3 WHERE id = ?1 AND generation = ?2")
                .bind(&beat.host_id)
                .bind(generation)
                .bind(micros(at))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn drain_host(&self, host_id: &str) -> StoreResult<Option<HostRecord>> {
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "UPDATE hosts SET state = 'DRAINING', draining = 1, updated_at = ?2 \
             WHERE id = ?1 AND state = 'ACTIVE'",
        )
        .bind(host_id)
        .bind(micros(now()))
        .execute(&mut *tx)
        .await?;
        let host = select_host(&mut tx, host_id).await?;
        tx.commit().await?;
        Ok(host)
    }

    async fn mark_host_lost(&self, host_id: &str, generation: Option<u64>) -> StoreResult<Vec<SessionRecord>> {
        let at = now();
        let mut tx = self.begin_write().await?;
        let Some(host) = select_host(&mut tx, host_id).await? else {
            return Ok(Vec::new());
        };
        if generation.is_some_and(|generation| generation != host.generation) {
            return Ok(Vec::new());
        }
        sqlx::query(
            "UPDATE hosts SET state = 'UNHEALTHY', updated_at = ?2 \
             WHERE id = ?1 AND state <> 'UNHEALTHY'",
        )
        .bind(host_id)
        .bind(micros(at))
        .execute(&mut *tx)
        .await?;
        let lost: Vec<String> = sqlx::query_scalar(concat!(
            "UPDATE mandelboxes SET state = 'LOST', updated_at = ?2 \
             WHERE host_id = ?1 AND state IN ",
            live_box_states!(),
            " RETURNING id"
        ))
        .bind(host_id)
        .bind(micros(at))
        .fetch_all(&mut *tx)
        .await?;
        let lost = lost.iter().map(|id| uuid("mandelboxes.id", id)).collect::<StoreResult<Vec<Uuid>>>()?;
        let ended = end_sessions_on(&mut tx, &lost, EndReason::HostLost, at).await?;
        tx.commit().await?;
        Ok(ended)
    }

    async fn get_host(&self, host_id: &str) -> StoreResult<Option<HostRecord>> {
        let mut conn = self.reader.acquire().await?;
        select_host(&mut conn, host_id).await
    }

    async fn list_hosts(&self, region: Option<&str>) -> StoreResult<Vec<HostSummary>> {
        let rows = sqlx::query_as::<_, HostSummaryRow>(concat!(
            host_summary_select!(),
            " WHERE (?1 IS NULL OR h.region = ?1) AND h.terminated_at IS NULL ORDER BY h.id"
        ))
        .bind(region)
        .fetch_all(&self.reader)
        .await?;
        rows.into_iter().map(HostSummaryRow::into_summary).collect()
    }

    async fn hosts_with_open_slots(&self) -> StoreResult<Vec<String>> {
        // The live boxes the triggers of migration 0008 count: a scan of the
        // hosts' rows, no box read (2–4 ms at 15,000 hosts).
        Ok(sqlx::query_scalar("SELECT id FROM hosts WHERE state = 'ACTIVE' AND capacity - live_boxes > 0 ORDER BY id")
            .fetch_all(&self.reader)
            .await?)
    }

    async fn box_coming_in(&self, regions: &[String]) -> StoreResult<bool> {
        // From the boxes' side, one state at a time, each through an index
        // that holds only that state's boxes (WAITING and DYING by region,
        // SPAWNING by age: the spawns in flight), so that a "no" costs three
        // short index walks, not a probe of every host of the region. The
        // planner would scan the hosts for the SPAWNING part unless told.
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM mandelboxes m JOIN hosts h ON h.id = m.host_id \
                            WHERE m.state = 'WAITING' AND m.region IN (SELECT value FROM json_each(?1)) \
                              AND h.state = 'ACTIVE') \
                 OR EXISTS (SELECT 1 FROM mandelboxes m JOIN hosts h ON h.id = m.host_id \
                            WHERE m.state = 'DYING' AND m.region IN (SELECT value FROM json_each(?1)) \
                              AND h.state = 'ACTIVE') \
                 OR EXISTS (SELECT 1 FROM mandelboxes m INDEXED BY mandelboxes_spawning_since \
                            JOIN hosts h ON h.id = m.host_id \
                            WHERE m.state = 'SPAWNING' AND m.region IN (SELECT value FROM json_each(?1)) \
                              AND h.state = 'ACTIVE')",
        )
        .bind(json_list(regions)?)
        .fetch_one(&self.reader)
        .await?)
    }

    async fn host_summary(&self, host_id: &str) -> StoreResult<Option<HostSummary>> {
        sqlx::query_as::<_, HostSummaryRow>(concat!(
            host_summary_select!(),
            " WHERE h.id = ?1 AND h.terminated_at IS NULL"
        ))
        .bind(host_id)
        .fetch_optional(&self.reader)
        .await?
        .map(HostSummaryRow::into_summary)
        .transpose()
    }

    async fn hosts_disconnected_before(&self, cutoff: DateTime<Utc>) -> StoreResult<Vec<HostRecord>> {
        let rows = sqlx::query_as::<_, HostRow>(concat!(
            "SELECT ",
            host_columns!(),
            " FROM hosts WHERE state = 'DISCONNECTED' AND disconnected_at < ?1 \
             ORDER BY disconnected_at, id"
        ))
        .bind(micros(cutoff))
        .fetch_all(&self.reader)
        .await?;
        hosts(rows)
    }

    async fn connected_hosts_changed_before(&self, cutoff: DateTime<Utc>) -> StoreResult<Vec<HostRecord>> {
        let rows = sqlx::query_as::<_, HostRow>(concat!(
            "SELECT ",
            host_columns!(),
            " FROM hosts WHERE state IN ('ACTIVE', 'DRAINING') AND updated_at < ?1 ORDER BY id"
        ))
        .bind(micros(cutoff))
        .fetch_all(&self.reader)
        .await?;
        hosts(rows)
    }

    async fn mark_connected_hosts_disconnected(&self, at: DateTime<Utc>) -> StoreResult<u64> {
        let result = sqlx::query(
            "UPDATE hosts SET state = 'DISCONNECTED', disconnected_at = ?1, updated_at = ?2 \
             WHERE state IN ('ACTIVE', 'DRAINING')",
        )
        .bind(micros(at))
        .bind(micros(now()))
        .execute(&self.writer)
        .await?;
        Ok(result.rows_affected())
    }

    async fn reconcile_host(
        &self,
        host_id: &str,
        reported: &[ReportedMandelbox],
        claimed_before: DateTime<Utc>,
    ) -> StoreResult<Reconciliation> {
        let at = now();
        let mut tx = self.begin_write().await?;
        let reported_ids = rows::unique_ids(reported);
        if select_host(&mut tx, host_id).await?.is_none() {
            return Ok(Reconciliation { teardown: reported_ids, ..Reconciliation::default() });
        }
        // The host's live boxes only: a reported box that is not one of them
        // is torn down whatever its row says (`ReconcilePlan::new`).
        let known = sqlx::query_as::<_, MandelboxRow>(concat!(
            "SELECT ",
            mandelbox_columns!(),
            " FROM mandelboxes WHERE host_id = ?1 AND state IN ",
            live_box_states!()
        ))
        .bind(host_id)
        .fetch_all(&mut *tx)
        .await?;
        let plan = rows::ReconcilePlan::new(reported, &mandelboxes(known)?, claimed_before);

        sqlx::query(concat!(
            "UPDATE mandelboxes SET state = 'LOST', updated_at = ?2 \
             WHERE id IN (SELECT value FROM json_each(?1)) AND state IN ",
            live_box_states!()
        ))
        .bind(json_list(&plan.missing)?)
        .bind(micros(at))
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE mandelboxes SET state = 'DEAD', updated_at = ?2 \
             WHERE id IN (SELECT value FROM json_each(?1)) AND state = 'SPAWNING'",
        )
        .bind(json_list(&plan.unconfirmed_spawns)?)
        .bind(micros(at))
        .execute(&mut *tx)
        .await?;
        // The write transaction excludes any other claim, so the plan holds.
        sqlx::query(
            "UPDATE mandelboxes SET state = 'WAITING', session_id = NULL, updated_at = ?2 \
             WHERE id IN (SELECT value FROM json_each(?1)) AND state IN ('ALLOCATED', 'RUNNING')",
        )
        .bind(json_list(&plan.unassigned)?)
        .bind(micros(at))
        .execute(&mut *tx)
        .await?;
        let mut ended_sessions = end_sessions_on(&mut tx, &plan.missing, EndReason::HostLost, at).await?;
        ended_sessions.extend(end_sessions_on(&mut tx, &plan.unassigned, EndReason::AssignFailed, at).await?);
        tx.commit().await?;
        Ok(Reconciliation { teardown: plan.teardown, lost: plan.missing, unassigned: plan.unassigned, ended_sessions })
    }

    // ----- mandelboxes -------------------------------------------------

    async fn reserve_mandelboxes(&self, host_id: &str, news: &[NewMandelbox]) -> StoreResult<Vec<MandelboxRecord>> {
        let mut tx = self.begin_write().await?;
        let reserved = reserve_on_host(&mut tx, host_id, news, now()).await?;
        if !reserved.is_empty() {
            tx.commit().await?;
        }
        Ok(reserved)
    }

    async fn reserve_mandelbox_in_regions(
        &self,
        regions: &[String],
        exclude_hosts: &[String],
        new: &NewMandelbox,
    ) -> StoreResult<Option<MandelboxRecord>> {
        let excluded = json_list(exclude_hosts)?;
        let mut tx = self.begin_write().await?;
        let mut seen = std::collections::HashSet::with_capacity(regions.len());
        for region in regions.iter().filter(|region| seen.insert(region.as_str())) {
            // The region's fullest ACTIVE host with room, by `hosts_room`
            // (migration 0008: the live boxes the triggers count): the walk
            // starts at the first host with room, so a full region costs one
            // index probe. The expression is the index's, word for word.
            let best: Option<String> = sqlx::query_scalar(
                "SELECT h.id FROM hosts h LEFT JOIN regions r ON r.name = h.region \
                 WHERE h.region = ?1 AND h.state = 'ACTIVE' AND h.capacity - h.live_boxes > 0 \
                   AND h.id NOT IN (SELECT value FROM json_each(?2)) \
                   AND (COALESCE(r.image, '') = '' OR h.image = r.image) \
                 ORDER BY h.capacity - h.live_boxes, h.id LIMIT 1",
            )
            .bind(region)
            .bind(&excluded)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(host_id) = best else {
                continue;
            };
            // The write transaction keeps the count true, so this cannot refuse.
            let reserved = reserve_on_host(&mut tx, &host_id, std::slice::from_ref(new), now()).await?.pop();
            tx.commit().await?;
            return Ok(reserved);
        }
        Ok(None)
    }

    async fn mandelbox_spawned(&self, id: Uuid, ports: &[PortSpec]) -> StoreResult<Option<MandelboxRecord>> {
        let mut tx = self.begin_write().await?;
        let spawned = spawned_in(&mut tx, id, ports, now()).await?;
        tx.commit().await?;
        Ok(spawned)
    }

    async fn mandelboxes_spawned(&self, reports: &[SpawnReport]) -> StoreResult<Vec<Option<MandelboxRecord>>> {
        if reports.len() < 2 {
            let mut spawned = Vec::with_capacity(reports.len());
            for report in reports {
                spawned.push(self.mandelbox_spawned(report.id, &report.ports).await?);
            }
            return Ok(spawned);
        }
        // The common case for all at once (one statement, one hand-off to
        // the writer), then any other report on its own, as PostgreSQL does.
        let mut warm = batches::spawned_warm(&self.writer, reports, now()).await?;
        let mut spawned = Vec::with_capacity(reports.len());
        for report in reports {
            match warm.remove(&report.id.to_string()) {
                Some(row) => spawned.push(Some(row.into_record()?)),
                // Reserved for a session, or no longer SPAWNING: the general case.
                None => spawned.push(self.mandelbox_spawned(report.id, &report.ports).await?),
            }
        }
        Ok(spawned)
    }

    async fn recycle_torn_down(
        &self,
        host_id: &str,
        id: Uuid,
        replacement: Option<&WarmReplacement>,
    ) -> StoreResult<Recycled> {
        let mut tx = self.begin_write().await?;
        let recycled = recycled_in(&mut tx, host_id, id, replacement, now()).await?;
        tx.commit().await?;
        Ok(recycled)
    }

    async fn recycle_torn_down_many(&self, torn_down: &[TornDown]) -> StoreResult<Vec<Recycled>> {
        let at = now();
        let mut tx = self.begin_write().await?;
        let recycled = if torn_down.len() < 2 || batches::has_duplicates(torn_down.iter().map(|item| item.id)) {
            let mut recycled = Vec::with_capacity(torn_down.len());
            for item in torn_down {
                recycled.push(recycled_in(&mut tx, &item.host_id, item.id, item.replacement.as_ref(), at).await?);
            }
            recycled
        } else {
            batches::recycled(&mut tx, torn_down, at).await?
        };
        tx.commit().await?;
        Ok(recycled)
    }

    async fn mandelbox_finished(
        &self,
        id: Uuid,
        state: MandelboxState,
        reason: EndReason,
    ) -> StoreResult<Option<(MandelboxRecord, Option<SessionRecord>)>> {
        rows::check_finished_state(state)?;
        let at = now();
        let mut tx = self.begin_write().await?;
        let Some(before) = select_mandelbox(&mut tx, id).await? else {
            return Ok(None);
        };
        if !before.state.is_live() {
            return Ok(None);
        }
        sqlx::query("UPDATE mandelboxes SET state = ?2, updated_at = ?3 WHERE id = ?1")
            .bind(id.to_string())
            .bind(state.as_str())
            .bind(micros(at))
            .execute(&mut *tx)
            .await?;
        let ended = end_sessions_on(&mut tx, &[id], reason, at).await?;
        tx.commit().await?;
        Ok(Some((before, ended.into_iter().next())))
    }

    async fn get_mandelbox(&self, id: Uuid) -> StoreResult<Option<MandelboxRecord>> {
        let mut conn = self.reader.acquire().await?;
        select_mandelbox(&mut conn, id).await
    }

    async fn mandelbox_auth(&self, id: Uuid) -> StoreResult<Option<MandelboxAuth>> {
        mandelbox_auth_on(&self.reader, id).await
    }

    async fn list_mandelboxes(&self, filter: &MandelboxFilter) -> StoreResult<Vec<MandelboxRecord>> {
        let rows = sqlx::query_as::<_, MandelboxRow>(concat!(
            "SELECT ",
            mandelbox_columns!(),
            " FROM mandelboxes \
             WHERE (?1 IS NULL OR host_id = ?1) AND (?2 IS NULL OR state = ?2) \
               AND (?3 OR state NOT IN ('DEAD', 'LOST')) \
             ORDER BY id DESC LIMIT 1000"
        ))
        .bind(filter.host_id.as_deref())
        .bind(filter.state.map(MandelboxState::as_str))
        .bind(filter.include_finished)
        .fetch_all(&self.reader)
        .await?;
        mandelboxes(rows)
    }

    async fn host_mandelboxes(&self, host_id: &str, states: &[MandelboxState]) -> StoreResult<Vec<MandelboxRecord>> {
        let rows = sqlx::query_as::<_, MandelboxRow>(concat!(
            "SELECT ",
            mandelbox_columns!(),
            " FROM mandelboxes WHERE host_id = ?1 AND state IN (SELECT value FROM json_each(?2)) \
               AND state IN ",
            live_box_states!(),
            " ORDER BY created_at, id"
        ))
        .bind(host_id)
        .bind(json_list(states)?)
        .fetch_all(&self.reader)
        .await?;
        mandelboxes(rows)
    }

    // ----- sessions and claims -----------------------------------------

    async fn create_session_and_claim(&self, new: &NewSession, limit: u32) -> StoreResult<ClaimOutcome> {
        let mut tx = self.begin_write().await?;
        let outcome = create_session_and_claim_in(&mut tx, new, limit, now()).await?;
        tx.commit().await?;
        Ok(outcome)
    }

    async fn create_sessions_and_claim(
        &self,
        news: &[NewSession],
        limit: u32,
    ) -> StoreResult<Vec<Option<ClaimOutcome>>> {
        // One write transaction (one commit) for the batch: each session as
        // `create_session_and_claim` writes it, in order. A user at the limit
        // is left to the caller, as is a user's second session in the batch
        // (as on PostgreSQL, whose batch statement counts a user once).
        let at = now();
        let mut tx = self.begin_write().await?;
        let mut seen = std::collections::HashSet::with_capacity(news.len());
        let mut outcomes = Vec::with_capacity(news.len());
        for new in news {
            if !seen.insert(new.user_id.as_str()) {
                outcomes.push(None);
                continue;
            }
            match create_session_and_claim_in(&mut tx, new, limit, at).await {
                Ok(outcome) => outcomes.push(Some(outcome)),
                Err(StoreError::SessionLimit { .. }) => outcomes.push(None),
                Err(error) => return Err(error),
            }
        }
        tx.commit().await?;
        Ok(outcomes)
    }

    async fn claim_for_session(&self, session_id: Uuid, exclude_hosts: &[String]) -> StoreResult<Option<Claim>> {
        let at = now();
        let mut tx = self.begin_write().await?;
        let Some(session) = select_session(&mut tx, session_id).await? else {
            return Ok(None);
        };
        if session.state != SessionState::Pending {
            return Ok(None);
        }
        let Some(mandelbox) =
            claim_waiting(&mut tx, &session.requested_regions, &session.app, exclude_hosts, session_id, at).await?
        else {
            return Ok(None);
        };
        let session = assign_session(&mut tx, session_id, &mandelbox, at).await?;
        let host = host_of(&mut tx, &mandelbox).await?;
        tx.commit().await?;
        Ok(Some(Claim { session, mandelbox, host }))
    }

    async fn attach_reserved(&self, session_id: Uuid, mandelbox_id: Uuid) -> StoreResult<Option<Claim>> {
        let at = now();
        let mut tx = self.begin_write().await?;
        let Some(session) = select_session(&mut tx, session_id).await? else {
            return Ok(None);
        };
        if session.state != SessionState::Pending {
            return Ok(None);
        }
        let Some(mandelbox) = select_mandelbox(&mut tx, mandelbox_id).await? else {
            return Ok(None);
        };
        if mandelbox.state != MandelboxState::Allocated || mandelbox.session_id != Some(session_id) {
            return Ok(None);
        }
        let session = assign_session(&mut tx, session_id, &mandelbox, at).await?;
        let host = host_of(&mut tx, &mandelbox).await?;
        tx.commit().await?;
        Ok(Some(Claim { session, mandelbox, host }))
    }

    async fn confirm_assignment(&self, session_id: Uuid, mandelbox_id: Uuid) -> StoreResult<Option<SessionRecord>> {
        let at = now();
        let mut tx = self.begin_write().await?;
        // Each UPDATE checks what it needs; if either finds nothing, dropping
        // the transaction rolls the other back.
        let Some(session) = sqlx::query_as::<_, SessionRow>(concat!(
            "UPDATE sessions SET state = 'RUNNING', updated_at = ?2 \
             WHERE id = ?1 AND state = 'ASSIGNING' AND mandelbox_id = ?3 RETURNING ",
            session_columns!()
        ))
        .bind(session_id.to_string())
        .bind(micros(at))
        .bind(mandelbox_id.to_string())
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(None);
        };
        let updated = sqlx::query(
            "UPDATE mandelboxes SET state = 'RUNNING', updated_at = ?2 \
             WHERE id = ?1 AND state = 'ALLOCATED' AND session_id = ?3",
        )
        .bind(mandelbox_id.to_string())
        .bind(micros(at))
        .bind(session_id.to_string())
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() != 1 {
            return Ok(None);
        }
        let session = session.into_record()?;
        tx.commit().await?;
        Ok(Some(session))
    }

    async fn release_claim(&self, session_id: Uuid, mandelbox_id: Uuid, box_state: MandelboxState) -> StoreResult<()> {
        let at = now();
        let mut tx = self.begin_write().await?;
        let Some(session) = select_session(&mut tx, session_id).await? else {
            return Ok(());
        };
        let claimed = matches!(session.state, SessionState::Assigning | SessionState::Running);
        if !claimed || session.mandelbox_id != Some(mandelbox_id) {
            return Ok(());
        }
        // A box put back into the pool carries no session.
        sqlx::query(concat!(
            "UPDATE mandelboxes SET state = ?2, updated_at = ?3, \
             session_id = CASE WHEN ?2 = 'WAITING' THEN NULL ELSE session_id END \
             WHERE id = ?1 AND state IN ",
            live_box_states!()
        ))
        .bind(mandelbox_id.to_string())
        .bind(box_state.as_str())
        .bind(micros(at))
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE sessions SET state = 'PENDING', region = NULL, mandelbox_id = NULL, \
             host_id = NULL, updated_at = ?2 WHERE id = ?1",
        )
        .bind(session_id.to_string())
        .bind(micros(at))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn end_session(&self, session_id: Uuid, reason: EndReason) -> StoreResult<Option<EndedSession>> {
        let mut tx = self.begin_write().await?;
        let ended = ended_in(&mut tx, session_id, reason, now()).await?;
        tx.commit().await?;
        Ok(ended)
    }

    async fn end_session_by_token(
        &self,
        mandelbox_id: Uuid,
        token_hash: &str,
        reason: EndReason,
    ) -> StoreResult<TokenEnd> {
        // The check and the end in one write transaction: one hand-off to
        // the writer instead of a read and then a write.
        let mut tx = self.begin_write().await?;
        let end = ended_by_token_in(&mut tx, mandelbox_id, token_hash, reason, now()).await?;
        tx.commit().await?;
        Ok(end)
    }

    async fn end_sessions_by_token(
        &self,
        reports: &[DisconnectReport],
        reason: EndReason,
    ) -> StoreResult<Vec<TokenEnd>> {
        // One write transaction for the batch: a statement per step for
        // distinct boxes (`sqlite_batches`), else each report as alone.
        let at = now();
        let mut tx = self.begin_write().await?;
        let batched = if reports.len() < 2 || batches::has_duplicates(reports.iter().map(|report| report.mandelbox_id))
        {
            None
        } else {
            batches::ended_by_token(&mut tx, reports, reason, at).await?
        };
        let ends = match batched {
            Some(ends) => ends,
            None => {
                let mut ends = Vec::with_capacity(reports.len());
                for report in reports {
                    ends.push(ended_by_token_in(&mut tx, report.mandelbox_id, &report.token_hash, reason, at).await?);
                }
                ends
            }
        };
        tx.commit().await?;
        Ok(ends)
    }

    async fn get_session(&self, id: Uuid) -> StoreResult<Option<SessionRecord>> {
        let mut conn = self.reader.acquire().await?;
        select_session(&mut conn, id).await
    }

    async fn list_sessions(&self, filter: &SessionFilter) -> StoreResult<Vec<SessionRecord>> {
        let rows = sqlx::query_as::<_, SessionRow>(concat!(
            "SELECT ",
            session_columns!(),
            " FROM sessions WHERE (?1 IS NULL OR user_id = ?1) AND (?2 OR state <> 'ENDED') \
             ORDER BY id DESC LIMIT ?3"
        ))
        .bind(filter.user_id.as_deref())
        .bind(filter.include_ended)
        .bind(i64::from(rows::session_list_limit(filter.limit)))
        .fetch_all(&self.reader)
        .await?;
        sessions(rows)
    }

    async fn pending_sessions(&self, limit: u32) -> StoreResult<Vec<SessionRecord>> {
        let rows = sqlx::query_as::<_, SessionRow>(concat!(
            "SELECT ",
            session_columns!(),
            " FROM sessions WHERE state = 'PENDING' ORDER BY created_at, id LIMIT ?1"
        ))
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        sessions(rows)
    }

    async fn count_live_sessions(&self, user_id: &str) -> StoreResult<u32> {
        let live: i64 = sqlx::query_scalar("SELECT count(*) FROM sessions WHERE user_id = ?1 AND state <> 'ENDED'")
            .bind(user_id)
            .fetch_one(&self.reader)
            .await?;
        rows::to_u32("count", live)
    }

    async fn refresh_host_ranks(&self) -> StoreResult<u64> {
        // Nothing kept: a claim here counts each candidate host's boxes (one
        // writer, and the embedded store serves small fleets).
        Ok(0)
    }

    async fn sweep(&self, pending_cutoff: DateTime<Utc>, spawn_cutoff: DateTime<Utc>) -> StoreResult<SweepOutcome> {
        let at = now();
        let mut tx = self.begin_write().await?;
        let expired_pending = sqlx::query_as::<_, SessionRow>(concat!(
            "UPDATE sessions SET state = 'ENDED', end_reason = 'NO_CAPACITY', ended_at = ?2, \
             updated_at = ?2 WHERE state = 'PENDING' AND created_at < ?1 RETURNING ",
            session_columns!()
        ))
        .bind(micros(pending_cutoff))
        .bind(micros(at))
        .fetch_all(&mut *tx)
        .await?;
        // Sessions reserved on these boxes are PENDING (never on the box), so
        // they simply stay in the queue.
        let expired_spawns = sqlx::query_as::<_, MandelboxRow>(concat!(
            "UPDATE mandelboxes SET state = 'DEAD', updated_at = ?2 \
             WHERE state = 'SPAWNING' AND updated_at < ?1 RETURNING ",
            mandelbox_columns!()
        ))
        .bind(micros(spawn_cutoff))
        .bind(micros(at))
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let mut expired_pending = sessions(expired_pending)?;
        expired_pending.sort_by_key(|session| (session.created_at, session.id));
        let mut expired_spawns = mandelboxes(expired_spawns)?;
        expired_spawns.sort_by_key(|mandelbox| (mandelbox.created_at, mandelbox.id));
        Ok(SweepOutcome { expired_pending, expired_spawns })
    }
}
