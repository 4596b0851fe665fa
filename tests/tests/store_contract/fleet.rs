//! The fleet-scaling part of the `Store` contract: region scaling settings,
//! leases with fencing, instances, operations. Run against both backends by
//! the suite macro in `store_contract.rs`.

use std::time::Duration;

use switchboard::model::{
    InstanceState, InstanceType, Lease, NewInstance, OperationRecord, OperationState, Region, RegionScaling,
};
use switchboard::store::{DynStore, StoreError};
use switchboard_tests::db::TestDatabase;
use uuid::Uuid;

use super::host;

const TTL: Duration = Duration::from_secs(30);

fn new_instance(host_id: &str, region: &str, rollout_id: Option<Uuid>) -> NewInstance {
    NewInstance {
        host_id: host_id.to_owned(),
        region: region.to_owned(),
        instance_type: "g4dn.2xlarge".to_owned(),
        capacity: 2,
        image: "ami-1".to_owned(),
        launch_token: "token-1".to_owned(),
        rollout_id,
    }
}

async fn lease(store: &DynStore, name: &str, holder: &str) -> Lease {
    store.acquire_lease(name, holder, TTL).await.unwrap().expect("lease is free")
}

fn rollout(now: chrono::DateTime<chrono::Utc>) -> OperationRecord {
    OperationRecord {
        id: Uuid::new_v4(),
        kind: "rollout".to_owned(),
        state: OperationState::Running,
        request: serde_json::json!({ "image": "ami-2" }),
        progress: serde_json::json!({ "phase": "LAUNCHING" }),
        error: None,
        created_at: now,
        updated_at: now,
        finished_at: None,
    }
}

fn now() -> chrono::DateTime<chrono::Utc> {
    use chrono::SubsecRound;
    chrono::Utc::now().trunc_subsecs(6)
}

pub(crate) async fn regions_keep_their_scaling_settings(_db: &TestDatabase, store: DynStore) {
    let region = Region {
        name: "us-east-1".to_owned(),
        enabled: true,
        image: "ami-1".to_owned(),
        scaling: RegionScaling {
            buffer: 4,
            min_instances: 1,
            max_instances: 9,
            instance_types: vec![
                InstanceType { name: "g4dn.2xlarge".to_owned(), capacity: 2 },
                InstanceType { name: "g4dn.4xlarge".to_owned(), capacity: 3 },
            ],
        },
    };
    assert_eq!(store.put_region(&region).await.unwrap(), region);
    assert_eq!(store.list_regions().await.unwrap(), vec![region.clone()]);
    let fixed = Region { scaling: RegionScaling::default(), ..region };
    assert_eq!(store.put_region(&fixed).await.unwrap(), fixed);
    assert_eq!(store.list_regions().await.unwrap(), vec![fixed]);
}

pub(crate) async fn leases_are_exclusive_renewed_and_handed_over(_db: &TestDatabase, store: DynStore) {
    let first = lease(&store, "scaler:us-east-1", "replica-a").await;
    assert_eq!(first.epoch, 1);
    assert!(store.acquire_lease("scaler:us-east-1", "replica-b", TTL).await.unwrap().is_none());
    // Another name is another lease.
    assert_eq!(lease(&store, "scaler:eu-west-1", "replica-b").await.epoch, 1);
    // Renewal keeps the epoch and moves the expiry.
    let renewed = lease(&store, "scaler:us-east-1", "replica-a").await;
    assert_eq!(renewed.epoch, 1);
    assert!(renewed.expires_at >= first.expires_at);
    // Released: the next holder gets a new epoch.
    store.release_lease(&renewed).await.unwrap();
    let taken = lease(&store, "scaler:us-east-1", "replica-b").await;
    assert_eq!((taken.holder.as_str(), taken.epoch), ("replica-b", 2));
    // An expired lease is taken over too.
    let short = store.acquire_lease("rollouts", "replica-a", Duration::from_millis(50)).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(120)).await;
    let over = lease(&store, "rollouts", "replica-b").await;
    assert_eq!(over.epoch, short.epoch + 1);
    // Its old holder coming back after expiry does not get it back.
    assert!(store.acquire_lease("rollouts", "replica-a", TTL).await.unwrap().is_none());
}

