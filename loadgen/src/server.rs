//! The control plane under test runs in a child process (`loadgen serve`), so
//! its resident memory and CPU time can be read from /proc apart from the
//! load's. Next to it the child runs a trivial tonic service (no database, no
//! auth): the bare unary round trip the limit is measured with.

use std::{pin::Pin, process::Stdio, sync::Arc, time::Duration};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use sqlx::Connection as _;
use switchboard::{
    Application, ApplicationOptions,
    auth::dev_issuer::DevIssuer,
    config::{Config, Secret},
    model::Region,
};
use switchboard_proto::v1::{
    AllocateRequest, AllocateResponse, EndSessionRequest, GetSessionRequest, Port, Session, SessionState,
    SessionUpdate, WatchSessionRequest,
    allocation_service_server::{AllocationService, AllocationServiceServer},
};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, BufReader},
    net::TcpListener,
    process::{Child, Command},
};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

pub(crate) const REGION: &str = "us-east-1";

/// What `loadgen serve` prints on its first stdout line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ServerInfo {
    pub(crate) endpoint: String,
    pub(crate) echo_endpoint: String,
    pub(crate) admin_token: String,
    pub(crate) user_tokens: Vec<String>,
    pub(crate) pid: u32,
}

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ServeArgs {
    /// Database URL (postgres://… or sqlite://…); migrated at start.
    #[arg(long)]
    pub(crate) db: String,
    /// Host credential secret.
    #[arg(long, env = "LOADGEN_HOST_SECRET")]
    pub(crate) secret: String,
    #[arg(long, default_value_t = 5_000)]
    pub(crate) heartbeat_ms: u64,
    #[arg(long, default_value_t = 3)]
    pub(crate) missed_heartbeats: u32,
    /// User tokens to issue (one per simulated client).
    #[arg(long, default_value_t = 64)]
    pub(crate) users: usize,
    /// `allocation.group_disconnect_reports = false`.
    #[arg(long)]
    pub(crate) separate_disconnects: bool,
    /// `allocation.disconnect_writers`.
    #[arg(long, default_value_t = switchboard::config::AllocationConfig::default().disconnect_writers)]
    pub(crate) disconnect_writers: usize,
    /// `allocation.group_claims = false`.
    #[arg(long)]
    pub(crate) separate_claims: bool,
    /// `allocation.claim_writers`.
    #[arg(long, default_value_t = switchboard::config::AllocationConfig::default().claim_writers)]
    pub(crate) claim_writers: usize,
    /// `allocation.bookkeeping_linger_ms`.
    #[arg(long, default_value_t = switchboard::config::AllocationConfig::default().bookkeeping_linger_ms)]
    pub(crate) bookkeeping_linger_ms: u64,
    /// `database.max_connections`.
    #[arg(long, default_value_t = switchboard::config::DatabaseConfig::default().max_connections)]
    pub(crate) max_connections: u32,
    /// `hosts.maintenance_interval_ms`.
    #[arg(long, default_value_t = switchboard::config::HostsConfig::default().maintenance_interval_ms)]
    pub(crate) maintenance_interval_ms: u64,
}

/// How the server under test is set beyond its defaults: its PostgreSQL pool,
/// and how it batches its writes (ReportDisconnect's session ends and the
/// warm pool's bookkeeping).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ServerSettings {
    /// `database.max_connections`.
    pub(crate) max_connections: u32,
    /// `allocation.group_disconnect_reports = false`.
    pub(crate) separate_disconnects: bool,
    /// `allocation.disconnect_writers`.
    pub(crate) writers: usize,
    /// `allocation.group_claims = false`.
    pub(crate) separate_claims: bool,
    /// `allocation.claim_writers`.
    pub(crate) claim_writers: usize,
    /// `allocation.bookkeeping_linger_ms`.
    pub(crate) bookkeeping_linger_ms: u64,
    /// `hosts.maintenance_interval_ms`.
    pub(crate) maintenance_interval_ms: u64,
}

