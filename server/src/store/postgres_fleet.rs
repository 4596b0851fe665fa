//! PostgreSQL: leases, instances and operations (fleet scaling). Fenced writes
//! lock the lease row (`FOR UPDATE`) and check holder, epoch and expiry in the
//! same transaction as the write, so a replica that lost its lease cannot
//! write, even if it does not know yet.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool, types::Json};
use uuid::Uuid;

use super::rows::{self, instance_columns, now, operation_columns, region_columns};
use super::{StoreError, StoreResult};
use crate::model::{
    InstanceRecord, InstanceState, InstanceType, Lease, NewInstance, OperationRecord, OperationState, Region,
    RegionScaling,
};

#[derive(sqlx::FromRow)]
pub(super) struct RegionRow {
    name: String,
    enabled: bool,
    image: String,
    buffer: i64,
    min_instances: i64,
    max_instances: i64,
    instance_types: serde_json::Value,
}

impl RegionRow {
    fn into_region(self) -> StoreResult<Region> {
        let instance_types: Vec<InstanceType> = serde_json::from_value(self.instance_types)
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

pub(super) async fn put_region(pool: &PgPool, region: &Region) -> StoreResult<Region> {
    let scaling = &region.scaling;
    sqlx::query_as::<_, RegionRow>(concat!(
        "INSERT INTO regions (name, enabled, image, buffer, min_instances, max_instances, instance_types, \
         created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8) \
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
    .bind(Json(&scaling.instance_types))
    .bind(now())
    .fetch_one(pool)
    .await?
    .into_region()
}

pub(super) async fn list_regions(pool: &PgPool) -> StoreResult<Vec<Region>> {
    sqlx::query_as::<_, RegionRow>(concat!("SELECT ", region_columns!(), " FROM regions ORDER BY name"))
        .fetch_all(pool)
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
    expires_at: DateTime<Utc>,
}

impl LeaseRow {
    fn into_lease(self) -> StoreResult<Lease> {
        Ok(Lease {
            epoch: rows::to_u64("leases.epoch", self.epoch)?,
            name: self.name,
            holder: self.holder,
            expires_at: self.expires_at,
        })
    }
}

pub(super) async fn acquire_lease(
    pool: &PgPool,
    name: &str,
    holder: &str,
    ttl: Duration,
) -> StoreResult<Option<Lease>> {
    let at = now();
    let expires_at = at + rows::chrono_duration(ttl)?;
    let row = sqlx::query_as::<_, LeaseRow>(
        "INSERT INTO leases (name, holder, epoch, expires_at) VALUES ($1, $2, 1, $3) \
         ON CONFLICT (name) DO UPDATE SET \
           epoch = CASE WHEN leases.holder = excluded.holder AND leases.expires_at > $4 \
                        THEN leases.epoch ELSE leases.epoch + 1 END, \
           holder = excluded.holder, expires_at = excluded.expires_at \
         WHERE leases.holder = excluded.holder OR leases.expires_at <= $4 \
         RETURNING name, holder, epoch, expires_at",
    )
    .bind(name)
    .bind(holder)
    .bind(expires_at)
    .bind(at)
    .fetch_optional(pool)
    .await?;
    row.map(LeaseRow::into_lease).transpose()
}

pub(super) async fn release_lease(pool: &PgPool, lease: &Lease) -> StoreResult<()> {
    sqlx::query("UPDATE leases SET expires_at = $4 WHERE name = $1 AND holder = $2 AND epoch = $3")
        .bind(&lease.name)
        .bind(&lease.holder)
        .bind(rows::epoch_param(lease.epoch))
        .bind(now())
        .execute(pool)
        .await?;
    Ok(())
}

/// Locks the lease row and checks that `lease` is still current.
async fn check_fence(conn: &mut PgConnection, lease: &Lease) -> StoreResult<()> {
    let held: Option<i64> = sqlx::query_scalar(
        "SELECT epoch FROM leases WHERE name = $1 AND holder = $2 AND epoch = $3 AND expires_at > $4 FOR UPDATE",
    )
    .bind(&lease.name)
    .bind(&lease.holder)
    .bind(rows::epoch_param(lease.epoch))
    .bind(now())
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
    rollout_id: Option<Uuid>,
    reason: Option<String>,
    launched_at: DateTime<Utc>,
    connected_at: Option<DateTime<Utc>>,
    terminated_at: Option<DateTime<Utc>>,
    updated_at: DateTime<Utc>,
}

impl InstanceRow {
    fn into_record(self) -> StoreResult<InstanceRecord> {
        Ok(InstanceRecord {
            state: rows::parse_enum("instances.state", &self.state, InstanceState::parse)?,
            capacity: rows::to_u32("instances.capacity", self.capacity)?,
            host_id: self.host_id,
            region: self.region,
            instance_id: self.instance_id,
            instance_type: self.instance_type,
            image: self.image,
            launch_token: self.launch_token,
            rollout_id: self.rollout_id,
            reason: self.reason,
            launched_at: self.launched_at,
            connected_at: self.connected_at,
            terminated_at: self.terminated_at,
            updated_at: self.updated_at,
        })
    }
}

pub(super) async fn record_launch(
    pool: &PgPool,
    lease: &Lease,
    instances: &[NewInstance],
) -> StoreResult<Vec<InstanceRecord>> {
    let at = now();
    let mut tx = pool.begin().await?;
    check_fence(&mut tx, lease).await?;
    let mut recorded = Vec::with_capacity(instances.len());
    for new in instances {
        let row = sqlx::query_as::<_, InstanceRow>(concat!(
            "INSERT INTO instances (host_id, region, instance_id, instance_type, capacity, image, state, \
             launch_token, rollout_id, reason, launched_at, connected_at, terminated_at, updated_at) \
             VALUES ($1, $2, NULL, $3, $4, $5, 'LAUNCHING', $6, $7, NULL, $8, NULL, NULL, $8) RETURNING ",
            instance_columns!()
        ))
        .bind(&new.host_id)
        .bind(&new.region)
        .bind(&new.instance_type)
        .bind(i64::from(new.capacity))
        .bind(&new.image)
        .bind(&new.launch_token)
        .bind(new.rollout_id)
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
    pool: &PgPool,
    host_id: &str,
    instance_id: &str,
    instance_type: &str,
    capacity: u32,
) -> StoreResult<Option<InstanceRecord>> {
    sqlx::query_as::<_, InstanceRow>(concat!(
        "UPDATE instances SET instance_id = $2, instance_type = $3, capacity = $4, updated_at = $5 \
         WHERE host_id = $1 AND state <> 'TERMINATED' RETURNING ",
        instance_columns!()
    ))
    .bind(host_id)
    .bind(instance_id)
    .bind(instance_type)
    .bind(i64::from(capacity))
    .bind(now())
    .fetch_optional(pool)
    .await?
    .map(InstanceRow::into_record)
    .transpose()
}

pub(super) async fn set_instance_state(
    pool: &PgPool,
    lease: &Lease,
    host_id: &str,
    state: InstanceState,
    reason: &str,
) -> StoreResult<Option<InstanceRecord>> {
    let at = now();
    let terminated = state == InstanceState::Terminated;
    let mut tx = pool.begin().await?;
    check_fence(&mut tx, lease).await?;
    let row = sqlx::query_as::<_, InstanceRow>(concat!(
        "UPDATE instances SET state = $2, reason = $3, updated_at = $4, \
         terminated_at = CASE WHEN $5 THEN $4 ELSE terminated_at END \
         WHERE host_id = $1 AND state <> 'TERMINATED' RETURNING ",
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
        sqlx::query("UPDATE hosts SET terminated_at = $2, updated_at = $2 WHERE id = $1 AND terminated_at IS NULL")
            .bind(host_id)
            .bind(at)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    row.map(InstanceRow::into_record).transpose()
}

pub(super) async fn list_instances(
    pool: &PgPool,
    region: Option<&str>,
    include_terminated: bool,
) -> StoreResult<Vec<InstanceRecord>> {
    sqlx::query_as::<_, InstanceRow>(concat!(
        "SELECT ",
        instance_columns!(),
        " FROM instances WHERE ($1::text IS NULL OR region = $1) AND (state <> 'TERMINATED' OR ($2 AND host_id IN \
         (SELECT host_id FROM instances WHERE state = 'TERMINATED' AND ($1::text IS NULL OR region = $1) \
          ORDER BY terminated_at DESC, host_id LIMIT 500))) ORDER BY host_id"
    ))
    .bind(region)
    .bind(include_terminated)
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(InstanceRow::into_record)
    .collect()
}

pub(super) async fn count_instances(pool: &PgPool, region: &str) -> StoreResult<u64> {
    let count: i64 =
        sqlx::query_scalar("SELECT count(*) FROM instances WHERE region = $1").bind(region).fetch_one(pool).await?;
    rows::to_u64("count", count)
}

pub(super) async fn region_can_grow(pool: &PgPool, region: &str, max_instances: u32) -> StoreResult<bool> {
    // The live states by name: each is a range of `instances_region_state`,
    // where `<> 'TERMINATED'` would walk the region's whole history.
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM instances WHERE region = $1 AND state = 'LAUNCHING') \
             OR (SELECT count(*) FROM (SELECT 1 FROM instances WHERE region = $1 \
                 AND state IN ('LAUNCHING', 'RUNNING', 'DRAINING', 'TERMINATING') LIMIT $2) live) < $2",
    )
    .bind(region)
    .bind(i64::from(max_instances))
    .fetch_one(pool)
    .await?)
}

/// At a host's Hello: its LAUNCHING instance is RUNNING from now.
pub(super) async fn instance_connected(conn: &mut PgConnection, host_id: &str, at: DateTime<Utc>) -> StoreResult<()> {
    sqlx::query(
        "UPDATE instances SET state = 'RUNNING', connected_at = $2, updated_at = $2 \
         WHERE host_id = $1 AND state = 'LAUNCHING'",
    )
    .bind(host_id)
    .bind(at)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

// ----- operations --------------------------------------------------------------

#[derive(sqlx::FromRow)]
struct OperationRow {
    id: Uuid,
    kind: String,
    state: String,
    request: serde_json::Value,
    progress: serde_json::Value,
    error: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
}

impl OperationRow {
    fn into_record(self) -> StoreResult<OperationRecord> {
        Ok(OperationRecord {
            state: rows::parse_enum("operations.state", &self.state, OperationState::parse)?,
            id: self.id,
            kind: self.kind,
            request: self.request,
            progress: self.progress,
            error: self.error,
            created_at: self.created_at,
            updated_at: self.updated_at,
            finished_at: self.finished_at,
        })
    }
}

pub(super) async fn create_operation(pool: &PgPool, operation: &OperationRecord) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO operations (id, kind, state, request, progress, error, created_at, updated_at, finished_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(operation.id)
    .bind(&operation.kind)
    .bind(operation.state.as_str())
    .bind(&operation.request)
    .bind(&operation.progress)
    .bind(&operation.error)
    .bind(operation.created_at)
    .bind(operation.updated_at)
    .bind(operation.finished_at)
    .execute(pool)
    .await
    .map_err(rows::conflict_on_unique("an operation of this kind is already running"))?;
    Ok(())
}

async fn write_operation(conn: &mut PgConnection, operation: &OperationRecord) -> StoreResult<()> {
    sqlx::query(
        "UPDATE operations SET state = $2, progress = $3, error = $4, updated_at = $5, finished_at = $6 \
         WHERE id = $1",
    )
    .bind(operation.id)
    .bind(operation.state.as_str())
    .bind(&operation.progress)
    .bind(&operation.error)
    .bind(operation.updated_at)
    .bind(operation.finished_at)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

pub(super) async fn update_operation(
    pool: &PgPool,
    lease: Option<&Lease>,
    operation: &OperationRecord,
) -> StoreResult<()> {
    let mut tx = pool.begin().await?;
    if let Some(lease) = lease {
        check_fence(&mut tx, lease).await?;
    }
    write_operation(&mut tx, operation).await?;
    tx.commit().await?;
    Ok(())
}

pub(super) async fn get_operation(pool: &PgPool, id: Uuid) -> StoreResult<Option<OperationRecord>> {
    sqlx::query_as::<_, OperationRow>(concat!("SELECT ", operation_columns!(), " FROM operations WHERE id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await?
        .map(OperationRow::into_record)
        .transpose()
}

pub(super) async fn list_operations(
    pool: &PgPool,
    running_only: bool,
    limit: u32,
) -> StoreResult<Vec<OperationRecord>> {
    sqlx::query_as::<_, OperationRow>(concat!(
        "SELECT ",
        operation_columns!(),
        " FROM operations WHERE (NOT $1 OR state = 'RUNNING') ORDER BY created_at DESC, id LIMIT $2"
    ))
    .bind(running_only)
    .bind(i64::from(rows::list_limit(limit)))
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(OperationRow::into_record)
    .collect()
}

pub(super) async fn complete_rollout(
    pool: &PgPool,
    lease: &Lease,
    operation: &OperationRecord,
    images: &[(String, String)],
) -> StoreResult<()> {
    let at = now();
    let mut tx = pool.begin().await?;
    check_fence(&mut tx, lease).await?;
    for (region, image) in images {
        sqlx::query("UPDATE regions SET image = $2, updated_at = $3 WHERE name = $1")
            .bind(region)
            .bind(image)
            .bind(at)
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query("UPDATE instances SET rollout_id = NULL, updated_at = $2 WHERE rollout_id = $1")
        .bind(operation.id)
        .bind(at)
        .execute(&mut *tx)
        .await?;
    write_operation(&mut tx, operation).await?;
    tx.commit().await?;
    Ok(())
}
