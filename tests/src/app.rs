//! `TestApp::spawn`: a real server on 127.0.0.1:0 with a fresh database, the
//! dev token issuer, and real hostagents connected over gRPC.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use hostagent_client::{AgentHandle, AgentOptions, HostAgent};
use switchboard::{
    Application, ApplicationOptions,
    auth::{dev_issuer::DevIssuer, host_credential::HostCredentials},
    cloud::{CloudConfig, CloudProvider, ec2::Ec2Provider, local::LocalProvider},
    config::{Config, Secret},
    core::SharedCore,
    model::{HostState, InstanceType, MandelboxState, Region, RegionScaling, SessionRecord, SessionState},
    store::{DynStore, MandelboxFilter},
};
use switchboard_proto::v1::{
    admin_service_client::AdminServiceClient, allocation_service_client::AllocationServiceClient,
    session_events_service_client::SessionEventsServiceClient,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{
    Request, Status,
    metadata::MetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};

use crate::{
    db::{self, Backend, TestDatabase},
    runtime::ObservedRuntime,
};

#[derive(Debug, Clone)]
pub struct HostSpec {
    pub id: String,
    pub region: String,
    pub capacity: u32,
}

impl HostSpec {
    pub fn new(id: &str, region: &str, capacity: u32) -> Self {
        HostSpec { id: id.into(), region: region.into(), capacity }
    }
}

pub struct TestOptions {
    /// (name, enabled)
    pub regions: Vec<(String, bool)>,
    pub hosts: Vec<HostSpec>,
    /// Wait until every host has filled its warm pool.
    pub wait_warm: bool,
    /// Where the scaler launches hosts.
    pub cloud: TestCloud,
}

/// The scaler's cloud provider in a test.
#[derive(Default)]
pub enum TestCloud {
    /// Hostagents in this process (`LocalProvider`, fast reconnects), kept in `TestApp::local`.
    #[default]
    Local,
    /// Local hosts that present these credentials (wrong ones: hosts that never connect).
    LocalWithCredentials(HostCredentials),
    /// The EC2 provider with this `[cloud]` section (an emulator's endpoint).
    Ec2(CloudConfig),
}

/// Scaler timings for tests: looks every 100 ms, scales down after 300 ms of
/// excess, terminates hosts that have not connected after 4 s.
pub fn fast_scaling(config: &mut Config) {
    let scaling = &mut config.scaling;
    scaling.interval_ms = 100;
    scaling.min_interval_ms = 20;
    scaling.reconcile_interval_ms = 300;
    scaling.leak_grace_ms = 500;
    scaling.lease_ttl_ms = 1_500;
    scaling.launch_timeout_ms = 4_000;
    scaling.scale_down_delay_ms = 300;
    scaling.scale_down_cooldown_ms = 300;
    scaling.launch_backoff_ms = 100;
    scaling.max_launch_backoff_ms = 500;
    scaling.host_name_prefix = "test".into();
}

/// A scaled region: `buffer` warm boxes, between `min` and `max` instances of
/// one type with `capacity` slots ("local" for the local provider).
pub fn scaled_region(
    name: &str,
    image: &str,
    buffer: u32,
    min: u32,
    max: u32,
    instance_type: &str,
    capacity: u32,
) -> Region {
    Region {
        name: name.to_owned(),
        enabled: true,
        image: image.to_owned(),
        scaling: RegionScaling {
            buffer,
            min_instances: min,
            max_instances: max,
            instance_types: vec![InstanceType { name: instance_type.to_owned(), capacity }],
        },
    }
}

impl Default for TestOptions {
    fn default() -> Self {
        TestOptions {
            regions: vec![("us-east-1".into(), true)],
            hosts: vec![HostSpec::new("host-1", "us-east-1", 2)],
            wait_warm: true,
            cloud: TestCloud::default(),
        }
    }
}

/// Fast timings so liveness tests run in seconds.
pub fn test_config() -> Config {
    let mut config = Config::default();
    config.hosts.credential_secret = Secret::new("test-host-secret");
    config.hosts.heartbeat_interval_ms = 200;
    config.hosts.missed_heartbeats = 3;
    config.hosts.reconnect_grace_ms = 1_000;
    config.hosts.maintenance_interval_ms = 100;
    config.hosts.command_timeout_ms = 3_000;
    config.hosts.hello_timeout_ms = 1_000;
    config.allocation.min_client_version = "1.0.0".into();
    config.allocation.assign_timeout_ms = 3_000;
    config.allocation.spawn_timeout_ms = 5_000;
    config.shutdown_grace_ms = 2_000;
    // Tests that exercise Stripe configure it themselves.
    config.billing.provider = "dev".into();
    config
}

pub struct TestApp {
    /// Shared by every replica spawned from this app.
    pub db: Arc<TestDatabase>,
    pub store: DynStore,
    pub addr: SocketAddr,
    pub endpoint: String,
    pub issuer: Arc<DevIssuer>,
    pub credentials: HostCredentials,
    pub channel: Channel,
    pub shutdown: CancellationToken,
    pub hosts: Vec<(HostSpec, AgentHandle, ObservedRuntime)>,
    /// The local provider the scaler launches through (with `TestCloud::Local`).
    pub local: Option<Arc<LocalProvider>>,
    /// The server task; finishes once the server has stopped.
    pub server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    /// The server's shared components (a second scaler can be built on them).
    pub core: SharedCore,
}

#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<tonic::metadata::Ascii>>);

impl Bearer {
    pub fn new(token: Option<&str>) -> Bearer {
        bearer(token)
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

pub type AllocationClient = AllocationServiceClient<InterceptedService<Channel, Bearer>>;
pub type AdminClient = AdminServiceClient<InterceptedService<Channel, Bearer>>;

impl TestApp {
    pub async fn spawn(backend: Backend, options: TestOptions) -> anyhow::Result<TestApp> {
        Self::spawn_with(backend, options, |_| {}).await
    }

    pub async fn spawn_with(
        backend: Backend,
        options: TestOptions,
        configure: impl FnOnce(&mut Config),
    ) -> anyhow::Result<TestApp> {
        crate::init_test_log();
        let db = Arc::new(db::fresh(backend).await?);
        Self::spawn_on(db, None, options, configure).await
    }

    /// Another replica of this app: the same database and token issuer, its
    /// own server and hosts (point both at one Redis in `configure` to make
    /// them a cluster).
    pub async fn spawn_replica(&self, configure: impl FnOnce(&mut Config)) -> anyhow::Result<TestApp> {
        let options = TestOptions { regions: vec![], hosts: vec![], wait_warm: false, ..Default::default() };
        Self::spawn_on(self.db.clone(), Some(self.issuer.clone()), options, configure).await
    }

    /// A server on a database the test provides (e.g. a private PostgreSQL it stops and starts).
    pub async fn spawn_on_database(
        db: Arc<TestDatabase>,
        options: TestOptions,
        configure: impl FnOnce(&mut Config),
    ) -> anyhow::Result<TestApp> {
        crate::init_test_log();
        Self::spawn_on(db, None, options, configure).await
    }

    async fn spawn_on(
        db: Arc<TestDatabase>,
        issuer: Option<Arc<DevIssuer>>,
        options: TestOptions,
        configure: impl FnOnce(&mut Config),
    ) -> anyhow::Result<TestApp> {
        let store = db::open_store(&db).await?;
        for (name, enabled) in &options.regions {
            store.put_region(&Region { name: name.clone(), enabled: *enabled, ..Default::default() }).await?;
        }
        let mut config = test_config();
        configure(&mut config);
        let issuer = match issuer {
            Some(issuer) => issuer,
            None => Arc::new(DevIssuer::generate(&config.auth.issuer, &config.auth.audience)?),
        };
        let credentials = HostCredentials::new(config.hosts.credential_secret.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let bound = format!("http://{}", listener.local_addr()?);
        let (provider, local): (Arc<dyn CloudProvider>, _) = match options.cloud {
            TestCloud::Local | TestCloud::LocalWithCredentials(_) => {
                let host_credentials = match options.cloud {
                    TestCloud::LocalWithCredentials(other) => other,
                    _ => credentials.clone(),
                };
                let local = Arc::new(
                    LocalProvider::new(bound, host_credentials)
                        .with_backoff(Duration::from_millis(20), Duration::from_millis(200)),
                );
                (local.clone(), Some(local))
            }
            TestCloud::Ec2(cloud) => (Arc::new(Ec2Provider::new(&cloud, bound, credentials.clone())?), None),
        };
        let app = Application::build_with_store(
            config,
            ApplicationOptions {
                user_token_keys: Some(issuer.jwks().clone()),
                listener: Some(listener),
                cloud_provider: Some(provider),
            },
            store.clone(),
        )
        .await?;
        let addr = app.local_addr();
        let endpoint = app.endpoint();
        let core = app.core();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(app.run_until_stopped(shutdown.clone()));
        let channel = tonic::transport::Endpoint::from_shared(endpoint.clone())?.connect().await?;
        let mut test_app = TestApp {
            db,
            store,
            addr,
            endpoint,
            issuer,
            credentials,
            channel,
            shutdown,
            hosts: Vec::new(),
            local,
            server: Some(server),
            core,
        };
        let mut expected_warm = 0;
        for spec in options.hosts {
            expected_warm += spec.capacity as usize;
            test_app.add_host(spec).await?;
        }
        if options.wait_warm {
            test_app.wait_warm(expected_warm, Duration::from_secs(10)).await?;
        }
        Ok(test_app)
    }

    /// Starts a hostagent for `spec` and waits for its Welcome.
    pub async fn add_host(&mut self, spec: HostSpec) -> anyhow::Result<AgentHandle> {
        let runtime = ObservedRuntime::new();
        let mut options = AgentOptions::new(
            self.endpoint.clone(),
            spec.id.clone(),
            spec.region.clone(),
            self.credentials.issue(&spec.id),
        );
        options.capacity = spec.capacity;
        options.backoff.initial = Duration::from_millis(20);
        options.backoff.max = Duration::from_millis(200);
        let handle = HostAgent::new(options, Arc::new(runtime.clone())).spawn();
        handle.wait_connected(1, Duration::from_secs(5)).await?;
        self.hosts.push((spec, handle.clone(), runtime));
        Ok(handle)
    }

    pub fn host(&self, id: &str) -> anyhow::Result<&(HostSpec, AgentHandle, ObservedRuntime)> {
        self.hosts.iter().find(|(spec, _, _)| spec.id == id).context("no such host")
    }

    pub fn user_token(&self, user: &str) -> String {
        self.issuer.issue(user, None, &[], Duration::from_secs(600)).unwrap_or_default()
    }

    pub fn admin_token(&self) -> String {
        self.issuer.issue("admin", None, &["admin"], Duration::from_secs(600)).unwrap_or_default()
    }

    pub fn allocation_client(&self, token: Option<&str>) -> AllocationClient {
        AllocationServiceClient::with_interceptor(self.channel.clone(), bearer(token))
    }

    pub fn user_client(&self, user: &str) -> AllocationClient {
        self.allocation_client(Some(&self.user_token(user)))
    }

    pub fn admin_client(&self, token: Option<&str>) -> AdminClient {
        AdminServiceClient::with_interceptor(self.channel.clone(), bearer(token))
    }

    pub fn session_events_client(&self) -> SessionEventsServiceClient<Channel> {
        SessionEventsServiceClient::new(self.channel.clone())
    }

    pub async fn count_boxes(&self, state: MandelboxState) -> anyhow::Result<usize> {
        let filter = MandelboxFilter { state: Some(state), include_finished: true, ..Default::default() };
        Ok(self.store.list_mandelboxes(&filter).await?.len())
    }

    /// Waits until exactly `count` boxes are WAITING.
    pub async fn wait_warm(&self, count: usize, timeout: Duration) -> anyhow::Result<()> {
        let mut last = 0;
        eventually(timeout, async || {
            last = self.count_boxes(MandelboxState::Waiting).await?;
            Ok(last == count)
        })
        .await
        .with_context(|| format!("waiting for {count} warm boxes (last saw {last})"))
    }

    pub async fn session(&self, id: &str) -> anyhow::Result<SessionRecord> {
        let id = uuid::Uuid::parse_str(id)?;
        self.store.get_session(id).await?.context("session not found")
    }

    /// Waits until the session is in `state`.
    pub async fn wait_session(
        &self,
        id: &str,
        state: SessionState,
        timeout: Duration,
    ) -> anyhow::Result<SessionRecord> {
        let mut last = None;
        eventually(timeout, async || {
            let session = self.session(id).await?;
            let done = session.state == state;
            last = Some(session.state);
            Ok(done)
        })
        .await
        .with_context(|| format!("waiting for session {id} to be {state} (last {last:?})"))?;
        self.session(id).await
    }

    pub async fn host_state(&self, id: &str) -> anyhow::Result<HostState> {
        Ok(self.store.get_host(id).await?.context("host not found")?.state)
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        for (_, handle, _) in &self.hosts {
            handle.kill();
        }
        if let Some(local) = &self.local {
            local.kill_all();
        }
        self.shutdown.cancel();
    }
}

fn bearer(token: Option<&str>) -> Bearer {
    Bearer(token.and_then(|token| MetadataValue::try_from(format!("Bearer {token}")).ok()))
}

/// Polls `check` every 20 ms until it returns true or `timeout` passes.
pub async fn eventually(timeout: Duration, mut check: impl AsyncFnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("condition not met within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The plainest valid Allocate: chrome in us-east-1, client 1.0.0.
pub fn chrome_in_us_east() -> switchboard_proto::v1::AllocateRequest {
    switchboard_proto::v1::AllocateRequest {
        regions: vec!["us-east-1".into()],
        app: "chrome".into(),
        client_version: "1.0.0".into(),
        ..Default::default()
    }
}

/// The stable reason of a status from the server.
pub fn reason(status: &Status) -> &str {
    switchboard::error::reason_of(status).unwrap_or("<none>")
}
