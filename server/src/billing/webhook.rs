//! The Stripe webhook endpoint (`POST /stripe/webhook`, plain HTTP on the
//! gRPC port). Every event must carry a valid `Stripe-Signature` made with the
//! endpoint secret, within the time tolerance; an event id seen before is a
//! replay and is refused. `customer.subscription.*` events update the cached
//! status, so a cancellation takes effect without waiting for the cache TTL.

use std::{
    collections::{HashSet, VecDeque},
    sync::Mutex,
};

use axum::{body::Bytes, extract::State, http::HeaderMap, response::IntoResponse};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

use super::{SubscriptionStatus, Subscriptions};
use crate::config::Secret;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WebhookError {
    #[error("missing Stripe-Signature header")]
    Unsigned,
    #[error("malformed Stripe-Signature header")]
    Malformed,
    #[error("timestamp outside the tolerance")]
    Stale,
    #[error("no signature matches")]
    BadSignature,
    #[error("event already received")]
    Replayed,
    #[error("the body is not a Stripe event")]
    NotAnEvent,
}

/// Event ids remembered to refuse replays.
const REMEMBERED_EVENTS: usize = 10_000;

pub struct WebhookVerifier {
    secret: Secret,
    tolerance_secs: i64,
    seen: Mutex<(HashSet<String>, VecDeque<String>)>,
}

impl WebhookVerifier {
    pub fn new(secret: Secret, tolerance_secs: u64) -> Self {
        WebhookVerifier {
            secret,
            tolerance_secs: i64::try_from(tolerance_secs).unwrap_or(300),
            seen: Mutex::new((HashSet::new(), VecDeque::new())),
        }
    }

    /// Checks `t=…,v1=…` against HMAC-SHA256(secret, "{t}.{payload}").
    pub fn verify(&self, header: Option<&str>, payload: &[u8], now_secs: i64) -> Result<(), WebhookError> {
        let header = header.ok_or(WebhookError::Unsigned)?;
        let mut timestamp = None;
        let mut signatures = Vec::new();
        for part in header.split(',') {
            match part.trim().split_once('=') {
                Some(("t", value)) => timestamp = value.parse::<i64>().ok(),
                Some(("v1", value)) => signatures.push(hex::decode(value).map_err(|_| WebhookError::Malformed)?),
                _ => {}
            }
        }
        let timestamp = timestamp.ok_or(WebhookError::Malformed)?;
        if signatures.is_empty() {
            return Err(WebhookError::Malformed);
        }
        if (now_secs - timestamp).abs() > self.tolerance_secs {
            return Err(WebhookError::Stale);
        }
        let valid = signatures.iter().any(|signature| {
            let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(self.secret.expose().as_bytes()) else { return false };
            mac.update(timestamp.to_string().as_bytes());
            mac.update(b".");
            mac.update(payload);
            mac.verify_slice(signature).is_ok()
        });
        if valid { Ok(()) } else { Err(WebhookError::BadSignature) }
    }

    /// Records an event id; false if it was seen before.
    fn first_time(&self, event_id: &str) -> bool {
        let Ok(mut seen) = self.seen.lock() else { return true };
        let (set, order) = &mut *seen;
        if !set.insert(event_id.to_owned()) {
            return false;
        }
        order.push_back(event_id.to_owned());
        if order.len() > REMEMBERED_EVENTS
            && let Some(oldest) = order.pop_front()
        {
            set.remove(&oldest);
        }
        true
    }
}

#[derive(Deserialize)]
struct Event {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    data: EventData,
}

#[derive(Deserialize)]
struct EventData {
    object: serde_json::Value,
}

#[derive(Clone)]
pub struct WebhookState {
    pub verifier: std::sync::Arc<WebhookVerifier>,
    pub subscriptions: Subscriptions,
}

pub async fn handle(State(state): State<WebhookState>, headers: HeaderMap, body: Bytes) -> impl IntoResponse {
    match receive(&state, &headers, &body).await {
        Ok(()) => (http::StatusCode::OK, "{\"received\":true}".to_owned()),
        Err(error) => {
            tracing::warn!(%error, "stripe webhook refused");
            (http::StatusCode::BAD_REQUEST, format!("{{\"error\":\"{error}\"}}"))
        }
    }
}

async fn receive(state: &WebhookState, headers: &HeaderMap, body: &[u8]) -> Result<(), WebhookError> {
    let signature = headers.get("stripe-signature").and_then(|value| value.to_str().ok());
    state.verifier.verify(signature, body, chrono::Utc::now().timestamp())?;
    let event: Event = serde_json::from_slice(body).map_err(|_| WebhookError::NotAnEvent)?;
    if !state.verifier.first_time(&event.id) {
        return Err(WebhookError::Replayed);
    }
    if let Some(change) = event.kind.strip_prefix("customer.subscription.") {
        let object = &event.data.object;
        let customer = object.get("customer").and_then(serde_json::Value::as_str);
        let status = match change {
            "deleted" => Some(SubscriptionStatus::Canceled),
            _ => object.get("status").and_then(serde_json::Value::as_str).map(SubscriptionStatus::from_stripe),
        };
        if let (Some(customer), Some(status)) = (customer, status) {
            tracing::info!(event_id = %event.id, kind = %event.kind, customer_id = %customer, status = status.as_str(), "subscription changed");
            state.subscriptions.record(customer, status).await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &str, timestamp: i64, payload: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap_or_else(|_| unreachable!());
        mac.update(format!("{timestamp}.").as_bytes());
        mac.update(payload);
        format!("t={timestamp},v1={}", hex::encode(mac.finalize().into_bytes()))
    }

    #[test]
    fn signatures_are_checked() {
        let verifier = WebhookVerifier::new(Secret::new("whsec_test"), 300);
        let payload = br#"{"id":"evt_1"}"#;
        let now = 1_800_000_000;
        let good = sign("whsec_test", now, payload);
        assert_eq!(verifier.verify(Some(&good), payload, now), Ok(()));
        assert_eq!(verifier.verify(None, payload, now), Err(WebhookError::Unsigned));
        assert_eq!(verifier.verify(Some("garbage"), payload, now), Err(WebhookError::Malformed));
        assert_eq!(verifier.verify(Some(&sign("other", now, payload)), payload, now), Err(WebhookError::BadSignature));
        assert_eq!(verifier.verify(Some(&good), br#"{"id":"evt_2"}"#, now), Err(WebhookError::BadSignature));
        assert_eq!(verifier.verify(Some(&good), payload, now + 301), Err(WebhookError::Stale));
        // Several signatures (secret rotation): one good one is enough.
        let rotated = format!("{},v1={}", good, "00".repeat(32));
        assert_eq!(verifier.verify(Some(&rotated), payload, now), Ok(()));
    }

    #[test]
    fn event_ids_are_single_use() {
        let verifier = WebhookVerifier::new(Secret::new("s"), 300);
        assert!(verifier.first_time("evt_1"));
        assert!(!verifier.first_time("evt_1"));
        assert!(verifier.first_time("evt_2"));
    }
}
