//! The scaler end to end through the local provider: real hostagents launched
//! and killed by the same scaling code that drives EC2. The buffer is kept
//! warm as sessions come and go; a host killed without goodbye is replaced and
//! its instance terminated; a host that never connects is terminated; two
//! scalers racing for one region launch once.
#![allow(clippy::unwrap_used)]

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use anyhow::bail;
use async_trait::async_trait;
use switchboard::{
    auth::host_credential::HostCredentials,
    cloud::{CloudError, CloudProvider, Instance, InstanceState as CloudState, LaunchRequest},
    config::Secret,
    model::{EndReason, HostState, InstanceRecord, InstanceState, SessionState},
    scaling::{FleetScaler, ScalerHandle, ScalerOptions},
};
use switchboard_proto::v1::EndSessionRequest;
use switchboard_tests::{
    Backend, TestApp, TestOptions,
    app::{TestCloud, chrome_in_us_east, eventually, fast_scaling, scaled_region},
    on_both_backends,
};
use tokio_util::sync::CancellationToken;

const REGION: &str = "us-east-1";
const WAIT: Duration = Duration::from_secs(20);

async fn spawn(backend: Backend, cloud: TestCloud, scaler_enabled: bool) -> TestApp {
    let options = TestOptions { hosts: vec![], wait_warm: false, cloud, ..Default::default() };
    TestApp::spawn_with(backend, options, |config| {
        fast_scaling(config);
        config.scaling.enabled = scaler_enabled;
        config.cloud.cluster = "scaling-test".into();
    })
    .await
    .unwrap()
}

async fn instances(app: &TestApp) -> Vec<InstanceRecord> {
    app.store.list_instances(Some(REGION), true).await.unwrap()
}

async fn live_instances(app: &TestApp) -> Vec<InstanceRecord> {
    app.store.list_instances(Some(REGION), false).await.unwrap()
}

/// Waits until `check` holds for the region's instances (all, terminated included).
async fn wait_instances(
    app: &TestApp,
    what: &str,
    check: impl Fn(&[InstanceRecord]) -> bool,
) -> anyhow::Result<Vec<InstanceRecord>> {
    let mut last = Vec::new();
    let result = eventually(WAIT, async || {
        last = instances(app).await;
        Ok(check(&last))
    })
    .await;
    if result.is_err() {
        let seen: Vec<String> =
            last.iter().map(|i| format!("{} {} {}", i.host_id, i.state, i.reason.as_deref().unwrap_or(""))).collect();
        bail!("{what}: not within {WAIT:?}; instances: {seen:?}");
    }
    Ok(last)
}

fn count(instances: &[InstanceRecord], state: InstanceState) -> usize {
    instances.iter().filter(|i| i.state == state).count()
}

async fn end(app: &TestApp, user: &str, session_id: &str) {
    app.user_client(user).end_session(EndSessionRequest { session_id: session_id.to_owned() }).await.unwrap();
}

