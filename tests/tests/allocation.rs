//! The allocation loop end to end, on PostgreSQL and SQLite: real server, real
//! hostagents, real TCP connections to the mandelboxes.
#![allow(clippy::unwrap_used)]

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use prost::Message as _;
use switchboard::model::{EndReason, MandelboxState, SessionState};
use switchboard_proto::v1::{
    AllocateRequest, CommandResult, DrainHostRequest, EndSessionRequest, Hello, HostMessage, ListMandelboxesRequest,
    Port, ReportDisconnectRequest, SessionState as WireState, TeardownMandelbox, WatchSessionRequest, command,
    control_message, host_message, host_service_client::HostServiceClient,
};
use switchboard_tests::{Backend, HostSpec, TestApp, TestOptions, app::reason, on_both_backends};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn request(regions: &[&str]) -> AllocateRequest {
    AllocateRequest {
        regions: regions.iter().map(|r| r.to_string()).collect(),
        app: "chrome".into(),
        client_version: "1.2.0".into(),
        client_data_json: r#"{"timezone":"Europe/Paris","locale":"fr-FR"}"#.into(),
        config_encryption_token: "config-token-never-stored".into(),
    }
}

async fn warm_ids(app: &TestApp, host_id: &str) -> HashSet<String> {
    let warm = app.store.host_mandelboxes(host_id, &[MandelboxState::Waiting]).await.unwrap();
    warm.into_iter().map(|m| m.id.to_string()).collect()
}

/// Waits until the box is written DEAD.
async fn wait_dead(app: &TestApp, id: uuid::Uuid) {
    switchboard_tests::app::eventually(Duration::from_secs(5), async || {
        Ok(app.store.get_mandelbox(id).await?.map(|m| m.state) == Some(MandelboxState::Dead))
    })
    .await
    .unwrap();
}

/// allocate → connect to the box → disconnect → teardown → a replacement warms.
async fn whole_loop(backend: Backend) {
    let app = TestApp::spawn(backend, TestOptions::default()).await.unwrap();
    let warm_before = warm_ids(&app, "host-1").await;
    assert_eq!(warm_before.len(), 2);

    let response = app.user_client("alice").allocate(request(&["us-east-1"])).await.unwrap().into_inner();
    assert_eq!(response.state, WireState::Running as i32);
    assert_eq!(response.region, "us-east-1");
    assert_eq!(response.host_address, "127.0.0.1");
    assert_eq!(response.session_key.len(), 32, "a 128-bit hex key");
    assert!(warm_before.contains(&response.mandelbox_id), "a warm box was used");
    let port = response.ports.iter().find(|p| p.name == "tcp_32262").unwrap().port;

    // The client connects to its mandelbox and talks to it.
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port as u16)).await.unwrap();
    stream.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    stream.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"ping");
    let session = app.session(&response.session_id).await.unwrap();
    assert_eq!(session.state, SessionState::Running);

    // The client leaves: the protocol server reports it, the session ends.
    drop(stream);
    let ended = app.wait_session(&response.session_id, SessionState::Ended, Duration::from_secs(5)).await.unwrap();
    assert_eq!(ended.end_reason, Some(EndReason::ClientDisconnected));

    // The box is torn down and a fresh one takes its slot.
    let used = uuid::Uuid::parse_str(&response.mandelbox_id).unwrap();
    wait_dead(&app, used).await;
    app.wait_warm(2, Duration::from_secs(5)).await.unwrap();
    let warm_after = warm_ids(&app, "host-1").await;
    assert!(!warm_after.contains(&response.mandelbox_id));
    assert_eq!(warm_after.difference(&warm_before).count(), 1, "exactly one replacement");

    // Nothing secret reached the database.
    let leaked =
        app.db.query_i64("SELECT count(*) FROM sessions WHERE client_version LIKE '%config-token%'").await.unwrap();
    assert_eq!(leaked, 0);
}

/// 300 users race for 100 warm boxes: exactly 100 win, no box twice. Their
/// claims are grouped into shared commits by one writer (the default).
async fn concurrent_allocations_never_share_a_box(backend: Backend) {
    allocations_race(backend, Some(1)).await;
}

