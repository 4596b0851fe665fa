//! The `Store` contract, written once and run against both backends: every
//! test gets a fresh database (`mod postgres`, `mod sqlite` at the bottom).
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use switchboard::model::{
    EndReason, HostHello, HostRecord, HostState, MandelboxRecord, MandelboxState, PortSpec, Region, SessionRecord,
    SessionState,
};
use switchboard::store::{
    Claim, ClaimOutcome, DisconnectReport, DynStore, HeartbeatMark, MandelboxFilter, NewMandelbox, NewSession,
    Recycled, ReportedMandelbox, SessionFilter, SpawnReport, StoreError, TokenEnd, TornDown, WarmReplacement,
};
use switchboard_tests::db::TestDatabase;
use uuid::Uuid;

const APP: &str = "chrome";
/// Generous enough never to get in the way unless a test means it to.
const NO_LIMIT: u32 = 1000;

// ----- fixtures ---------------------------------------------------------------

fn hello(host_id: &str, region: &str, image: &str, capacity: u32) -> HostHello {
    HostHello {
        host_id: host_id.to_owned(),
        region: region.to_owned(),
        image: image.to_owned(),
        agent_version: "1.2.3".to_owned(),
        address: format!("{host_id}.example:7000"),
        capacity,
    }
}

async fn host(store: &DynStore, host_id: &str, region: &str, image: &str, capacity: u32) -> HostRecord {
    store.host_connected(&hello(host_id, region, image, capacity)).await.unwrap()
}

async fn region(store: &DynStore, name: &str, image: &str) {
    store
        .put_region(&Region { name: name.to_owned(), enabled: true, image: image.to_owned(), ..Default::default() })
        .await
        .unwrap();
}

fn ports() -> Vec<PortSpec> {
    vec![
        PortSpec { name: "tcp32262".to_owned(), port: 40001, protocol: "tcp".to_owned() },
        PortSpec { name: "udp32263".to_owned(), port: 40002, protocol: "udp".to_owned() },
    ]
}

// Ids are UUIDv7, as the server makes them: listings are newest first by id.
fn new_box(app: &str, session_id: Option<Uuid>) -> NewMandelbox {
    let id = Uuid::now_v7();
    NewMandelbox { id, app: app.to_owned(), token_hash: format!("sha256-of-{id}"), session_id }
}

/// A replacement its host has spawned already (`recycle_torn_down`).
fn warm_replacement() -> WarmReplacement {
    let id = Uuid::now_v7();
    WarmReplacement { id, app: APP.to_owned(), token_hash: format!("sha256-of-{id}"), ports: ports() }
}

async fn spawning_box(store: &DynStore, host_id: &str, app: &str) -> MandelboxRecord {
    store.reserve_mandelbox(host_id, &new_box(app, None)).await.unwrap().expect("host has room")
}

/// A box that finished spawning and waits for a session.
async fn warm_box(store: &DynStore, host_id: &str, app: &str) -> MandelboxRecord {
    let reserved = spawning_box(store, host_id, app).await;
    let warm = store.mandelbox_spawned(reserved.id, &ports()).await.unwrap().unwrap();
    assert_eq!(warm.state, MandelboxState::Waiting);
    warm
}

fn new_session(user_id: &str, regions: &[&str]) -> NewSession {
    NewSession {
        id: Uuid::now_v7(),
        user_id: user_id.to_owned(),
        app: APP.to_owned(),
        client_version: "3.1.0".to_owned(),
        regions: regions.iter().map(|region| (*region).to_owned()).collect(),
    }
}

fn claimed(outcome: ClaimOutcome) -> Claim {
    match outcome {
        ClaimOutcome::Claimed(claim) => claim,
        ClaimOutcome::Pending(session) => {
            panic!("expected a claim, session {} is pending", session.id)
        }
    }
}

fn pending(outcome: ClaimOutcome) -> SessionRecord {
    match outcome {
        ClaimOutcome::Pending(session) => session,
        ClaimOutcome::Claimed(claim) => {
            panic!("expected pending, claimed box {}", claim.mandelbox.id)
        }
    }
}

async fn claim(store: &DynStore, user_id: &str, regions: &[&str]) -> Claim {
    claimed(store.create_session_and_claim(&new_session(user_id, regions), NO_LIMIT).await.unwrap())
}

/// A session RUNNING on a box RUNNING on `host_id` (Allocate's claim writes
/// both RUNNING at once).
async fn running_session(store: &DynStore, host_id: &str, region: &str, user_id: &str) -> Claim {
    warm_box(store, host_id, APP).await;
    let claim = claim(store, user_id, &[region]).await;
    assert_eq!(claim.mandelbox.host_id, host_id);
    assert_eq!((claim.session.state, claim.mandelbox.state), (SessionState::Running, MandelboxState::Running));
    claim
}

/// A pending session's claim, ASSIGNING on a box (warmed on `host_id` after
/// the session was queued) ALLOCATED to it (the
/// dispatcher's path, which the host confirms with `confirm_assignment`).
async fn assigning_claim(store: &DynStore, host_id: &str, user_id: &str, region: &str) -> Claim {
    let session = pending(store.create_session_and_claim(&new_session(user_id, &[region]), NO_LIMIT).await.unwrap());
    warm_box(store, host_id, APP).await;
    let claim = store.claim_for_session(session.id, &[]).await.unwrap().unwrap();
    assert_eq!((claim.session.state, claim.mandelbox.state), (SessionState::Assigning, MandelboxState::Allocated));
    claim
}

/// A small deterministic generator (xorshift64), so that a failing random
/// fleet is the same fleet on the next run.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The box the claim rule picks for `wanted`, read from the store's listings.
async fn chosen_by_the_rule(store: &DynStore, wanted: &[&str]) -> Option<Uuid> {
    let hosts = store.list_hosts(None).await.unwrap();
    let images: std::collections::HashMap<String, String> =
        store.list_regions().await.unwrap().into_iter().map(|region| (region.name, region.image)).collect();
    let boxes = store.list_mandelboxes(&MandelboxFilter::default()).await.unwrap();
    boxes
        .iter()
        .filter(|candidate| candidate.state == MandelboxState::Waiting && candidate.app == APP)
        .filter_map(|candidate| {
            let position = wanted.iter().position(|region| *region == candidate.region)?;
            let summary = hosts.iter().find(|summary| summary.host.id == candidate.host_id)?;
            let image = images.get(&candidate.region).map_or("", String::as_str);
            let fits = summary.host.state == HostState::Active && (image.is_empty() || summary.host.image == image);
            let free = i64::from(summary.host.capacity) - i64::from(summary.assigned);
            fits.then_some((position, free, summary.host.id.clone(), candidate.created_at, candidate.id))
        })
        .min()
        .map(|(.., id)| id)
}

async fn box_state(store: &DynStore, id: Uuid) -> MandelboxState {
    store.get_mandelbox(id).await.unwrap().unwrap().state
}

async fn session(store: &DynStore, id: Uuid) -> SessionRecord {
    store.get_session(id).await.unwrap().unwrap()
}

async fn host_state(store: &DynStore, host_id: &str) -> HostState {
    store.get_host(host_id).await.unwrap().unwrap().state
}

/// A reconcile cutoff before every claim of a test: no claim counts as stale.
fn long_ago() -> DateTime<Utc> {
    Utc::now() - chrono::Duration::days(1)
}

/// Lets the clock move on, so that rows created after it are strictly newer.
async fn tick() -> DateTime<Utc> {
    tokio::time::sleep(Duration::from_millis(5)).await;
    let now = Utc::now();
    tokio::time::sleep(Duration::from_millis(5)).await;
    now
}

fn ids(boxes: &[MandelboxRecord]) -> Vec<Uuid> {
    boxes.iter().map(|mandelbox| mandelbox.id).collect()
}

// ----- the contract -----------------------------------------------------------

#[path = "store_contract/fleet.rs"]
mod fleet_contract;

mod contract {
    use super::*;
    pub(crate) use crate::fleet_contract::*;

    // ----- regions ------------------------------------------------------

    pub(crate) async fn regions_are_upserted_and_listed_by_name(_db: &TestDatabase, store: DynStore) {
        assert!(store.list_regions().await.unwrap().is_empty());
        let west =
            Region { name: "us-west-1".to_owned(), enabled: true, image: "img-1".to_owned(), ..Default::default() };
        let east = Region { name: "us-east-1".to_owned(), enabled: false, ..Default::default() };
        assert_eq!(store.put_region(&west).await.unwrap(), west);
        assert_eq!(store.put_region(&east).await.unwrap(), east);
        assert_eq!(store.list_regions().await.unwrap(), vec![east.clone(), west.clone()]);

        let west_v2 = Region { enabled: false, image: "img-2".to_owned(), ..west };
        assert_eq!(store.put_region(&west_v2).await.unwrap(), west_v2);
        assert_eq!(store.list_regions().await.unwrap(), vec![east, west_v2]);
    }

    // ----- users --------------------------------------------------------

    pub(crate) async fn ensure_user_is_idempotent_and_keeps_the_email(db: &TestDatabase, store: DynStore) {
        store.ensure_user("auth0|alice", None).await.unwrap();
        store.ensure_user("auth0|alice", None).await.unwrap();
        assert_eq!(db.query_i64("SELECT count(*) FROM users").await.unwrap(), 1);
        assert_eq!(db.query_i64("SELECT count(*) FROM users WHERE email IS NULL").await.unwrap(), 1);

        store.ensure_user("auth0|alice", Some("alice@example.com")).await.unwrap();
        store.ensure_user("auth0|alice", None).await.unwrap();
        assert_eq!(
            db.query_i64("SELECT count(*) FROM users WHERE id = 'auth0|alice' AND email = 'alice@example.com'")
                .await
                .unwrap(),
            1
        );
        store.ensure_user("auth0|alice", Some("alice@new.example")).await.unwrap();
        assert_eq!(db.query_i64("SELECT count(*) FROM users WHERE email = 'alice@new.example'").await.unwrap(), 1);
        assert_eq!(db.query_i64("SELECT count(*) FROM users").await.unwrap(), 1);
    }

    pub(crate) async fn concurrent_ensure_user_creates_one_row(db: &TestDatabase, store: DynStore) {
        let tasks: Vec<_> = (0..50)
            .map(|i| {
                let store = store.clone();
                let email = (i % 2 == 0).then(|| "bob@example.com".to_owned());
                tokio::spawn(async move { store.ensure_user("auth0|bob", email.as_deref()).await })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        assert_eq!(db.query_i64("SELECT count(*) FROM users").await.unwrap(), 1);
        assert_eq!(
            db.query_i64("SELECT count(*) FROM users WHERE id = 'auth0|bob' AND email = 'bob@example.com'")
                .await
                .unwrap(),
            1
        );
    }

    // ----- hosts --------------------------------------------------------

    pub(crate) async fn host_connected_inserts_then_bumps_the_generation(_db: &TestDatabase, store: DynStore) {
        let first = host(&store, "h1", "us-east-1", "img-1", 4).await;
        assert_eq!(first.id, "h1");
        assert_eq!(first.region, "us-east-1");
        assert_eq!(first.image, "img-1");
        assert_eq!(first.agent_version, "1.2.3");
        assert_eq!(first.address, "h1.example:7000");
        assert_eq!(first.capacity, 4);
        assert_eq!(first.generation, 1);
        assert_eq!(first.state, HostState::Active);
        assert!(first.last_heartbeat_at.is_some());
        assert_eq!(first.disconnected_at, None);
        assert_eq!(store.get_host("h1").await.unwrap(), Some(first.clone()));

        assert!(store.host_disconnected("h1", 1).await.unwrap());
        let second = store.host_connected(&hello("h1", "us-east-1", "img-2", 8)).await.unwrap();
        assert_eq!(second.generation, 2);
        assert_eq!(second.state, HostState::Active);
        assert_eq!(second.image, "img-2");
        assert_eq!(second.capacity, 8);
        assert_eq!(second.disconnected_at, None);
        assert_eq!(second.created_at, first.created_at);
        assert!(second.last_heartbeat_at >= first.last_heartbeat_at);
        assert_eq!(store.get_host("h1").await.unwrap(), Some(second));
        assert_eq!(store.get_host("nope").await.unwrap(), None);
    }

    pub(crate) async fn host_connected_keeps_a_host_draining(_db: &TestDatabase, store: DynStore) {
        host(&store, "h1", "r1", "img", 4).await;
        assert_eq!(store.drain_host("h1").await.unwrap().unwrap().state, HostState::Draining);
        let again = host(&store, "h1", "r1", "img", 4).await;
        assert_eq!((again.state, again.generation), (HostState::Draining, 2));
        // Also across a disconnect, which forgets the state but not the drain.
        assert!(store.host_disconnected("h1", 2).await.unwrap());
        assert_eq!(host_state(&store, "h1").await, HostState::Disconnected);
        let back = host(&store, "h1", "r1", "img", 4).await;
        assert_eq!((back.state, back.generation), (HostState::Draining, 3));
    }

    pub(crate) async fn host_disconnected_honours_the_generation(_db: &TestDatabase, store: DynStore) {
        host(&store, "h1", "r1", "img", 4).await;
        host(&store, "h1", "r1", "img", 4).await;
        assert!(!store.host_disconnected("h1", 1).await.unwrap(), "an old connection must not win");
        let host1 = store.get_host("h1").await.unwrap().unwrap();
        assert_eq!((host1.state, host1.disconnected_at), (HostState::Active, None));

        assert!(store.host_disconnected("h1", 2).await.unwrap());
        let host1 = store.get_host("h1").await.unwrap().unwrap();
        assert_eq!(host1.state, HostState::Disconnected);
        assert!(host1.disconnected_at.is_some());
        assert!(!store.host_disconnected("h1", 2).await.unwrap(), "already disconnected");
        assert!(!store.host_disconnected("unknown", 1).await.unwrap());

        host(&store, "h2", "r1", "img", 4).await;
        store.mark_host_lost("h2", None).await.unwrap();
        assert!(!store.host_disconnected("h2", 1).await.unwrap(), "UNHEALTHY stays");
        assert_eq!(host_state(&store, "h2").await, HostState::Unhealthy);

        host(&store, "h3", "r1", "img", 4).await;
        store.drain_host("h3").await.unwrap();
        assert!(store.host_disconnected("h3", 1).await.unwrap(), "DRAINING disconnects too");
        assert_eq!(host_state(&store, "h3").await, HostState::Disconnected);
    }

    pub(crate) async fn record_heartbeat_ignores_other_generations(_db: &TestDatabase, store: DynStore) {
        host(&store, "h1", "r1", "img", 4).await;
        host(&store, "h1", "r1", "img", 4).await;
        let at = DateTime::from_timestamp_micros(1_900_000_000_123_456).unwrap();
        let mark = |host_id: &str, generation| [HeartbeatMark { host_id: host_id.to_owned(), generation }];
        store.record_heartbeats(&mark("h1", 2), at).await.unwrap();
        assert_eq!(store.get_host("h1").await.unwrap().unwrap().last_heartbeat_at, Some(at));
        let stale = at + chrono::Duration::seconds(10);
        store.record_heartbeats(&mark("h1", 1), stale).await.unwrap();
        assert_eq!(store.get_host("h1").await.unwrap().unwrap().last_heartbeat_at, Some(at));
        store.record_heartbeats(&mark("unknown", 1), stale).await.unwrap();
    }

    pub(crate) async fn record_heartbeats_writes_a_batch_of_current_generations(_db: &TestDatabase, store: DynStore) {
        host(&store, "h1", "r1", "img", 4).await;
        host(&store, "h2", "r1", "img", 4).await;
        host(&store, "h2", "r1", "img", 4).await;
        host(&store, "h3", "r1", "img", 4).await;
        let before = store.get_host("h3").await.unwrap().unwrap().last_heartbeat_at;
        let at = DateTime::from_timestamp_micros(1_900_000_000_654_321).unwrap();
        let mark = |host_id: &str, generation| HeartbeatMark { host_id: host_id.to_owned(), generation };
        // h2's generation 1 is stale; "ghost" does not exist; h3 is not in the batch.
        let batch = [mark("h1", 1), mark("h2", 1), mark("ghost", 1)];
        store.record_heartbeats(&batch, at).await.unwrap();
        assert_eq!(store.get_host("h1").await.unwrap().unwrap().last_heartbeat_at, Some(at));
        assert_ne!(store.get_host("h2").await.unwrap().unwrap().last_heartbeat_at, Some(at));
        assert_eq!(store.get_host("h3").await.unwrap().unwrap().last_heartbeat_at, before);
        store.record_heartbeats(&[mark("h2", 2), mark("h3", 1)], at).await.unwrap();
        assert_eq!(store.get_host("h2").await.unwrap().unwrap().last_heartbeat_at, Some(at));
        assert_eq!(store.get_host("h3").await.unwrap().unwrap().last_heartbeat_at, Some(at));
        store.record_heartbeats(&[], at).await.unwrap();
        // A generation beyond what the database can hold is ignored, not an error.
        store.record_heartbeats(&[mark("h1", u64::MAX)], at + chrono::Duration::seconds(1)).await.unwrap();
        assert_eq!(store.get_host("h1").await.unwrap().unwrap().last_heartbeat_at, Some(at));
    }

    /// Heartbeat batches and bookkeeping batches (which lock their hosts in
    /// id order) racing over the same hosts: every write succeeds. The hosts
    /// are created in reverse id order, so a statement that locks rows in
    /// the order it finds them on disk takes them against id order; that is
    /// how a heartbeat batch deadlocked with the bookkeeping in run R.
    pub(crate) async fn heartbeat_and_bookkeeping_batches_do_not_deadlock(_db: &TestDatabase, store: DynStore) {
        let ids: Vec<String> = (0..40).rev().map(|i| format!("h{i:02}")).collect();
        for id in &ids {
            host(&store, id, "r1", "img", 4).await;
        }
        let mut tasks = Vec::new();
        for task in 0..8_usize {
            let store = store.clone();
            let mut order = ids.clone();
            if task % 2 == 1 {
                order.reverse();
            }
            tasks.push(tokio::spawn(async move {
                for round in 0..25 {
                    if task < 6 {
                        let beats: Vec<HeartbeatMark> =
                            order.iter().map(|id| HeartbeatMark { host_id: id.clone(), generation: 1 }).collect();
                        store.record_heartbeats(&beats, Utc::now()).await?;
                    } else {
                        // Unknown boxes: nothing is recycled, but the batch
                        // locks every host it names, as a real one does.
                        let batch: Vec<TornDown> = order
                            .iter()
                            .skip(round % 3)
                            .map(|id| TornDown { host_id: id.clone(), id: Uuid::new_v4(), replacement: None })
                            .collect();
                        store.recycle_torn_down_many(&batch).await?;
                    }
                }
                Ok::<_, StoreError>(())
            }));
        }
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        let beaten = store.list_hosts(None).await.unwrap();
        assert_eq!(beaten.len(), 40);
        assert!(beaten.iter().all(|summary| summary.host.last_heartbeat_at.is_some()));
    }

    pub(crate) async fn drain_host_moves_only_active_hosts(_db: &TestDatabase, store: DynStore) {
        assert_eq!(store.drain_host("unknown").await.unwrap(), None);
        host(&store, "h1", "r1", "img", 4).await;
        assert_eq!(store.drain_host("h1").await.unwrap().unwrap().state, HostState::Draining);
        assert_eq!(store.drain_host("h1").await.unwrap().unwrap().state, HostState::Draining);

        host(&store, "h2", "r1", "img", 4).await;
        store.host_disconnected("h2", 1).await.unwrap();
        assert_eq!(store.drain_host("h2").await.unwrap().unwrap().state, HostState::Disconnected);
        host(&store, "h3", "r1", "img", 4).await;
        store.mark_host_lost("h3", Some(1)).await.unwrap();
        assert_eq!(store.drain_host("h3").await.unwrap().unwrap().state, HostState::Unhealthy);
    }

    pub(crate) async fn mark_host_lost_loses_boxes_and_ends_their_sessions(_db: &TestDatabase, store: DynStore) {
        host(&store, "h1", "r1", "img", 5).await;
        host(&store, "h2", "r2", "img", 5).await;
        let running = running_session(&store, "h1", "r1", "u1").await;
        warm_box(&store, "h1", APP).await;
        let assigning = claim(&store, "u2", &["r1"]).await;
        assert_eq!(assigning.mandelbox.host_id, "h1");
        let waiting = warm_box(&store, "h1", APP).await;
        let spawning = spawning_box(&store, "h1", APP).await;
        let elsewhere = running_session(&store, "h2", "r2", "u3").await;

        let ended = store.mark_host_lost("h1", Some(1)).await.unwrap();
        let ended_ids: HashSet<Uuid> = ended.iter().map(|session| session.id).collect();
        assert_eq!(ended_ids, HashSet::from([running.session.id, assigning.session.id]));
        for session in &ended {
            assert_eq!(session.state, SessionState::Ended);
            assert_eq!(session.end_reason, Some(EndReason::HostLost));
            assert!(session.ended_at.is_some());
        }
        assert_eq!(host_state(&store, "h1").await, HostState::Unhealthy);
        for id in [running.mandelbox.id, assigning.mandelbox.id, waiting.id, spawning.id] {
            assert_eq!(box_state(&store, id).await, MandelboxState::Lost);
        }
        assert_eq!(session(&store, elsewhere.session.id).await.state, SessionState::Running);
        assert_eq!(box_state(&store, elsewhere.mandelbox.id).await, MandelboxState::Running);
        assert_eq!(store.count_live_sessions("u1").await.unwrap(), 0);
        // A second call has nothing left to do.
        assert!(store.mark_host_lost("h1", None).await.unwrap().is_empty());
    }

    pub(crate) async fn mark_host_lost_honours_the_generation(_db: &TestDatabase, store: DynStore) {
        assert!(store.mark_host_lost("unknown", None).await.unwrap().is_empty());
        host(&store, "h1", "r1", "img", 5).await;
        host(&store, "h1", "r1", "img", 5).await;
        let running = running_session(&store, "h1", "r1", "u1").await;

        assert!(store.mark_host_lost("h1", Some(1)).await.unwrap().is_empty());
        assert_eq!(host_state(&store, "h1").await, HostState::Active);
        assert_eq!(box_state(&store, running.mandelbox.id).await, MandelboxState::Running);
        assert_eq!(session(&store, running.session.id).await.state, SessionState::Running);

        let ended = store.mark_host_lost("h1", Some(2)).await.unwrap();
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].id, running.session.id);
        assert_eq!(host_state(&store, "h1").await, HostState::Unhealthy);
    }

