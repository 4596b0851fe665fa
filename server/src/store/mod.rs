//! Durable state behind one trait, with a PostgreSQL (production) and a SQLite
//! (embedded default) implementation. Both pass the same contract suite
//! (`tests/tests/store_contract.rs`).
//!
//! Every method that changes more than one row runs in one transaction that
//! commits on `Ok` and rolls back on `Err`. Claims are atomic across
//! processes: PostgreSQL claims with `FOR UPDATE SKIP LOCKED`, SQLite through
//! its single writer connection.

mod postgres;
mod postgres_fleet;
mod postgres_joined;
mod rows;
mod sqlite;
mod sqlite_batches;
mod sqlite_fleet;

pub use postgres::{CLAIM_WAITING_SQL as POSTGRES_CLAIM_SQL, PgStore};
pub(crate) use rows::now;
pub use sqlite::{CLAIM_WAITING_SQL as SQLITE_CLAIM_SQL, SqliteStore};

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::model::{
    EndReason, HostHello, HostRecord, HostSummary, InstanceRecord, InstanceState, Lease, MandelboxRecord,
    MandelboxState, NewInstance, OperationRecord, PortSpec, Region, SessionRecord, SessionState, UserRecord,
};

/// `Store::mandelboxes_spawned` as one call per report.
async fn spawned_one_by_one<S: Store + ?Sized>(
    store: &S,
    reports: &[SpawnReport],
) -> StoreResult<Vec<Option<MandelboxRecord>>> {
    let mut spawned = Vec::with_capacity(reports.len());
    for report in reports {
        spawned.push(store.mandelbox_spawned(report.id, &report.ports).await?);
    }
    Ok(spawned)
}

/// `Store::recycle_torn_down_many` as one call per teardown.
async fn recycled_one_by_one<S: Store + ?Sized>(store: &S, torn_down: &[TornDown]) -> StoreResult<Vec<Recycled>> {
    let mut recycled = Vec::with_capacity(torn_down.len());
    for item in torn_down {
        recycled.push(store.recycle_torn_down(&item.host_id, item.id, item.replacement.as_ref()).await?);
    }
    Ok(recycled)
}

/// `Store::end_sessions_by_token` as one call per report.
async fn ended_one_by_one<S: Store + ?Sized>(
    store: &S,
    reports: &[DisconnectReport],
    reason: EndReason,
) -> StoreResult<Vec<TokenEnd>> {
    let mut ends = Vec::with_capacity(reports.len());
    for report in reports {
        ends.push(store.end_session_by_token(report.mandelbox_id, &report.token_hash, reason).await?);
    }
    Ok(ends)
}

/// Shared handle to whichever store the process runs on.
pub type DynStore = Arc<dyn Store>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The user already has `limit` live sessions.
    #[error("user has reached the limit of {limit} live sessions")]
    SessionLimit { limit: u32 },
    /// The database could not be reached or timed out.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// Anything else the database reported.
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
    /// A stored value the domain cannot represent (unknown state, bad JSON,
    /// a column of the wrong type).
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error("migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    /// A write made under a lease that its holder no longer holds (another
    /// replica took it over): refused, nothing changed.
    #[error("lease {lease:?} is no longer held by this holder at epoch {epoch}")]
    Fenced { lease: String, epoch: u64 },
    /// The write conflicts with the current state (e.g. a rollout already runs).
    #[error("conflict: {0}")]
    Conflict(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        match error {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => StoreError::Unavailable(error),
            sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => StoreError::Corrupt(error.to_string()),
            other => StoreError::Database(other),
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A session to create in `create_session_and_claim`.
#[derive(Debug, Clone)]
pub struct NewSession {
    pub id: Uuid,
    pub user_id: String,
    pub app: String,
    pub client_version: String,
    /// Enabled regions to claim from, best first (already validated).
    pub regions: Vec<String>,
}

/// A mandelbox claimed for a session: the box is ALLOCATED with `session_id`
/// set and the session is ASSIGNING with `mandelbox_id`, `host_id` and
/// `region` set.
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    pub session: SessionRecord,
    pub mandelbox: MandelboxRecord,
    pub host: HostRecord,
}

// Built once per allocation request and consumed at once; boxing the claim
// would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum ClaimOutcome {
    Claimed(Claim),
    /// No warm box matched; the session was stored as PENDING.
    Pending(SessionRecord),
}

/// A host heard from on one connection generation (see `record_heartbeats`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatMark {
    pub host_id: String,
    pub generation: u64,
}

