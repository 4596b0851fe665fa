//! Stripe through async-stripe: its client (auth, API version, timeouts,
//! request strategy) and its request builders; responses are read leniently
//! (only the fields we need), so an API version bump or the emulator's older
//! object shapes do not break a status lookup.

use std::{collections::HashMap, time::Duration};

use async_trait::async_trait;
use miniserde::json::Value;
use serde::Serialize;
use stripe::{StripeError, StripeRequest};
use stripe_client_core::{RequestBuilder, StripeMethod};

use super::{BillingError, BillingProvider, SubscriptionStatus};
use crate::config::Secret;

pub struct StripeBilling {
    client: stripe::Client,
    price_id: String,
    trial_days: u32,
    timeout: Duration,
}

impl StripeBilling {
    /// `api_base` overrides Stripe's URL (tests point it at an emulator).
    pub fn new(
        secret_key: &Secret,
        api_base: &str,
        price_id: &str,
        trial_days: u32,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        if secret_key.is_empty() {
            anyhow::bail!(
                "billing.provider = \"stripe\" needs billing.stripe_secret_key (SWITCHBOARD__BILLING__STRIPE_SECRET_KEY)"
            );
        }
        let mut builder = stripe::ClientBuilder::new(secret_key.expose()).app_info("switchboard", None, None);
        if !api_base.is_empty() {
            builder = builder.url(api_base);
        }
        let client = builder.build().map_err(|error| anyhow::anyhow!("stripe client: {error}"))?;
        Ok(StripeBilling { client, price_id: price_id.to_owned(), trial_days, timeout })
    }

    async fn send(&self, request: RequestBuilder) -> Result<Value, BillingError> {
        request.customize::<Value>().timeout(self.timeout).send(&self.client).await.map_err(classify)
    }
}

fn classify(error: StripeError) -> BillingError {
    match error {
        StripeError::Stripe(errors, status) if (400..500).contains(&status) && status != 429 => {
            BillingError::Refused(errors.message.clone().unwrap_or_else(|| format!("status {status}")))
        }
        other => BillingError::Unavailable(other.to_string()),
    }
}

fn field<'a>(value: &'a Value, name: &str) -> Option<&'a Value> {
    match value {
        Value::Object(object) => object.get(name),
        _ => None,
    }
}

fn text<'a>(value: &'a Value, name: &str) -> Option<&'a str> {
    match field(value, name)? {
        Value::String(text) => Some(text),
        _ => None,
    }
}

#[derive(Serialize)]
struct PortalSession<'a> {
    customer: &'a str,
    return_url: &'a str,
}

#[derive(Serialize)]
struct CheckoutSession<'a> {
    customer: &'a str,
    mode: &'static str,
    success_url: &'a str,
    cancel_url: &'a str,
    line_items: [LineItem<'a>; 1],
    #[serde(skip_serializing_if = "Option::is_none")]
    subscription_data: Option<SubscriptionData>,
}

#[derive(Serialize)]
struct LineItem<'a> {
    price: &'a str,
    quantity: u32,
}

#[derive(Serialize)]
struct SubscriptionData {
    trial_period_days: u32,
}

#[async_trait]
impl BillingProvider for StripeBilling {
    fn name(&self) -> &'static str {
        "stripe"
    }

    async fn subscription_status(&self, customer_id: &str) -> Result<SubscriptionStatus, BillingError> {
        let request = stripe_billing::subscription::ListSubscription::new()
            .customer(customer_id)
            .status(stripe_billing::subscription::ListSubscriptionStatus::All)
            .limit(20)
            .build();
        let list = self.send(request).await?;
        let statuses: Vec<SubscriptionStatus> = match field(&list, "data") {
            Some(Value::Array(items)) => {
                items.iter().filter_map(|item| text(item, "status")).map(SubscriptionStatus::from_stripe).collect()
            }
            _ => return Err(BillingError::Unavailable("stripe answered without a subscription list".into())),
        };
        Ok(SubscriptionStatus::best(statuses))
    }

    async fn create_customer(&self, user_id: &str, email: Option<&str>) -> Result<String, BillingError> {
        let mut request = stripe_core::customer::CreateCustomer::new()
            .metadata(HashMap::from([("switchboard_user_id".to_owned(), user_id.to_owned())]));
        if let Some(email) = email {
            request = request.email(email);
        }
        let customer = self.send(request.build()).await?;
        text(&customer, "id")
            .map(str::to_owned)
            .ok_or_else(|| BillingError::Unavailable("stripe created a customer without an id".into()))
    }

    async fn portal_url(&self, customer_id: &str, return_url: &str) -> Result<String, BillingError> {
        let request = RequestBuilder::new(StripeMethod::Post, "/billing_portal/sessions")
            .form(&PortalSession { customer: customer_id, return_url });
        let session = self.send(request).await?;
        text(&session, "url")
            .map(str::to_owned)
            .ok_or_else(|| BillingError::Unavailable("stripe returned a portal session without a url".into()))
    }

    async fn checkout_url(&self, customer_id: &str, return_url: &str) -> Result<String, BillingError> {
        if self.price_id.is_empty() {
            return Err(BillingError::NotConfigured("billing.price_id is not set"));
        }
        let form = CheckoutSession {
            customer: customer_id,
            mode: "subscription",
            success_url: return_url,
            cancel_url: return_url,
            line_items: [LineItem { price: &self.price_id, quantity: 1 }],
            subscription_data: (self.trial_days > 0).then_some(SubscriptionData { trial_period_days: self.trial_days }),
        };
        let request = RequestBuilder::new(StripeMethod::Post, "/checkout/sessions").form(&form);
        let session = self.send(request).await?;
        text(&session, "url")
            .map(str::to_owned)
            .ok_or_else(|| BillingError::Unavailable("stripe returned a checkout session without a url".into()))
    }
}
