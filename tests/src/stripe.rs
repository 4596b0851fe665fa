//! Stripe for tests: the real emulator (localstripe, from PyPI) for customers
//! and subscriptions, a stub that replays recorded Stripe responses for what the
//! emulator cannot do (trialing, Checkout, the billing portal), and a webhook
//! signer.

use std::{
    net::SocketAddr,
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use axum::{Router, extract::State, response::IntoResponse, routing::get, routing::post};
use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const TEST_SECRET_KEY: &str = "sk_test_switchboard";
pub const TEST_PLAN: &str = "streaming-monthly";

/// A localstripe process on a free port, with its own state directory.
pub struct Localstripe {
    pub base: String,
    child: tokio::process::Child,
    _state_dir: tempfile::TempDir,
    http: reqwest::Client,
}

impl Localstripe {
    pub async fn start() -> anyhow::Result<Localstripe> {
        crate::init_test_log();
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
            listener.local_addr()?.port()
        };
        // localstripe keeps its state in a pickle in the temp folder: one folder each.
        let state_dir = tempfile::tempdir()?;
        let child = tokio::process::Command::new("localstripe")
            .args(["--port", &port.to_string(), "--from-scratch"])
            .env("TMPDIR", state_dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context(
                "starting localstripe (the Stripe emulator): `pip install localstripe`; scripts/test.sh installs it",
            )?;
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let mut emulator = Localstripe { base, child, _state_dir: state_dir, http };
        for _ in 0..100 {
            if emulator
                .http
                .get(format!("{}/v1/customers", emulator.base))
                .basic_auth(TEST_SECRET_KEY, Some(""))
                .send()
                .await
                .is_ok()
            {
                emulator
                    .post(
                        "/v1/plans",
                        &[
                            ("id", TEST_PLAN),
                            ("amount", "1500"),
                            ("currency", "usd"),
                            ("interval", "month"),
                            ("product[name]", "Streaming"),
                        ],
                    )
                    .await?;
                return Ok(emulator);
            }
            if let Ok(Some(status)) = emulator.child.try_wait() {
                anyhow::bail!("localstripe exited at start ({status})");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!("localstripe did not answer on {}", emulator.base)
    }

    async fn post(&self, path: &str, form: &[(&str, &str)]) -> anyhow::Result<serde_json::Value> {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .basic_auth(TEST_SECRET_KEY, Some(""))
            .form(form)
            .send()
            .await?;
        let status = response.status();
        let body: serde_json::Value = response.json().await?;
        anyhow::ensure!(status.is_success(), "localstripe {path}: {status} {body}");
        Ok(body)
    }

    /// A customer with a card on file.
    pub async fn customer_with_card(&self) -> anyhow::Result<String> {
        let token = self
            .post(
                "/v1/tokens",
                &[
                    ("card[number]", "4242424242424242"),
                    ("card[exp_month]", "12"),
                    ("card[exp_year]", "2034"),
                    ("card[cvc]", "123"),
                ],
            )
            .await?;
        let token = token["id"].as_str().context("token id")?.to_owned();
        let customer = self.post("/v1/customers", &[("email", "payer@example.com"), ("source", &token)]).await?;
        Ok(customer["id"].as_str().context("customer id")?.to_owned())
    }

    pub async fn customer_without_card(&self) -> anyhow::Result<String> {
        let customer = self.post("/v1/customers", &[("email", "nocard@example.com")]).await?;
        Ok(customer["id"].as_str().context("customer id")?.to_owned())
    }

    /// Subscribes the customer; returns (subscription id, status).
    pub async fn subscribe(&self, customer: &str) -> anyhow::Result<(String, String)> {
        let response = self
            .http
            .post(format!("{}/v1/subscriptions", self.base))
            .basic_auth(TEST_SECRET_KEY, Some(""))
            .form(&[("customer", customer), ("items[0][plan]", TEST_PLAN)])
            .send()
            .await?;
        let body: serde_json::Value = response.json().await?;
        // Without a card the emulator answers with an error but keeps an incomplete subscription.
        if let Some(id) = body["id"].as_str() {
            return Ok((id.to_owned(), body["status"].as_str().unwrap_or_default().to_owned()));
        }
        Ok((String::new(), "incomplete".into()))
    }

    pub async fn cancel(&self, subscription: &str) -> anyhow::Result<()> {
        let response = self
            .http
            .delete(format!("{}/v1/subscriptions/{subscription}", self.base))
            .basic_auth(TEST_SECRET_KEY, Some(""))
            .send()
            .await?;
        anyhow::ensure!(response.status().is_success(), "cancel: {}", response.status());
        Ok(())
    }

    pub async fn customer_exists(&self, customer: &str) -> anyhow::Result<bool> {
        let response = self
            .http
            .get(format!("{}/v1/customers/{customer}", self.base))
            .basic_auth(TEST_SECRET_KEY, Some(""))
            .send()
            .await?;
        Ok(response.status().is_success())
    }
}

/// Replays responses recorded from Stripe's API (test mode) for what the
/// emulator cannot produce, and records the requests it received.
pub struct RecordedStripe {
    pub addr: SocketAddr,
    pub requests: Arc<Mutex<Vec<(String, String)>>>,
    subscriptions: Arc<Mutex<&'static str>>,
    task: tokio::task::JoinHandle<()>,
}

/// The same list endpoint for a customer with no subscription.
pub const RECORDED_EMPTY_LIST: &str = r#"{"object":"list","url":"/v1/subscriptions","has_more":false,"data":[]}"#;

/// `GET /v1/subscriptions?customer=cus_trial&status=all` in test mode, trimmed
/// to the fields that matter (a real response has ~60 per subscription).
pub const RECORDED_TRIALING_LIST: &str = r#"{"object":"list","url":"/v1/subscriptions","has_more":false,"data":[{"id":"sub_1QTrialRecorded","object":"subscription","customer":"cus_trial","status":"trialing","trial_start":1795300000,"trial_end":1796509600,"cancel_at_period_end":false,"collection_method":"charge_automatically","currency":"usd","livemode":false}]}"#;
const RECORDED_CHECKOUT_SESSION: &str = r#"{"id":"cs_test_a1RecordedCheckout","object":"checkout.session","mode":"subscription","status":"open","url":"https://checkout.stripe.com/c/pay/cs_test_a1RecordedCheckout","livemode":false}"#;
const RECORDED_PORTAL_SESSION: &str = r#"{"id":"bps_1RecordedPortal","object":"billing_portal.session","url":"https://billing.stripe.com/p/session/test_RecordedPortal","livemode":false}"#;
const RECORDED_CUSTOMER: &str = r#"{"id":"cus_recorded","object":"customer","email":null,"livemode":false}"#;

impl RecordedStripe {
    pub async fn start() -> anyhow::Result<RecordedStripe> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let requests: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
        let subscriptions = Arc::new(Mutex::new(RECORDED_TRIALING_LIST));
        let listed = subscriptions.clone();
        let app = Router::new()
            .route(
                "/v1/subscriptions",
                get(move || {
                    let body = listed.lock().map(|body| *body).unwrap_or(RECORDED_EMPTY_LIST);
                    async move { json(body) }
                }),
            )
            .route("/v1/checkout/sessions", post(record_then(RECORDED_CHECKOUT_SESSION)))
            .route("/v1/billing_portal/sessions", post(record_then(RECORDED_PORTAL_SESSION)))
            .route("/v1/customers", post(record_then(RECORDED_CUSTOMER)))
            .with_state(requests.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(RecordedStripe { addr, requests, subscriptions, task })
    }

    /// What `GET /v1/subscriptions` answers from now on.
    pub fn answer_subscriptions_with(&self, body: &'static str) {
        if let Ok(mut current) = self.subscriptions.lock() {
            *current = body;
        }
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Bodies received on `path`.
    pub fn bodies(&self, path: &str) -> Vec<String> {
        self.requests
            .lock()
            .map(|r| r.iter().filter(|(p, _)| p == path).map(|(_, b)| b.clone()).collect())
            .unwrap_or_default()
    }
}

impl Drop for RecordedStripe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn json(body: &'static str) -> impl IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], body)
}

type Requests = Arc<Mutex<Vec<(String, String)>>>;

fn record_then(
    body: &'static str,
) -> impl Fn(State<Requests>, axum::http::Uri, String) -> std::future::Ready<axum::response::Response> + Clone + Send + 'static
{
    move |State(requests): State<Requests>, uri: axum::http::Uri, form: String| {
        if let Ok(mut requests) = requests.lock() {
            requests.push((uri.path().to_owned(), form));
        }
        std::future::ready(json(body).into_response())
    }
}

/// A `Stripe-Signature` header for `payload`, as Stripe computes it.
pub fn sign_webhook(secret: &str, timestamp: i64, payload: &str) -> String {
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(mac) => mac,
        Err(_) => unreachable!("hmac takes keys of any length"),
    };
    mac.update(format!("{timestamp}.{payload}").as_bytes());
    format!("t={timestamp},v1={}", hex::encode(mac.finalize().into_bytes()))
}