/// A new box to reserve a slot for (state SPAWNING).
#[derive(Debug, Clone)]
pub struct NewMandelbox {
    pub id: Uuid,
    pub app: String,
    /// SHA-256 (hex) of the disconnect token; the token itself is never stored.
    pub token_hash: String,
    /// Set when the box is spawned on demand for a waiting session.
    pub session_id: Option<Uuid>,
}

/// A host's confirmed spawn, for `mandelboxes_spawned`.
#[derive(Debug, Clone)]
pub struct SpawnReport {
    pub id: Uuid,
    pub ports: Vec<PortSpec>,
}

/// A box's report that its client left (ReportDisconnect), for
/// `end_sessions_by_token`: the box and the hash of the token it presented.
#[derive(Debug, Clone)]
pub struct DisconnectReport {
    pub mandelbox_id: Uuid,
    pub token_hash: String,
}

/// A host's confirmed teardown, for `recycle_torn_down_many`.
#[derive(Debug, Clone)]
pub struct TornDown {
    pub host_id: String,
    pub id: Uuid,
    /// The warm box the host already spawned in the torn-down box's place.
    pub replacement: Option<WarmReplacement>,
}

/// A warm box its host has spawned to take a torn-down box's slot: it enters
/// the database only with the dead box (`recycle_torn_down`), so a cycle
/// writes no SPAWNING version of it.
#[derive(Debug, Clone, PartialEq)]
pub struct WarmReplacement {
    pub id: Uuid,
    pub app: String,
    /// SHA-256 (hex) of the disconnect token; the token itself is never stored.
    pub token_hash: String,
    /// The ports the host published for it.
    pub ports: Vec<PortSpec>,
}

/// A mandelbox as a reconnecting host reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportedMandelbox {
    pub id: Uuid,
    /// Whether the host says a session is assigned to the box.
    pub assigned: bool,
}

/// What `reconcile_host` decided.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reconciliation {
    /// Boxes the host runs that must go: unknown to the database, already
    /// DEAD/LOST, DYING (teardown never confirmed) or SPAWNING (spawn never
    /// confirmed; those are marked DEAD).
    pub teardown: Vec<Uuid>,
    /// Boxes the database held live on this host that the host no longer has;
    /// now LOST. SPAWNING boxes are never lost here: their spawn may be in
    /// flight (sent after the host's Hello); `sweep` writes off those that
    /// never complete.
    pub lost: Vec<Uuid>,
    /// Boxes the database held as claimed (ALLOCATED/RUNNING) since before the
    /// cutoff but the host reports idle: the Assign never reached the host
    /// (the replica that claimed them died first). Their sessions ended
    /// (ASSIGN_FAILED) and the boxes are WAITING again.
    pub unassigned: Vec<Uuid>,
    /// Sessions that ended: HOST_LOST because their box was lost, ASSIGN_FAILED
    /// because their box is among `unassigned`.
    pub ended_sessions: Vec<SessionRecord>,
}

/// What `recycle_torn_down` did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Recycled {
    /// The box was DYING and is DEAD now.
    pub finished: bool,
    /// The replacement, WAITING in the freed slot (or as an earlier
    /// application of the same write recorded it). None when it was refused
    /// (no replacement given, the box was not DYING, the host is not ACTIVE
    /// or is full): its host runs a box the database does not hold, which the
    /// caller must tear down.
    pub replacement: Option<MandelboxRecord>,
}

/// Result of ending a session.
#[derive(Debug, Clone, PartialEq)]
pub struct EndedSession {
    pub session: SessionRecord,
    /// The box now DYING that its host must tear down; None if the session had
    /// no box, or was already ended (then `session` is returned unchanged).
    pub teardown: Option<MandelboxRecord>,
    /// False if the session was already ENDED before this call.
    pub changed: bool,
}

#[derive(Debug, Clone, Default)]
pub struct MandelboxFilter {
    pub host_id: Option<String>,
    pub state: Option<MandelboxState>,
    /// Include DEAD and LOST boxes.
    pub include_finished: bool,
}

#[derive(Debug, Clone, Default)]
pub struct SessionFilter {
    pub user_id: Option<String>,
    pub include_ended: bool,
    /// At most this many, newest first; 0 means 1000.
    pub limit: u32,
}

