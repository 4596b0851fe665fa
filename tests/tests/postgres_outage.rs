//! PostgreSQL stopped (as a crash: connections cut) and restarted under a
//! replica with live hosts and sessions, on a private server so that other
//! tests keep theirs: calls fail with UNAVAILABLE STORAGE_UNAVAILABLE within
//! seconds, nothing crashes, and once the database is back everything works
//! again by itself with no session or host record lost.
#![allow(clippy::unwrap_used)]

use std::{sync::Arc, time::Duration};

use switchboard::model::{HostState, SessionState};
use switchboard_proto::v1::{EndSessionRequest, ListHostsRequest};
use switchboard_tests::{
    TestApp, TestOptions,
    app::{chrome_in_us_east, eventually, reason},
    cluster::free_port,
    db::{PrivatePostgres, TestDatabase},
};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_outage_gives_clean_errors_then_recovers() {
    let postgres = PrivatePostgres::start_new(free_port().unwrap()).unwrap();
    let db = Arc::new(TestDatabase::external_postgres(&postgres.url()));
    let app = TestApp::spawn_on_database(db, TestOptions::default(), |_| {}).await.unwrap();
    let kept = app.user_client("before").allocate(chrome_in_us_east()).await.unwrap().into_inner();
    let admin_token = app.admin_token();

    postgres.stop().unwrap();
    let started = std::time::Instant::now();
    let refused = app.user_client("during").allocate(chrome_in_us_east()).await.unwrap_err();
    assert_eq!((refused.code(), reason(&refused)), (Code::Unavailable, "STORAGE_UNAVAILABLE"), "{refused:?}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "refused within the pool's acquire timeout: {:?}",
        started.elapsed()
    );
    let listed = app.admin_client(Some(&admin_token)).list_hosts(ListHostsRequest::default()).await.unwrap_err();
    assert_eq!(listed.code(), Code::Unavailable);
    // The host's stream survives the outage (heartbeats live in memory).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(app.host("host-1").unwrap().1.status().borrow().connected);

    postgres.start().unwrap();
    eventually(Duration::from_secs(20), async || {
        Ok(app.user_client("after").allocate(chrome_in_us_east()).await.is_ok())
    })
    .await
    .unwrap();
    // Nothing written before the outage was lost.
    let session = app.session(&kept.session_id).await.unwrap();
    assert_eq!(session.state, SessionState::Running);
    assert_eq!(app.store.get_host("host-1").await.unwrap().unwrap().state, HostState::Active);
    app.user_client("before").end_session(EndSessionRequest { session_id: kept.session_id.clone() }).await.unwrap();
}
