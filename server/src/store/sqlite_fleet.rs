//! SQLite: leases, instances and operations (fleet scaling). Every write runs on
//! the single writer connection in a `BEGIN IMMEDIATE` transaction, so a fenced
//! write's lease check and the write itself are atomic.

use std::time::Duration;

use sqlx::{Sqlite, SqliteConnection, SqlitePool, Transaction};
use uuid::Uuid;

use super::rows::{self, instance_columns, now, operation_columns, region_columns};
use super::sqlite::{micros, optional_time, optional_uuid, time, uuid};
use super::{StoreError, StoreResult};
use crate::model::{
    InstanceRecord, InstanceState, InstanceType, Lease, NewInstance, OperationRecord, OperationState, Region,
    RegionScaling,
};

async fn begin_write(writer: &SqlitePool) -> StoreResult<Transaction<'static, Sqlite>> {
    Ok(writer.begin_with("BEGIN IMMEDIATE").await?)
}

#[derive(sqlx::FromRow)]
pub(super) struct RegionRow {
    name: String,
    enabled: bool,
    image: String,
    buffer: i64,
    min_instances: i64,
    max_instances: i64,
    instance_types: String,
}

impl RegionRow {
    fn into_region(self) -> StoreResult<Region> {
        let instance_types: Vec<InstanceType> = serde_json::from_str(&self.instance_types)
            .map_err(|error| StoreError::Corrupt(format!("regions.instance_types: {error}")))?;
        Ok(Region {
            scaling: RegionScaling {
                buffer: rows::to_u32("regions.buffer", self.buffer)?,
                min_instances: rows::to_u32("regions.min_instances", self.min_instances)?,
                max_instances: rows::to_u32("regions.max_instances", self.max_instances)?,
                instance_types,
            },
            name: self.name,
            enabled: self.enabled,
            image: self.image,
        })
    }
}

pub(super) async fn put_region(writer: &SqlitePool, region: &Region) -> StoreResult<Region> {
    let scaling = &region.scaling;
    sqlx::query_as::<_, RegionRow>(concat!(
        "INSERT INTO regions (name, enabled, image, buffer, min_instances, max_instances, instance_types, \
         created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8) \
         ON CONFLICT (name) DO UPDATE SET enabled = excluded.enabled, image = excluded.image, \
         buffer = excluded.buffer, min_instances = excluded.min_instances, \
         max_instances = excluded.max_instances, instance_types = excluded.instance_types, \
         updated_at = excluded.updated_at RETURNING ",
        region_columns!()
    ))
    .bind(&region.name)
    .bind(region.enabled)
    .bind(&region.image)
    .bind(i64::from(scaling.buffer))
    .bind(i64::from(scaling.min_instances))
    .bind(i64::from(scaling.max_instances))
    .bind(rows::to_json_text(&scaling.instance_types)?)
    .bind(micros(now()))
    .fetch_one(writer)
    .await?
    .into_region()
}

pub(super) async fn list_regions(reader: &SqlitePool) -> StoreResult<Vec<Region>> {
    sqlx::query_as::<_, RegionRow>(concat!("SELECT ", region_columns!(), " FROM regions ORDER BY name"))
        .fetch_all(reader)
        .await?
        .into_iter()
        .map(RegionRow::into_region)
        .collect()
}

// ----- leases ----------------------------------------------------------------

#[derive(sqlx::FromRow)]
struct LeaseRow {
    name: String,
    holder: String,
    epoch: i64,
    expires_at: i64,
}

impl LeaseRow {
    fn into_lease(self) -> StoreResult<Lease> {
        Ok(Lease {
            epoch: rows::to_u64("leases.epoch", self.epoch)?,
            expires_at: time("leases.expires_at", self.expires_at)?,
            name: self.name,
            holder: self.holder,
        })
    }
}

pub(super) async fn acquire_lease(
    writer: &SqlitePool,
    name: &str,
    holder: &str,
    ttl: Duration,
) -> StoreResult<Option<Lease>> {
    let at = now();
    let expires_at = at + rows::chrono_duration(ttl)?;
    let row = sqlx::query_as::<_, LeaseRow>(
        "INSERT INTO leases (name, holder, epoch, expires_at) VALUES (?1, ?2, 1, ?3) \
         ON CONFLICT (name) DO UPDATE SET \
           epoch = CASE WHEN leases.holder = excluded.holder AND leases.expires_at > ?4 \
                        THEN leases.epoch ELSE leases.epoch + 1 END, \
           holder = excluded.holder, expires_at = excluded.expires_at \
         WHERE leases.holder = excluded.holder OR leases.expires_at <= ?4 \
         RETURNING name, holder, epoch, expires_at",
    )
    .bind(name)
    .bind(holder)
    .bind(micros(expires_at))
    .bind(micros(at))
    .fetch_optional(writer)
    .await?;
    row.map(LeaseRow::into_lease).transpose()
}

