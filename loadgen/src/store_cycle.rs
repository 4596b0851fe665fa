//! The allocation cycle's store calls alone: what the database costs for one
//! allocation as the product's data model has it, with no gRPC, no host round
//! trip and no server.
//!
//! Each client runs the two calls the server makes for one warm allocation:
//! `create_session_and_claim` (Allocate, through the server's own
//! `SessionClaims`, so grouped with the other clients' claims as on the
//! server) and `end_session_by_token`
//! (ReportDisconnect, through the server's own `SessionEnds`, so grouped with
//! the other clients' reports as on the server), the second in the
//! background while the client claims again (or, with the client waiting,
//! in sequence), as `warm_allocation` does. The warm pool's bookkeeping
//! that follows, `recycle_torn_down` (the host confirmed the teardown and the
//! replacement's spawn: the box DEAD and the replacement WAITING in one
//! write), goes through the server's own `Bookkeeper`, in the background as
//! on the server (no client waits for it), batched with the other clients'.
//! Put next to the bare claim, it splits Allocate's
//! cost ratio in two: what the cycle's SQL adds to the bare claim, and what
//! the server adds to the cycle's SQL.
//!
//! It runs on the server's own database, beside the idle server, on the same
//! hosts and warm boxes the bare claim and Allocate use, so its claim does the
//! same work as theirs. The disconnect-token hashes of the warm boxes are read
//! from the database once; the replacements are the scenario's own. The
//! server is not told (no host hears of these boxes), which is harmless because
//! the limit points are the last of their server: nothing runs on it after them.
//! The idle server still keeps its hosts full, though: its refill sweep may
//! warm a box in a slot it sees free, and a claim may take that box. Its token
//! hash is then read from the database (`BoxTokens::take`), so that the cycle
//! returns it like any other instead of failing and leaving its session live.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use sqlx::Row as _;
use switchboard::{
    auth::mandelbox_token,
    bookkeeping::Bookkeeper,
    model::{EndReason, PortSpec},
    session_claims::SessionClaims,
    session_ends::SessionEnds,
    store::{ClaimOutcome, DisconnectReport, DynStore, NewSession, TokenEnd, TornDown, WarmReplacement},
};
use tokio::{sync::Mutex, time::Instant};
use uuid::Uuid;

use crate::{
    measure::Progress,
    scenarios::{DisconnectModel, LimitPoint, collect_limit},
    server::{Backend, REGION},
};

/// The app of the warm pool (`allocation.warm_app`), which the bare claim and
/// the clients ask for too.
const APP: &str = "chrome";

/// Disconnect-token hashes of the boxes, by box id: the cycle presents a
/// box's own token hash, as the box's protocol server would.
type Tokens = Arc<BoxTokens>;

/// The token hashes the scenario knows (the warm boxes it found, the
/// replacements it wrote), and the database for a box the server warmed since.
struct BoxTokens {
    known: Mutex<HashMap<Uuid, String>>,
    database: TokenDatabase,
}

enum TokenDatabase {
    Postgres(sqlx::PgPool),
    Sqlite(sqlx::SqlitePool),
}

impl BoxTokens {
    fn new(known: HashMap<Uuid, String>, database: TokenDatabase) -> BoxTokens {
        BoxTokens { known: Mutex::new(known), database }
    }

    async fn insert(&self, id: Uuid, token_hash: String) {
        self.known.lock().await.insert(id, token_hash);
    }

    async fn forget(&self, id: &Uuid) {
        self.known.lock().await.remove(id);
    }

    /// The token hash of a box just claimed: known, or else read from the
    /// database (a box the server's refill sweep warmed during the cycle).
    async fn take(&self, id: Uuid) -> anyhow::Result<String> {
        if let Some(token_hash) = self.known.lock().await.remove(&id) {
            return Ok(token_hash);
        }
        let token_hash: Option<String> = match &self.database {
            TokenDatabase::Postgres(pool) => {
                sqlx::query_scalar("SELECT token_hash FROM mandelboxes WHERE id = $1")
                    .bind(id)
                    .fetch_optional(pool)
                    .await?
            }
            TokenDatabase::Sqlite(pool) => {
                sqlx::query_scalar("SELECT token_hash FROM mandelboxes WHERE id = ?1")
                    .bind(id.to_string())
                    .fetch_optional(pool)
                    .await?
            }
        };
        token_hash.ok_or_else(|| anyhow::anyhow!("claimed box {id} is not in the database"))
    }
}

