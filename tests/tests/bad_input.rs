//! Bad input from every kind of caller gets a clear error with a stable
//! reason, and changes nothing. On PostgreSQL and SQLite.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use switchboard::{
    auth::dev_issuer::DevIssuer,
    model::{MandelboxState, SessionState},
};
use switchboard_proto::v1::{
    AllocateRequest, EndSessionRequest, GetSessionRequest, Heartbeat, Hello, HostMessage, ListHostsRequest,
    ReportDisconnectRequest, host_message, host_service_client::HostServiceClient,
};
use switchboard_tests::{Backend, TestApp, TestOptions, app::reason, on_both_backends};
use tonic::Code;

fn request() -> AllocateRequest {
    AllocateRequest {
        regions: vec!["us-east-1".into()],
        app: "chrome".into(),
        client_version: "1.0.0".into(),
        client_data_json: "{}".into(),
        config_encryption_token: String::new(),
    }
}

/// Row counts that no refused call may change. (Users are not among them: an
/// authenticated call registers its user even when it is refused.)
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    sessions: i64,
    live_sessions: i64,
    mandelboxes: i64,
    waiting: i64,
    hosts: i64,
}

async fn snapshot(app: &TestApp) -> Snapshot {
    Snapshot {
        sessions: app.db.query_i64("SELECT count(*) FROM sessions").await.unwrap(),
        live_sessions: app.db.query_i64("SELECT count(*) FROM sessions WHERE state <> 'ENDED'").await.unwrap(),
        mandelboxes: app.db.query_i64("SELECT count(*) FROM mandelboxes").await.unwrap(),
        waiting: app.db.query_i64("SELECT count(*) FROM mandelboxes WHERE state = 'WAITING'").await.unwrap(),
        hosts: app.db.query_i64("SELECT count(*) FROM hosts").await.unwrap(),
    }
}

