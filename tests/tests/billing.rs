//! Subscriptions decide who streams: against the Stripe emulator (localstripe)
//! for active, canceled and incomplete; against recorded Stripe responses where
//! the emulator cannot go (trialing, Checkout, billing portal); webhooks; and
//! Stripe being down.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use switchboard::config::Config;
use switchboard_proto::v1::{
    GetAccountRequest, GetBillingUrlRequest, account_service_client::AccountServiceClient, billing_url::Kind,
};
use switchboard_tests::{
    Backend, TestApp, TestOptions,
    app::{Bearer, chrome_in_us_east, reason},
    stripe::{Localstripe, RECORDED_EMPTY_LIST, RecordedStripe, TEST_SECRET_KEY, sign_webhook},
};
use tonic::Code;

const CUSTOMER_CLAIM: &str = "https://switchboard.dev/stripe_customer_id";
const WEBHOOK_SECRET: &str = "whsec_test_switchboard";

fn stripe_at(base: String, ttl_secs: u64) -> impl FnOnce(&mut Config) {
    move |config| {
        config.billing.provider = "stripe".into();
        config.billing.stripe_api_base = base;
        config.billing.stripe_secret_key = switchboard::config::Secret::new(TEST_SECRET_KEY);
        config.billing.price_id = "price_streaming_monthly".into();
        config.billing.webhook_secret = switchboard::config::Secret::new(WEBHOOK_SECRET);
        config.billing.status_ttl_secs = ttl_secs;
        config.billing.request_timeout_ms = 1_000;
    }
}

fn token_for(app: &TestApp, user: &str, customer: Option<&str>, admin: bool) -> String {
    let now = chrono::Utc::now().timestamp();
    let mut claims = serde_json::json!({
        "iss": app.issuer.issuer(), "aud": app.issuer.audience(), "sub": user, "iat": now, "exp": now + 600,
        "scope": if admin { "admin" } else { "" },
    });
    if let Some(customer) = customer {
        claims[CUSTOMER_CLAIM] = customer.into();
    }
    app.issuer.sign(&claims).unwrap()
}

async fn allocate(app: &TestApp, token: &str) -> Result<(), tonic::Status> {
    app.allocation_client(Some(token)).allocate(chrome_in_us_east()).await.map(|_| ())
}