/// Child side: runs the control plane until stdin closes.
pub(crate) async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = Config::default();
    config.database.max_connections = args.max_connections;
    // The pool a server gets from its configuration (`database.max_connections`).
    let store = switchboard::store::connect_with(&args.db, config.database.max_connections)
        .await
        .context("opening the store")?;
    store.put_region(&Region { name: REGION.into(), enabled: true, ..Default::default() }).await?;
    config.hosts.credential_secret = Secret::new(args.secret.clone());
    config.hosts.heartbeat_interval_ms = args.heartbeat_ms;
    config.hosts.missed_heartbeats = args.missed_heartbeats;
    config.hosts.maintenance_interval_ms = args.maintenance_interval_ms;
    config.hosts.hello_timeout_ms = 30_000;
    config.hosts.command_timeout_ms = 30_000;
    config.allocation.min_client_version = "1.0.0".into();
    // Every user counts as a subscriber (no Stripe), as in `switchboard dev` and the tests.
    config.billing.provider = "dev".into();
    config.shutdown_grace_ms = 2_000;
    config.allocation.group_disconnect_reports = !args.separate_disconnects;
    config.allocation.disconnect_writers = args.disconnect_writers;
    config.allocation.group_claims = !args.separate_claims;
    config.allocation.claim_writers = args.claim_writers;
    config.allocation.bookkeeping_linger_ms = args.bookkeeping_linger_ms;
    let issuer = Arc::new(DevIssuer::generate(&config.auth.issuer, &config.auth.audience)?);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let app = Application::build_with_store(
        config,
        ApplicationOptions {
            user_token_keys: Some(issuer.jwks().clone()),
            listener: Some(listener),
            ..Default::default()
        },
        store,
    )
    .await?;
    let endpoint = app.endpoint();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(app.run_until_stopped(shutdown.clone()));

    let echo_listener = TcpListener::bind("127.0.0.1:0").await?;
    let echo_endpoint = format!("http://{}", echo_listener.local_addr()?);
    let echo_shutdown = shutdown.clone();
    tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(echo_listener);
        let _ = tonic::transport::Server::builder()
            .add_service(AllocationServiceServer::new(Echo))
            .serve_with_incoming_shutdown(incoming, echo_shutdown.cancelled_owned())
            .await;
    });

    let ttl = Duration::from_secs(24 * 3600);
    let user_tokens = (0..args.users)
        .map(|i| issuer.issue(&format!("loadgen-user-{i}"), None, &[], ttl))
        .collect::<Result<_, _>>()?;
    let info = ServerInfo {
        endpoint,
        echo_endpoint,
        admin_token: issuer.issue("loadgen-admin", None, &["admin"], ttl)?,
        user_tokens,
        pid: std::process::id(),
    };
    println!("{}", serde_json::to_string(&info)?);

    // Until the parent closes our stdin (or dies).
    let mut stdin = tokio::io::stdin();
    let mut buffer = [0_u8; 64];
    while stdin.read(&mut buffer).await.unwrap_or(0) > 0 {}
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    Ok(())
}

/// A trivial AllocationService: Allocate answers a canned response of the
/// same shape as the real one, with no database and no authentication.
struct Echo;

type UpdateStream = Pin<Box<dyn futures::Stream<Item = Result<SessionUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl AllocationService for Echo {
    async fn allocate(&self, request: Request<AllocateRequest>) -> Result<Response<AllocateResponse>, Status> {
        let region = request.into_inner().regions.into_iter().next().unwrap_or_default();
        Ok(Response::new(AllocateResponse {
            session_id: "6f9619ff-8b86-d011-b42d-00cf4fc964ff".into(),
            mandelbox_id: "7f9619ff-8b86-d011-b42d-00cf4fc964ff".into(),
            host_address: "127.0.0.1".into(),
            ports: vec![Port { name: "tcp_32262".into(), port: 32262, protocol: "tcp".into() }],
            session_key: "00112233445566778899aabbccddeeff".into(),
            region,
            state: SessionState::Running as i32,
        }))
    }

    async fn get_session(&self, _: Request<GetSessionRequest>) -> Result<Response<Session>, Status> {
        Err(Status::unimplemented("echo"))
    }

    type WatchSessionStream = UpdateStream;

    async fn watch_session(&self, _: Request<WatchSessionRequest>) -> Result<Response<UpdateStream>, Status> {
        Err(Status::unimplemented("echo"))
    }

    async fn end_session(&self, _: Request<EndSessionRequest>) -> Result<Response<Session>, Status> {
        Err(Status::unimplemented("echo"))
    }
}