/// A replacement as its host confirmed it: warm, with its ports.
fn new_box() -> WarmReplacement {
    let token_hash = mandelbox_token::hash(&mandelbox_token::generate());
    let ports = vec![PortSpec { name: "protocol".into(), port: 32_262, protocol: "tcp".into() }];
    WarmReplacement { id: Uuid::now_v7(), app: APP.into(), token_hash, ports }
}

/// The scenario's store (with the server's pool size) and boxes, kept from
/// one point to the next.
pub(crate) struct StoreCycle {
    store: DynStore,
    bookkeeping: Bookkeeper,
    session_ends: SessionEnds,
    session_claims: SessionClaims,
    tokens: Tokens,
    /// Background bookkeeping that failed or found nothing to do.
    bookkeeping_errors: Arc<AtomicU64>,
}

impl StoreCycle {
    /// Opens a store on `url` (migrated already by the server) with the
    /// server's pool size, and reads the token hashes of the
    /// warm boxes, batching its writes as the server under test does.
    pub(crate) async fn prepare(
        backend: Backend,
        url: &str,
        settings: crate::server::ServerSettings,
    ) -> anyhow::Result<StoreCycle> {
        let store = switchboard::store::connect_with(url, settings.max_connections).await?;
        let bookkeeping = Bookkeeper::start(store.clone(), Duration::from_millis(settings.bookkeeping_linger_ms));
        let session_ends = SessionEnds::start(store.clone(), !settings.separate_disconnects, settings.writers);
        // The sessions a user may have live, as on the server under test.
        let session_limit = switchboard::config::AllocationConfig::default().max_sessions_per_user;
        let session_claims = SessionClaims::start(
            store.clone(),
            !settings.separate_claims,
            settings.claim_writers,
            session_limit,
            Default::default(),
        );
        const WAITING: &str = "SELECT id, token_hash FROM mandelboxes WHERE state = 'WAITING'";
        let mut tokens = HashMap::new();
        let database = match backend {
            Backend::Postgres => {
                let pool = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(url).await?;
                for row in sqlx::query(WAITING).fetch_all(&pool).await? {
                    tokens.insert(row.try_get::<Uuid, _>("id")?, row.try_get::<String, _>("token_hash")?);
                }
                TokenDatabase::Postgres(pool)
            }
            Backend::Sqlite => {
                let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect(url).await?;
                for row in sqlx::query(WAITING).fetch_all(&pool).await? {
                    let id: String = row.try_get("id")?;
                    tokens.insert(id.parse()?, row.try_get::<String, _>("token_hash")?);
                }
                TokenDatabase::Sqlite(pool)
            }
        };
        Ok(StoreCycle {
            store,
            bookkeeping,
            session_ends,
            session_claims,
            tokens: Arc::new(BoxTokens::new(tokens, database)),
            bookkeeping_errors: Arc::new(AtomicU64::new(0)),
        })
    }

    /// `clients` concurrent clients, each with its users in turn, looping
    /// over a claim and its box's disconnect for `window` after `warmup`;
    /// `model` says whether and when the client waits for the disconnect (as
    /// in `warm_allocation`).
    pub(crate) async fn run(
        &self,
        clients: usize,
        (warmup, window): (Duration, Duration),
        model: DisconnectModel,
        progress: &Progress,
    ) -> anyhow::Result<LimitPoint> {
        progress.phase(format!("store cycle x{clients}"));
        let started = Instant::now();
        let (measure_from, end) = (started + warmup, started + warmup + window);
        let mut tasks = Vec::new();
        for client in 0..clients {
            let (store, tokens, progress) = (self.store.clone(), self.tokens.clone(), progress.clone());
            let session_ends = self.session_ends.clone();
            let session_claims = self.session_claims.clone();
            let (bookkeeping, bookkeeping_errors) = (self.bookkeeping.clone(), self.bookkeeping_errors.clone());
            let users = model.users_per_client();
            let mut user_ids = Vec::with_capacity(users);
            for user in 0..users {
                let user_id = format!("loadgen-store-cycle-{client}-{user}");
                store.ensure_user(&user_id, None).await?;
                user_ids.push(user_id);
            }
            tasks.push(tokio::spawn(async move {
                let (mut samples, mut errors) = (Vec::new(), 0_u64);
                let mut in_flight: VecDeque<tokio::task::JoinHandle<()>> = VecDeque::new();
                let mut turn = 0_usize;
                while Instant::now() < end {
                    let user_id = &user_ids[turn % users];
                    turn += 1;
                    let at = Instant::now();
                    let ok = match claim(&store, &session_claims, &tokens, user_id).await {
                        Ok(Some(claimed)) => {
                            let returned = return_box(
                                session_ends.clone(),
                                bookkeeping.clone(),
                                tokens.clone(),
                                bookkeeping_errors.clone(),
                                claimed,
                            );
                            match model {
                                DisconnectModel::ClientWaits => returned.await,
                                DisconnectModel::FromTheBox { .. } => {
                                    if in_flight.len() >= model.reports_in_flight()
                                        && let Some(oldest) = in_flight.pop_front()
                                    {
                                        let _ = oldest.await;
                                    }
                                    let errors = bookkeeping_errors.clone();
                                    in_flight.push_back(tokio::spawn(async move {
                                        if !returned.await {
                                            errors.fetch_add(1, Ordering::Relaxed);
                                        }
                                    }));
                                    true
                                }
                            }
                        }
                        _ => false,
                    };
                    if at < measure_from {
                        continue;
                    }
                    if ok {
                        samples.push(at.elapsed());
                        progress.add(1);
                    } else {
                        errors += 1;
                        progress.error();
                    }
                }
                for last in in_flight {
                    let _ = last.await;
                }
                (samples, errors)
            }));
        }
        let before = self.bookkeeping_errors.load(Ordering::Relaxed);
        let mut point = collect_limit(tasks, clients, window).await?;
        point.errors += self.bookkeeping_errors.load(Ordering::Relaxed) - before;
        progress.finish_line();
        Ok(point)
    }
}

