//! ReportDisconnect's session ends, written as a group commit.
//!
//! Ending a session on a disconnect report is one statement and one flushed
//! commit that the reporting box waits for: after the claim, the largest
//! part of an allocation cycle. Reports queue to a writer (or several:
//! `allocation.disconnect_writers`, default 1) that takes every report
//! queued in one statement or transaction (`Store::end_sessions_by_token`)
//! and one commit. There is no linger: a lone report is written at once, so
//! a quiet system pays nothing, and under load a batch is whatever queued
//! during the previous write. With two writers a report that arrives while
//! a batch is being written is taken at once by the other, but batches are
//! smaller and there are more commits: with PostgreSQL on the same machine
//! that was 3–14% slower than one writer (BENCHMARKS.md, run L), so one is
//! the default. Two batches touch the same rows only if one box is reported
//! twice at once; should they then deadlock, the loser is written again one
//! by one.
//!
//! A batch that fails is written again one by one, so each report gets its
//! own result (ending an already ended session changes nothing). With
//! `allocation.group_disconnect_reports = false` every report goes straight
//! to the store.

use crate::batcher::{Batcher, whole};
use crate::model::EndReason;
use crate::store::{DisconnectReport, DynStore, StoreResult, TokenEnd};

/// ReportDisconnect's writes, grouped (cheap to clone).
#[derive(Clone)]
pub struct SessionEnds {
    store: DynStore,
    /// None: every report written alone.
    group: Option<Batcher<DisconnectReport, StoreResult<TokenEnd>>>,
}

impl SessionEnds {
    /// The reason every session ended here gets.
    pub const REASON: EndReason = EndReason::ClientDisconnected;

    /// Starts `writers` writer tasks when `grouped`; they stop when the last
    /// clone is dropped, once they have written what was queued.
    pub fn start(store: DynStore, grouped: bool, writers: usize) -> SessionEnds {
        let group = grouped.then(|| {
            let store = store.clone();
            Batcher::start_writers(writers, std::time::Duration::ZERO, move |reports: Vec<DisconnectReport>| {
                let store = store.clone();
                async move {
                    if let Some(ends) = whole(
                        store.end_sessions_by_token(&reports, SessionEnds::REASON).await,
                        reports.len(),
                        "disconnect",
                    ) {
                        return ends;
                    }
                    let mut ends = Vec::with_capacity(reports.len());
                    for report in &reports {
                        ends.push(alone(&store, report).await);
                    }
                    ends
                }
            })
        });
        SessionEnds { store, group }
    }

    /// `Store::end_session_by_token` with `ClientDisconnected`, in the next
    /// group.
    pub async fn end_by_token(&self, report: DisconnectReport) -> StoreResult<TokenEnd> {
        let Some(group) = &self.group else {
            return alone(&self.store, &report).await;
        };
        match group.submit(report).await {
            Ok(end) => end,
            Err(report) => alone(&self.store, &report).await,
        }
    }
}

async fn alone(store: &DynStore, report: &DisconnectReport) -> StoreResult<TokenEnd> {
    store.end_session_by_token(report.mandelbox_id, &report.token_hash, SessionEnds::REASON).await
}