/// Buffer 2 of 2-slot hosts, 1 to 4 hosts: sessions taking the warm boxes
/// bring hosts up; sessions ending take them down to the minimum.
async fn the_buffer_follows_sessions_up_and_down(backend: Backend) {
    let app = spawn(backend, TestCloud::Local, true).await;
    app.store.put_region(&scaled_region(REGION, "", 2, 1, 4, "local", 2)).await.unwrap();
    wait_instances(&app, "one host up", |i| count(i, InstanceState::Running) == 1).await.unwrap();
    app.wait_warm(2, WAIT).await.unwrap();

    // Each session takes a warm box; the scaler tops the buffer up.
    let mut sessions = Vec::new();
    for n in 0..4 {
        let user = format!("user-{n}");
        let session = app.user_client(&user).allocate(chrome_in_us_east()).await.unwrap().into_inner();
        sessions.push((user, session.session_id));
    }
    // 4 assigned + 2 warm = 6 slots = 3 hosts, none above max.
    let grown = wait_instances(&app, "three hosts running", |i| count(i, InstanceState::Running) == 3).await.unwrap();
    assert_eq!(grown.len(), 3, "exactly what was missing was launched: {grown:?}");
    app.wait_warm(2, WAIT).await.unwrap();
    // Tagged with the cluster and named after the region.
    let described = app.local.as_ref().unwrap().describe_by_tag(REGION, "scaling-test").await.unwrap();
    assert_eq!(described.len(), 3);
    assert!(grown.iter().all(|i| i.host_id.starts_with("test-us-east-1-")));

    for (user, session_id) in &sessions {
        end(&app, user, session_id).await;
    }
    // Back to the minimum: two hosts drained, then terminated once empty.
    let shrunk = wait_instances(&app, "back to one host", |i| count(i, InstanceState::Terminated) == 2).await.unwrap();
    assert_eq!(count(&shrunk, InstanceState::Running), 1);
    assert!(
        shrunk.iter().filter(|i| i.state == InstanceState::Terminated).all(|i| i.reason.as_deref() == Some("drained")),
        "{shrunk:?}"
    );
    let described = app.local.as_ref().unwrap().describe_by_tag(REGION, "scaling-test").await.unwrap();
    assert_eq!(described.iter().filter(|i| i.state.is_live()).count(), 1, "terminated in the cloud too");
    assert_eq!(app.store.list_hosts(Some(REGION)).await.unwrap().len(), 1, "terminated hosts leave the fleet");
    app.wait_warm(2, WAIT).await.unwrap();
}

/// A host killed without goodbye: its session ends as HOST_LOST, its instance
/// is terminated through the provider, and a replacement keeps the buffer.
async fn a_killed_host_is_replaced_and_terminated(backend: Backend) {
    let app = spawn(backend, TestCloud::Local, true).await;
    app.store.put_region(&scaled_region(REGION, "", 2, 1, 3, "local", 2)).await.unwrap();
    let first = wait_instances(&app, "one host up", |i| count(i, InstanceState::Running) == 1).await.unwrap();
    app.wait_warm(2, WAIT).await.unwrap();
    let victim = first[0].clone();
    let session = app.user_client("victim-user").allocate(chrome_in_us_east()).await.unwrap().into_inner();
    assert_eq!(app.session(&session.session_id).await.unwrap().host_id.as_ref(), Some(&victim.host_id));

    let local = app.local.as_ref().unwrap();
    local.handle(victim.instance_id.as_deref().unwrap()).unwrap().kill();

    let after = wait_instances(&app, "victim terminated and replaced", |i| {
        i.iter().any(|i| i.host_id == victim.host_id && i.state == InstanceState::Terminated)
            && i.iter().any(|i| i.host_id != victim.host_id && i.state == InstanceState::Running)
    })
    .await
    .unwrap();
    let dead = after.iter().find(|i| i.host_id == victim.host_id).unwrap();
    assert_eq!(dead.reason.as_deref(), Some("host_lost"));
    let lost = app.session(&session.session_id).await.unwrap();
    assert_eq!((lost.state, lost.end_reason), (SessionState::Ended, Some(EndReason::HostLost)));
    assert_eq!(app.store.get_host(&victim.host_id).await.unwrap().unwrap().state, HostState::Unhealthy);
    let described = local.describe_by_tag(REGION, "scaling-test").await.unwrap();
    let victim_instance = described.iter().find(|i| Some(&i.instance_id) == victim.instance_id.as_ref()).unwrap();
    assert_eq!(victim_instance.state, CloudState::Terminated);
    app.wait_warm(2, WAIT).await.unwrap();
}

