//! Per-mandelbox tokens: issued at spawn, handed to the host only, stored as a
//! SHA-256 hash, presented by the protocol server to ReportDisconnect.

use rand::RngCore;
use sha2::{Digest, Sha256};

/// A fresh random token (256 bits, hex).
pub fn generate() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// What the database keeps instead of the token.
pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Constant-time comparison of a presented token with a stored hash.
pub fn matches(token: &str, stored_hash: &str) -> bool {
    hashes_match(&hash(token), stored_hash)
}

/// Constant-time comparison of two hashes (of a presented and an issued token).
pub fn hashes_match(presented_hash: &str, stored_hash: &str) -> bool {
    let (a, b) = (presented_hash.as_bytes(), stored_hash.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_issued_token_matches_its_hash() {
        let token = generate();
        assert_eq!(token.len(), 64);
        let stored = hash(&token);
        assert!(matches(&token, &stored));
        assert!(!matches(&generate(), &stored));
        assert!(!matches("", &stored));
        assert_ne!(stored, token, "the hash is not the token");
    }
}
