//! Maintenance mode: a flag shared by every replica (in Redis when configured,
//! in process otherwise) that pauses new allocations while a deploy runs. Host
//! streams, disconnect reports and admin RPCs keep working.
//!
//! Allocate never waits on Redis: a watcher task reads the flag every
//! `POLL` and publishes it on a watch channel, so every replica sees a change
//! within a second and the hot path reads memory. If Redis cannot be read, the
//! last value read stays in force (a Redis outage neither starts nor ends a
//! maintenance window); setting the flag then fails with REDIS_UNAVAILABLE.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::error::{ApiError, ApiResult};

/// How often replicas read the shared flag.
const POLL: Duration = Duration::from_millis(250);
/// Bound on every Redis operation of the flag.
const REDIS_TIMEOUT: Duration = Duration::from_secs(1);

/// Maintenance is on: why, since when, by whom, and when clients should retry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaintenanceState {
    pub reason: String,
    pub retry_after_secs: u32,
    pub since: DateTime<Utc>,
    pub set_by: String,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FlagUnavailable(String);

/// Where the flag lives.
#[async_trait]
pub trait MaintenanceFlag: Send + Sync + 'static {
    async fn read(&self) -> Result<Option<MaintenanceState>, FlagUnavailable>;
    async fn write(&self, state: Option<&MaintenanceState>) -> Result<(), FlagUnavailable>;
}

/// The embedded default: one process, one flag.
#[derive(Default)]
pub struct LocalFlag(std::sync::Mutex<Option<MaintenanceState>>);

#[async_trait]
impl MaintenanceFlag for LocalFlag {
    async fn read(&self) -> Result<Option<MaintenanceState>, FlagUnavailable> {
        Ok(self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone())
    }

    async fn write(&self, state: Option<&MaintenanceState>) -> Result<(), FlagUnavailable> {
        *self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = state.cloned();
        Ok(())
    }
}

/// The flag as a JSON value under `{namespace}:maintenance`, shared by replicas.
pub struct RedisFlag {
    pool: deadpool_redis::Pool,
    key: String,
}

impl RedisFlag {
    pub fn new(url: &str, namespace: &str) -> anyhow::Result<Self> {
        let pool = crate::cluster::bounded_pool(url, REDIS_TIMEOUT)?;
        Ok(RedisFlag { pool, key: format!("{namespace}:maintenance") })
    }

    async fn connection(&self) -> Result<deadpool_redis::Connection, FlagUnavailable> {
        self.pool.get().await.map_err(|error| FlagUnavailable(format!("redis unavailable: {error}")))
    }
}

#[async_trait]
impl MaintenanceFlag for RedisFlag {
    async fn read(&self) -> Result<Option<MaintenanceState>, FlagUnavailable> {
        use deadpool_redis::redis::AsyncCommands;
        let mut connection = self.connection().await?;
        let raw: Option<String> = tokio::time::timeout(REDIS_TIMEOUT, connection.get(&self.key))
            .await
            .map_err(|_| FlagUnavailable("redis did not answer in time".into()))?
            .map_err(|error| FlagUnavailable(format!("redis: {error}")))?;
        match raw {
            None => Ok(None),
            Some(raw) => serde_json::from_str(&raw)
                .map(Some)
                .map_err(|error| FlagUnavailable(format!("unreadable maintenance flag: {error}"))),
        }
    }

    async fn write(&self, state: Option<&MaintenanceState>) -> Result<(), FlagUnavailable> {
        use deadpool_redis::redis::AsyncCommands;
        let mut connection = self.connection().await?;
        let result: Result<(), _> = match state {
            Some(state) => {
                let json = serde_json::to_string(state).map_err(|error| FlagUnavailable(error.to_string()))?;
                tokio::time::timeout(REDIS_TIMEOUT, connection.set(&self.key, json)).await
            }
            None => tokio::time::timeout(REDIS_TIMEOUT, connection.del(&self.key)).await,
        }
        .map_err(|_| FlagUnavailable("redis did not answer in time".into()))?;
        result.map_err(|error| FlagUnavailable(format!("redis: {error}")))
    }
}

/// The shared flag and this replica's view of it; cheap to clone.
#[derive(Clone)]
pub struct Maintenance {
    flag: Arc<dyn MaintenanceFlag>,
    current: watch::Sender<Option<MaintenanceState>>,
}

impl Maintenance {
    pub fn new(flag: Arc<dyn MaintenanceFlag>) -> Self {
        Maintenance { flag, current: watch::Sender::new(None) }
    }

    /// The state as this replica last read it (no I/O).
    pub fn current(&self) -> Option<MaintenanceState> {
        self.current.borrow().clone()
    }

    /// Allocate's check: UNAVAILABLE MAINTENANCE with a retry hint while on.
    pub fn refuse_if_on(&self) -> ApiResult<()> {
        match &*self.current.borrow() {
            Some(state) => {
                Err(ApiError::Maintenance { reason: state.reason.clone(), retry_after_secs: state.retry_after_secs })
            }
            None => Ok(()),
        }
    }

    /// Turns maintenance on (`Some`) or off for every replica.
    pub async fn set(&self, state: Option<MaintenanceState>) -> ApiResult<Option<MaintenanceState>> {
        self.flag.write(state.as_ref()).await.map_err(|error| ApiError::RedisUnavailable(error.to_string()))?;
        match &state {
            Some(state) => {
                tracing::warn!(reason = %state.reason, set_by = %state.set_by, "maintenance mode on: allocations are refused")
            }
            None => tracing::info!("maintenance mode off"),
        }
        self.current.send_replace(state.clone());
        Ok(state)
    }

    /// Reads the shared flag now (and keeps the last value when it cannot).
    pub async fn refresh(&self) {
        match self.flag.read().await {
            Ok(state) => {
                self.current.send_if_modified(|current| {
                    let changed = *current != state;
                    if changed {
                        tracing::info!(on = state.is_some(), "maintenance mode changed on another replica");
                        *current = state.clone();
                    }
                    changed
                });
            }
            Err(error) => tracing::debug!(%error, "could not read the maintenance flag; keeping the last value"),
        }
    }

    /// Keeps this replica's view fresh until `shutdown`.
    pub async fn run_watcher(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => self.refresh().await,
            }
        }
    }
}
