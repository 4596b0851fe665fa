//! `switchboard dev`: the whole system on one machine with no external
//! service: SQLite, the in-process bus, a development token issuer, and local
//! hosts that connect over real gRPC and run mandelboxes as local tasks.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    Application, ApplicationOptions,
    auth::{dev_issuer::DevIssuer, host_credential::HostCredentials, mandelbox_token},
    cloud::local::LocalProvider,
    config::{Config, Secret},
    model::{InstanceType, Region, RegionScaling},
    store::{self, DynStore},
};

#[derive(Debug, Clone)]
pub struct DevOptions {
    pub listen: SocketAddr,
    pub credentials_file: Option<PathBuf>,
    /// The scaler keeps at least this many hosts per region.
    pub hosts_per_region: u32,
    pub capacity: u32,
    /// Idle mandelboxes the scaler keeps ready per region.
    pub buffer: u32,
    /// The scaler never runs more hosts than this per region.
    pub max_hosts_per_region: u32,
    /// Excess capacity drains a host after this long (and this long after a launch).
    pub scale_down_after: Duration,
    pub regions: Vec<String>,
    /// Defaults to a fresh SQLite file in a temporary directory.
    pub database_url: Option<String>,
}

/// What scripts need to drive a dev instance, written as JSON.
#[derive(Serialize)]
pub struct DevCredentials {
    pub endpoint: String,
    pub user_token: String,
    pub admin_token: String,
}

/// Image the dev hosts report and their regions require.
const DEV_IMAGE: &str = "dev";
const TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

pub async fn run(mut config: Config, options: DevOptions, shutdown: CancellationToken) -> anyhow::Result<()> {
    if let Some(bad) = options.regions.iter().find(|region| !crate::allocation::is_valid_name(region)) {
        anyhow::bail!("--regions: {bad:?} is not a region name (lower-case letters, digits, '-', '_', '.')");
    }
    if options.regions.is_empty() || options.hosts_per_region == 0 || options.capacity == 0 {
        anyhow::bail!("dev needs at least one region, one host per region and a capacity of at least 1");
    }
    let temp_dir = tempfile::Builder::new().prefix("switchboard-dev-").tempdir()?;
    let database_url = match &options.database_url {
        Some(url) => url.clone(),
        None => format!("sqlite://{}", temp_dir.path().join("switchboard.db").display()),
    };
    config.database.url = Secret::new(database_url);
    // No Stripe account in dev: every dev user counts as a subscriber.
    config.billing.provider = "dev".into();
    if config.hosts.credential_secret.is_empty() {
        config.hosts.credential_secret = Secret::new(mandelbox_token::generate());
    }
    let issuer = DevIssuer::generate(&config.auth.issuer, &config.auth.audience)?;
    let store: DynStore = store::connect_with(config.database.url.expose(), config.database.max_connections).await?;
    // Hosts come and go with demand: the scaler launches local hosts (the same
    // code that launches EC2 instances in production) to keep the buffer warm.
    let scaling = RegionScaling {
        buffer: options.buffer,
        min_instances: options.hosts_per_region,
        max_instances: options.max_hosts_per_region.max(options.hosts_per_region),
        instance_types: vec![InstanceType { name: "local".into(), capacity: options.capacity }],
    };
    for name in &options.regions {
        let region = Region { name: name.clone(), enabled: true, image: DEV_IMAGE.into(), scaling: scaling.clone() };
        store.put_region(&region).await?;
    }
    dev_scaling_timings(&mut config, options.scale_down_after);
    let listener = TcpListener::bind(options.listen).await.with_context(|| format!("binding {}", options.listen))?;
    let address = listener.local_addr()?;
    let host = if address.ip().is_unspecified() { "127.0.0.1".to_owned() } else { address.ip().to_string() };
    let credentials = HostCredentials::new(config.hosts.credential_secret.clone());
    let provider = Arc::new(LocalProvider::new(format!("http://{host}:{}", address.port()), credentials));
    let warm_pool = config.allocation.warm_pool;
    let app = Application::build_with_store(
        config,
        ApplicationOptions {
            user_token_keys: Some(issuer.jwks().clone()),
            listener: Some(listener),
            cloud_provider: Some(provider.clone()),
        },
        store.clone(),
    )
    .await?;
    let endpoint = app.endpoint();
    // The server stops only after the local hosts have said goodbye.
    let server_stop = CancellationToken::new();
    let server = tokio::spawn(app.run_until_stopped(server_stop.clone()));

    // "Ready" means the minimum hosts are up and an Allocate right now gets a warm box.
    let hosts = options.regions.len() * options.hosts_per_region as usize;
    let slots = if warm_pool { hosts * options.capacity as usize } else { 0 };
    wait_until_ready(&store, hosts, slots, Duration::from_secs(30)).await?;

    let dev_credentials = DevCredentials {
        endpoint: endpoint.clone(),
        user_token: issuer.issue("dev-user", Some("dev-user@example.com"), &[], TOKEN_TTL)?,
        admin_token: issuer.issue("dev-admin", Some("dev-admin@example.com"), &["admin"], TOKEN_TTL)?,
    };
    let credentials_file =
        options.credentials_file.clone().unwrap_or_else(|| PathBuf::from(".switchboard").join("dev-credentials.json"));
    write_credentials(&credentials_file, &dev_credentials)?;
    print_banner(&dev_credentials, &credentials_file, &options);

    shutdown.cancelled().await;
    provider.shutdown_all().await;
    server_stop.cancel();
    let result = server.await;
    drop(temp_dir);
    result.context("server task")?
}

