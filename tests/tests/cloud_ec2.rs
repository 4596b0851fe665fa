//! The EC2 provider against a real EC2 emulator (moto server): launches with
//! the right tags, type, image, user data and region; idempotent launches;
//! listing by the cluster tag (leaks included); termination; independent
//! regions; fallback instance types.

use std::collections::BTreeSet;

use anyhow::{Context as _, bail};
use aws_sdk_ec2::types::{InstanceAttributeName, InstanceType, ResourceType, Tag, TagSpecification};
use base64::{Engine as _, engine::general_purpose::STANDARD};
use switchboard::{
    auth::host_credential::HostCredentials,
    cloud::{
        CloudError, CloudProvider, Instance, InstanceState, InstanceTypeConfig, LaunchRequest, TAG_CLUSTER,
        TAG_HOST_ID, ec2::Ec2Provider,
    },
    config::Secret,
};
use switchboard_tests::cloud::{MotoServer, moto};

const CONTROL_PLANE: &str = "https://switchboard.test.example:8443";
const CLUSTER: &str = "test-cluster";
const AMI: &str = "ami-0123456789abcdef0";

fn credentials() -> HostCredentials {
    HostCredentials::new(Secret::new("cloud-test-secret"))
}

fn provider(moto: &MotoServer) -> anyhow::Result<Ec2Provider> {
    Ok(Ec2Provider::new(&moto.cloud_config(CLUSTER), CONTROL_PLANE.into(), credentials())?)
}

fn gpu(name: &str, capacity: u32) -> InstanceTypeConfig {
    InstanceTypeConfig { name: name.into(), capacity }
}

fn launch_request(region: &str, host_ids: &[&str], token: &str) -> LaunchRequest {
    LaunchRequest {
        region: region.into(),
        instance_types: vec![gpu("g4dn.2xlarge", 2)],
        image: AMI.into(),
        host_ids: host_ids.iter().map(|h| (*h).to_owned()).collect(),
        cluster: CLUSTER.into(),
        token: token.into(),
    }
}

fn ids(instances: &[Instance]) -> BTreeSet<String> {
    instances.iter().map(|i| i.instance_id.clone()).collect()
}

/// The user data the emulator stored for an instance, decoded.
async fn user_data(moto: &MotoServer, region: &str, instance_id: &str) -> anyhow::Result<String> {
    let output = moto
        .client(region)
        .describe_instance_attribute()
        .instance_id(instance_id)
        .attribute(InstanceAttributeName::UserData)
        .send()
        .await?;
    let encoded = output.user_data().and_then(|v| v.value()).context("no user data stored")?;
    Ok(String::from_utf8(STANDARD.decode(encoded)?)?)
}

/// Runs an instance with the plain SDK, i.e. outside Switchboard, with the given tags.
async fn run_outside(moto: &MotoServer, region: &str, tags: &[(&str, &str)]) -> anyhow::Result<String> {
    let mut call = moto
        .client(region)
        .run_instances()
        .image_id(AMI)
        .instance_type(InstanceType::T3Micro)
        .min_count(1)
        .max_count(1);
    if !tags.is_empty() {
        let mut spec = TagSpecification::builder().resource_type(ResourceType::Instance);
        for (key, value) in tags {
            spec = spec.tags(Tag::builder().key(*key).value(*value).build());
        }
        call = call.tag_specifications(spec.build());
    }
    let output = call.send().await?;
    output.instances().first().and_then(|i| i.instance_id()).map(str::to_owned).context("no instance run")
}

