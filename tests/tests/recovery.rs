//! What Allocate and the fleet do when things go wrong underneath: a host that
//! does not confirm, no warm pool, a mandelbox that crashes.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use switchboard::model::{EndReason, MandelboxState, SessionState};
use switchboard_proto::v1::{AllocateRequest, SessionState as WireState};
use switchboard_tests::{Backend, HostSpec, TestApp, TestOptions, app::eventually, app::reason, on_both_backends};

fn request() -> AllocateRequest {
    switchboard_tests::app::chrome_in_us_east()
}

/// Host "a" is claimed first but never confirms: the claim is released, the
/// box on "a" is torn down, and the session runs on "b".
async fn unconfirmed_claim_moves_to_the_next_box(backend: Backend) {
    let hosts = vec![HostSpec::new("a", "us-east-1", 1), HostSpec::new("b", "us-east-1", 1)];
    let app = TestApp::spawn_with(backend, TestOptions { hosts, ..Default::default() }, |config| {
        config.allocation.assign_timeout_ms = 500;
    })
    .await
    .unwrap();
    app.host("a").unwrap().2.set_assign_delay(Duration::from_secs(30));
    let stuck_box = app.store.host_mandelboxes("a", &[MandelboxState::Waiting]).await.unwrap()[0].id;

    let response = app.user_client("alice").allocate(request()).await.unwrap().into_inner();
    assert_eq!(response.state, WireState::Running as i32);
    let session = app.session(&response.session_id).await.unwrap();
    assert_eq!(session.host_id.as_deref(), Some("b"), "the session moved to the host that answers");
    assert_ne!(response.mandelbox_id, stuck_box.to_string());
    // The box whose assignment was never confirmed is not handed out again.
    eventually(Duration::from_secs(5), async || {
        Ok(app
            .store
            .get_mandelbox(stuck_box)
            .await?
            .is_some_and(|m| !m.state.is_assigned() && m.state != MandelboxState::Waiting))
    })
    .await
    .unwrap();
}

/// Every host silent on Assign: the allocation fails cleanly and leaves nothing claimed.
async fn allocation_fails_cleanly_when_no_host_confirms(backend: Backend) {
    let hosts = vec![HostSpec::new("a", "us-east-1", 1)];
    let app = TestApp::spawn_with(backend, TestOptions { hosts, ..Default::default() }, |config| {
        config.allocation.assign_timeout_ms = 300;
        config.allocation.spawn_timeout_ms = 300;
    })
    .await
    .unwrap();
    app.host("a").unwrap().2.set_assign_delay(Duration::from_secs(30));
    match app.user_client("alice").allocate(request()).await {
        // The replacement of the torn-down box is warming: the session waits for it.
        Ok(response) => assert_eq!(response.get_ref().state, WireState::Pending as i32),
        Err(status) => {
            assert!(matches!(reason(&status), "NO_CAPACITY" | "ALLOCATION_TIMEOUT"), "unexpected refusal {status:?}")
        }
    }
    assert_eq!(app.db.query_i64("SELECT count(*) FROM sessions WHERE state = 'RUNNING'").await.unwrap(), 0);
    assert_eq!(app.count_boxes(MandelboxState::Running).await.unwrap(), 0);
}

/// With the warm pool off, Allocate spawns a box on a host with room and
/// waits for it; when every slot is used, NO_CAPACITY.
async fn spawns_on_demand_without_a_warm_pool(backend: Backend) {
    let hosts = vec![HostSpec::new("a", "us-east-1", 2)];
    let options = TestOptions { hosts, wait_warm: false, ..Default::default() };
    let app = TestApp::spawn_with(backend, options, |config| config.allocation.warm_pool = false).await.unwrap();
    assert_eq!(app.count_boxes(MandelboxState::Waiting).await.unwrap(), 0);
    let mut clients = Vec::new();
    for user in ["u1", "u2"] {
        let response = app.user_client(user).allocate(request()).await.unwrap().into_inner();
        assert_eq!(response.state, WireState::Running as i32);
        assert_eq!(response.session_key.len(), 32);
        let port = response.ports[0].port as u16;
        // Connected clients stay connected: closing would end the session.
        clients.push(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    }
    assert_eq!(app.count_boxes(MandelboxState::Running).await.unwrap(), 2);
    let status = app.user_client("u3").allocate(request()).await.unwrap_err();
    assert_eq!(reason(&status), "NO_CAPACITY");
    assert_eq!(app.count_boxes(MandelboxState::Waiting).await.unwrap(), 0, "nothing warmed in the background");
}

/// A mandelbox that crashes ends its session and its slot is warmed again.
async fn crashed_mandelbox_ends_its_session(backend: Backend) {
    let app = TestApp::spawn(backend, TestOptions::default()).await.unwrap();
    let response = app.user_client("alice").allocate(request()).await.unwrap().into_inner();
    app.host("host-1").unwrap().2.crash(&response.mandelbox_id).await.unwrap();
    let ended = app.wait_session(&response.session_id, SessionState::Ended, Duration::from_secs(5)).await.unwrap();
    assert_eq!(ended.end_reason, Some(EndReason::MandelboxExited));
    let crashed = uuid::Uuid::parse_str(&response.mandelbox_id).unwrap();
    assert_eq!(app.store.get_mandelbox(crashed).await.unwrap().unwrap().state, MandelboxState::Dead);
    app.wait_warm(2, Duration::from_secs(5)).await.unwrap();
}

on_both_backends!(
    unconfirmed_claim_moves_to_the_next_box,
    allocation_fails_cleanly_when_no_host_confirms,
    spawns_on_demand_without_a_warm_pool,
    crashed_mandelbox_ends_its_session,
);