/// Credentials of a box needed by ReportDisconnect.
#[derive(Debug, Clone, PartialEq)]
pub struct MandelboxAuth {
    pub mandelbox: MandelboxRecord,
    pub token_hash: String,
}

/// What `end_session_by_token` (ReportDisconnect) found and did.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenEnd {
    /// No such box.
    UnknownBox,
    /// The box exists; the token presented is not its own.
    WrongToken,
    /// The token is the box's, but the box holds no session to end: never
    /// assigned (SPAWNING, WAITING) or finished (DYING, DEAD, LOST).
    NoSession(MandelboxState),
    /// The box's session: `ended` by this call, or None if it had ended already.
    Ended { session_id: Uuid, ended: Option<Box<EndedSession>> },
}

impl TokenEnd {
    /// The session ReportDisconnect may end on a box whose token matched:
    /// only an assigned box's (ALLOCATED or RUNNING), else `NoSession`.
    pub(crate) fn session_to_end(state: MandelboxState, session_id: Option<Uuid>) -> Result<Uuid, TokenEnd> {
        match (state, session_id) {
            (MandelboxState::Allocated | MandelboxState::Running, Some(session_id)) => Ok(session_id),
            _ => Err(TokenEnd::NoSession(state)),
        }
    }

    /// The session a report with `token_hash` may end on the box `auth`
    /// describes (None: there is no such box), or the answer instead.
    pub(crate) fn session_for_report(auth: Option<&MandelboxAuth>, token_hash: &str) -> Result<Uuid, TokenEnd> {
        let Some(auth) = auth else {
            return Err(TokenEnd::UnknownBox);
        };
        if !crate::auth::mandelbox_token::hashes_match(token_hash, &auth.token_hash) {
            return Err(TokenEnd::WrongToken);
        }
        TokenEnd::session_to_end(auth.mandelbox.state, auth.mandelbox.session_id)
    }
}