pub(super) async fn release_lease(writer: &SqlitePool, lease: &Lease) -> StoreResult<()> {
    sqlx::query("UPDATE leases SET expires_at = ?4 WHERE name = ?1 AND holder = ?2 AND epoch = ?3")
        .bind(&lease.name)
        .bind(&lease.holder)
        .bind(rows::epoch_param(lease.epoch))
        .bind(micros(now()))
        .execute(writer)
        .await?;
    Ok(())
}

async fn check_fence(conn: &mut SqliteConnection, lease: &Lease) -> StoreResult<()> {
    let held: Option<i64> = sqlx::query_scalar(
        "SELECT epoch FROM leases WHERE name = ?1 AND holder = ?2 AND epoch = ?3 AND expires_at > ?4",
    )
    .bind(&lease.name)
    .bind(&lease.holder)
    .bind(rows::epoch_param(lease.epoch))
    .bind(micros(now()))
    .fetch_optional(&mut *conn)
    .await?;
    match held {
        Some(_) => Ok(()),
        None => Err(StoreError::Fenced { lease: lease.name.clone(), epoch: lease.epoch }),
    }
}

// ----- instances ---------------------------------------------------------------

#[derive(sqlx::FromRow)]
struct InstanceRow {
    host_id: String,
    region: String,
    instance_id: Option<String>,
    instance_type: String,
    capacity: i64,
    image: String,
    state: String,
    launch_token: String,
    rollout_id: Option<String>,
    reason: Option<String>,
    launched_at: i64,
    connected_at: Option<i64>,
    terminated_at: Option<i64>,
    updated_at: i64,
}

impl InstanceRow {
    fn into_record(self) -> StoreResult<InstanceRecord> {
        Ok(InstanceRecord {
            state: rows::parse_enum("instances.state", &self.state, InstanceState::parse)?,
            capacity: rows::to_u32("instances.capacity", self.capacity)?,
            rollout_id: optional_uuid("instances.rollout_id", self.rollout_id.as_deref())?,
            launched_at: time("instances.launched_at", self.launched_at)?,
            connected_at: optional_time("instances.connected_at", self.connected_at)?,
            terminated_at: optional_time("instances.terminated_at", self.terminated_at)?,
            updated_at: time("instances.updated_at", self.updated_at)?,
            host_id: self.host_id,
            region: self.region,
            instance_id: self.instance_id,
            instance_type: self.instance_type,
            image: self.image,
            launch_token: self.launch_token,
            reason: self.reason,
        })
    }
}

pub(super) async fn record_launch(
    writer: &SqlitePool,
    lease: &Lease,
    instances: &[NewInstance],
) -> StoreResult<Vec<InstanceRecord>> {
    let at = micros(now());
    let mut tx = begin_write(writer).await?;
    check_fence(&mut tx, lease).await?;
    let mut recorded = Vec::with_capacity(instances.len());
    for new in instances {
        let row = sqlx::query_as::<_, InstanceRow>(concat!(
            "INSERT INTO instances (host_id, region, instance_id, instance_type, capacity, image, state, \
             launch_token, rollout_id, reason, launched_at, connected_at, terminated_at, updated_at) \
             VALUES (?1, ?2, NULL, ?3, ?4, ?5, 'LAUNCHING', ?6, ?7, NULL, ?8, NULL, NULL, ?8) RETURNING ",
            instance_columns!()
        ))
        .bind(&new.host_id)
        .bind(&new.region)
        .bind(&new.instance_type)
        .bind(i64::from(new.capacity))
        .bind(&new.image)
        .bind(&new.launch_token)
        .bind(new.rollout_id.map(|id| id.to_string()))
        .bind(at)
        .fetch_one(&mut *tx)
        .await
        .map_err(rows::conflict_on_unique("an instance with this host id exists"))?;
        recorded.push(row.into_record()?);
    }
    tx.commit().await?;
    Ok(recorded)
}

