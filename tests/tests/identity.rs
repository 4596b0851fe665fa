//! Access control with a real (local) OIDC tenant: every kind of bad token is
//! refused with a clear message, keys rotate without a restart, a flood of
//! unknown key ids cannot hammer the tenant, registration is race-free.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use switchboard::auth::dev_issuer::DevIssuer;
use switchboard_proto::v1::{GetAccountRequest, ListHostsRequest, account_service_client::AccountServiceClient};
use switchboard_tests::{
    Backend, TestApp, TestOptions,
    app::{Bearer, chrome_in_us_east, reason},
    jwks::JwksServer,
};
use tonic::Code;

const AUDIENCE: &str = "https://api.switchboard.test";

struct Tenant {
    server: JwksServer,
    key: DevIssuer,
}

async fn tenant() -> Tenant {
    // The issuer URL must be the tenant's address, so start with a placeholder key.
    let placeholder = DevIssuer::generate("x", AUDIENCE).unwrap();
    let server = JwksServer::start(serde_json::to_value(placeholder.jwks()).unwrap()).await.unwrap();
    let key = DevIssuer::generate(&server.issuer(), AUDIENCE).unwrap();
    server.set_jwks(serde_json::to_value(key.jwks()).unwrap());
    Tenant { server, key }
}

async fn app_for(tenant: &Tenant, min_refresh_ms: u64) -> TestApp {
    let (issuer, jwks_url) = (tenant.server.issuer(), tenant.server.jwks_url());
    TestApp::spawn_with(Backend::Sqlite, TestOptions::default(), move |config| {
        config.auth.issuer = issuer;
        config.auth.audience = AUDIENCE.into();
        config.auth.jwks_url = jwks_url;
        config.auth.jwks_min_refresh_interval_ms = min_refresh_ms;
    })
    .await
    .unwrap()
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn claims(issuer: &str, subject: &str) -> serde_json::Value {
    serde_json::json!({ "iss": issuer, "aud": AUDIENCE, "sub": subject, "iat": now(), "exp": now() + 600 })
}

fn b64(value: &serde_json::Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap())
}

