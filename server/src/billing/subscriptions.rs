//! The subscription check: cached status while fresh; otherwise ask the
//! provider within a deadline; if it is slow or down, a cached status stays
//! good up to `max_staleness`; with none, UNAVAILABLE.

use std::{sync::Arc, time::Duration};

use super::{
    BillingError, BillingProvider, SubscriptionStatus,
    cache::{CachedStatus, StatusCache},
};

#[derive(Clone)]
pub struct Subscriptions {
    provider: Arc<dyn BillingProvider>,
    cache: Arc<dyn StatusCache>,
    ttl: Duration,
    max_staleness: Duration,
    timeout: Duration,
}

impl Subscriptions {
    pub fn new(
        provider: Arc<dyn BillingProvider>,
        cache: Arc<dyn StatusCache>,
        ttl: Duration,
        max_staleness: Duration,
        timeout: Duration,
    ) -> Self {
        Subscriptions { provider, cache, ttl, max_staleness, timeout }
    }

    pub fn provider(&self) -> &Arc<dyn BillingProvider> {
        &self.provider
    }

    /// The status of a customer's subscription; `None` without a customer.
    pub async fn status(&self, customer_id: Option<&str>) -> Result<SubscriptionStatus, BillingError> {
        let Some(customer_id) = customer_id else {
            return Ok(self.provider.status_without_customer());
        };
        let cached = self.cache.get(customer_id).await;
        if let Some(cached) = cached
            && cached.age_ms() < millis(self.ttl)
        {
            return Ok(cached.status);
        }
        let lookup = tokio::time::timeout(self.timeout, self.provider.subscription_status(customer_id)).await;
        let failure = match lookup {
            Ok(Ok(status)) => {
                self.cache.put(customer_id, CachedStatus::now(status)).await;
                return Ok(status);
            }
            Ok(Err(error)) => error.to_string(),
            Err(_) => format!("no answer within {} ms", self.timeout.as_millis()),
        };
        match cached {
            Some(cached) if cached.age_ms() < millis(self.max_staleness) => {
                tracing::warn!(%customer_id, error = %failure, age_ms = cached.age_ms(), "billing provider failed; using the cached subscription status");
                Ok(cached.status)
            }
            _ => Err(BillingError::Unavailable(failure)),
        }
    }

    /// A webhook told us the status: it replaces what is cached.
    pub async fn record(&self, customer_id: &str, status: SubscriptionStatus) {
        self.cache.put(customer_id, CachedStatus::now(status)).await;
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}
