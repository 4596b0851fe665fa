//! Hosts that die, go silent or reconnect, on PostgreSQL and SQLite.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use switchboard::model::{EndReason, HostState, MandelboxState, SessionState};
use switchboard_proto::v1::{AllocateRequest, SessionState as WireState};
use switchboard_tests::{Backend, HostSpec, TestApp, TestOptions, app::eventually, on_both_backends};

fn request() -> AllocateRequest {
    switchboard_tests::app::chrome_in_us_east()
}

/// Heartbeats every 200 ms, 3 missed = unhealthy, 1 s reconnect grace: a dead
/// host's sessions must be over within a few intervals of that.
const DETECTION_BUDGET: Duration = Duration::from_secs(4);

async fn killed_host_loses_its_sessions(backend: Backend) {
    let app = TestApp::spawn(backend, TestOptions::default()).await.unwrap();
    let session = app.user_client("alice").allocate(request()).await.unwrap().into_inner();
    assert_eq!(session.state, WireState::Running as i32);
    let (_, agent, _) = app.host("host-1").unwrap();

    agent.kill();
    // The dropped stream is noticed at once...
    eventually(Duration::from_secs(2), async || Ok(app.host_state("host-1").await? == HostState::Disconnected))
        .await
        .unwrap();
    // ...and once the grace period passes the session is lost.
    let ended = app.wait_session(&session.session_id, SessionState::Ended, DETECTION_BUDGET).await.unwrap();
    assert_eq!(ended.end_reason, Some(EndReason::HostLost));
    assert_eq!(app.host_state("host-1").await.unwrap(), HostState::Unhealthy);
    assert_eq!(app.count_boxes(MandelboxState::Waiting).await.unwrap(), 0, "a dead host has no warm boxes");
    assert_eq!(app.count_boxes(MandelboxState::Lost).await.unwrap(), 2);
}

async fn reconnecting_host_keeps_its_sessions(backend: Backend) {
    let app = TestApp::spawn(backend, TestOptions::default()).await.unwrap();
    let session = app.user_client("alice").allocate(request()).await.unwrap().into_inner();
    let (_, agent, _) = app.host("host-1").unwrap();
    let generation_before = app.store.get_host("host-1").await.unwrap().unwrap().generation;

    agent.drop_connection();
    agent.wait_connected(2, Duration::from_secs(5)).await.unwrap();
    // Longer than the grace period: nothing may be lost meanwhile.
    tokio::time::sleep(Duration::from_millis(1_500)).await;

    let host = app.store.get_host("host-1").await.unwrap().unwrap();
    assert_eq!(host.state, HostState::Active);
    assert!(host.generation > generation_before, "a new connection generation");
    let still = app.session(&session.session_id).await.unwrap();
    assert_eq!(still.state, SessionState::Running);
    let mandelbox =
        app.store.get_mandelbox(uuid::Uuid::parse_str(&session.mandelbox_id).unwrap()).await.unwrap().unwrap();
    assert_eq!(mandelbox.state, MandelboxState::Running);
    assert_eq!(app.count_boxes(MandelboxState::Waiting).await.unwrap(), 1, "the warm box survived too");
}

async fn silent_host_is_declared_unhealthy(backend: Backend) {
    let app = TestApp::spawn(backend, TestOptions::default()).await.unwrap();
    let session = app.user_client("alice").allocate(request()).await.unwrap().into_inner();
    let (_, agent, _) = app.host("host-1").unwrap();

    agent.pause_heartbeats(true);
    let ended = app.wait_session(&session.session_id, SessionState::Ended, DETECTION_BUDGET).await.unwrap();
    assert_eq!(ended.end_reason, Some(EndReason::HostLost));
    // The host itself is alive and reconnects at once, so its state may already
    // be ACTIVE again; what it held is gone for good.
    let mandelbox = uuid::Uuid::parse_str(&session.mandelbox_id).unwrap();
    assert_eq!(app.store.get_mandelbox(mandelbox).await.unwrap().unwrap().state, MandelboxState::Lost);
}

/// A host that comes back after being declared lost is reconciled: the boxes
/// it still runs are unknown to the control plane now and are torn down, and
/// it is filled with fresh warm boxes.
async fn host_returning_after_loss_is_reconciled(backend: Backend) {
    let app = TestApp::spawn(backend, TestOptions::default()).await.unwrap();
    let session = app.user_client("alice").allocate(request()).await.unwrap().into_inner();
    let (_, agent, runtime) = app.host("host-1").unwrap();
    agent.pause_heartbeats(true);
    app.wait_session(&session.session_id, SessionState::Ended, DETECTION_BUDGET).await.unwrap();
    agent.pause_heartbeats(false);
    agent.wait_connected(2, Duration::from_secs(5)).await.unwrap();

    eventually(Duration::from_secs(5), async || {
        use hostagent_client::MandelboxRuntime;
        let running = runtime.running();
        Ok(!running.iter().any(|m| m.mandelbox_id == session.mandelbox_id) && running.len() == 2)
    })
    .await
    .unwrap();
    assert_eq!(app.host_state("host-1").await.unwrap(), HostState::Active);
    app.wait_warm(2, Duration::from_secs(5)).await.unwrap();
}

