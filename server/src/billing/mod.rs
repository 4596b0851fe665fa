//! Who may stream: a Stripe subscription in `active` or `trialing`. Status
//! lookups go through a `BillingProvider` (Stripe, or the dev provider that
//! treats every dev user as a subscriber), cached (`cache.rs`: Redis when
//! configured, in process otherwise) and kept fresh by Stripe webhooks
//! (`webhook.rs`).

pub mod cache;
pub mod stripe;
pub mod subscriptions;
pub mod webhook;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use subscriptions::Subscriptions;

/// A subscription's status, as Stripe names it; `None` when the customer has no
/// subscription at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscriptionStatus {
    Active,
    Trialing,
    PastDue,
    Unpaid,
    Paused,
    Incomplete,
    IncompleteExpired,
    Canceled,
    None,
}

impl SubscriptionStatus {
    pub fn from_stripe(status: &str) -> Self {
        match status {
            "active" => Self::Active,
            "trialing" => Self::Trialing,
            "past_due" => Self::PastDue,
            "unpaid" => Self::Unpaid,
            "paused" => Self::Paused,
            "incomplete" => Self::Incomplete,
            "incomplete_expired" => Self::IncompleteExpired,
            // "canceled", "ended" and anything Stripe adds later: no access.
            _ => Self::Canceled,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Trialing => "trialing",
            Self::PastDue => "past_due",
            Self::Unpaid => "unpaid",
            Self::Paused => "paused",
            Self::Incomplete => "incomplete",
            Self::IncompleteExpired => "incomplete_expired",
            Self::Canceled => "canceled",
            Self::None => "none",
        }
    }

    /// Only these two pass; every other status is SUBSCRIPTION_REQUIRED.
    pub fn allows_streaming(self) -> bool {
        matches!(self, Self::Active | Self::Trialing)
    }

    /// Of a customer's several subscriptions, the one that decides: any that
    /// allows streaming wins.
    fn rank(self) -> u8 {
        match self {
            Self::Active => 0,
            Self::Trialing => 1,
            Self::PastDue => 2,
            Self::Unpaid => 3,
            Self::Paused => 4,
            Self::Incomplete => 5,
            Self::IncompleteExpired => 6,
            Self::Canceled => 7,
            Self::None => 8,
        }
    }

    pub fn best(statuses: impl IntoIterator<Item = SubscriptionStatus>) -> SubscriptionStatus {
        statuses.into_iter().min_by_key(|status| status.rank()).unwrap_or(SubscriptionStatus::None)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    /// Stripe could not be reached, timed out, or failed on its side.
    #[error("billing provider unavailable: {0}")]
    Unavailable(String),
    /// Stripe refused the request (bad key, unknown price, ...).
    #[error("billing provider refused the request: {0}")]
    Refused(String),
    #[error("billing is not configured here: {0}")]
    NotConfigured(&'static str),
}

#[async_trait]
pub trait BillingProvider: Send + Sync + 'static {
    /// A name for logs and the dev banner.
    fn name(&self) -> &'static str;

    async fn subscription_status(&self, customer_id: &str) -> Result<SubscriptionStatus, BillingError>;

    /// The status of a user with no customer at all.
    fn status_without_customer(&self) -> SubscriptionStatus {
        SubscriptionStatus::None
    }

    /// Creates a customer for a user who has none.
    async fn create_customer(&self, user_id: &str, email: Option<&str>) -> Result<String, BillingError>;

    /// A billing-portal session URL (subscribers manage their subscription).
    async fn portal_url(&self, customer_id: &str, return_url: &str) -> Result<String, BillingError>;

    /// A Checkout session URL (everyone else subscribes, with the configured trial).
    async fn checkout_url(&self, customer_id: &str, return_url: &str) -> Result<String, BillingError>;
}

/// `switchboard dev`: no Stripe account; every dev user counts as a subscriber.
pub struct DevBilling;

#[async_trait]
impl BillingProvider for DevBilling {
    fn name(&self) -> &'static str {
        "dev (no Stripe: every user counts as a subscriber)"
    }

    async fn subscription_status(&self, _customer_id: &str) -> Result<SubscriptionStatus, BillingError> {
        Ok(SubscriptionStatus::Active)
    }

    fn status_without_customer(&self) -> SubscriptionStatus {
        SubscriptionStatus::Active
    }

    async fn create_customer(&self, user_id: &str, _email: Option<&str>) -> Result<String, BillingError> {
        Ok(format!("cus_dev_{user_id}"))
    }

    async fn portal_url(&self, _customer_id: &str, _return_url: &str) -> Result<String, BillingError> {
        Err(BillingError::NotConfigured("the dev billing provider has no billing portal"))
    }

    async fn checkout_url(&self, _customer_id: &str, _return_url: &str) -> Result<String, BillingError> {
        Err(BillingError::NotConfigured("the dev billing provider has no checkout"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_active_and_trialing_stream() {
        for (text, allowed) in [
            ("active", true),
            ("trialing", true),
            ("past_due", false),
            ("canceled", false),
            ("incomplete", false),
            ("incomplete_expired", false),
            ("unpaid", false),
            ("paused", false),
            ("something_new", false),
        ] {
            assert_eq!(SubscriptionStatus::from_stripe(text).allows_streaming(), allowed, "{text}");
        }
        assert!(!SubscriptionStatus::None.allows_streaming());
    }

    #[test]
    fn the_best_subscription_decides() {
        use SubscriptionStatus::*;
        assert_eq!(SubscriptionStatus::best([Canceled, Active, Incomplete]), Active);
        assert_eq!(SubscriptionStatus::best([Canceled, Trialing]), Trialing);
        assert_eq!(SubscriptionStatus::best([]), None);
    }
}
