//! Bearer-token verification against the keys of a JWKS.
//!
//! Keys come from the tenant's JWKS (a configured URL, or the `jwks_uri` of its
//! OpenID discovery document) and are cached in memory: refreshed every
//! `jwks_ttl_secs` by `run_refresher`, and once more when a token names a key
//! id we do not know — at most once per `jwks_min_refresh_interval_ms`, so a
//! flood of forged key ids cannot make us hammer the tenant. A failed fetch
//! keeps the cached keys: the tenant being down breaks no token we can check.
//! `switchboard dev` installs its issuer's keys directly; verification is the
//! same code either way.

use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use jsonwebtoken::{
    Algorithm, DecodingKey, Validation,
    jwk::{Jwk, JwkSet},
};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::token_cache::{self, VerifiedTokens};
use crate::config::AuthConfig;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserClaims {
    pub subject: String,
    pub email: Option<String>,
    pub scopes: Vec<String>,
    /// From the configured custom claim (`auth.stripe_customer_claim`).
    pub stripe_customer_id: Option<String>,
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

struct VerificationKey {
    key: DecodingKey,
    algorithm: Algorithm,
}

/// Where keys come from when they are not installed directly.
struct JwksSource {
    client: reqwest::Client,
    /// The JWKS URL, or None to discover it from the issuer.
    url: Option<String>,
    issuer: String,
    discovered: tokio::sync::Mutex<Option<String>>,
}

pub struct TokenVerifier {
    issuer: String,
    audience: String,
    leeway_secs: u64,
    algorithms: Vec<Algorithm>,
    customer_claim: String,
    keys: RwLock<HashMap<String, VerificationKey>>,
    source: Option<JwksSource>,
    ttl: Duration,
    min_refresh_interval: Duration,
    /// Serialises fetches and remembers when the last one was tried.
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
    fetches: AtomicU64,
    /// Tokens whose signature was checked already (see `token_cache`).
    verified: VerifiedTokens,
}

/// Algorithms Switchboard can check; anything else (`none`, HS256 with the
/// public key as secret, ...) is refused before a key is looked at.
fn supported(name: &str) -> Option<Algorithm> {
    match name {
        "RS256" => Some(Algorithm::RS256),
        "ES256" => Some(Algorithm::ES256),
        _ => None,
    }
}

impl TokenVerifier {
    /// A verifier with no keys yet; `config.jwks_url` or `config.oidc_discovery`
    /// give it a source to fetch them from.
    pub fn from_config(config: &AuthConfig) -> anyhow::Result<Self> {
        let mut algorithms = Vec::new();
        for name in &config.algorithms {
            algorithms.push(
                supported(name)
                    .ok_or_else(|| anyhow::anyhow!("auth.algorithms: {name} is not supported (RS256, ES256)"))?,
            );
        }
        let source = if !config.jwks_url.is_empty() || config.oidc_discovery {
            let client =
                reqwest::Client::builder().timeout(Duration::from_millis(config.jwks_fetch_timeout_ms)).build()?;
            Some(JwksSource {
                client,
                url: Some(config.jwks_url.clone()).filter(|url| !url.is_empty()),
                issuer: config.issuer.clone(),
                discovered: tokio::sync::Mutex::new(None),
            })
        } else {
            None
        };
        Ok(TokenVerifier {
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            leeway_secs: config.leeway_secs,
            algorithms,
            customer_claim: config.stripe_customer_claim.clone(),
            keys: RwLock::new(HashMap::new()),
            source,
            ttl: Duration::from_secs(config.jwks_ttl_secs),
            min_refresh_interval: Duration::from_millis(config.jwks_min_refresh_interval_ms),
            last_fetch: tokio::sync::Mutex::new(None),
            fetches: AtomicU64::new(0),
            verified: VerifiedTokens::default(),
        })
    }

    /// How many times keys were fetched from the tenant.
    pub fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// Replaces the key set. Keys without a `kid`, or of a kind we do not accept,
    /// are skipped with a warning. Returns how many keys are usable.
    pub fn set_jwks(&self, jwks: &JwkSet) -> usize {
        let mut keys = HashMap::new();
        for jwk in &jwks.keys {
            match verification_key(jwk) {
                Some((kid, key)) if self.algorithms.contains(&key.algorithm) => {
                    keys.insert(kid, key);
                }
                _ => tracing::warn!(kid = ?jwk.common.key_id, "skipping unusable jwk"),
            }
        }
        let usable = keys.len();
        match self.keys.write() {
            Ok(mut guard) => *guard = keys,
            Err(poisoned) => *poisoned.into_inner() = keys,
        }
        // A key replaced under the same id must not vouch for old tokens.
        self.verified.clear();
        usable
    }

    fn has_key(&self, kid: &str) -> bool {
        match self.keys.read() {
            Ok(keys) => keys.contains_key(kid),
            Err(poisoned) => poisoned.into_inner().contains_key(kid),
        }
    }

    /// Fetches the key set now (start-up and the periodic refresh).
    pub async fn refresh(&self) -> anyhow::Result<usize> {
        let mut last = self.last_fetch.lock().await;
        *last = Some(Instant::now());
        self.fetch_and_install().await
    }

    async fn fetch_and_install(&self) -> anyhow::Result<usize> {
        let Some(source) = &self.source else {
            return Ok(0);
        };
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let url = match &source.url {
            Some(url) => url.clone(),
            None => source.jwks_uri().await?,
        };
        let jwks: JwkSet = source.client.get(&url).send().await?.error_for_status()?.json().await?;
        let usable = self.set_jwks(&jwks);
        tracing::info!(keys = usable, "fetched the token signing keys");
        Ok(usable)
    }

    /// An unknown key id: maybe the tenant rotated its keys. Fetch once, unless a
    /// fetch happened too recently (rate limit) or another caller just did it.
    async fn refresh_for(&self, kid: &str) {
        if self.source.is_none() {
            return;
        }
        let mut last = self.last_fetch.lock().await;
        if self.has_key(kid) {
            return;
        }
        if last.is_some_and(|at| at.elapsed() < self.min_refresh_interval) {
            return;
        }
        *last = Some(Instant::now());
        if let Err(error) = self.fetch_and_install().await {
            tracing::warn!(%error, "could not refresh the token signing keys; keeping the cached ones");
        }
    }

    /// Refreshes the keys every TTL until `shutdown`.
    pub async fn run_refresher(self: Arc<Self>, shutdown: CancellationToken) {
        if self.source.is_none() {
            return;
        }
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.ttl) => {}
            }
            if let Err(error) = self.refresh().await {
                tracing::warn!(%error, "could not refresh the token signing keys; keeping the cached ones");
            }
        }
    }

    pub async fn verify(&self, token: &str) -> Result<UserClaims, TokenError> {
        let digest = token_cache::digest(token);
        let now_unix = chrono::Utc::now().timestamp();
        if let Some(claims) = self.verified.get(&digest, now_unix, |kid| self.has_key(kid)) {
            return Ok(claims);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if !self.algorithms.contains(&header.alg) {
            return Err(TokenError::Algorithm(format!("{:?}", header.alg)));
        }
        let kid = header.kid.ok_or(TokenError::MissingKeyId)?;
        if !self.has_key(&kid) {
            self.refresh_for(&kid).await;
        }
        let claims = {
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
            jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, &key.key, &validation)
                .map_err(classify)?
                .claims
        };
        let user = self.user_claims(&claims)?;
        // `exp` is a required claim, so a verified token has one.
        if let Some(exp) = claims.get("exp").and_then(Value::as_i64) {
            let leeway = i64::try_from(self.leeway_secs).unwrap_or(i64::MAX);
            self.verified.put(digest, user.clone(), kid, exp.saturating_add(leeway));
        }
        Ok(user)
    }

    fn user_claims(&self, claims: &serde_json::Map<String, Value>) -> Result<UserClaims, TokenError> {
        let text = |name: &str| claims.get(name).and_then(Value::as_str).map(str::to_owned);
        let subject =
            text("sub").filter(|sub| !sub.is_empty()).ok_or_else(|| TokenError::Invalid("empty subject".into()))?;
        // Space-separated `scope` as OAuth issues it, and Auth0's RBAC `permissions` array.
        let mut scopes: Vec<String> = text("scope").unwrap_or_default().split_whitespace().map(str::to_owned).collect();
        if let Some(Value::Array(permissions)) = claims.get("permissions") {
            for permission in permissions.iter().filter_map(Value::as_str) {
                if !scopes.iter().any(|scope| scope == permission) {
                    scopes.push(permission.to_owned());
                }
            }
        }
        let stripe_customer_id = text(&self.customer_claim).filter(|id| !id.is_empty());
        Ok(UserClaims { subject, email: text("email"), scopes, stripe_customer_id })
    }
}

impl JwksSource {
    /// The `jwks_uri` of the issuer's OpenID discovery document, fetched once.
    async fn jwks_uri(&self) -> anyhow::Result<String> {
        let mut discovered = self.discovered.lock().await;
        if let Some(uri) = discovered.as_ref() {
            return Ok(uri.clone());
        }
        let url = format!("{}/.well-known/openid-configuration", self.issuer.trim_end_matches('/'));
        let document: Value = self.client.get(&url).send().await?.error_for_status()?.json().await?;
        let uri = document
            .get("jwks_uri")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow::anyhow!("the discovery document at {url} has no jwks_uri"))?
            .to_owned();
        *discovered = Some(uri.clone());
        Ok(uri)
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