fn accounts(
    app: &TestApp,
    token: &str,
) -> AccountServiceClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>> {
    AccountServiceClient::with_interceptor(app.channel.clone(), Bearer::new(Some(token)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_active_subscribers_allocate_against_the_emulator() {
    let stripe = Localstripe::start().await.unwrap();
    let active = stripe.customer_with_card().await.unwrap();
    assert_eq!(stripe.subscribe(&active).await.unwrap().1, "active");
    let canceled = stripe.customer_with_card().await.unwrap();
    let (subscription, _) = stripe.subscribe(&canceled).await.unwrap();
    stripe.cancel(&subscription).await.unwrap();
    let incomplete = stripe.customer_without_card().await.unwrap();
    stripe.subscribe(&incomplete).await.unwrap();
    let nothing = stripe.customer_without_card().await.unwrap();

    let hosts = vec![switchboard_tests::HostSpec::new("host-1", "us-east-1", 4)];
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        TestOptions { hosts, ..Default::default() },
        stripe_at(stripe.base.clone(), 0),
    )
    .await
    .unwrap();

    let paying = token_for(&app, "payer", Some(&active), false);
    assert!(allocate(&app, &paying).await.is_ok());
    let account = accounts(&app, &paying).get_account(GetAccountRequest {}).await.unwrap().into_inner();
    assert_eq!((account.subscription_status.as_str(), account.can_stream), ("active", true));
    assert_eq!(account.billing_provider, "stripe");
    assert_eq!(account.active_sessions.len(), 1);

    for (user, customer, status) in [
        ("quitter", Some(&canceled), "canceled"),
        ("unpaid", Some(&incomplete), "incomplete"),
        ("browser", Some(&nothing), "none"),
        ("anonymous", None, "none"),
    ] {
        let token = token_for(&app, user, customer.map(String::as_str), false);
        let refused = allocate(&app, &token).await.unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{user}");
        assert_eq!(reason(&refused), "SUBSCRIPTION_REQUIRED", "{user}");
        assert!(refused.message().contains(status), "{user}: {}", refused.message());
        let account = accounts(&app, &token).get_account(GetAccountRequest {}).await.unwrap().into_inner();
        assert_eq!((account.subscription_status.as_str(), account.can_stream), (status, false), "{user}");
    }
    // Admins stream without a subscription.
    assert!(allocate(&app, &token_for(&app, "operator", None, true)).await.is_ok());
    assert_eq!(app.db.query_i64("SELECT count(*) FROM sessions WHERE state = 'RUNNING'").await.unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trialing_passes_with_a_recorded_stripe_response() {
    let stripe = RecordedStripe::start().await.unwrap();
    let app = TestApp::spawn_with(Backend::Sqlite, TestOptions::default(), stripe_at(stripe.base(), 0)).await.unwrap();
    let token = token_for(&app, "trial-user", Some("cus_trial"), false);
    assert!(allocate(&app, &token).await.is_ok());
    let account = accounts(&app, &token).get_account(GetAccountRequest {}).await.unwrap().into_inner();
    assert_eq!(account.subscription_status, "trialing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billing_url_is_checkout_for_newcomers_and_portal_for_subscribers() {
    let stripe = RecordedStripe::start().await.unwrap();
    stripe.answer_subscriptions_with(RECORDED_EMPTY_LIST);
    let app =
        TestApp::spawn_with(Backend::Postgres, TestOptions::default(), stripe_at(stripe.base(), 0)).await.unwrap();
    let token = token_for(&app, "buyer", None, false);
    let mut client = accounts(&app, &token);
    let request = || GetBillingUrlRequest { return_url: "https://app.switchboard.test/billing-done".into() };

    let checkout = client.get_billing_url(request()).await.unwrap().into_inner();
    assert_eq!(checkout.kind, Kind::Checkout as i32);
    assert_eq!(checkout.url, "https://checkout.stripe.com/c/pay/cs_test_a1RecordedCheckout");
    let form = stripe.bodies("/v1/checkout/sessions").pop().unwrap();
    for expected in [
        "customer=cus_recorded",
        "mode=subscription",
        "price_streaming_monthly",
        "subscription_data[trial_period_days]=14",
    ] {
        assert!(form.contains(expected), "{expected} in {form}");
    }
    assert_eq!(app.store.get_user("buyer").await.unwrap().unwrap().stripe_customer_id.as_deref(), Some("cus_recorded"));

    // Subscribed now: the portal, and no second customer.
    stripe.answer_subscriptions_with(switchboard_tests::stripe::RECORDED_TRIALING_LIST);
    let portal = client.get_billing_url(request()).await.unwrap().into_inner();
    assert_eq!(portal.kind, Kind::Portal as i32);
    assert_eq!(portal.url, "https://billing.stripe.com/p/session/test_RecordedPortal");
    assert!(stripe.bodies("/v1/billing_portal/sessions").pop().unwrap().contains("customer=cus_recorded"));
    assert_eq!(stripe.bodies("/v1/customers").len(), 1, "the customer is remembered");

    let bad =
        client.get_billing_url(GetBillingUrlRequest { return_url: "javascript:alert(1)".into() }).await.unwrap_err();
    assert_eq!(reason(&bad), "INVALID_REQUEST");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_is_created_in_stripe_and_remembered() {
    let stripe = Localstripe::start().await.unwrap();
    let app =
        TestApp::spawn_with(Backend::Sqlite, TestOptions::default(), stripe_at(stripe.base.clone(), 0)).await.unwrap();
    let token = token_for(&app, "newcomer", None, false);
    // The emulator has no Checkout, so the URL itself fails; the customer must exist all the same.
    let status = accounts(&app, &token)
        .get_billing_url(GetBillingUrlRequest { return_url: "https://x.test/".into() })
        .await
        .unwrap_err();
    assert_eq!((status.code(), reason(&status)), (Code::Unavailable, "BILLING_UNAVAILABLE"));
    let customer = app.store.get_user("newcomer").await.unwrap().unwrap().stripe_customer_id.unwrap();
    assert!(customer.starts_with("cus_"));
    assert!(stripe.customer_exists(&customer).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_update_the_status_and_forgeries_are_refused() {
    let stripe = Localstripe::start().await.unwrap();
    let customer = stripe.customer_with_card().await.unwrap();
    stripe.subscribe(&customer).await.unwrap();
    // A long TTL: after the first lookup only a webhook can change what the server believes.
    let hosts = vec![switchboard_tests::HostSpec::new("host-1", "us-east-1", 4)];
    let options = TestOptions { hosts, ..Default::default() };
    let app = TestApp::spawn_with(Backend::Sqlite, options, stripe_at(stripe.base.clone(), 3_600)).await.unwrap();
    let token = token_for(&app, "payer", Some(&customer), false);
    assert!(allocate(&app, &token).await.is_ok());

    let http = reqwest::Client::new();
    let url = format!("{}/stripe/webhook", app.endpoint);
    let event = |id: &str, kind: &str, status: &str| {
        serde_json::json!({ "id": id, "object": "event", "type": kind,
            "data": { "object": { "object": "subscription", "customer": customer, "status": status } } })
        .to_string()
    };
    let post = |body: String, signature: Option<String>| {
        let mut request = http.post(&url).body(body).header("content-type", "application/json");
        if let Some(signature) = signature {
            request = request.header("stripe-signature", signature);
        }
        request.send()
    };
    let now = chrono::Utc::now().timestamp();

    // Forgeries first: none of them may grant or revoke anything.
    let forged = event("evt_forged", "customer.subscription.deleted", "canceled");
    assert_eq!(post(forged.clone(), None).await.unwrap().status(), 400, "unsigned");
    assert_eq!(
        post(forged.clone(), Some(sign_webhook("whsec_wrong", now, &forged))).await.unwrap().status(),
        400,
        "wrong secret"
    );
    assert_eq!(
        post(forged.clone(), Some(sign_webhook(WEBHOOK_SECRET, now - 3_600, &forged))).await.unwrap().status(),
        400,
        "stale"
    );
    let tampered = forged.replace("canceled", "paused");
    assert_eq!(
        post(tampered, Some(sign_webhook(WEBHOOK_SECRET, now, &forged))).await.unwrap().status(),
        400,
        "tampered body"
    );
    let still = allocate(&app, &token).await;
    assert!(still.is_ok(), "still a subscriber: {still:?}");

    // A genuine cancellation takes effect at once (the emulator still says active).
    let genuine = event("evt_cancel_1", "customer.subscription.deleted", "canceled");
    let signature = sign_webhook(WEBHOOK_SECRET, now, &genuine);
    assert_eq!(post(genuine.clone(), Some(signature.clone())).await.unwrap().status(), 200);
    let refused = allocate(&app, &token).await.unwrap_err();
    assert_eq!(reason(&refused), "SUBSCRIPTION_REQUIRED");
    // Replaying it is refused.
    assert_eq!(post(genuine, Some(signature)).await.unwrap().status(), 400, "replay");

    // A renewal brings access back.
    let renewed = event("evt_renew_1", "customer.subscription.updated", "active");
    assert_eq!(post(renewed.clone(), Some(sign_webhook(WEBHOOK_SECRET, now, &renewed))).await.unwrap().status(), 200);
    let back = allocate(&app, &token).await;
    assert!(back.is_ok(), "{back:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripe_down_uses_a_recent_status_or_fails_clearly() {
    // A port nobody listens on.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let app = TestApp::spawn_with(Backend::Sqlite, TestOptions::default(), stripe_at(closed, 0)).await.unwrap();
    let token = token_for(&app, "payer", Some("cus_unknown_to_cache"), false);
    let mut request = tonic::Request::new(chrome_in_us_east());
    request.set_timeout(Duration::from_secs(5));
    let status = app.allocation_client(Some(&token)).allocate(request).await.unwrap_err();
    assert_eq!((status.code(), reason(&status)), (Code::Unavailable, "BILLING_UNAVAILABLE"), "{status:?}");

    // With a status cached moments ago, a Stripe outage does not lock the user out.
    let stripe = RecordedStripe::start().await.unwrap();
    let app = TestApp::spawn_with(Backend::Sqlite, TestOptions::default(), stripe_at(stripe.base(), 0)).await.unwrap();
    let token = token_for(&app, "trial-user", Some("cus_trial"), false);
    assert!(allocate(&app, &token).await.is_ok());
    drop(stripe);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second = token_for(&app, "trial-user", Some("cus_trial"), false);
    assert!(allocate(&app, &second).await.is_ok(), "the cached trialing status still counts");
}

/// With Redis configured, replicas share cached statuses: a cancellation
/// webhook received by one replica is seen by the other at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_statuses_through_redis() {
    let stripe = Localstripe::start().await.unwrap();
    let customer = stripe.customer_with_card().await.unwrap();
    stripe.subscribe(&customer).await.unwrap();
    let shared = |base: String| {
        move |config: &mut Config| {
            stripe_at(base, 3_600)(config);
            config.redis.url = switchboard::config::Secret::new("redis://127.0.0.1:6379");
        }
    };
    let first =
        TestApp::spawn_with(Backend::Sqlite, TestOptions::default(), shared(stripe.base.clone())).await.unwrap();
    let second =
        TestApp::spawn_with(Backend::Sqlite, TestOptions::default(), shared(stripe.base.clone())).await.unwrap();
    // Both replicas trust the same issuer keys in production; here each test app has its own issuer.
    let on_first = token_for(&first, "payer", Some(&customer), false);
    let on_second = token_for(&second, "payer", Some(&customer), false);
    assert!(allocate(&first, &on_first).await.is_ok());
    assert!(allocate(&second, &on_second).await.is_ok());

    let now = chrono::Utc::now().timestamp();
    let event = serde_json::json!({ "id": format!("evt_redis_{customer}"), "object": "event", "type": "customer.subscription.deleted",
        "data": { "object": { "object": "subscription", "customer": customer, "status": "canceled" } } })
    .to_string();
    let response = reqwest::Client::new()
        .post(format!("{}/stripe/webhook", first.endpoint))
        .header("stripe-signature", sign_webhook(WEBHOOK_SECRET, now, &event))
        .body(event)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let refused = allocate(&second, &on_second).await.unwrap_err();
    assert_eq!(reason(&refused), "SUBSCRIPTION_REQUIRED", "the other replica saw the webhook through redis");
}
