//! Allocate's claims, written as a group commit.
//!
//! An Allocate's claim (the user's place counted, a warm box taken, the
//! session written) is one statement and one flushed commit, and most of an
//! allocation's database work: each claim also ranks the region's hosts
//! anew. Concurrent Allocates queue to one writer that takes every claim
//! queued in one call (`Store::create_sessions_and_claim`): on PostgreSQL
//! one statement and one commit for the batch, its hosts ranked once; on
//! SQLite one write transaction. There is no linger: the writer runs a lone
//! claim at once as the single statement, so a quiet system pays nothing but
//! a hand-off to the writer task and back, and under load a batch is
//! whatever queued during the previous write.
//!
//! A session a batch did not write (its user at the limit or twice in the
//! batch, its user's row held elsewhere) goes back to
//! its caller, which runs it alone on its own task while the writer takes
//! the next batch; so does every session of a batch that failed (`Err`
//! means none was written). Each request thus gets the answer
//! `Store::create_session_and_claim` gives it. With
//! `allocation.group_claims = false` every claim goes straight to the store.

use std::{sync::Arc, time::Instant};

use crate::batcher::Batcher;
use crate::metrics::Metrics;
use crate::store::{ClaimOutcome, DynStore, NewSession, StoreResult};

/// Allocate's claims, grouped (cheap to clone).
#[derive(Clone)]
pub struct SessionClaims {
    store: DynStore,
    limit: u32,
    /// None: every claim run alone.
    group: Option<Batcher<NewSession, Answer>>,
    metrics: Arc<Metrics>,
}

/// The writer's answer for one session.
// Moved once, through the session's oneshot reply; boxing the outcome would
// only add an allocation per claim.
#[allow(clippy::large_enum_variant)]
enum Answer {
    /// Written (or refused) by the writer.
    Claimed(StoreResult<ClaimOutcome>),
    /// Left to the caller, to run alone.
    Alone(NewSession),
}

impl SessionClaims {
    /// Starts `writers` writer tasks when `grouped`; they stop when the last
    /// clone is dropped, once they have written what was queued. `limit` is
    /// the sessions a user may have live (`allocation.max_sessions_per_user`).
    /// The writers' batches are timed into `metrics.claim_writes`, each
    /// caller's wait into `metrics.allocate.claim`.
    pub fn start(store: DynStore, grouped: bool, writers: usize, limit: u32, metrics: Arc<Metrics>) -> SessionClaims {
        let group = grouped.then(|| {
            let store = store.clone();
            let metrics = metrics.clone();
            Batcher::start_writers(writers, std::time::Duration::ZERO, move |news: Vec<NewSession>| {
                let store = store.clone();
                let metrics = metrics.clone();
                async move { claim_batch(&store, news, limit, &metrics).await }
            })
        });
        SessionClaims { store, limit, group, metrics }
    }

    /// `Store::create_session_and_claim` with the configured limit, in the
    /// next group, or alone if the group gives it back (on this task, so
    /// that the writer goes on to the next batch meanwhile).
    pub async fn create_and_claim(&self, new: NewSession) -> StoreResult<ClaimOutcome> {
        let started = Instant::now();
        let outcome = self.claim(new).await;
        self.metrics.allocate.claim.record_since(started);
        outcome
    }

    async fn claim(&self, new: NewSession) -> StoreResult<ClaimOutcome> {
        let Some(group) = &self.group else {
            return self
                .metrics
                .claim_writes
                .record_batch(1, self.store.create_session_and_claim(&new, self.limit))
                .await;
        };
        let new = match group.submit(new).await {
            Ok(Answer::Claimed(outcome)) => return outcome,
            Ok(Answer::Alone(new)) | Err(new) => new,
        };
        let started = Instant::now();
        let outcome = self.store.create_session_and_claim(&new, self.limit).await;
        self.metrics.allocate.claim_alone.record_since(started);
        outcome
    }
}

/// One answer per session of `news`, in order.
async fn claim_batch(store: &DynStore, news: Vec<NewSession>, limit: u32, metrics: &Metrics) -> Vec<Answer> {
    let writes = &metrics.claim_writes;
    if let [new] = news.as_slice() {
        // The single statement is the cheaper one for one session. The
        // writer runs it itself: while it does, the next batch gathers.
        let outcome = writes.record_batch(1, store.create_session_and_claim(new, limit)).await;
        return vec![Answer::Claimed(outcome)];
    }
    let written = match writes.record_batch(news.len(), store.create_sessions_and_claim(&news, limit)).await {
        Ok(outcomes) if outcomes.len() == news.len() => outcomes,
        Ok(outcomes) => {
            tracing::error!(items = news.len(), answers = outcomes.len(), "claim batch answered the wrong count");
            Vec::new()
        }
        Err(error) => {
            tracing::warn!(items = news.len(), %error, "claim batch failed; claiming one by one");
            Vec::new()
        }
    };
    let mut written = written.into_iter();
    news.into_iter()
        .map(|new| match written.next().flatten() {
            Some(outcome) => Answer::Claimed(Ok(outcome)),
            None => Answer::Alone(new),
        })
        .collect()
}
