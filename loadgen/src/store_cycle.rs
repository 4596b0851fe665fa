//! The allocation cycle's store calls alone: what the database costs for one
//! allocation as the product's data model has it, with no gRPC, no host round
//! trip and no server.
//!
//! Each client runs, in sequence, the four calls the server makes for one
//! warm allocation: `create_session_and_claim` (Allocate),
//! `end_session_by_token` (ReportDisconnect), `recycle_torn_down` (the host's
//! teardown ack, with the replacement's reservation) and `mandelbox_spawned`
//! (the replacement warm). Put next to the bare claim, it splits Allocate's
//! cost ratio in two: what the cycle's SQL adds to the bare claim, and what
//! the server adds to the cycle's SQL.
//!
//! It runs on the server's own database, beside the idle server, on the same
//! hosts and warm boxes the bare claim and Allocate use, so its claim does the
//! same work as theirs. The disconnect-token hashes of the warm boxes are read
//! from the database once; the replacements are the scenario's own. The
//! server is not told (no host hears of these boxes), which is harmless because
//! the limit points are the last of their server: nothing runs on it after them.

use std::{collections::HashMap, sync::Arc, time::Duration};

use sqlx::Row as _;
use switchboard::{
    auth::mandelbox_token,
    model::{EndReason, PortSpec},
    store::{ClaimOutcome, DynStore, NewMandelbox, NewSession, TokenEnd},
};
use tokio::{sync::Mutex, time::Instant};
use uuid::Uuid;

use crate::{
    measure::Progress,
    scenarios::{LimitPoint, collect_limit},
    server::{Backend, REGION},
};

/// The app of the warm pool (`allocation.warm_app`), which the bare claim and
/// the clients ask for too.
const APP: &str = "chrome";

/// Disconnect-token hashes of the scenario's boxes, by box id: the cycle
/// presents a box's own token hash, as the box's protocol server would.
type Tokens = Arc<Mutex<HashMap<Uuid, String>>>;

fn new_box() -> (NewMandelbox, String) {
    let token_hash = mandelbox_token::hash(&mandelbox_token::generate());
    (NewMandelbox { id: Uuid::now_v7(), app: APP.into(), token_hash: token_hash.clone(), session_id: None }, token_hash)
}

fn ports() -> Vec<PortSpec> {
    vec![PortSpec { name: "protocol".into(), port: 32_262, protocol: "tcp".into() }]
}

/// The scenario's store (with the server's pool size) and boxes, kept from
/// one point to the next.
pub(crate) struct StoreCycle {
    store: DynStore,
    tokens: Tokens,
}

impl StoreCycle {
    /// Opens a store on `url` (migrated already by the server) with the pool
    /// a server gets from its configuration, and reads the token hashes of the
    /// warm boxes.
    pub(crate) async fn prepare(backend: Backend, url: &str) -> anyhow::Result<StoreCycle> {
        let pool_size = switchboard::config::Config::default().database.max_connections;
        let store = switchboard::store::connect_with(url, pool_size).await?;
        const WAITING: &str = "SELECT id, token_hash FROM mandelboxes WHERE state = 'WAITING'";
        let mut tokens = HashMap::new();
        match backend {
            Backend::Postgres => {
                let pool = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(url).await?;
                for row in sqlx::query(WAITING).fetch_all(&pool).await? {
                    tokens.insert(row.try_get::<Uuid, _>("id")?, row.try_get::<String, _>("token_hash")?);
                }
                pool.close().await;
            }
            Backend::Sqlite => {
                let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect(url).await?;
                for row in sqlx::query(WAITING).fetch_all(&pool).await? {
                    let id: String = row.try_get("id")?;
                    tokens.insert(id.parse()?, row.try_get::<String, _>("token_hash")?);
                }
                pool.close().await;
            }
        }
        Ok(StoreCycle { store, tokens: Arc::new(Mutex::new(tokens)) })
    }

    /// `clients` concurrent clients, each its own user, looping over `cycle`
    /// for `window` after `warmup`.
    pub(crate) async fn run(
        &self,
        clients: usize,
        warmup: Duration,
        window: Duration,
        progress: &Progress,
    ) -> anyhow::Result<LimitPoint> {
        progress.phase(format!("store cycle x{clients}"));
        let started = Instant::now();
        let (measure_from, end) = (started + warmup, started + warmup + window);
        let mut tasks = Vec::new();
        for client in 0..clients {
            let (store, tokens, progress) = (self.store.clone(), self.tokens.clone(), progress.clone());
            let user_id = format!("loadgen-store-cycle-{client}");
            store.ensure_user(&user_id, None).await?;
            tasks.push(tokio::spawn(async move {
                let (mut samples, mut errors) = (Vec::new(), 0_u64);
                while Instant::now() < end {
                    let at = Instant::now();
                    let ok = matches!(cycle(&store, &tokens, &user_id).await, Ok(true));
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
                (samples, errors)
            }));
        }
        let point = collect_limit(tasks, clients, window).await?;
        progress.finish_line();
        Ok(point)
    }
}

/// One allocation cycle through the store. Ok(false): no warm box was there,
/// or a step found nothing to do (counted as an error).
async fn cycle(store: &DynStore, tokens: &Tokens, user_id: &str) -> anyhow::Result<bool> {
    let new = NewSession {
        id: Uuid::now_v7(),
        user_id: user_id.into(),
        app: APP.into(),
        client_version: "1.0.0".into(),
        regions: vec![REGION.into()],
    };
    let claim = match store.create_session_and_claim(&new, 3).await? {
        ClaimOutcome::Claimed(claim) => claim,
        ClaimOutcome::Pending(session) => {
            store.end_session(session.id, EndReason::NoCapacity).await?;
            return Ok(false);
        }
    };
    let box_id = claim.mandelbox.id;
    let Some(token_hash) = tokens.lock().await.remove(&box_id) else {
        anyhow::bail!("claimed box {box_id} is not one of the scenario's");
    };
    let TokenEnd::Ended { ended: Some(_), .. } =
        store.end_session_by_token(box_id, &token_hash, EndReason::ClientDisconnected).await?
    else {
        return Ok(false);
    };
    let (replacement, hash) = new_box();
    let recycled = store.recycle_torn_down(&claim.host.id, box_id, Some(&replacement)).await?;
    let Some(reserved) = recycled.replacement else {
        return Ok(false);
    };
    tokens.lock().await.insert(reserved.id, hash);
    Ok(store.mandelbox_spawned(reserved.id, &ports()).await?.is_some())
}
