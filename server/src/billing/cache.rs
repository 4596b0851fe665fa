//! Cached subscription statuses: in Redis when configured (shared by every
//! replica, so one webhook updates all of them), in process otherwise.

use std::{collections::HashMap, sync::Mutex};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::SubscriptionStatus;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedStatus {
    pub status: SubscriptionStatus,
    /// Unix milliseconds of the lookup (or webhook) that produced it.
    pub at_ms: i64,
}

impl CachedStatus {
    pub fn now(status: SubscriptionStatus) -> Self {
        CachedStatus { status, at_ms: chrono::Utc::now().timestamp_millis() }
    }

    pub fn age_ms(&self) -> i64 {
        chrono::Utc::now().timestamp_millis() - self.at_ms
    }
}

/// A cache failure is never an error for the caller: it is a miss.
#[async_trait]
pub trait StatusCache: Send + Sync + 'static {
    async fn get(&self, customer_id: &str) -> Option<CachedStatus>;
    async fn put(&self, customer_id: &str, status: CachedStatus);
}

#[derive(Default)]
pub struct InProcessCache {
    entries: Mutex<HashMap<String, CachedStatus>>,
}

/// Entries kept before the oldest are dropped.
const IN_PROCESS_LIMIT: usize = 100_000;

#[async_trait]
impl StatusCache for InProcessCache {
    async fn get(&self, customer_id: &str) -> Option<CachedStatus> {
        self.entries.lock().ok()?.get(customer_id).copied()
    }

    async fn put(&self, customer_id: &str, status: CachedStatus) {
        if let Ok(mut entries) = self.entries.lock() {
            if entries.len() >= IN_PROCESS_LIMIT
                && !entries.contains_key(customer_id)
                && let Some(oldest) = entries.iter().min_by_key(|(_, entry)| entry.at_ms).map(|(key, _)| key.clone())
            {
                entries.remove(&oldest);
            }
            entries.insert(customer_id.to_owned(), status);
        }
    }
}

pub struct RedisCache {
    pool: deadpool_redis::Pool,
    /// Entries expire in Redis once they are too stale to use anyway.
    expire_secs: u64,
}

impl RedisCache {
    pub fn new(url: &str, expire_secs: u64) -> anyhow::Result<Self> {
        let pool = deadpool_redis::Config::from_url(url).create_pool(Some(deadpool_redis::Runtime::Tokio1))?;
        Ok(RedisCache { pool, expire_secs: expire_secs.max(1) })
    }

    fn key(customer_id: &str) -> String {
        format!("switchboard:subscription:{customer_id}")
    }
}

#[async_trait]
impl StatusCache for RedisCache {
    async fn get(&self, customer_id: &str) -> Option<CachedStatus> {
        use deadpool_redis::redis::AsyncCommands;
        let mut connection = match self.pool.get().await {
            Ok(connection) => connection,
            Err(error) => {
                tracing::warn!(%error, "redis unavailable; subscription cache miss");
                return None;
            }
        };
        let raw: Option<String> = connection.get(Self::key(customer_id)).await.ok()?;
        serde_json::from_str(&raw?).ok()
    }

    async fn put(&self, customer_id: &str, status: CachedStatus) {
        use deadpool_redis::redis::AsyncCommands;
        let Ok(json) = serde_json::to_string(&status) else { return };
        match self.pool.get().await {
            Ok(mut connection) => {
                let result: Result<(), _> = connection.set_ex(Self::key(customer_id), json, self.expire_secs).await;
                if let Err(error) = result {
                    tracing::warn!(%error, "could not cache a subscription status in redis");
                }
            }
            Err(error) => tracing::warn!(%error, "redis unavailable; subscription status not cached"),
        }
    }
}
