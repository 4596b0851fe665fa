//! The per-RPC access policy, in one place: a tower layer in front of every
//! service decides from the request path what credential the call needs,
//! checks it, and hands handlers a `Principal` in the request extensions.
//!
//! | path prefix                          | needs                                  |
//! |--------------------------------------|----------------------------------------|
//! | `AllocationService/Allocate`         | a user token + a subscription (admins exempt) |
//! | `switchboard.v1.AllocationService`   | a valid user token                     |
//! | `switchboard.v1.AccountService`      | a valid user token                     |
//! | `switchboard.v1.AdminService`        | a valid user token with scope `admin`  |
//! | `switchboard.v1.HostService`         | the host credential, checked in Hello  |
//! | `switchboard.v1.SessionEventsService`| the mandelbox token, checked in handler|
//! | `/fleet/api/` (HTTP, JSON)           | a valid user token with scope `admin`  |
//! | `/metrics` (HTTP, Prometheus text)   | a valid user token with scope `admin`  |
//! | health, reflection, other HTTP pages | nothing                                |
//!
//! Every authenticated call registers its user (once per process, then cached).

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use http::{Request, Response};
use tonic::Status;
use tower::{Layer, Service};

use super::{
    jwt::{TokenVerifier, UserClaims},
    known_users::{CachedCustomer, KnownUsers},
};
use crate::{billing::Subscriptions, error::ApiError, store::DynStore};

pub const ADMIN_SCOPE: &str = "admin";

/// Who is calling, as established by the policy layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub claims: UserClaims,
}

impl Principal {
    pub fn user_id(&self) -> &str {
        &self.claims.subject
    }

    pub fn is_admin(&self) -> bool {
        self.claims.has_scope(ADMIN_SCOPE)
    }

    /// The principal the layer attached; its absence means the layer was not
    /// in front of this service, which is a wiring bug, not the caller's fault.
    pub fn from_request<T>(request: &tonic::Request<T>) -> Result<Principal, ApiError> {
        request
            .extensions()
            .get::<Principal>()
            .cloned()
            .ok_or_else(|| ApiError::Internal("request reached a handler without a principal".into()))
    }
}

const ALLOCATE_PATH: &str = "/switchboard.v1.AllocationService/Allocate";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Requirement {
    User,
    /// A user with an active or trialing subscription, or an admin.
    Subscriber,
    Admin,
    /// Admin, answered as plain HTTP (401/403 with a JSON reason), not gRPC.
    AdminHttp,
    /// Checked by the handler with a credential of its own.
    Public,
}

fn requirement(path: &str) -> Requirement {
    if path.starts_with("/fleet/api/") || path == "/metrics" {
        return Requirement::AdminHttp;
    }
    if path == ALLOCATE_PATH {
        return Requirement::Subscriber;
    }
    let service = path.trim_start_matches('/').split('/').next().unwrap_or_default();
    match service {
        "switchboard.v1.AllocationService" | "switchboard.v1.AccountService" => Requirement::User,
        "switchboard.v1.AdminService" => Requirement::Admin,
        _ => Requirement::Public,
    }
}

/// Everything the policy needs: token keys, billing, and the store for
/// registration.
pub struct AccessControl {
    verifier: Arc<TokenVerifier>,
    subscriptions: Subscriptions,
    store: DynStore,
    /// Registered users and their billing customers (see `known_users`).
    known_users: KnownUsers,
    /// Allocate's time in the policy is its first phase.
    metrics: Arc<crate::metrics::Metrics>,
}

impl AccessControl {
    pub fn new(
        verifier: Arc<TokenVerifier>,
        subscriptions: Subscriptions,
        store: DynStore,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        AccessControl { verifier, subscriptions, store, known_users: KnownUsers::default(), metrics }
    }