    pub(crate) async fn list_hosts_counts_boxes_by_kind(_db: &TestDatabase, store: DynStore) {
        host(&store, "h-b", "r1", "img", 10).await;
        host(&store, "h-a", "r1", "img", 10).await;
        host(&store, "h-c", "r2", "img", 3).await;
        spawning_box(&store, "h-b", APP).await;
        warm_box(&store, "h-b", APP).await;
        running_session(&store, "h-b", "r1", "u1").await; // RUNNING
        claim(&store, "u2", &["r1"]).await; // takes the WAITING box: ALLOCATED
        warm_box(&store, "h-b", APP).await;
        let ended = running_session(&store, "h-b", "r1", "u3").await;
        store.end_session(ended.session.id, EndReason::UserEnded).await.unwrap(); // DYING
        let dead = spawning_box(&store, "h-b", APP).await;
        store.mandelbox_finished(dead.id, MandelboxState::Dead, EndReason::MandelboxExited).await.unwrap();

        let all = store.list_hosts(None).await.unwrap();
        let listed: Vec<&str> = all.iter().map(|summary| summary.host.id.as_str()).collect();
        assert_eq!(listed, vec!["h-a", "h-b", "h-c"]);
        let h_b = &all[1];
        assert_eq!((h_b.warm, h_b.assigned, h_b.live), (2, 2, 5));
        assert_eq!((all[0].warm, all[0].assigned, all[0].live), (0, 0, 0));
        assert_eq!(h_b.host, store.get_host("h-b").await.unwrap().unwrap());

        let r2 = store.list_hosts(Some("r2")).await.unwrap();
        assert_eq!(r2.len(), 1);
        assert_eq!(r2[0].host.id, "h-c");
        assert!(store.list_hosts(Some("nowhere")).await.unwrap().is_empty());

        // One host's summary is the same as its line in the list.
        assert_eq!(store.host_summary("h-b").await.unwrap().as_ref(), Some(h_b));
        assert_eq!(store.host_summary("h-a").await.unwrap().as_ref(), Some(&all[0]));
        assert_eq!(store.host_summary("nowhere").await.unwrap(), None);
    }

    pub(crate) async fn box_coming_in_sees_free_and_freeing_boxes_of_active_hosts(_db: &TestDatabase, store: DynStore) {
        host(&store, "h1", "r1", "img", 10).await;
        host(&store, "h2", "r2", "img", 10).await;
        let coming = |regions: &'static [&'static str]| {
            let store = store.clone();
            async move {
                let regions: Vec<String> = regions.iter().map(|region| (*region).to_owned()).collect();
                store.box_coming_in(&regions).await.unwrap()
            }
        };
        assert!(!coming(&["r1", "r2"]).await, "no boxes at all");
        let running = running_session(&store, "h1", "r1", "u1").await;
        assert!(!coming(&["r1"]).await, "a RUNNING box is taken");

        let spawning = spawning_box(&store, "h1", APP).await;
        assert!(coming(&["r1"]).await, "SPAWNING");
        assert!(coming(&["r3", "r1"]).await, "any of the regions");
        assert!(!coming(&["r2", "r3"]).await, "only the regions asked for");
        assert!(!coming(&[]).await);
        store.mandelbox_finished(spawning.id, MandelboxState::Dead, EndReason::MandelboxExited).await.unwrap();
        assert!(!coming(&["r1"]).await, "a DEAD box is gone");

        warm_box(&store, "h1", APP).await;
        assert!(coming(&["r1"]).await, "WAITING");
        claim(&store, "u2", &["r1"]).await;
        assert!(!coming(&["r1"]).await, "its claim took it");
        store.end_session(running.session.id, EndReason::UserEnded).await.unwrap();
        assert_eq!(box_state(&store, running.mandelbox.id).await, MandelboxState::Dying);
        assert!(coming(&["r1"]).await, "DYING: its replacement is on the way");

