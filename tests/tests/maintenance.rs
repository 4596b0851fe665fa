//! Maintenance mode: while on, Allocate is refused with UNAVAILABLE MAINTENANCE
//! and a retry hint, and everything else keeps working; replicas sharing Redis
//! all see a change within a second; with Redis down nothing crashes, setting
//! the flag fails clearly and allocations go on.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use switchboard::{config::Secret, error::RETRY_AFTER_METADATA_KEY, model::SessionState};
use switchboard_proto::v1::{GetMaintenanceRequest, ListHostsRequest, ReportDisconnectRequest, SetMaintenanceRequest};
use switchboard_tests::{
    Backend, HostSpec, TestApp, TestOptions,
    app::{chrome_in_us_east, eventually, reason},
    on_both_backends,
};
use tonic::Code;

fn on(reason: &str, retry_after_secs: u32) -> SetMaintenanceRequest {
    SetMaintenanceRequest { enabled: true, reason: reason.into(), retry_after_secs }
}

fn off() -> SetMaintenanceRequest {
    SetMaintenanceRequest { enabled: false, ..Default::default() }
}

/// A Redis namespace of this test's own: tests share one Redis server.
fn namespace() -> String {
    format!("switchboard-test-{}", uuid::Uuid::new_v4().simple())
}

async fn spawn_with_redis(url: &str, namespace: &str) -> TestApp {
    let (url, namespace) = (url.to_owned(), namespace.to_owned());
    TestApp::spawn_with(Backend::Sqlite, TestOptions::default(), move |config| {
        config.redis.url = Secret::new(url);
        config.redis.namespace = namespace;
    })
    .await
    .unwrap()
}

async fn maintenance_refuses_allocations_and_nothing_else(backend: Backend) {
    let mut app = TestApp::spawn(backend, TestOptions::default()).await.unwrap();
    let admin_token = app.admin_token();
    let mut admin = app.admin_client(Some(&admin_token));
    let running = app.user_client("before").allocate(chrome_in_us_east()).await.unwrap().into_inner();

    let status = admin.set_maintenance(on("deploy 42", 120)).await.unwrap().into_inner();
    assert!(status.enabled);
    assert_eq!((status.reason.as_str(), status.retry_after_secs, status.set_by.as_str()), ("deploy 42", 120, "admin"));
    assert!(status.since.is_some());

    let refused = app.user_client("during").allocate(chrome_in_us_east()).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);
    assert_eq!(reason(&refused), "MAINTENANCE");
    assert!(refused.message().contains("deploy 42") && refused.message().contains("120 s"), "{}", refused.message());
    let hint = refused.metadata().get(RETRY_AFTER_METADATA_KEY).and_then(|v| v.to_str().ok());
    assert_eq!(hint, Some("120"));
    assert_eq!(refused.metadata().get("grpc-retry-pushback-ms").and_then(|v| v.to_str().ok()), Some("120000"));
    assert_eq!(app.store.list_sessions(&Default::default()).await.unwrap().len(), 1, "no session was created");

    // Admin RPCs, host streams and disconnect reports keep working.
    assert!(admin.get_maintenance(GetMaintenanceRequest {}).await.unwrap().into_inner().enabled);
    assert_eq!(admin.list_hosts(ListHostsRequest::default()).await.unwrap().into_inner().hosts.len(), 1);
    app.add_host(HostSpec::new("host-2", "us-east-1", 2)).await.unwrap();
    let token = app.host("host-1").unwrap().2.token_of(&running.mandelbox_id).unwrap();
    app.session_events_client()
        .report_disconnect(ReportDisconnectRequest { mandelbox_id: running.mandelbox_id.clone(), token })
        .await
        .unwrap();
    assert_eq!(app.session(&running.session_id).await.unwrap().state, SessionState::Ended);

    let cleared = admin.set_maintenance(off()).await.unwrap().into_inner();
    assert!(!cleared.enabled);
    app.user_client("after").allocate(chrome_in_us_east()).await.unwrap();
}