/// The same with two claim writers, whose batches run at the same time.
async fn concurrent_allocations_with_two_claim_writers_never_share_a_box(backend: Backend) {
    allocations_race(backend, Some(2)).await;
}

/// The same with every claim its own statement (`group_claims = false`).
async fn concurrent_ungrouped_allocations_never_share_a_box(backend: Backend) {
    allocations_race(backend, None).await;
}

/// For the races: they are about who gets a box and how often a session ends,
/// not about how fast a host answers. Hundreds of calls at once in a debug
/// build, beside other tests on two cores, can hold a host's heartbeats past
/// the tests' 3 × 200 ms (the host is then written off as silent and its boxes
/// lost: once in CI, 90 winners of 100, one host's worth of boxes missing,
/// which is how we read that failure) or an Assign's answer past their 3 s.
fn patient_with_a_loaded_machine(config: &mut switchboard::config::Config) {
    config.hosts.missed_heartbeats = 50;
    config.allocation.assign_timeout_ms = 30_000;
    config.hosts.command_timeout_ms = 30_000;
}

/// `claim_writers`: None, claims not grouped.
async fn allocations_race(backend: Backend, claim_writers: Option<usize>) {
    let hosts = (1..=10).map(|i| HostSpec::new(&format!("host-{i}"), "us-east-1", 10)).collect();
    let app = TestApp::spawn_with(backend, TestOptions { hosts, ..Default::default() }, |config| {
        config.allocation.group_claims = claim_writers.is_some();
        config.allocation.claim_writers = claim_writers.unwrap_or(1);
        patient_with_a_loaded_machine(config);
    })
    .await
    .unwrap();
    let clients: Vec<_> = (0..300).map(|i| app.user_client(&format!("user-{i}"))).collect();
    let calls = clients
        .into_iter()
        .map(|mut client| tokio::spawn(async move { client.allocate(request(&["us-east-1"])).await }));
    let results = futures::future::join_all(calls).await;
    let mut won = Vec::new();
    let mut pending = 0;
    let mut no_capacity = 0;
    for result in results {
        match result.unwrap() {
            Ok(response) if response.get_ref().state == WireState::Running as i32 => won.push(response.into_inner()),
            Ok(response) => {
                assert_eq!(response.get_ref().state, WireState::Pending as i32);
                pending += 1;
            }
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
                assert_eq!(reason(&status), "NO_CAPACITY");
                no_capacity += 1;
            }
        }
    }
    assert_eq!(won.len(), 100, "pending {pending}, no capacity {no_capacity}");
    assert_eq!(won.len() + pending + no_capacity, 300);
    let boxes: HashSet<&str> = won.iter().map(|r| r.mandelbox_id.as_str()).collect();
    assert_eq!(boxes.len(), 100, "a box was given twice");
    let ports: HashSet<u32> = won.iter().map(|r| r.ports[0].port).collect();
    assert_eq!(ports.len(), 100);
    // The database agrees: 100 running boxes, each with a different session.
    assert_eq!(app.db.query_i64("SELECT count(*) FROM mandelboxes WHERE state = 'RUNNING'").await.unwrap(), 100);
    assert_eq!(
        app.db.query_i64("SELECT count(DISTINCT session_id) FROM mandelboxes WHERE state = 'RUNNING'").await.unwrap(),
        100
    );
    assert_eq!(app.db.query_i64("SELECT count(*) FROM sessions WHERE state = 'RUNNING'").await.unwrap(), 100);
}

/// 40 sessions end at once, each reported three times with its box's token
/// and once with another box's (a protocol server that retries, and a
/// confused one), all concurrently: the reports are grouped into shared
/// commits. Every session ends, every box is torn down once at its host, and
/// the pool refills.
async fn concurrent_disconnect_reports_end_each_session_once(backend: Backend) {
    disconnect_reports_race(backend, 1).await;
}

/// With two disconnect writers, batches are written at the same time and may
/// hold reports for the same box.
async fn concurrent_disconnect_reports_with_two_writers_end_each_session_once(backend: Backend) {
    disconnect_reports_race(backend, 2).await;
}