    async fn authorize(&self, path: &str, headers: &http::HeaderMap) -> Result<Option<Principal>, ApiError> {
        let requirement = requirement(path);
        if requirement == Requirement::Public {
            return Ok(None);
        }
        let header = headers
            .get(http::header::AUTHORIZATION)
            .ok_or_else(|| ApiError::Unauthenticated("missing bearer token".into()))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|value| value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|token| !token.is_empty())
            .ok_or_else(|| ApiError::Unauthenticated("authorization header is not a bearer token".into()))?;
        let claims = self.verifier.verify(token).await.map_err(|error| ApiError::Unauthenticated(error.to_string()))?;
        let principal = Principal { claims };
        self.register(&principal).await?;
        match requirement {
            Requirement::Admin | Requirement::AdminHttp if !principal.is_admin() => {
                Err(ApiError::Forbidden("this call needs scope admin".into()))
            }
            Requirement::Subscriber if !principal.is_admin() => {
                let customer = self.customer_of(&principal).await?;
                let status = self.subscriptions.status(customer.as_deref()).await?;
                if status.allows_streaming() {
                    Ok(Some(principal))
                } else {
                    Err(ApiError::SubscriptionRequired(status.as_str()))
                }
            }
            _ => Ok(Some(principal)),
        }
    }

    /// Registration: the user row exists from the first authenticated call on.
    async fn register(&self, principal: &Principal) -> Result<(), ApiError> {
        if self.known_users.is_registered(principal.user_id()) {
            return Ok(());
        }
        self.store.ensure_user(principal.user_id(), principal.claims.email.as_deref()).await?;
        self.known_users.registered(principal.user_id());
        Ok(())
    }

    /// The Stripe customer: from the token's claim, else the one Switchboard
    /// created for the user (remembered, see `known_users`).
    pub async fn customer_of(&self, principal: &Principal) -> Result<Option<String>, ApiError> {
        if let Some(customer) = &principal.claims.stripe_customer_id {
            return Ok(Some(customer.clone()));
        }
        if let CachedCustomer::Known(customer) = self.known_users.customer(principal.user_id()) {
            return Ok(customer);
        }
        let customer = self.store.get_user(principal.user_id()).await?.and_then(|user| user.stripe_customer_id);
        self.known_users.set_customer(principal.user_id(), customer.clone());
        Ok(customer)
    }

    /// A customer this process just stored for the user.
    pub fn remember_customer(&self, user_id: &str, customer: &str) {
        self.known_users.set_customer(user_id, Some(customer.to_owned()));
    }
}

#[derive(Clone)]
pub struct AuthLayer {
    access: Arc<AccessControl>,
}

impl AuthLayer {
    pub fn new(access: Arc<AccessControl>) -> Self {
        AuthLayer { access }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService { inner, access: self.access.clone() }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    access: Arc<AccessControl>,
}

impl<S, B> Service<Request<B>> for AuthService<S>
where
    S: Service<Request<B>, Response = Response<tonic::body::Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        // Take the service that was driven to readiness; leave a clone behind.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let access = self.access.clone();
        Box::pin(async move {
            let path = request.uri().path().to_owned();
            let started = std::time::Instant::now();
            let authorized = access.authorize(&path, request.headers()).await;
            if path == ALLOCATE_PATH {
                access.metrics.allocate.auth.record_since(started);
            }
            match authorized {
                Ok(principal) => {
                    if let Some(principal) = principal {
                        request.extensions_mut().insert(principal);
                    }
                    inner.call(request).await
                }
                Err(error) => {
                    tracing::debug!(%path, reason = error.reason(), "call refused");
                    Ok(if requirement(&path) == Requirement::AdminHttp {
                        plain_http_refusal(&error)
                    } else {
                        Status::from(error).into_http()
                    })
                }
            }
        })
    }
}

/// 401 or 403 with `{"reason": ..., "message": ...}`, for browser pages.
fn plain_http_refusal(error: &ApiError) -> Response<tonic::body::Body> {
    let status = match error {
        ApiError::Forbidden(_) => http::StatusCode::FORBIDDEN,
        _ => http::StatusCode::UNAUTHORIZED,
    };
    let body = serde_json::json!({ "reason": error.reason(), "message": error.to_string() }).to_string();
    let mut response = Response::new(tonic::body::Body::new(axum::body::Body::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_by_path() {
        assert_eq!(requirement("/switchboard.v1.AllocationService/Allocate"), Requirement::Subscriber);
        assert_eq!(requirement("/switchboard.v1.AllocationService/GetSession"), Requirement::User);
        assert_eq!(requirement("/switchboard.v1.AccountService/GetAccount"), Requirement::User);
        assert_eq!(requirement("/switchboard.v1.AdminService/ListHosts"), Requirement::Admin);
        assert_eq!(requirement("/switchboard.v1.HostService/Connect"), Requirement::Public);
        assert_eq!(requirement("/grpc.health.v1.Health/Check"), Requirement::Public);
        assert_eq!(requirement("/.well-known/jwks.json"), Requirement::Public);
        assert_eq!(requirement("/fleet"), Requirement::Public);
        assert_eq!(requirement("/fleet/api/hosts"), Requirement::AdminHttp);
        assert_eq!(requirement("/metrics"), Requirement::AdminHttp);
    }
}
