//! PostgreSQL store: the production backend, shared by every replica.
//!
//! Concurrency rests on row locks inside READ COMMITTED transactions:
//! * a claim picks its box with `FOR UPDATE SKIP LOCKED`, so concurrent claimers
//!   (in this process or another) never wait for each other nor take the
//!   same box;
//! * the session limit locks the user row, so a user's concurrent requests
//!   count sessions one after the other;
//! * a reservation locks the host row, so capacity is checked and used
//!   atomically.
//!
//! To avoid deadlocks, transactions that lock several kinds of rows take them in
//! one order: user → host → sessions → mandelboxes.
//!
//! Durability is spent where it matters. Whatever a client is told (a claim, a
//! session created, running or ended) and anything that ends a session
//! commits with the WAL flushed (PostgreSQL's `synchronous_commit` as
//! configured). Warm-pool bookkeeping that no client sees (a slot reserved, a
//! box warm, a box torn down with no session on it, heartbeat times) commits
//! without waiting for the flush (`commit_relaxed`): on a disk whose flush
//! costs milliseconds that is most of the waiting in an allocation cycle. A
//! PostgreSQL crash can lose the last few hundred milliseconds of such
//! transitions and nothing else: no session changes, a box whose warm-up was
//! lost is expired by the sweep, and the host's next Hello reconciles what it
//! runs.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, Postgres};
use sqlx::types::Json;
use uuid::Uuid;

use super::postgres_fleet as fleet;
use super::postgres_joined::{
    BoxColumns, ClaimedHostColumns, EndedSessionColumns, box_columns_of, claimed_host_columns_of,
    ended_session_columns_of,
};
use super::rows::{self, host_columns, live_box_states, live_session_states, mandelbox_columns, now, session_columns};
use super::{
    Claim, ClaimOutcome, DisconnectReport, EndedSession, HeartbeatMark, MandelboxAuth, MandelboxFilter, NewMandelbox,
    NewSession, Reconciliation, Recycled, ReportedMandelbox, SessionFilter, SpawnReport, Store, StoreError,
    StoreResult, SweepOutcome, TokenEnd, TornDown, WarmReplacement, ended_one_by_one, recycled_one_by_one,
    spawned_one_by_one,
};
use crate::model::{
    EndReason, HostHello, HostRecord, HostState, HostSummary, InstanceRecord, InstanceState, Lease, MandelboxRecord,
    MandelboxState, NewInstance, OperationRecord, PortSpec, Region, SessionRecord, SessionState, UserRecord,
};

pub struct PgStore {
    pool: PgPool,
    /// Connections that commit without waiting for the WAL flush
    /// (`synchronous_commit = off` for the whole connection), for warm-pool
    /// bookkeeping: a single statement on it is one round trip, where a
    /// relaxed transaction on `pool` takes three (see the module's notes).
    relaxed: PgPool,
}

impl PgStore {
    pub async fn connect(url: &str, max_connections: u32) -> StoreResult<Self> {
        let options: PgConnectOptions = url.parse()?;
        let options = with_session_settings(options);
        let pool = pool_options(max_connections).connect_with(options.clone()).await?;
        // Opened as bookkeeping needs them, so an idle replica holds none.
        let relaxed = pool_options((max_connections / 2).max(1))
            .connect_lazy_with(options.options([("synchronous_commit", "off")]));
        Ok(Self { pool, relaxed })
    }

