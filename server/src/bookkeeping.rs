//! The warm pool's bookkeeping, written in batches.
//!
//! Every allocation cycle ends with a write no client waits for: the host
//! confirmed the old box's teardown and the spawn of its replacement (the box
//! → DEAD and the replacement WAITING in its slot, `Store::recycle_torn_down`).
//! A warm-pool fill writes another: a reserved box's spawn (→ WAITING,
//! `Store::mandelbox_spawned`). Written one by one they were half of a
//! cycle's statements and commits. Here each kind has a queue and one task
//! that writes whatever has queued up, after waiting up to
//! `allocation.bookkeeping_linger_ms` for more, in one statement or
//! transaction (`Store::recycle_torn_down_many`, `Store::mandelboxes_spawned`).
//! Under load a batch holds many boxes; an idle system writes each one
//! after the linger, a few milliseconds that only delay the replacement's
//! warm-up.
//!
//! A batch that fails is written again one by one, so each caller gets its
//! own result; a queue whose task is gone is bypassed (the store is called
//! directly). Both writes are safe to apply twice: they change only a box
//! still SPAWNING or DYING (a replacement is written only with its DYING box),
//! and a replacement written before is returned, not refused, so a batch
//! whose commit landed but whose acknowledgement was lost, written again one
//! by one, does not have its replacements torn down.

use std::time::Duration;

use crate::batcher::{Batcher, whole};

use crate::model::MandelboxRecord;
use crate::store::{DynStore, Recycled, SpawnReport, StoreResult, TornDown};

/// Batched writes of spawn and teardown confirmations (cheap to clone).
#[derive(Clone)]
pub struct Bookkeeper {
    store: DynStore,
    spawned: Batcher<SpawnReport, StoreResult<Option<MandelboxRecord>>>,
    torn_down: Batcher<TornDown, StoreResult<Recycled>>,
}

impl Bookkeeper {
    /// Starts the two writer tasks; they stop when the last clone is dropped,
    /// once they have written what was queued.
    pub fn start(store: DynStore, linger: Duration) -> Bookkeeper {
        let spawned = {
            let store = store.clone();
            Batcher::start(linger, move |reports: Vec<SpawnReport>| {
                let store = store.clone();
                async move {
                    if let Some(done) = whole(store.mandelboxes_spawned(&reports).await, reports.len(), "spawn") {
                        return done;
                    }
                    let mut results = Vec::with_capacity(reports.len());
                    for report in &reports {
                        results.push(spawned_alone(&store, report).await);
                    }
                    results
                }
            })
        };
        let torn_down = {
            let store = store.clone();
            Batcher::start(linger, move |items: Vec<TornDown>| {
                let store = store.clone();
                async move {
                    if let Some(done) = whole(store.recycle_torn_down_many(&items).await, items.len(), "teardown") {
                        return done;
                    }
                    let mut results = Vec::with_capacity(items.len());
                    for item in &items {
                        results.push(recycled_alone(&store, item).await);
                    }
                    results
                }
            })
        };
        Bookkeeper { store, spawned, torn_down }
    }

    /// `Store::mandelbox_spawned`, in the next batch.
    pub async fn spawned(&self, report: SpawnReport) -> StoreResult<Option<MandelboxRecord>> {
        match self.spawned.submit(report).await {
            Ok(result) => result,
            Err(report) => spawned_alone(&self.store, &report).await,
        }
    }

    /// `Store::recycle_torn_down`, in the next batch.
    pub async fn torn_down(&self, item: TornDown) -> StoreResult<Recycled> {
        match self.torn_down.submit(item).await {
            Ok(result) => result,
            Err(item) => recycled_alone(&self.store, &item).await,
        }
    }
}

async fn spawned_alone(store: &DynStore, report: &SpawnReport) -> StoreResult<Option<MandelboxRecord>> {
    store.mandelbox_spawned(report.id, &report.ports).await
}

async fn recycled_alone(store: &DynStore, item: &TornDown) -> StoreResult<Recycled> {
    store.recycle_torn_down(&item.host_id, item.id, item.replacement.as_ref()).await
}
