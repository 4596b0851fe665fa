//! Two replicas sharing PostgreSQL and Redis, in one test process: a host's
//! stream lives on one, any RPC may arrive at the other. Commands reach the
//! host through Redis and their acks come back; session events reach
//! watchers on the other replica; a command for a host whose replica is gone
//! fails at once; hosts of a replica that stopped are given the grace period
//! and resume on the other.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use switchboard::{
    config::{Config, Secret},
    fleet::RouteError,
    model::{HostState, MandelboxState, SessionState},
};
use switchboard_proto::v1::{DrainHostRequest, EndSessionRequest, WatchSessionRequest};
use switchboard_tests::{
    Backend, TestApp, TestOptions,
    app::{chrome_in_us_east, eventually},
};
use tokio_stream::StreamExt;

const WAIT: Duration = Duration::from_secs(15);

fn clustered(namespace: String) -> impl FnOnce(&mut Config) {
    move |config: &mut Config| {
        config.redis.url = Secret::new("redis://127.0.0.1:6379");
        config.redis.namespace = namespace;
    }
}

fn namespace() -> String {
    format!("switchboard-test-{}", uuid::Uuid::new_v4().simple())
}

/// Replica A holds host-1's stream; B takes the calls.
async fn pair() -> (TestApp, TestApp) {
    let namespace = namespace();
    let a = TestApp::spawn_with(Backend::Postgres, TestOptions::default(), clustered(namespace.clone())).await.unwrap();
    let b = a.spawn_replica(clustered(namespace)).await.unwrap();
    // Ownership is published within a second of the Hello.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_allocation_on_one_replica_assigns_a_box_on_the_other() {
    let (a, b) = pair().await;
    let started = Instant::now();
    let session = b.user_client("u1").allocate(chrome_in_us_east()).await.unwrap().into_inner();
    println!("allocate through the other replica: {:?}", started.elapsed());
    assert!(!session.session_key.is_empty(), "the host's ack (with the key) came back through Redis");
    let stored = b.session(&session.session_id).await.unwrap();
    assert_eq!((stored.state, stored.host_id.as_deref()), (SessionState::Running, Some("host-1")));
    // The host itself saw the assignment.
    let runtime = &a.host("host-1").unwrap().2;
    assert!(runtime.token_of(&session.mandelbox_id).is_some());

    // A watcher on A sees B's session end; the teardown reaches the host through Redis.
    let mut watch = a
        .user_client("u1")
        .watch_session(WatchSessionRequest { session_id: session.session_id.clone() })
        .await
        .unwrap()
        .into_inner();
    let first = watch.next().await.unwrap().unwrap();
    assert_eq!(first.session.unwrap().state, switchboard_proto::v1::SessionState::Running as i32);
    b.user_client("u1").end_session(EndSessionRequest { session_id: session.session_id.clone() }).await.unwrap();
    let ended = tokio::time::timeout(WAIT, watch.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(ended.session.unwrap().state, switchboard_proto::v1::SessionState::Ended as i32);
    let mandelbox_id = uuid::Uuid::parse_str(&session.mandelbox_id).unwrap();
    eventually(WAIT, async || {
        Ok(a.store.get_mandelbox(mandelbox_id).await?.is_some_and(|m| m.state == MandelboxState::Dead))
    })
    .await
    .unwrap();
    // The replacement warms on A (its filler runs on a timer too).
    a.wait_warm(2, WAIT).await.unwrap();

    // An admin command through B reaches the host on A.
    let admin_token = b.admin_token();
    let drained = b
        .admin_client(Some(&admin_token))
        .drain_host(DrainHostRequest { host_id: "host-1".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(drained.state, switchboard_proto::v1::HostState::Draining as i32);
}

/// A command for a host whose replica is gone fails at once instead of at its
/// deadline: after a clean stop (ownership released) and after a crash
/// (ownership left behind by a replica that no longer refreshes its alive key).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commands_for_hosts_of_a_gone_replica_fail_fast() {
    let namespace = namespace();
    let mut a =
        TestApp::spawn_with(Backend::Postgres, TestOptions::default(), clustered(namespace.clone())).await.unwrap();
    let b = a.spawn_replica(clustered(namespace.clone())).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let drain =
        || switchboard_proto::v1::command::Kind::Drain(switchboard_proto::v1::DrainHost { reason: "test".into() });
    let deadline = Duration::from_secs(10);

    // A crashed replica's claim: the owner key is there, its alive key is not.
    let client = deadpool_redis::redis::Client::open("redis://127.0.0.1:6379").unwrap();
    let mut redis = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = deadpool_redis::redis::cmd("SET")
        .arg(format!("{namespace}:host:ghost"))
        .arg("crashed-replica:7")
        .query_async(&mut redis)
        .await
        .unwrap();
    let started = Instant::now();
    let refused = b.core.router.send("ghost", drain(), deadline).await;
    assert_eq!(refused, Err(RouteError::NotConnected));
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
    let unowned = b.core.cluster.as_ref().unwrap().unowned(&["ghost".into(), "host-1".into()]).await.unwrap();
    assert_eq!(unowned, vec!["ghost".to_owned()], "host-1 is held by a live replica");

    // A stops cleanly: it gives its hosts up, and B fails fast for them too.
    a.shutdown.cancel();
    if let Some(server) = a.server.take() {
        let _ = server.await;
    }
    let started = Instant::now();
    let refused = b.core.router.send("host-1", drain(), deadline).await;
    assert!(matches!(refused, Err(RouteError::NotConnected | RouteError::Gone)), "{refused:?}");
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
    // Its host is marked disconnected, not lost: it has the grace period to come back.
    eventually(WAIT, async || {
        Ok(b.store.get_host("host-1").await?.is_some_and(|h| h.state == HostState::Disconnected))
    })
    .await
    .unwrap();
}

/// A pending session taken on A and watched on B: when A fulfils it, B's
/// watcher gets the session key, once (the key lives in A's memory).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pending_session_watched_on_the_other_replica_gets_its_key() {
    let namespace = namespace();
    let options =
        TestOptions { hosts: vec![switchboard_tests::HostSpec::new("host-1", "us-east-1", 1)], ..Default::default() };
    let a = TestApp::spawn_with(Backend::Postgres, options, clustered(namespace.clone())).await.unwrap();
    let b = a.spawn_replica(clustered(namespace)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    // The only slot is re-warming slowly: a new session has to wait for it.
    let first = a.user_client("first").allocate(chrome_in_us_east()).await.unwrap().into_inner();
    a.host("host-1").unwrap().2.set_spawn_delay(Duration::from_millis(1_500));
    a.user_client("first").end_session(EndSessionRequest { session_id: first.session_id }).await.unwrap();
    let mut pending = None;
    eventually(WAIT, async || {
        let response = a.user_client("waiter").allocate(chrome_in_us_east()).await;
        match response {
            Ok(response) => {
                pending = Some(response.into_inner());
                Ok(true)
            }
            // Until the teardown is confirmed the slot is not on its way yet.
            Err(status) if status.code() == tonic::Code::ResourceExhausted => Ok(false),
            Err(status) => Err(status.into()),
        }
    })
    .await
    .unwrap();
    let pending = pending.unwrap();
    assert_eq!(pending.state, switchboard_proto::v1::SessionState::Pending as i32, "{pending:?}");
    assert!(pending.session_key.is_empty());

    let mut watch = b
        .user_client("waiter")
        .watch_session(WatchSessionRequest { session_id: pending.session_id.clone() })
        .await
        .unwrap()
        .into_inner();
    let mut key = String::new();
    while key.is_empty() {
        let update = tokio::time::timeout(WAIT, watch.next()).await.unwrap().unwrap().unwrap();
        let state = update.session.as_ref().map(|s| s.state);
        key = update.session_key;
        if state == Some(switchboard_proto::v1::SessionState::Ended as i32) {
            panic!("the session ended without a key");
        }
    }
    let stored = b.session(&pending.session_id).await.unwrap();
    assert_eq!(stored.state, SessionState::Running);
    // Handed over once: a second watcher does not get it again.
    let mut again = b
        .user_client("waiter")
        .watch_session(WatchSessionRequest { session_id: pending.session_id.clone() })
        .await
        .unwrap()
        .into_inner();
    let update = tokio::time::timeout(WAIT, again.next()).await.unwrap().unwrap().unwrap();
    assert!(update.session_key.is_empty());
}
