//! The scaler against an EC2 emulator (moto server): scale-up launches the
//! right number of instances with the right tags, type, image, user data and
//! region; scale-down terminates them; an instance launched outside Switchboard
//! with the cluster tag is terminated; an image rollout switches every region,
//! and a failed one rolls back.
//!
//! Emulated instances run nothing, so [`boot`] plays the instance's part: it
//! reads the user data EC2 holds for it and starts a real hostagent with what
//! that script would have written, credential included.
#![allow(clippy::unwrap_used)]

use std::{collections::HashMap, sync::Arc, time::Duration};

use anyhow::{Context as _, bail};
use aws_sdk_ec2::types::{
    Filter, InstanceAttributeName, InstanceStateName, InstanceType, ResourceType, Tag, TagSpecification,
};
use base64::{Engine as _, engine::general_purpose::STANDARD};
use hostagent_client::{AgentHandle, AgentOptions, HostAgent, LocalRuntime};
use switchboard::{
    cloud::{TAG_CLUSTER, TAG_HOST_ID},
    model::{InstanceRecord, InstanceState},
};
use switchboard_proto::v1::{self as pb, EndSessionRequest};
use switchboard_tests::{
    Backend, TestApp, TestOptions,
    app::{TestCloud, chrome_in_us_east, eventually, fast_scaling, scaled_region},
    cloud::{MotoServer, moto},
};

const CLUSTER: &str = "ec2-scaling-test";
const OLD_AMI: &str = "ami-0aaaaaaaaaaaaaaa1";
const NEW_AMI: &str = "ami-0bbbbbbbbbbbbbbb2";
const GPU: &str = "g4dn.2xlarge";
const WAIT: Duration = Duration::from_secs(30);

async fn spawn(moto: &MotoServer) -> TestApp {
    let options = TestOptions {
        hosts: vec![],
        wait_warm: false,
        regions: vec![],
        cloud: TestCloud::Ec2(moto.cloud_config(CLUSTER)),
    };
    TestApp::spawn_with(Backend::Postgres, options, |config| {
        fast_scaling(config);
        // The tests boot emulated instances themselves, which takes a moment on a busy machine.
        config.scaling.launch_timeout_ms = 15_000;
        config.cloud.cluster = CLUSTER.into();
    })
    .await
    .unwrap()
}

/// Instances in the emulator carrying the cluster tag, live ones only.
async fn running_in_ec2(moto: &MotoServer, region: &str) -> Vec<aws_sdk_ec2::types::Instance> {
    let output = moto
        .client(region)
        .describe_instances()
        .filters(Filter::builder().name(format!("tag:{TAG_CLUSTER}")).values(CLUSTER).build())
        .send()
        .await
        .unwrap();
    output
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter(|i| {
            !matches!(
                i.state().and_then(|s| s.name()),
                Some(InstanceStateName::Terminated | InstanceStateName::ShuttingDown)
            )
        })
        .cloned()
        .collect()
}

fn tag<'a>(instance: &'a aws_sdk_ec2::types::Instance, key: &str) -> Option<&'a str> {
    instance.tags().iter().find(|t| t.key() == Some(key)).and_then(|t| t.value())
}

/// The `HOSTAGENT_*` settings the instance's user data would write.
async fn user_data_settings(moto: &MotoServer, region: &str, instance_id: &str) -> HashMap<String, String> {
    let output = moto
        .client(region)
        .describe_instance_attribute()
        .instance_id(instance_id)
        .attribute(InstanceAttributeName::UserData)
        .send()
        .await
        .unwrap();
    let encoded = output.user_data().and_then(|v| v.value()).unwrap();
    let script = String::from_utf8(STANDARD.decode(encoded).unwrap()).unwrap();
    script
        .lines()
        .filter_map(|line| line.split_once('='))
        .filter(|(key, _)| key.starts_with("HOSTAGENT_"))
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect()
}

/// Boots an emulated instance: a hostagent configured from its user data.
async fn boot(moto: &MotoServer, instance: &InstanceRecord) -> AgentHandle {
    let instance_id = instance.instance_id.as_deref().unwrap();
    let settings = user_data_settings(moto, &instance.region, instance_id).await;
    let get = |key: &str| settings.get(key).cloned().with_context(|| format!("user data lacks {key}")).unwrap();
    let mut options = AgentOptions::new(
        get("HOSTAGENT_ENDPOINT"),
        get("HOSTAGENT_HOST_ID"),
        get("HOSTAGENT_REGION"),
        get("HOSTAGENT_CREDENTIAL"),
    );
    options.capacity = get("HOSTAGENT_CAPACITY").parse().unwrap();
    options.image = get("HOSTAGENT_IMAGE");
    options.address = "127.0.0.1".into();
    options.backoff.initial = Duration::from_millis(20);
    options.backoff.max = Duration::from_millis(200);
    let handle = HostAgent::new(options, Arc::new(LocalRuntime::new())).spawn();
    handle.wait_connected(1, Duration::from_secs(10)).await.unwrap();
    handle
}