fn assert_refused(result: Result<impl std::fmt::Debug, tonic::Status>, code: Code, expected_reason: &str) {
    let status = result.expect_err("the call should have been refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(reason(&status), expected_reason, "{status:?}");
    assert!(status.message().starts_with(expected_reason), "message names the reason: {:?}", status.message());
}

async fn allocate_refuses_bad_requests(backend: Backend) {
    let options =
        TestOptions { regions: vec![("us-east-1".into(), true), ("eu-north-1".into(), false)], ..Default::default() };
    let app = TestApp::spawn(backend, options).await.unwrap();
    let before = snapshot(&app).await;
    let mut client = app.user_client("mallory");

    let cases: Vec<(AllocateRequest, Code, &str)> = vec![
        (AllocateRequest { regions: vec![], ..request() }, Code::InvalidArgument, "INVALID_REQUEST"),
        (AllocateRequest { regions: vec!["mars-1".into()], ..request() }, Code::InvalidArgument, "UNKNOWN_REGION"),
        (
            AllocateRequest { regions: vec!["eu-north-1".into()], ..request() },
            Code::FailedPrecondition,
            "REGION_NOT_ENABLED",
        ),
        (
            AllocateRequest { regions: vec!["Robert'); DROP TABLE hosts;--".into()], ..request() },
            Code::InvalidArgument,
            "INVALID_REQUEST",
        ),
        (
            AllocateRequest { regions: (0..100).map(|i| format!("r{i}")).collect(), ..request() },
            Code::InvalidArgument,
            "INVALID_REQUEST",
        ),
        (AllocateRequest { app: String::new(), ..request() }, Code::InvalidArgument, "INVALID_REQUEST"),
        (AllocateRequest { client_version: "latest".into(), ..request() }, Code::InvalidArgument, "INVALID_REQUEST"),
        (AllocateRequest { client_version: "0.9.9".into(), ..request() }, Code::FailedPrecondition, "CLIENT_OUTDATED"),
        (
            AllocateRequest { client_data_json: "not json".into(), ..request() },
            Code::InvalidArgument,
            "INVALID_REQUEST",
        ),
        (AllocateRequest { client_data_json: "[1]".into(), ..request() }, Code::InvalidArgument, "INVALID_REQUEST"),
        (
            AllocateRequest { client_data_json: format!(r#"{{"blob":"{}"}}"#, "x".repeat(64 * 1024)), ..request() },
            Code::InvalidArgument,
            "INVALID_REQUEST",
        ),
    ];
    for (bad, code, expected) in cases {
        assert_refused(client.allocate(bad).await, code, expected);
    }
    assert_eq!(snapshot(&app).await, before, "a refused allocation changed the database");
}

async fn bad_tokens_are_refused(backend: Backend) {
    let app = TestApp::spawn(backend, TestOptions::default()).await.unwrap();
    let before = snapshot(&app).await;
    // No token at all.
    assert_refused(app.allocation_client(None).allocate(request()).await, Code::Unauthenticated, "UNAUTHENTICATED");
    // Garbage.
    assert_refused(
        app.allocation_client(Some("not.a.jwt")).allocate(request()).await,
        Code::Unauthenticated,
        "UNAUTHENTICATED",
    );
    // A well-formed token from an issuer the server does not trust.
    let stranger = DevIssuer::generate("https://switchboard.dev.local/", "switchboard").unwrap();
    let forged = stranger.issue("mallory", None, &["admin"], Duration::from_secs(60)).unwrap();
    assert_refused(
        app.allocation_client(Some(&forged)).allocate(request()).await,
        Code::Unauthenticated,
        "UNAUTHENTICATED",
    );
    assert_refused(
        app.admin_client(Some(&forged)).list_hosts(ListHostsRequest::default()).await,
        Code::Unauthenticated,
        "UNAUTHENTICATED",
    );
    // A tampered payload with the original signature.
    let genuine = app.user_token("alice");
    let mut parts: Vec<String> = genuine.split('.').map(str::to_owned).collect();
    parts[1] = parts[1].chars().rev().collect();
    assert_refused(
        app.allocation_client(Some(&parts.join("."))).allocate(request()).await,
        Code::Unauthenticated,
        "UNAUTHENTICATED",
    );
    // A valid user without the admin scope.
    let user = app.user_token("alice");
    assert_refused(
        app.admin_client(Some(&user)).list_hosts(ListHostsRequest::default()).await,
        Code::PermissionDenied,
        "FORBIDDEN",
    );
    assert_eq!(snapshot(&app).await, before);
}

async fn sessions_are_private_and_ids_checked(backend: Backend) {
    let app = TestApp::spawn(backend, TestOptions::default()).await.unwrap();
    let session = app.user_client("alice").allocate(request()).await.unwrap().into_inner();
    let before = snapshot(&app).await;
    let mut eve = app.user_client("eve");
    assert_refused(
        eve.get_session(GetSessionRequest { session_id: "42".into() }).await,
        Code::InvalidArgument,
        "INVALID_REQUEST",
    );
    assert_refused(
        eve.get_session(GetSessionRequest { session_id: uuid::Uuid::new_v4().to_string() }).await,
        Code::NotFound,
        "SESSION_NOT_FOUND",
    );
    // Another user's session is indistinguishable from a missing one.
    assert_refused(
        eve.get_session(GetSessionRequest { session_id: session.session_id.clone() }).await,
        Code::NotFound,
        "SESSION_NOT_FOUND",
    );
    assert_refused(
        eve.end_session(EndSessionRequest { session_id: session.session_id.clone() }).await,
        Code::NotFound,
        "SESSION_NOT_FOUND",
    );
    assert_eq!(app.session(&session.session_id).await.unwrap().state, SessionState::Running);
    assert_eq!(snapshot(&app).await, before);
}

async fn disconnect_tokens_are_checked_and_single_use(backend: Backend) {
    let app = TestApp::spawn(backend, TestOptions::default()).await.unwrap();
    let session = app.user_client("alice").allocate(request()).await.unwrap().into_inner();
    let token = app.host("host-1").unwrap().2.token_of(&session.mandelbox_id).unwrap();
    let mut events = app.session_events_client();
    let before = snapshot(&app).await;

    let report = |mandelbox_id: &str, token: &str| ReportDisconnectRequest {
        mandelbox_id: mandelbox_id.into(),
        token: token.into(),
    };
    assert_refused(
        events.report_disconnect(report("not-a-uuid", &token)).await,
        Code::InvalidArgument,
        "INVALID_REQUEST",
    );
    assert_refused(
        events.report_disconnect(report(&session.mandelbox_id, "wrong")).await,
        Code::PermissionDenied,
        "BAD_MANDELBOX_TOKEN",
    );
    // Another box's valid token does not work on this one.
    let other = app.store.host_mandelboxes("host-1", &[MandelboxState::Waiting]).await.unwrap();
    let other_token = app.host("host-1").unwrap().2.token_of(&other[0].id.to_string()).unwrap();
    assert_refused(
        events.report_disconnect(report(&session.mandelbox_id, &other_token)).await,
        Code::PermissionDenied,
        "BAD_MANDELBOX_TOKEN",
    );
    // A warm box has no session to end.
    assert_refused(
        events.report_disconnect(report(&other[0].id.to_string(), &other_token)).await,
        Code::FailedPrecondition,
        "MANDELBOX_NOT_ASSIGNED",
    );
    assert_eq!(snapshot(&app).await, before, "nothing was torn down");
    assert_eq!(app.session(&session.session_id).await.unwrap().state, SessionState::Running);

    // The right token ends the session, once.
    let ended = events.report_disconnect(report(&session.mandelbox_id, &token)).await.unwrap().into_inner();
    assert_eq!(ended.session_id, session.session_id);
    assert_eq!(app.session(&session.session_id).await.unwrap().state, SessionState::Ended);
    assert_refused(
        events.report_disconnect(report(&session.mandelbox_id, &token)).await,
        Code::PermissionDenied,
        "BAD_MANDELBOX_TOKEN",
    );
}

fn hello(host_id: &str, credential: &str) -> HostMessage {
    HostMessage {
        body: Some(host_message::Body::Hello(Hello {
            host_id: host_id.into(),
            region: "us-east-1".into(),
            image: "dev".into(),
            agent_version: "test".into(),
            capacity: 2,
            address: "127.0.0.1".into(),
            mandelboxes: vec![],
            credential: credential.into(),
        })),
    }
}

/// Opens a host stream that sends `messages` and then stays open; returns the
/// status that ended it.
async fn host_stream_error(app: &TestApp, messages: Vec<HostMessage>) -> tonic::Status {
    let (sender, receiver) = tokio::sync::mpsc::channel(8);
    for message in messages {
        sender.send(message).await.unwrap();
    }
    let mut client = HostServiceClient::new(app.channel.clone());
    let result = client.connect(tokio_stream::wrappers::ReceiverStream::new(receiver)).await;
    let status = match result {
        Err(status) => status,
        Ok(response) => {
            let mut inbound = response.into_inner();
            loop {
                match inbound.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("stream ended without an error"),
                    Err(status) => break status,
                }
            }
        }
    };
    drop(sender);
    status
}

async fn hosts_must_introduce_themselves_properly(backend: Backend) {
    let app = TestApp::spawn(backend, TestOptions::default()).await.unwrap();
    let before = snapshot(&app).await;
    let generation = app.store.get_host("host-1").await.unwrap().unwrap().generation;

    let heartbeat = HostMessage { body: Some(host_message::Body::Heartbeat(Heartbeat::default())) };
    let status = host_stream_error(&app, vec![heartbeat]).await;
    assert_eq!((status.code(), reason(&status)), (Code::InvalidArgument, "HELLO_REQUIRED"), "{status:?}");

    let status = host_stream_error(&app, vec![]).await;
    assert_eq!((status.code(), reason(&status)), (Code::DeadlineExceeded, "HELLO_TIMEOUT"), "{status:?}");

    // A host with a valid credential of its own claims host-1's id.
    let evil_credential = app.credentials.issue("evil-host");
    let status = host_stream_error(&app, vec![hello("host-1", &evil_credential)]).await;
    assert_eq!((status.code(), reason(&status)), (Code::Unauthenticated, "BAD_HOST_CREDENTIAL"), "{status:?}");

    // A user token is not a host credential.
    let status = host_stream_error(&app, vec![hello("host-9", &app.user_token("alice"))]).await;
    assert_eq!((status.code(), reason(&status)), (Code::Unauthenticated, "BAD_HOST_CREDENTIAL"), "{status:?}");

    let status = host_stream_error(&app, vec![hello("", "x")]).await;
    assert_eq!((status.code(), reason(&status)), (Code::InvalidArgument, "INVALID_REQUEST"), "{status:?}");

    let mut unknown_region = hello("host-7", &app.credentials.issue("host-7"));
    if let Some(host_message::Body::Hello(hello)) = &mut unknown_region.body {
        hello.region = "mars-1".into();
    }
    let status = host_stream_error(&app, vec![unknown_region]).await;
    assert_eq!((status.code(), reason(&status)), (Code::InvalidArgument, "UNKNOWN_REGION"), "{status:?}");

    // The real host-1 was not disturbed.
    let host = app.store.get_host("host-1").await.unwrap().unwrap();
    assert_eq!(host.generation, generation);
    assert!(app.host("host-1").unwrap().1.status().borrow().connected);
    assert_eq!(snapshot(&app).await, before);
}

on_both_backends!(
    allocate_refuses_bad_requests,
    bad_tokens_are_refused,
    sessions_are_private_and_ids_checked,
    disconnect_tokens_are_checked_and_single_use,
    hosts_must_introduce_themselves_properly,
);

/// The fleet page's data needs an admin token, answered as plain HTTP.
mod fleet_page {
    use switchboard_tests::{Backend, TestApp, TestOptions};

    async fn get(app: &TestApp, path: &str, token: Option<&str>) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        let auth = token.map(|t| format!("authorization: Bearer {t}\r\n")).unwrap_or_default();
        let request = format!("GET {path} HTTP/1.1\r\nhost: test\r\n{auth}connection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let status = response.split_whitespace().nth(1).unwrap().parse().unwrap();
        let body = response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default();
        (status, body)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fleet_data_needs_an_admin() {
        let app = TestApp::spawn(Backend::Sqlite, TestOptions::default()).await.unwrap();
        let (status, page) = get(&app, "/fleet", None).await;
        assert_eq!(status, 200);
        assert!(page.contains("Switchboard fleet"));
        let (status, body) = get(&app, "/fleet/api/hosts", None).await;
        assert_eq!(status, 401);
        assert!(body.contains("UNAUTHENTICATED"), "{body}");
        let (status, body) = get(&app, "/fleet/api/hosts", Some(&app.user_token("alice"))).await;
        assert_eq!(status, 403);
        assert!(body.contains("FORBIDDEN"), "{body}");
        let (status, body) = get(&app, "/fleet/api/hosts", Some(&app.admin_token())).await;
        assert_eq!(status, 200, "{body}");
        let json = body.lines().find(|line| line.starts_with('{')).unwrap_or(&body).to_owned();
        let fleet: serde_json::Value = serde_json::from_str(&json).unwrap_or_else(|_| panic!("not JSON: {body}"));
        let hosts = fleet["hosts"].as_array().unwrap();
        assert_eq!(hosts.len(), 1);
        assert_eq!(hosts[0]["host_id"], "host-1");
        assert_eq!(hosts[0]["warm"], 2);
        assert_eq!(hosts[0]["connected"], true);
    }

    /// `/metrics` is the operator's, like the fleet's data; what it counts
    /// is what Allocate did, phase by phase.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn metrics_need_an_admin_and_count_each_allocate_phase() {
        let app = TestApp::spawn(Backend::Sqlite, TestOptions::default()).await.unwrap();
        let (status, body) = get(&app, "/metrics", None).await;
        assert_eq!(status, 401, "{body}");
        let (status, body) = get(&app, "/metrics", Some(&app.user_token("alice"))).await;
        assert_eq!(status, 403, "{body}");
        app.user_client("alice").allocate(super::request()).await.unwrap();
        let refused = app.user_client("bob").allocate(super::AllocateRequest::default()).await;
        assert!(refused.is_err());
        let (status, body) = get(&app, "/metrics", Some(&app.admin_token())).await;
        assert_eq!(status, 200, "{body}");
        let count = |series: &str| {
            body.lines()
                .find_map(|line| line.strip_prefix(series)?.trim().parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no {series} in {body}"))
        };
        // Both calls passed the policy and reached the handler; only the
        // valid one was checked through to a claim and an assignment.
        let phase = |name: &str| count(&format!("switchboard_allocate_phase_seconds_count{{phase=\"{name}\"}}"));
        assert_eq!(phase("auth"), 2);
        assert_eq!(phase("handler"), 2);
        assert_eq!(phase("checks"), 1);
        assert_eq!(phase("claim"), 1);
        assert_eq!(phase("assign"), 1);
        assert_eq!(count("switchboard_claim_batches_total"), 1);
        assert_eq!(count("switchboard_claims_batched_total"), 1);
        assert_eq!(count("switchboard_claim_batch_seconds_bucket{writer=\"claims\",le=\"+Inf\"}"), 1);
        // The host's round trips: one Assign, and the spawns that warmed its two boxes.
        let command = |kind: &str| count(&format!("switchboard_host_command_seconds_count{{kind=\"{kind}\"}}"));
        assert_eq!(command("assign"), 1);
        assert!(command("spawn") >= 2, "{body}");
        assert_eq!(command("teardown"), 0);
        assert_eq!(count("switchboard_host_command_failures_total{kind=\"assign\"}"), 0);
    }
}