/// A box a client's session was given, with what its disconnect needs.
struct Claimed {
    host_id: String,
    box_id: Uuid,
    token_hash: String,
}

/// Allocate's store call (grouped with the other clients' claims, as on the
/// server). Ok(None): no warm box was there.
async fn claim(
    store: &DynStore,
    claims: &SessionClaims,
    tokens: &Tokens,
    user_id: &str,
) -> anyhow::Result<Option<Claimed>> {
    let new = NewSession {
        id: Uuid::now_v7(),
        user_id: user_id.into(),
        app: APP.into(),
        client_version: "1.0.0".into(),
        regions: vec![REGION.into()],
    };
    let claim = match claims.create_and_claim(new).await? {
        ClaimOutcome::Claimed(claim) => claim,
        ClaimOutcome::Pending(session) => {
            store.end_session(session.id, EndReason::NoCapacity).await?;
            return Ok(None);
        }
    };
    let box_id = claim.mandelbox.id;
    let token_hash = match tokens.take(box_id).await {
        Ok(token_hash) => token_hash,
        Err(error) => {
            // Not returned, so at least not left live: the user's place back.
            store.end_session(claim.session.id, EndReason::UserEnded).await?;
            return Err(error);
        }
    };
    Ok(Some(Claimed { host_id: claim.host.id, box_id, token_hash }))
}

/// The box's disconnect report (ReportDisconnect's store call, grouped as on
/// the server), then, in the background as on the server, the pool's
/// bookkeeping. False if the report ended nothing; the bookkeeping's
/// failures are counted in `errors`.
async fn return_box(
    session_ends: SessionEnds,
    bookkeeping: Bookkeeper,
    tokens: Tokens,
    errors: Arc<AtomicU64>,
    claimed: Claimed,
) -> bool {
    let report = DisconnectReport { mandelbox_id: claimed.box_id, token_hash: claimed.token_hash };
    let Ok(TokenEnd::Ended { ended: Some(_), .. }) = session_ends.end_by_token(report).await else {
        return false;
    };
    let torn_down = TornDown { host_id: claimed.host_id, id: claimed.box_id, replacement: None };
    tokio::spawn(async move {
        if !matches!(keep_pool(&bookkeeping, &tokens, torn_down).await, Ok(true)) {
            errors.fetch_add(1, Ordering::Relaxed);
        }
    });
    true
}

/// The server's bookkeeping after a teardown: the box DEAD and its
/// replacement, spawned already, WAITING in its slot. Ok(false) if the
/// replacement was refused.
async fn keep_pool(bookkeeping: &Bookkeeper, tokens: &Tokens, mut torn_down: TornDown) -> anyhow::Result<bool> {
    let replacement = new_box();
    let (id, hash) = (replacement.id, replacement.token_hash.clone());
    // Known before the write: once written, the box can be claimed.
    tokens.insert(id, hash).await;
    torn_down.replacement = Some(replacement);
    let recycled = bookkeeping.torn_down(torn_down).await?;
    if recycled.replacement.is_none() {
        tokens.forget(&id).await;
        return Ok(false);
    }
    Ok(true)
}