/// Waits for `count` launched (with an instance id) LAUNCHING instances in `region`.
async fn launched(app: &TestApp, region: &str, count: usize) -> Vec<InstanceRecord> {
    let mut last = Vec::new();
    let result = eventually(WAIT, async || {
        last = app.store.list_instances(Some(region), false).await?;
        Ok(last.iter().filter(|i| i.state == InstanceState::Launching && i.instance_id.is_some()).count() >= count)
    })
    .await;
    if result.is_err() {
        panic!("{count} launches in {region} not seen within {WAIT:?}: {last:?}");
    }
    last.into_iter().filter(|i| i.state == InstanceState::Launching && i.instance_id.is_some()).collect()
}

async fn wait_running_in_ec2(moto: &MotoServer, region: &str, count: usize) -> anyhow::Result<()> {
    let mut seen = 0;
    let result = eventually(WAIT, async || {
        seen = running_in_ec2(moto, region).await.len();
        Ok(seen == count)
    })
    .await;
    if result.is_err() {
        bail!("{count} live instances in {region} expected, {seen} seen");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_up_launches_tagged_instances_and_scale_down_terminates_them() {
    let moto = moto().await.unwrap();
    let app = spawn(&moto).await;
    app.store.put_region(&scaled_region("us-east-1", OLD_AMI, 4, 0, 5, GPU, 2)).await.unwrap();
    app.store.put_region(&scaled_region("eu-west-1", OLD_AMI, 0, 0, 5, GPU, 2)).await.unwrap();

    // Buffer 4 of 2-slot instances: exactly 2, in us-east-1 only.
    let records = launched(&app, "us-east-1", 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ec2 = running_in_ec2(&moto, "us-east-1").await;
    assert_eq!(ec2.len(), 2, "capacity on the way is not launched twice");
    assert!(running_in_ec2(&moto, "eu-west-1").await.is_empty());
    for instance in &ec2 {
        let host_id = tag(instance, TAG_HOST_ID).unwrap();
        assert!(records.iter().any(|r| r.host_id == host_id && r.instance_id.as_deref() == instance.instance_id()));
        assert!(host_id.starts_with("test-us-east-1-"), "{host_id}");
        assert_eq!(instance.instance_type(), Some(&InstanceType::G4dn2xlarge));
        assert_eq!(instance.image_id(), Some(OLD_AMI));
        let zone = instance.placement().and_then(|p| p.availability_zone()).unwrap_or_default();
        assert!(zone.starts_with("us-east-1"), "{zone}");
        let settings = user_data_settings(&moto, "us-east-1", instance.instance_id().unwrap()).await;
        assert_eq!(settings.get("HOSTAGENT_HOST_ID").map(String::as_str), Some(host_id));
        assert_eq!(settings.get("HOSTAGENT_ENDPOINT"), Some(&app.endpoint));
        assert_eq!(settings.get("HOSTAGENT_IMAGE").map(String::as_str), Some(OLD_AMI));
        assert_eq!(settings.get("HOSTAGENT_CAPACITY").map(String::as_str), Some("2"));
    }

    // The instances boot and their hosts join with the credential EC2 handed them.
    let mut agents = Vec::new();
    for record in &records {
        agents.push(boot(&moto, record).await);
    }
    app.wait_warm(4, WAIT).await.unwrap();
    let session = app.user_client("u1").allocate(chrome_in_us_east()).await.unwrap().into_inner();
    // 3 warm < buffer 4: one more instance.
    let third = launched(&app, "us-east-1", 1).await;
    wait_running_in_ec2(&moto, "us-east-1", 3).await.unwrap();
    agents.push(boot(&moto, &third[0]).await);
    app.wait_warm(5, WAIT).await.unwrap();

    // Demand gone, buffer 0: every empty host drains and its instance is terminated in EC2.
    app.user_client("u1").end_session(EndSessionRequest { session_id: session.session_id.clone() }).await.unwrap();
    app.store.put_region(&scaled_region("us-east-1", OLD_AMI, 0, 0, 5, GPU, 2)).await.unwrap();
    wait_running_in_ec2(&moto, "us-east-1", 0).await.unwrap();
    // EC2 answers TerminateInstances before the scaler records TERMINATED:
    // the last instance may still be TERMINATING in the store for a moment.
    let mut all = Vec::new();
    let recorded = eventually(WAIT, async || {
        all = app.store.list_instances(Some("us-east-1"), true).await?;
        Ok(all.iter().all(|i| i.state == InstanceState::Terminated))
    })
    .await;
    assert!(recorded.is_ok(), "every instance recorded terminated: {all:?}");
    assert_eq!(all.len(), 3);
    let reasons: Vec<&str> = all.iter().filter_map(|i| i.reason.as_deref()).collect();
    assert_eq!(reasons, vec!["drained"; 3], "each drained, then terminated once empty");
    drop(agents);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_unknown_to_the_database_are_terminated_and_vanished_ones_marked() {
    let moto = moto().await.unwrap();
    let app = spawn(&moto).await;
    app.store.put_region(&scaled_region("us-east-1", OLD_AMI, 2, 0, 3, GPU, 2)).await.unwrap();
    let ours = launched(&app, "us-east-1", 1).await;

    // Launched outside Switchboard, with the cluster tag: a leak. Another
    // cluster's instance and an untagged one are not ours to touch.
    let client = moto.client("us-east-1");
    let run = |tags: Vec<(&'static str, &'static str)>| {
        let client = client.clone();
        async move {
            let mut spec = TagSpecification::builder().resource_type(ResourceType::Instance);
            for (key, value) in tags {
                spec = spec.tags(Tag::builder().key(key).value(value).build());
            }
            let output = client
                .run_instances()
                .image_id(OLD_AMI)
                .instance_type(InstanceType::T3Micro)
                .min_count(1)
                .max_count(1)
                .tag_specifications(spec.build())
                .send()
                .await
                .unwrap();
            output.instances()[0].instance_id().unwrap().to_owned()
        }
    };
    let leak = run(vec![(TAG_CLUSTER, CLUSTER), (TAG_HOST_ID, "someone-elses-host")]).await;
    let foreign = run(vec![(TAG_CLUSTER, "another-cluster")]).await;

    // Ours vanishes behind our back (terminated from the console).
    let our_id = ours[0].instance_id.clone().unwrap();
    client.terminate_instances().instance_ids(&our_id).send().await.unwrap();

    let state_of = |id: String| {
        let client = client.clone();
        async move {
            let output = client.describe_instances().instance_ids(id).send().await.unwrap();
            output.reservations()[0].instances()[0].state().and_then(|s| s.name()).cloned()
        }
    };
    eventually(WAIT, async || Ok(matches!(state_of(leak.clone()).await, Some(InstanceStateName::Terminated))))
        .await
        .context("the leak was not terminated")
        .unwrap();
    assert_eq!(state_of(foreign).await, Some(InstanceStateName::Running), "another cluster's instance is left alone");
    eventually(WAIT, async || {
        let all = app.store.list_instances(Some("us-east-1"), true).await?;
        Ok(all.iter().any(|i| i.host_id == ours[0].host_id && i.state == InstanceState::Terminated))
    })
    .await
    .context("the vanished instance was not marked terminated")
    .unwrap();
    let gone = app.store.list_instances(Some("us-east-1"), true).await.unwrap();
    let gone = gone.iter().find(|i| i.host_id == ours[0].host_id).unwrap();
    assert!(matches!(gone.reason.as_deref(), Some("instance gone") | Some("never_connected")), "{gone:?}");
}

async fn start_rollout(app: &TestApp, timeout_secs: u32) -> pb::Operation {
    let admin_token = app.admin_token();
    app.admin_client(Some(&admin_token))
        .start_rollout(pb::StartRolloutRequest { image: NEW_AMI.into(), timeout_secs })
        .await
        .unwrap()
        .into_inner()
}

async fn operation(app: &TestApp, id: &str) -> pb::Operation {
    let admin_token = app.admin_token();
    app.admin_client(Some(&admin_token))
        .get_operation(pb::GetOperationRequest { id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

async fn region_images(app: &TestApp) -> Vec<(String, String)> {
    app.store.list_regions().await.unwrap().into_iter().map(|r| (r.name, r.image)).collect()
}

/// Both regions on the old image with booted hosts; returns their agents.
async fn fleet_on_the_old_image(moto: &MotoServer, app: &TestApp) -> Vec<AgentHandle> {
    let mut agents = Vec::new();
    for region in ["eu-west-1", "us-east-1"] {
        app.store.put_region(&scaled_region(region, OLD_AMI, 2, 0, 4, GPU, 2)).await.unwrap();
    }
    for region in ["eu-west-1", "us-east-1"] {
        for record in launched(app, region, 1).await {
            agents.push(boot(moto, &record).await);
        }
    }
    app.wait_warm(4, WAIT).await.unwrap();
    agents
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_switches_every_region_and_old_hosts_go() {
    let moto = moto().await.unwrap();
    let app = spawn(&moto).await;
    let mut agents = fleet_on_the_old_image(&moto, &app).await;
    let old_hosts: Vec<String> =
        app.store.list_instances(None, false).await.unwrap().into_iter().map(|i| i.host_id).collect();

    let started = start_rollout(&app, 60).await;
    assert_eq!(started.state, pb::OperationState::Running as i32);
    assert_eq!(started.rollout.as_ref().map(|r| r.regions.len()), Some(2));
    // Each region gets its buffer on the new image; nothing switches before all are warm.
    for region in ["eu-west-1", "us-east-1"] {
        let fresh = launched(&app, region, 1).await;
        let fresh = fresh.iter().find(|i| i.image == NEW_AMI).unwrap();
        assert!(fresh.rollout_id.is_some());
        assert_eq!(region_images(&app).await.iter().filter(|(_, image)| image == NEW_AMI).count(), 0);
        let progress = operation(&app, &started.id).await;
        assert_eq!(progress.state, pb::OperationState::Running as i32, "{progress:?}");
        agents.push(boot(&moto, fresh).await);
    }
    eventually(WAIT, async || Ok(operation(&app, &started.id).await.state == pb::OperationState::Succeeded as i32))
        .await
        .unwrap();
    let done = operation(&app, &started.id).await;
    let rollout = done.rollout.unwrap();
    assert_eq!(rollout.phase, "SWITCHED");
    assert!(rollout.regions.iter().all(|r| r.ready && r.warm_mandelboxes >= 2 && r.previous_image == OLD_AMI));
    assert_eq!(
        region_images(&app).await,
        vec![("eu-west-1".into(), NEW_AMI.into()), ("us-east-1".into(), NEW_AMI.into())]
    );

    // New sessions land on the new image; the old hosts drain and are terminated in EC2.
    let session = app.user_client("u1").allocate(chrome_in_us_east()).await.unwrap().into_inner();
    let mut stored = None;
    eventually(WAIT, async || {
        let current = app.session(&session.session_id).await?;
        let running = current.state == switchboard::model::SessionState::Running;
        stored = Some(current);
        Ok(running)
    })
    .await
    .with_context(|| format!("the first session after the switch never ran: {stored:?}"))
    .unwrap();
    let host = stored.and_then(|s| s.host_id).unwrap();
    assert!(!old_hosts.contains(&host), "{host} is an old-image host");
    for region in ["eu-west-1", "us-east-1"] {
        eventually(WAIT, async || {
            Ok(running_in_ec2(&moto, region).await.iter().all(|i| i.image_id() == Some(NEW_AMI)))
        })
        .await
        .with_context(|| format!("old hosts left running in {region}"))
        .unwrap();
    }
    // As above, EC2 may show an instance gone a moment before the store does.
    let mut instances = Vec::new();
    let recorded = eventually(WAIT, async || {
        instances = app.store.list_instances(None, true).await?;
        Ok(old_hosts
            .iter()
            .all(|old| instances.iter().any(|i| &i.host_id == old && i.state == InstanceState::Terminated)))
    })
    .await;
    assert!(recorded.is_ok(), "every old host recorded terminated: {instances:?}");
    drop(agents);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_that_misses_its_deadline_rolls_back() {
    let moto = moto().await.unwrap();
    let app = spawn(&moto).await;
    let mut agents = fleet_on_the_old_image(&moto, &app).await;

    let started = start_rollout(&app, 3).await;
    // us-east-1's new host boots; eu-west-1's never does.
    let fresh = launched(&app, "us-east-1", 1).await;
    let fresh = fresh.iter().find(|i| i.image == NEW_AMI).unwrap();
    agents.push(boot(&moto, fresh).await);
    launched(&app, "eu-west-1", 1).await;

    eventually(WAIT, async || Ok(operation(&app, &started.id).await.state == pb::OperationState::RolledBack as i32))
        .await
        .unwrap();
    let done = operation(&app, &started.id).await;
    assert!(done.error.contains("eu-west-1"), "{}", done.error);
    assert_eq!(done.rollout.unwrap().phase, "ROLLED_BACK");
    assert_eq!(
        region_images(&app).await,
        vec![("eu-west-1".into(), OLD_AMI.into()), ("us-east-1".into(), OLD_AMI.into())]
    );
    for region in ["eu-west-1", "us-east-1"] {
        let live = running_in_ec2(&moto, region).await;
        assert!(live.iter().all(|i| i.image_id() == Some(OLD_AMI)), "new-image instances terminated in {region}");
        assert_eq!(live.len(), 1, "the old host stays in {region}");
    }
    // Sessions still go to the old image, and another rollout may start.
    app.user_client("u1").allocate(chrome_in_us_east()).await.unwrap();
    let admin_token = app.admin_token();
    let again = app
        .admin_client(Some(&admin_token))
        .start_rollout(pb::StartRolloutRequest { image: NEW_AMI.into(), timeout_secs: 60 })
        .await;
    assert!(again.is_ok(), "{again:?}");
    drop(agents);
}