pub(super) async fn instance_launched(
    writer: &SqlitePool,
    host_id: &str,
    instance_id: &str,
    instance_type: &str,
    capacity: u32,
) -> StoreResult<Option<InstanceRecord>> {
    sqlx::query_as::<_, InstanceRow>(concat!(
        "UPDATE instances SET instance_id = ?2, instance_type = ?3, capacity = ?4, updated_at = ?5 \
         WHERE host_id = ?1 AND state <> 'TERMINATED' RETURNING ",
        instance_columns!()
    ))
    .bind(host_id)
    .bind(instance_id)
    .bind(instance_type)
    .bind(i64::from(capacity))
    .bind(micros(now()))
    .fetch_optional(writer)
    .await?
    .map(InstanceRow::into_record)
    .transpose()
}

pub(super) async fn set_instance_state(
    writer: &SqlitePool,
    lease: &Lease,
    host_id: &str,
    state: InstanceState,
    reason: &str,
) -> StoreResult<Option<InstanceRecord>> {
    let at = micros(now());
    let terminated = state == InstanceState::Terminated;
    let mut tx = begin_write(writer).await?;
    check_fence(&mut tx, lease).await?;
    let row = sqlx::query_as::<_, InstanceRow>(concat!(
        "UPDATE instances SET state = ?2, reason = ?3, updated_at = ?4, \
         terminated_at = CASE WHEN ?5 THEN ?4 ELSE terminated_at END \
         WHERE host_id = ?1 AND state <> 'TERMINATED' RETURNING ",
        instance_columns!()
    ))
    .bind(host_id)
    .bind(state.as_str())
    .bind(reason)
    .bind(at)
    .bind(terminated)
    .fetch_optional(&mut *tx)
    .await?;
    if terminated && row.is_some() {
        sqlx::query("UPDATE hosts SET terminated_at = ?2, updated_at = ?2 WHERE id = ?1 AND terminated_at IS NULL")
            .bind(host_id)
            .bind(at)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    row.map(InstanceRow::into_record).transpose()
}

pub(super) async fn list_instances(
    reader: &SqlitePool,
    region: Option<&str>,
    include_terminated: bool,
) -> StoreResult<Vec<InstanceRecord>> {
    sqlx::query_as::<_, InstanceRow>(concat!(
        "SELECT ",
        instance_columns!(),
        " FROM instances WHERE (?1 IS NULL OR region = ?1) AND (state <> 'TERMINATED' OR (?2 AND host_id IN \
         (SELECT host_id FROM instances WHERE state = 'TERMINATED' AND (?1 IS NULL OR region = ?1) \
          ORDER BY terminated_at DESC, host_id LIMIT 500))) ORDER BY host_id"
    ))
    .bind(region)
    .bind(include_terminated)
    .fetch_all(reader)
    .await?
    .into_iter()
    .map(InstanceRow::into_record)
    .collect()
}

pub(super) async fn region_can_grow(reader: &SqlitePool, region: &str, max_instances: u32) -> StoreResult<bool> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM instances WHERE region = ?1 AND state = 'LAUNCHING') \
             OR (SELECT count(*) FROM (SELECT 1 FROM instances WHERE region = ?1 \
                 AND state IN ('LAUNCHING', 'RUNNING', 'DRAINING', 'TERMINATING') LIMIT ?2)) < ?2",
    )
    .bind(region)
    .bind(i64::from(max_instances))
    .fetch_one(reader)
    .await?)
}

pub(super) async fn count_instances(reader: &SqlitePool, region: &str) -> StoreResult<u64> {
    let count: i64 =
        sqlx::query_scalar("SELECT count(*) FROM instances WHERE region = ?1").bind(region).fetch_one(reader).await?;
    rows::to_u64("count", count)
}

/// At a host's Hello: its LAUNCHING instance is RUNNING from now.
pub(super) async fn instance_connected(writer: &SqlitePool, host_id: &str) -> StoreResult<()> {
    sqlx::query(
        "UPDATE instances SET state = 'RUNNING', connected_at = ?2, updated_at = ?2 \
         WHERE host_id = ?1 AND state = 'LAUNCHING'",
    )
    .bind(host_id)
    .bind(micros(now()))
    .execute(writer)
    .await?;
    Ok(())
}

// ----- operations --------------------------------------------------------------

#[derive(sqlx::FromRow)]
struct OperationRow {
    id: String,
    kind: String,
    state: String,
    request: String,
    progress: String,
    error: Option<String>,
    created_at: i64,
    updated_at: i64,
    finished_at: Option<i64>,
}