async fn disconnect_reports_race(backend: Backend, writers: usize) {
    let hosts: Vec<HostSpec> = (1..=10).map(|i| HostSpec::new(&format!("host-{i}"), "us-east-1", 4)).collect();
    let app = TestApp::spawn_with(backend, TestOptions { hosts, ..Default::default() }, |config| {
        config.allocation.disconnect_writers = writers;
        patient_with_a_loaded_machine(config);
    })
    .await
    .unwrap();
    app.wait_warm(40, Duration::from_secs(10)).await.unwrap();
    let calls = (0..40).map(|i| {
        let mut client = app.user_client(&format!("user-{i}"));
        tokio::spawn(async move { client.allocate(request(&["us-east-1"])).await })
    });
    let mut sessions = Vec::new();
    for call in futures::future::join_all(calls).await {
        let response = call.unwrap().unwrap().into_inner();
        assert_eq!(response.state, WireState::Running as i32);
        sessions.push(response);
    }
    let token_of = |mandelbox_id: &str| {
        app.hosts.iter().find_map(|(_, _, runtime)| runtime.token_of(mandelbox_id)).expect("the box's token")
    };
    let mut reports = Vec::new();
    for (index, session) in sessions.iter().enumerate() {
        let own = token_of(&session.mandelbox_id);
        let other = token_of(&sessions[(index + 1) % sessions.len()].mandelbox_id);
        for (token, own_token) in [(&own, true), (&other, false), (&own, true), (&own, true)] {
            let mut events = app.session_events_client();
            let request = ReportDisconnectRequest { mandelbox_id: session.mandelbox_id.clone(), token: token.clone() };
            let session_id = session.session_id.clone();
            reports.push(tokio::spawn(async move {
                (session_id, own_token, events.report_disconnect(request).await.map(|response| response.into_inner()))
            }));
        }
    }
    let mut accepted: HashMap<String, usize> = HashMap::new();
    for report in futures::future::join_all(reports).await {
        let (session_id, own_token, result) = report.unwrap();
        match result {
            Ok(ended) => {
                assert!(own_token, "another box's token was accepted");
                assert_eq!(ended.session_id, session_id);
                *accepted.entry(session_id).or_default() += 1;
            }
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
                assert_eq!(reason(&status), "BAD_MANDELBOX_TOKEN");
            }
        }
    }
    for session in &sessions {
        assert!(
            accepted.get(&session.session_id).is_some_and(|n| *n >= 1),
            "no report of {} was accepted",
            session.session_id
        );
        let stored = app.session(&session.session_id).await.unwrap();
        assert_eq!((stored.state, stored.end_reason), (SessionState::Ended, Some(EndReason::ClientDisconnected)));
    }
    app.wait_warm(40, Duration::from_secs(10)).await.unwrap();
    for session in &sessions {
        let teardowns: usize =
            app.hosts.iter().map(|(_, _, runtime)| runtime.teardowns_of(&session.mandelbox_id)).sum();
        assert_eq!(teardowns, 1, "box {} torn down once", session.mandelbox_id);
    }
}