/// Hosts that cannot connect (here: wrong credentials, as a broken image would
/// fail) are terminated after the launch timeout, and launches are retried.
async fn a_host_that_never_connects_is_terminated(backend: Backend) {
    let wrong = HostCredentials::new(Secret::new("not-the-servers-secret"));
    let app = spawn(backend, TestCloud::LocalWithCredentials(wrong), true).await;
    app.store.put_region(&scaled_region(REGION, "", 2, 0, 2, "local", 2)).await.unwrap();
    let seen = wait_instances(&app, "a never-connecting host terminated", |i| {
        i.iter().any(|i| i.state == InstanceState::Terminated && i.reason.as_deref() == Some("never_connected"))
    })
    .await
    .unwrap();
    let dead = seen.iter().find(|i| i.state == InstanceState::Terminated).unwrap();
    assert!(dead.connected_at.is_none());
    let described = app.local.as_ref().unwrap().describe_by_tag(REGION, "scaling-test").await.unwrap();
    let instance = described.iter().find(|i| Some(&i.instance_id) == dead.instance_id.as_ref()).unwrap();
    assert_eq!(instance.state, CloudState::Terminated);
    // The scaler keeps trying: a new launch follows.
    wait_instances(&app, "a new launch after the timeout", |i| i.len() >= 2).await.unwrap();
    assert!(app.store.list_hosts(None).await.unwrap().is_empty(), "no host ever joined the fleet");
}

/// Counts launches on the way to the real provider.
struct Counting {
    inner: Arc<dyn CloudProvider>,
    launched: AtomicU32,
}

#[async_trait]
impl CloudProvider for Counting {
    async fn launch(&self, request: LaunchRequest) -> Result<Vec<Instance>, CloudError> {
        self.launched.fetch_add(u32::try_from(request.count()).unwrap(), Ordering::SeqCst);
        self.inner.launch(request).await
    }

    async fn terminate(&self, region: &str, instance_ids: &[String]) -> Result<(), CloudError> {
        self.inner.terminate(region, instance_ids).await
    }

    async fn describe_by_tag(&self, region: &str, cluster: &str) -> Result<Vec<Instance>, CloudError> {
        self.inner.describe_by_tag(region, cluster).await
    }
}

fn racing_scaler(app: &TestApp, holder: &str, provider: Arc<dyn CloudProvider>) -> (FleetScaler, ScalerHandle) {
    let handle = ScalerHandle::default();
    let options = ScalerOptions {
        config: app.core.config.scaling.clone(),
        cluster: "scaling-test".into(),
        holder: holder.to_owned(),
    };
    (FleetScaler::new(app.core.clone(), provider, options, handle.clone()), handle)
}