        warm_box(&store, "h2", APP).await;
        assert!(coming(&["r2"]).await);
        store.drain_host("h2").await.unwrap();
        assert!(!coming(&["r2"]).await, "a draining host gets no new sessions");
    }

    pub(crate) async fn hosts_disconnected_before_a_cutoff(_db: &TestDatabase, store: DynStore) {
        host(&store, "h1", "r1", "img", 1).await;
        host(&store, "h2", "r1", "img", 1).await;
        host(&store, "h3", "r1", "img", 1).await;
        let before = tick().await;
        store.host_disconnected("h2", 1).await.unwrap();
        store.host_disconnected("h1", 1).await.unwrap();
        let after = tick().await;

        assert!(store.hosts_disconnected_before(before).await.unwrap().is_empty());
        let listed: Vec<String> =
            store.hosts_disconnected_before(after).await.unwrap().into_iter().map(|host| host.id).collect();
        assert_eq!(listed, vec!["h2", "h1"], "oldest disconnect first");
    }

    pub(crate) async fn connected_hosts_changed_before_a_cutoff(_db: &TestDatabase, store: DynStore) {
        host(&store, "h-draining", "r1", "img", 1).await;
        host(&store, "h-active", "r1", "img", 1).await;
        host(&store, "h-gone", "r1", "img", 1).await;
        host(&store, "h-lost", "r1", "img", 1).await;
        store.drain_host("h-draining").await.unwrap();
        store.host_disconnected("h-gone", 1).await.unwrap();
        store.mark_host_lost("h-lost", None).await.unwrap();
        let before = tick().await;
        host(&store, "h-late", "r1", "img", 1).await;
        let after = tick().await;

        let listed = |cutoff| {
            let store = store.clone();
            async move {
                let hosts = store.connected_hosts_changed_before(cutoff).await.unwrap();
                hosts.into_iter().map(|host| host.id).collect::<Vec<_>>()
            }
        };
        assert_eq!(listed(before).await, ["h-active", "h-draining"], "connected, by id, changed before the cutoff");
        assert_eq!(listed(after).await, ["h-active", "h-draining", "h-late"]);
    }

    pub(crate) async fn mark_connected_hosts_disconnected_at_start_up(_db: &TestDatabase, store: DynStore) {
        host(&store, "h1", "r1", "img", 1).await;
        host(&store, "h2", "r1", "img", 1).await;
        host(&store, "h3", "r1", "img", 1).await;
        host(&store, "h4", "r1", "img", 1).await;
        host(&store, "h5", "r1", "img", 1).await;
        store.drain_host("h2").await.unwrap();
        store.host_disconnected("h3", 1).await.unwrap();
        let h3_disconnected_at = store.get_host("h3").await.unwrap().unwrap().disconnected_at;
        store.mark_host_lost("h4", None).await.unwrap();

        let at = DateTime::from_timestamp_micros(1_800_000_000_000_001).unwrap();
        assert_eq!(store.mark_connected_hosts_disconnected(at).await.unwrap(), 3);
        for id in ["h1", "h2", "h5"] {
            let host = store.get_host(id).await.unwrap().unwrap();
            assert_eq!((host.state, host.disconnected_at), (HostState::Disconnected, Some(at)), "{id}");
        }
        let h3 = store.get_host("h3").await.unwrap().unwrap();
        assert_eq!(h3.disconnected_at, h3_disconnected_at);
        assert_eq!(host_state(&store, "h4").await, HostState::Unhealthy);
        assert_eq!(store.mark_connected_hosts_disconnected(at).await.unwrap(), 0);
    }

    pub(crate) async fn stripe_customer_is_remembered_once(_db: &TestDatabase, store: DynStore) {
        assert_eq!(store.get_user("nobody").await.unwrap(), None);
        assert_eq!(store.set_stripe_customer("nobody", "cus_1").await.unwrap(), None);
        store.ensure_user("u1", Some("u1@example.com")).await.unwrap();
        let user = store.get_user("u1").await.unwrap().unwrap();
        assert_eq!(user.email.as_deref(), Some("u1@example.com"));
        assert_eq!(user.stripe_customer_id, None);
        assert_eq!(store.set_stripe_customer("u1", "cus_1").await.unwrap().as_deref(), Some("cus_1"));
        // A second (racing) customer does not replace the first.
        assert_eq!(store.set_stripe_customer("u1", "cus_2").await.unwrap().as_deref(), Some("cus_1"));
        assert_eq!(store.get_user("u1").await.unwrap().unwrap().stripe_customer_id.as_deref(), Some("cus_1"));
    }

    pub(crate) async fn config_entries_are_read_by_key(db: &TestDatabase, store: DynStore) {
        assert!(store.config_entries().await.unwrap().is_empty());
        db.execute(
            "INSERT INTO config (key, value) VALUES ('hosts.missed_heartbeats', '4'), ('allocation.max_regions', '8')",
        )
        .await
        .unwrap();
        assert_eq!(
            store.config_entries().await.unwrap(),
            vec![
                ("allocation.max_regions".to_owned(), "8".to_owned()),
                ("hosts.missed_heartbeats".to_owned(), "4".to_owned()),
            ]
        );
    }

    pub(crate) async fn reconcile_host_compares_reported_and_stored_boxes(_db: &TestDatabase, store: DynStore) {
        host(&store, "h1", "r1", "img", 20).await;
        host(&store, "h2", "r2", "img", 20).await;
        // Every claim happens while h1 has exactly one WAITING box.
        let running = running_session(&store, "h1", "r1", "u1").await;
        warm_box(&store, "h1", APP).await;
        let allocated = claim(&store, "u2", &["r1"]).await;
        let dying = running_session(&store, "h1", "r1", "u3").await;
        store.end_session(dying.session.id, EndReason::UserEnded).await.unwrap();
        let waiting = warm_box(&store, "h1", APP).await;
        let spawning = spawning_box(&store, "h1", APP).await;
        let dead = spawning_box(&store, "h1", APP).await;
        store.mandelbox_finished(dead.id, MandelboxState::Dead, EndReason::MandelboxExited).await.unwrap();
        let missing_waiting = warm_box(&store, "h1", APP).await;
        // Reserved after the host's Hello: its spawn is in flight, not lost.
        let in_flight = spawning_box(&store, "h1", APP).await;
        let on_other_host = warm_box(&store, "h2", APP).await;
        let unknown = Uuid::new_v4();

        let reported: Vec<ReportedMandelbox> = [
            waiting.id,
            unknown,
            running.mandelbox.id,
            spawning.id,
            dying.mandelbox.id,
            dead.id,
            on_other_host.id,
            unknown,
        ]
        .into_iter()
        .map(|id| ReportedMandelbox { id, assigned: id == running.mandelbox.id })
        .collect();
        let outcome = store.reconcile_host("h1", &reported, long_ago()).await.unwrap();

        assert_eq!(outcome.teardown, vec![unknown, spawning.id, dying.mandelbox.id, dead.id, on_other_host.id]);
        assert_eq!(outcome.lost, vec![allocated.mandelbox.id, missing_waiting.id]);
        assert_eq!(outcome.ended_sessions.len(), 1);
        let ended = &outcome.ended_sessions[0];
        assert_eq!(ended.id, allocated.session.id);
        assert_eq!((ended.state, ended.end_reason), (SessionState::Ended, Some(EndReason::HostLost)));

        assert_eq!(box_state(&store, waiting.id).await, MandelboxState::Waiting);
        assert_eq!(box_state(&store, running.mandelbox.id).await, MandelboxState::Running);
        assert_eq!(session(&store, running.session.id).await.state, SessionState::Running);
        assert_eq!(box_state(&store, spawning.id).await, MandelboxState::Dead);
        assert_eq!(box_state(&store, dying.mandelbox.id).await, MandelboxState::Dying);
        assert_eq!(box_state(&store, dead.id).await, MandelboxState::Dead);
        assert_eq!(box_state(&store, allocated.mandelbox.id).await, MandelboxState::Lost);
        assert_eq!(box_state(&store, missing_waiting.id).await, MandelboxState::Lost);
        assert_eq!(box_state(&store, on_other_host.id).await, MandelboxState::Waiting, "not h1's");
        assert_eq!(box_state(&store, in_flight.id).await, MandelboxState::Spawning, "in flight, not lost");
        assert_eq!(store.get_mandelbox(unknown).await.unwrap(), None);

        // The host finished the teardown while away: the DYING box is gone
        // from its report, so it is LOST; after that nothing changes.
        let kept = [
            ReportedMandelbox { id: waiting.id, assigned: false },
            ReportedMandelbox { id: running.mandelbox.id, assigned: true },
        ];
        let again = store.reconcile_host("h1", &kept, long_ago()).await.unwrap();
        assert_eq!(again.lost, vec![dying.mandelbox.id]);
        assert!(again.teardown.is_empty());
        assert!(again.ended_sessions.is_empty(), "its session had ended already");
        assert_eq!(box_state(&store, dying.mandelbox.id).await, MandelboxState::Lost);
        assert_eq!(store.reconcile_host("h1", &kept, long_ago()).await.unwrap(), Default::default());
    }

    pub(crate) async fn reconcile_host_releases_stale_claims_the_host_never_got(_db: &TestDatabase, store: DynStore) {
        host(&store, "h1", "r1", "img", 20).await;
        // Claimed, but the replica died before its Assign reached the host.
        let never_told = running_session(&store, "h1", "r1", "u1").await;
        let pending_never_told = assigning_claim(&store, "h1", "u2", "r1").await;
        let told = running_session(&store, "h1", "r1", "u3").await;
        let reported = [
            ReportedMandelbox { id: never_told.mandelbox.id, assigned: false },
            ReportedMandelbox { id: pending_never_told.mandelbox.id, assigned: false },
            ReportedMandelbox { id: told.mandelbox.id, assigned: true },
        ];

        // Claims younger than the cutoff may have their Assign in flight.
        let young = store.reconcile_host("h1", &reported, long_ago()).await.unwrap();
        assert_eq!(young, Default::default());
        assert_eq!(session(&store, never_told.session.id).await.state, SessionState::Running);

        tick().await;
        let outcome = store.reconcile_host("h1", &reported, chrono::Utc::now()).await.unwrap();
        assert_eq!(outcome.unassigned, vec![never_told.mandelbox.id, pending_never_told.mandelbox.id]);
        assert!(outcome.teardown.is_empty() && outcome.lost.is_empty());
        let mut ended: Vec<Uuid> = outcome.ended_sessions.iter().map(|session| session.id).collect();
        ended.sort();
        let mut expected = vec![never_told.session.id, pending_never_told.session.id];
        expected.sort();
        assert_eq!(ended, expected);
        for id in [never_told.session.id, pending_never_told.session.id] {
            let ended = session(&store, id).await;
            assert_eq!((ended.state, ended.end_reason), (SessionState::Ended, Some(EndReason::AssignFailed)));
        }
        for id in [never_told.mandelbox.id, pending_never_told.mandelbox.id] {
            let released = store.get_mandelbox(id).await.unwrap().unwrap();
            assert_eq!((released.state, released.session_id), (MandelboxState::Waiting, None), "warm again");
        }
        assert_eq!(session(&store, told.session.id).await.state, SessionState::Running, "the host has it");
        assert_eq!(box_state(&store, told.mandelbox.id).await, MandelboxState::Running);

        // A released box is claimable again, and its new claim is young.
        let reclaimed = claim(&store, "u4", &["r1"]).await;
        assert!([never_told.mandelbox.id, pending_never_told.mandelbox.id].contains(&reclaimed.mandelbox.id));
    }

    pub(crate) async fn reconcile_unknown_host_tears_everything_down(_db: &TestDatabase, store: DynStore) {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let reported = [ReportedMandelbox { id: a, assigned: false }, ReportedMandelbox { id: b, assigned: true }];
        let outcome = store.reconcile_host("ghost", &reported, long_ago()).await.unwrap();
        assert_eq!(outcome.teardown, vec![a, b]);
        assert!(outcome.lost.is_empty());
        assert!(outcome.ended_sessions.is_empty());
    }

    // ----- mandelboxes --------------------------------------------------

    pub(crate) async fn reserve_mandelbox_respects_capacity(_db: &TestDatabase, store: DynStore) {
        host(&store, "h1", "r1", "img", 2).await;
        let session_id = Uuid::new_v4();
        let new = new_box(APP, Some(session_id));
        let first = store.reserve_mandelbox("h1", &new).await.unwrap().unwrap();
        assert_eq!(first.id, new.id);
        assert_eq!(first.host_id, "h1");
        assert_eq!(first.region, "r1");
        assert_eq!(first.app, APP);
        assert_eq!(first.state, MandelboxState::Spawning);
        assert_eq!(first.session_id, Some(session_id));
        assert!(first.ports.is_empty());
        assert_eq!(store.get_mandelbox(first.id).await.unwrap(), Some(first.clone()));

        let second = spawning_box(&store, "h1", APP).await;
        assert_eq!(store.reserve_mandelbox("h1", &new_box(APP, None)).await.unwrap(), None);
        store.mandelbox_finished(second.id, MandelboxState::Dead, EndReason::MandelboxExited).await.unwrap();
        assert!(store.reserve_mandelbox("h1", &new_box(APP, None)).await.unwrap().is_some());
        assert_eq!(store.reserve_mandelbox("h1", &new_box(APP, None)).await.unwrap(), None);

        assert_eq!(store.reserve_mandelbox("unknown", &new_box(APP, None)).await.unwrap(), None);
        host(&store, "h2", "r1", "img", 2).await;
        store.drain_host("h2").await.unwrap();
        assert_eq!(store.reserve_mandelbox("h2", &new_box(APP, None)).await.unwrap(), None);
        host(&store, "h3", "r1", "img", 2).await;
        store.host_disconnected("h3", 1).await.unwrap();
        assert_eq!(store.reserve_mandelbox("h3", &new_box(APP, None)).await.unwrap(), None);
    }

    pub(crate) async fn reserve_mandelboxes_takes_what_fits_in_order(_db: &TestDatabase, store: DynStore) {
        host(&store, "h1", "r1", "img", 3).await;
        spawning_box(&store, "h1", APP).await;
        let news: Vec<_> = (0..4).map(|_| new_box(APP, None)).collect();
        let reserved = store.reserve_mandelboxes("h1", &news).await.unwrap();
        let ids: Vec<Uuid> = reserved.iter().map(|mandelbox| mandelbox.id).collect();
        assert_eq!(ids, vec![news[0].id, news[1].id], "two free slots, filled from the front");
        assert!(reserved.iter().all(|mandelbox| mandelbox.state == MandelboxState::Spawning));
        for mandelbox in &reserved {
            let auth = store.mandelbox_auth(mandelbox.id).await.unwrap().unwrap();
            let new = news.iter().find(|new| new.id == mandelbox.id).unwrap();
            assert_eq!(auth.token_hash, new.token_hash);
        }
        assert!(store.reserve_mandelboxes("h1", &[new_box(APP, None)]).await.unwrap().is_empty());
        assert!(store.reserve_mandelboxes("h1", &[]).await.unwrap().is_empty());
        assert!(store.reserve_mandelboxes("unknown", &news).await.unwrap().is_empty());
        let live = store.host_mandelboxes("h1", &[MandelboxState::Spawning]).await.unwrap();
        assert_eq!(live.len(), 3);
    }

    pub(crate) async fn mandelbox_token_hash_is_stored_for_auth(_db: &TestDatabase, store: DynStore) {
        host(&store, "h1", "r1", "img", 2).await;
        let new = new_box(APP, None);
        let reserved = store.reserve_mandelbox("h1", &new).await.unwrap().unwrap();
        let auth = store.mandelbox_auth(reserved.id).await.unwrap().unwrap();
        assert_eq!(auth.token_hash, new.token_hash);
        assert_eq!(auth.mandelbox, reserved);
        assert_eq!(store.mandelbox_auth(Uuid::new_v4()).await.unwrap(), None);
    }

    pub(crate) async fn reserve_in_regions_picks_first_region_then_fullest_host(_db: &TestDatabase, store: DynStore) {
        region(&store, "r1", "img-1").await;
        region(&store, "r2", "").await;
        host(&store, "h-r2", "r2", "anything", 5).await;
        host(&store, "h-emptier", "r1", "img-1", 4).await;
        host(&store, "h-fuller", "r1", "img-1", 4).await;
        host(&store, "h-wrong-image", "r1", "img-0", 4).await;
        host(&store, "h-draining", "r1", "img-1", 4).await;
        spawning_box(&store, "h-emptier", APP).await;
        for _ in 0..2 {
            spawning_box(&store, "h-fuller", APP).await;
        }
        for _ in 0..3 {
            spawning_box(&store, "h-draining", APP).await;
        }
        store.drain_host("h-draining").await.unwrap();
        let regions = vec!["r1".to_owned(), "r2".to_owned()];

        let reserve = |exclude: Vec<String>| {
            let store = store.clone();
            let regions = regions.clone();
            async move {
                store
                    .reserve_mandelbox_in_regions(&regions, &exclude, &new_box(APP, None))
                    .await
                    .unwrap()
                    .map(|mandelbox| mandelbox.host_id)
            }
        };
        assert_eq!(reserve(vec![]).await.as_deref(), Some("h-fuller")); // 2 free → 1 free
        assert_eq!(reserve(vec![]).await.as_deref(), Some("h-fuller")); // 1 free → full
        assert_eq!(reserve(vec!["h-emptier".to_owned()]).await.as_deref(), Some("h-r2"));
        for _ in 0..3 {
            assert_eq!(reserve(vec![]).await.as_deref(), Some("h-emptier"));
        }
        // r1 is full now (for hosts with the right image).
        assert_eq!(reserve(vec![]).await.as_deref(), Some("h-r2"));
        let r2_first = store
            .reserve_mandelbox_in_regions(&["r2".to_owned(), "r1".to_owned()], &[], &new_box(APP, None))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r2_first.host_id, "h-r2");
        assert_eq!(r2_first.region, "r2");
        assert_eq!(reserve(vec!["h-r2".to_owned()]).await, None);
        assert_eq!(store.reserve_mandelbox_in_regions(&[], &[], &new_box(APP, None)).await.unwrap(), None);
    }

    /// The on-demand reservation in a region of more hosts than one page of
    /// PostgreSQL's walk over its ranks (32): it finds room past hosts that
    /// filled since the last refresh, on a host that connected since, and,
    /// after a refresh, on a host that has freed a slot; none on a full fleet.
    pub(crate) async fn reservation_finds_room_past_hosts_filled_since_the_refresh(
        _db: &TestDatabase,
        store: DynStore,
    ) {
        for i in 0..40 {
            host(&store, &format!("h{i:02}"), "r1", "img", 2).await;
        }
        store.refresh_host_ranks().await.unwrap();
        // Every host but the last fills after the refresh: their ranks still
        // say two open slots each.
        let mut first_box = None;
        for i in 0..39 {
            for _ in 0..2 {
                let spawned = spawning_box(&store, &format!("h{i:02}"), APP).await;
                first_box.get_or_insert(spawned);
            }
        }
        let reserve = || {
            let store = store.clone();
            async move {
                store
                    .reserve_mandelbox_in_regions(&["r1".to_owned()], &[], &new_box(APP, None))
                    .await
                    .unwrap()
                    .map(|mandelbox| mandelbox.host_id)
            }
        };
        assert_eq!(reserve().await.as_deref(), Some("h39"));
        assert_eq!(reserve().await.as_deref(), Some("h39"));
        assert_eq!(reserve().await, None, "every host is full");

        // A host that connects after the refresh is offered at once.
        host(&store, "h-new", "r1", "img", 1).await;
        assert_eq!(reserve().await.as_deref(), Some("h-new"));
        assert_eq!(reserve().await, None);

        // Ranked full (as it reconnects), then a box gone: offered from the
        // next refresh on.
        let gone = first_box.expect("boxes were reserved");
        host(&store, &gone.host_id, "r1", "img", 2).await;
        store.mandelbox_finished(gone.id, MandelboxState::Dead, EndReason::MandelboxExited).await.unwrap();
        store.refresh_host_ranks().await.unwrap();
        assert_eq!(reserve().await.as_deref(), Some(gone.host_id.as_str()));
        assert_eq!(reserve().await, None);
    }

    pub(crate) async fn hosts_with_open_slots_are_the_active_hosts_with_room(_db: &TestDatabase, store: DynStore) {
        host(&store, "h-room", "r1", "img", 2).await;
        host(&store, "h-full", "r1", "img", 1).await;
        host(&store, "h-freed", "r2", "img", 1).await;
        host(&store, "h-draining", "r1", "img", 2).await;
        spawning_box(&store, "h-room", APP).await;
        spawning_box(&store, "h-full", APP).await;
        let freed = spawning_box(&store, "h-freed", APP).await;
        store.refresh_host_ranks().await.unwrap();
        // Drained since the refresh: no longer named.
        store.drain_host("h-draining").await.unwrap();
        assert_eq!(store.hosts_with_open_slots().await.unwrap(), ["h-room"], "full and draining hosts are not");

        // A box that died frees its slot; a host filled has none.
        store.mandelbox_finished(freed.id, MandelboxState::Dead, EndReason::MandelboxExited).await.unwrap();
        spawning_box(&store, "h-room", APP).await;
        store.refresh_host_ranks().await.unwrap();
        assert_eq!(store.hosts_with_open_slots().await.unwrap(), ["h-freed"]);

        // A host that connects is named at once, before any refresh.
        host(&store, "h-new", "r2", "img", 1).await;
        assert_eq!(store.hosts_with_open_slots().await.unwrap(), ["h-freed", "h-new"]);
    }

    pub(crate) async fn concurrent_reservations_respect_capacity(_db: &TestDatabase, store: DynStore) {
        host(&store, "h1", "r1", "img", 5).await;
        host(&store, "h2", "r2", "img", 3).await;
        host(&store, "h3", "r2", "img", 3).await;
        let on_host: Vec<_> = (0..20)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { store.reserve_mandelbox("h1", &new_box(APP, None)).await })
            })
            .collect();
        let in_regions: Vec<_> = (0..15)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move {
                    store.reserve_mandelbox_in_regions(&["r2".to_owned()], &[], &new_box(APP, None)).await
                })
            })
            .collect();
        let mut reserved_on_host = 0;
        for task in on_host {
            reserved_on_host += usize::from(task.await.unwrap().unwrap().is_some());
        }
        let mut reserved_in_regions = 0;
        for task in in_regions {
            reserved_in_regions += usize::from(task.await.unwrap().unwrap().is_some());
        }
        assert_eq!(reserved_on_host, 5);
        assert_eq!(reserved_in_regions, 6);
        let live: Vec<(String, u32)> =
            store.list_hosts(None).await.unwrap().into_iter().map(|summary| (summary.host.id, summary.live)).collect();
        assert_eq!(live, vec![("h1".to_owned(), 5), ("h2".to_owned(), 3), ("h3".to_owned(), 3)]);
    }

    pub(crate) async fn mandelbox_spawned_goes_waiting_or_allocated(_db: &TestDatabase, store: DynStore) {
        host(&store, "h1", "r1", "img", 10).await;
        let plain = spawning_box(&store, "h1", APP).await;
        let spawned = store.mandelbox_spawned(plain.id, &ports()).await.unwrap().unwrap();
        assert_eq!(spawned.state, MandelboxState::Waiting);
        assert_eq!(spawned.ports, ports());
        assert_eq!(spawned.session_id, None);
        assert_eq!(store.get_mandelbox(plain.id).await.unwrap(), Some(spawned));
        assert_eq!(store.mandelbox_spawned(plain.id, &[]).await.unwrap(), None, "not SPAWNING");
        assert_eq!(store.get_mandelbox(plain.id).await.unwrap().unwrap().ports, ports());
        assert_eq!(store.mandelbox_spawned(Uuid::new_v4(), &ports()).await.unwrap(), None);

        let waiting = pending(store.create_session_and_claim(&new_session("u1", &["r9"]), NO_LIMIT).await.unwrap());
        let reserved = store.reserve_mandelbox("h1", &new_box(APP, Some(waiting.id))).await.unwrap().unwrap();
        let spawned = store.mandelbox_spawned(reserved.id, &ports()).await.unwrap().unwrap();
        assert_eq!(spawned.state, MandelboxState::Allocated);
        assert_eq!(spawned.session_id, Some(waiting.id));
        // The session itself is only moved by attach_reserved.
        assert_eq!(session(&store, waiting.id).await.state, SessionState::Pending);

        // Reserved for a session that ended meanwhile: the box joins the pool.
        let gone = pending(store.create_session_and_claim(&new_session("u2", &["r9"]), NO_LIMIT).await.unwrap());
        let reserved = store.reserve_mandelbox("h1", &new_box(APP, Some(gone.id))).await.unwrap().unwrap();
        store.end_session(gone.id, EndReason::UserEnded).await.unwrap();
        let spawned = store.mandelbox_spawned(reserved.id, &ports()).await.unwrap().unwrap();
        assert_eq!((spawned.state, spawned.session_id), (MandelboxState::Waiting, None));
    }

    pub(crate) async fn mandelbox_finished_ends_the_session_on_it(_db: &TestDatabase, store: DynStore) {
        host(&store, "h1", "r1", "img", 10).await;
        let running = running_session(&store, "h1", "r1", "u1").await;
        let (before, ended) = store
            .mandelbox_finished(running.mandelbox.id, MandelboxState::Dead, EndReason::MandelboxExited)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(before.state, MandelboxState::Running);
        assert_eq!(before.id, running.mandelbox.id);
        let ended = ended.unwrap();
        assert_eq!(ended.id, running.session.id);
        assert_eq!((ended.state, ended.end_reason), (SessionState::Ended, Some(EndReason::MandelboxExited)));
        assert!(ended.ended_at.is_some());
        assert_eq!(session(&store, running.session.id).await, ended);
        assert_eq!(box_state(&store, running.mandelbox.id).await, MandelboxState::Dead);
        assert_eq!(
            store.mandelbox_finished(running.mandelbox.id, MandelboxState::Lost, EndReason::HostLost).await.unwrap(),
            None,
            "already finished"
        );
        assert_eq!(
            store.mandelbox_finished(Uuid::new_v4(), MandelboxState::Dead, EndReason::MandelboxExited).await.unwrap(),
            None
        );

        let waiting = warm_box(&store, "h1", APP).await;
        let (before, ended) =
            store.mandelbox_finished(waiting.id, MandelboxState::Lost, EndReason::HostLost).await.unwrap().unwrap();
        assert_eq!((before.state, ended), (MandelboxState::Waiting, None));
        assert_eq!(box_state(&store, waiting.id).await, MandelboxState::Lost);

        // A spawn that fails leaves the session it was reserved for waiting.
        let queued = pending(store.create_session_and_claim(&new_session("u2", &["r9"]), NO_LIMIT).await.unwrap());
        let reserved = store.reserve_mandelbox("h1", &new_box(APP, Some(queued.id))).await.unwrap().unwrap();
        let (_, ended) = store
            .mandelbox_finished(reserved.id, MandelboxState::Dead, EndReason::MandelboxExited)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ended, None);
        assert_eq!(session(&store, queued.id).await.state, SessionState::Pending);

        let live = warm_box(&store, "h1", APP).await;
        assert!(store.mandelbox_finished(live.id, MandelboxState::Dying, EndReason::UserEnded).await.is_err());
        assert_eq!(box_state(&store, live.id).await, MandelboxState::Waiting);
    }

    pub(crate) async fn list_mandelboxes_filters_newest_first(_db: &TestDatabase, store: DynStore) {
        host(&store, "h1", "r1", "img", 10).await;
        host(&store, "h2", "r1", "img", 10).await;
        let a = spawning_box(&store, "h1", APP).await;
        tick().await;
        let b = warm_box(&store, "h2", APP).await;
        tick().await;
        let c = warm_box(&store, "h1", APP).await;
        tick().await;
        let d = spawning_box(&store, "h1", APP).await;
        store.mandelbox_finished(d.id, MandelboxState::Dead, EndReason::MandelboxExited).await.unwrap();

        let list = |filter: MandelboxFilter| {
            let store = store.clone();
            async move { ids(&store.list_mandelboxes(&filter).await.unwrap()) }
        };
        assert_eq!(list(MandelboxFilter::default()).await, vec![c.id, b.id, a.id]);
        assert_eq!(
            list(MandelboxFilter { include_finished: true, ..Default::default() }).await,
            vec![d.id, c.id, b.id, a.id]
        );
        assert_eq!(
            list(MandelboxFilter { host_id: Some("h1".to_owned()), ..Default::default() }).await,
            vec![c.id, a.id]
        );
        assert_eq!(
            list(MandelboxFilter { state: Some(MandelboxState::Waiting), ..Default::default() }).await,
            vec![c.id, b.id]
        );
        assert_eq!(
            list(MandelboxFilter {
                host_id: Some("h1".to_owned()),
                state: Some(MandelboxState::Dead),
                include_finished: true
            })
            .await,
            vec![d.id]
        );
        assert_eq!(
            list(MandelboxFilter { state: Some(MandelboxState::Dead), ..Default::default() }).await,
            Vec::<Uuid>::new(),
            "finished boxes need include_finished"
        );
    }

    pub(crate) async fn host_mandelboxes_lists_live_boxes_in_given_states(_db: &TestDatabase, store: DynStore) {
        host(&store, "h1", "r1", "img", 10).await;
        host(&store, "h2", "r1", "img", 10).await;
        let spawning = spawning_box(&store, "h1", APP).await;
        let waiting = warm_box(&store, "h1", APP).await;
        warm_box(&store, "h2", APP).await;
        let dead = spawning_box(&store, "h1", APP).await;
        store.mandelbox_finished(dead.id, MandelboxState::Dead, EndReason::MandelboxExited).await.unwrap();

        let listed = store
            .host_mandelboxes("h1", &[MandelboxState::Spawning, MandelboxState::Waiting, MandelboxState::Dead])
            .await
            .unwrap();
        assert_eq!(ids(&listed), vec![spawning.id, waiting.id]);
        assert_eq!(ids(&store.host_mandelboxes("h1", &[MandelboxState::Waiting]).await.unwrap()), vec![waiting.id]);
        assert!(store.host_mandelboxes("h1", &[MandelboxState::Running]).await.unwrap().is_empty());
        assert!(store.host_mandelboxes("h1", &[]).await.unwrap().is_empty());
    }

    pub(crate) async fn corrupt_rows_are_reported_not_panicked_on(db: &TestDatabase, store: DynStore) {
        host(&store, "h1", "r1", "img", 10).await;
        let mandelbox = warm_box(&store, "h1", APP).await;
        let changed = db.execute(r#"UPDATE mandelboxes SET ports = '[{"bogus": true}]'"#).await.unwrap();
        assert_eq!(changed, 1);
        let error = store.get_mandelbox(mandelbox.id).await.unwrap_err();
        assert!(matches!(error, StoreError::Corrupt(_)), "{error:?}");
    }

    // ----- sessions and claims -------------------------------------------

    pub(crate) async fn claim_takes_the_first_region_with_a_box(_db: &TestDatabase, store: DynStore) {
        host(&store, "h-east", "us-east-1", "img", 4).await;
        host(&store, "h-west", "us-west-1", "img", 4).await;
        let west = warm_box(&store, "h-west", APP).await;
        let east = warm_box(&store, "h-east", APP).await;

        let new = new_session("u1", &["eu-central-1", "us-west-1", "us-east-1"]);
        let first = claimed(store.create_session_and_claim(&new, NO_LIMIT).await.unwrap());
        assert_eq!(first.mandelbox.id, west.id);
        assert_eq!(first.mandelbox.state, MandelboxState::Running, "written RUNNING with the claim");
        assert_eq!(first.mandelbox.session_id, Some(new.id));
        assert_eq!(first.host, store.get_host("h-west").await.unwrap().unwrap());
        let session = &first.session;
        assert_eq!(session.id, new.id);
        assert_eq!(session.user_id, "u1");
        assert_eq!(session.state, SessionState::Running);
        assert_eq!(session.app, APP);
        assert_eq!(session.client_version, "3.1.0");
        assert_eq!(session.requested_regions, new.regions);
        assert_eq!(session.region.as_deref(), Some("us-west-1"));
        assert_eq!(session.mandelbox_id, Some(west.id));
        assert_eq!(session.host_id.as_deref(), Some("h-west"));
        assert_eq!((session.end_reason, session.ended_at), (None, None));
        assert_eq!(store.get_session(new.id).await.unwrap().as_ref(), Some(session));
        assert_eq!(store.get_mandelbox(west.id).await.unwrap(), Some(first.mandelbox.clone()));

        let next = claim(&store, "u2", &["eu-central-1", "us-west-1", "us-east-1"]).await;
        assert_eq!(next.mandelbox.id, east.id);
        let last = pending(store.create_session_and_claim(&new_session("u3", &["us-east-1"]), NO_LIMIT).await.unwrap());
        assert_eq!(last.state, SessionState::Pending);
    }

    pub(crate) async fn claim_prefers_the_fullest_host(_db: &TestDatabase, store: DynStore) {
        host(&store, "h-big", "r1", "img", 10).await;
        host(&store, "h-half", "r1", "img", 4).await;
        host(&store, "h-small", "r1", "img", 2).await;
        // h-half: one assigned box, so 3 free slots.
        running_session(&store, "h-half", "r1", "busy").await;
        let big = warm_box(&store, "h-big", APP).await;
        let half = warm_box(&store, "h-half", APP).await;
        let small = warm_box(&store, "h-small", APP).await;
        store.refresh_host_ranks().await.unwrap();

        assert_eq!(claim(&store, "u1", &["r1"]).await.mandelbox.id, small.id); // 2 free
        assert_eq!(claim(&store, "u2", &["r1"]).await.mandelbox.id, half.id); // 3 free
        assert_eq!(claim(&store, "u3", &["r1"]).await.mandelbox.id, big.id); // 10 free
    }

    /// The claim's choice, on a random fleet and a run of random claims and
    /// session ends, against a model of the rule: the first region in the
    /// client's order with a fit box (ACTIVE host, right image, right app),
    /// then the fullest host (fewest free slots, counting ALLOCATED and
    /// RUNNING boxes), then host id, box age and box id.
    pub(crate) async fn claim_choice_matches_the_rule_on_a_random_fleet(_db: &TestDatabase, store: DynStore) {
        let mut rng = XorShift(0x5eed_c1a1_u64 ^ 0x9e37_79b9_7f4a_7c15);
        region(&store, "r1", "img-a").await;
        region(&store, "r2", "").await;
        region(&store, "r3", "img-b").await;
        for i in 0..14_u64 {
            let host_id = format!("h{i:02}");
            let image = if i % 4 == 0 { "img-b" } else { "img-a" };
            let capacity = 2 + (rng.next() % 5) as u32;
            host(&store, &host_id, ["r1", "r2", "r3"][(i % 3) as usize], image, capacity).await;
            for _ in 0..rng.next() % u64::from(capacity + 1) {
                warm_box(&store, &host_id, if rng.next().is_multiple_of(5) { "other-app" } else { APP }).await;
            }
        }
        store.drain_host("h05").await.unwrap();
        let mut running = Vec::new();
        for turn in 0..60 {
            if turn % 7 == 3 {
                // Boxes for the choice to move between hosts.
                let host_id = format!("h{:02}", rng.next() % 14);
                store.reserve_mandelbox(&host_id, &new_box(APP, None)).await.unwrap();
                for spawning in store.host_mandelboxes(&host_id, &[MandelboxState::Spawning]).await.unwrap() {
                    store.mandelbox_spawned(spawning.id, &ports()).await.unwrap();
                }
            }
            if !running.is_empty() && rng.next().is_multiple_of(3) {
                let session_id: Uuid = running.swap_remove((rng.next() as usize) % running.len());
                store.end_session(session_id, EndReason::UserEnded).await.unwrap();
            }
            let mut wanted = vec!["r1", "r2", "r3", "r-unknown"];
            for i in (1..wanted.len()).rev() {
                wanted.swap(i, (rng.next() as usize) % (i + 1));
            }
            wanted.truncate(1 + (rng.next() as usize) % 3);

            // The ranks are fresh on most turns (the rule holds exactly);
            // on the others they may be some claims and ends old, which may
            // move the choice between hosts but never between regions, and
            // never turns a claim that the rule serves into a pending one.
            let fresh = turn % 4 != 3;
            if fresh {
                store.refresh_host_ranks().await.unwrap();
            }
            let expected = chosen_by_the_rule(&store, &wanted).await;
            let outcome = store.create_session_and_claim(&new_session(&format!("u{turn}"), &wanted), NO_LIMIT).await;
            match (outcome.unwrap(), expected) {
                (ClaimOutcome::Claimed(claim), Some(expected)) if fresh => {
                    assert_eq!(claim.mandelbox.id, expected, "turn {turn}, regions {wanted:?}");
                    running.push(claim.session.id);
                }
                (ClaimOutcome::Claimed(claim), Some(expected)) => {
                    let expected = store.get_mandelbox(expected).await.unwrap().unwrap();
                    assert_eq!(claim.mandelbox.region, expected.region, "turn {turn}, regions {wanted:?}");
                    assert_eq!(claim.mandelbox.app, APP);
                    running.push(claim.session.id);
                }
                (ClaimOutcome::Pending(_), None) => {}
                (outcome, expected) => panic!("turn {turn}, regions {wanted:?}: {outcome:?}, expected {expected:?}"),
            }
        }
    }

    /// A region of more hosts than PostgreSQL's claim walks by rank before
    /// it ranks the rest exactly (64), most of the fullest with no box of the
    /// app: the rule holds on fresh ranks wherever the box is.
    pub(crate) async fn claim_choice_matches_the_rule_on_a_large_region(_db: &TestDatabase, store: DynStore) {
        let mut rng = XorShift(0x1a79_e5ee_d000_0001);
        for i in 0..90_u64 {
            let host_id = format!("h{i:02}");
            let capacity = 1 + (rng.next() % 4) as u32;
            host(&store, &host_id, "r1", "img", capacity).await;
            // One host in ten warms boxes of the app; the others are full of
            // another app's boxes (the fullest ranks, with nothing to take).
            let app = if i % 10 == 7 { APP } else { "other-app" };
            for _ in 0..capacity {
                warm_box(&store, &host_id, app).await;
            }
        }
        let mut served = 0;
        for turn in 0..12 {
            store.refresh_host_ranks().await.unwrap();
            let expected = chosen_by_the_rule(&store, &["r1"]).await;
            let outcome = store.create_session_and_claim(&new_session(&format!("u{turn}"), &["r1"]), NO_LIMIT).await;
            match (outcome.unwrap(), expected) {
                (ClaimOutcome::Claimed(claim), Some(expected)) => {
                    assert_eq!(claim.mandelbox.id, expected, "turn {turn}");
                    served += 1;
                }
                (ClaimOutcome::Pending(_), None) => {}
                (outcome, expected) => panic!("turn {turn}: {outcome:?}, expected {expected:?}"),
            }
        }
        assert!(served >= 9, "the fleet has boxes of the app for most turns ({served} served)");
    }

    /// Ranks as of an earlier refresh may move a claim between hosts, but
    /// never hide a box: not on a host ranked full that has freed a slot, not
    /// on a host that came after the refresh, not in a region listed first.
    pub(crate) async fn a_stale_rank_never_hides_a_box(_db: &TestDatabase, store: DynStore) {
        host(&store, "h-was-full", "r1", "img", 1).await;
        host(&store, "h-other-app", "r1", "img", 4).await;
        host(&store, "h-r2", "r2", "img", 4).await;
        let busy = running_session(&store, "h-was-full", "r1", "busy").await;
        warm_box(&store, "h-other-app", "other-app").await;
        warm_box(&store, "h-r2", APP).await;
        store.refresh_host_ranks().await.unwrap();
        assert_eq!(store.refresh_host_ranks().await.unwrap(), 0, "nothing changed since the last refresh");

        // h-was-full frees its slot and warms a box: its rank still says full.
        store.mandelbox_finished(busy.mandelbox.id, MandelboxState::Dead, EndReason::MandelboxExited).await.unwrap();
        let freed = warm_box(&store, "h-was-full", APP).await;
        assert_eq!(claim(&store, "u1", &["r1", "r2"]).await.mandelbox.id, freed.id);

        // A host that connected after the refresh (ranked as it connected).
        host(&store, "h-new", "r1", "img", 2).await;
        let on_new = warm_box(&store, "h-new", APP).await;
        assert_eq!(claim(&store, "u2", &["r1", "r2"]).await.mandelbox.id, on_new.id);

        // A ranked host drained since the refresh is passed over.
        let on_draining = warm_box(&store, "h-other-app", APP).await;
        store.drain_host("h-other-app").await.unwrap();
        let in_r2 = store.host_mandelboxes("h-r2", &[MandelboxState::Waiting]).await.unwrap();
        assert_eq!(claim(&store, "u3", &["r1", "r2"]).await.mandelbox.id, in_r2[0].id);
        assert_eq!(box_state(&store, on_draining.id).await, MandelboxState::Waiting);
    }

    pub(crate) async fn claim_breaks_ties_by_host_then_age(_db: &TestDatabase, store: DynStore) {
        host(&store, "h-b", "r1", "img", 4).await;
        host(&store, "h-a", "r1", "img", 4).await;
        let b_old = warm_box(&store, "h-b", APP).await;
        tick().await;
        let a_new = warm_box(&store, "h-a", APP).await;
        tick().await;
        let a_newer = warm_box(&store, "h-a", APP).await;

        assert_eq!(claim(&store, "u1", &["r1"]).await.mandelbox.id, a_new.id);
        // h-a now has one assigned box: fuller than h-b.
        assert_eq!(claim(&store, "u2", &["r1"]).await.mandelbox.id, a_newer.id);
        assert_eq!(claim(&store, "u3", &["r1"]).await.mandelbox.id, b_old.id);
    }

    pub(crate) async fn claim_skips_unfit_boxes(_db: &TestDatabase, store: DynStore) {
        region(&store, "r1", "img-2").await;
        host(&store, "h-old-image", "r1", "img-1", 4).await;
        host(&store, "h-draining", "r1", "img-2", 4).await;
        host(&store, "h-gone", "r1", "img-2", 4).await;
        host(&store, "h-lost", "r1", "img-2", 4).await;
        host(&store, "h-ok", "r1", "img-2", 4).await;
        warm_box(&store, "h-old-image", APP).await;
        warm_box(&store, "h-draining", APP).await;
        warm_box(&store, "h-gone", APP).await;
        warm_box(&store, "h-ok", "other-app").await;
        spawning_box(&store, "h-ok", APP).await;
        store.drain_host("h-draining").await.unwrap();
        store.host_disconnected("h-gone", 1).await.unwrap();
        warm_box(&store, "h-lost", APP).await;
        store.mark_host_lost("h-lost", None).await.unwrap();

        let session = pending(store.create_session_and_claim(&new_session("u1", &["r1"]), NO_LIMIT).await.unwrap());
        assert_eq!(session.state, SessionState::Pending);
        assert_eq!((session.region, session.mandelbox_id, session.host_id), (None, None, None));

        let fit = warm_box(&store, "h-ok", APP).await;
        let served = store.claim_for_session(session.id, &[]).await.unwrap().unwrap();
        assert_eq!(served.mandelbox.id, fit.id);

        // A region without an image takes any host image.
        region(&store, "r2", "").await;
        host(&store, "h-any", "r2", "whatever", 4).await;
        let any = warm_box(&store, "h-any", APP).await;
        assert_eq!(claim(&store, "u2", &["r2"]).await.mandelbox.id, any.id);
    }

    pub(crate) async fn pending_session_is_stored_and_queued(_db: &TestDatabase, store: DynStore) {
        let first = new_session("u1", &["r1", "r2"]);
        let outcome = store.create_session_and_claim(&first, NO_LIMIT).await.unwrap();
        let session = pending(outcome);
        assert_eq!(session.id, first.id);
        assert_eq!(session.state, SessionState::Pending);
        assert_eq!(session.requested_regions, vec!["r1".to_owned(), "r2".to_owned()]);
        assert_eq!((session.region, session.mandelbox_id, session.host_id), (None, None, None));
        tick().await;
        let second = pending(store.create_session_and_claim(&new_session("u2", &[]), NO_LIMIT).await.unwrap());
        tick().await;
        let third = pending(store.create_session_and_claim(&new_session("u3", &["r1"]), NO_LIMIT).await.unwrap());
        store.end_session(second.id, EndReason::UserEnded).await.unwrap();

        let queued: Vec<Uuid> = store.pending_sessions(10).await.unwrap().into_iter().map(|s| s.id).collect();
        assert_eq!(queued, vec![first.id, third.id], "oldest first, ended ones left out");
        let queued: Vec<Uuid> = store.pending_sessions(1).await.unwrap().into_iter().map(|s| s.id).collect();
        assert_eq!(queued, vec![first.id]);
    }

    pub(crate) async fn session_limit_counts_live_sessions(_db: &TestDatabase, store: DynStore) {
        host(&store, "h1", "r1", "img", 10).await;
        warm_box(&store, "h1", APP).await;
        let running = claim(&store, "u1", &["r1"]).await;
        let queued = pending(store.create_session_and_claim(&new_session("u1", &["r1"]), 3).await.unwrap());
        pending(store.create_session_and_claim(&new_session("u1", &["r1"]), 3).await.unwrap());
        assert_eq!(store.count_live_sessions("u1").await.unwrap(), 3);

        let refused = new_session("u1", &["r1"]);
        let error = store.create_session_and_claim(&refused, 3).await.unwrap_err();
        assert!(matches!(error, StoreError::SessionLimit { limit: 3 }), "{error:?}");
        assert_eq!(store.get_session(refused.id).await.unwrap(), None, "nothing stored");

        store.end_session(queued.id, EndReason::UserEnded).await.unwrap();
        store.end_session(running.session.id, EndReason::UserEnded).await.unwrap();
        assert_eq!(store.count_live_sessions("u1").await.unwrap(), 1);
        pending(store.create_session_and_claim(&new_session("u1", &["r1"]), 3).await.unwrap());
        pending(store.create_session_and_claim(&new_session("u1", &["r1"]), 3).await.unwrap());
        assert!(matches!(
            store.create_session_and_claim(&new_session("u1", &["r1"]), 3).await,
            Err(StoreError::SessionLimit { limit: 3 })
        ));
        assert_eq!(store.count_live_sessions("u1").await.unwrap(), 3);
        // Other users are not affected; a limit of 0 refuses everything.
        pending(store.create_session_and_claim(&new_session("u2", &["r1"]), 3).await.unwrap());
        assert!(matches!(
            store.create_session_and_claim(&new_session("u3", &["r1"]), 0).await,
            Err(StoreError::SessionLimit { limit: 0 })
        ));
        assert_eq!(store.count_live_sessions("nobody").await.unwrap(), 0);
    }

    /// The limit is checked against a counter the database keeps (triggers):
    /// every way a session ends must give its place back.
    pub(crate) async fn session_limit_frees_a_place_however_a_session_ends(db: &TestDatabase, store: DynStore) {
        const ONE: u32 = 1;
        host(&store, "h1", "r1", "img", 20).await;
        let refused = |store: DynStore| async move {
            matches!(
                store.create_session_and_claim(&new_session("u1", &["r1"]), ONE).await,
                Err(StoreError::SessionLimit { limit: ONE })
            )
        };
        let counted =
            || async { db.query_i64("SELECT CAST(live_sessions AS BIGINT) FROM users WHERE id = 'u1'").await.unwrap() };

        // EndSession.
        let first = running_session(&store, "h1", "r1", "u1").await;
        assert!(refused(store.clone()).await, "the one place is taken");
        store.end_session(first.session.id, EndReason::UserEnded).await.unwrap();
        assert_eq!(counted().await, 0);

        // ReportDisconnect, with the box's token.
        let by_token = running_session(&store, "h1", "r1", "u1").await;
        assert!(refused(store.clone()).await);
        let token_hash = format!("sha256-of-{}", by_token.mandelbox.id);
        let outcome = store
            .end_session_by_token(by_token.mandelbox.id, &token_hash, EndReason::ClientDisconnected)
            .await
            .unwrap();
        assert!(matches!(outcome, TokenEnd::Ended { ended: Some(_), .. }), "{outcome:?}");
        assert_eq!(counted().await, 0);

        // The box exited on its own.
        let exited = running_session(&store, "h1", "r1", "u1").await;
        assert!(refused(store.clone()).await);
        store.mandelbox_finished(exited.mandelbox.id, MandelboxState::Dead, EndReason::MandelboxExited).await.unwrap();
        assert_eq!(counted().await, 0);

        // The claim's Assign never reached the host.
        let never_told = running_session(&store, "h1", "r1", "u1").await;
        assert!(refused(store.clone()).await);
        tick().await;
        let reported = [ReportedMandelbox { id: never_told.mandelbox.id, assigned: false }];
        store.reconcile_host("h1", &reported, Utc::now()).await.unwrap();
        assert_eq!(session(&store, never_told.session.id).await.state, SessionState::Ended);
        assert_eq!(counted().await, 0);

        // A pending session expired by the sweep.
        let queued = pending(store.create_session_and_claim(&new_session("u1", &["r9"]), ONE).await.unwrap());
        assert!(refused(store.clone()).await);
        let cutoff = tick().await;
        let swept = store.sweep(cutoff, cutoff - chrono::Duration::hours(1)).await.unwrap();
        assert_eq!(swept.expired_pending.iter().map(|s| s.id).collect::<Vec<_>>(), vec![queued.id]);
        assert_eq!(counted().await, 0);

        // The host lost; a released claim keeps its place (back to PENDING).
        let lost = running_session(&store, "h1", "r1", "u1").await;
        store.release_claim(lost.session.id, lost.mandelbox.id, MandelboxState::Waiting).await.unwrap();
        assert_eq!(session(&store, lost.session.id).await.state, SessionState::Pending);
        assert!(refused(store.clone()).await, "a released claim is still a live session");
        let reclaimed = store.claim_for_session(lost.session.id, &[]).await.unwrap().unwrap();
        assert_eq!(reclaimed.mandelbox.host_id, "h1");
        store.mark_host_lost("h1", None).await.unwrap();
        assert_eq!(session(&store, lost.session.id).await.state, SessionState::Ended);
        assert_eq!(counted().await, 0);
        host(&store, "h2", "r1", "img", 20).await;
        running_session(&store, "h2", "r1", "u1").await;
        assert_eq!(counted().await, 1);
        assert_eq!(store.count_live_sessions("u1").await.unwrap(), 1, "the counter agrees with the rows");
    }

    /// ReportDisconnect's store call: the token first, then one end.
    pub(crate) async fn end_session_by_token_checks_the_token_then_ends_once(_db: &TestDatabase, store: DynStore) {
        host(&store, "h1", "r1", "img", 20).await;
        let reason = EndReason::ClientDisconnected;
        let hash_of = |id: Uuid| format!("sha256-of-{id}");
        let warm = warm_box(&store, "h1", APP).await;
        assert_eq!(
            store.end_session_by_token(warm.id, &hash_of(warm.id), reason).await.unwrap(),
            TokenEnd::NoSession(MandelboxState::Waiting)
        );
        let running = claim(&store, "u1", &["r1"]).await;
        assert_eq!(running.mandelbox.id, warm.id);
        assert_eq!(
            store.end_session_by_token(Uuid::new_v4(), &hash_of(warm.id), reason).await.unwrap(),
            TokenEnd::UnknownBox
        );
        assert_eq!(
            store.end_session_by_token(warm.id, &hash_of(Uuid::new_v4()), reason).await.unwrap(),
            TokenEnd::WrongToken
        );
        assert_eq!(
            session(&store, running.session.id).await.state,
            SessionState::Running,
            "a wrong token ends nothing"
        );

        let outcome = store.end_session_by_token(warm.id, &hash_of(warm.id), reason).await.unwrap();
        let TokenEnd::Ended { session_id, ended: Some(ended) } = outcome else { panic!("not ended: {outcome:?}") };
        assert_eq!(session_id, running.session.id);
        assert!(ended.changed);
        assert_eq!((ended.session.state, ended.session.end_reason), (SessionState::Ended, Some(reason)));
        let teardown = ended.teardown.expect("its box is torn down");
        assert_eq!((teardown.id, teardown.state), (warm.id, MandelboxState::Dying));
        assert_eq!(
            store.end_session_by_token(warm.id, &hash_of(warm.id), reason).await.unwrap(),
            TokenEnd::NoSession(MandelboxState::Dying),
            "a token ends its session once"
        );

        // Racing EndSession: one of the two ends it, one teardown.
        let raced = running_session(&store, "h1", "r1", "u2").await;
        let by_token = {
            let store = store.clone();
            let hash = hash_of(raced.mandelbox.id);
            tokio::spawn(async move { store.end_session_by_token(raced.mandelbox.id, &hash, reason).await })
        };
        let by_user = store.end_session(raced.session.id, EndReason::UserEnded).await.unwrap().unwrap();
        let by_token = by_token.await.unwrap().unwrap();
        let teardowns = match by_token {
            TokenEnd::Ended { ended: Some(ended), .. } => {
                assert!(!by_user.changed && by_user.teardown.is_none(), "both ended it");
                usize::from(ended.teardown.is_some())
            }
            TokenEnd::Ended { ended: None, .. } | TokenEnd::NoSession(MandelboxState::Dying) => {
                assert!(by_user.changed);
                usize::from(by_user.teardown.is_some())
            }
            other => panic!("unexpected: {other:?}"),
        };
        assert_eq!(teardowns, 1);
        assert_eq!(box_state(&store, raced.mandelbox.id).await, MandelboxState::Dying);
    }

    /// ReportDisconnect's group commit: a batch of reports, each answered
    /// as `end_session_by_token` alone would answer it.
    pub(crate) async fn end_sessions_by_token_answers_each_as_alone(_db: &TestDatabase, store: DynStore) {
        host(&store, "h1", "r1", "img", 20).await;
        let reason = EndReason::ClientDisconnected;
        let report = |id: Uuid| DisconnectReport { mandelbox_id: id, token_hash: format!("sha256-of-{id}") };
        let running = running_session(&store, "h1", "r1", "u1").await;
        let assigning = assigning_claim(&store, "h1", "u2", "r1").await;
        let wrong_token = running_session(&store, "h1", "r1", "u3").await;
        let already = running_session(&store, "h1", "r1", "u4").await;
        store.end_session(already.session.id, EndReason::UserEnded).await.unwrap();
        let second = running_session(&store, "h1", "r1", "u5").await;
        let warm = warm_box(&store, "h1", APP).await;
        let batch = [
            report(running.mandelbox.id),
            report(Uuid::new_v4()),
            DisconnectReport { token_hash: "sha256-of-someone-else".into(), ..report(wrong_token.mandelbox.id) },
            report(assigning.mandelbox.id),
            report(already.mandelbox.id),
            report(warm.id),
            report(second.mandelbox.id),
        ];
        let ends = store.end_sessions_by_token(&batch, reason).await.unwrap();
        assert_eq!(ends.len(), batch.len());
        let ended = |index: usize, claim: &Claim| match &ends[index] {
            TokenEnd::Ended { session_id, ended: Some(ended) } => {
                assert_eq!(*session_id, claim.session.id);
                assert!(ended.changed);
                assert_eq!((ended.session.state, ended.session.end_reason), (SessionState::Ended, Some(reason)));
                let teardown = ended.teardown.as_ref().expect("its box is torn down");
                assert_eq!((teardown.id, teardown.state), (claim.mandelbox.id, MandelboxState::Dying));
            }
            other => panic!("report {index}: not ended: {other:?}"),
        };
        ended(0, &running);
        assert_eq!(ends[1], TokenEnd::UnknownBox);
        assert_eq!(ends[2], TokenEnd::WrongToken);
        ended(3, &assigning);
        assert_eq!(ends[4], TokenEnd::NoSession(MandelboxState::Dying));
        assert_eq!(ends[5], TokenEnd::NoSession(MandelboxState::Waiting));
        ended(6, &second);
        assert_eq!(
            session(&store, wrong_token.session.id).await.state,
            SessionState::Running,
            "a wrong token ends nothing"
        );
        assert_eq!(box_state(&store, warm.id).await, MandelboxState::Waiting);
        assert_eq!(session(&store, already.session.id).await.end_reason, Some(EndReason::UserEnded));

        // One box twice (a retried report): ended once, then told it is gone.
        let retried = running_session(&store, "h1", "r1", "u6").await;
        let twice = [report(retried.mandelbox.id), report(retried.mandelbox.id)];
        let ends = store.end_sessions_by_token(&twice, reason).await.unwrap();
        assert!(matches!(&ends[0], TokenEnd::Ended { ended: Some(_), .. }), "{ends:?}");
        assert_eq!(ends[1], TokenEnd::NoSession(MandelboxState::Dying));
        assert_eq!(store.end_sessions_by_token(&[], reason).await.unwrap(), Vec::new());
    }

    /// Batches of reports racing each other and EndSession over the same
    /// sessions: every session ends once, with one teardown. A batch may
    /// fail (two batches locking the same rows in different orders can
    /// deadlock); what failed changed nothing.
    pub(crate) async fn concurrent_disconnect_batches_end_each_session_once(db: &TestDatabase, store: DynStore) {
        const SESSIONS: usize = 24;
        host(&store, "h1", "r1", "img", SESSIONS as u32).await;
        let mut claims = Vec::new();
        // Three sessions per user, so that a batch ends several of one user's.
        for session in 0..SESSIONS {
            claims.push(running_session(&store, "h1", "r1", &format!("u{}", session % 8)).await);
        }
        let reports: Vec<DisconnectReport> = claims
            .iter()
            .map(|claim| DisconnectReport {
                mandelbox_id: claim.mandelbox.id,
                token_hash: format!("sha256-of-{}", claim.mandelbox.id),
            })
            .collect();
        let mut batches = Vec::new();
        for order in 0..4 {
            let mut batch = reports.clone();
            if order % 2 == 1 {
                batch.reverse();
            }
            batch.rotate_left(order * 5);
            let store = store.clone();
            batches.push(tokio::spawn(async move {
                store.end_sessions_by_token(&batch, EndReason::ClientDisconnected).await
            }));
        }
        let mut singles = Vec::new();
        for claim in claims.iter().step_by(3) {
            let (store, id) = (store.clone(), claim.session.id);
            singles.push(tokio::spawn(async move { store.end_session(id, EndReason::UserEnded).await }));
        }
        // Each session's ends that changed it, and the teardowns they returned.
        let mut changed: std::collections::HashMap<Uuid, (usize, usize)> = Default::default();
        for batch in batches {
            let Ok(ends) = batch.await.unwrap() else { continue };
            for end in ends {
                if let TokenEnd::Ended { session_id, ended: Some(ended) } = end {
                    let entry = changed.entry(session_id).or_default();
                    entry.0 += 1;
                    entry.1 += usize::from(ended.teardown.is_some());
                }
            }
        }
        for single in singles {
            let ended = single.await.unwrap().unwrap().unwrap();
            if ended.changed {
                let entry = changed.entry(ended.session.id).or_default();
                entry.0 += 1;
                entry.1 += usize::from(ended.teardown.is_some());
            }
        }
        // A session whose every batch failed is ended by one more report.
        for (claim, report) in claims.iter().zip(&reports) {
            if let std::collections::hash_map::Entry::Vacant(unended) = changed.entry(claim.session.id) {
                let end =
                    store.end_session_by_token(report.mandelbox_id, &report.token_hash, EndReason::ClientDisconnected);
                assert!(matches!(end.await.unwrap(), TokenEnd::Ended { ended: Some(_), .. }));
                unended.insert((1, 1));
            }
        }
        for claim in &claims {
            assert_eq!(changed[&claim.session.id], (1, 1), "session {} ended once, one teardown", claim.session.id);
            assert_eq!(session(&store, claim.session.id).await.state, SessionState::Ended);
            assert_eq!(box_state(&store, claim.mandelbox.id).await, MandelboxState::Dying);
        }
        let counted = db.query_i64("SELECT CAST(COALESCE(sum(live_sessions), 0) AS BIGINT) FROM users").await.unwrap();
        assert_eq!(counted, 0, "every user got back each place it held, once");
    }

    /// The session counter follows a batch of ends: each user gets back as
    /// many places as the batch ended of its sessions, and no more (a report
    /// with a wrong token, or for a session already ended, gives nothing).
    pub(crate) async fn disconnect_batch_gives_each_user_back_its_places(db: &TestDatabase, store: DynStore) {
        host(&store, "h1", "r1", "img", 20).await;
        let report = |claim: &Claim| DisconnectReport {
            mandelbox_id: claim.mandelbox.id,
            token_hash: format!("sha256-of-{}", claim.mandelbox.id),
        };
        let counted = |user: &'static str| {
            let query = format!("SELECT CAST(live_sessions AS BIGINT) FROM users WHERE id = '{user}'");
            async move { db.query_i64(&query).await.unwrap() }
        };
        let first = running_session(&store, "h1", "r1", "u1").await;
        let second = running_session(&store, "h1", "r1", "u1").await;
        let kept = running_session(&store, "h1", "r1", "u1").await;
        let other = running_session(&store, "h1", "r1", "u2").await;
        let wrong = running_session(&store, "h1", "r1", "u3").await;
        let ended_before = running_session(&store, "h1", "r1", "u4").await;
        let live = running_session(&store, "h1", "r1", "u4").await;
        store.end_session(ended_before.session.id, EndReason::UserEnded).await.unwrap();
        assert_eq!((counted("u1").await, counted("u2").await, counted("u3").await, counted("u4").await), (3, 1, 1, 1));

        let batch = [
            report(&first),
            report(&other),
            DisconnectReport { token_hash: "sha256-of-someone-else".into(), ..report(&wrong) },
            report(&second),
            report(&ended_before),
            report(&first),
        ];
        let ends = store.end_sessions_by_token(&batch, EndReason::ClientDisconnected).await.unwrap();
        assert_eq!(ends.len(), batch.len());
        assert_eq!((counted("u1").await, counted("u2").await, counted("u3").await, counted("u4").await), (1, 0, 1, 1));
        for (user, claim) in [("u1", &kept), ("u3", &wrong), ("u4", &live)] {
            assert_eq!(store.count_live_sessions(user).await.unwrap(), 1, "{user}: the counter agrees with the rows");
            assert_eq!(session(&store, claim.session.id).await.state, SessionState::Running);
        }
        assert_eq!(store.count_live_sessions("u2").await.unwrap(), 0);
    }

    pub(crate) async fn concurrent_requests_of_one_user_respect_the_limit(_db: &TestDatabase, store: DynStore) {
        host(&store, "h1", "r1", "img", 20).await;
        for _ in 0..5 {
            warm_box(&store, "h1", APP).await;
        }
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { store.create_session_and_claim(&new_session("u1", &["r1"]), 3).await })
            })
            .collect();
        let (mut accepted, mut refused) = (0, 0);
        for task in tasks {
            match task.await.unwrap() {
                Ok(_) => accepted += 1,
                Err(StoreError::SessionLimit { limit: 3 }) => refused += 1,
                Err(error) => panic!("unexpected error: {error}"),
            }
        }
        assert_eq!((accepted, refused), (3, 17));
        assert_eq!(store.count_live_sessions("u1").await.unwrap(), 3);
    }

    /// Allocate's group commit: a batch writes each session as a claim of
    /// its own would (the same boxes, in the same order, RUNNING or PENDING),
    /// and leaves unwritten a user's second session and a user at the limit.
    pub(crate) async fn claim_batch_writes_each_session_as_alone(_db: &TestDatabase, store: DynStore) {
        const LIMIT: u32 = 2;
        host(&store, "h-big", "r1", "img", 10).await;
        host(&store, "h-small", "r1", "img", 2).await;
        host(&store, "h-r2", "r2", "img", 4).await;
        let big_old = warm_box(&store, "h-big", APP).await;
        tick().await;
        let small_old = warm_box(&store, "h-small", APP).await;
        tick().await;
        let big_new = warm_box(&store, "h-big", APP).await;
        tick().await;
        let small_new = warm_box(&store, "h-small", APP).await;
        let in_r2 = warm_box(&store, "h-r2", APP).await;
        store.refresh_host_ranks().await.unwrap();
        for user in ["u1", "u2", "u3", "u4", "u5", "u6", "full"] {
            store.ensure_user(user, None).await.unwrap();
        }
        for _ in 0..LIMIT {
            pending(store.create_session_and_claim(&new_session("full", &["nowhere"]), LIMIT).await.unwrap());
        }

        let news = vec![
            new_session("u1", &["r1"]),
            new_session("u2", &["r1"]),
            new_session("u1", &["r1"]),
            new_session("full", &["r1"]),
            new_session("u3", &["r2", "r1"]),
            new_session("u4", &["r1"]),
            new_session("u5", &["r1"]),
            new_session("u6", &["r1"]),
        ];
        let outcomes = store.create_sessions_and_claim(&news, LIMIT).await.unwrap();
        assert_eq!(outcomes.len(), news.len());
        let [u1, u2, u1_again, full, u3, u4, u5, u6] = <[Option<ClaimOutcome>; 8]>::try_from(outcomes).unwrap();
        assert!(u1_again.is_none(), "a user's second session in a batch is left to the caller");
        assert!(full.is_none(), "a user at the limit is left to the caller");
        // The fullest host first (h-small: 2 free slots), oldest box first.
        let expected =
            [(&u1, small_old.id), (&u2, small_new.id), (&u3, in_r2.id), (&u4, big_old.id), (&u5, big_new.id)];
        for (index, (outcome, box_id)) in expected.into_iter().enumerate() {
            let claim = claimed(outcome.clone().unwrap());
            let new = &news[[0, 1, 4, 5, 6][index]];
            assert_eq!(claim.mandelbox.id, box_id, "session {index}");
            assert_eq!((claim.mandelbox.state, claim.mandelbox.session_id), (MandelboxState::Running, Some(new.id)));
            assert_eq!(claim.host, store.get_host(&claim.mandelbox.host_id).await.unwrap().unwrap());
            let session = &claim.session;
            assert_eq!((session.id, session.user_id.as_str()), (new.id, new.user_id.as_str()));
            assert_eq!((session.state, session.app.as_str()), (SessionState::Running, APP));
            assert_eq!(session.client_version, "3.1.0");
            assert_eq!(session.requested_regions, new.regions);
            assert_eq!(session.region.as_deref(), Some(claim.mandelbox.region.as_str()));
            assert_eq!(
                (session.mandelbox_id, session.host_id.as_deref()),
                (Some(box_id), Some(claim.host.id.as_str()))
            );
            assert_eq!((session.end_reason, session.ended_at), (None, None));
            assert_eq!(store.get_session(new.id).await.unwrap().as_ref(), Some(session));
            assert_eq!(store.get_mandelbox(box_id).await.unwrap(), Some(claim.mandelbox.clone()));
        }
        let queued = pending(u6.unwrap());
        assert_eq!((queued.id, queued.state, queued.mandelbox_id), (news[7].id, SessionState::Pending, None));
        assert_eq!(store.get_session(news[7].id).await.unwrap(), Some(queued));
        for user in ["u1", "u2", "u3", "u4", "u5", "u6"] {
            assert_eq!(store.count_live_sessions(user).await.unwrap(), 1, "{user} counted once");
        }
        assert_eq!(store.count_live_sessions("full").await.unwrap(), LIMIT);
        assert_eq!(store.get_session(news[2].id).await.unwrap(), None, "left unwritten");
        assert_eq!(store.get_session(news[3].id).await.unwrap(), None, "left unwritten");

        // Run alone, as the caller does, they get their own answers.
        pending(store.create_session_and_claim(&news[2], LIMIT).await.unwrap());
        assert!(matches!(
            store.create_session_and_claim(&news[3], LIMIT).await,
            Err(StoreError::SessionLimit { limit: LIMIT })
        ));
        assert_eq!(store.create_sessions_and_claim(&[], LIMIT).await.unwrap(), Vec::new());
    }

    /// Batches racing each other and single claims never share a box.
    pub(crate) async fn concurrent_claim_batches_take_distinct_boxes(db: &TestDatabase, store: DynStore) {
        for host_index in 0..4 {
            let host_id = format!("h{host_index}");
            host(&store, &host_id, "r1", "img", 5).await;
            for _ in 0..5 {
                warm_box(&store, &host_id, APP).await;
            }
            if host_index == 1 {
                // Two hosts ranked, two not: the race crosses both parts of
                // the claim's walk (the ranked window, then the exact rest).
                store.refresh_host_ranks().await.unwrap();
            }
        }
        let batches: Vec<Vec<NewSession>> =
            (0..8).map(|batch| (0..5).map(|i| new_session(&format!("batch-{batch}-{i}"), &["r1"])).collect()).collect();
        for new in batches.iter().flatten() {
            store.ensure_user(&new.user_id, None).await.unwrap();
        }
        let start = Arc::new(tokio::sync::Barrier::new(batches.len() + 1));
        let tasks: Vec<_> = batches
            .into_iter()
            .map(|news| {
                let (store, start) = (store.clone(), start.clone());
                tokio::spawn(async move {
                    start.wait().await;
                    store.create_sessions_and_claim(&news, 1).await
                })
            })
            .collect();
        let (singles, ()) = tokio::join!(race_claims(&store, 10, "single"), async {
            start.wait().await;
        });
        let mut outcomes = singles;
        for task in tasks {
            for outcome in task.await.unwrap().unwrap() {
                outcomes.push(outcome.expect("distinct users with rows, under the limit, are written"));
            }
        }
        assert_eq!(outcomes.len(), 50);
        assert_claims_are_distinct(&outcomes, 20);
        assert_twenty_boxes_claimed_once(db, 30).await;
    }

    /// One user's sessions in concurrent batches and single claims: the
    /// batches write what they can, the rest run alone (as Allocate does),
    /// and the user ends with exactly the limit.
    pub(crate) async fn concurrent_claim_batches_of_one_user_respect_the_limit(_db: &TestDatabase, store: DynStore) {
        const LIMIT: u32 = 3;
        host(&store, "h1", "r1", "img", 40).await;
        for _ in 0..5 {
            warm_box(&store, "h1", APP).await;
        }
        store.ensure_user("u1", None).await.unwrap();
        let tasks: Vec<_> = (0..12)
            .map(|task| {
                let store = store.clone();
                tokio::spawn(async move {
                    let news = vec![new_session("u1", &["r1"]), new_session(&format!("other-{task}"), &["r1"])];
                    store.ensure_user(&news[1].user_id, None).await.unwrap();
                    let outcomes = store.create_sessions_and_claim(&news, LIMIT).await.unwrap();
                    let mine = match &outcomes[0] {
                        Some(_) => Ok(()),
                        None => store.create_session_and_claim(&news[0], LIMIT).await.map(|_| ()),
                    };
                    (mine, outcomes[1].is_some())
                })
            })
            .collect();
        let (mut accepted, mut refused) = (0, 0);
        for task in tasks {
            let (mine, other_written) = task.await.unwrap();
            assert!(other_written, "the other user has a place and a row of its own");
            match mine {
                Ok(()) => accepted += 1,
                Err(StoreError::SessionLimit { limit: LIMIT }) => refused += 1,
                Err(error) => panic!("unexpected error: {error}"),
            }
        }
        assert_eq!((accepted, refused), (3, 9));
        assert_eq!(store.count_live_sessions("u1").await.unwrap(), LIMIT);
    }

    pub(crate) async fn concurrent_claims_take_distinct_boxes(db: &TestDatabase, store: DynStore) {
        for host_index in 0..4 {
            let host_id = format!("h{host_index}");
            host(&store, &host_id, "r1", "img", 5).await;
            for _ in 0..5 {
                warm_box(&store, &host_id, APP).await;
            }
            if host_index == 1 {
                // Two hosts ranked, two not: the race crosses both parts of
                // the claim's walk (the ranked window, then the exact rest).
                store.refresh_host_ranks().await.unwrap();
            }
        }
        let outcomes = race_claims(&store, 50, "user").await;
        assert_claims_are_distinct(&outcomes, 20);
        assert_twenty_boxes_claimed_once(db, 30).await;
    }

    pub(crate) async fn claim_for_session_claims_pending_sessions(_db: &TestDatabase, store: DynStore) {
        host(&store, "h1", "r1", "img", 4).await;
        host(&store, "h2", "r1", "img", 4).await;
        let session = pending(store.create_session_and_claim(&new_session("u1", &["r1"]), NO_LIMIT).await.unwrap());
        assert_eq!(store.claim_for_session(session.id, &[]).await.unwrap(), None, "no box yet");

        let on_h1 = warm_box(&store, "h1", APP).await;
        assert_eq!(store.claim_for_session(session.id, &["h1".to_owned()]).await.unwrap(), None, "excluded");
        let on_h2 = warm_box(&store, "h2", APP).await;
        let claim = store.claim_for_session(session.id, &["h1".to_owned()]).await.unwrap().unwrap();
        assert_eq!(claim.mandelbox.id, on_h2.id);
        assert_eq!(claim.mandelbox.state, MandelboxState::Allocated);
        assert_eq!(claim.mandelbox.session_id, Some(session.id));
        assert_eq!(claim.session.state, SessionState::Assigning);
        assert_eq!(claim.session.mandelbox_id, Some(on_h2.id));
        assert_eq!(claim.session.host_id.as_deref(), Some("h2"));
        assert_eq!(claim.session.region.as_deref(), Some("r1"));
        assert_eq!(claim.host.id, "h2");
        assert_eq!(store.get_session(session.id).await.unwrap(), Some(claim.session.clone()));

        assert_eq!(store.claim_for_session(session.id, &[]).await.unwrap(), None, "not PENDING any more");
        assert_eq!(box_state(&store, on_h1.id).await, MandelboxState::Waiting);
        assert_eq!(store.claim_for_session(Uuid::new_v4(), &[]).await.unwrap(), None);
    }

    pub(crate) async fn attach_reserved_moves_the_session_onto_its_box(_db: &TestDatabase, store: DynStore) {
        host(&store, "h1", "r1", "img", 4).await;
        let session = pending(store.create_session_and_claim(&new_session("u1", &["r1"]), NO_LIMIT).await.unwrap());
        let reserved = store.reserve_mandelbox("h1", &new_box(APP, Some(session.id))).await.unwrap().unwrap();
        assert_eq!(store.attach_reserved(session.id, reserved.id).await.unwrap(), None, "still SPAWNING");
        let allocated = store.mandelbox_spawned(reserved.id, &ports()).await.unwrap().unwrap();
        let other = pending(store.create_session_and_claim(&new_session("u2", &["r9"]), NO_LIMIT).await.unwrap());
        assert_eq!(store.attach_reserved(other.id, reserved.id).await.unwrap(), None, "not reserved for it");

        let claim = store.attach_reserved(session.id, reserved.id).await.unwrap().unwrap();
        assert_eq!(claim.mandelbox, allocated);
        assert_eq!(claim.session.state, SessionState::Assigning);
        assert_eq!(claim.session.mandelbox_id, Some(reserved.id));
        assert_eq!(claim.session.host_id.as_deref(), Some("h1"));
        assert_eq!(claim.session.region.as_deref(), Some("r1"));
        assert_eq!(claim.host.id, "h1");
        assert_eq!(store.attach_reserved(session.id, reserved.id).await.unwrap(), None, "not PENDING");
        assert_eq!(store.attach_reserved(Uuid::new_v4(), reserved.id).await.unwrap(), None);

        let confirmed = store.confirm_assignment(session.id, reserved.id).await.unwrap().unwrap();
        assert_eq!(confirmed.state, SessionState::Running);
    }

    pub(crate) async fn confirm_assignment_runs_both(_db: &TestDatabase, store: DynStore) {
        host(&store, "h1", "r1", "img", 4).await;
        let first = assigning_claim(&store, "h1", "u1", "r1").await;
        let second = assigning_claim(&store, "h1", "u2", "r1").await;
        assert_eq!(
            store.confirm_assignment(first.session.id, second.mandelbox.id).await.unwrap(),
            None,
            "not this session's box"
        );
        let running = store.confirm_assignment(first.session.id, first.mandelbox.id).await.unwrap().unwrap();
        assert_eq!(running.state, SessionState::Running);
        assert_eq!(running.mandelbox_id, Some(first.mandelbox.id));
        assert!(running.updated_at >= first.session.updated_at);
        assert_eq!(session(&store, first.session.id).await, running);
        assert_eq!(box_state(&store, first.mandelbox.id).await, MandelboxState::Running);
        assert_eq!(store.confirm_assignment(first.session.id, first.mandelbox.id).await.unwrap(), None);

        store.end_session(second.session.id, EndReason::UserEnded).await.unwrap();
        assert_eq!(store.confirm_assignment(second.session.id, second.mandelbox.id).await.unwrap(), None);
        assert_eq!(box_state(&store, second.mandelbox.id).await, MandelboxState::Dying);
    }

    pub(crate) async fn release_claim_puts_the_session_back_in_the_queue(_db: &TestDatabase, store: DynStore) {
        host(&store, "h1", "r1", "img", 4).await;
        warm_box(&store, "h1", APP).await;
        warm_box(&store, "h1", APP).await;
        let first = claim(&store, "u1", &["r1"]).await;
        store.release_claim(first.session.id, first.mandelbox.id, MandelboxState::Dying).await.unwrap();
        let released = session(&store, first.session.id).await;
        assert_eq!(released.state, SessionState::Pending);
        assert_eq!((released.region, released.mandelbox_id, released.host_id), (None, None, None));
        assert_eq!(box_state(&store, first.mandelbox.id).await, MandelboxState::Dying);
        // Released again: the session is no longer ASSIGNING on that box.
        store.release_claim(first.session.id, first.mandelbox.id, MandelboxState::Lost).await.unwrap();
        assert_eq!(box_state(&store, first.mandelbox.id).await, MandelboxState::Dying);

        let retry = store.claim_for_session(first.session.id, &["h9".to_owned()]).await.unwrap().unwrap();
        assert_ne!(retry.mandelbox.id, first.mandelbox.id);
        store.release_claim(first.session.id, retry.mandelbox.id, MandelboxState::Lost).await.unwrap();
        assert_eq!(box_state(&store, retry.mandelbox.id).await, MandelboxState::Lost);
        assert_eq!(session(&store, first.session.id).await.state, SessionState::Pending);

        // A pending session's claim (ASSIGNING) is released the same way.
        let assigning = assigning_claim(&store, "h1", "u2", "r1").await;
        store.release_claim(assigning.session.id, assigning.mandelbox.id, MandelboxState::Lost).await.unwrap();
        assert_eq!(session(&store, assigning.session.id).await.state, SessionState::Pending);
        assert_eq!(box_state(&store, assigning.mandelbox.id).await, MandelboxState::Lost);

        // An ended session is not released, nor is its box touched.
        let ended = running_session(&store, "h1", "r1", "u3").await;
        store.end_session(ended.session.id, EndReason::UserEnded).await.unwrap();
        store.release_claim(ended.session.id, ended.mandelbox.id, MandelboxState::Lost).await.unwrap();
        assert_eq!(session(&store, ended.session.id).await.state, SessionState::Ended);
        assert_eq!(box_state(&store, ended.mandelbox.id).await, MandelboxState::Dying);
    }

    pub(crate) async fn recycle_torn_down_frees_and_refills_the_slot_at_once(_db: &TestDatabase, store: DynStore) {
        host(&store, "h1", "r1", "img", 2).await;
        let first = running_session(&store, "h1", "r1", "u1").await;
        let second = running_session(&store, "h1", "r1", "u2").await;
        let dying = store.end_session(first.session.id, EndReason::ClientDisconnected).await.unwrap().unwrap();
        let dying = dying.teardown.unwrap();
        assert_eq!(
            store.reserve_mandelbox("h1", &new_box(APP, None)).await.unwrap(),
            None,
            "a DYING box holds its slot"
        );

        let replacement = warm_replacement();
        assert_eq!(
            store.recycle_torn_down("h2", dying.id, Some(&replacement)).await.unwrap(),
            Recycled::default(),
            "not that host's box"
        );
        assert_eq!(store.get_mandelbox(replacement.id).await.unwrap(), None, "a refused replacement is not written");
        let recycled = store.recycle_torn_down("h1", dying.id, Some(&replacement)).await.unwrap();
        assert!(recycled.finished);
        let warm = recycled.replacement.unwrap();
        assert_eq!((warm.id, warm.state, warm.session_id), (replacement.id, MandelboxState::Waiting, None));
        assert_eq!((warm.host_id.as_str(), warm.region.as_str(), warm.app.as_str()), ("h1", "r1", APP));
        assert_eq!(warm.ports, ports());
        assert_eq!(store.get_mandelbox(warm.id).await.unwrap(), Some(warm.clone()));
        assert_eq!(box_state(&store, dying.id).await, MandelboxState::Dead);
        assert_eq!(session(&store, first.session.id).await.state, SessionState::Ended, "unchanged");
        // The same write again (a retry after a lost commit acknowledgement):
        // nothing changes, and the replacement the database holds is not
        // refused (its caller would tear it down).
        assert_eq!(
            store.recycle_torn_down("h1", dying.id, Some(&replacement)).await.unwrap(),
            Recycled { finished: false, replacement: Some(warm.clone()) }
        );
        assert_eq!(
            store.recycle_torn_down("h2", dying.id, Some(&replacement)).await.unwrap(),
            Recycled::default(),
            "recorded on another host"
        );
        let again = warm_replacement();
        assert_eq!(
            store.recycle_torn_down("h1", dying.id, Some(&again)).await.unwrap(),
            Recycled::default(),
            "already DEAD: nothing changes, the replacement is refused"
        );
        assert_eq!(store.get_mandelbox(again.id).await.unwrap(), None);
        assert_eq!(store.reserve_mandelbox("h1", &new_box(APP, None)).await.unwrap(), None, "the host is full again");
        // The replacement is warm: the next Allocate in its region claims it,
        // with the ports its host published and the token it was given.
        let next = claim(&store, "u3", &["r1"]).await;
        assert_eq!((next.mandelbox.id, next.mandelbox.ports.clone()), (warm.id, ports()));
        assert_eq!(
            store.mandelbox_auth(warm.id).await.unwrap().map(|auth| auth.token_hash),
            Some(replacement.token_hash.clone())
        );

        // Without a replacement, or on a host that stopped taking boxes, the
        // slot is only freed.
        let ended = store.end_session(second.session.id, EndReason::UserEnded).await.unwrap().unwrap();
        store.drain_host("h1").await.unwrap();
        let refused = warm_replacement();
        let recycled = store.recycle_torn_down("h1", ended.teardown.unwrap().id, Some(&refused)).await;
        assert_eq!(recycled.unwrap(), Recycled { finished: true, replacement: None });
        assert_eq!(store.get_mandelbox(refused.id).await.unwrap(), None);
        // A live box that is not DYING is left to `mandelbox_finished`.
        assert_eq!(store.recycle_torn_down("h1", warm.id, None).await.unwrap(), Recycled::default());
        assert_eq!(box_state(&store, warm.id).await, MandelboxState::Running);
    }

    pub(crate) async fn recycle_torn_down_refuses_a_replacement_once_the_box_is_written_off(
        _db: &TestDatabase,
        store: DynStore,
    ) {
        // The host reconnected while the replacement was spawning: its Hello
        // no longer lists the torn-down box, so reconciliation wrote it off
        // (LOST), and a late confirmation must not add a box the host's
        // reconciliation has just torn down as unknown.
        host(&store, "h1", "r1", "img", 2).await;
        let running = running_session(&store, "h1", "r1", "u1").await;
        let dying = store.end_session(running.session.id, EndReason::ClientDisconnected).await.unwrap().unwrap();
        let dying = dying.teardown.unwrap();
        let reconciled = store.reconcile_host("h1", &[], Utc::now()).await.unwrap();
        assert_eq!(reconciled.lost, vec![dying.id]);
        let replacement = warm_replacement();
        assert_eq!(store.recycle_torn_down("h1", dying.id, Some(&replacement)).await.unwrap(), Recycled::default());
        assert_eq!(store.get_mandelbox(replacement.id).await.unwrap(), None);
        assert_eq!(box_state(&store, dying.id).await, MandelboxState::Lost);

        // A host at capacity with the DYING box counted (its capacity lowered
        // on reconnect) frees the slot and refuses the replacement.
        let running = running_session(&store, "h1", "r1", "u2").await;
        warm_box(&store, "h1", APP).await;
        let dying = store.end_session(running.session.id, EndReason::ClientDisconnected).await.unwrap().unwrap();
        host(&store, "h1", "r1", "img", 1).await;
        let replacement = warm_replacement();
        assert_eq!(
            store.recycle_torn_down("h1", dying.teardown.unwrap().id, Some(&replacement)).await.unwrap(),
            Recycled { finished: true, replacement: None }
        );
        assert_eq!(store.get_mandelbox(replacement.id).await.unwrap(), None);
        assert_eq!(store.host_summary("h1").await.unwrap().unwrap().live, 1);
    }

    pub(crate) async fn mandelboxes_spawned_writes_a_batch_as_one_by_one(_db: &TestDatabase, store: DynStore) {
        host(&store, "h1", "r1", "img", 10).await;
        let plain = spawning_box(&store, "h1", APP).await;
        let other = spawning_box(&store, "h1", APP).await;
        let waiting = pending(store.create_session_and_claim(&new_session("u1", &["r9"]), NO_LIMIT).await.unwrap());
        let reserved = store.reserve_mandelbox("h1", &new_box(APP, Some(waiting.id))).await.unwrap().unwrap();
        let warm = warm_box(&store, "h1", APP).await;
        let report = |id: Uuid| SpawnReport { id, ports: ports() };
        let reports = [
            report(plain.id),
            report(reserved.id),
            report(warm.id),
            report(Uuid::new_v4()),
            report(other.id),
            report(plain.id),
        ];
        let spawned = store.mandelboxes_spawned(&reports).await.unwrap();
        let states: Vec<_> = spawned.iter().map(|b| b.as_ref().map(|b| (b.id, b.state, b.session_id))).collect();
        assert_eq!(
            states,
            vec![
                Some((plain.id, MandelboxState::Waiting, None)),
                Some((reserved.id, MandelboxState::Allocated, Some(waiting.id))),
                None, // already WAITING
                None, // unknown
                Some((other.id, MandelboxState::Waiting, None)),
                None, // the same box again: no longer SPAWNING
            ]
        );
        assert_eq!(store.get_mandelbox(plain.id).await.unwrap().unwrap().ports, ports());
        assert_eq!(store.get_mandelbox(other.id).await.unwrap(), spawned[4]);
        assert_eq!(store.mandelboxes_spawned(&[]).await.unwrap(), Vec::new());
    }

    pub(crate) async fn recycle_torn_down_many_recycles_each_as_alone(_db: &TestDatabase, store: DynStore) {
        host(&store, "h1", "r1", "img", 3).await;
        host(&store, "h2", "r2", "img", 2).await;
        let mut dying = Vec::new();
        let sessions =
            [("h1", "r1", "u1"), ("h1", "r1", "u2"), ("h1", "r1", "u3"), ("h2", "r2", "u4"), ("h2", "r2", "u6")];
        for (host_id, region, user) in sessions {
            let running = running_session(&store, host_id, region, user).await;
            let ended = store.end_session(running.session.id, EndReason::ClientDisconnected).await.unwrap().unwrap();
            dying.push(ended.teardown.unwrap());
        }
        store.drain_host("h2").await.unwrap();
        let torn = |index: usize, host_id: &str, replacement: bool| TornDown {
            host_id: host_id.to_owned(),
            id: dying[index].id,
            replacement: replacement.then(warm_replacement),
        };
        let unknown = TornDown { host_id: "h1".to_owned(), id: Uuid::new_v4(), replacement: Some(warm_replacement()) };
        let batch = [
            torn(0, "h1", true),
            torn(4, "h1", true), // not that host's box
            torn(1, "h1", true),
            torn(3, "h2", true), // a draining host: the slot is only freed
            torn(2, "h1", false),
            unknown,
        ];
        let recycled = store.recycle_torn_down_many(&batch).await.unwrap();
        let outcome: Vec<_> = recycled
            .iter()
            .map(|r| (r.finished, r.replacement.as_ref().map(|b| (b.id, b.host_id.clone(), b.state))))
            .collect();
        let replacement_of = |index: usize| batch[index].replacement.as_ref().map(|new| new.id).unwrap();
        assert_eq!(
            outcome,
            vec![
                (true, Some((replacement_of(0), "h1".to_owned(), MandelboxState::Waiting))),
                (false, None),
                (true, Some((replacement_of(2), "h1".to_owned(), MandelboxState::Waiting))),
                (true, None),
                (true, None),
                (false, None),
            ]
        );
        for finished in &dying[..4] {
            assert_eq!(box_state(&store, finished.id).await, MandelboxState::Dead);
        }
        // Written as alone: WAITING with the ports its host published; the
        // refused ones not at all.
        for (index, item) in batch.iter().enumerate() {
            let Some(replacement) = &item.replacement else { continue };
            let written = store.get_mandelbox(replacement.id).await.unwrap();
            assert_eq!(written.is_some(), [0, 2].contains(&index), "replacement {index}");
            if let Some(written) = written {
                assert_eq!((written.ports, written.session_id), (ports(), None));
                assert_eq!(
                    store.mandelbox_auth(written.id).await.unwrap().map(|auth| auth.token_hash),
                    Some(replacement.token_hash.clone())
                );
            }
        }
        assert_eq!(box_state(&store, dying[4].id).await, MandelboxState::Dying);
        let live: Vec<_> =
            store.list_hosts(None).await.unwrap().into_iter().map(|summary| (summary.host.id, summary.live)).collect();
        assert_eq!(live, vec![("h1".to_owned(), 2), ("h2".to_owned(), 1)]);
        // The whole batch again (a retry after a lost commit acknowledgement):
        // nothing changes; the recorded replacements are returned as they are.
        let again = store.recycle_torn_down_many(&batch).await.unwrap();
        let again: Vec<_> =
            again.iter().map(|r| (r.finished, r.replacement.as_ref().map(|b| (b.id, b.state)))).collect();
        let waiting = |index: usize| Some((replacement_of(index), MandelboxState::Waiting));
        assert_eq!(
            again,
            vec![(false, waiting(0)), (false, None), (false, waiting(2)), (false, None), (false, None), (false, None)]
        );
        let live_again: Vec<_> =
            store.list_hosts(None).await.unwrap().into_iter().map(|summary| (summary.host.id, summary.live)).collect();
        assert_eq!(live_again, live);

        // The same box twice, as two confirmations of one teardown would be:
        // recycled once, one replacement.
        let running = running_session(&store, "h1", "r1", "u5").await;
        let ended = store.end_session(running.session.id, EndReason::UserEnded).await.unwrap().unwrap();
        let id = ended.teardown.unwrap().id;
        let twice = [0, 1].map(|_| TornDown { host_id: "h1".to_owned(), id, replacement: Some(warm_replacement()) });
        let recycled = store.recycle_torn_down_many(&twice).await.unwrap();
        assert_eq!(
            recycled.iter().map(|r| (r.finished, r.replacement.is_some())).collect::<Vec<_>>(),
            [(true, true), (false, false)]
        );
        assert_eq!(store.recycle_torn_down_many(&[]).await.unwrap(), Vec::new());
    }

    pub(crate) async fn recycle_batches_racing_reservations_respect_capacity(_db: &TestDatabase, store: DynStore) {
        host(&store, "h1", "r1", "img", 4).await;
        let mut batch = Vec::new();
        for user in ["u1", "u2", "u3", "u4"] {
            let running = running_session(&store, "h1", "r1", user).await;
            let ended = store.end_session(running.session.id, EndReason::ClientDisconnected).await.unwrap().unwrap();
            let id = ended.teardown.unwrap().id;
            batch.push(TornDown { host_id: "h1".to_owned(), id, replacement: Some(warm_replacement()) });
        }
        let recycle = {
            let store = store.clone();
            tokio::spawn(async move { store.recycle_torn_down_many(&batch).await })
        };
        let reservations: Vec<_> = (0..8)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { store.reserve_mandelbox("h1", &new_box(APP, None)).await })
            })
            .collect();
        let recycled = recycle.await.unwrap().unwrap();
        assert!(recycled.iter().all(|r| r.finished), "every DYING box is DEAD");
        let mut reserved = recycled.iter().filter(|r| r.replacement.is_some()).count();
        for reservation in reservations {
            reserved += usize::from(reservation.await.unwrap().unwrap().is_some());
        }
        let live = store.host_summary("h1").await.unwrap().unwrap().live;
        assert_eq!(u32::try_from(reserved).unwrap(), live);
        assert_eq!(live, 4, "every freed slot is taken once, by a replacement or a reservation");
    }

    pub(crate) async fn concurrent_ends_of_one_session_tear_down_once(_db: &TestDatabase, store: DynStore) {
        host(&store, "h1", "r1", "img", 4).await;
        let running = running_session(&store, "h1", "r1", "u1").await;
        let tasks: Vec<_> = (0..16)
            .map(|i| {
                let store = store.clone();
                let reason = if i % 2 == 0 { EndReason::ClientDisconnected } else { EndReason::UserEnded };
                tokio::spawn(async move { store.end_session(running.session.id, reason).await })
            })
            .collect();
        let mut ends = Vec::new();
        for task in tasks {
            ends.push(task.await.unwrap().unwrap().unwrap());
        }
        assert_eq!(ends.iter().filter(|end| end.changed).count(), 1, "one caller ends it");
        let teardowns: Vec<_> = ends.iter().filter_map(|end| end.teardown.as_ref()).collect();
        assert_eq!(teardowns.len(), 1, "one teardown");
        assert_eq!(teardowns[0].id, running.mandelbox.id);
        let stored = session(&store, running.session.id).await;
        let winner = ends.iter().find(|end| end.changed).unwrap();
        assert_eq!(stored.end_reason, winner.session.end_reason);
        assert!(ends.iter().all(|end| end.session.state == SessionState::Ended));
        assert_eq!(box_state(&store, running.mandelbox.id).await, MandelboxState::Dying);
    }

    pub(crate) async fn end_session_tears_down_its_box_once(_db: &TestDatabase, store: DynStore) {
        host(&store, "h1", "r1", "img", 4).await;
        let running = running_session(&store, "h1", "r1", "u1").await;
        let ended = store.end_session(running.session.id, EndReason::ClientDisconnected).await.unwrap().unwrap();
        assert!(ended.changed);
        assert_eq!(ended.session.state, SessionState::Ended);
        assert_eq!(ended.session.end_reason, Some(EndReason::ClientDisconnected));
        assert!(ended.session.ended_at.is_some());
        assert_eq!(ended.session.mandelbox_id, Some(running.mandelbox.id), "kept as history");
        let teardown = ended.teardown.unwrap();
        assert_eq!((teardown.id, teardown.state), (running.mandelbox.id, MandelboxState::Dying));
        assert_eq!(session(&store, running.session.id).await, ended.session);

        let again = store.end_session(running.session.id, EndReason::UserEnded).await.unwrap().unwrap();
        assert!(!again.changed);
        assert_eq!(again.teardown, None);
        assert_eq!(again.session, ended.session, "returned unchanged");

        let queued = pending(store.create_session_and_claim(&new_session("u2", &["r9"]), NO_LIMIT).await.unwrap());
        let ended = store.end_session(queued.id, EndReason::UserEnded).await.unwrap().unwrap();
        assert!(ended.changed);
        assert_eq!((ended.session.state, ended.teardown), (SessionState::Ended, None));
        assert_eq!(store.end_session(Uuid::new_v4(), EndReason::UserEnded).await.unwrap(), None);

        // A session whose box is already gone ends without a teardown.
        let orphan = running_session(&store, "h1", "r1", "u3").await;
        store.mandelbox_finished(orphan.mandelbox.id, MandelboxState::Lost, EndReason::HostLost).await.unwrap();
        let ended = store.end_session(orphan.session.id, EndReason::UserEnded).await.unwrap().unwrap();
        assert!(!ended.changed, "mandelbox_finished already ended it");
    }

    /// EndSession on a pending session while the dispatcher claims a box
    /// for it: whichever wins, the box is not left claimed for an ended
    /// session (on PostgreSQL one statement read the box as it was before
    /// the claim committed and left it ALLOCATED for good).
    pub(crate) async fn end_session_racing_a_claim_frees_the_box(db: &TestDatabase, store: DynStore) {
        host(&store, "h1", "r1", "img", 100).await;
        let (mut claimed_first, mut ended_first) = (0, 0);
        for round in 0..40 {
            let queued =
                pending(store.create_session_and_claim(&new_session(&format!("u{round}"), &["r1"]), 3).await.unwrap());
            let warm = warm_box(&store, "h1", APP).await;
            let (claimer, ender) = (store.clone(), store.clone());
            let claim = tokio::spawn(async move { claimer.claim_for_session(queued.id, &[]).await });
            let end = tokio::spawn(async move { ender.end_session(queued.id, EndReason::UserEnded).await });
            let (claim, end) = (claim.await.unwrap().unwrap(), end.await.unwrap().unwrap().unwrap());
            assert_eq!(end.session.state, SessionState::Ended);
            let the_box = store.get_mandelbox(warm.id).await.unwrap().unwrap();
            if claim.is_some() {
                claimed_first += 1;
                assert_eq!(the_box.state, MandelboxState::Dying, "round {round}: claimed, then ended");
                assert_eq!(end.teardown.map(|teardown| teardown.id), Some(warm.id), "round {round}: torn down");
            } else {
                ended_first += 1;
                assert_eq!(the_box.state, MandelboxState::Waiting, "round {round}: never claimed");
                // Out of the pool, so that the next round's session waits.
                store.mandelbox_finished(warm.id, MandelboxState::Dead, EndReason::UserEnded).await.unwrap();
            }
        }
        let stuck = db
            .query_i64(
                "SELECT count(*) FROM mandelboxes m JOIN sessions s ON s.id = m.session_id \
                 WHERE m.state IN ('ALLOCATED', 'RUNNING') AND s.state = 'ENDED'",
            )
            .await
            .unwrap();
        assert_eq!(
            stuck, 0,
            "boxes held for ended sessions ({claimed_first} claimed first, {ended_first} ended first)"
        );
    }

    /// PostgreSQL's sessions carry no foreign keys (migration 0010): every
    /// path that names a user or a box must name rows that exist.
    pub(crate) async fn sessions_name_existing_users_and_boxes(db: &TestDatabase, store: DynStore) {
        host(&store, "h1", "r1", "img", 10).await;
        let warm = warm_box(&store, "h1", APP).await;
        // A first session for a user with no row yet: the store creates it.
        let running = claimed(store.create_session_and_claim(&new_session("fresh", &["r1"]), 3).await.unwrap());
        assert_eq!(running.mandelbox.id, warm.id);
        let queued = pending(store.create_session_and_claim(&new_session("u1", &["r1"]), 3).await.unwrap());
        warm_box(&store, "h1", APP).await;
        let assigned = store.claim_for_session(queued.id, &[]).await.unwrap().expect("a warm box");
        store.end_session(running.session.id, EndReason::UserEnded).await.unwrap();
        store.end_session(assigned.session.id, EndReason::UserEnded).await.unwrap();
        let orphans = |sql: &'static str| async move { db.query_i64(sql).await.unwrap() };
        assert_eq!(
            orphans(
                "SELECT count(*) FROM sessions s WHERE s.mandelbox_id IS NOT NULL \
                 AND NOT EXISTS (SELECT 1 FROM mandelboxes m WHERE m.id = s.mandelbox_id)"
            )
            .await,
            0,
            "every session's box exists"
        );
        assert_eq!(
            orphans("SELECT count(*) FROM sessions s WHERE NOT EXISTS (SELECT 1 FROM users u WHERE u.id = s.user_id)")
                .await,
            0,
            "every session's user exists"
        );
        assert_eq!(db.query_i64("SELECT count(*) FROM sessions").await.unwrap(), 2);
    }

    pub(crate) async fn list_sessions_filters_newest_first(_db: &TestDatabase, store: DynStore) {
        let mut created = Vec::new();
        for user in ["u1", "u2", "u1", "u1"] {
            created
                .push(pending(store.create_session_and_claim(&new_session(user, &["r1"]), NO_LIMIT).await.unwrap()).id);
            tick().await;
        }
        store.end_session(created[2], EndReason::UserEnded).await.unwrap();
        let list = |filter: SessionFilter| {
            let store = store.clone();
            async move { store.list_sessions(&filter).await.unwrap().into_iter().map(|s| s.id).collect::<Vec<_>>() }
        };
        assert_eq!(list(SessionFilter::default()).await, vec![created[3], created[1], created[0]]);
        assert_eq!(
            list(SessionFilter { include_ended: true, ..Default::default() }).await,
            vec![created[3], created[2], created[1], created[0]]
        );
        assert_eq!(
            list(SessionFilter { user_id: Some("u1".to_owned()), include_ended: true, limit: 2 }).await,
            vec![created[3], created[2]]
        );
        assert_eq!(
            list(SessionFilter { user_id: Some("u1".to_owned()), ..Default::default() }).await,
            vec![created[3], created[0]]
        );
        assert!(list(SessionFilter { user_id: Some("u9".to_owned()), ..Default::default() }).await.is_empty());
    }

    pub(crate) async fn sweep_expires_old_pending_sessions_and_spawns(_db: &TestDatabase, store: DynStore) {
        host(&store, "h1", "r1", "img", 10).await;
        let old_session = pending(store.create_session_and_claim(&new_session("u1", &["r9"]), NO_LIMIT).await.unwrap());
        let reserved_for =
            pending(store.create_session_and_claim(&new_session("u2", &["r9"]), NO_LIMIT).await.unwrap());
        let old_spawn = store.reserve_mandelbox("h1", &new_box(APP, Some(reserved_for.id))).await.unwrap().unwrap();
        let old_waiting = warm_box(&store, "h1", APP).await;
        let cutoff = tick().await;
        let new_session_ =
            pending(store.create_session_and_claim(&new_session("u3", &["r9"]), NO_LIMIT).await.unwrap());
        let new_spawn = spawning_box(&store, "h1", APP).await;

        let far_past = cutoff - chrono::Duration::hours(1);
        assert_eq!(store.sweep(far_past, far_past).await.unwrap(), Default::default());

        let outcome = store.sweep(cutoff, cutoff).await.unwrap();
        let expired: Vec<Uuid> = outcome.expired_pending.iter().map(|s| s.id).collect();
        assert_eq!(expired, vec![old_session.id, reserved_for.id]);
        for session in &outcome.expired_pending {
            assert_eq!(session.state, SessionState::Ended);
            assert_eq!(session.end_reason, Some(EndReason::NoCapacity));
            assert!(session.ended_at.is_some());
        }
        assert_eq!(ids(&outcome.expired_spawns), vec![old_spawn.id]);
        assert_eq!(outcome.expired_spawns[0].state, MandelboxState::Dead);
        assert_eq!(box_state(&store, old_spawn.id).await, MandelboxState::Dead);
        assert_eq!(box_state(&store, old_waiting.id).await, MandelboxState::Waiting);
        assert_eq!(box_state(&store, new_spawn.id).await, MandelboxState::Spawning);
        assert_eq!(session(&store, new_session_.id).await.state, SessionState::Pending);

        assert_eq!(store.sweep(cutoff, cutoff).await.unwrap(), Default::default(), "nothing left");
    }

    pub(crate) async fn sweep_keeps_the_session_of_an_expired_spawn_pending(_db: &TestDatabase, store: DynStore) {
        host(&store, "h1", "r1", "img", 10).await;
        let cutoff_for_sessions = Utc::now() - chrono::Duration::hours(1);
        let queued = pending(store.create_session_and_claim(&new_session("u1", &["r1"]), NO_LIMIT).await.unwrap());
        let spawn = store.reserve_mandelbox("h1", &new_box(APP, Some(queued.id))).await.unwrap().unwrap();
        let cutoff = tick().await;
        let outcome = store.sweep(cutoff_for_sessions, cutoff).await.unwrap();
        assert!(outcome.expired_pending.is_empty());
        assert_eq!(ids(&outcome.expired_spawns), vec![spawn.id]);
        assert_eq!(session(&store, queued.id).await.state, SessionState::Pending);
        // The session can be served by another box.
        let warm = warm_box(&store, "h1", APP).await;
        assert_eq!(store.claim_for_session(queued.id, &[]).await.unwrap().unwrap().mandelbox.id, warm.id);
    }
}

