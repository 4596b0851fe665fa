//! Bearer-token verification against the keys of a JWKS.
//!
//! The dev issuer and a production OIDC tenant go through this same code: only
//! where the key set comes from differs.

use std::{collections::HashMap, sync::RwLock};

use jsonwebtoken::{
    Algorithm, DecodingKey, Validation,
    jwk::{Jwk, JwkSet},
};
use serde::Deserialize;

/// Algorithms a token may be signed with. Everything else (`none`, HS256 with
/// the public key as secret, ...) is refused before any key is touched.
const ALLOWED_ALGORITHMS: [Algorithm; 2] = [Algorithm::RS256, Algorithm::ES256];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserClaims {
    pub subject: String,
    pub email: Option<String>,
    pub scopes: Vec<String>,
}

impl UserClaims {
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("token algorithm {0} is not accepted")]
    Algorithm(String),
    #[error("token has no key id (kid)")]
    MissingKeyId,
    #[error("token signed by an unknown key")]
    UnknownKey,
    #[error("token is expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token issuer is not accepted")]
    Issuer,
    #[error("token audience is not accepted")]
    Audience,
    #[error("token signature is invalid")]
    Signature,
    #[error("token is invalid: {0}")]
    Invalid(String),
}

#[derive(Deserialize)]
struct RawClaims {
    sub: String,
    #[serde(default)]
    email: Option<String>,
    /// Space-separated, as OAuth issues it.
    #[serde(default)]
    scope: Option<String>,
    /// An array, as Auth0's RBAC issues it.
    #[serde(default)]
    permissions: Option<Vec<String>>,
}

struct VerificationKey {
    key: DecodingKey,
    algorithm: Algorithm,
}

pub struct TokenVerifier {
    issuer: String,
    audience: String,
    leeway_secs: u64,
    keys: RwLock<HashMap<String, VerificationKey>>,
}

impl TokenVerifier {
    pub fn new(issuer: impl Into<String>, audience: impl Into<String>, leeway_secs: u64) -> Self {
        TokenVerifier {
            issuer: issuer.into(),
            audience: audience.into(),
            leeway_secs,
            keys: RwLock::new(HashMap::new()),
        }
    }

    /// Replaces the key set. Keys without a `kid`, or of a kind we do not accept,
    /// are skipped with a warning. Returns how many keys are usable.
    pub fn set_jwks(&self, jwks: &JwkSet) -> usize {
        let mut keys = HashMap::new();
        for jwk in &jwks.keys {
            match verification_key(jwk) {
                Some((kid, key)) => {
                    keys.insert(kid, key);
                }
                None => tracing::warn!(kid = ?jwk.common.key_id, "skipping unusable jwk"),
            }
        }
        let usable = keys.len();
        match self.keys.write() {
            Ok(mut guard) => *guard = keys,
            Err(poisoned) => *poisoned.into_inner() = keys,
        }
        usable
    }

    pub fn verify(&self, token: &str) -> Result<UserClaims, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if !ALLOWED_ALGORITHMS.contains(&header.alg) {
            return Err(TokenError::Algorithm(format!("{:?}", header.alg)));
        }
        let kid = header.kid.ok_or(TokenError::MissingKeyId)?;
        let keys = match self.keys.read() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let key = keys.get(&kid).ok_or(TokenError::UnknownKey)?;
        // The key decides the algorithm: a token may not pick another one.
        if key.algorithm != header.alg {
            return Err(TokenError::Algorithm(format!("{:?}", header.alg)));
        }
        let mut validation = Validation::new(key.algorithm);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = self.leeway_secs;
        let data = jsonwebtoken::decode::<RawClaims>(token, &key.key, &validation).map_err(classify)?;
        let claims = data.claims;
        let mut scopes: Vec<String> =
            claims.scope.as_deref().unwrap_or_default().split_whitespace().map(str::to_owned).collect();
        for permission in claims.permissions.unwrap_or_default() {
            if !scopes.contains(&permission) {
                scopes.push(permission);
            }
        }
        if claims.sub.is_empty() {
            return Err(TokenError::Invalid("empty subject".into()));
        }
        Ok(UserClaims { subject: claims.sub, email: claims.email, scopes })
    }
}

fn verification_key(jwk: &Jwk) -> Option<(String, VerificationKey)> {
    use jsonwebtoken::jwk::AlgorithmParameters;
    let kid = jwk.common.key_id.clone()?;
    let algorithm = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(params) if params.curve == jsonwebtoken::jwk::EllipticCurve::P256 => {
            Algorithm::ES256
        }
        _ => return None,
    };
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some((kid, VerificationKey { key, algorithm }))
}

fn classify(error: jsonwebtoken::errors::Error) -> TokenError {
    use jsonwebtoken::errors::ErrorKind;
    match error.kind() {
        ErrorKind::ExpiredSignature => TokenError::Expired,
        ErrorKind::ImmatureSignature => TokenError::NotYetValid,
        ErrorKind::InvalidIssuer => TokenError::Issuer,
        ErrorKind::InvalidAudience => TokenError::Audience,
        ErrorKind::InvalidSignature => TokenError::Signature,
        ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Json(_) | ErrorKind::Utf8(_) => {
            TokenError::Malformed
        }
        ErrorKind::MissingRequiredClaim(claim) => TokenError::Invalid(format!("missing claim {claim}")),
        other => TokenError::Invalid(format!("{other:?}")),
    }
}