/// Work the housekeeping sweep did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SweepOutcome {
    /// PENDING sessions older than the cut-off, now ENDED (NO_CAPACITY).
    pub expired_pending: Vec<SessionRecord>,
    /// SPAWNING boxes older than the cut-off, now DEAD; a session reserved on
    /// one is back to PENDING.
    pub expired_spawns: Vec<MandelboxRecord>,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Which implementation, for logs and `--dump-config`.
    fn backend(&self) -> &'static str;

    // ----- regions -------------------------------------------------------

    /// Inserts or replaces a region's settings (scaling settings included).
    async fn put_region(&self, region: &Region) -> StoreResult<Region>;
    async fn list_regions(&self) -> StoreResult<Vec<Region>>;

    // ----- leases (singleton jobs across replicas) -----------------------

    /// Takes or renews the lease `name` for `holder` until now + `ttl`. Taken
    /// when free, expired, or already held by `holder`; the epoch grows every
    /// time the lease was not `holder`'s unexpired lease. None when another
    /// holder's lease is still valid.
    async fn acquire_lease(&self, name: &str, holder: &str, ttl: std::time::Duration) -> StoreResult<Option<Lease>>;

    /// Gives the lease up (expires it now) if `lease` is still current.
    async fn release_lease(&self, lease: &Lease) -> StoreResult<()>;

    // ----- instances (what the scaler launched) ---------------------------

    /// Records instances about to be launched (state LAUNCHING), under
    /// `lease`: `Fenced` if it is no longer current, and then nothing is written.
    async fn record_launch(&self, lease: &Lease, instances: &[NewInstance]) -> StoreResult<Vec<InstanceRecord>>;

    /// The provider launched the instance for `host_id`: its id, actual type
    /// and capacity. A fact, not fenced: a stale leader's launch is still a
    /// real instance that must be known (and then terminated by the scaler).
    async fn instance_launched(
        &self,
        host_id: &str,
        instance_id: &str,
        instance_type: &str,
        capacity: u32,
    ) -> StoreResult<Option<InstanceRecord>>;

    /// Moves an instance to `state` (DRAINING, TERMINATING, TERMINATED) with
    /// `reason`, under `lease` (`Fenced` otherwise). TERMINATED also sets
    /// `terminated_at` on the instance and on its host row. None if unknown or
    /// already TERMINATED.
    async fn set_instance_state(
        &self,
        lease: &Lease,
        host_id: &str,
        state: InstanceState,
        reason: &str,
    ) -> StoreResult<Option<InstanceRecord>>;

    /// Instances (optionally of one region), by host id; with
    /// `include_terminated` also the 500 most recently TERMINATED ones (the
    /// history grows without bound; every live one is always listed).
    async fn list_instances(&self, region: Option<&str>, include_terminated: bool) -> StoreResult<Vec<InstanceRecord>>;

    /// How many instances were ever recorded in `region` (names new hosts).
    async fn count_instances(&self, region: &str) -> StoreResult<u64>;

    /// Whether `region` may get an instance soon: one is LAUNCHING, or fewer
    /// than `max_instances` are live (not TERMINATED). What an Allocate that
    /// found no box asks; it counts at most `max_instances` index entries and
    /// lists nothing.
    async fn region_can_grow(&self, region: &str, max_instances: u32) -> StoreResult<bool>;

    // ----- operations (durable admin work) -------------------------------

    /// Stores a new operation; `Conflict` if one of the same kind is RUNNING.
    async fn create_operation(&self, operation: &OperationRecord) -> StoreResult<()>;

    /// Writes an operation's state, progress and error, under `lease` when
    /// given (`Fenced` otherwise).
    async fn update_operation(&self, lease: Option<&Lease>, operation: &OperationRecord) -> StoreResult<()>;

    async fn get_operation(&self, id: Uuid) -> StoreResult<Option<OperationRecord>>;

    /// Newest first, at most `limit` (0 means 100); only RUNNING ones with `running_only`.
    async fn list_operations(&self, running_only: bool, limit: u32) -> StoreResult<Vec<OperationRecord>>;

    /// The end of a successful rollout, in one transaction under `lease`: every
    /// region in `images` switches to its new image, the rollout's instances
    /// become ordinary ones (rollout id cleared), and `operation` is written.
    async fn complete_rollout(
        &self,
        lease: &Lease,
        operation: &OperationRecord,
        images: &[(String, String)],
    ) -> StoreResult<()>;

    // ----- configuration ---------------------------------------------------

    /// Rows of the `config` table, `(dotted.key, JSON value)`, by key: the
    /// layer between the configuration file and the environment.
    async fn config_entries(&self) -> StoreResult<Vec<(String, String)>>;

    // ----- users ---------------------------------------------------------

    /// Creates the user row if missing (registration); idempotent and safe under
    /// concurrent first calls. Updates the email when one is given.
    async fn ensure_user(&self, user_id: &str, email: Option<&str>) -> StoreResult<()>;

    async fn get_user(&self, user_id: &str) -> StoreResult<Option<UserRecord>>;

    /// Remembers the Stripe customer created for a user, unless one is already
    /// remembered (two concurrent first calls must not make two customers
    /// stick). Returns the customer id now on record; None if the user is unknown.
    async fn set_stripe_customer(&self, user_id: &str, customer_id: &str) -> StoreResult<Option<String>>;

    // ----- hosts ---------------------------------------------------------

    /// An accepted Hello: inserts or updates the host row with what it reported,
    /// increments `generation`, sets `last_heartbeat_at` = now, clears
    /// `disconnected_at`, and sets the state to ACTIVE, or keeps DRAINING if it
    /// was draining. Returns the row (with the new generation).
    async fn host_connected(&self, hello: &HostHello) -> StoreResult<HostRecord>;

    /// The stream of `generation` ended: ACTIVE/DRAINING → DISCONNECTED with
    /// `disconnected_at` = now. Does nothing (returns false) if the row's
    /// generation differs (a newer connection took over) or the host is
    /// already DISCONNECTED/UNHEALTHY.
    async fn host_disconnected(&self, host_id: &str, generation: u64) -> StoreResult<bool>;

    /// Stores `at` as the latest heartbeat time of each host whose connection
    /// generation is still the one given (others are ignored), in one
    /// transaction: a replica writes its hosts' heartbeats as one batch.
    async fn record_heartbeats(&self, beats: &[HeartbeatMark], at: DateTime<Utc>) -> StoreResult<()>;

    /// ACTIVE → DRAINING (kept if already DRAINING, DISCONNECTED/UNHEALTHY
    /// unchanged). None if the host is unknown.
    async fn drain_host(&self, host_id: &str) -> StoreResult<Option<HostRecord>>;

    /// The host is gone (missed heartbeats, or the grace period passed): state
    /// UNHEALTHY; every live box on it → LOST; every live session on those
    /// boxes → ENDED (HOST_LOST). With `generation`, acts only if the row still
    /// has that generation (else returns an empty list and changes nothing).
    /// Returns the sessions it ended.
    async fn mark_host_lost(&self, host_id: &str, generation: Option<u64>) -> StoreResult<Vec<SessionRecord>>;

    async fn get_host(&self, host_id: &str) -> StoreResult<Option<HostRecord>>;

    /// Hosts (optionally of one region) with their box counts, by id.
    async fn list_hosts(&self, region: Option<&str>) -> StoreResult<Vec<HostSummary>>;

    /// The ACTIVE hosts with a slot that holds no live box, by id: what the
    /// warm pool's refill sweep looks for. PostgreSQL answers from the ranks
    /// as of the last `refresh_host_ranks` (a host is also ranked as it
    /// connects), through an index of the hosts with room only; SQLite from
    /// the live boxes its triggers count. Neither counts boxes (the sweep
    /// used to list every host with three counts each: 107 ms at 15,000
    /// hosts of 8 boxes on PostgreSQL, every few seconds on every replica;
    /// now 2 ms, BENCHMARKS.md run AC).
    async fn hosts_with_open_slots(&self) -> StoreResult<Vec<String>>;

    /// Whether an ACTIVE host of one of `regions` holds a box that is or will
    /// soon be free: SPAWNING, WAITING, or DYING (a torn-down box's
    /// replacement is spawned before it is written, so its slot shows DYING
    /// until the replacement is warm). What an Allocate that found no box asks
    /// before it queues its session: at most one index probe per host of the
    /// regions, stopping at the first box, and no counts (it used to count
    /// every box of every host of the region, on every such Allocate: the work
    /// grew exactly when the pool ran dry).
    async fn box_coming_in(&self, regions: &[String]) -> StoreResult<bool>;

    /// One host with its box counts, as `list_hosts` gives it; None if it is
    /// unknown or terminated.
    async fn host_summary(&self, host_id: &str) -> StoreResult<Option<HostSummary>>;

    /// DISCONNECTED hosts whose `disconnected_at` is before `cutoff`.
    async fn hosts_disconnected_before(&self, cutoff: DateTime<Utc>) -> StoreResult<Vec<HostRecord>>;

    /// ACTIVE and DRAINING hosts whose row last changed (`updated_at`: a
    /// Hello, a drain; not a heartbeat) before `cutoff`, by id, without box
    /// counts: the hosts that may be orphans of a replica that is gone.
    async fn connected_hosts_changed_before(&self, cutoff: DateTime<Utc>) -> StoreResult<Vec<HostRecord>>;

    /// At start-up of a single control plane: every ACTIVE/DRAINING host →
    /// DISCONNECTED with `disconnected_at` = `at`, so it gets the reconnect
    /// grace period. Returns how many.
    async fn mark_connected_hosts_disconnected(&self, at: DateTime<Utc>) -> StoreResult<u64>;

    /// A reconnecting host reported `reported`; compares it with the live boxes
    /// the database holds for the host, in one transaction (see
    /// `Reconciliation`). Boxes in both that are WAITING/ALLOCATED/RUNNING are
    /// kept as they are, except claimed boxes the host reports idle whose claim
    /// was last updated before `claimed_before` (a claim younger than that may
    /// still have its Assign in flight): those go back to WAITING and their
    /// sessions end ASSIGN_FAILED.
    async fn reconcile_host(
        &self,
        host_id: &str,
        reported: &[ReportedMandelbox],
        claimed_before: DateTime<Utc>,
    ) -> StoreResult<Reconciliation>;

    // ----- mandelboxes ---------------------------------------------------

    /// Reserves slots on `host_id` for new boxes, in one transaction:
    /// atomically checks that the host is ACTIVE and counts its live boxes,
    /// then inserts as many of `news` as it has free slots as SPAWNING (region
    /// from the host), in order. Empty if there is no room.
    async fn reserve_mandelboxes(&self, host_id: &str, news: &[NewMandelbox]) -> StoreResult<Vec<MandelboxRecord>>;

    /// `reserve_mandelboxes` for one box. None if there is no room.
    async fn reserve_mandelbox(&self, host_id: &str, new: &NewMandelbox) -> StoreResult<Option<MandelboxRecord>> {
        Ok(self.reserve_mandelboxes(host_id, std::slice::from_ref(new)).await?.pop())
    }

    /// Like `reserve_mandelbox`, on the best host in `regions` with room:
    /// first region first, then the fullest host (fewest free slots), hosts
    /// whose image matches the region's image (or any if the region has none),
    /// ACTIVE only, skipping `exclude_hosts`.
    ///
    /// Neither backend counts a whole fleet's boxes for it (an Allocate in a
    /// dry spell makes this call). SQLite keeps each host's live boxes
    /// counted (triggers, one writer) and walks an index of hosts by room:
    /// exact. PostgreSQL walks the hosts that had room at the last
    /// `refresh_host_ranks` or connected since, the fullest first, counting
    /// a page of them at a time: the room it finds is exact (checked under
    /// the host's lock) and the order is exact within a page, but a host that
    /// was full at the last refresh and has freed a slot since is offered
    /// only from the next refresh on.
    async fn reserve_mandelbox_in_regions(
        &self,
        regions: &[String],
        exclude_hosts: &[String],
        new: &NewMandelbox,
    ) -> StoreResult<Option<MandelboxRecord>>;

    /// The host confirmed a spawn: SPAWNING → WAITING with `ports`, or →
    /// ALLOCATED if the box was reserved for a session. None (no change) if the
    /// box is not SPAWNING any more.
    async fn mandelbox_spawned(&self, id: Uuid, ports: &[PortSpec]) -> StoreResult<Option<MandelboxRecord>>;

    /// Its host confirmed the teardown of DYING box `id` and, with
    /// `replacement`, the spawn of the warm box that takes its slot, in one
    /// transaction: the box → DEAD, then the replacement inserted WAITING with
    /// its ports on `host_id` if the host is ACTIVE and was within its
    /// capacity with the dying box counted (the replacement swaps one box for
    /// another). A DYING box carries no live session (its session ended, or
    /// its claim was released, first), so no session changes. Nothing changes,
    /// and `finished` is false, if the box is not a DYING box of that host
    /// (reconciliation or the host's loss wrote it off meanwhile): then the
    /// replacement is refused too, since what the host runs is no longer what
    /// the database knew when it was spawned. Unless the replacement is
    /// already recorded on that host: the write was applied before (a retry
    /// after a lost commit acknowledgement), and the recorded box is returned
    /// as it is now, so that the retry does not tear down a box the database
    /// holds.
    async fn recycle_torn_down(
        &self,
        host_id: &str,
        id: Uuid,
        replacement: Option<&WarmReplacement>,
    ) -> StoreResult<Recycled>;

    /// `mandelbox_spawned` for several boxes at once, one result per report in
    /// order, as if each were applied alone (the warm pool's bookkeeping is
    /// written in batches: `crate::bookkeeping`). A store may write them in
    /// one statement or one transaction; on `Err` nothing is promised about
    /// which were applied, and applying them again one by one is safe (a
    /// box no longer SPAWNING is left alone).
    async fn mandelboxes_spawned(&self, reports: &[SpawnReport]) -> StoreResult<Vec<Option<MandelboxRecord>>> {
        spawned_one_by_one(self, reports).await
    }

    /// `recycle_torn_down` for several boxes at once, one result per teardown
    /// in order, as if each were applied alone. On `Err` nothing is promised
    /// about which were applied; applying them again one by one is safe (a box
    /// no longer DYING is not recycled twice).
    async fn recycle_torn_down_many(&self, torn_down: &[TornDown]) -> StoreResult<Vec<Recycled>> {
        recycled_one_by_one(self, torn_down).await
    }

    /// The box is gone (exited, teardown confirmed, or spawn failed): → `state`
    /// (DEAD or LOST). If a live session is on it, the session → ENDED with
    /// `reason`. Returns the box as it was before, and the session it ended.
    /// None if the box is unknown or already DEAD/LOST.
    async fn mandelbox_finished(
        &self,
        id: Uuid,
        state: MandelboxState,
        reason: EndReason,
    ) -> StoreResult<Option<(MandelboxRecord, Option<SessionRecord>)>>;

    async fn get_mandelbox(&self, id: Uuid) -> StoreResult<Option<MandelboxRecord>>;

    /// A box with its token hash, for ReportDisconnect.
    async fn mandelbox_auth(&self, id: Uuid) -> StoreResult<Option<MandelboxAuth>>;

    /// Newest first, at most 1000.
    async fn list_mandelboxes(&self, filter: &MandelboxFilter) -> StoreResult<Vec<MandelboxRecord>>;

    /// Live boxes on the host with the given states.
    async fn host_mandelboxes(&self, host_id: &str, states: &[MandelboxState]) -> StoreResult<Vec<MandelboxRecord>>;

    // ----- sessions and claims ------------------------------------------

    /// In one transaction: ensures the user row, locks it, counts the user's live
    /// sessions (Err `SessionLimit` if >= `limit`), then claims a WAITING box in
    /// `new.regions` (first region first; within it the fullest host, i.e. the
    /// one with the fewest free slots = capacity - assigned boxes; host ACTIVE;
    /// host image matching the region's image unless that is empty; box app ==
    /// `new.app`) and inserts the session on it; with no such box, inserts it
    /// as PENDING.
    ///
    /// A claimed box and its session are written RUNNING at once, before the
    /// host is told: the allocator answers the client as soon as the host
    /// confirms, with no second commit, and `release_claim` undoes the claim if
    /// the host does not confirm. Should the replica die in between, the host's
    /// next Hello reports the box idle and `reconcile_host` ends the session.
    async fn create_session_and_claim(&self, new: &NewSession, limit: u32) -> StoreResult<ClaimOutcome>;

    /// `create_session_and_claim` for several new sessions at once
    /// (Allocate's group commit: `crate::session_claims`), one answer per
    /// session in order: the outcome of a session written as
    /// `create_session_and_claim` would have written it, or None for one this
    /// call did not write: its user at the limit or earlier in the same
    /// batch, or (PostgreSQL) its user without a row or with its row held by
    /// another transaction. The caller runs those alone, which tells them
    /// apart. On `Err` none was written.
    async fn create_sessions_and_claim(
        &self,
        news: &[NewSession],
        limit: u32,
    ) -> StoreResult<Vec<Option<ClaimOutcome>>>;

    /// Claims a WAITING box (same choice as above, skipping `exclude_hosts`) for
    /// a PENDING session: session → ASSIGNING, box → ALLOCATED. None if the
    /// session is not PENDING or no box matched.
    async fn claim_for_session(&self, session_id: Uuid, exclude_hosts: &[String]) -> StoreResult<Option<Claim>>;

    /// Moves a session onto a box that was reserved (spawned) for it and is now
    /// ALLOCATED: session PENDING → ASSIGNING with the box's host and region.
    /// None if the session is not PENDING or the box not ALLOCATED for it.
    async fn attach_reserved(&self, session_id: Uuid, mandelbox_id: Uuid) -> StoreResult<Option<Claim>>;

    /// The host confirmed an assignment: box ALLOCATED → RUNNING, session
    /// ASSIGNING → RUNNING. None (no change) if either moved on meanwhile.
    async fn confirm_assignment(&self, session_id: Uuid, mandelbox_id: Uuid) -> StoreResult<Option<SessionRecord>>;

    /// The host did not confirm: box → `box_state` (DYING when the host may
    /// still hold it, LOST when the host is gone), session ASSIGNING (or
    /// RUNNING, as `create_session_and_claim` writes it) → PENDING with its box,
    /// host and region cleared. No change if the session is not on that box
    /// in one of those states.
    async fn release_claim(&self, session_id: Uuid, mandelbox_id: Uuid, box_state: MandelboxState) -> StoreResult<()>;

    /// Ends a live session with `reason` (sets `ended_at`); its box, if live,
    /// → DYING and is returned for teardown. An already ENDED session is
    /// returned unchanged with `changed` = false. None if unknown.
    async fn end_session(&self, session_id: Uuid, reason: EndReason) -> StoreResult<Option<EndedSession>>;

    /// Ends the session on box `mandelbox_id` if `token_hash` is the hash of
    /// the box's token and the box is assigned (ALLOCATED or RUNNING), as
    /// `end_session` does. PostgreSQL does the check and the end in one
    /// statement, SQLite in one write transaction; this default takes two
    /// calls.
    async fn end_session_by_token(
        &self,
        mandelbox_id: Uuid,
        token_hash: &str,
        reason: EndReason,
    ) -> StoreResult<TokenEnd> {
        let auth = self.mandelbox_auth(mandelbox_id).await?;
        let session_id = match TokenEnd::session_for_report(auth.as_ref(), token_hash) {
            Ok(session_id) => session_id,
            Err(answer) => return Ok(answer),
        };
        let ended = self.end_session(session_id, reason).await?.filter(|ended| ended.changed).map(Box::new);
        Ok(TokenEnd::Ended { session_id, ended })
    }

    /// `end_session_by_token` for several reports at once (a group commit of
    /// concurrent ReportDisconnects), one result per report in order, as if
    /// each were applied alone. On `Err` nothing is promised about which were
    /// applied; applying them again one by one is safe (a session already
    /// ended is not ended twice).
    async fn end_sessions_by_token(
        &self,
        reports: &[DisconnectReport],
        reason: EndReason,
    ) -> StoreResult<Vec<TokenEnd>> {
        ended_one_by_one(self, reports, reason).await
    }

    async fn get_session(&self, id: Uuid) -> StoreResult<Option<SessionRecord>>;

    async fn list_sessions(&self, filter: &SessionFilter) -> StoreResult<Vec<SessionRecord>>;

    /// PENDING sessions, oldest first.
    async fn pending_sessions(&self, limit: u32) -> StoreResult<Vec<SessionRecord>>;

    /// Live sessions of a user.
    async fn count_live_sessions(&self, user_id: &str) -> StoreResult<u32>;

    /// Housekeeping: expires PENDING sessions created before `pending_cutoff`
    /// and SPAWNING boxes last updated before `spawn_cutoff` (see `SweepOutcome`).
    async fn sweep(&self, pending_cutoff: DateTime<Utc>, spawn_cutoff: DateTime<Utc>) -> StoreResult<SweepOutcome>;

    /// Housekeeping: recomputes the order in which claims and on-demand
    /// reservations try a region's hosts (the fullest first), which
    /// PostgreSQL keeps as of the last call (and ranks a host anew when it
    /// connects) so that neither need count every host's boxes; returns how
    /// many hosts' ranks changed. Between two calls a claim may prefer a host
    /// that was the fullest at the last one; it never misses a box for it.
    /// SQLite ranks by a count on every claim and returns 0.
    async fn refresh_host_ranks(&self) -> StoreResult<u64>;
}