async fn bad_maintenance_requests_are_refused(backend: Backend) {
    let app =
        TestApp::spawn(backend, TestOptions { hosts: vec![], wait_warm: false, ..Default::default() }).await.unwrap();
    let admin_token = app.admin_token();
    let mut admin = app.admin_client(Some(&admin_token));
    let too_long = admin.set_maintenance(on(&"x".repeat(513), 60)).await.unwrap_err();
    assert_eq!((too_long.code(), reason(&too_long)), (Code::InvalidArgument, "INVALID_REQUEST"));
    let too_late = admin.set_maintenance(on("deploy", 2 * 24 * 3600)).await.unwrap_err();
    assert_eq!((too_late.code(), reason(&too_late)), (Code::InvalidArgument, "INVALID_REQUEST"));
    let user_token = app.user_token("mallory");
    let forbidden = app.admin_client(Some(&user_token)).set_maintenance(on("mine", 60)).await.unwrap_err();
    assert_eq!((forbidden.code(), reason(&forbidden)), (Code::PermissionDenied, "FORBIDDEN"));
    assert!(!admin.get_maintenance(GetMaintenanceRequest {}).await.unwrap().into_inner().enabled);
}

on_both_backends!(maintenance_refuses_allocations_and_nothing_else, bad_maintenance_requests_are_refused);

/// Set on one replica, seen by the other within a second, and back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_sees_a_change_within_a_second() {
    let namespace = namespace();
    let first = spawn_with_redis("redis://127.0.0.1:6379", &namespace).await;
    let second = spawn_with_redis("redis://127.0.0.1:6379", &namespace).await;
    let first_admin = first.admin_token();
    let second_admin = second.admin_token();

    let set_at = Instant::now();
    first.admin_client(Some(&first_admin)).set_maintenance(on("deploy", 30)).await.unwrap();
    eventually(Duration::from_secs(1), async || {
        Ok(second.user_client("u").allocate(chrome_in_us_east()).await.is_err_and(|e| reason(&e) == "MAINTENANCE"))
    })
    .await
    .unwrap();
    let seen_after = set_at.elapsed();
    assert!(
        second
            .admin_client(Some(&second_admin))
            .get_maintenance(GetMaintenanceRequest {})
            .await
            .unwrap()
            .into_inner()
            .enabled
    );
    println!("maintenance seen by the other replica after {seen_after:?}");

    second.admin_client(Some(&second_admin)).set_maintenance(off()).await.unwrap();
    eventually(Duration::from_secs(1), async || Ok(first.user_client("v").allocate(chrome_in_us_east()).await.is_ok()))
        .await
        .unwrap();
    // A replica that starts during maintenance starts in it.
    first.admin_client(Some(&first_admin)).set_maintenance(on("deploy", 30)).await.unwrap();
    let late = spawn_with_redis("redis://127.0.0.1:6379", &namespace).await;
    let refused = late.user_client("w").allocate(chrome_in_us_east()).await.unwrap_err();
    assert_eq!(reason(&refused), "MAINTENANCE");
}

/// Redis unreachable: setting fails with a clear reason, allocations go on,
/// nothing crashes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_setting_fails_clearly_and_allocations_go_on() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let app = spawn_with_redis(&format!("redis://127.0.0.1:{closed}"), &namespace()).await;
    let admin_token = app.admin_token();
    let refused = app.admin_client(Some(&admin_token)).set_maintenance(on("deploy", 30)).await.unwrap_err();
    assert_eq!((refused.code(), reason(&refused)), (Code::Unavailable, "REDIS_UNAVAILABLE"));
    app.user_client("u").allocate(chrome_in_us_east()).await.unwrap();
    assert!(
        !app.admin_client(Some(&admin_token))
            .get_maintenance(GetMaintenanceRequest {})
            .await
            .unwrap()
            .into_inner()
            .enabled
    );
}
