//! Who may call what. User tokens are OIDC JWTs checked against a JWKS; hosts
//! present a credential bound to their id; a mandelbox's protocol server
//! presents the token issued at its spawn. The per-RPC policy lives in one
//! place, `policy.rs`, applied as a tower layer in front of every service.

pub mod dev_issuer;
pub mod host_credential;
pub mod jwt;
mod known_users;
pub mod mandelbox_token;
pub mod policy;
mod token_cache;

pub use policy::{AccessControl, AuthLayer, Principal};