async fn account(app: &TestApp, token: &str) -> Result<switchboard_proto::v1::Account, tonic::Status> {
    let bearer = Bearer::new(Some(token));
    let mut client = AccountServiceClient::with_interceptor(app.channel.clone(), bearer);
    client.get_account(GetAccountRequest {}).await.map(|response| response.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_token_is_refused_with_a_clear_message() {
    let tenant = tenant().await;
    let app = app_for(&tenant, 30_000).await;
    let issuer = tenant.server.issuer();
    let good = tenant.key.sign(&claims(&issuer, "alice")).unwrap();
    assert_eq!(account(&app, &good).await.unwrap().user_id, "alice", "a valid token passes");

    let mut cases: Vec<(&str, String, &str)> = Vec::new();
    let mut expired = claims(&issuer, "alice");
    expired["exp"] = (now() - 3_600).into();
    cases.push(("expired", tenant.key.sign(&expired).unwrap(), "expired"));
    let mut early = claims(&issuer, "alice");
    early["nbf"] = (now() + 3_600).into();
    cases.push(("not yet valid", tenant.key.sign(&early).unwrap(), "not valid yet"));
    cases.push(("other issuer", tenant.key.sign(&claims("https://evil.example/", "alice")).unwrap(), "issuer"));
    let mut other_audience = claims(&issuer, "alice");
    other_audience["aud"] = "https://someone-else".into();
    cases.push(("other audience", tenant.key.sign(&other_audience).unwrap(), "audience"));
    let stranger = DevIssuer::generate(&issuer, AUDIENCE).unwrap();
    cases.push(("unknown key", stranger.sign(&claims(&issuer, "alice")).unwrap(), "unknown key"));
    let parts: Vec<&str> = good.split('.').collect();
    let mut admin = claims(&issuer, "alice");
    admin["scope"] = "admin".into();
    cases.push(("tampered", format!("{}.{}.{}", parts[0], b64(&admin), parts[2]), "signature"));
    let none_header = serde_json::json!({ "alg": "none", "typ": "JWT", "kid": tenant.key.kid() });
    cases.push(("alg none", format!("{}.{}.", b64(&none_header), b64(&claims(&issuer, "alice"))), "malformed"));
    // HS256 "signed" with the RSA public key, the classic confusion attack.
    let hs_header = serde_json::json!({ "alg": "HS256", "typ": "JWT", "kid": tenant.key.kid() });
    let signing_input = format!("{}.{}", b64(&hs_header), b64(&claims(&issuer, "alice")));
    let mut mac = Hmac::<Sha256>::new_from_slice(tenant.key.public_key_pem().as_bytes()).unwrap();
    mac.update(signing_input.as_bytes());
    let confused = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()));
    cases.push(("hs256 confusion", confused, "algorithm"));
    cases.push(("garbage", "not-a-token".into(), "malformed"));

    for (name, token, expected) in cases {
        let status = account(&app, &token).await.expect_err(name);
        assert_eq!(status.code(), Code::Unauthenticated, "{name}: {status:?}");
        assert_eq!(reason(&status), "UNAUTHENTICATED", "{name}");
        assert!(status.message().contains(expected), "{name}: {:?} should mention {expected:?}", status.message());
    }
    // None of them registered anyone but alice.
    assert_eq!(app.db.query_i64("SELECT count(*) FROM users").await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_is_accepted_without_restart() {
    let tenant = tenant().await;
    let app = app_for(&tenant, 0).await;
    let issuer = tenant.server.issuer();
    assert!(account(&app, &tenant.key.sign(&claims(&issuer, "alice")).unwrap()).await.is_ok());

    let rotated = DevIssuer::generate(&issuer, AUDIENCE).unwrap();
    tenant.server.set_jwks(serde_json::to_value(rotated.jwks()).unwrap());
    let fetches_before = tenant.server.fetches();
    let account = account(&app, &rotated.sign(&claims(&issuer, "bob")).unwrap()).await.unwrap();
    assert_eq!(account.user_id, "bob");
    assert_eq!(tenant.server.fetches(), fetches_before + 1, "one fetch found the new key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unknown_key_ids_fetches_the_jwks_at_most_once() {
    let tenant = tenant().await;
    let app = app_for(&tenant, 60_000).await;
    let issuer = tenant.server.issuer();
    let fetches_at_start = tenant.server.fetches();
    assert_eq!(fetches_at_start, 1, "the keys are fetched once at start-up");

    let attacker = DevIssuer::generate(&issuer, AUDIENCE).unwrap();
    let calls = (0..100).map(|i| {
        let token = attacker.sign_with_kid(&format!("forged-{i}"), &claims(&issuer, &format!("u{i}"))).unwrap();
        let app_channel = app.channel.clone();
        async move {
            let mut client = AccountServiceClient::with_interceptor(app_channel, Bearer::new(Some(&token)));
            client.get_account(GetAccountRequest {}).await
        }
    });
    let results = futures::future::join_all(calls).await;
    assert!(results.iter().all(|r| r.as_ref().err().map(|s| s.code()) == Some(Code::Unauthenticated)));
    assert!(
        tenant.server.fetches() <= fetches_at_start + 1,
        "{} fetches for 100 unknown key ids",
        tenant.server.fetches() - fetches_at_start
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_keys_survive_the_tenant_going_down() {
    let tenant = tenant().await;
    let app = app_for(&tenant, 0).await;
    let issuer = tenant.server.issuer();
    tenant.server.go_down();
    // An unknown key id makes the verifier try the (failing) tenant...
    let stranger = DevIssuer::generate(&issuer, AUDIENCE).unwrap();
    assert!(account(&app, &stranger.sign(&claims(&issuer, "eve")).unwrap()).await.is_err());
    // ...which does not cost the keys it already has.
    assert!(account(&app, &tenant.key.sign(&claims(&issuer, "alice")).unwrap()).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_found_through_openid_discovery() {
    let tenant = tenant().await;
    let issuer = tenant.server.issuer();
    let app = TestApp::spawn_with(Backend::Sqlite, TestOptions::default(), {
        let issuer = issuer.clone();
        move |config| {
            config.auth.issuer = issuer;
            config.auth.audience = AUDIENCE.into();
            config.auth.oidc_discovery = true;
        }
    })
    .await
    .unwrap();
    assert_eq!(account(&app, &tenant.key.sign(&claims(&issuer, "alice")).unwrap()).await.unwrap().user_id, "alice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scopes_come_from_scope_or_permissions() {
    let tenant = tenant().await;
    let app = app_for(&tenant, 30_000).await;
    let issuer = tenant.server.issuer();
    let mut with_permissions = claims(&issuer, "ops");
    with_permissions["permissions"] = serde_json::json!(["read:fleet", "admin"]);
    let mut with_scope = claims(&issuer, "ops2");
    with_scope["scope"] = "openid admin".into();
    let mut plain = claims(&issuer, "user");
    plain["scope"] = "openid profile".into();
    for (token_claims, allowed) in [(with_permissions, true), (with_scope, true), (plain, false)] {
        let token = tenant.key.sign(&token_claims).unwrap();
        let result = app.admin_client(Some(&token)).list_hosts(ListHostsRequest::default()).await;
        match allowed {
            true => assert!(result.is_ok(), "{result:?}"),
            false => assert_eq!(reason(&result.unwrap_err()), "FORBIDDEN"),
        }
    }
}

async fn registration_is_race_free(backend: Backend) {
    let app = TestApp::spawn(backend, TestOptions::default()).await.unwrap();
    let token = app.issuer.issue("newcomer", Some("new@example.com"), &[], Duration::from_secs(600)).unwrap();
    let calls = (0..50).map(|_| {
        // Separate connections, so the calls really arrive together.
        let endpoint = app.endpoint.clone();
        let token = token.clone();
        async move {
            let channel = tonic::transport::Endpoint::from_shared(endpoint).unwrap().connect().await.unwrap();
            AccountServiceClient::with_interceptor(channel, Bearer::new(Some(&token)))
                .get_account(GetAccountRequest {})
                .await
        }
    });
    let results = futures::future::join_all(calls).await;
    assert!(results.iter().all(Result::is_ok), "{:?}", results.iter().find(|r| r.is_err()));
    assert_eq!(app.db.query_i64("SELECT count(*) FROM users WHERE id = 'newcomer'").await.unwrap(), 1);
    let email = app.store.get_user("newcomer").await.unwrap().unwrap().email;
    assert_eq!(email.as_deref(), Some("new@example.com"));
}

async fn dev_billing_lets_everyone_allocate(backend: Backend) {
    let app = TestApp::spawn(backend, TestOptions::default()).await.unwrap();
    let token = app.user_token("dev-user");
    let account = account(&app, &token).await.unwrap();
    assert!(account.can_stream);
    assert_eq!(account.subscription_status, "active");
    assert!(account.billing_provider.starts_with("dev"));
    assert!(app.user_client("dev-user").allocate(chrome_in_us_east()).await.is_ok());
}

switchboard_tests::on_both_backends!(registration_is_race_free, dev_billing_lets_everyone_allocate);