/// With no warm box but one on the way, the session is PENDING and the
/// client follows it to RUNNING with WatchSession, key included.
async fn pending_session_is_fulfilled_and_watched(backend: Backend) {
    let hosts = vec![HostSpec::new("host-1", "us-east-1", 1)];
    let app = TestApp::spawn(backend, TestOptions { hosts, ..Default::default() }).await.unwrap();
    let first = app.user_client("alice").allocate(request(&["us-east-1"])).await.unwrap().into_inner();
    assert_eq!(first.state, WireState::Running as i32);

    // The replacement will take a while to warm. Until it is, its slot shows
    // the torn-down box, DYING: capacity that is coming all the same.
    let runtime = &app.host("host-1").unwrap().2;
    runtime.set_spawn_delay(Duration::from_millis(800));
    let spawned_before = runtime.spawned().len();
    app.user_client("alice").end_session(EndSessionRequest { session_id: first.session_id.clone() }).await.unwrap();
    switchboard_tests::app::eventually(Duration::from_secs(5), async || Ok(runtime.spawned().len() > spawned_before))
        .await
        .unwrap();
    assert_eq!(app.count_boxes(MandelboxState::Dying).await.unwrap(), 1);
    assert_eq!(app.count_boxes(MandelboxState::Waiting).await.unwrap(), 0);

    let mut bob = app.user_client("bob");
    let second = bob.allocate(request(&["us-east-1"])).await.unwrap().into_inner();
    assert_eq!(second.state, WireState::Pending as i32);
    assert!(second.session_key.is_empty());

    let mut updates =
        bob.watch_session(WatchSessionRequest { session_id: second.session_id.clone() }).await.unwrap().into_inner();
    let mut key = String::new();
    let mut last_state = WireState::Unspecified as i32;
    while let Ok(Some(update)) = tokio::time::timeout(Duration::from_secs(5), updates.message()).await.unwrap() {
        if !update.session_key.is_empty() {
            key = update.session_key.clone();
        }
        last_state = update.session.unwrap().state;
        if last_state == WireState::Running as i32 && !key.is_empty() {
            break;
        }
    }
    assert_eq!(last_state, WireState::Running as i32);
    assert_eq!(key.len(), 32);
    let session = app.session(&second.session_id).await.unwrap();
    assert_eq!(session.state, SessionState::Running);
    assert_eq!(session.user_id, "bob");
}

/// The user limit (3 by default) counts live sessions only.
async fn user_session_limit(backend: Backend) {
    let hosts = vec![HostSpec::new("host-1", "us-east-1", 5)];
    let app = TestApp::spawn(backend, TestOptions { hosts, ..Default::default() }).await.unwrap();
    let mut carol = app.user_client("carol");
    let mut sessions = Vec::new();
    for _ in 0..3 {
        sessions.push(carol.allocate(request(&["us-east-1"])).await.unwrap().into_inner().session_id);
    }
    let refused = carol.allocate(request(&["us-east-1"])).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert_eq!(reason(&refused), "USER_SESSION_LIMIT");
    carol.end_session(EndSessionRequest { session_id: sessions[0].clone() }).await.unwrap();
    let again = carol.allocate(request(&["us-east-1"])).await.unwrap().into_inner();
    assert_eq!(again.state, WireState::Running as i32);
}

/// One user's 20 concurrent Allocates, grouped into shared claims: exactly
/// the limit (3) get a session, the rest USER_SESSION_LIMIT.
async fn concurrent_allocations_of_one_user_respect_the_limit(backend: Backend) {
    let hosts = vec![HostSpec::new("host-1", "us-east-1", 10)];
    let app = TestApp::spawn(backend, TestOptions { hosts, ..Default::default() }).await.unwrap();
    let calls = (0..20).map(|_| {
        let mut client = app.user_client("dave");
        tokio::spawn(async move { client.allocate(request(&["us-east-1"])).await })
    });
    let (mut accepted, mut refused) = (0, 0);
    for result in futures::future::join_all(calls).await {
        match result.unwrap() {
            Ok(response) => {
                assert_eq!(response.get_ref().state, WireState::Running as i32);
                accepted += 1;
            }
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
                assert_eq!(reason(&status), "USER_SESSION_LIMIT");
                refused += 1;
            }
        }
    }
    assert_eq!((accepted, refused), (3, 17));
    let live = "SELECT count(*) FROM sessions WHERE user_id = 'dave' AND state <> 'ENDED'";
    assert_eq!(app.db.query_i64(live).await.unwrap(), 3);
}

