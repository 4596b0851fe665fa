//! A queue and the task that runs what has queued in batches: the warm
//! pool's bookkeeping (`crate::bookkeeping`) and ReportDisconnect's group
//! commit (`crate::session_ends`).
//!
//! A writer takes the first item, then whatever else arrives within the
//! linger (with no linger: whatever is already queued, so a batch is what
//! queued while the previous one was written), up to `MAX_BATCH`, and runs
//! them in one call that returns one output per item.
//!
//! There may be several writers on one queue. While one writes its batch the
//! next waits at the queue, so an item that arrives then is taken at once
//! instead of waiting for that batch's commit; items that arrive while every
//! writer is busy make up the next batch.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::time::Instant;

/// Most items run in one batch (one statement's parameter arrays).
const MAX_BATCH: usize = 256;
/// Items queued before submitters wait for the task (backpressure).
const QUEUE_DEPTH: usize = 4_096;

/// A batch's results, one per item, if the batch was written as a whole;
/// None (logged if it failed) when it must be written again one by one.
pub(crate) fn whole<T, E: std::fmt::Display>(
    outcome: Result<Vec<T>, E>,
    items: usize,
    kind: &str,
) -> Option<Vec<Result<T, E>>> {
    match outcome {
        Ok(results) if results.len() == items => Some(results.into_iter().map(Ok).collect()),
        Ok(_) => None,
        Err(error) => {
            tracing::warn!(kind, items, %error, "batch failed; writing one by one");
            None
        }
    }
}

/// A queue of `I` and the task that runs them in batches, one `O` per `I`.
pub(crate) struct Batcher<I, O> {
    queue: mpsc::Sender<(I, oneshot::Sender<O>)>,
}

impl<I, O> Clone for Batcher<I, O> {
    fn clone(&self) -> Self {
        Batcher { queue: self.queue.clone() }
    }
}

impl<I: Send + Clone + 'static, O: Send + 'static> Batcher<I, O> {
    /// One writer.
    pub(crate) fn start<F, Fut>(linger: Duration, run: F) -> Batcher<I, O>
    where
        F: Fn(Vec<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<O>> + Send + 'static,
    {
        Batcher::start_writers(1, linger, run)
    }

    /// `writers` tasks (at least one) taking batches from one queue, each
    /// running its batch while the others take the next.
    pub(crate) fn start_writers<F, Fut>(writers: usize, linger: Duration, run: F) -> Batcher<I, O>
    where
        F: Fn(Vec<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<O>> + Send + 'static,
    {
        let (queue, receiver) = mpsc::channel(QUEUE_DEPTH);
        let receiver = Arc::new(Mutex::new(receiver));
        let run = Arc::new(run);
        for _ in 0..writers.max(1) {
            tokio::spawn(write_batches(receiver.clone(), linger, run.clone()));
        }
        Batcher { queue }
    }

    /// Runs `item` in a batch and returns its output; gives the item back if
    /// the batch task is gone (or dropped it), for the caller to run alone.
    pub(crate) async fn submit(&self, item: I) -> Result<O, I> {
        let (reply, output) = oneshot::channel();
        if let Err(mpsc::error::SendError((item, _))) = self.queue.send((item.clone(), reply)).await {
            return Err(item);
        }
        output.await.map_err(|_| item)
    }
}

type Queue<I, O> = Arc<Mutex<mpsc::Receiver<(I, oneshot::Sender<O>)>>>;

/// One writer: takes a batch from the queue (holding it while it gathers,
/// so batches do not interleave), lets go of it, and runs the batch.
async fn write_batches<I, O, F, Fut>(queue: Queue<I, O>, linger: Duration, run: Arc<F>)
where
    F: Fn(Vec<I>) -> Fut,
    Fut: Future<Output = Vec<O>>,
{
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        {
            let mut queue = queue.lock().await;
            let Some(first) = queue.recv().await else { return };
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
        }
        let (items, replies): (Vec<I>, Vec<oneshot::Sender<O>>) = batch.drain(..).unzip();
        tracing::trace!(items = items.len(), "batch");
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
    async fn with_two_writers_an_item_is_taken_while_a_batch_is_written() {
        // The batch holding item 1 waits until the test lets it go; item 2,
        // submitted while it waits, must be written by the other writer.
        let (release, held) = tokio::sync::watch::channel(false);
        let (holding, mut started) = mpsc::unbounded_channel();
        let batcher: Batcher<u32, u32> = Batcher::start_writers(2, Duration::ZERO, move |items: Vec<u32>| {
            let mut held = held.clone();
            let holding = holding.clone();
            async move {
                if items.contains(&1) {
                    let _ = holding.send(());
                    let _ = held.wait_for(|released| *released).await;
                }
                items.into_iter().map(|item| item * 2).collect::<Vec<_>>()
            }
        });
        let first = tokio::spawn({
            let batcher = batcher.clone();
            async move { batcher.submit(1).await }
        });
        started.recv().await.unwrap();
        let second = tokio::time::timeout(Duration::from_secs(5), batcher.submit(2)).await;
        assert_eq!(second.ok().and_then(Result::ok), Some(4));
        release.send(true).unwrap();
        assert_eq!(first.await.ok().and_then(Result::ok), Some(2));
    }

    #[tokio::test]
    async fn an_item_the_task_drops_comes_back_to_the_caller() {
        // A task that returns no outputs drops every reply.
        let batcher: Batcher<u32, u32> = Batcher::start(Duration::ZERO, |_items: Vec<u32>| async { Vec::new() });
        assert_eq!(batcher.submit(7).await.err(), Some(7));
    }
}