/// Opens the store a URL names, `postgres://…` (or `postgresql://…`) or
/// `sqlite:…`, and applies pending migrations.
pub async fn connect(url: &str) -> StoreResult<DynStore> {
    /// Pool size of one replica; PostgreSQL's default limit of 100 connections
    /// leaves room for several replicas and operators.
    const POSTGRES_MAX_CONNECTIONS: u32 = 10;
    connect_with(url, POSTGRES_MAX_CONNECTIONS).await
}

/// Like `connect`, with the PostgreSQL pool size (`database.max_connections`).
/// SQLite ignores it: it has one writer connection and a small reader pool.
pub async fn connect_with(url: &str, postgres_max_connections: u32) -> StoreResult<DynStore> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let store = PgStore::connect(url, postgres_max_connections.max(1)).await?;
        store.migrate().await?;
        Ok(Arc::new(store))
    } else if url.starts_with("sqlite:") {
        let store = SqliteStore::open(url).await?;
        store.migrate().await?;
        Ok(Arc::new(store))
    } else {
        Err(StoreError::Database(sqlx::Error::Configuration(
            format!("unsupported database URL (want postgres:// or sqlite:): {}", redact_url(url)).into(),
        )))
    }
}

/// The scheme of a URL only: the rest may hold a password.
fn redact_url(url: &str) -> &str {
    url.split_once(':').map_or("<no scheme>", |(scheme, _)| scheme)
}

/// Session states that count as live, for queries.
pub const LIVE_SESSION_STATES: [SessionState; 3] =
    [SessionState::Pending, SessionState::Assigning, SessionState::Running];

/// Box states that occupy a slot, for queries.
pub const LIVE_MANDELBOX_STATES: [MandelboxState; 5] = [
    MandelboxState::Spawning,
    MandelboxState::Waiting,
    MandelboxState::Allocated,
    MandelboxState::Running,
    MandelboxState::Dying,
];