/// The first region with a warm box wins; a region with none is skipped.
async fn first_region_with_a_warm_box_wins(backend: Backend) {
    let options = TestOptions {
        regions: vec![("us-east-1".into(), true), ("eu-west-1".into(), true), ("ap-south-1".into(), false)],
        hosts: vec![HostSpec::new("east", "us-east-1", 1), HostSpec::new("west", "eu-west-1", 1)],
        wait_warm: true,
        ..Default::default()
    };
    let app = TestApp::spawn(backend, options).await.unwrap();
    let first = app.user_client("u1").allocate(request(&["ap-south-1", "eu-west-1", "us-east-1"])).await.unwrap();
    assert_eq!(first.get_ref().region, "eu-west-1", "disabled region skipped, then client order");
    let second = app.user_client("u2").allocate(request(&["eu-west-1", "us-east-1"])).await.unwrap();
    // eu-west-1's only box is taken; its replacement cannot start (capacity 1 is used).
    assert_eq!(second.get_ref().region, "us-east-1");
}

/// h2 is patched to start each connection's buffers small (2 KiB to write,
/// 1 KiB to read, 512 B of HPACK scratch: third_party/h2). Frames larger than
/// those still cross both ways: a request with a 6 KiB header and 15 KiB of
/// client data, 40 calls multiplexed on one connection at once, and a
/// response larger than the write buffer.
async fn large_frames_cross_the_small_h2_buffers(backend: Backend) {
    let hosts: Vec<HostSpec> = (1..=10).map(|i| HostSpec::new(&format!("host-{i}"), "us-east-1", 4)).collect();
    let app = TestApp::spawn(backend, TestOptions { hosts, ..Default::default() }).await.unwrap();
    app.wait_warm(40, Duration::from_secs(10)).await.unwrap();

    let mut big = tonic::Request::new(AllocateRequest {
        client_data_json: format!(r#"{{"blob":"{}"}}"#, "x".repeat(15 * 1024)),
        ..request(&["us-east-1"])
    });
    big.metadata_mut().insert("x-padding", "p".repeat(6 * 1024).parse().unwrap());
    let response = app.user_client("big-frames").allocate(big).await.unwrap().into_inner();
    assert_eq!(response.state, WireState::Running as i32);

    // One channel is one HTTP/2 connection: these share its buffers.
    let calls = (0..39).map(|i| {
        let mut client = app.user_client(&format!("multiplexed-{i}"));
        tokio::spawn(async move { client.allocate(request(&["us-east-1"])).await })
    });
    for call in futures::future::join_all(calls).await {
        assert_eq!(call.unwrap().unwrap().into_inner().state, WireState::Running as i32);
    }

    let listed = app
        .admin_client(Some(&app.admin_token()))
        .list_mandelboxes(ListMandelboxesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.mandelboxes.len() >= 40, "{} boxes listed", listed.mandelboxes.len());
    assert!(
        listed.encoded_len() > 4 * 1024,
        "the response ({} bytes) is not larger than the write buffer",
        listed.encoded_len()
    );
}

/// A draining host gets no replacement for a box it tears down: its
/// connection remembers the Drain it relayed, so nothing is spawned there
/// only for the store to refuse it and the host to tear it down again.
async fn draining_host_spawns_no_replacement(backend: Backend) {
    let app = TestApp::spawn(backend, TestOptions::default()).await.unwrap();
    let response = app.user_client("alice").allocate(request(&["us-east-1"])).await.unwrap().into_inner();
    let (_, _, runtime) = app.host("host-1").unwrap();
    let admin_token = app.admin_token();
    app.admin_client(Some(&admin_token)).drain_host(DrainHostRequest { host_id: "host-1".into() }).await.unwrap();
    let spawned_before = runtime.spawned();

    app.user_client("alice").end_session(EndSessionRequest { session_id: response.session_id.clone() }).await.unwrap();
    // The box's death is written after any replacement's spawn (they are
    // written together), so once it is DEAD a replacement would have shown.
    let used = uuid::Uuid::parse_str(&response.mandelbox_id).unwrap();
    wait_dead(&app, used).await;
    assert_eq!(runtime.teardowns_of(&response.mandelbox_id), 1);
    assert_eq!(runtime.spawned(), spawned_before, "no box spawned on a draining host");
    assert_eq!(app.store.host_summary("host-1").await.unwrap().unwrap().live, 0, "every box torn down");
}

/// A replacement that dies before its spawn is written (the host's exit
/// notice overtakes the bookkeeping write) is written DEAD, not WAITING, and
/// its slot is refilled.
async fn replacement_exiting_before_it_is_recorded_is_recorded_dead(backend: Backend) {
    let app = TestApp::spawn_with(backend, TestOptions::default(), |config| {
        // The write waits in its batch long after the box's exit.
        config.allocation.bookkeeping_linger_ms = 300;
    })
    .await
    .unwrap();
    let response = app.user_client("alice").allocate(request(&["us-east-1"])).await.unwrap().into_inner();
    let (_, _, runtime) = app.host("host-1").unwrap();
    let spawned_before = runtime.spawned().len();
    runtime.crash_next_spawn();

    app.user_client("alice").end_session(EndSessionRequest { session_id: response.session_id.clone() }).await.unwrap();
    switchboard_tests::app::eventually(Duration::from_secs(5), async || Ok(runtime.spawned().len() > spawned_before))
        .await
        .unwrap();
    let replacement = uuid::Uuid::parse_str(&runtime.spawned()[spawned_before]).unwrap();
    wait_dead(&app, replacement).await;
    app.wait_warm(2, Duration::from_secs(5)).await.unwrap();
    let warm = warm_ids(&app, "host-1").await;
    assert!(!warm.contains(&replacement.to_string()), "the dead replacement is not offered");
    assert!(!warm.contains(&response.mandelbox_id));
}

/// A slot freed where no wake-up reaches (here a box written DEAD straight
/// into the store, as another replica or the sweep would write it) is
/// refilled by the warm pool's sweep within a few maintenance passes.
async fn a_slot_freed_behind_the_connection_is_refilled_by_the_sweep(backend: Backend) {
    let app = TestApp::spawn(backend, TestOptions::default()).await.unwrap();
    let warm_before = warm_ids(&app, "host-1").await;
    let (_, _, runtime) = app.host("host-1").unwrap();
    let spawned_before = runtime.spawned().len();
    let gone = warm_before.iter().next().map(|id| uuid::Uuid::parse_str(id).unwrap()).unwrap();
    app.store.mandelbox_finished(gone, MandelboxState::Dead, EndReason::MandelboxExited).await.unwrap();
    assert_eq!(warm_ids(&app, "host-1").await.len(), 1);

    app.wait_warm(2, Duration::from_secs(5)).await.unwrap();
    let spawned = runtime.spawned();
    assert_eq!(spawned.len(), spawned_before + 1, "one box spawned in the freed slot");
    assert!(warm_ids(&app, "host-1").await.contains(&spawned[spawned_before]));
}

/// A recycled slot costs its host one command: the teardown names the
/// replacement, and the host's one answer confirms both.
async fn a_recycled_slot_is_one_host_command(backend: Backend) {
    let app = TestApp::spawn(backend, TestOptions::default()).await.unwrap();
    let response = app.user_client("alice").allocate(request(&["us-east-1"])).await.unwrap().into_inner();
    let (_, agent, runtime) = app.host("host-1").unwrap();
    let spawned_before = runtime.spawned().len();
    let commands_before = agent.commands_received();

    app.user_client("alice").end_session(EndSessionRequest { session_id: response.session_id.clone() }).await.unwrap();
    let used = uuid::Uuid::parse_str(&response.mandelbox_id).unwrap();
    wait_dead(&app, used).await;
    app.wait_warm(2, Duration::from_secs(5)).await.unwrap();

    assert_eq!(runtime.teardowns_of(&response.mandelbox_id), 1);
    let spawned = runtime.spawned();
    assert_eq!(spawned.len(), spawned_before + 1, "one replacement");
    assert!(warm_ids(&app, "host-1").await.contains(&spawned[spawned_before]), "the replacement is warm");
    assert_eq!(agent.commands_received() - commands_before, 1, "the teardown and the spawn were one command");
}

/// An agent that does not know replacements (it ignores the teardown's
/// replacement field, as an older agent does) still gets its slot refilled:
/// the control plane sends the replacement it named as a spawn of its own.
async fn an_agent_without_replacements_gets_the_spawn_separately(backend: Backend) {
    let options = TestOptions { hosts: vec![], wait_warm: false, ..TestOptions::default() };
    let app = TestApp::spawn(backend, options).await.unwrap();
    let (outbound, receiver) = tokio::sync::mpsc::channel(16);
    outbound.send(old_agent_hello(&app, "old-agent")).await.unwrap();
    let mut client = HostServiceClient::new(app.channel.clone());
    let mut inbound = client.connect(tokio_stream::wrappers::ReceiverStream::new(receiver)).await.unwrap().into_inner();
    let received: Arc<Mutex<Vec<command::Kind>>> = Arc::default();
    let log = received.clone();
    let answering = tokio::spawn(async move {
        while let Ok(Some(message)) = inbound.message().await {
            let Some(control_message::Body::Command(command)) = message.body else { continue };
            log.lock().unwrap().extend(command.kind.clone());
            // What an agent built before replacements answers: the command's
            // own result, with no `replacement`.
            let result = CommandResult {
                command_id: command.command_id,
                ok: true,
                ports: vec![Port { name: "tcp_32262".into(), port: 40001, protocol: "tcp".into() }],
                session_key: "00112233445566778899aabbccddeeff".into(),
                ..CommandResult::default()
            };
            if outbound.send(HostMessage { body: Some(host_message::Body::Result(result)) }).await.is_err() {
                break;
            }
        }
    });
    app.wait_warm(1, Duration::from_secs(5)).await.unwrap();

    let response = app.user_client("alice").allocate(request(&["us-east-1"])).await.unwrap().into_inner();
    app.user_client("alice").end_session(EndSessionRequest { session_id: response.session_id.clone() }).await.unwrap();
    let used = uuid::Uuid::parse_str(&response.mandelbox_id).unwrap();
    wait_dead(&app, used).await;
    app.wait_warm(1, Duration::from_secs(5)).await.unwrap();

    let received = received.lock().unwrap().clone();
    let teardown = received
        .iter()
        .position(|kind| matches!(kind, command::Kind::Teardown(t) if t.mandelbox_id == response.mandelbox_id))
        .expect("the used box was torn down");
    let Some(command::Kind::Teardown(TeardownMandelbox { replacement: Some(named), .. })) = received.get(teardown)
    else {
        panic!("the teardown names a replacement: {:?}", received[teardown]);
    };
    let spawned_after: Vec<&str> = received[teardown + 1..]
        .iter()
        .filter_map(|kind| match kind {
            command::Kind::Spawn(spawn) => Some(spawn.mandelbox_id.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(spawned_after, [named.mandelbox_id.as_str()], "the named replacement, spawned on its own");
    assert_eq!(warm_ids(&app, "old-agent").await, HashSet::from([named.mandelbox_id.clone()]));
    answering.abort();
}

fn old_agent_hello(app: &TestApp, host_id: &str) -> HostMessage {
    HostMessage {
        body: Some(host_message::Body::Hello(Hello {
            host_id: host_id.into(),
            region: "us-east-1".into(),
            image: "dev".into(),
            agent_version: "0.9.0".into(),
            capacity: 1,
            address: "127.0.0.1".into(),
            mandelboxes: vec![],
            credential: app.credentials.issue(host_id),
        })),
    }
}

on_both_backends!(
    whole_loop,
    a_recycled_slot_is_one_host_command,
    a_slot_freed_behind_the_connection_is_refilled_by_the_sweep,
    an_agent_without_replacements_gets_the_spawn_separately,
    draining_host_spawns_no_replacement,
    replacement_exiting_before_it_is_recorded_is_recorded_dead,
    concurrent_allocations_never_share_a_box,
    concurrent_allocations_with_two_claim_writers_never_share_a_box,
    concurrent_ungrouped_allocations_never_share_a_box,
    concurrent_allocations_of_one_user_respect_the_limit,
    concurrent_disconnect_reports_end_each_session_once,
    concurrent_disconnect_reports_with_two_writers_end_each_session_once,
    large_frames_cross_the_small_h2_buffers,
    pending_session_is_fulfilled_and_watched,
    user_session_limit,
    first_region_with_a_warm_box_wins,
);