/// Timings that make scaling visible within a minute on a laptop: hosts
/// appear within a second of the buffer running low and go `scale_down_after`
/// (20 s by default) after demand drops.
fn dev_scaling_timings(config: &mut Config, scale_down_after: Duration) {
    let scale_down_ms = u64::try_from(scale_down_after.as_millis()).unwrap_or(u64::MAX);
    let scaling = &mut config.scaling;
    scaling.interval_ms = 1_000;
    scaling.min_interval_ms = 200;
    scaling.reconcile_interval_ms = 10_000;
    scaling.leak_grace_ms = 10_000;
    scaling.launch_timeout_ms = 30_000;
    scaling.scale_down_delay_ms = scale_down_ms;
    scaling.scale_down_cooldown_ms = scale_down_ms;
    scaling.launch_backoff_ms = 1_000;
    scaling.host_name_prefix = "dev".into();
}

async fn wait_until_ready(store: &DynStore, hosts: usize, slots: usize, timeout: Duration) -> anyhow::Result<()> {
    let filter =
        crate::store::MandelboxFilter { state: Some(crate::model::MandelboxState::Waiting), ..Default::default() };
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let connected = store
            .list_hosts(None)
            .await?
            .iter()
            .filter(|summary| summary.host.state == crate::model::HostState::Active)
            .count();
        let warm = store.list_mandelboxes(&filter).await?.len();
        if connected >= hosts && warm >= slots {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "only {connected} of {hosts} hosts and {warm} of {slots} mandelboxes were ready within {timeout:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes the file whole (readers never see half of it) and private (mode
/// 0600 from the start: it holds tokens).
fn write_credentials(path: &PathBuf, credentials: &DevCredentials) -> anyhow::Result<()> {
    use std::io::Write;
    if let Some(parent) = path.parent().filter(|parent| !parent.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let json = serde_json::to_string_pretty(credentials)?;
    let partial = path.with_extension("json.partial");
    // A leftover from a crashed run may have other permissions; start afresh.
    let _ = std::fs::remove_file(&partial);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&partial).with_context(|| format!("writing {}", partial.display()))?;
    file.write_all(json.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&partial, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn print_banner(credentials: &DevCredentials, file: &std::path::Path, options: &DevOptions) {
    let address = credentials.endpoint.trim_start_matches("http://");
    let region = options.regions.first().map(String::as_str).unwrap_or("local");
    // The banner is for the person at the terminal: plain stdout, not logs.
    println!(
        "\nswitchboard dev is ready\n\
         \n  endpoint     {endpoint}\
         \n  hosts        scaled per region: at least {hosts}, at most {max}, capacity {capacity} each, {buffer} kept warm; in {regions}\
         \n  billing      dev (no Stripe: every dev user counts as a subscriber)\
         \n  credentials  {file}  (keys: endpoint, user_token, admin_token)\
         \n\n  user token   {user}\
         \n\n  admin token  {admin}\
         \n\nAllocate a mandelbox:\n\
         \n  grpcurl -plaintext -H \"authorization: Bearer $(jq -r .user_token {file})\" \\\
         \n    -d '{{\"regions\":[\"{region}\"],\"app\":\"chrome\",\"client_version\":\"1.0.0\"}}' \\\
         \n    {address} switchboard.v1.AllocationService/Allocate\
         \n\nWatch the fleet in a browser:\n\
         \n  {endpoint}/fleet#token={admin}\
         \n\nList the hosts:\n\
         \n  grpcurl -plaintext -H \"authorization: Bearer $(jq -r .admin_token {file})\" \\\
         \n    {address} switchboard.v1.AdminService/ListHosts\n",
        endpoint = credentials.endpoint,
        hosts = options.hosts_per_region,
        max = options.max_hosts_per_region.max(options.hosts_per_region),
        buffer = options.buffer,
        capacity = options.capacity,
        regions = options.regions.join(", "),
        file = file.display(),
        user = credentials.user_token,
        admin = credentials.admin_token,
    );
}
