//! SQLite: the warm pool's batched writes (ReportDisconnect's group commit,
//! teardown acks, spawn acks), each step one statement for the whole batch.
//!
//! Why: every statement is a hand-off to the one writer connection's thread
//! and back, and the write lock is held across all of a transaction's
//! hand-offs, so on SQLite a cycle's cost is mostly its number of statements.
//! Row by row these batches cost three or four statements per item; here
//! they cost three per batch (the spawn acks' common case one, without a
//! transaction). Lists go in as JSON arrays (`json_each`), as
//! elsewhere in this store. The disconnect and teardown batches run inside
//! the caller's write transaction; each function gives what the row-by-row
//! version (in `sqlite.rs`) gives, and the store contract suite checks both
//! backends against one expectation.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::{SqliteConnection, SqliteExecutor};
use uuid::Uuid;

use super::rows::{self, host_columns, live_box_states, mandelbox_columns, session_columns};
use super::sqlite::{
    HostRow, MandelboxAuthRow, MandelboxRow, SessionRow, json_list, mandelboxes, micros, recorded_earlier, sessions,
};
use super::{DisconnectReport, EndedSession, MandelboxAuth, Recycled, SpawnReport, StoreResult, TokenEnd, TornDown};
use crate::model::{EndReason, HostState, MandelboxRecord, SessionRecord};

/// Whether `ids` holds some id twice (a retried report). Batches with one box
/// twice go row by row: the second report must see what the first did.
pub(super) fn has_duplicates(ids: impl Iterator<Item = Uuid>) -> bool {
    let mut seen = HashSet::new();
    ids.into_iter().any(|id| !seen.insert(id))
}

/// Returned box rows, by id.
fn by_id(rows: Vec<MandelboxRow>) -> StoreResult<HashMap<Uuid, MandelboxRecord>> {
    Ok(mandelboxes(rows)?.into_iter().map(|mandelbox| (mandelbox.id, mandelbox)).collect())
}

/// `mandelboxes_spawned`'s common case for a whole batch: warm boxes
/// reserved for no session → WAITING, in one statement (so no transaction of
/// its own: on the writer pool it is one hand-off). The boxes it changed, by
/// id; every other report is left to `mandelbox_spawned`.
pub(super) async fn spawned_warm<'c>(
    executor: impl SqliteExecutor<'c>,
    reports: &[SpawnReport],
    at: DateTime<Utc>,
) -> StoreResult<HashMap<String, MandelboxRow>> {
    let input = reports
        .iter()
        .map(|report| Ok(json!({ "id": report.id.to_string(), "ports": rows::to_json_text(&report.ports)? })))
        .collect::<StoreResult<Vec<_>>>()?;
    // `json_each` has an `id` column too, so the box's columns are qualified
    // where both are in scope; RETURNING sees only the updated table.
    let warm = sqlx::query_as::<_, MandelboxRow>(concat!(
        "UPDATE mandelboxes SET state = 'WAITING', ports = v.value ->> '$.ports', updated_at = ?2 \
         FROM json_each(?1) AS v \
         WHERE mandelboxes.id = v.value ->> '$.id' AND mandelboxes.state = 'SPAWNING' \
           AND mandelboxes.session_id IS NULL RETURNING ",
        mandelbox_columns!()
    ))
    .bind(rows::to_json_text(&input)?)
    .bind(micros(at))
    .fetch_all(executor)
    .await?;
    Ok(warm.into_iter().map(|row| (row.id.clone(), row)).collect())
}

