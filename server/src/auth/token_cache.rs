//! Tokens already verified, so a client's repeated calls with one bearer token
//! pay for the signature check once. Keyed by the token's SHA-256 (the token
//! itself is not kept); an entry lasts until the token expires or for
//! `MAX_AGE`, whichever is sooner, and only while the key that signed it is
//! still in the key set. The verifier clears it whenever the key set changes.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};

use super::jwt::UserClaims;

/// How long a verified token is trusted without checking its signature again.
const MAX_AGE: Duration = Duration::from_secs(60);
/// Entries kept at most; the cache starts over when full.
const MAX_ENTRIES: usize = 10_000;

pub(super) type TokenDigest = [u8; 32];

struct Entry {
    claims: UserClaims,
    kid: String,
    /// Unix time after which the token is expired (its `exp` plus leeway).
    expires_at: i64,
    cached_at: Instant,
}

#[derive(Default)]
pub(super) struct VerifiedTokens {
    entries: Mutex<HashMap<TokenDigest, Entry>>,
}

pub(super) fn digest(token: &str) -> TokenDigest {
    Sha256::digest(token.as_bytes()).into()
}

impl VerifiedTokens {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TokenDigest, Entry>> {
        // Every operation is a single insert, lookup or clear: poison is harmless.
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The claims of a token verified before, if still fresh, not expired at
    /// `now_unix`, and signed by a key `key_known` still knows.
    pub(super) fn get(
        &self,
        digest: &TokenDigest,
        now_unix: i64,
        key_known: impl FnOnce(&str) -> bool,
    ) -> Option<UserClaims> {
        let mut entries = self.lock();
        let entry = entries.get(digest)?;
        if now_unix >= entry.expires_at || entry.cached_at.elapsed() >= MAX_AGE || !key_known(&entry.kid) {
            entries.remove(digest);
            return None;
        }
        Some(entry.claims.clone())
    }

    pub(super) fn put(&self, digest: TokenDigest, claims: UserClaims, kid: String, expires_at: i64) {
        let mut entries = self.lock();
        if entries.len() >= MAX_ENTRIES {
            entries.clear();
        }
        entries.insert(digest, Entry { claims, kid, expires_at, cached_at: Instant::now() });
    }

    pub(super) fn clear(&self) {
        self.lock().clear();
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(subject: &str) -> UserClaims {
        UserClaims { subject: subject.into(), email: None, scopes: Vec::new(), stripe_customer_id: None }
    }

    #[test]
    fn a_cached_token_is_returned_until_it_expires() {
        let cache = VerifiedTokens::default();
        let key = digest("token-a");
        cache.put(key, claims("alice"), "kid-1".into(), 1_000);
        assert_eq!(cache.get(&key, 999, |_| true), Some(claims("alice")));
        assert_eq!(cache.get(&key, 1_000, |_| true), None, "expired");
        assert_eq!(cache.get(&key, 10, |_| true), None, "an expired entry is dropped");
    }

    #[test]
    fn a_removed_key_invalidates_its_tokens() {
        let cache = VerifiedTokens::default();
        let key = digest("token-b");
        cache.put(key, claims("bob"), "kid-1".into(), i64::MAX);
        assert_eq!(cache.get(&key, 0, |kid| kid == "kid-2"), None);
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn other_tokens_miss_and_the_cache_is_bounded() {
        let cache = VerifiedTokens::default();
        cache.put(digest("token-c"), claims("carol"), "kid-1".into(), i64::MAX);
        assert_eq!(cache.get(&digest("token-d"), 0, |_| true), None);
        for n in 0..MAX_ENTRIES + 5 {
            cache.put(digest(&format!("t{n}")), claims("x"), "kid-1".into(), i64::MAX);
        }
        assert!(cache.len() <= MAX_ENTRIES);
        cache.clear();
        assert_eq!(cache.len(), 0);
    }
}
