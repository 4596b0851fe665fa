//! The local cloud provider: its "instances" are real hostagents that connect
//! to a real server; describe lists them by tag; terminate kills them and the
//! server sees them go.

use std::time::Duration;

use anyhow::bail;
use switchboard::{
    cloud::{CloudError, CloudProvider, InstanceState, InstanceTypeConfig, LaunchRequest, local::LocalProvider},
    model::HostState,
};
use switchboard_tests::{Backend, TestApp, TestOptions, app::eventually};

fn request(host_ids: &[&str], token: &str) -> LaunchRequest {
    LaunchRequest {
        region: "us-east-1".into(),
        instance_types: vec![InstanceTypeConfig { name: "local".into(), capacity: 2 }],
        image: "dev".into(),
        host_ids: host_ids.iter().map(|h| (*h).to_owned()).collect(),
        cluster: "local-test".into(),
        token: token.into(),
    }
}

async fn wait_host(app: &TestApp, host_id: &str, want: &[HostState]) -> anyhow::Result<()> {
    let mut last = None;
    let result = eventually(Duration::from_secs(10), async || {
        last = app.store.get_host(host_id).await?.map(|h| h.state);
        Ok(last.is_some_and(|state| want.contains(&state)))
    })
    .await;
    if result.is_err() {
        bail!("host {host_id} not in {want:?} within 10 s (last {last:?})");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_hosts_connect_are_listed_and_go_when_terminated() -> anyhow::Result<()> {
    let app =
        TestApp::spawn(Backend::Sqlite, TestOptions { hosts: vec![], wait_warm: false, ..Default::default() }).await?;
    let provider = LocalProvider::new(app.endpoint.clone(), app.credentials.clone())
        .with_backoff(Duration::from_millis(20), Duration::from_millis(200));

    let instances = provider.launch(request(&["local-1", "local-2"], "t-1")).await?;
    assert_eq!(instances.len(), 2);
    for instance in &instances {
        assert_eq!(instance.state, InstanceState::Running);
        assert_eq!(instance.cluster.as_deref(), Some("local-test"));
        let host_id = instance.host_id.as_deref().unwrap_or_default();
        wait_host(&app, host_id, &[HostState::Active]).await?;
    }
    // Each host fills its warm pool (capacity 2 from the instance type).
    app.wait_warm(4, Duration::from_secs(15)).await?;

    // Listed by region and cluster only.
    assert_eq!(provider.describe_by_tag("us-east-1", "local-test").await?, instances);
    assert!(provider.describe_by_tag("us-east-1", "another").await?.is_empty());
    assert!(provider.describe_by_tag("eu-west-1", "local-test").await?.is_empty());

    // Idempotent per token.
    assert_eq!(provider.launch(request(&["local-1", "local-2"], "t-1")).await?, instances);
    assert_eq!(provider.describe_by_tag("us-east-1", "local-test").await?.len(), 2);

    // Terminate one: its agent dies without goodbye and the server sees the stream drop.
    let doomed = instances[0].instance_id.clone();
    let handle = provider.handle(&doomed);
    provider.terminate("us-east-1", std::slice::from_ref(&doomed)).await?;
    if let Some(handle) = handle {
        assert!(!handle.status().borrow().connected);
    }
    wait_host(&app, "local-1", &[HostState::Disconnected, HostState::Unhealthy]).await?;
    wait_host(&app, "local-2", &[HostState::Active]).await?;
    let listed = provider.describe_by_tag("us-east-1", "local-test").await?;
    let states: Vec<_> = listed.iter().map(|i| (i.instance_id.as_str(), i.state.clone())).collect();
    assert_eq!(
        states,
        [(doomed.as_str(), InstanceState::Terminated), (instances[1].instance_id.as_str(), InstanceState::Running)]
    );
    // Refused instance types fall back to the next; all refused is a capacity error.
    let mut fallback = request(&["local-3"], "t-2");
    fallback.instance_types.insert(0, InstanceTypeConfig { name: "big".into(), capacity: 8 });
    provider.set_refused(&["big"]);
    let launched = provider.launch(fallback.clone()).await?;
    assert_eq!(launched[0].instance_type, "local");
    wait_host(&app, "local-3", &[HostState::Active]).await?;
    provider.set_refused(&["big", "local"]);
    fallback.host_ids = vec!["local-4".into()];
    fallback.token = "t-3".into();
    match provider.launch(fallback).await {
        Err(CloudError::InsufficientCapacity { refused, .. }) => assert_eq!(refused.len(), 2),
        other => bail!("expected insufficient capacity, got {other:?}"),
    }

    // Again is fine; unknown ids are reported.
    provider.terminate("us-east-1", std::slice::from_ref(&doomed)).await?;
    match provider.terminate("us-east-1", &["i-nope".to_owned()]).await {
        Err(CloudError::NotFound { .. }) => {}
        other => bail!("expected not found, got {other:?}"),
    }
    Ok(())
}