/// `end_sessions_by_token` for distinct boxes: their tokens read in one
/// statement, their sessions ended in one, those sessions' boxes → DYING in
/// one. None when two boxes name one session (the caller goes row by row).
pub(super) async fn ended_by_token(
    conn: &mut SqliteConnection,
    reports: &[DisconnectReport],
    reason: EndReason,
    at: DateTime<Utc>,
) -> StoreResult<Option<Vec<TokenEnd>>> {
    let box_ids: Vec<Uuid> = reports.iter().map(|report| report.mandelbox_id).collect();
    let auths = sqlx::query_as::<_, MandelboxAuthRow>(concat!(
        "SELECT ",
        mandelbox_columns!(),
        ", token_hash FROM mandelboxes WHERE id IN (SELECT value FROM json_each(?1))"
    ))
    .bind(json_list(&box_ids)?)
    .fetch_all(&mut *conn)
    .await?;
    let mut auths: HashMap<Uuid, MandelboxAuth> = auths
        .into_iter()
        .map(|row| {
            let mandelbox = row.mandelbox.into_record()?;
            Ok((mandelbox.id, MandelboxAuth { mandelbox, token_hash: row.token_hash }))
        })
        .collect::<StoreResult<_>>()?;

    // What each report may end, in report order.
    let mut wanted: Vec<Result<Uuid, TokenEnd>> = Vec::with_capacity(reports.len());
    for report in reports {
        wanted.push(TokenEnd::session_for_report(auths.remove(&report.mandelbox_id).as_ref(), &report.token_hash));
    }
    let session_ids: Vec<Uuid> = wanted.iter().filter_map(|wanted| wanted.as_ref().ok().copied()).collect();
    if has_duplicates(session_ids.iter().copied()) {
        return Ok(None);
    }

    let ended = sqlx::query_as::<_, SessionRow>(concat!(
        "UPDATE sessions SET state = 'ENDED', end_reason = ?2, ended_at = ?3, updated_at = ?3 \
         WHERE id IN (SELECT value FROM json_each(?1)) AND state <> 'ENDED' RETURNING ",
        session_columns!()
    ))
    .bind(json_list(&session_ids)?)
    .bind(reason.as_str())
    .bind(micros(at))
    .fetch_all(&mut *conn)
    .await?;
    let mut ended: HashMap<Uuid, SessionRecord> =
        sessions(ended)?.into_iter().map(|session| (session.id, session)).collect();

    // Each ended session's own box (as `ended_in` tears it down).
    let on_boxes: Vec<serde_json::Value> = ended
        .values()
        .filter_map(|session| {
            let mandelbox_id = session.mandelbox_id?;
            Some(json!({ "box": mandelbox_id.to_string(), "session": session.id.to_string() }))
        })
        .collect();
    let mut dying: HashMap<Uuid, MandelboxRecord> = HashMap::new();
    if !on_boxes.is_empty() {
        let rows = sqlx::query_as::<_, MandelboxRow>(concat!(
            "UPDATE mandelboxes SET state = 'DYING', updated_at = ?2 FROM json_each(?1) AS v \
             WHERE mandelboxes.id = v.value ->> '$.box' AND mandelboxes.session_id = v.value ->> '$.session' \
               AND mandelboxes.state IN ",
            live_box_states!(),
            " RETURNING ",
            mandelbox_columns!()
        ))
        .bind(rows::to_json_text(&on_boxes)?)
        .bind(micros(at))
        .fetch_all(&mut *conn)
        .await?;
        dying = by_id(rows)?;
    }

    Ok(Some(
        wanted
            .into_iter()
            .map(|wanted| match wanted {
                Err(answer) => answer,
                Ok(session_id) => {
                    let ended = ended.remove(&session_id).map(|session| {
                        let teardown = session.mandelbox_id.and_then(|id| dying.remove(&id));
                        Box::new(EndedSession { session, teardown, changed: true })
                    });
                    TokenEnd::Ended { session_id, ended }
                }
            })
            .collect(),
    ))
}

#[derive(sqlx::FromRow)]
struct HostLoadRow {
    #[sqlx(flatten)]
    host: HostRow,
    live: i64,
}

