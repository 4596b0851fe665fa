//! The development token issuer of `switchboard dev`: an RS256 key generated at
//! start, published as a JWKS, signing user and admin tokens. The server
//! checks these tokens with the same `TokenVerifier` a real tenant's go
//! through.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey, Header, jwk::JwkSet};
use rsa::{
    RsaPrivateKey,
    pkcs1::{EncodeRsaPrivateKey, LineEnding},
    traits::PublicKeyParts,
};
use serde::Serialize;

pub struct DevIssuer {
    issuer: String,
    audience: String,
    kid: String,
    encoding_key: EncodingKey,
    jwks: JwkSet,
    public_pem: String,
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    aud: &'a str,
    sub: &'a str,
    iat: i64,
    nbf: i64,
    exp: i64,
    scope: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<&'a str>,
}

impl DevIssuer {
    /// Generates a fresh 2048-bit RSA key.
    pub fn generate(issuer: &str, audience: &str) -> anyhow::Result<Self> {
        let key = RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048)?;
        let pem = key.to_pkcs1_pem(LineEnding::LF)?;
        let encoding_key = EncodingKey::from_rsa_pem(pem.as_bytes())?;
        let kid = format!("dev-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let public = key.to_public_key();
        let public_pem = {
            use rsa::pkcs8::EncodePublicKey;
            public.to_public_key_pem(LineEnding::LF)?
        };
        let jwks: JwkSet = serde_json::from_value(serde_json::json!({
            "keys": [{
                "kty": "RSA",
                "use": "sig",
                "alg": "RS256",
                "kid": kid,
                "n": URL_SAFE_NO_PAD.encode(public.n().to_bytes_be()),
                "e": URL_SAFE_NO_PAD.encode(public.e().to_bytes_be()),
            }]
        }))?;
        Ok(DevIssuer { issuer: issuer.to_owned(), audience: audience.to_owned(), kid, encoding_key, jwks, public_pem })
    }

    pub fn jwks(&self) -> &JwkSet {
        &self.jwks
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn audience(&self) -> &str {
        &self.audience
    }

    /// The public key as PEM (what an attacker knows: tests use it to forge
    /// HS256 tokens with the public key as the secret).
    pub fn public_key_pem(&self) -> &str {
        &self.public_pem
    }

    /// Signs arbitrary claims with this issuer's key and key id (RS256).
    pub fn sign(&self, claims: &serde_json::Value) -> anyhow::Result<String> {
        self.sign_with_kid(&self.kid, claims)
    }

    /// Signs with this issuer's key but names another key id in the header.
    pub fn sign_with_kid(&self, kid: &str, claims: &serde_json::Value) -> anyhow::Result<String> {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(kid.to_owned());
        Ok(jsonwebtoken::encode(&header, claims, &self.encoding_key)?)
    }

    /// A token for `subject` with `scopes`, valid for `ttl`.
    pub fn issue(
        &self,
        subject: &str,
        email: Option<&str>,
        scopes: &[&str],
        ttl: std::time::Duration,
    ) -> anyhow::Result<String> {
        let now = chrono::Utc::now().timestamp();
        let claims = Claims {
            iss: &self.issuer,
            aud: &self.audience,
            sub: subject,
            iat: now,
            nbf: now,
            exp: now + i64::try_from(ttl.as_secs())?,
            scope: scopes.join(" "),
            email,
        };
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(self.kid.clone());
        Ok(jsonwebtoken::encode(&header, &claims, &self.encoding_key)?)
    }
}
