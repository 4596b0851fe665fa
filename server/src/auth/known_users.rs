//! What this process remembers about users between calls, so that the hot
//! path (every Allocate) reads nothing for them: that the user row exists, and
//! which billing customer the user has.
//!
//! A customer id, once set for a user, never changes (`set_stripe_customer`
//! only fills an empty one), so a known customer is kept. "No customer yet" is
//! kept for `NO_CUSTOMER_TTL` only: another replica may create one meanwhile,
//! and a user who has just created one is about to spend far longer than that
//! in the provider's checkout page.

use std::{
    collections::HashMap,
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

/// Entries above this are forgotten all at once (they are looked up again).
const LIMIT: usize = 100_000;

/// How long "this user has no customer" is believed without a new read.
const NO_CUSTOMER_TTL: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Known {
    customer: Option<String>,
    /// When the store last said the user had no customer.
    no_customer_at: Option<Instant>,
}

/// The answer for a user's customer, if this process knows it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum CachedCustomer {
    Known(Option<String>),
    Unknown,
}

#[derive(Default)]
pub(crate) struct KnownUsers {
    users: Mutex<HashMap<String, Known>>,
}

impl KnownUsers {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Known>> {
        self.users.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn entry<'a>(users: &'a mut HashMap<String, Known>, user_id: &str) -> &'a mut Known {
        if users.len() >= LIMIT && !users.contains_key(user_id) {
            users.clear();
        }
        users.entry(user_id.to_owned()).or_default()
    }

    /// Whether this process registered the user already.
    pub(crate) fn is_registered(&self, user_id: &str) -> bool {
        self.lock().contains_key(user_id)
    }

    pub(crate) fn registered(&self, user_id: &str) {
        Self::entry(&mut self.lock(), user_id);
    }

    pub(crate) fn customer(&self, user_id: &str) -> CachedCustomer {
        self.customer_at(user_id, Instant::now())
    }

    fn customer_at(&self, user_id: &str, now: Instant) -> CachedCustomer {
        let users = self.lock();
        match users.get(user_id) {
            Some(Known { customer: Some(customer), .. }) => CachedCustomer::Known(Some(customer.clone())),
            Some(Known { no_customer_at: Some(at), .. }) if now.saturating_duration_since(*at) < NO_CUSTOMER_TTL => {
                CachedCustomer::Known(None)
            }
            _ => CachedCustomer::Unknown,
        }
    }

    /// What the store said (or what this process just stored).
    pub(crate) fn set_customer(&self, user_id: &str, customer: Option<String>) {
        self.set_customer_at(user_id, customer, Instant::now());
    }

    fn set_customer_at(&self, user_id: &str, customer: Option<String>, now: Instant) {
        let mut users = self.lock();
        let known = Self::entry(&mut users, user_id);
        known.no_customer_at = if customer.is_none() { Some(now) } else { None };
        known.customer = customer;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_customer_is_kept_and_no_customer_expires() {
        let users = KnownUsers::default();
        let start = Instant::now();
        assert_eq!(users.customer_at("u1", start), CachedCustomer::Unknown);
        assert!(!users.is_registered("u1"));

        users.set_customer_at("u1", None, start);
        assert!(users.is_registered("u1"), "a looked-up user exists");
        assert_eq!(users.customer_at("u1", start + Duration::from_secs(9)), CachedCustomer::Known(None));
        assert_eq!(users.customer_at("u1", start + NO_CUSTOMER_TTL), CachedCustomer::Unknown, "read again");

        users.set_customer_at("u1", Some("cus_1".into()), start);
        let much_later = start + Duration::from_secs(86_400);
        assert_eq!(users.customer_at("u1", much_later), CachedCustomer::Known(Some("cus_1".into())));
    }

    #[test]
    fn registration_alone_knows_no_customer() {
        let users = KnownUsers::default();
        users.registered("u2");
        assert!(users.is_registered("u2"));
        assert_eq!(users.customer("u2"), CachedCustomer::Unknown);
    }
}