async fn draining_host_takes_no_new_sessions(backend: Backend) {
    let hosts = vec![HostSpec::new("a", "us-east-1", 2), HostSpec::new("b", "us-east-1", 2)];
    let app = TestApp::spawn(backend, TestOptions { hosts, ..Default::default() }).await.unwrap();
    let admin_token = app.admin_token();
    let drained = app
        .admin_client(Some(&admin_token))
        .drain_host(switchboard_proto::v1::DrainHostRequest { host_id: "a".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(drained.state, switchboard_proto::v1::HostState::Draining as i32);
    for user in ["u1", "u2"] {
        let response = app.user_client(user).allocate(request()).await.unwrap().into_inner();
        let session = app.session(&response.session_id).await.unwrap();
        assert_eq!(session.host_id.as_deref(), Some("b"));
    }
    assert!(app.host("a").unwrap().1.status().borrow().draining, "the host was told to drain");
}

/// Heartbeat times reach the database in the replica's batches: a host that
/// keeps beating gets a newer stored time with each batch, one that stops
/// keeps the time of its last batch.
async fn heartbeat_times_are_written_in_batches(backend: Backend) {
    let hosts = vec![HostSpec::new("beating", "us-east-1", 1), HostSpec::new("quiet", "us-east-1", 1)];
    let app = TestApp::spawn_with(backend, TestOptions { hosts, ..Default::default() }, |config| {
        config.hosts.heartbeat_write_interval_ms = 300;
        // Long enough that the quiet host is not declared lost during the test.
        config.hosts.missed_heartbeats = 50;
    })
    .await
    .unwrap();
    let stored = async |host_id: &str| app.store.get_host(host_id).await.unwrap().unwrap().last_heartbeat_at;
    let (_, quiet, _) = app.host("quiet").unwrap();
    quiet.pause_heartbeats(true);
    let quiet_before = stored("quiet").await;
    let first = stored("beating").await;
    eventually(Duration::from_secs(3), async || Ok(stored("beating").await > first)).await.unwrap();
    let second = stored("beating").await;
    eventually(Duration::from_secs(3), async || Ok(stored("beating").await > second)).await.unwrap();
    // The quiet host may have been in the first batch (a beat before the pause), never later.
    let quiet_after = stored("quiet").await;
    assert!(quiet_after <= second, "no batch after its pause wrote the quiet host");
    assert!(quiet_after >= quiet_before);
}

/// A replica that claimed a box (session and box written RUNNING) and died
/// before its Assign reached the host: the host's next Hello reports the box
/// idle, so the session ends ASSIGN_FAILED and the box is warm again. A claim
/// younger than twice the assign timeout is left alone (its Assign may be in
/// flight), so one made just before a reconnect survives it.
async fn claims_the_host_never_heard_of_end_at_its_next_hello(backend: Backend) {
    let app = TestApp::spawn_with(backend, TestOptions::default(), |config| {
        config.allocation.assign_timeout_ms = 200;
    })
    .await
    .unwrap();
    app.wait_warm(2, Duration::from_secs(5)).await.unwrap();
    let new_session = |user: &str| switchboard::store::NewSession {
        id: uuid::Uuid::new_v4(),
        user_id: user.to_owned(),
        app: "chrome".to_owned(),
        client_version: "3.1.0".to_owned(),
        regions: vec!["us-east-1".to_owned()],
    };
    let claim = |user: &'static str| {
        let store = app.store.clone();
        async move {
            match store.create_session_and_claim(&new_session(user), 3).await.unwrap() {
                switchboard::store::ClaimOutcome::Claimed(claim) => claim,
                switchboard::store::ClaimOutcome::Pending(session) => panic!("no box for {}", session.id),
            }
        }
    };
    let stale = claim("stale").await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let young = claim("young").await;
    assert_eq!(app.session(&stale.session.id.to_string()).await.unwrap().state, SessionState::Running);

    let mut events = app.core.events.subscribe();
    let (_, agent, _) = app.host("host-1").unwrap();
    agent.drop_connection();
    agent.wait_connected(2, Duration::from_secs(5)).await.unwrap();

    let ended =
        app.wait_session(&stale.session.id.to_string(), SessionState::Ended, Duration::from_secs(5)).await.unwrap();
    assert_eq!(ended.end_reason, Some(EndReason::AssignFailed));
    // The box put back is announced, so a pending session need not wait for
    // the dispatcher's timer.
    let warm = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match events.recv().await {
                Ok(switchboard::events::Event::MandelboxWarm { region }) => return Some(region),
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(warm.as_deref(), Some("us-east-1"));
    eventually(Duration::from_secs(5), async || {
        let mandelbox = app.store.get_mandelbox(stale.mandelbox.id).await?;
        Ok(mandelbox.is_some_and(|m| m.state == MandelboxState::Waiting && m.session_id.is_none()))
    })
    .await
    .unwrap();
    let kept = app.session(&young.session.id.to_string()).await.unwrap();
    assert_eq!(kept.state, SessionState::Running, "too young to judge at that Hello");
    // The released box serves the next user.
    let next = app.user_client("next").allocate(request()).await.unwrap().into_inner();
    assert_eq!(next.mandelbox_id, stale.mandelbox.id.to_string());
}

on_both_backends!(
    claims_the_host_never_heard_of_end_at_its_next_hello,
    heartbeat_times_are_written_in_batches,
    killed_host_loses_its_sessions,
    reconnecting_host_keeps_its_sessions,
    silent_host_is_declared_unhealthy,
    host_returning_after_loss_is_reconciled,
    draining_host_takes_no_new_sessions,
);