fn json_object(column: &str, text: &str) -> StoreResult<serde_json::Value> {
    serde_json::from_str(text).map_err(|error| StoreError::Corrupt(format!("{column}: {error}")))
}

impl OperationRow {
    fn into_record(self) -> StoreResult<OperationRecord> {
        Ok(OperationRecord {
            id: uuid("operations.id", &self.id)?,
            state: rows::parse_enum("operations.state", &self.state, OperationState::parse)?,
            request: json_object("operations.request", &self.request)?,
            progress: json_object("operations.progress", &self.progress)?,
            created_at: time("operations.created_at", self.created_at)?,
            updated_at: time("operations.updated_at", self.updated_at)?,
            finished_at: optional_time("operations.finished_at", self.finished_at)?,
            kind: self.kind,
            error: self.error,
        })
    }
}

pub(super) async fn create_operation(writer: &SqlitePool, operation: &OperationRecord) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO operations (id, kind, state, request, progress, error, created_at, updated_at, finished_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )
    .bind(operation.id.to_string())
    .bind(&operation.kind)
    .bind(operation.state.as_str())
    .bind(rows::to_json_text(&operation.request)?)
    .bind(rows::to_json_text(&operation.progress)?)
    .bind(&operation.error)
    .bind(micros(operation.created_at))
    .bind(micros(operation.updated_at))
    .bind(operation.finished_at.map(micros))
    .execute(writer)
    .await
    .map_err(rows::conflict_on_unique("an operation of this kind is already running"))?;
    Ok(())
}

async fn write_operation(conn: &mut SqliteConnection, operation: &OperationRecord) -> StoreResult<()> {
    sqlx::query(
        "UPDATE operations SET state = ?2, progress = ?3, error = ?4, updated_at = ?5, finished_at = ?6 \
         WHERE id = ?1",
    )
    .bind(operation.id.to_string())
    .bind(operation.state.as_str())
    .bind(rows::to_json_text(&operation.progress)?)
    .bind(&operation.error)
    .bind(micros(operation.updated_at))
    .bind(operation.finished_at.map(micros))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

pub(super) async fn update_operation(
    writer: &SqlitePool,
    lease: Option<&Lease>,
    operation: &OperationRecord,
) -> StoreResult<()> {
    let mut tx = begin_write(writer).await?;
    if let Some(lease) = lease {
        check_fence(&mut tx, lease).await?;
    }
    write_operation(&mut tx, operation).await?;
    tx.commit().await?;
    Ok(())
}

pub(super) async fn get_operation(reader: &SqlitePool, id: Uuid) -> StoreResult<Option<OperationRecord>> {
    sqlx::query_as::<_, OperationRow>(concat!("SELECT ", operation_columns!(), " FROM operations WHERE id = ?1"))
        .bind(id.to_string())
        .fetch_optional(reader)
        .await?
        .map(OperationRow::into_record)
        .transpose()
}

pub(super) async fn list_operations(
    reader: &SqlitePool,
    running_only: bool,
    limit: u32,
) -> StoreResult<Vec<OperationRecord>> {
    sqlx::query_as::<_, OperationRow>(concat!(
        "SELECT ",
        operation_columns!(),
        " FROM operations WHERE (NOT ?1 OR state = 'RUNNING') ORDER BY created_at DESC, id LIMIT ?2"
    ))
    .bind(running_only)
    .bind(i64::from(rows::list_limit(limit)))
    .fetch_all(reader)
    .await?
    .into_iter()
    .map(OperationRow::into_record)
    .collect()
}

pub(super) async fn complete_rollout(
    writer: &SqlitePool,
    lease: &Lease,
    operation: &OperationRecord,
    images: &[(String, String)],
) -> StoreResult<()> {
    let at = micros(now());
    let mut tx = begin_write(writer).await?;
    check_fence(&mut tx, lease).await?;
    for (region, image) in images {
        sqlx::query("UPDATE regions SET image = ?2, updated_at = ?3 WHERE name = ?1")
            .bind(region)
            .bind(image)
            .bind(at)
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query("UPDATE instances SET rollout_id = NULL, updated_at = ?2 WHERE rollout_id = ?1")
        .bind(operation.id.to_string())
        .bind(at)
        .execute(&mut *tx)
        .await?;
    write_operation(&mut tx, operation).await?;
    tx.commit().await?;
    Ok(())
}
