//! Region settings as Allocate needs them, cached for a moment so the hot path
//! does not read the regions table on every call.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::{
    error::{ApiError, ApiResult},
    model::Region,
    store::DynStore,
};

type CachedRegions = (Instant, Arc<Vec<Region>>);

#[derive(Clone)]
pub struct RegionCache {
    store: DynStore,
    ttl: Duration,
    cached: Arc<Mutex<Option<CachedRegions>>>,
}

impl RegionCache {
    pub fn new(store: DynStore, ttl: Duration) -> Self {
        RegionCache { store, ttl, cached: Arc::new(Mutex::new(None)) }
    }

    pub async fn all(&self) -> ApiResult<Arc<Vec<Region>>> {
        if let Ok(cached) = self.cached.lock()
            && let Some((at, regions)) = cached.as_ref()
            && at.elapsed() < self.ttl
        {
            return Ok(regions.clone());
        }
        let regions = Arc::new(self.store.list_regions().await?);
        if let Ok(mut cached) = self.cached.lock() {
            *cached = Some((Instant::now(), regions.clone()));
        }
        Ok(regions)
    }

    /// Forgets the cache (after an admin changed a region).
    pub fn invalidate(&self) {
        if let Ok(mut cached) = self.cached.lock() {
            *cached = None;
        }
    }

    /// The requested regions that are enabled, in the requested order.
    /// UNKNOWN_REGION if one does not exist; REGION_NOT_ENABLED if none is enabled.
    pub async fn enabled_in_order(&self, requested: &[String]) -> ApiResult<Vec<String>> {
        let regions = self.all().await?;
        let mut enabled = Vec::with_capacity(requested.len());
        for name in requested {
            let region = regions
                .iter()
                .find(|region| &region.name == name)
                .ok_or_else(|| ApiError::UnknownRegion(name.clone()))?;
            if region.enabled {
                enabled.push(name.clone());
            }
        }
        if enabled.is_empty() {
            return Err(ApiError::RegionNotEnabled(requested.to_vec()));
        }
        Ok(enabled)
    }

    pub async fn exists(&self, name: &str) -> ApiResult<bool> {
        Ok(self.all().await?.iter().any(|region| region.name == name))
    }
}
