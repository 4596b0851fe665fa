//! The warm pool's bookkeeping, written in batches.
//!
//! Every allocation cycle ends with two writes no client waits for: the host
//! confirmed the old box's teardown (the box → DEAD and a replacement reserved
//! in its slot, `Store::recycle_torn_down`) and then the replacement's spawn
//! (→ WAITING, `Store::mandelbox_spawned`). Written one by one they are half
//! of a cycle's statements and commits. Here each kind has a queue and one
//! task that writes whatever has queued up, after waiting up to
//! `allocation.bookkeeping_linger_ms` for more, in one statement or
//! transaction (`Store::recycle_torn_down_many`, `Store::mandelboxes_spawned`).
//! Under load a batch holds many boxes; an idle system writes each one
//! after the linger, a few milliseconds that only delay the replacement's
//! warm-up.
//!
//! A batch that fails is written again one by one, so each caller gets its
//! own result; a queue whose task is gone is bypassed (the store is called
//! directly). Both writes are safe to apply twice: they change only a box
//! still SPAWNING or DYING.

use std::{future::Future, time::Duration};

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::model::MandelboxRecord;
use crate::store::{DynStore, Recycled, SpawnReport, StoreResult, TornDown};

/// Most boxes written in one batch (one statement's parameter arrays).
const MAX_BATCH: usize = 256;
/// Reports queued before submitters wait for the writer (backpressure).
const QUEUE_DEPTH: usize = 4_096;

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

/// A batch's results, one per item, if the batch was written as a whole;
/// None (logged if it failed) when it must be written again one by one.
fn whole<T>(outcome: StoreResult<Vec<T>>, items: usize, kind: &str) -> Option<Vec<StoreResult<T>>> {
    match outcome {
        Ok(results) if results.len() == items => Some(results.into_iter().map(Ok).collect()),
        Ok(_) => None,
        Err(error) => {
            tracing::warn!(kind, boxes = items, %error, "bookkeeping batch failed; writing one by one");
            None
        }
    }
}

async fn spawned_alone(store: &DynStore, report: &SpawnReport) -> StoreResult<Option<MandelboxRecord>> {
    store.mandelbox_spawned(report.id, &report.ports).await
}

async fn recycled_alone(store: &DynStore, item: &TornDown) -> StoreResult<Recycled> {
    store.recycle_torn_down(&item.host_id, item.id, item.replacement.as_ref()).await
}

/// A queue of `I` and the task that runs them in batches, one `O` per `I`.
struct Batcher<I, O> {
    queue: mpsc::Sender<(I, oneshot::Sender<O>)>,
}

impl<I, O> Clone for Batcher<I, O> {
    fn clone(&self) -> Self {
        Batcher { queue: self.queue.clone() }
    }
}

impl<I: Send + Clone + 'static, O: Send + 'static> Batcher<I, O> {
    fn start<F, Fut>(linger: Duration, run: F) -> Batcher<I, O>
    where
        F: Fn(Vec<I>) -> Fut + Send + 'static,
        Fut: Future<Output = Vec<O>> + Send + 'static,
    {
        let (queue, receiver) = mpsc::channel(QUEUE_DEPTH);
        tokio::spawn(run_batches(receiver, linger, run));
        Batcher { queue }
    }

    /// Runs `item` in a batch and returns its output; gives the item back if
    /// the batch task is gone (or dropped it), for the caller to run alone.
    async fn submit(&self, item: I) -> Result<O, I> {
        let (reply, output) = oneshot::channel();
        if let Err(mpsc::error::SendError((item, _))) = self.queue.send((item.clone(), reply)).await {
            return Err(item);
        }
        output.await.map_err(|_| item)
    }
}

async fn run_batches<I, O, F, Fut>(mut queue: mpsc::Receiver<(I, oneshot::Sender<O>)>, linger: Duration, run: F)
where
    F: Fn(Vec<I>) -> Fut,
    Fut: Future<Output = Vec<O>>,
{
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = queue.recv().await {
        batch.push(first);
        let deadline = Instant::now() + linger;
        while batch.len() < MAX_BATCH {
            let next = if linger.is_zero() {
                queue.try_recv().ok()
            } else {
                tokio::select! {
                    next = queue.recv() => next,
                    () = tokio::time::sleep_until(deadline) => None,
                }
            };
            match next {
                Some(item) => batch.push(item),
                None => break,
            }
        }
        let (items, replies): (Vec<I>, Vec<oneshot::Sender<O>>) = batch.drain(..).unzip();
        tracing::trace!(items = items.len(), "bookkeeping batch");
        // A reply whose caller has gone (dropped its future) is not an error.
        for (reply, output) in replies.into_iter().zip(run(items).await) {
            let _ = reply.send(output);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::{Arc, Mutex};

    use super::*;

    /// Runs a batcher whose task records the size of each batch and doubles
    /// each item.
    fn doubling(linger: Duration) -> (Batcher<u32, u32>, Arc<Mutex<Vec<usize>>>) {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let recorded = sizes.clone();
        let batcher = Batcher::start(linger, move |items: Vec<u32>| {
            let recorded = recorded.clone();
            async move {
                recorded.lock().map(|mut sizes| sizes.push(items.len())).ok();
                items.into_iter().map(|item| item * 2).collect::<Vec<_>>()
            }
        });
        (batcher, sizes)
    }

    #[tokio::test]
    async fn concurrent_items_share_a_batch_and_each_gets_its_own_output() {
        let (batcher, sizes) = doubling(Duration::from_millis(50));
        let submits: Vec<_> = (0..10)
            .map(|item| {
                let batcher = batcher.clone();
                tokio::spawn(async move { batcher.submit(item).await })
            })
            .collect();
        let mut outputs = Vec::new();
        for submit in submits {
            outputs.push(submit.await.ok().and_then(Result::ok));
        }
        assert_eq!(outputs, (0..10).map(|item| Some(item * 2)).collect::<Vec<_>>());
        assert_eq!(*sizes.lock().unwrap(), vec![10]);
    }

    #[tokio::test]
    async fn without_linger_a_lone_item_is_written_at_once() {
        let (batcher, sizes) = doubling(Duration::ZERO);
        assert_eq!(batcher.submit(21).await.ok(), Some(42));
        assert_eq!(batcher.submit(4).await.ok(), Some(8));
        assert_eq!(*sizes.lock().unwrap(), vec![1, 1]);
    }

    #[tokio::test]
    async fn an_item_the_task_drops_comes_back_to_the_caller() {
        // A task that returns no outputs drops every reply.
        let batcher: Batcher<u32, u32> = Batcher::start(Duration::ZERO, |_items: Vec<u32>| async { Vec::new() });
        assert_eq!(batcher.submit(7).await.err(), Some(7));
    }
}
