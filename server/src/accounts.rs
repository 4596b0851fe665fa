//! The signed-in user's account and where to pay.

use std::sync::Arc;

use switchboard_proto::v1::{self as pb, billing_url::Kind};

use crate::{
    api::convert,
    auth::{AccessControl, Principal},
    billing::Subscriptions,
    core::SharedCore,
    error::{ApiError, ApiResult},
    store::SessionFilter,
};

const MAX_URL_LEN: usize = 2048;

#[derive(Clone)]
pub struct Accounts {
    core: SharedCore,
    access: Arc<AccessControl>,
    subscriptions: Subscriptions,
}

impl Accounts {
    pub fn new(core: SharedCore, access: Arc<AccessControl>, subscriptions: Subscriptions) -> Self {
        Accounts { core, access, subscriptions }
    }

    pub async fn get_account(&self, principal: &Principal) -> ApiResult<pb::Account> {
        let user = self.core.store.get_user(principal.user_id()).await?;
        let customer = self.access.customer_of(principal).await?;
        let (status, subscribed) = match self.subscriptions.status(customer.as_deref()).await {
            Ok(status) => (status.as_str(), status.allows_streaming()),
            Err(error) => {
                tracing::warn!(user_id = %principal.user_id(), %error, "subscription status unknown");
                ("unknown", false)
            }
        };
        let filter = SessionFilter { user_id: Some(principal.user_id().to_owned()), include_ended: false, limit: 100 };
        let mut active_sessions = Vec::new();
        for session in self.core.store.list_sessions(&filter).await? {
            active_sessions.push(convert::session(&self.core.session_change(&session).await));
        }
        Ok(pb::Account {
            user_id: principal.user_id().to_owned(),
            email: principal.claims.email.clone().or(user.and_then(|user| user.email)).unwrap_or_default(),
            subscription_status: status.to_owned(),
            can_stream: subscribed || principal.is_admin(),
            admin: principal.is_admin(),
            active_sessions,
            billing_provider: self.subscriptions.provider().name().to_owned(),
        })
    }

    pub async fn billing_url(&self, principal: &Principal, return_url: &str) -> ApiResult<pb::BillingUrl> {
        let valid = return_url.len() <= MAX_URL_LEN
            && (return_url.starts_with("https://") || return_url.starts_with("http://"));
        if !valid {
            return Err(ApiError::InvalidRequest("return_url must be an http(s) URL".into()));
        }
        let customer = match self.access.customer_of(principal).await? {
            Some(customer) => customer,
            None => self.create_customer(principal).await?,
        };
        let provider = self.subscriptions.provider();
        let status = self.subscriptions.status(Some(&customer)).await?;
        if status.allows_streaming() {
            let url = provider.portal_url(&customer, return_url).await?;
            Ok(pb::BillingUrl { url, kind: Kind::Portal as i32 })
        } else {
            let url = provider.checkout_url(&customer, return_url).await?;
            Ok(pb::BillingUrl { url, kind: Kind::Checkout as i32 })
        }
    }

    /// Creates a Stripe customer and remembers it. Two first calls racing may
    /// both create one; the first remembered wins and the other is unused.
    async fn create_customer(&self, principal: &Principal) -> ApiResult<String> {
        let provider = self.subscriptions.provider();
        let created = provider.create_customer(principal.user_id(), principal.claims.email.as_deref()).await?;
        let remembered = self.core.store.set_stripe_customer(principal.user_id(), &created).await?;
        let customer = remembered.unwrap_or(created.clone());
        self.access.remember_customer(principal.user_id(), &customer);
        if customer != created {
            tracing::warn!(user_id = %principal.user_id(), unused_customer = %created, "a concurrent call created the customer first");
        } else {
            tracing::info!(user_id = %principal.user_id(), customer_id = %customer, "stripe customer created");
        }
        Ok(customer)
    }
}