// ----- helpers for the races ----------------------------------------------------

/// `claimers` users, each creating one session at the same moment.
async fn race_claims(store: &DynStore, claimers: usize, user_prefix: &str) -> Vec<ClaimOutcome> {
    let start = Arc::new(tokio::sync::Barrier::new(claimers));
    let tasks: Vec<_> = (0..claimers)
        .map(|i| {
            let store = store.clone();
            let start = start.clone();
            let user = format!("{user_prefix}-{i}");
            tokio::spawn(async move {
                start.wait().await;
                store.create_session_and_claim(&new_session(&user, &["r1"]), 1).await
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.unwrap().unwrap());
    }
    outcomes
}

fn assert_claims_are_distinct(outcomes: &[ClaimOutcome], expected_claims: usize) {
    let boxes: Vec<Uuid> = outcomes
        .iter()
        .filter_map(|outcome| match outcome {
            ClaimOutcome::Claimed(claim) => Some(claim.mandelbox.id),
            ClaimOutcome::Pending(_) => None,
        })
        .collect();
    assert_eq!(boxes.len(), expected_claims, "claims");
    assert_eq!(boxes.iter().collect::<HashSet<_>>().len(), expected_claims, "distinct boxes");
}

/// The stored rows agree: 20 boxes, each RUNNING for its own RUNNING
/// session (Allocate's claim), and every other session PENDING.
async fn assert_twenty_boxes_claimed_once(db: &TestDatabase, pending_sessions: i64) {
    let count = |sql: &'static str| async move { db.query_i64(sql).await.unwrap() };
    assert_eq!(count("SELECT count(*) FROM mandelboxes WHERE state = 'RUNNING'").await, 20);
    assert_eq!(count("SELECT count(DISTINCT session_id) FROM mandelboxes WHERE state = 'RUNNING'").await, 20);
    assert_eq!(count("SELECT count(*) FROM mandelboxes WHERE state = 'WAITING'").await, 0);
    assert_eq!(count("SELECT count(*) FROM sessions WHERE state = 'RUNNING'").await, 20);
    assert_eq!(count("SELECT count(DISTINCT mandelbox_id) FROM sessions WHERE state = 'RUNNING'").await, 20);
    assert_eq!(
        count(
            "SELECT count(*) FROM sessions s JOIN mandelboxes m ON m.id = s.mandelbox_id \
             WHERE s.state = 'RUNNING' AND m.session_id = s.id AND m.state = 'RUNNING'"
        )
        .await,
        20
    );
    assert_eq!(count("SELECT count(*) FROM sessions WHERE state = 'PENDING'").await, pending_sessions);
}

// ----- the suite, once per backend ------------------------------------------------

/// Instantiates every contract test for one backend: each gets a fresh database
/// and a migrated store.
macro_rules! store_contract_suite {
    ($backend:expr) => {
        store_contract_suite!(
            @tests $backend;
            regions_are_upserted_and_listed_by_name,
            ensure_user_is_idempotent_and_keeps_the_email,
            concurrent_ensure_user_creates_one_row,
            host_connected_inserts_then_bumps_the_generation,
            host_connected_keeps_a_host_draining,
            host_disconnected_honours_the_generation,
            record_heartbeat_ignores_other_generations,
            record_heartbeats_writes_a_batch_of_current_generations,
            heartbeat_and_bookkeeping_batches_do_not_deadlock,
            drain_host_moves_only_active_hosts,
            mark_host_lost_loses_boxes_and_ends_their_sessions,
            mark_host_lost_honours_the_generation,
            list_hosts_counts_boxes_by_kind,
            box_coming_in_sees_free_and_freeing_boxes_of_active_hosts,
            hosts_disconnected_before_a_cutoff,
            connected_hosts_changed_before_a_cutoff,
            mark_connected_hosts_disconnected_at_start_up,
            config_entries_are_read_by_key,
            stripe_customer_is_remembered_once,
            reconcile_host_compares_reported_and_stored_boxes,
            reconcile_unknown_host_tears_everything_down,
            reserve_mandelbox_respects_capacity,
            reserve_mandelboxes_takes_what_fits_in_order,
            mandelbox_token_hash_is_stored_for_auth,
            reserve_in_regions_picks_first_region_then_fullest_host,
            reservation_finds_room_past_hosts_filled_since_the_refresh,
            hosts_with_open_slots_are_the_active_hosts_with_room,
            concurrent_reservations_respect_capacity,
            mandelbox_spawned_goes_waiting_or_allocated,
            mandelbox_finished_ends_the_session_on_it,
            list_mandelboxes_filters_newest_first,
            host_mandelboxes_lists_live_boxes_in_given_states,
            corrupt_rows_are_reported_not_panicked_on,
            claim_takes_the_first_region_with_a_box,
            claim_prefers_the_fullest_host,
            claim_breaks_ties_by_host_then_age,
            claim_choice_matches_the_rule_on_a_random_fleet,
            claim_choice_matches_the_rule_on_a_large_region,
            a_stale_rank_never_hides_a_box,
            claim_skips_unfit_boxes,
            pending_session_is_stored_and_queued,
            session_limit_counts_live_sessions,
            session_limit_frees_a_place_however_a_session_ends,
            end_session_by_token_checks_the_token_then_ends_once,
            end_sessions_by_token_answers_each_as_alone,
            concurrent_disconnect_batches_end_each_session_once,
            disconnect_batch_gives_each_user_back_its_places,
            concurrent_requests_of_one_user_respect_the_limit,
            concurrent_claims_take_distinct_boxes,
            claim_batch_writes_each_session_as_alone,
            concurrent_claim_batches_take_distinct_boxes,
            concurrent_claim_batches_of_one_user_respect_the_limit,
            concurrent_ends_of_one_session_tear_down_once,
            claim_for_session_claims_pending_sessions,
            attach_reserved_moves_the_session_onto_its_box,
            confirm_assignment_runs_both,
            release_claim_puts_the_session_back_in_the_queue,
            recycle_torn_down_frees_and_refills_the_slot_at_once,
            recycle_torn_down_refuses_a_replacement_once_the_box_is_written_off,
            recycle_torn_down_many_recycles_each_as_alone,
            recycle_batches_racing_reservations_respect_capacity,
            mandelboxes_spawned_writes_a_batch_as_one_by_one,
            reconcile_host_releases_stale_claims_the_host_never_got,
            end_session_tears_down_its_box_once,
            end_session_racing_a_claim_frees_the_box,
            sessions_name_existing_users_and_boxes,
            list_sessions_filters_newest_first,
            sweep_expires_old_pending_sessions_and_spawns,
            sweep_keeps_the_session_of_an_expired_spawn_pending,
            regions_keep_their_scaling_settings,
            leases_are_exclusive_renewed_and_handed_over,
            a_stale_leaders_writes_are_refused,
            concurrent_lease_claims_have_one_winner,
            instances_follow_their_lifecycle,
            region_can_grow_below_its_maximum_or_while_launching,
            operations_are_durable_and_one_rollout_runs_at_a_time,
            complete_rollout_switches_every_region_at_once,
        );
    };
    (@tests $backend:expr; $($test:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $test() {
                let db = switchboard_tests::db::fresh($backend).await.unwrap();
                let store = switchboard_tests::db::open_store(&db).await.unwrap();
                let expected_backend = match $backend {
                    switchboard_tests::db::Backend::Postgres => "postgres",
                    switchboard_tests::db::Backend::Sqlite => "sqlite",
                };
                assert_eq!(store.backend(), expected_backend);
                crate::contract::$test(&db, store).await;
            }
        )+
    };
}

mod postgres {
    use switchboard::store::{DynStore, PgStore};
    use switchboard_tests::db::Backend;

    use super::*;

    store_contract_suite!(Backend::Postgres);

    /// A setting of the store's connections, read on one of them.
    async fn setting_of(store: &PgStore, name: &str) -> String {
        sqlx::query_scalar(&format!("SHOW {name}")).fetch_one(store.pool()).await.unwrap()
    }

    /// The store's connections plan without bitmap scans, which never mark a
    /// dead index entry, so that on tables whose rows change state thousands
    /// of times a second a lookup's cost does not grow until the next vacuum
    /// (`SESSION_SETTINGS` in store/postgres.rs; BENCHMARKS.md run Z). The
    /// database URL's own options still win, and its other options are kept.
    #[tokio::test]
    async fn the_stores_connections_plan_without_bitmap_scans_unless_the_url_says_otherwise() {
        let db = switchboard_tests::db::fresh(Backend::Postgres).await.unwrap();
        let store = PgStore::connect(db.url(), 2).await.unwrap();
        assert_eq!(setting_of(&store, "enable_bitmapscan").await, "off");

        let separator = if db.url().contains('?') { '&' } else { '?' };
        let url = format!("{}{separator}options=-c%20enable_bitmapscan%3Don%20-c%20work_mem%3D7MB", db.url());
        let store = PgStore::connect(&url, 2).await.unwrap();
        assert_eq!(setting_of(&store, "enable_bitmapscan").await, "on", "the URL's own setting is kept");
        assert_eq!(setting_of(&store, "work_mem").await, "7MB", "the URL's other options are kept");

        let url = format!("{}{separator}options=-c%20work_mem%3D7MB", db.url());
        let store = PgStore::connect(&url, 2).await.unwrap();
        assert_eq!(setting_of(&store, "enable_bitmapscan").await, "off", "added beside the URL's options");
        assert_eq!(setting_of(&store, "work_mem").await, "7MB");
    }

    /// Two stores on one database stand for two replicas: their claims can
    /// only be kept apart by the database itself.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn claims_from_two_pools_never_share_a_box() {
        let db = switchboard_tests::db::fresh(Backend::Postgres).await.unwrap();
        let first = PgStore::connect(db.url(), 10).await.unwrap();
        first.migrate().await.unwrap();
        let second = PgStore::connect(db.url(), 10).await.unwrap();
        second.migrate().await.unwrap();
        let (first, second): (DynStore, DynStore) = (Arc::new(first), Arc::new(second));
        for host_index in 0..4 {
            let host_id = format!("h{host_index}");
            host(&first, &host_id, "r1", "img", 5).await;
            for _ in 0..5 {
                warm_box(&second, &host_id, APP).await;
            }
        }

        let (from_first, from_second) =
            tokio::join!(race_claims(&first, 25, "first"), race_claims(&second, 25, "second"));
        let outcomes: Vec<ClaimOutcome> = from_first.into_iter().chain(from_second).collect();
        assert_claims_are_distinct(&outcomes, 20);
        assert_twenty_boxes_claimed_once(&db, 30).await;
    }

    /// Replicas starting together migrate once (sqlx's advisory lock).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_migrations_are_safe() {
        let db = switchboard_tests::db::fresh(Backend::Postgres).await.unwrap();
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let url = db.url().to_owned();
                tokio::spawn(async move {
                    let store = PgStore::connect(&url, 2).await?;
                    store.migrate().await
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        // Each migration applied exactly once.
        let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../migrations/postgres"))
            .unwrap()
            .filter(|entry| entry.as_ref().is_ok_and(|entry| entry.path().extension().is_some_and(|ext| ext == "sql")))
            .count();
        assert!(files >= 2);
        let applied = db.query_i64("SELECT count(*) FROM _sqlx_migrations").await.unwrap();
        let distinct = db.query_i64("SELECT count(DISTINCT version) FROM _sqlx_migrations").await.unwrap();
        assert_eq!((applied, distinct), (files as i64, files as i64));
    }
}

mod sqlite {
    use switchboard_tests::db::Backend;

    store_contract_suite!(Backend::Sqlite);

    /// One connection serves reads and writes, or the reader would see its
    /// own empty in-memory database.
    #[tokio::test]
    async fn in_memory_database_reads_its_writes() {
        let store = switchboard::store::connect("sqlite::memory:").await.unwrap();
        let region = switchboard::model::Region { name: "r1".to_owned(), enabled: true, ..Default::default() };
        store.put_region(&region).await.unwrap();
        assert_eq!(store.list_regions().await.unwrap(), vec![region]);
    }

    #[tokio::test]
    async fn unsupported_urls_are_refused() {
        assert!(switchboard::store::connect("mysql://localhost/db").await.is_err());
    }
}
