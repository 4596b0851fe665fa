//! A local OIDC tenant for token tests: serves a JWKS (and an OpenID discovery
//! document) that a test can rotate, and counts how often it was fetched.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
/// A JWKS as JSON.
type JwkSetJson = serde_json::Value;

#[derive(Clone)]
struct TenantState {
    jwks: Arc<Mutex<JwkSetJson>>,
    fetches: Arc<AtomicU64>,
    down: Arc<AtomicBool>,
    base: String,
}

pub struct JwksServer {
    pub addr: SocketAddr,
    state: TenantState,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    pub async fn start(jwks: JwkSetJson) -> anyhow::Result<JwksServer> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = TenantState {
            jwks: Arc::new(Mutex::new(jwks)),
            fetches: Arc::new(AtomicU64::new(0)),
            down: Arc::new(AtomicBool::new(false)),
            base: format!("http://{addr}"),
        };
        let app = Router::new()
            .route("/.well-known/jwks.json", get(serve_jwks))
            .route("/.well-known/openid-configuration", get(serve_discovery))
            .with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(JwksServer { addr, state, task })
    }

    /// The issuer URL (tokens' `iss` for discovery tests).
    pub fn issuer(&self) -> String {
        format!("{}/", self.state.base)
    }

    pub fn jwks_url(&self) -> String {
        format!("{}/.well-known/jwks.json", self.state.base)
    }

    /// Key rotation at the tenant.
    pub fn set_jwks(&self, jwks: JwkSetJson) {
        if let Ok(mut current) = self.state.jwks.lock() {
            *current = jwks;
        }
    }

    pub fn fetches(&self) -> u64 {
        self.state.fetches.load(Ordering::SeqCst)
    }

    /// The tenant answers 503 from now on.
    pub fn go_down(&self) {
        self.state.down.store(true, Ordering::SeqCst);
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_jwks(State(state): State<TenantState>) -> impl IntoResponse {
    state.fetches.fetch_add(1, Ordering::SeqCst);
    if state.down.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({}))).into_response();
    }
    let jwks = state.jwks.lock().map(|jwks| jwks.clone()).unwrap_or_default();
    Json(jwks).into_response()
}

async fn serve_discovery(State(state): State<TenantState>) -> impl IntoResponse {
    Json(serde_json::json!({
        "issuer": format!("{}/", state.base),
        "jwks_uri": format!("{}/.well-known/jwks.json", state.base),
    }))
}