    /// Applies pending migrations. sqlx holds a PostgreSQL advisory lock while
    /// migrating, so replicas starting together apply each migration once.
    pub async fn migrate(&self) -> StoreResult<()> {
        sqlx::migrate!("../migrations/postgres").run(&self.pool).await?;
        Ok(())
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// Planner settings every connection of the store starts with, unless the
/// database URL's `options` set them already.
///
/// No bitmap scans. The store's hot statements look up a few live rows of
/// tables whose rows change state thousands of times a second (a box WAITING,
/// RUNNING, DYING, DEAD; a session), and each change leaves an index entry
/// pointing at a dead row version until a vacuum clears it. A plain index scan
/// that finds such an entry marks it dead, so the next scan steps over it
/// without reading the table; a bitmap scan reads the table for every entry
/// and marks none. With bitmap scans, which the planner picks for a host's
/// boxes, every claim, count of a host's boxes and bookkeeping batch read
/// every version since the last vacuum: at 64 clients Allocate fell from
/// about 3,100/s to about 620/s within a minute, and autovacuum, which visits
/// a database at most once a minute, cannot keep up with that (BENCHMARKS.md
/// run Z: 3,540–3,587/s over one and three minutes without them).
const SESSION_SETTINGS: [(&str, &str); 1] = [("enable_bitmapscan", "off")];

fn with_session_settings(options: PgConnectOptions) -> PgConnectOptions {
    let given = options.get_options().unwrap_or_default().to_owned();
    options.options(SESSION_SETTINGS.into_iter().filter(|(name, _)| !given.contains(name)))
}

fn pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        // A database that cannot hand out a connection within this is
        // unavailable: callers get UNAVAILABLE instead of hanging.
        .acquire_timeout(Duration::from_secs(3))
        // No ping before each use: it would add a round trip to every
        // transaction. A connection that died (a database restart) fails
        // its next query, which the caller sees as UNAVAILABLE, and the
        // pool replaces it.
        .test_before_acquire(false)
}

// ----- rows ---------------------------------------------------------------

#[derive(sqlx::FromRow)]
pub(super) struct HostRow {
    pub(super) id: String,
    pub(super) region: String,
    pub(super) state: String,
    pub(super) image: String,
    pub(super) agent_version: String,
    pub(super) address: String,
    pub(super) capacity: i64,
    pub(super) generation: i64,
    pub(super) last_heartbeat_at: Option<DateTime<Utc>>,
    pub(super) disconnected_at: Option<DateTime<Utc>>,
    pub(super) terminated_at: Option<DateTime<Utc>>,
    pub(super) created_at: DateTime<Utc>,
    pub(super) updated_at: DateTime<Utc>,
}

impl HostRow {
    fn into_record(self) -> StoreResult<HostRecord> {
        Ok(HostRecord {
            state: rows::parse_enum("hosts.state", &self.state, HostState::parse)?,
            capacity: rows::to_u32("hosts.capacity", self.capacity)?,
            generation: rows::to_u64("hosts.generation", self.generation)?,
            id: self.id,
            region: self.region,
            image: self.image,
            agent_version: self.agent_version,
            address: self.address,
            last_heartbeat_at: self.last_heartbeat_at,
            disconnected_at: self.disconnected_at,
            terminated_at: self.terminated_at,
            created_at: self.created_at,
            updated_at: self.updated_at,
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
    pub(super) id: Uuid,
    pub(super) host_id: String,
    pub(super) region: String,
    pub(super) app: String,
    pub(super) state: String,
    pub(super) session_id: Option<Uuid>,
    pub(super) ports: serde_json::Value,
    pub(super) created_at: DateTime<Utc>,
    pub(super) updated_at: DateTime<Utc>,
}

impl MandelboxRow {
    fn into_record(self) -> StoreResult<MandelboxRecord> {
        Ok(MandelboxRecord {
            state: rows::parse_enum("mandelboxes.state", &self.state, MandelboxState::parse)?,
            ports: rows::ports_from_json(self.ports)?,
            id: self.id,
            host_id: self.host_id,
            region: self.region,
            app: self.app,
            session_id: self.session_id,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

#[derive(sqlx::FromRow)]
struct MandelboxAuthRow {
    #[sqlx(flatten)]
    mandelbox: MandelboxRow,
    token_hash: String,
}

/// `create_session_and_claim`'s row: the inserted session and, if a box was
/// claimed, the box and its host.
#[derive(sqlx::FromRow)]
struct SessionClaimRow {
    #[sqlx(flatten)]
    session: SessionRow,
    #[sqlx(flatten)]
    claimed_box: BoxColumns,
    #[sqlx(flatten)]
    claimed_host: ClaimedHostColumns,
}

impl SessionClaimRow {
    fn into_outcome(self) -> StoreResult<ClaimOutcome> {
        let session = self.session.into_record()?;
        match (self.claimed_box.into_row()?, self.claimed_host.into_row()?) {
            (Some(mandelbox), Some(host)) => Ok(ClaimOutcome::Claimed(Claim {
                session,
                mandelbox: mandelbox.into_record()?,
                host: host.into_record()?,
            })),
            (None, None) => Ok(ClaimOutcome::Pending(session)),
            _ => Err(StoreError::Corrupt("a claimed box without its host".into())),
        }
    }
}

/// `create_sessions_and_claim`'s row: a session's row as above and its
/// 1-based place in the batch.
#[derive(sqlx::FromRow)]
struct BatchClaimRow {
    batch_n: i64,
    #[sqlx(flatten)]
    claim: SessionClaimRow,
}

/// `end_session_by_token`'s row: the box's state, session and whether the
/// token matched, and what was ended (NULL columns if nothing was).
#[derive(sqlx::FromRow)]
struct TokenEndRow {
    /// NULL: no such box.
    auth_state: Option<String>,
    auth_session_id: Option<Uuid>,
    token_ok: bool,
    #[sqlx(flatten)]
    ended_session: EndedSessionColumns,
    #[sqlx(flatten)]
    dying_box: BoxColumns,
}

impl TokenEndRow {
    fn into_token_end(self) -> StoreResult<TokenEnd> {
        let Some(box_state) = self.auth_state else {
            return Ok(TokenEnd::UnknownBox);
        };
        if !self.token_ok {
            return Ok(TokenEnd::WrongToken);
        }
        let state = rows::parse_enum("mandelboxes.state", &box_state, MandelboxState::parse)?;
        let session_id = match TokenEnd::session_to_end(state, self.auth_session_id) {
            Ok(session_id) => session_id,
            Err(no_session) => return Ok(no_session),
        };
        let ended = match self.ended_session.into_row()? {
            Some(session) => Some(Box::new(EndedSession {
                session: session.into_record()?,
                teardown: self.dying_box.into_row()?.map(MandelboxRow::into_record).transpose()?,
                changed: true,
            })),
            // Ended by someone else between the box's read and the update.
            None => None,
        };
        Ok(TokenEnd::Ended { session_id, ended })
    }
}

/// `recycle_torn_down`'s row.
#[derive(sqlx::FromRow)]
struct RecycledRow {
    finished: bool,
    #[sqlx(flatten)]
    replacement: BoxColumns,
}

impl RecycledRow {
    fn into_recycled(self) -> StoreResult<Recycled> {
        Ok(Recycled {
            finished: self.finished,
            replacement: self.replacement.into_row()?.map(MandelboxRow::into_record).transpose()?,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct SessionRow {
    pub(super) id: Uuid,
    pub(super) user_id: String,
    pub(super) state: String,
    pub(super) app: String,
    pub(super) client_version: String,
    pub(super) requested_regions: serde_json::Value,
    pub(super) region: Option<String>,
    pub(super) mandelbox_id: Option<Uuid>,
    pub(super) host_id: Option<String>,
    pub(super) end_reason: Option<String>,
    pub(super) created_at: DateTime<Utc>,
    pub(super) updated_at: DateTime<Utc>,
    pub(super) ended_at: Option<DateTime<Utc>>,
}

impl SessionRow {
    fn into_record(self) -> StoreResult<SessionRecord> {
        Ok(SessionRecord {
            state: rows::parse_enum("sessions.state", &self.state, SessionState::parse)?,
            requested_regions: rows::regions_from_json(self.requested_regions)?,
            end_reason: rows::parse_optional_enum("sessions.end_reason", self.end_reason.as_deref(), EndReason::parse)?,
            id: self.id,
            user_id: self.user_id,
            app: self.app,
            client_version: self.client_version,
            region: self.region,
            mandelbox_id: self.mandelbox_id,
            host_id: self.host_id,
            created_at: self.created_at,
            updated_at: self.updated_at,
            ended_at: self.ended_at,
        })
    }
}

fn hosts(rows: Vec<HostRow>) -> StoreResult<Vec<HostRecord>> {
    rows.into_iter().map(HostRow::into_record).collect()
}

fn mandelboxes(rows: Vec<MandelboxRow>) -> StoreResult<Vec<MandelboxRecord>> {
    rows.into_iter().map(MandelboxRow::into_record).collect()
}

fn sessions(rows: Vec<SessionRow>) -> StoreResult<Vec<SessionRecord>> {
    rows.into_iter().map(SessionRow::into_record).collect()
}

fn state_names<T: Copy>(states: &[T], name: fn(T) -> &'static str) -> Vec<String> {
    states.iter().map(|state| name(*state).to_owned()).collect()
}

/// Commits without waiting for the WAL flush: for bookkeeping only (see the
/// module's notes on durability). `SET LOCAL` lasts until this commit. Work
/// known to be bookkeeping from the start goes to `PgStore::relaxed` instead.
async fn commit_relaxed(mut tx: sqlx::Transaction<'_, Postgres>) -> StoreResult<()> {
    sqlx::query("SET LOCAL synchronous_commit = off").execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(())
}

// ----- queries shared by several methods -----------------------------------

async fn select_host(conn: &mut PgConnection, host_id: &str) -> StoreResult<Option<HostRecord>> {
    sqlx::query_as::<_, HostRow>(concat!("SELECT ", host_columns!(), " FROM hosts WHERE id = $1"))
        .bind(host_id)
        .fetch_optional(conn)
        .await?
        .map(HostRow::into_record)
        .transpose()
}

/// The host a claimed or reserved box lives on; the foreign key guarantees it.
async fn host_of(conn: &mut PgConnection, mandelbox: &MandelboxRecord) -> StoreResult<HostRecord> {
    select_host(conn, &mandelbox.host_id).await?.ok_or_else(|| {
        StoreError::Corrupt(format!("mandelbox {} is on unknown host {}", mandelbox.id, mandelbox.host_id))
    })
}

async fn lock_host(conn: &mut PgConnection, host_id: &str) -> StoreResult<Option<HostRecord>> {
    sqlx::query_as::<_, HostRow>(concat!("SELECT ", host_columns!(), " FROM hosts WHERE id = $1 FOR UPDATE"))
        .bind(host_id)
        .fetch_optional(conn)
        .await?
        .map(HostRow::into_record)
        .transpose()
}

async fn lock_session(conn: &mut PgConnection, id: Uuid) -> StoreResult<Option<SessionRecord>> {
    sqlx::query_as::<_, SessionRow>(concat!("SELECT ", session_columns!(), " FROM sessions WHERE id = $1 FOR UPDATE"))
        .bind(id)
        .fetch_optional(conn)
        .await?
        .map(SessionRow::into_record)
        .transpose()
}

async fn lock_mandelbox(conn: &mut PgConnection, id: Uuid) -> StoreResult<Option<MandelboxRecord>> {
    sqlx::query_as::<_, MandelboxRow>(concat!(
        "SELECT ",
        mandelbox_columns!(),
        " FROM mandelboxes WHERE id = $1 FOR UPDATE"
    ))
    .bind(id)
    .fetch_optional(conn)
    .await?
    .map(MandelboxRow::into_record)
    .transpose()
}

/// Locks the live sessions on `mandelbox_ids` before the boxes themselves are
/// touched, keeping the sessions → mandelboxes lock order.
///
/// A live session on a box is ASSIGNING or RUNNING (a PENDING one has no box);
/// naming those states lets the planner use the unique index over them,
/// `sessions_one_per_mandelbox`, the only index on `mandelbox_id`.
async fn lock_sessions_on(conn: &mut PgConnection, mandelbox_ids: &[Uuid]) -> StoreResult<()> {
    sqlx::query(
        "SELECT id FROM sessions WHERE mandelbox_id = ANY($1) AND state IN ('ASSIGNING', 'RUNNING') \
         ORDER BY id FOR UPDATE",
    )
    .bind(mandelbox_ids)
    .execute(conn)
    .await?;
    Ok(())
}

/// Ends every live session on `mandelbox_ids` (found as in `lock_sessions_on`);
/// returns them oldest first.
async fn end_sessions_on(
    conn: &mut PgConnection,
    mandelbox_ids: &[Uuid],
    reason: EndReason,
    at: DateTime<Utc>,
) -> StoreResult<Vec<SessionRecord>> {
    let rows = sqlx::query_as::<_, SessionRow>(concat!(
        "UPDATE sessions SET state = 'ENDED', end_reason = $2, ended_at = $3, updated_at = $3 \
         WHERE mandelbox_id = ANY($1) AND state IN ('ASSIGNING', 'RUNNING') RETURNING ",
        session_columns!()
    ))
    .bind(mandelbox_ids)
    .bind(reason.as_str())
    .bind(at)
    .fetch_all(conn)
    .await?;
    let mut ended = sessions(rows)?;
    ended.sort_by_key(|session| (session.created_at, session.id));
    Ok(ended)
}

/// Hosts' ranks as `refresh_host_ranks` computes them (`host_connected`
/// computes the same for one host), up to the WHERE clause, over hosts `h`
/// to be grouped by `h.id`: `free_slots`, the slots not ALLOCATED or RUNNING
/// (the claims' order), and `open_slots`, the slots with no live box at all
/// (the on-demand reservation's), each NULL when there are none.
macro_rules! pg_fresh_ranks {
    () => {
        concat!(
            "SELECT h.id, h.region, \
                    NULLIF(GREATEST(h.capacity \
                        - count(m.id) FILTER (WHERE m.state IN ('ALLOCATED', 'RUNNING')), 0), 0) AS free_slots, \
                    NULLIF(GREATEST(h.capacity - count(m.id), 0), 0) AS open_slots \
             FROM hosts h LEFT JOIN mandelboxes m ON m.host_id = h.id AND m.state IN ",
            live_box_states!()
        )
    };
}

/// The first 64 hosts of region `reg.name` in claim order by `host_ranks`:
/// an index scan (`host_ranks_claim_order`) that the LIMIT keeps the planner
/// on (unbounded, it would sort the region's ranks). Far more than a claim batch needs on a fleet with
/// a warm pool; small enough that walking past all of them costs little.
macro_rules! pg_ranked_window {
    () => {
        "SELECT k.host_id FROM host_ranks k WHERE k.region = reg.name \
         ORDER BY k.free_slots, k.host_id LIMIT 64"
    };
}

/// The hosts a claim may take a WAITING box of app `$2` from, best first,
/// none of `$3`: the `best` CTE of both claim statements, read lazily (the
/// claims stop at the first boxes they can lock).
///
/// For each region of `$1` in order (once each; skipped at once if it has no
/// WAITING box of the app), first the region's first 64 hosts of
/// `host_ranks` (`pg_ranked_window!`; migration 0011: the fullest first as of
/// the last maintenance pass, then id), an index walk that counts nothing; then,
/// should none of those give a box, the region's other hosts with a WAITING
/// box of the app ranked exactly (the fullest by a count of their claimed
/// boxes, then id). That second part is what every claim used to run, a count
/// per host and a sort; it is driven by the region's WAITING boxes of the app
/// (`mandelboxes_waiting`), so its cost grows with the warm pool, not the
/// fleet (0.4 ms at 15,000 hosts with a nearly dry pool, BENCHMARKS.md run
/// AB), and it only runs when the window is used up, so a host missing from
/// `host_ranks` (one whose rank a concurrent pass removed as it connected) or
/// a stale rank never hides a box. Both parts check the host row itself
/// (ACTIVE, region, image).
///
/// The parts are an Append inside a lateral join over the regions, whose
/// nested loops keep the order of their outer side: the same reliance as the
/// walk over `best` in `pg_claim_waiting!`.
macro_rules! pg_best_hosts {
    () => {
        concat!(
            "SELECT b.id FROM ( \
                 SELECT u.name, min(u.ord) AS ord FROM unnest($1::text[]) WITH ORDINALITY AS u(name, ord) \
                 WHERE EXISTS (SELECT 1 FROM mandelboxes w \
                               WHERE w.state = 'WAITING' AND w.region = u.name AND w.app = $2) \
                 GROUP BY u.name ORDER BY 2) reg \
             CROSS JOIN LATERAL ( \
                 (SELECT h.id FROM (",
            pg_ranked_window!(),
            ") k \
                  CROSS JOIN LATERAL ( \
                      SELECT h.id FROM hosts h LEFT JOIN regions r ON r.name = h.region \
                      WHERE h.id = k.host_id AND h.region = reg.name AND h.state = 'ACTIVE' \
                        AND (COALESCE(r.image, '') = '' OR h.image = r.image) AND h.id <> ALL($3) \
                      OFFSET 0) h) \
                 UNION ALL \
                 (SELECT h.id FROM hosts h \
                  LEFT JOIN regions r ON r.name = h.region \
                  LEFT JOIN (",
            pg_ranked_window!(),
            ") seen ON seen.host_id = h.id \
                  CROSS JOIN LATERAL (SELECT count(*) AS busy FROM mandelboxes a \
                                      WHERE a.host_id = h.id AND a.state IN ('ALLOCATED', 'RUNNING')) load \
                  WHERE seen.host_id IS NULL AND h.state = 'ACTIVE' AND h.region = reg.name \
                    AND h.id IN (SELECT w.host_id FROM mandelboxes w \
                                 WHERE w.state = 'WAITING' AND w.app = $2 AND w.region = reg.name) \
                    AND (COALESCE(r.image, '') = '' OR h.image = r.image) AND h.id <> ALL($3) \
                  ORDER BY h.capacity - load.busy, h.id) \
             ) b"
        )
    };
}

/// The claim statement up to its RETURNING clause. Loadgen's "bare claim"
/// runs exactly this (`CLAIM_WAITING_SQL`) to measure the database's limit.
macro_rules! pg_claim_waiting {
    ($state:literal) => {
        // The hosts in claim order (`best`: region order, then the fullest
        // by `host_ranks`, then the exact ranking of the rest), then, host
        // by host in that order, its oldest
        // WAITING box not locked by another claim: the same choice as one
        // ORDER BY over every candidate box, which joined and sorted the
        // whole warm pool on every claim. The outer query has no ORDER BY on
        // purpose: the nested loop walks `best` in its order and stops at
        // the first box, so only that box is locked (sorting after the join
        // would lock one box on every host).
        concat!(
            "UPDATE mandelboxes SET state = '",
            $state,
            "', session_id = $4, updated_at = $5 \
         WHERE id = ( \
             WITH best AS MATERIALIZED (",
            pg_best_hosts!(),
            ") \
             SELECT c.id FROM best CROSS JOIN LATERAL ( \
                 SELECT m.id FROM mandelboxes m \
                 WHERE m.host_id = best.id AND m.state = 'WAITING' AND m.app = $2 AND m.region = ANY($1) \
                 ORDER BY m.created_at, m.id \
                 LIMIT 1 \
                 FOR UPDATE SKIP LOCKED) c \
             LIMIT 1) \
         "
        )
    };
}

/// Allocate's claim as one statement returning only the id (for benchmarks);
/// `create_session_and_claim` runs the same claim as its first CTE.
pub const CLAIM_WAITING_SQL: &str = concat!(pg_claim_waiting!("RUNNING"), " RETURNING id");

/// Allocate's claim (`create_session_and_claim`) as one statement, so one
/// round trip and one (flushed) commit. None when the user is at `limit` or
/// has no row.
async fn claim_for_new_session(
    pool: &PgPool,
    new: &NewSession,
    limit: u32,
    at: DateTime<Utc>,
) -> StoreResult<Option<SessionClaimRow>> {
    // 1. `account` takes a place: it adds one to the user's `live_sessions`
    //    if the user is under the limit, which also locks the row. A request
    //    that waits for that lock re-reads the row, so two of one user's
    //    concurrent requests cannot both pass at the last free place. Every
    //    other change of the counter is a trigger's (migrations 0005, 0008):
    //    this is the only statement that inserts a session.
    // 2. `claimed` takes a WAITING box, only for a user that passed.
    // 3. `inserted` writes the session, RUNNING on the box or PENDING
    //    without one (counted either way: a pending session is live).
    Ok(sqlx::query_as::<_, SessionClaimRow>(concat!(
        "WITH account AS ( \
                 UPDATE users SET live_sessions = live_sessions + 1 \
                 WHERE id = $6 AND live_sessions < $9 RETURNING id \
             ), claimed AS (",
        pg_claim_waiting!("RUNNING"),
        " AND EXISTS (SELECT 1 FROM account) RETURNING ",
        mandelbox_columns!(),
        "), inserted AS ( \
                 INSERT INTO sessions (id, user_id, state, app, client_version, requested_regions, \
                 region, mandelbox_id, host_id, created_at, updated_at) \
                 SELECT $4, account.id, CASE WHEN c.id IS NULL THEN 'PENDING' ELSE 'RUNNING' END, $2, $7, $8, \
                        c.region, c.id, c.host_id, $5, $5 \
                 FROM account LEFT JOIN claimed c ON true \
                 RETURNING ",
        session_columns!(),
        ") SELECT inserted.*, ",
        box_columns_of!("c"),
        ", ",
        claimed_host_columns_of!("h"),
        " FROM inserted LEFT JOIN claimed c ON true LEFT JOIN hosts h ON h.id = c.host_id"
    ))
    .bind(&new.regions)
    .bind(&new.app)
    .bind(Vec::<String>::new())
    .bind(new.id)
    .bind(at)
    .bind(&new.user_id)
    .bind(&new.client_version)
    .bind(Json(&new.regions))
    .bind(i64::from(limit))
    .fetch_optional(pool)
    .await?)
}

/// `claim_for_new_session` for several sessions of one app and region list
/// and of distinct users, as one statement (one round trip, one commit):
/// Allocate's group commit (`crate::session_claims`). Returns a row for each
/// session written, with its 1-based place in `news` as `batch_n`; a session
/// whose user is at `limit`, has no row, or whose row another transaction
/// holds is not written and has no row.
async fn claim_for_new_sessions<'c>(
    conn: impl sqlx::PgExecutor<'c>,
    news: &[&NewSession],
    limit: u32,
    at: DateTime<Utc>,
) -> StoreResult<Vec<BatchClaimRow>> {
    let Some(first) = news.first() else {
        return Ok(Vec::new());
    };
    // 1. `locked` takes the users under the limit, in id order, passing over
    //    a row another transaction holds: a batch holds many user rows at
    //    once, and waiting for one while holding others could deadlock with
    //    a disconnect batch whose triggers count those users down (the
    //    single claim waits, holding nothing). `account` counts a place
    //    for each, as the single claim's `account` does.
    // 2. `passed` numbers the sessions of the users that passed, `picked`
    //    numbers as many WAITING boxes, host by host in `best`'s order (a
    //    host that gives a box only gets fuller, so it stays first: the
    //    boxes single claims in a row would take); the locking happens in
    //    the nested loop before the LIMIT, as in the single claim.
    // 3. `claimed` puts the n-th session on the n-th box, `inserted` writes
    //    each session RUNNING on its box or PENDING without one.
    // The CTEs' columns are renamed so that the box's and the session's
    // columns can be returned unqualified.
    Ok(sqlx::query_as::<_, BatchClaimRow>(concat!(
        "WITH input AS ( \
             SELECT * FROM unnest($4::uuid[], $6::text[], $7::text[]) \
                 WITH ORDINALITY AS i(i_id, i_user, i_version, i_n) \
         ), locked AS MATERIALIZED ( \
             SELECT u.id AS l_user FROM users u WHERE u.id = ANY($6) AND u.live_sessions < $9 \
             ORDER BY u.id FOR UPDATE SKIP LOCKED \
         ), account AS ( \
             UPDATE users u SET live_sessions = u.live_sessions + 1 FROM locked l WHERE u.id = l.l_user \
             RETURNING u.id AS a_user \
         ), passed AS ( \
             SELECT i.*, row_number() OVER (ORDER BY i.i_n) AS p_rank \
             FROM input i JOIN account a ON a.a_user = i.i_user \
         ), best AS MATERIALIZED (",
        pg_best_hosts!(),
        "), picked AS MATERIALIZED ( \
             SELECT k.k_id, row_number() OVER () AS k_rank FROM ( \
                 SELECT c.id AS k_id FROM best CROSS JOIN LATERAL ( \
                     SELECT m.id FROM mandelboxes m \
                     WHERE m.host_id = best.id AND m.state = 'WAITING' AND m.app = $2 AND m.region = ANY($1) \
                     ORDER BY m.created_at, m.id \
                     LIMIT (SELECT count(*) FROM passed) \
                     FOR UPDATE SKIP LOCKED) c \
                 LIMIT (SELECT count(*) FROM passed)) k \
         ), claimed AS ( \
             UPDATE mandelboxes m SET state = 'RUNNING', session_id = p.i_id, updated_at = $5 \
             FROM picked k JOIN passed p ON p.p_rank = k.k_rank \
             WHERE m.id = k.k_id \
             RETURNING p.i_n AS c_n, ",
        mandelbox_columns!(),
        "), inserted AS ( \
             INSERT INTO sessions (id, user_id, state, app, client_version, requested_regions, \
             region, mandelbox_id, host_id, created_at, updated_at) \
             SELECT p.i_id, p.i_user, CASE WHEN c.id IS NULL THEN 'PENDING' ELSE 'RUNNING' END, $2, p.i_version, \
                    $8, c.region, c.id, c.host_id, $5, $5 \
             FROM passed p LEFT JOIN claimed c ON c.c_n = p.i_n \
             RETURNING ",
        session_columns!(),
        ") SELECT p.i_n AS batch_n, inserted.*, ",
        box_columns_of!("c"),
        ", ",
        claimed_host_columns_of!("h"),
        " FROM inserted JOIN passed p ON p.i_id = inserted.id LEFT JOIN claimed c ON c.c_n = p.i_n \
         LEFT JOIN hosts h ON h.id = c.host_id ORDER BY p.i_n"
    ))
    .bind(&first.regions)
    .bind(&first.app)
    .bind(Vec::<String>::new())
    .bind(news.iter().map(|new| new.id).collect::<Vec<_>>())
    .bind(at)
    .bind(news.iter().map(|new| new.user_id.as_str()).collect::<Vec<_>>())
    .bind(news.iter().map(|new| new.client_version.as_str()).collect::<Vec<_>>())
    .bind(Json(&first.regions))
    .bind(i64::from(limit))
    .fetch_all(conn)
    .await?)
}

/// Takes the best WAITING box for a pending session and marks it ALLOCATED to
/// it (Allocate's own claim, RUNNING, is part of `create_session_and_claim`).
///
/// Best = first region in `regions`, then the fullest host (fewest free
/// slots, counting assigned boxes, as of the last `refresh_host_ranks`),
/// then host id and box age for a stable order. `SKIP LOCKED` makes
/// concurrent claimers pass over a box another transaction is taking instead
/// of waiting for it; the locking happens before `LIMIT`, so a claimer only
/// gets nothing when every match is taken.
async fn claim_waiting(
    conn: &mut PgConnection,
    regions: &[String],
    app: &str,
    exclude_hosts: &[String],
    session_id: Uuid,
    at: DateTime<Utc>,
) -> StoreResult<Option<MandelboxRecord>> {
    sqlx::query_as::<_, MandelboxRow>(concat!(pg_claim_waiting!("ALLOCATED"), " RETURNING ", mandelbox_columns!()))
        .bind(regions)
        .bind(app)
        .bind(exclude_hosts)
        .bind(session_id)
        .bind(at)
        .fetch_optional(conn)
        .await?
        .map(MandelboxRow::into_record)
        .transpose()
}

/// Hosts per page of the on-demand reservation's walk over `host_ranks`.
const OPEN_HOSTS_PAGE: usize = 32;

/// One ranked host of a reservation page, with its exact count.
#[derive(sqlx::FromRow)]
struct OpenHost {
    host_id: String,
    /// Unoccupied slots as of the last maintenance pass (the walk's key).
    open_slots: i32,
    /// Unoccupied slots now; None if the host may not take the box (not
    /// ACTIVE, moved region, wrong image, or excluded).
    free: Option<i64>,
}

/// The next `OPEN_HOSTS_PAGE` hosts of `region` after `after` in
/// `host_ranks_open_order` (migration 0012: fewest unoccupied slots first as
/// of the last maintenance pass, then id), each with its unoccupied slots
/// counted now. A rank is at most a pass old: a host that filled since is
/// counted full here and passed over; one that freed a slot since it was
/// ranked full is offered from the next pass on.
async fn open_hosts_page(
    pool: &PgPool,
    region: &str,
    exclude_hosts: &[String],
    after: Option<&(i32, String)>,
) -> StoreResult<Vec<OpenHost>> {
    let (after_slots, after_host) = after.map_or((0, ""), |(slots, host)| (*slots, host.as_str()));
    Ok(sqlx::query_as::<_, OpenHost>(concat!(
        "SELECT k.host_id, k.open_slots, f.free FROM ( \
             SELECT k.host_id, k.open_slots FROM host_ranks k \
             WHERE k.region = $1 AND k.open_slots IS NOT NULL AND (k.open_slots, k.host_id) > ($3, $4) \
             ORDER BY k.open_slots, k.host_id LIMIT $5) k \
         LEFT JOIN LATERAL ( \
             SELECT h.capacity - (SELECT count(*) FROM mandelboxes m \
                                  WHERE m.host_id = h.id AND m.state IN ",
        live_box_states!(),
        ") AS free \
             FROM hosts h LEFT JOIN regions r ON r.name = h.region \
             WHERE h.id = k.host_id AND h.state = 'ACTIVE' AND h.region = $1 AND h.id <> ALL($2) \
               AND (COALESCE(r.image, '') = '' OR h.image = r.image) \
         ) f ON TRUE \
         ORDER BY k.open_slots, k.host_id"
    ))
    .bind(region)
    .bind(exclude_hosts)
    .bind(after_slots)
    .bind(after_host)
    .bind(i64::try_from(OPEN_HOSTS_PAGE).unwrap_or(i64::MAX))
    .fetch_all(pool)
    .await?)
}

/// Puts a PENDING session onto a claimed box.
async fn assign_session(
    conn: &mut PgConnection,
    session_id: Uuid,
    mandelbox: &MandelboxRecord,
    at: DateTime<Utc>,
) -> StoreResult<SessionRecord> {
    sqlx::query_as::<_, SessionRow>(concat!(
        "UPDATE sessions SET state = 'ASSIGNING', region = $2, mandelbox_id = $3, host_id = $4, \
         updated_at = $5 WHERE id = $1 RETURNING ",
        session_columns!()
    ))
    .bind(session_id)
    .bind(&mandelbox.region)
    .bind(mandelbox.id)
    .bind(&mandelbox.host_id)
    .bind(at)
    .fetch_one(conn)
    .await?
    .into_record()
}

/// Inserts SPAWNING boxes on `host_id`, as many of `news` as the host has free
/// slots, if it is ACTIVE. The host row stays locked until the transaction
/// ends, so concurrent reservations on one host count each other's boxes.
async fn reserve_on_host(
    conn: &mut PgConnection,
    host_id: &str,
    news: &[NewMandelbox],
    at: DateTime<Utc>,
) -> StoreResult<Vec<MandelboxRecord>> {
    let Some(host) = lock_host(conn, host_id).await? else {
        return Ok(Vec::new());
    };
    if host.state != HostState::Active {
        return Ok(Vec::new());
    }
    let live: i64 = sqlx::query_scalar(concat!(
        "SELECT count(*) FROM mandelboxes WHERE host_id = $1 AND state IN ",
        live_box_states!()
    ))
    .bind(&host.id)
    .fetch_one(&mut *conn)
    .await?;
    let free = usize::try_from(i64::from(host.capacity).saturating_sub(live)).unwrap_or(0);
    let mut reserved = Vec::with_capacity(free.min(news.len()));
    for new in news.iter().take(free) {
        let record = sqlx::query_as::<_, MandelboxRow>(concat!(
            "INSERT INTO mandelboxes (id, host_id, region, app, state, session_id, token_hash, ports, \
             created_at, updated_at) VALUES ($1, $2, $3, $4, 'SPAWNING', $5, $6, '[]', $7, $7) RETURNING ",
            mandelbox_columns!()
        ))
        .bind(new.id)
        .bind(&host.id)
        .bind(&host.region)
        .bind(&new.app)
        .bind(new.session_id)
        .bind(&new.token_hash)
        .bind(at)
        .fetch_one(&mut *conn)
        .await?
        .into_record()?;
        reserved.push(record);
    }
    Ok(reserved)
}

/// A host with its box counts, up to the WHERE clause (`list_hosts`,
/// `host_summary`). The three counts come from one pass over the host's
/// live boxes (`mandelboxes_live_by_host`, index only): three subqueries
/// read it three times, 115 ms against 55 ms for 15,000 hosts of 8 boxes
/// (BENCHMARKS.md run AC).
macro_rules! host_summary_select {
    () => {
        concat!(
            "SELECT h.id, h.region, h.state, h.image, h.agent_version, h.address, h.capacity, \
             h.generation, h.last_heartbeat_at, h.disconnected_at, h.terminated_at, h.created_at, h.updated_at, \
             c.warm, c.assigned, c.live \
             FROM hosts h CROSS JOIN LATERAL ( \
                 SELECT count(*) FILTER (WHERE m.state IN ('SPAWNING', 'WAITING')) AS warm, \
                        count(*) FILTER (WHERE m.state IN ('ALLOCATED', 'RUNNING')) AS assigned, \
                        count(*) AS live \
                 FROM mandelboxes m WHERE m.host_id = h.id AND m.state IN ",
            live_box_states!(),
            ") c"
        )
    };
}

#[async_trait]
impl Store for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    // ----- regions -----------------------------------------------------

    async fn put_region(&self, region: &Region) -> StoreResult<Region> {
        fleet::put_region(&self.pool, region).await
    }

    async fn list_regions(&self) -> StoreResult<Vec<Region>> {
        fleet::list_regions(&self.pool).await
    }

    // ----- leases, instances, operations ---------------------------------

    async fn acquire_lease(&self, name: &str, holder: &str, ttl: Duration) -> StoreResult<Option<Lease>> {
        fleet::acquire_lease(&self.pool, name, holder, ttl).await
    }

    async fn release_lease(&self, lease: &Lease) -> StoreResult<()> {
        fleet::release_lease(&self.pool, lease).await
    }

    async fn record_launch(&self, lease: &Lease, instances: &[NewInstance]) -> StoreResult<Vec<InstanceRecord>> {
        fleet::record_launch(&self.pool, lease, instances).await
    }

    async fn instance_launched(
        &self,
        host_id: &str,
        instance_id: &str,
        instance_type: &str,
        capacity: u32,
    ) -> StoreResult<Option<InstanceRecord>> {
        fleet::instance_launched(&self.pool, host_id, instance_id, instance_type, capacity).await
    }

    async fn set_instance_state(
        &self,
        lease: &Lease,
        host_id: &str,
        state: InstanceState,
        reason: &str,
    ) -> StoreResult<Option<InstanceRecord>> {
        fleet::set_instance_state(&self.pool, lease, host_id, state, reason).await
    }

    async fn list_instances(&self, region: Option<&str>, include_terminated: bool) -> StoreResult<Vec<InstanceRecord>> {
        fleet::list_instances(&self.pool, region, include_terminated).await
    }

    async fn count_instances(&self, region: &str) -> StoreResult<u64> {
        fleet::count_instances(&self.pool, region).await
    }

    async fn region_can_grow(&self, region: &str, max_instances: u32) -> StoreResult<bool> {
        fleet::region_can_grow(&self.pool, region, max_instances).await
    }

    async fn create_operation(&self, operation: &OperationRecord) -> StoreResult<()> {
        fleet::create_operation(&self.pool, operation).await
    }

    async fn update_operation(&self, lease: Option<&Lease>, operation: &OperationRecord) -> StoreResult<()> {
        fleet::update_operation(&self.pool, lease, operation).await
    }

    async fn get_operation(&self, id: Uuid) -> StoreResult<Option<OperationRecord>> {
        fleet::get_operation(&self.pool, id).await
    }

    async fn list_operations(&self, running_only: bool, limit: u32) -> StoreResult<Vec<OperationRecord>> {
        fleet::list_operations(&self.pool, running_only, limit).await
    }

    async fn complete_rollout(
        &self,
        lease: &Lease,
        operation: &OperationRecord,
        images: &[(String, String)],
    ) -> StoreResult<()> {
        fleet::complete_rollout(&self.pool, lease, operation, images).await
    }

    // ----- configuration -------------------------------------------------

    async fn config_entries(&self) -> StoreResult<Vec<(String, String)>> {
        Ok(sqlx::query_as::<_, (String, String)>("SELECT key, value FROM config ORDER BY key")
            .fetch_all(&self.pool)
            .await?)
    }

    // ----- users -------------------------------------------------------

    async fn ensure_user(&self, user_id: &str, email: Option<&str>) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO users (id, email, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (id) DO UPDATE SET email = excluded.email \
             WHERE excluded.email IS NOT NULL AND users.email IS DISTINCT FROM excluded.email",
        )
        .bind(user_id)
        .bind(email)
        .bind(now())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn get_user(&self, user_id: &str) -> StoreResult<Option<UserRecord>> {
        let row = sqlx::query_as::<_, (String, Option<String>, Option<String>)>(
            "SELECT id, email, stripe_customer_id FROM users WHERE id = $1",
        )
        .bind(user_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(id, email, stripe_customer_id)| UserRecord { id, email, stripe_customer_id }))
    }

    async fn set_stripe_customer(&self, user_id: &str, customer_id: &str) -> StoreResult<Option<String>> {
        // Keep the first customer remembered: COALESCE makes a second writer a no-op.
        let row = sqlx::query_scalar::<_, Option<String>>(
            "UPDATE users SET stripe_customer_id = COALESCE(stripe_customer_id, $2) WHERE id = $1 \
             RETURNING stripe_customer_id",
        )
        .bind(user_id)
        .bind(customer_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.flatten())
    }

    // ----- hosts -------------------------------------------------------

    async fn host_connected(&self, hello: &HostHello) -> StoreResult<HostRecord> {
        let at = now();
        let mut tx = self.pool.begin().await?;
        // The host is ranked in the same statement (`ranked`), so that claims
        // and on-demand reservations see a host that joins or comes back
        // before the next maintenance pass; as a statement of its own it
        // made connecting 15,000 hosts 15% slower (BENCHMARKS.md run AB).
        let record = sqlx::query_as::<_, HostRow>(concat!(
            "WITH upserted AS ( \
                 INSERT INTO hosts (id, region, state, draining, image, agent_version, address, capacity, \
                 generation, last_heartbeat_at, disconnected_at, created_at, updated_at) \
                 VALUES ($1, $2, 'ACTIVE', FALSE, $3, $4, $5, $6, 1, $7, NULL, $7, $7) \
                 ON CONFLICT (id) DO UPDATE SET region = excluded.region, image = excluded.image, \
                 agent_version = excluded.agent_version, address = excluded.address, \
                 capacity = excluded.capacity, generation = hosts.generation + 1, \
                 state = CASE WHEN hosts.draining THEN 'DRAINING' ELSE 'ACTIVE' END, \
                 last_heartbeat_at = excluded.last_heartbeat_at, disconnected_at = NULL, \
                 updated_at = excluded.updated_at \
                 RETURNING ",
            host_columns!(),
            "), ranked AS ( \
                 INSERT INTO host_ranks (host_id, region, free_slots, open_slots) \
                 SELECT u.id, u.region, NULLIF(GREATEST(u.capacity - boxes.claimed, 0), 0), \
                        NULLIF(GREATEST(u.capacity - boxes.live, 0), 0) \
                 FROM upserted u CROSS JOIN LATERAL ( \
                     SELECT count(*) FILTER (WHERE m.state IN ('ALLOCATED', 'RUNNING')) AS claimed, \
                            count(*) AS live \
                     FROM mandelboxes m WHERE m.host_id = u.id AND m.state IN ",
            live_box_states!(),
            ") boxes \
                 WHERE u.state = 'ACTIVE' \
                 ON CONFLICT (host_id) DO UPDATE SET region = excluded.region, free_slots = excluded.free_slots, \
                 open_slots = excluded.open_slots \
             ) SELECT ",
            host_columns!(),
            " FROM upserted"
        ))
        .bind(&hello.host_id)
        .bind(&hello.region)
        .bind(&hello.image)
        .bind(&hello.agent_version)
        .bind(&hello.address)
        .bind(i64::from(hello.capacity))
        .bind(at)
        .fetch_one(&mut *tx)
        .await?
        .into_record()?;
        fleet::instance_connected(&mut tx, &hello.host_id, at).await?;
        tx.commit().await?;
        Ok(record)
    }

    async fn host_disconnected(&self, host_id: &str, generation: u64) -> StoreResult<bool> {
        let Some(generation) = rows::generation_param(generation) else {
            return Ok(false);
        };
        let result = sqlx::query(
            "UPDATE hosts SET state = 'DISCONNECTED', disconnected_at = $3, updated_at = $3 \
             WHERE id = $1 AND generation = $2 AND state IN ('ACTIVE', 'DRAINING')",
        )
        .bind(host_id)
        .bind(generation)
        .bind(now())
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    async fn record_heartbeats(&self, beats: &[HeartbeatMark], at: DateTime<Utc>) -> StoreResult<()> {
        let (mut ids, mut generations) = (Vec::with_capacity(beats.len()), Vec::with_capacity(beats.len()));
        for beat in beats {
            if let Some(generation) = rows::generation_param(beat.generation) {
                ids.push(beat.host_id.as_str());
                generations.push(generation);
            }
        }
        if ids.is_empty() {
            return Ok(());
        }
        // The rows are locked in id order first, the lock order of every
        // other statement that locks several hosts (`recycle_torn_down_many`,
        // reconciliation): an UPDATE ... FROM locks in the order its plan
        // meets the rows, and deadlocked with the bookkeeping batch (run R).
        sqlx::query(
            "WITH beat AS (SELECT * FROM UNNEST($1::text[], $2::bigint[]) AS beat(id, generation)), \
             locked AS ( \
                 SELECT h.id FROM hosts h JOIN beat ON h.id = beat.id AND h.generation = beat.generation \
                 ORDER BY h.id FOR UPDATE OF h \
             ) \
             UPDATE hosts h SET last_heartbeat_at = $3 FROM locked WHERE h.id = locked.id",
        )
        .bind(&ids)
        .bind(&generations)
        .bind(at)
        .execute(&self.relaxed)
        .await?;
        Ok(())
    }

    async fn drain_host(&self, host_id: &str) -> StoreResult<Option<HostRecord>> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE hosts SET state = 'DRAINING', draining = TRUE, updated_at = $2 \
             WHERE id = $1 AND state = 'ACTIVE'",
        )
        .bind(host_id)
        .bind(now())
        .execute(&mut *tx)
        .await?;
        let host = select_host(&mut tx, host_id).await?;
        tx.commit().await?;
        Ok(host)
    }

    async fn mark_host_lost(&self, host_id: &str, generation: Option<u64>) -> StoreResult<Vec<SessionRecord>> {
        let at = now();
        let mut tx = self.pool.begin().await?;
        let Some(host) = lock_host(&mut tx, host_id).await? else {
            return Ok(Vec::new());
        };
        if generation.is_some_and(|generation| generation != host.generation) {
            return Ok(Vec::new());
        }
        sqlx::query(
            "UPDATE hosts SET state = 'UNHEALTHY', updated_at = $2 \
             WHERE id = $1 AND state <> 'UNHEALTHY'",
        )
        .bind(host_id)
        .bind(at)
        .execute(&mut *tx)
        .await?;
        // The host row is locked, so no box can be reserved on it meanwhile.
        let live_boxes: Vec<Uuid> = sqlx::query_scalar(concat!(
            "SELECT id FROM mandelboxes WHERE host_id = $1 AND state IN ",
            live_box_states!()
        ))
        .bind(host_id)
        .fetch_all(&mut *tx)
        .await?;
        lock_sessions_on(&mut tx, &live_boxes).await?;
        sqlx::query(concat!(
            "UPDATE mandelboxes SET state = 'LOST', updated_at = $2 \
             WHERE id = ANY($1) AND state IN ",
            live_box_states!()
        ))
        .bind(&live_boxes)
        .bind(at)
        .execute(&mut *tx)
        .await?;
        let ended = end_sessions_on(&mut tx, &live_boxes, EndReason::HostLost, at).await?;
        tx.commit().await?;
        Ok(ended)
    }

    async fn get_host(&self, host_id: &str) -> StoreResult<Option<HostRecord>> {
        let mut conn = self.pool.acquire().await?;
        select_host(&mut conn, host_id).await
    }

    async fn list_hosts(&self, region: Option<&str>) -> StoreResult<Vec<HostSummary>> {
        let rows = sqlx::query_as::<_, HostSummaryRow>(concat!(
            host_summary_select!(),
            " WHERE ($1::text IS NULL OR h.region = $1) AND h.terminated_at IS NULL ORDER BY h.id"
        ))
        .bind(region)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(HostSummaryRow::into_summary).collect()
    }

    async fn hosts_with_open_slots(&self) -> StoreResult<Vec<String>> {
        // `host_ranks_open_order` holds the hosts ranked with room only; the
        // join drops a host drained or gone since it was ranked.
        Ok(sqlx::query_scalar(
            "SELECT k.host_id FROM host_ranks k JOIN hosts h ON h.id = k.host_id \
             WHERE k.open_slots IS NOT NULL AND h.state = 'ACTIVE' ORDER BY k.host_id",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    async fn box_coming_in(&self, regions: &[String]) -> StoreResult<bool> {
        // From the boxes' side, one state at a time, each through an index
        // that holds only that state's boxes (migration 0012), so that a
        // "no" (a full fleet with nothing coming) costs three short index
        // walks, not a probe of every host of the region.
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM mandelboxes m JOIN hosts h ON h.id = m.host_id \
                            WHERE m.state = 'WAITING' AND m.region = ANY($1) AND h.state = 'ACTIVE') \
                 OR EXISTS (SELECT 1 FROM mandelboxes m JOIN hosts h ON h.id = m.host_id \
                            WHERE m.state = 'DYING' AND m.region = ANY($1) AND h.state = 'ACTIVE') \
                 OR EXISTS (SELECT 1 FROM mandelboxes m JOIN hosts h ON h.id = m.host_id \
                            WHERE m.state = 'SPAWNING' AND m.region = ANY($1) AND h.state = 'ACTIVE')",
        )
        .bind(regions)
        .fetch_one(&self.pool)
        .await?)
    }

    async fn host_summary(&self, host_id: &str) -> StoreResult<Option<HostSummary>> {
        sqlx::query_as::<_, HostSummaryRow>(concat!(
            host_summary_select!(),
            " WHERE h.id = $1 AND h.terminated_at IS NULL"
        ))
        .bind(host_id)
        .fetch_optional(&self.pool)
        .await?
        .map(HostSummaryRow::into_summary)
        .transpose()
    }

    async fn hosts_disconnected_before(&self, cutoff: DateTime<Utc>) -> StoreResult<Vec<HostRecord>> {
        let rows = sqlx::query_as::<_, HostRow>(concat!(
            "SELECT ",
            host_columns!(),
            " FROM hosts WHERE state = 'DISCONNECTED' AND disconnected_at < $1 \
             ORDER BY disconnected_at, id"
        ))
        .bind(cutoff)
        .fetch_all(&self.pool)
        .await?;
        hosts(rows)
    }

    async fn connected_hosts_changed_before(&self, cutoff: DateTime<Utc>) -> StoreResult<Vec<HostRecord>> {
        let rows = sqlx::query_as::<_, HostRow>(concat!(
            "SELECT ",
            host_columns!(),
            " FROM hosts WHERE state IN ('ACTIVE', 'DRAINING') AND updated_at < $1 ORDER BY id"
        ))
        .bind(cutoff)
        .fetch_all(&self.pool)
        .await?;
        hosts(rows)
    }

    async fn mark_connected_hosts_disconnected(&self, at: DateTime<Utc>) -> StoreResult<u64> {
        let result = sqlx::query(
            "UPDATE hosts SET state = 'DISCONNECTED', disconnected_at = $1, updated_at = $2 \
             WHERE state IN ('ACTIVE', 'DRAINING')",
        )
        .bind(at)
        .bind(now())
        .execute(&self.pool)
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
        let mut tx = self.pool.begin().await?;
        let reported_ids = rows::unique_ids(reported);
        if lock_host(&mut tx, host_id).await?.is_none() {
            return Ok(Reconciliation { teardown: reported_ids, ..Reconciliation::default() });
        }
        // The host's live boxes only: a reported box that is not one of them
        // is torn down whatever its row says (`ReconcilePlan::new`), so the
        // finished rows of reported ids need not be read (asking for them too,
        // `OR id = ANY(…)`, spanned two indexes, which only a bitmap scan
        // combines: without bitmap scans, `SESSION_SETTINGS`, it scanned the
        // whole table, history and all, on every reconnect).
        let known = sqlx::query_as::<_, MandelboxRow>(concat!(
            "SELECT ",
            mandelbox_columns!(),
            " FROM mandelboxes WHERE host_id = $1 AND state IN ",
            live_box_states!()
        ))
        .bind(host_id)
        .fetch_all(&mut *tx)
        .await?;
        let plan = rows::ReconcilePlan::new(reported, &mandelboxes(known)?, claimed_before);

        let touched: Vec<Uuid> = plan.missing.iter().chain(&plan.unassigned).copied().collect();
        lock_sessions_on(&mut tx, &touched).await?;
        let lost: Vec<Uuid> = sqlx::query_scalar(concat!(
            "UPDATE mandelboxes SET state = 'LOST', updated_at = $2 \
             WHERE id = ANY($1) AND state IN ",
            live_box_states!(),
            " RETURNING id"
        ))
        .bind(&plan.missing)
        .bind(at)
        .fetch_all(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE mandelboxes SET state = 'DEAD', updated_at = $2 \
             WHERE id = ANY($1) AND state = 'SPAWNING'",
        )
        .bind(&plan.unconfirmed_spawns)
        .bind(at)
        .execute(&mut *tx)
        .await?;
        // Conditional on the claim still being the old one: a box released and
        // claimed again since the read above is left to its new claimer.
        let unassigned: Vec<Uuid> = sqlx::query_scalar(
            "UPDATE mandelboxes SET state = 'WAITING', session_id = NULL, updated_at = $2 \
             WHERE id = ANY($1) AND state IN ('ALLOCATED', 'RUNNING') AND updated_at < $3 RETURNING id",
        )
        .bind(&plan.unassigned)
        .bind(at)
        .bind(claimed_before)
        .fetch_all(&mut *tx)
        .await?;
        let mut ended_sessions = end_sessions_on(&mut tx, &lost, EndReason::HostLost, at).await?;
        ended_sessions.extend(end_sessions_on(&mut tx, &unassigned, EndReason::AssignFailed, at).await?);
        tx.commit().await?;
        let lost = plan.order(lost);
        let unassigned = rows::in_order(&plan.unassigned, unassigned);
        Ok(Reconciliation { teardown: plan.teardown, lost, unassigned, ended_sessions })
    }

    // ----- mandelboxes -------------------------------------------------

    async fn reserve_mandelboxes(&self, host_id: &str, news: &[NewMandelbox]) -> StoreResult<Vec<MandelboxRecord>> {
        let mut tx = self.relaxed.begin().await?;
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
        // Region by region in the client's order, the hosts that had an
        // unoccupied slot at the last maintenance pass (or connected since),
        // the fullest first, a page at a time (`open_hosts_page`); each page
        // is counted exactly and tried the fullest first. A full fleet has
        // no rank with an open slot: one empty index probe per region.
        let mut seen = std::collections::HashSet::with_capacity(regions.len());
        for region in regions.iter().filter(|region| seen.insert(region.as_str())) {
            let mut after: Option<(i32, String)> = None;
            loop {
                let page = open_hosts_page(&self.pool, region, exclude_hosts, after.as_ref()).await?;
                let complete = page.len() < OPEN_HOSTS_PAGE;
                after = page.last().map(|host| (host.open_slots, host.host_id.clone()));
                let mut candidates: Vec<(i64, String)> = page
                    .into_iter()
                    .filter_map(|host| host.free.filter(|&free| free > 0).map(|free| (free, host.host_id)))
                    .collect();
                candidates.sort();
                // One transaction per candidate: holding a rejected host's
                // lock while locking the next could deadlock with a
                // reservation going the other way.
                for (_, host_id) in candidates {
                    let mut tx = self.pool.begin().await?;
                    if let Some(reserved) =
                        reserve_on_host(&mut tx, &host_id, std::slice::from_ref(new), now()).await?.pop()
                    {
                        tx.commit().await?;
                        return Ok(Some(reserved));
                    }
                }
                if complete {
                    break;
                }
            }
        }
        Ok(None)
    }

    async fn mandelbox_spawned(&self, id: Uuid, ports: &[PortSpec]) -> StoreResult<Option<MandelboxRecord>> {
        let at = now();
        // The common case, a warm box reserved for no session: one statement,
        // one round trip.
        let warm = sqlx::query_as::<_, MandelboxRow>(concat!(
            "UPDATE mandelboxes SET state = 'WAITING', ports = $2, updated_at = $3 \
             WHERE id = $1 AND state = 'SPAWNING' AND session_id IS NULL RETURNING ",
            mandelbox_columns!()
        ))
        .bind(id)
        .bind(Json(ports))
        .bind(at)
        .fetch_optional(&self.relaxed)
        .await?;
        if let Some(warm) = warm {
            return Ok(Some(warm.into_record()?));
        }
        let mut tx = self.relaxed.begin().await?;
        let reserved_for: Option<Option<Uuid>> = sqlx::query_scalar("SELECT session_id FROM mandelboxes WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(reserved_for) = reserved_for else {
            return Ok(None);
        };
        let session = match reserved_for {
            Some(session_id) => lock_session(&mut tx, session_id).await?,
            None => None,
        };
        let Some(mandelbox) = lock_mandelbox(&mut tx, id).await? else {
            return Ok(None);
        };
        if mandelbox.state != MandelboxState::Spawning {
            return Ok(None);
        }
        let (state, session_id) = rows::spawned_target(&mandelbox, session.as_ref());
        let spawned = sqlx::query_as::<_, MandelboxRow>(concat!(
            "UPDATE mandelboxes SET state = $2, session_id = $3, ports = $4, updated_at = $5 \
             WHERE id = $1 RETURNING ",
            mandelbox_columns!()
        ))
        .bind(id)
        .bind(state.as_str())
        .bind(session_id)
        .bind(Json(ports))
        .bind(at)
        .fetch_one(&mut *tx)
        .await?
        .into_record()?;
        tx.commit().await?;
        Ok(Some(spawned))
    }

    async fn recycle_torn_down(
        &self,
        host_id: &str,
        id: Uuid,
        replacement: Option<&WarmReplacement>,
    ) -> StoreResult<Recycled> {
        let at = now();
        let ports = replacement.map(|warm| rows::to_json_text(&warm.ports)).transpose()?;
        // Warm-pool bookkeeping: one statement on the relaxed pool, so one
        // round trip.
        // 1. `host` locks the host first (the lock order of reconciliation;
        //    `finished` waits for it).
        // 2. `finished`: the DYING box → DEAD.
        // 3. `replaced`: the replacement, warm already, takes the slot the dead
        //    box frees, if the host is ACTIVE and was within its capacity with
        //    that box counted. The count reads the statement's snapshot, taken
        //    before the host lock, so it can miss a reservation committed while
        //    this waited; that reservation counted the DYING box as taken, so
        //    the swap of one box for another still leaves the host within
        //    capacity.
        // 4. Else the replacement as an earlier application of this write
        //    recorded it (a retry after a lost commit acknowledgement; its id
        //    is new to every other write), in the statement's snapshot. At
        //    most one of the two exists: had the row been there, the insert
        //    would have failed on its id.
        let row = sqlx::query_as::<_, RecycledRow>(concat!(
            "WITH host AS ( \
                 SELECT id, region, state, capacity FROM hosts WHERE id = $2 FOR UPDATE \
             ), finished AS ( \
                 UPDATE mandelboxes SET state = 'DEAD', updated_at = $3 \
                 WHERE id = $1 AND host_id = $2 AND state = 'DYING' AND EXISTS (SELECT 1 FROM host) \
                 RETURNING id \
             ), replaced AS ( \
                 INSERT INTO mandelboxes (id, host_id, region, app, state, session_id, token_hash, ports, \
                 created_at, updated_at) \
                 SELECT $4, h.id, h.region, $5, 'WAITING', NULL, $6, $7::jsonb, $3, $3 FROM host h \
                 WHERE $4::uuid IS NOT NULL AND h.state = 'ACTIVE' AND EXISTS (SELECT 1 FROM finished) \
                   AND (SELECT count(*) FROM mandelboxes m WHERE m.host_id = h.id AND m.state IN ",
            live_box_states!(),
            ") <= h.capacity \
             RETURNING ",
            mandelbox_columns!(),
            ") SELECT EXISTS (SELECT 1 FROM finished) AS finished, ",
            box_columns_of!("r"),
            " FROM (SELECT 1) one LEFT JOIN LATERAL ( \
                 SELECT * FROM replaced \
                 UNION ALL \
                 SELECT ",
            mandelbox_columns!(),
            " FROM mandelboxes WHERE id = $4 AND host_id = $2 \
                 LIMIT 1) r ON true"
        ))
        .bind(id)
        .bind(host_id)
        .bind(at)
        .bind(replacement.map(|warm| warm.id))
        .bind(replacement.map(|warm| warm.app.as_str()))
        .bind(replacement.map(|warm| warm.token_hash.as_str()))
        .bind(ports)
        .fetch_one(&self.relaxed)
        .await?;
        row.into_recycled()
    }

    async fn recycle_torn_down_many(&self, torn_down: &[TornDown]) -> StoreResult<Vec<Recycled>> {
        let distinct: std::collections::HashSet<Uuid> = torn_down.iter().map(|item| item.id).collect();
        // One box twice in a batch would be recycled twice by the statement
        // below (each input row joins the one box it finished).
        if torn_down.len() < 2 || distinct.len() != torn_down.len() {
            return recycled_one_by_one(self, torn_down).await;
        }
        let at = now();
        let mut hosts: Vec<&str> = torn_down.iter().map(|item| item.host_id.as_str()).collect();
        hosts.sort_unstable();
        hosts.dedup();
        fn replacement(item: &TornDown) -> Option<&WarmReplacement> {
            item.replacement.as_ref()
        }
        let ports = torn_down
            .iter()
            .map(|item| replacement(item).map(|warm| rows::to_json_text(&warm.ports)).transpose())
            .collect::<StoreResult<Vec<_>>>()?;
        let mut tx = self.relaxed.begin().await?;
        // The hosts first, in id order (the lock order of reconciliation and
        // of every reservation), so the statement below counts each host's
        // boxes with every concurrent reservation on it committed.
        sqlx::query("SELECT id FROM hosts WHERE id = ANY($1) ORDER BY id FOR UPDATE")
            .bind(&hosts)
            .execute(&mut *tx)
            .await?;
        // `recycle_torn_down` row by row: each DYING box → DEAD, and its
        // replacement in the slot it frees if its host is ACTIVE and was
        // within capacity with the batch's dying boxes counted (each
        // replacement swaps one of them, so the host stays within capacity);
        // a replacement an earlier application recorded is returned as it is (at
        // most one of the two exists: had the row been there, the insert would
        // have failed on its id).
        let rows = sqlx::query_as::<_, RecycledRow>(concat!(
            "WITH input AS ( \
                 SELECT * FROM unnest($1::uuid[], $2::text[], $4::uuid[], $5::text[], $6::text[], $7::text[]) \
                 WITH ORDINALITY AS i(id, host_id, new_id, new_app, new_token, new_ports, n) \
             ), finished AS ( \
                 UPDATE mandelboxes m SET state = 'DEAD', updated_at = $3 FROM input i \
                 WHERE m.id = i.id AND m.host_id = i.host_id AND m.state = 'DYING' RETURNING m.id \
             ), replaced AS ( \
                 INSERT INTO mandelboxes (id, host_id, region, app, state, session_id, token_hash, ports, \
                 created_at, updated_at) \
                 SELECT i.new_id, h.id, h.region, i.new_app, 'WAITING', NULL, i.new_token, i.new_ports::jsonb, $3, $3 \
                 FROM input i JOIN hosts h ON h.id = i.host_id \
                 WHERE i.new_id IS NOT NULL AND h.state = 'ACTIVE' AND i.id IN (SELECT id FROM finished) \
                   AND (SELECT count(*) FROM mandelboxes m WHERE m.host_id = h.id AND m.state IN ",
            live_box_states!(),
            ") <= h.capacity \
             RETURNING ",
            mandelbox_columns!(),
            ") SELECT i.id IN (SELECT id FROM finished) AS finished, ",
            box_columns_of!("r"),
            " FROM input i LEFT JOIN LATERAL ( \
                 SELECT * FROM replaced WHERE id = i.new_id \
                 UNION ALL \
                 SELECT ",
            mandelbox_columns!(),
            " FROM mandelboxes m WHERE m.id = i.new_id AND m.host_id = i.host_id \
                 LIMIT 1) r ON true \
             ORDER BY i.n"
        ))
        .bind(torn_down.iter().map(|item| item.id).collect::<Vec<_>>())
        .bind(torn_down.iter().map(|item| item.host_id.as_str()).collect::<Vec<_>>())
        .bind(at)
        .bind(torn_down.iter().map(|item| replacement(item).map(|warm| warm.id)).collect::<Vec<_>>())
        .bind(torn_down.iter().map(|item| replacement(item).map(|warm| warm.app.as_str())).collect::<Vec<_>>())
        .bind(torn_down.iter().map(|item| replacement(item).map(|warm| warm.token_hash.as_str())).collect::<Vec<_>>())
        .bind(ports)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        if rows.len() != torn_down.len() {
            return Err(StoreError::Corrupt("a recycle batch returned the wrong number of rows".into()));
        }
        rows.into_iter().map(RecycledRow::into_recycled).collect()
    }

    async fn mandelboxes_spawned(&self, reports: &[SpawnReport]) -> StoreResult<Vec<Option<MandelboxRecord>>> {
        if reports.len() < 2 {
            return spawned_one_by_one(self, reports).await;
        }
        let at = now();
        let ports = reports.iter().map(|report| rows::to_json_text(&report.ports)).collect::<StoreResult<Vec<_>>>()?;
        // The common case of `mandelbox_spawned` for all at once: warm boxes
        // reserved for no session, one statement.
        let warm = sqlx::query_as::<_, MandelboxRow>(concat!(
            "UPDATE mandelboxes m SET state = 'WAITING', ports = v.ports::jsonb, updated_at = $3 \
             FROM unnest($1::uuid[], $2::text[]) AS v(id, ports) \
             WHERE m.id = v.id AND m.state = 'SPAWNING' AND m.session_id IS NULL RETURNING ",
            // Qualified: `id` and `ports` are also columns of `v`.
            "m.id, m.host_id, m.region, m.app, m.state, m.session_id, m.ports, m.created_at, m.updated_at"
        ))
        .bind(reports.iter().map(|report| report.id).collect::<Vec<_>>())
        .bind(ports)
        .bind(at)
        .fetch_all(&self.relaxed)
        .await?;
        let mut warm: std::collections::HashMap<Uuid, MandelboxRow> =
            warm.into_iter().map(|row| (row.id, row)).collect();
        let mut spawned = Vec::with_capacity(reports.len());
        for report in reports {
            match warm.remove(&report.id) {
                Some(row) => spawned.push(Some(row.into_record()?)),
                // Reserved for a session, or no longer SPAWNING: the general case.
                None => spawned.push(self.mandelbox_spawned(report.id, &report.ports).await?),
            }
        }
        Ok(spawned)
    }

    async fn mandelbox_finished(
        &self,
        id: Uuid,
        state: MandelboxState,
        reason: EndReason,
    ) -> StoreResult<Option<(MandelboxRecord, Option<SessionRecord>)>> {
        rows::check_finished_state(state)?;
        let at = now();
        let mut tx = self.pool.begin().await?;
        lock_sessions_on(&mut tx, &[id]).await?;
        let Some(before) = lock_mandelbox(&mut tx, id).await? else {
            return Ok(None);
        };
        if !before.state.is_live() {
            return Ok(None);
        }
        sqlx::query("UPDATE mandelboxes SET state = $2, updated_at = $3 WHERE id = $1")
            .bind(id)
            .bind(state.as_str())
            .bind(at)
            .execute(&mut *tx)
            .await?;
        let ended = end_sessions_on(&mut tx, &[id], reason, at).await?;
        if ended.is_empty() {
            commit_relaxed(tx).await?;
        } else {
            tx.commit().await?;
        }
        Ok(Some((before, ended.into_iter().next())))
    }

    async fn get_mandelbox(&self, id: Uuid) -> StoreResult<Option<MandelboxRecord>> {
        sqlx::query_as::<_, MandelboxRow>(concat!("SELECT ", mandelbox_columns!(), " FROM mandelboxes WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(MandelboxRow::into_record)
            .transpose()
    }

    async fn mandelbox_auth(&self, id: Uuid) -> StoreResult<Option<MandelboxAuth>> {
        let Some(row) = sqlx::query_as::<_, MandelboxAuthRow>(concat!(
            "SELECT ",
            mandelbox_columns!(),
            ", token_hash FROM mandelboxes WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        else {
            return Ok(None);
        };
        Ok(Some(MandelboxAuth { mandelbox: row.mandelbox.into_record()?, token_hash: row.token_hash }))
    }

    async fn list_mandelboxes(&self, filter: &MandelboxFilter) -> StoreResult<Vec<MandelboxRecord>> {
        let rows = sqlx::query_as::<_, MandelboxRow>(concat!(
            "SELECT ",
            mandelbox_columns!(),
            " FROM mandelboxes \
             WHERE ($1::text IS NULL OR host_id = $1) AND ($2::text IS NULL OR state = $2) \
               AND ($3 OR state NOT IN ('DEAD', 'LOST')) \
             ORDER BY id DESC LIMIT 1000"
        ))
        .bind(filter.host_id.as_deref())
        .bind(filter.state.map(MandelboxState::as_str))
        .bind(filter.include_finished)
        .fetch_all(&self.pool)
        .await?;
        mandelboxes(rows)
    }

    async fn host_mandelboxes(&self, host_id: &str, states: &[MandelboxState]) -> StoreResult<Vec<MandelboxRecord>> {
        let rows = sqlx::query_as::<_, MandelboxRow>(concat!(
            "SELECT ",
            mandelbox_columns!(),
            " FROM mandelboxes WHERE host_id = $1 AND state = ANY($2) AND state IN ",
            live_box_states!(),
            " ORDER BY created_at, id"
        ))
        .bind(host_id)
        .bind(state_names(states, MandelboxState::as_str))
        .fetch_all(&self.pool)
        .await?;
        mandelboxes(rows)
    }

    // ----- sessions and claims -----------------------------------------

    async fn create_session_and_claim(&self, new: &NewSession, limit: u32) -> StoreResult<ClaimOutcome> {
        let at = now();
        let mut row = claim_for_new_session(&self.pool, new, limit, at).await?;
        if row.is_none() {
            // At the limit, or no user row. The row exists from the user's
            // first authenticated call on; it is created here only for a
            // caller that skipped that, and the claim tried once more.
            sqlx::query("INSERT INTO users (id, created_at) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING")
                .bind(&new.user_id)
                .bind(at)
                .execute(&self.pool)
                .await?;
            row = claim_for_new_session(&self.pool, new, limit, at).await?;
        }
        let Some(row) = row else {
            return Err(StoreError::SessionLimit { limit });
        };
        row.into_outcome()
    }

    async fn create_sessions_and_claim(
        &self,
        news: &[NewSession],
        limit: u32,
    ) -> StoreResult<Vec<Option<ClaimOutcome>>> {
        // One statement per app and region list, each for distinct users (the
        // statement counts a user once); a user's second session is left to
        // the caller. Several statements run in one transaction, so that an
        // error leaves nothing written.
        let mut seen = std::collections::HashSet::with_capacity(news.len());
        let mut groups: Vec<Vec<usize>> = Vec::new();
        for (index, new) in news.iter().enumerate() {
            if !seen.insert(new.user_id.as_str()) {
                continue;
            }
            let same = groups.iter_mut().find(|group| {
                let first = &news[group[0]];
                first.app == new.app && first.regions == new.regions
            });
            match same {
                Some(group) => group.push(index),
                None => groups.push(vec![index]),
            }
        }
        let at = now();
        let mut outcomes: Vec<Option<ClaimOutcome>> = news.iter().map(|_| None).collect();
        let mut place = |group: &[usize], rows: Vec<BatchClaimRow>| -> StoreResult<()> {
            for row in rows {
                let index = usize::try_from(row.batch_n - 1)
                    .ok()
                    .and_then(|n| group.get(n).copied())
                    .ok_or_else(|| StoreError::Corrupt(format!("a claim batch returned place {}", row.batch_n)))?;
                outcomes[index] = Some(row.claim.into_outcome()?);
            }
            Ok(())
        };
        let members = |group: &[usize]| group.iter().map(|&index| &news[index]).collect::<Vec<_>>();
        if let [group] = groups.as_slice() {
            place(group, claim_for_new_sessions(&self.pool, &members(group), limit, at).await?)?;
        } else {
            let mut tx = self.pool.begin().await?;
            for group in &groups {
                place(group, claim_for_new_sessions(&mut *tx, &members(group), limit, at).await?)?;
            }
            tx.commit().await?;
        }
        Ok(outcomes)
    }

    async fn claim_for_session(&self, session_id: Uuid, exclude_hosts: &[String]) -> StoreResult<Option<Claim>> {
        let at = now();
        let mut tx = self.pool.begin().await?;
        let Some(session) = lock_session(&mut tx, session_id).await? else {
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
        let mut tx = self.pool.begin().await?;
        let Some(session) = lock_session(&mut tx, session_id).await? else {
            return Ok(None);
        };
        if session.state != SessionState::Pending {
            return Ok(None);
        }
        let Some(mandelbox) = lock_mandelbox(&mut tx, mandelbox_id).await? else {
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
        let mut tx = self.pool.begin().await?;
        // Session first, then box (the lock order). Each UPDATE checks what it
        // needs; if either finds nothing, dropping the transaction rolls the
        // other back.
        let Some(session) = sqlx::query_as::<_, SessionRow>(concat!(
            "UPDATE sessions SET state = 'RUNNING', updated_at = $2 \
             WHERE id = $1 AND state = 'ASSIGNING' AND mandelbox_id = $3 RETURNING ",
            session_columns!()
        ))
        .bind(session_id)
        .bind(at)
        .bind(mandelbox_id)
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(None);
        };
        let updated = sqlx::query(
            "UPDATE mandelboxes SET state = 'RUNNING', updated_at = $2 \
             WHERE id = $1 AND state = 'ALLOCATED' AND session_id = $3",
        )
        .bind(mandelbox_id)
        .bind(at)
        .bind(session_id)
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() != 1 {
            return Ok(None);
        }
        let session = session.into_record()?;
        // Flushed: the client is told RUNNING, and that must survive a crash.
        tx.commit().await?;
        Ok(Some(session))
    }

    async fn release_claim(&self, session_id: Uuid, mandelbox_id: Uuid, box_state: MandelboxState) -> StoreResult<()> {
        let at = now();
        let mut tx = self.pool.begin().await?;
        let Some(session) = lock_session(&mut tx, session_id).await? else {
            return Ok(());
        };
        let claimed = matches!(session.state, SessionState::Assigning | SessionState::Running);
        if !claimed || session.mandelbox_id != Some(mandelbox_id) {
            return Ok(());
        }
        // A box put back into the pool carries no session.
        sqlx::query(concat!(
            "UPDATE mandelboxes SET state = $2, updated_at = $3, \
             session_id = CASE WHEN $2 = 'WAITING' THEN NULL ELSE session_id END \
             WHERE id = $1 AND state IN ",
            live_box_states!()
        ))
        .bind(mandelbox_id)
        .bind(box_state.as_str())
        .bind(at)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE sessions SET state = 'PENDING', region = NULL, mandelbox_id = NULL, \
             host_id = NULL, updated_at = $2 WHERE id = $1",
        )
        .bind(session_id)
        .bind(at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn end_session(&self, session_id: Uuid, reason: EndReason) -> StoreResult<Option<EndedSession>> {
        let at = now();
        let mut tx = self.pool.begin().await?;
        // The session first (sessions → mandelboxes is the lock order). "Not
        // ended" is written `ended_at IS NULL` (the same thing, by a CHECK of
        // the table): `state <> 'ENDED'` would match the partial index of a
        // user's live sessions, and a generic plan can pick it and read every
        // live session instead of one row by primary key.
        let ended = sqlx::query_as::<_, SessionRow>(concat!(
            "UPDATE sessions SET state = 'ENDED', end_reason = $2, ended_at = $3, updated_at = $3 \
             WHERE id = $1 AND ended_at IS NULL RETURNING ",
            session_columns!()
        ))
        .bind(session_id)
        .bind(reason.as_str())
        .bind(at)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(ended) = ended else {
            drop(tx);
            // Already ended, or unknown.
            return Ok(self.get_session(session_id).await?.map(|session| EndedSession {
                session,
                teardown: None,
                changed: false,
            }));
        };
        // Then its live box → DYING, in a statement of its own: a claim for
        // this (pending) session that committed while the update above waited
        // for the session's lock is only seen by a later statement's snapshot.
        // In one statement the box was read as it was before that claim, and
        // stayed ALLOCATED for an ended session for good.
        let teardown = match ended.mandelbox_id {
            Some(mandelbox_id) => sqlx::query_as::<_, MandelboxRow>(concat!(
                "UPDATE mandelboxes SET state = 'DYING', updated_at = $3 \
                 WHERE id = $1 AND session_id = $2 AND state IN ",
                live_box_states!(),
                " RETURNING ",
                mandelbox_columns!()
            ))
            .bind(mandelbox_id)
            .bind(session_id)
            .bind(at)
            .fetch_optional(&mut *tx)
            .await?
            .map(MandelboxRow::into_record)
            .transpose()?,
            None => None,
        };
        tx.commit().await?;
        Ok(Some(EndedSession { session: ended.into_record()?, teardown, changed: true }))
    }

    async fn end_session_by_token(
        &self,
        mandelbox_id: Uuid,
        token_hash: &str,
        reason: EndReason,
    ) -> StoreResult<TokenEnd> {
        let at = now();
        // One statement, as `end_session`, with the token check first: the
        // box and its token, then its session (only if the token matched and
        // the box is assigned), then the box → DYING. Comparing two hashes
        // in SQL leaks nothing a caller could use to guess the token. The
        // session is found by primary key: `ended_at IS NULL` as in
        // `end_session` (with `state <> 'ENDED'` the planner read every live
        // session through a partial index over live sessions, the since
        // dropped `sessions_live_by_user`, pg_stat_user_indexes showed).
        let row = sqlx::query_as::<_, TokenEndRow>(concat!(
            "WITH auth AS ( \
                 SELECT id, state, session_id, token_hash = $2 AS token_ok FROM mandelboxes WHERE id = $1 \
             ), ended AS ( \
                 UPDATE sessions SET state = 'ENDED', end_reason = $3, ended_at = $4, updated_at = $4 \
                 WHERE id = (SELECT session_id FROM auth WHERE token_ok AND state IN ('ALLOCATED', 'RUNNING')) \
                   AND ended_at IS NULL RETURNING ",
            session_columns!(),
            "), dying AS ( \
                 UPDATE mandelboxes SET state = 'DYING', updated_at = $4 \
                 WHERE id = $1 AND session_id = (SELECT id FROM ended) AND state IN ",
            live_box_states!(),
            " RETURNING ",
            mandelbox_columns!(),
            ") SELECT a.state AS auth_state, a.session_id AS auth_session_id, a.token_ok, ",
            ended_session_columns_of!("e"),
            ", ",
            box_columns_of!("d"),
            " FROM auth a LEFT JOIN ended e ON true LEFT JOIN dying d ON true"
        ))
        .bind(mandelbox_id)
        .bind(token_hash)
        .bind(reason.as_str())
        .bind(at)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => row.into_token_end(),
            None => Ok(TokenEnd::UnknownBox),
        }
    }

    async fn end_sessions_by_token(
        &self,
        reports: &[DisconnectReport],
        reason: EndReason,
    ) -> StoreResult<Vec<TokenEnd>> {
        let distinct: std::collections::HashSet<Uuid> = reports.iter().map(|report| report.mandelbox_id).collect();
        // One box twice in a batch would join its session twice below, and
        // only one of its rows would be told the session was ended.
        if reports.len() < 2 || distinct.len() != reports.len() {
            return ended_one_by_one(self, reports, reason).await;
        }
        let at = now();
        // `end_session_by_token` row by row, in one statement and so one
        // commit for the batch: each box and its token, then the sessions of
        // the boxes whose token matched, then those boxes → DYING. The
        // CTEs' columns are renamed so that the session's and the box's
        // columns can be returned unqualified.
        let rows = sqlx::query_as::<_, TokenEndRow>(concat!(
            "WITH input AS ( \
                 SELECT * FROM unnest($1::uuid[], $2::text[]) WITH ORDINALITY AS i(id, token_hash, n) \
             ), auth AS ( \
                 SELECT i.n AS a_n, m.id AS a_box, m.state AS a_state, m.session_id AS a_session, \
                        m.token_hash = i.token_hash AS a_token_ok \
                 FROM input i JOIN mandelboxes m ON m.id = i.id \
             ), ended AS ( \
                 UPDATE sessions s SET state = 'ENDED', end_reason = $3, ended_at = $4, updated_at = $4 \
                 FROM auth a \
                 WHERE s.id = a.a_session AND a.a_token_ok AND a.a_state IN ('ALLOCATED', 'RUNNING') \
                   AND s.ended_at IS NULL \
                 RETURNING a.a_n AS e_n, a.a_box AS e_box, ",
            session_columns!(),
            "), dying AS ( \
                 UPDATE mandelboxes m SET state = 'DYING', updated_at = $4 \
                 FROM (SELECT e_n, e_box, id AS e_session FROM ended) e \
                 WHERE m.id = e.e_box AND m.session_id = e.e_session AND m.state IN ",
            live_box_states!(),
            " RETURNING e.e_n AS d_n, ",
            mandelbox_columns!(),
            ") SELECT a.a_state AS auth_state, a.a_session AS auth_session_id, \
                 COALESCE(a.a_token_ok, false) AS token_ok, ",
            ended_session_columns_of!("e"),
            ", ",
            box_columns_of!("d"),
            " FROM input i LEFT JOIN auth a ON a.a_n = i.n LEFT JOIN ended e ON e.e_n = i.n \
             LEFT JOIN dying d ON d.d_n = i.n ORDER BY i.n"
        ))
        .bind(reports.iter().map(|report| report.mandelbox_id).collect::<Vec<_>>())
        .bind(reports.iter().map(|report| report.token_hash.as_str()).collect::<Vec<_>>())
        .bind(reason.as_str())
        .bind(at)
        .fetch_all(&self.pool)
        .await?;
        if rows.len() != reports.len() {
            return Err(StoreError::Corrupt("a disconnect batch returned the wrong number of rows".into()));
        }
        rows.into_iter().map(TokenEndRow::into_token_end).collect()
    }

    async fn get_session(&self, id: Uuid) -> StoreResult<Option<SessionRecord>> {
        sqlx::query_as::<_, SessionRow>(concat!("SELECT ", session_columns!(), " FROM sessions WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(SessionRow::into_record)
            .transpose()
    }

    async fn list_sessions(&self, filter: &SessionFilter) -> StoreResult<Vec<SessionRecord>> {
        // Newest first by id (UUIDv7: creation time first). One statement per
        // kind of listing, each naming what it filters on, so that even a
        // generic plan reads an index that fits: a user's rows through
        // `sessions_user_state` (the live ones by the live states named),
        // every live row through `sessions_live_by_state`, the whole history
        // backwards through the primary key.
        macro_rules! listing {
            ($where:expr, $limit:literal) => {
                concat!("SELECT ", session_columns!(), " FROM sessions ", $where, " ORDER BY id DESC LIMIT ", $limit)
            };
        }
        let limit = i64::from(rows::session_list_limit(filter.limit));
        let query = match (filter.user_id.as_deref(), filter.include_ended) {
            (Some(user_id), true) => {
                sqlx::query_as::<_, SessionRow>(listing!("WHERE user_id = $1", "$2")).bind(user_id)
            }
            (Some(user_id), false) => sqlx::query_as::<_, SessionRow>(listing!(
                concat!("WHERE user_id = $1 AND state IN ", live_session_states!()),
                "$2"
            ))
            .bind(user_id),
            (None, true) => sqlx::query_as::<_, SessionRow>(listing!("", "$1")),
            (None, false) => sqlx::query_as::<_, SessionRow>(listing!("WHERE state <> 'ENDED'", "$1")),
        };
        let rows = query.bind(limit).fetch_all(&self.pool).await?;
        sessions(rows)
    }

    async fn pending_sessions(&self, limit: u32) -> StoreResult<Vec<SessionRecord>> {
        let rows = sqlx::query_as::<_, SessionRow>(concat!(
            "SELECT ",
            session_columns!(),
            " FROM sessions WHERE state = 'PENDING' ORDER BY created_at, id LIMIT $1"
        ))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        sessions(rows)
    }

    async fn count_live_sessions(&self, user_id: &str) -> StoreResult<u32> {
        // The live states named, so that `sessions_user_state` is read by three
        // seeks instead of through the user's whole history.
        let live: i64 = sqlx::query_scalar(concat!(
            "SELECT count(*) FROM sessions WHERE user_id = $1 AND state IN ",
            live_session_states!()
        ))
        .bind(user_id)
        .fetch_one(&self.pool)
        .await?;
        rows::to_u32("count", live)
    }

    async fn refresh_host_ranks(&self) -> StoreResult<u64> {
        // Derived data: the relaxed pool (no flush to wait for). One refresh
        // at a time (the transaction's advisory lock; a second one skips),
        // so that two never lock the same ranks in different orders.
        let mut tx = self.relaxed.begin().await?;
        let first: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtext('switchboard.host_ranks'))")
            .fetch_one(&mut *tx)
            .await?;
        if !first {
            return Ok(0);
        }
        // ACTIVE hosts only: neither a claim nor a reservation takes a box
        // elsewhere, and a host that comes back is ranked when it connects.
        let gone = sqlx::query("DELETE FROM host_ranks k USING hosts h WHERE h.id = k.host_id AND h.state <> 'ACTIVE'")
            .execute(&mut *tx)
            .await?
            .rows_affected();
        // Only the ranks that changed are written: an upsert of every row
        // would lock and dirty the whole table on every pass (the count is
        // the pass's main cost: 115–170 ms at 15,000 mostly full hosts,
        // BENCHMARKS.md run Y).
        let changed = sqlx::query(concat!(
            "WITH fresh AS (",
            pg_fresh_ranks!(),
            " WHERE h.state = 'ACTIVE' GROUP BY h.id \
             ) INSERT INTO host_ranks (host_id, region, free_slots, open_slots) \
             SELECT f.id, f.region, f.free_slots, f.open_slots FROM fresh f LEFT JOIN host_ranks k ON k.host_id = f.id \
             WHERE k.host_id IS NULL \
                OR (k.region, k.free_slots, k.open_slots) IS DISTINCT FROM (f.region, f.free_slots, f.open_slots) \
             ORDER BY f.id \
             ON CONFLICT (host_id) DO UPDATE SET region = excluded.region, free_slots = excluded.free_slots, \
             open_slots = excluded.open_slots",
        ))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(gone + changed)
    }

    async fn sweep(&self, pending_cutoff: DateTime<Utc>, spawn_cutoff: DateTime<Utc>) -> StoreResult<SweepOutcome> {
        let at = now();
        let mut tx = self.pool.begin().await?;
        let expired_pending = sqlx::query_as::<_, SessionRow>(concat!(
            "UPDATE sessions SET state = 'ENDED', end_reason = 'NO_CAPACITY', ended_at = $2, \
             updated_at = $2 WHERE state = 'PENDING' AND created_at < $1 RETURNING ",
            session_columns!()
        ))
        .bind(pending_cutoff)
        .bind(at)
        .fetch_all(&mut *tx)
        .await?;
        // Sessions reserved on these boxes are PENDING (never on the box), so
        // they simply stay in the queue.
        let expired_spawns = sqlx::query_as::<_, MandelboxRow>(concat!(
            "UPDATE mandelboxes SET state = 'DEAD', updated_at = $2 \
             WHERE state = 'SPAWNING' AND updated_at < $1 RETURNING ",
            mandelbox_columns!()
        ))
        .bind(spawn_cutoff)
        .bind(at)
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