/// Parent side: a `loadgen serve` child.
pub(crate) struct ServerProcess {
    child: Child,
    pub(crate) info: ServerInfo,
}

impl ServerProcess {
    pub(crate) async fn start(
        db_url: &str,
        secret: &str,
        heartbeat_ms: u64,
        users: usize,
        settings: ServerSettings,
    ) -> anyhow::Result<ServerProcess> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .args(["serve", "--db", db_url, "--heartbeat-ms", &heartbeat_ms.to_string()])
            .args(["--users", &users.to_string()])
            .args(settings.separate_disconnects.then_some("--separate-disconnects"))
            .args(["--disconnect-writers", &settings.writers.to_string()])
            .args(settings.separate_claims.then_some("--separate-claims"))
            .args(["--claim-writers", &settings.claim_writers.to_string()])
            .args(["--bookkeeping-linger-ms", &settings.bookkeeping_linger_ms.to_string()])
            .args(["--max-connections", &settings.max_connections.to_string()])
            .args(["--maintenance-interval-ms", &settings.maintenance_interval_ms.to_string()])
            .env("LOADGEN_HOST_SECRET", secret)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting `loadgen serve`")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .context("`loadgen serve` did not start within 60 s")??
            .context("`loadgen serve` exited before it was ready")?;
        let info: ServerInfo = serde_json::from_str(&line).context("reading `loadgen serve`'s first line")?;
        Ok(ServerProcess { child, info })
    }

    pub(crate) async fn stop(mut self) {
        drop(self.child.stdin.take());
        if tokio::time::timeout(Duration::from_secs(8), self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
    }
}

/// A fresh database for one server: a uniquely named PostgreSQL database
/// (dropped afterwards) or a SQLite file in a temporary directory.
pub(crate) enum TempDb {
    Postgres { admin_url: String, name: String, url: String },
    Sqlite { _dir: tempfile::TempDir, url: String },
}

impl TempDb {
    pub(crate) async fn create(backend: Backend, postgres_url: &str) -> anyhow::Result<TempDb> {
        match backend {
            Backend::Postgres => {
                let mut admin = sqlx::PgConnection::connect(postgres_url)
                    .await
                    .with_context(|| format!("PostgreSQL is not reachable at {postgres_url}"))?;
                let name = format!("sb_loadgen_{}", uuid::Uuid::new_v4().simple());
                sqlx::query(&format!("CREATE DATABASE \"{name}\"")).execute(&mut admin).await?;
                let _ = admin.close().await;
                let base = postgres_url.split('?').next().unwrap_or(postgres_url);
                let cut = base.rfind('/').filter(|index| *index > "postgres://".len()).unwrap_or(base.len());
                let url = format!("{}/{name}", &base[..cut]);
                Ok(TempDb::Postgres { admin_url: postgres_url.to_owned(), name, url })
            }
            Backend::Sqlite => {
                let dir = tempfile::Builder::new().prefix("loadgen-").tempdir()?;
                let path = dir.path().join("switchboard.db");
                let url = format!("sqlite://{}", path.to_str().context("temp path is not UTF-8")?);
                Ok(TempDb::Sqlite { _dir: dir, url })
            }
        }
    }

    pub(crate) fn url(&self) -> &str {
        match self {
            TempDb::Postgres { url, .. } | TempDb::Sqlite { url, .. } => url,
        }
    }

    pub(crate) async fn drop_now(self) {
        if let TempDb::Postgres { admin_url, name, .. } = &self
            && let Ok(mut conn) = sqlx::PgConnection::connect(admin_url).await
        {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).execute(&mut conn).await;
            let _ = conn.close().await;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Backend {
    Postgres,
    Sqlite,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Postgres => "postgres",
            Backend::Sqlite => "sqlite",
        })
    }
}