pub(crate) async fn a_stale_leaders_writes_are_refused(_db: &TestDatabase, store: DynStore) {
    let stale = store.acquire_lease("scaler:r1", "replica-a", Duration::from_millis(50)).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(120)).await;
    let current = lease(&store, "scaler:r1", "replica-b").await;

    let refused = store.record_launch(&stale, &[new_instance("h-1", "r1", None)]).await;
    assert!(matches!(refused, Err(StoreError::Fenced { .. })), "{refused:?}");
    assert!(store.list_instances(None, true).await.unwrap().is_empty(), "nothing was written");

    store.record_launch(&current, &[new_instance("h-1", "r1", None)]).await.unwrap();
    let refused = store.set_instance_state(&stale, "h-1", InstanceState::Terminating, "stale").await;
    assert!(matches!(refused, Err(StoreError::Fenced { .. })), "{refused:?}");
    let kept = store.list_instances(None, false).await.unwrap();
    assert_eq!(kept[0].state, InstanceState::Launching);

    let operation = rollout(now());
    store.create_operation(&operation).await.unwrap();
    let refused = store.update_operation(Some(&stale), &operation).await;
    assert!(matches!(refused, Err(StoreError::Fenced { .. })), "{refused:?}");
    let refused = store.complete_rollout(&stale, &operation, &[("r1".to_owned(), "ami-2".to_owned())]).await;
    assert!(matches!(refused, Err(StoreError::Fenced { .. })), "{refused:?}");
}

pub(crate) async fn concurrent_lease_claims_have_one_winner(_db: &TestDatabase, store: DynStore) {
    let tasks: Vec<_> = (0..16)
        .map(|index| {
            let store = store.clone();
            tokio::spawn(async move { store.acquire_lease("scaler:race", &format!("replica-{index}"), TTL).await })
        })
        .collect();
    let mut winners = Vec::new();
    for task in tasks {
        if let Some(lease) = task.await.unwrap().unwrap() {
            winners.push(lease);
        }
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    assert_eq!(winners[0].epoch, 1);
}

pub(crate) async fn instances_follow_their_lifecycle(db: &TestDatabase, store: DynStore) {
    let lease = lease(&store, "scaler:r1", "replica-a").await;
    let recorded =
        store.record_launch(&lease, &[new_instance("h-1", "r1", None), new_instance("h-2", "r1", None)]).await.unwrap();
    assert_eq!(recorded.len(), 2);
    assert!(recorded.iter().all(|i| i.state == InstanceState::Launching && i.instance_id.is_none()));
    // A host id is launched once.
    let again = store.record_launch(&lease, &[new_instance("h-3", "r1", None), new_instance("h-1", "r1", None)]).await;
    assert!(matches!(again, Err(StoreError::Conflict(_))), "{again:?}");
    assert_eq!(db.query_i64("SELECT count(*) FROM instances").await.unwrap(), 2, "the batch rolled back");

    let launched = store.instance_launched("h-1", "i-0001", "g4dn.4xlarge", 3).await.unwrap().unwrap();
    assert_eq!(
        (launched.instance_id.as_deref(), launched.instance_type.as_str(), launched.capacity),
        (Some("i-0001"), "g4dn.4xlarge", 3)
    );
    // Its host says Hello: RUNNING.
    host(&store, "h-1", "r1", "ami-1", 3).await;
    let running = store.list_instances(Some("r1"), false).await.unwrap();
    let h1 = running.iter().find(|i| i.host_id == "h-1").unwrap();
    assert_eq!(h1.state, InstanceState::Running);
    assert!(h1.connected_at.is_some());

    let draining = store.set_instance_state(&lease, "h-1", InstanceState::Draining, "excess").await.unwrap().unwrap();
    assert_eq!((draining.state, draining.reason.as_deref()), (InstanceState::Draining, Some("excess")));
    let terminated =
        store.set_instance_state(&lease, "h-1", InstanceState::Terminated, "drained").await.unwrap().unwrap();
    assert!(terminated.terminated_at.is_some());
    // Terminated is final; the host is gone from the fleet.
    assert!(store.set_instance_state(&lease, "h-1", InstanceState::Draining, "x").await.unwrap().is_none());
    assert!(store.instance_launched("h-1", "i-0009", "x", 1).await.unwrap().is_none());
    assert!(store.get_host("h-1").await.unwrap().unwrap().terminated_at.is_some());
    assert!(store.list_hosts(None).await.unwrap().is_empty());

    let live: Vec<String> = store.list_instances(None, false).await.unwrap().into_iter().map(|i| i.host_id).collect();
    assert_eq!(live, vec!["h-2".to_owned()]);
    assert_eq!(store.list_instances(None, true).await.unwrap().len(), 2);
    assert!(store.list_instances(Some("other"), true).await.unwrap().is_empty());
    assert_eq!(store.count_instances("r1").await.unwrap(), 2);
    assert_eq!(store.count_instances("other").await.unwrap(), 0);
}

/// What an Allocate that found no box asks of a scaled region: an instance
/// LAUNCHING, or fewer live (not TERMINATED) instances than the maximum.
pub(crate) async fn region_can_grow_below_its_maximum_or_while_launching(_db: &TestDatabase, store: DynStore) {
    assert!(store.region_can_grow("r1", 2).await.unwrap(), "no instance yet");
    assert!(!store.region_can_grow("r1", 0).await.unwrap(), "a maximum of none");
    let lease = lease(&store, "scaler:r1", "replica-a").await;
    store.record_launch(&lease, &[new_instance("h-1", "r1", None), new_instance("h-2", "r1", None)]).await.unwrap();
    assert!(store.region_can_grow("r1", 2).await.unwrap(), "at the maximum, but launching");
    assert!(store.region_can_grow("r1", 1).await.unwrap(), "above the maximum, but launching");
    host(&store, "h-1", "r1", "ami-1", 2).await;
    host(&store, "h-2", "r1", "ami-1", 2).await;
    assert!(!store.region_can_grow("r1", 2).await.unwrap(), "two running, none launching");
    assert!(store.region_can_grow("r1", 3).await.unwrap());
    assert!(store.region_can_grow("other", 1).await.unwrap(), "another region's instances do not count");
    store.set_instance_state(&lease, "h-1", InstanceState::Draining, "excess").await.unwrap().unwrap();
    assert!(!store.region_can_grow("r1", 2).await.unwrap(), "a draining instance is live");
    store.set_instance_state(&lease, "h-2", InstanceState::Terminated, "drained").await.unwrap().unwrap();
    assert!(store.region_can_grow("r1", 2).await.unwrap(), "a terminated instance is not");
    assert!(!store.region_can_grow("r1", 1).await.unwrap());
}

pub(crate) async fn operations_are_durable_and_one_rollout_runs_at_a_time(_db: &TestDatabase, store: DynStore) {
    let lease = lease(&store, "rollouts", "replica-a").await;
    let mut first = rollout(now());
    store.create_operation(&first).await.unwrap();
    assert_eq!(store.get_operation(first.id).await.unwrap().as_ref(), Some(&first));
    let second = rollout(now());
    assert!(matches!(store.create_operation(&second).await, Err(StoreError::Conflict(_))));

    first.progress = serde_json::json!({ "phase": "WAITING", "regions": [{ "region": "r1" }] });
    first.updated_at = now();
    store.update_operation(Some(&lease), &first).await.unwrap();
    assert_eq!(store.get_operation(first.id).await.unwrap().as_ref(), Some(&first));
    assert_eq!(store.list_operations(true, 0).await.unwrap(), vec![first.clone()]);

    first.state = OperationState::RolledBack;
    first.error = Some("r1 not ready".to_owned());
    first.finished_at = Some(now());
    store.update_operation(None, &first).await.unwrap();
    assert!(store.list_operations(true, 0).await.unwrap().is_empty());
    // Finished: the next one may start.
    store.create_operation(&second).await.unwrap();
    let all = store.list_operations(false, 0).await.unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[1], first, "newest first");
    assert!(store.get_operation(Uuid::new_v4()).await.unwrap().is_none());
}