/// Two scalers (two replicas' worth) on one region, woken over and over: the
/// lease lets one act, so exactly the missing instances are launched; when it
/// stops, the other takes over and keeps the region scaled.
async fn two_scalers_racing_for_one_region_act_once(backend: Backend) {
    let app = spawn(backend, TestCloud::Local, false).await;
    let local: Arc<dyn CloudProvider> = app.local.clone().unwrap();
    let counting =
        |inner: &Arc<dyn CloudProvider>| Arc::new(Counting { inner: inner.clone(), launched: AtomicU32::new(0) });
    let (a_provider, b_provider) = (counting(&local), counting(&local));
    let (a, a_wake) = racing_scaler(&app, "replica-a", a_provider.clone());
    let (b, b_wake) = racing_scaler(&app, "replica-b", b_provider.clone());
    let (a_stop, b_stop) = (CancellationToken::new(), CancellationToken::new());
    // Buffer 6 of 2-slot hosts: 3 instances, whoever launches them.
    app.store.put_region(&scaled_region(REGION, "", 6, 0, 10, "local", 2)).await.unwrap();
    let a_task = tokio::spawn(a.run(a_stop.clone()));
    let b_task = tokio::spawn(b.run(b_stop.clone()));
    let waker = tokio::spawn(async move {
        for _ in 0..200 {
            a_wake.wake(REGION);
            b_wake.wake(REGION);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    app.wait_warm(6, WAIT).await.unwrap();
    waker.await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let launched = (a_provider.launched.load(Ordering::SeqCst), b_provider.launched.load(Ordering::SeqCst));
    assert_eq!(launched.0 + launched.1, 3, "launches by a and b: {launched:?}");
    assert!(launched.0 == 0 || launched.1 == 0, "only one scaler acted: {launched:?}");
    assert_eq!(instances(&app).await.len(), 3);

    // The acting one stops (its lease is given up); the other scales on.
    let (leader_stop, leader_task, follower) =
        if launched.0 > 0 { (a_stop, a_task, &b_provider) } else { (b_stop, b_task, &a_provider) };
    leader_stop.cancel();
    leader_task.await.unwrap();
    let mut bigger = scaled_region(REGION, "", 8, 0, 10, "local", 2);
    bigger.scaling.buffer = 8;
    app.store.put_region(&bigger).await.unwrap();
    app.wait_warm(8, WAIT).await.unwrap();
    assert_eq!(follower.launched.load(Ordering::SeqCst), 1, "the follower launched the fourth");
    assert_eq!(live_instances(&app).await.len(), 4);
}

/// EC2 out of the first type: the next configured type is launched (with its
/// capacity). Out of every type: the error is reported on the region, launches
/// back off and resume once capacity returns.
async fn capacity_errors_fall_back_are_reported_and_retried(backend: Backend) {
    let app = spawn(backend, TestCloud::Local, true).await;
    let local = app.local.clone().unwrap();
    local.set_refused(&["local-small"]);
    // Buffer 4 = one host of the first type; the fallback type is bigger (the
    // launch is sized for the first type, the capacity recorded is the real one).
    let mut region = scaled_region(REGION, "", 4, 0, 4, "local-small", 4);
    region.scaling.instance_types.push(switchboard::model::InstanceType { name: "local-large".into(), capacity: 6 });
    app.store.put_region(&region).await.unwrap();
    let first = wait_instances(&app, "a fallback-type host", |i| count(i, InstanceState::Running) == 1).await.unwrap();
    assert_eq!((first[0].instance_type.as_str(), first[0].capacity), ("local-large", 6), "{first:?}");
    app.wait_warm(6, WAIT).await.unwrap();
    assert_eq!(instances(&app).await.len(), 1, "one launch covered the buffer");

    // Every type refused: three sessions leave 3 free < 4; the launch fails and says why.
    local.set_refused(&["local-small", "local-large"]);
    for user in ["u1", "u2", "u3"] {
        app.user_client(user).allocate(chrome_in_us_east()).await.unwrap();
    }
    let admin_token = app.admin_token();
    let mut admin = app.admin_client(Some(&admin_token));
    let mut last_error = String::new();
    eventually(WAIT, async || {
        let regions = admin.list_regions(switchboard_proto::v1::ListRegionsRequest {}).await?.into_inner().regions;
        last_error = regions[0].status.as_ref().map(|s| s.last_error.clone()).unwrap_or_default();
        Ok(!last_error.is_empty())
    })
    .await
    .unwrap();
    assert!(last_error.contains("insufficient capacity") && last_error.contains("local-large"), "{last_error}");
    let refused = instances(&app).await;
    assert!(
        refused.iter().any(|i| i.state == InstanceState::Terminated
            && i.reason.as_deref().is_some_and(|r| r.starts_with("launch failed"))),
        "{refused:?}"
    );

    // Capacity is back: the next retry launches and the error clears.
    local.set_refused(&[]);
    wait_instances(&app, "a second host after capacity returned", |i| count(i, InstanceState::Running) == 2)
        .await
        .unwrap();
    eventually(WAIT, async || {
        let regions = admin.list_regions(switchboard_proto::v1::ListRegionsRequest {}).await?.into_inner().regions;
        Ok(regions[0].status.as_ref().is_some_and(|s| s.last_error.is_empty()))
    })
    .await
    .unwrap();
}

on_both_backends!(
    capacity_errors_fall_back_are_reported_and_retried,
    the_buffer_follows_sessions_up_and_down,
    a_killed_host_is_replaced_and_terminated,
    a_host_that_never_connects_is_terminated,
    two_scalers_racing_for_one_region_act_once,
);