/// `recycle_torn_down_many` for distinct boxes, item by item as
/// `recycled_in` would do them in order: each DYING box → DEAD, then its warm
/// replacement inserted WAITING if the host is ACTIVE and has a free slot with
/// the boxes still DYING after it counted. The hosts' live counts are read before
/// the boxes die and kept in step in memory; the write transaction keeps
/// them true.
pub(super) async fn recycled(
    conn: &mut SqliteConnection,
    torn_down: &[TornDown],
    at: DateTime<Utc>,
) -> StoreResult<Vec<Recycled>> {
    let mut host_ids: Vec<&str> = torn_down.iter().map(|item| item.host_id.as_str()).collect();
    host_ids.sort_unstable();
    host_ids.dedup();
    let hosts = sqlx::query_as::<_, HostLoadRow>(concat!(
        "SELECT ",
        host_columns!(),
        ", (SELECT count(*) FROM mandelboxes m WHERE m.host_id = hosts.id AND m.state IN ",
        live_box_states!(),
        ") AS live FROM hosts WHERE id IN (SELECT value FROM json_each(?1))"
    ))
    .bind(json_list(&host_ids)?)
    .fetch_all(&mut *conn)
    .await?;
    let mut hosts: HashMap<String, (crate::model::HostRecord, i64)> = hosts
        .into_iter()
        .map(|row| {
            let host = row.host.into_record()?;
            Ok((host.id.clone(), (host, row.live)))
        })
        .collect::<StoreResult<_>>()?;

    let dying: Vec<serde_json::Value> =
        torn_down.iter().map(|item| json!({ "id": item.id.to_string(), "host": item.host_id })).collect();
    let finished: Vec<String> = sqlx::query_scalar(
        "UPDATE mandelboxes SET state = 'DEAD', updated_at = ?2 FROM json_each(?1) AS v \
         WHERE mandelboxes.id = v.value ->> '$.id' AND mandelboxes.host_id = v.value ->> '$.host' \
           AND mandelboxes.state = 'DYING' RETURNING id",
    )
    .bind(rows::to_json_text(&dying)?)
    .bind(micros(at))
    .fetch_all(&mut *conn)
    .await?;
    let finished: HashSet<String> = finished.into_iter().collect();

    let mut outcomes = Vec::with_capacity(torn_down.len());
    let mut replacements = Vec::new();
    for item in torn_down {
        let item_finished = finished.contains(&item.id.to_string());
        let mut replaced = None;
        if item_finished && let Some((host, live)) = hosts.get_mut(&item.host_id) {
            *live -= 1;
            if let Some(new) = &item.replacement
                && host.state == HostState::Active
                && *live < i64::from(host.capacity)
            {
                *live += 1;
                replaced = Some(new.id);
                replacements.push(json!({
                    "id": new.id.to_string(),
                    "host": host.id,
                    "region": host.region,
                    "app": new.app,
                    "token": new.token_hash,
                    // As text: the column holds the JSON's text.
                    "ports": rows::to_json_text(&new.ports)?,
                }));
            }
        }
        outcomes.push((item_finished, replaced));
    }
    // Replacements an earlier application of the same write recorded (a
    // retry after a lost commit acknowledgement), looked up before this
    // batch inserts any.
    let mut earlier: HashMap<Uuid, MandelboxRecord> = HashMap::new();
    for (item, (item_finished, _)) in torn_down.iter().zip(&outcomes) {
        if !item_finished
            && let Some(recorded) = recorded_earlier(conn, &item.host_id, item.replacement.as_ref()).await?
        {
            earlier.insert(item.id, recorded);
        }
    }

    let mut inserted: HashMap<Uuid, MandelboxRecord> = HashMap::new();
    if !replacements.is_empty() {
        let rows = sqlx::query_as::<_, MandelboxRow>(concat!(
            "INSERT INTO mandelboxes (id, host_id, region, app, state, session_id, token_hash, ports, \
             created_at, updated_at) \
             SELECT v.value ->> '$.id', v.value ->> '$.host', v.value ->> '$.region', v.value ->> '$.app', \
                    'WAITING', NULL, v.value ->> '$.token', v.value ->> '$.ports', ?2, ?2 \
             FROM json_each(?1) AS v ORDER BY v.key RETURNING ",
            mandelbox_columns!()
        ))
        .bind(rows::to_json_text(&replacements)?)
        .bind(micros(at))
        .fetch_all(&mut *conn)
        .await?;
        inserted = by_id(rows)?;
    }
    Ok(torn_down
        .iter()
        .zip(outcomes)
        .map(|(item, (finished, replaced))| Recycled {
            finished,
            replacement: replaced.and_then(|id| inserted.remove(&id)).or_else(|| earlier.remove(&item.id)),
        })
        .collect())
}