pub(crate) async fn complete_rollout_switches_every_region_at_once(_db: &TestDatabase, store: DynStore) {
    for name in ["r1", "r2", "r3"] {
        let region = Region { name: name.to_owned(), enabled: true, image: "ami-1".to_owned(), ..Default::default() };
        store.put_region(&region).await.unwrap();
    }
    let scaler = lease(&store, "scaler:r1", "replica-a").await;
    let rollouts = lease(&store, "rollouts", "replica-a").await;
    let mut operation = rollout(now());
    store.create_operation(&operation).await.unwrap();
    store
        .record_launch(&scaler, &[new_instance("new-1", "r1", Some(operation.id)), new_instance("old-1", "r1", None)])
        .await
        .unwrap();

    operation.state = OperationState::Succeeded;
    operation.finished_at = Some(now());
    let images = [("r1".to_owned(), "ami-2".to_owned()), ("r2".to_owned(), "ami-2".to_owned())];
    store.complete_rollout(&rollouts, &operation, &images).await.unwrap();

    let images: Vec<(String, String)> =
        store.list_regions().await.unwrap().into_iter().map(|r| (r.name, r.image)).collect();
    assert_eq!(
        images,
        vec![("r1".into(), "ami-2".into()), ("r2".into(), "ami-2".into()), ("r3".into(), "ami-1".into())]
    );
    assert!(store.list_instances(None, false).await.unwrap().iter().all(|i| i.rollout_id.is_none()));
    assert_eq!(store.get_operation(operation.id).await.unwrap().map(|o| o.state), Some(OperationState::Succeeded));
}
