//! The per-RPC access policy, in one place: a tower layer in front of every
//! service decides from the request path what credential the call needs,
//! checks it, and hands handlers a `Principal` in the request extensions.
//!
//! | path prefix                          | needs                                  |
//! |--------------------------------------|----------------------------------------|
//! | `switchboard.v1.AllocationService`   | a valid user token                     |
//! | `switchboard.v1.AdminService`        | a valid user token with scope `admin`  |
//! | `switchboard.v1.HostService`         | the host credential, checked in Hello  |
//! | `switchboard.v1.SessionEventsService`| the mandelbox token, checked in handler|
//! | `/fleet/api/` (HTTP, JSON)           | a valid user token with scope `admin`  |
//! | health, reflection, other HTTP pages | nothing                                |
//!
//! Subscription checks (issue: identity and billing) plug in here too.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use http::{Request, Response};
use tonic::Status;
use tower::{Layer, Service};

use super::jwt::{TokenVerifier, UserClaims};
use crate::error::ApiError;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Requirement {
    User,
    Admin,
    /// Admin, answered as plain HTTP (401/403 with a JSON reason), not gRPC.
    AdminHttp,
    /// Checked by the handler with a credential of its own.
    Public,
}

fn requirement(path: &str) -> Requirement {
    if path.starts_with("/fleet/api/") {
        return Requirement::AdminHttp;
    }
    let service = path.trim_start_matches('/').split('/').next().unwrap_or_default();
    match service {
        "switchboard.v1.AllocationService" | "switchboard.v1.AccountService" => Requirement::User,
        "switchboard.v1.AdminService" => Requirement::Admin,
        _ => Requirement::Public,
    }
}

#[derive(Clone)]
pub struct AuthLayer {
    verifier: Arc<TokenVerifier>,
}

impl AuthLayer {
    pub fn new(verifier: Arc<TokenVerifier>) -> Self {
        AuthLayer { verifier }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService { inner, verifier: self.verifier.clone() }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    verifier: Arc<TokenVerifier>,
}

impl<S> AuthService<S> {
    fn authorize<B>(&self, request: &mut Request<B>) -> Result<(), ApiError> {
        let requirement = requirement(request.uri().path());
        if requirement == Requirement::Public {
            return Ok(());
        }
        let header = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .ok_or_else(|| ApiError::Unauthenticated("missing bearer token".into()))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|value| value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|token| !token.is_empty())
            .ok_or_else(|| ApiError::Unauthenticated("authorization header is not a bearer token".into()))?;
        let claims = self.verifier.verify(token).map_err(|error| ApiError::Unauthenticated(error.to_string()))?;
        let principal = Principal { claims };
        if matches!(requirement, Requirement::Admin | Requirement::AdminHttp) && !principal.is_admin() {
            return Err(ApiError::Forbidden("this call needs scope admin".into()));
        }
        request.extensions_mut().insert(principal);
        Ok(())
    }
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
        match self.authorize(&mut request) {
            Ok(()) => {
                // Take the service that was driven to readiness; leave a clone behind.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(async move { inner.call(request).await })
            }
            Err(error) => {
                tracing::debug!(path = %request.uri().path(), reason = error.reason(), "call refused");
                let response = if requirement(request.uri().path()) == Requirement::AdminHttp {
                    plain_http_refusal(&error)
                } else {
                    Status::from(error).into_http()
                };
                Box::pin(async move { Ok(response) })
            }
        }
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
        assert_eq!(requirement("/switchboard.v1.AllocationService/Allocate"), Requirement::User);
        assert_eq!(requirement("/switchboard.v1.AdminService/ListHosts"), Requirement::Admin);
        assert_eq!(requirement("/switchboard.v1.HostService/Connect"), Requirement::Public);
        assert_eq!(requirement("/grpc.health.v1.Health/Check"), Requirement::Public);
        assert_eq!(requirement("/.well-known/jwks.json"), Requirement::Public);
        assert_eq!(requirement("/fleet"), Requirement::Public);
        assert_eq!(requirement("/fleet/api/hosts"), Requirement::AdminHttp);
    }
}