#[tokio::test]
async fn launch_tags_type_image_region_and_user_data() -> anyhow::Result<()> {
    let moto = moto().await?;
    let provider = provider(&moto)?;
    let instances = provider.launch(launch_request("us-east-1", &["h-a", "h-b"], "launch-1")).await?;
    assert_eq!(instances.len(), 2);
    for (instance, host) in instances.iter().zip(["h-a", "h-b"]) {
        assert_eq!(instance.host_id.as_deref(), Some(host));
        assert_eq!(instance.cluster.as_deref(), Some(CLUSTER));
        assert_eq!(instance.region, "us-east-1");
        assert_eq!(instance.instance_type, "g4dn.2xlarge");
        assert_eq!(instance.image, AMI);
        assert!(instance.state.is_live(), "{:?}", instance.state);
        assert!(instance.launched_at.is_some());
    }

    // What the emulator holds, read with the plain SDK.
    let client = moto.client("us-east-1");
    let described =
        client.describe_instances().set_instance_ids(Some(ids(&instances).into_iter().collect())).send().await?;
    let raw: Vec<_> = described.reservations().iter().flat_map(|r| r.instances()).collect();
    assert_eq!(raw.len(), 2);
    for instance in raw {
        let tag = |key: &str| instance.tags().iter().find(|t| t.key() == Some(key)).and_then(|t| t.value());
        let host = tag(TAG_HOST_ID).context("host id tag")?;
        assert_eq!(tag(TAG_CLUSTER), Some(CLUSTER));
        assert_eq!(tag("Name"), Some(format!("switchboard-{CLUSTER}-{host}").as_str()));
        assert_eq!(instance.instance_type(), Some(&InstanceType::G4dn2xlarge));
        assert_eq!(instance.image_id(), Some(AMI));
        let zone = instance.placement().and_then(|p| p.availability_zone()).unwrap_or_default();
        assert!(zone.starts_with("us-east-1"), "zone {zone}");

        let id = instance.instance_id().context("instance id")?;
        let script = user_data(&moto, "us-east-1", id).await?;
        let credential = credentials().issue(host);
        assert!(credentials().verify(host, &credential));
        for line in [
            format!("HOSTAGENT_CREDENTIAL={credential}\n"),
            format!("HOSTAGENT_ENDPOINT={CONTROL_PLANE}\n"),
            format!("HOSTAGENT_HOST_ID={host}\n"),
            "HOSTAGENT_REGION=us-east-1\n".to_owned(),
            "HOSTAGENT_CAPACITY=2\n".to_owned(),
            format!("HOSTAGENT_IMAGE={AMI}\n"),
        ] {
            assert!(script.contains(&line), "user data of {id} lacks {line:?}");
        }
        assert!(script.starts_with("#!/bin/bash"));
        assert!(script.contains("systemctl enable --now hostagent.service"));
        assert!(script.contains("ExecStart=/usr/local/bin/hostagent"));
    }

    // Nothing leaked into another region.
    assert!(provider.describe_by_tag("eu-west-1", CLUSTER).await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn a_launch_repeated_with_its_token_returns_the_same_instances() -> anyhow::Result<()> {
    let moto = moto().await?;
    let provider = provider(&moto)?;
    let first = provider.launch(launch_request("us-east-1", &["h-1", "h-2"], "token-1")).await?;
    let again = provider.launch(launch_request("us-east-1", &["h-1", "h-2"], "token-1")).await?;
    assert_eq!(ids(&first), ids(&again));
    assert_eq!(provider.describe_by_tag("us-east-1", CLUSTER).await?.len(), 2);

    // A retry that grew (the first attempt launched only part) launches just the missing host.
    let grown = provider.launch(launch_request("us-east-1", &["h-1", "h-2", "h-3"], "token-1")).await?;
    assert_eq!(grown.len(), 3);
    assert!(ids(&first).is_subset(&ids(&grown)));

    // Another token is another launch.
    let other = provider.launch(launch_request("us-east-1", &["h-4"], "token-2")).await?;
    assert!(ids(&other).is_disjoint(&ids(&grown)));
    assert_eq!(provider.describe_by_tag("us-east-1", CLUSTER).await?.len(), 4);
    Ok(())
}

#[tokio::test]
async fn describe_by_tag_finds_the_cluster_and_only_the_cluster() -> anyhow::Result<()> {
    let moto = moto().await?;
    let provider = provider(&moto)?;
    let ours = provider.launch(launch_request("us-east-1", &["h-1", "h-2"], "t")).await?;
    let untagged = run_outside(&moto, "us-east-1", &[]).await?;
    let other_cluster = run_outside(&moto, "us-east-1", &[(TAG_CLUSTER, "someone-else")]).await?;
    // Launched outside Switchboard but carrying our cluster tag: a leak the reconciler must see.
    let leak = run_outside(&moto, "us-east-1", &[(TAG_CLUSTER, CLUSTER)]).await?;

    let listed = provider.describe_by_tag("us-east-1", CLUSTER).await?;
    let mut expected = ids(&ours);
    expected.insert(leak.clone());
    assert_eq!(ids(&listed), expected);
    assert!(!ids(&listed).contains(&untagged) && !ids(&listed).contains(&other_cluster));
    let leaked = listed.iter().find(|i| i.instance_id == leak).context("leak listed")?;
    assert_eq!(leaked.host_id, None);
    assert_eq!(leaked.instance_type, "t3.micro");
    Ok(())
}

#[tokio::test]
async fn terminate_moves_instances_out() -> anyhow::Result<()> {
    let moto = moto().await?;
    let provider = provider(&moto)?;
    let instances = provider.launch(launch_request("us-east-1", &["h-1", "h-2", "h-3"], "t")).await?;
    let doomed: Vec<String> = instances.iter().take(2).map(|i| i.instance_id.clone()).collect();
    provider.terminate("us-east-1", &doomed).await?;
    for instance in provider.describe_by_tag("us-east-1", CLUSTER).await? {
        if doomed.contains(&instance.instance_id) {
            assert!(
                matches!(instance.state, InstanceState::ShuttingDown | InstanceState::Terminated),
                "{} is {}",
                instance.instance_id,
                instance.state
            );
        } else {
            assert!(instance.state.is_live(), "{} is {}", instance.instance_id, instance.state);
        }
    }
    // Terminating again is fine; nothing at all is fine.
    provider.terminate("us-east-1", &doomed).await?;
    provider.terminate("us-east-1", &[]).await?;
    // An instance that never existed is reported as such, after the others in the call are terminated.
    let survivor = instances[2].instance_id.clone();
    match provider.terminate("us-east-1", &["i-0000000000badbad0".to_owned(), survivor.clone()]).await {
        Err(CloudError::NotFound { region, message }) => {
            assert_eq!(region, "us-east-1");
            assert!(message.contains("i-0000000000badbad0") && !message.contains(&survivor), "{message}");
        }
        other => bail!("expected not found, got {other:?}"),
    }
    let listed = provider.describe_by_tag("us-east-1", CLUSTER).await?;
    assert!(listed.iter().all(|i| !i.state.is_live()), "{listed:?}");
    Ok(())
}

#[tokio::test]
async fn regions_are_independent() -> anyhow::Result<()> {
    let moto = moto().await?;
    let provider = provider(&moto)?;
    let east = provider.launch(launch_request("us-east-1", &["h-east"], "t-east")).await?;
    let west = provider.launch(launch_request("eu-west-1", &["h-west-1", "h-west-2"], "t-west")).await?;
    assert!(west.iter().all(|i| i.region == "eu-west-1"));
    assert_eq!(ids(&provider.describe_by_tag("us-east-1", CLUSTER).await?), ids(&east));
    assert_eq!(ids(&provider.describe_by_tag("eu-west-1", CLUSTER).await?), ids(&west));
    // The same token in another region is another launch.
    let west_again = provider.launch(launch_request("eu-west-1", &["h-east"], "t-east")).await?;
    assert!(ids(&west_again).is_disjoint(&ids(&east)));

    provider.terminate("us-east-1", &east.iter().map(|i| i.instance_id.clone()).collect::<Vec<_>>()).await?;
    let west_now = provider.describe_by_tag("eu-west-1", CLUSTER).await?;
    assert_eq!(west_now.len(), 3);
    assert!(west_now.iter().all(|i| i.state.is_live()));
    // An instance id from one region is unknown in the other.
    let result = provider.terminate("eu-west-1", &[east[0].instance_id.clone()]).await;
    assert!(matches!(result, Err(CloudError::NotFound { .. })), "{result:?}");
    Ok(())
}

#[tokio::test]
async fn a_refused_instance_type_falls_back_to_the_next() -> anyhow::Result<()> {
    // moto refuses instance types it does not offer in the region
    // (InvalidInstanceType.NotFound with MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION);
    // it cannot produce InsufficientInstanceCapacity, which the unit tests in
    // server/src/cloud/ec2.rs cover with a fake.
    let moto = moto().await?;
    let provider = provider(&moto)?;
    let mut request = launch_request("eu-west-1", &["h-1"], "t");
    request.instance_types = vec![gpu("g9z.nonexistent", 8), gpu("g4dn.12xlarge", 12)];
    let instances = provider.launch(request).await?;
    assert_eq!(instances.len(), 1);
    assert_eq!(instances[0].instance_type, "g4dn.12xlarge");
    let script = user_data(&moto, "eu-west-1", &instances[0].instance_id).await?;
    assert!(script.contains("HOSTAGENT_CAPACITY=12\n"), "capacity follows the type launched");

    let mut refused = launch_request("eu-west-1", &["h-2"], "t2");
    refused.instance_types = vec![gpu("g9z.nonexistent", 8), gpu("g9z.alsonot", 16)];
    match provider.launch(refused).await {
        Err(error @ CloudError::InsufficientCapacity { .. }) => {
            assert!(error.retryable());
            let CloudError::InsufficientCapacity { region, refused } = error else { bail!("unreachable") };
            assert_eq!(region, "eu-west-1");
            let types: Vec<_> = refused.iter().map(|r| r.instance_type.as_str()).collect();
            assert_eq!(types, ["g9z.nonexistent", "g9z.alsonot"]);
            assert!(refused.iter().all(|r| r.code.starts_with("InvalidInstanceType")), "{refused:?}");
        }
        other => bail!("expected insufficient capacity, got {other:?}"),
    }
    // Nothing was launched for the refused host.
    assert_eq!(provider.describe_by_tag("eu-west-1", CLUSTER).await?.len(), 1);
    Ok(())
}
