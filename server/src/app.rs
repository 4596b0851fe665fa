//! Builds the whole control plane from a `Config` and runs it until told to
//! stop: `Application::build` → `run_until_stopped`.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use jsonwebtoken::jwk::JwkSet;
use switchboard_proto::v1::{
    account_service_server::AccountServiceServer, admin_service_server::AdminServiceServer,
    allocation_service_server::AllocationServiceServer, host_service_server::HostServiceServer,
    session_events_service_server::SessionEventsServiceServer,
};
use tokio::net::TcpListener;
use tokio_stream::{StreamExt, wrappers::TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

use crate::{
    accounts::Accounts,
    admin::Admin,
    allocation::{Allocator, Dispatcher, PendingSessions},
    api::account::AccountApi,
    api::{admin::AdminApi, allocation::AllocationApi, host::HostApi, session_events::SessionEventsApi},
    auth::{AccessControl, AuthLayer, host_credential::HostCredentials, jwt::TokenVerifier},
    billing::{
        BillingProvider, DevBilling, Subscriptions,
        cache::{InProcessCache, RedisCache, StatusCache},
        stripe::StripeBilling,
        webhook::{WebhookState, WebhookVerifier},
    },
    config::Config,
    core::{Core, SharedCore},
    events::DynEventBus,
    events::LocalEventBus,
    fleet::{ConnectionRegistry, DynRouter, LocalRouter, connection::Fleet, registry::StopReason},
    liveness::Sweeper,
    regions::RegionCache,
    scaling::{FleetScaler, ScalerHandle, ScalerOptions, ScalingPlanner},
    sessions::Sessions,
    store::{self, DynStore},
};

/// How long region settings are cached on the allocation path.
const REGION_CACHE_TTL: Duration = Duration::from_secs(2);
/// Events buffered per subscriber before it lags.
const EVENT_BUFFER: usize = 4096;

/// One span per call, named by its path (`/switchboard.v1.AllocationService/Allocate`).
#[derive(Clone, Copy)]
struct RpcSpan;

impl<B> tower_http::trace::MakeSpan<B> for RpcSpan {
    fn make_span(&mut self, request: &http::Request<B>) -> tracing::Span {
        tracing::info_span!("rpc", path = %request.uri().path())
    }
}

/// Everything `build` needs besides the configuration.
#[derive(Default)]
pub struct ApplicationOptions {
    /// Keys user tokens are checked against (the dev issuer's, or a tenant's).
    pub user_token_keys: Option<JwkSet>,
    /// A listener already bound (tests bind port 0 themselves); otherwise
    /// `config.listen` is bound.
    pub listener: Option<TcpListener>,
    /// Where the scaler launches hosts; otherwise the one `[cloud]` names.
    pub cloud_provider: Option<Arc<dyn crate::cloud::CloudProvider>>,
}

pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    core: SharedCore,
    routes: Routes,
    verifier: Arc<TokenVerifier>,
    access: Arc<AccessControl>,
    webhook: WebhookState,
    allocator: Allocator,
    pending: PendingSessions,
    jwks: Arc<JwkSet>,
    scaler: Option<FleetScaler>,
}

impl Application {
    pub async fn build(config: Config, options: ApplicationOptions) -> anyhow::Result<Application> {
        let store = store::connect_with(config.database.url.expose(), config.database.max_connections)
            .await
            .context("opening the database")?;
        Self::build_with_store(config, options, store).await
    }

    pub async fn build_with_store(
        config: Config,
        options: ApplicationOptions,
        store: DynStore,
    ) -> anyhow::Result<Application> {
        crate::install_tls_provider();
        if config.hosts.credential_secret.is_empty() {
            anyhow::bail!("hosts.credential_secret must be set (SWITCHBOARD__HOSTS__CREDENTIAL_SECRET)");
        }
        let listener = match options.listener {
            Some(listener) => listener,
            None => TcpListener::bind(config.listen).await.with_context(|| format!("binding {}", config.listen))?,
        };
        let local_addr = listener.local_addr()?;
        let public_endpoint = if config.public_endpoint.is_empty() {
            let host =
                if local_addr.ip().is_unspecified() { "127.0.0.1".to_owned() } else { local_addr.ip().to_string() };
            format!("http://{host}:{}", local_addr.port())
        } else {
            config.public_endpoint.clone()
        };

        // A single control plane owns every host stream, so any host the
        // database shows as connected belongs to a previous run: it gets the
        // reconnect grace period from now. With Redis, other replicas may hold
        // those streams; the sweeper finds hosts whose owner is gone instead.
        if config.redis.url.is_empty() {
            let stale = store.mark_connected_hosts_disconnected(chrono::Utc::now()).await?;
            if stale > 0 {
                tracing::info!(hosts = stale, "hosts from a previous run wait for their reconnect");
            }
        }

        let verifier = Arc::new(TokenVerifier::from_config(&config.auth)?);
        let jwks = options.user_token_keys.unwrap_or(JwkSet { keys: Vec::new() });
        let mut usable = verifier.set_jwks(&jwks);
        if !config.auth.jwks_url.is_empty() || config.auth.oidc_discovery {
            // A tenant that is down at start-up is not fatal: the first token
            // with an unknown key id fetches again.
            match verifier.refresh().await {
                Ok(count) => usable = count,
                Err(error) => tracing::warn!(%error, "could not fetch the token signing keys at start-up"),
            }
        }
        if usable == 0 {
            tracing::warn!("no keys for user tokens yet: user calls are refused until keys can be fetched");
        }
        let subscriptions = billing_from_config(&config)?;
        tracing::info!(provider = subscriptions.provider().name(), "billing");
        let webhook = WebhookState {
            verifier: Arc::new(WebhookVerifier::new(
                config.billing.webhook_secret.clone(),
                config.billing.webhook_tolerance_secs,
            )),
            subscriptions: subscriptions.clone(),
        };
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let access =
            Arc::new(AccessControl::new(verifier.clone(), subscriptions.clone(), store.clone(), metrics.clone()));

        let registry = Arc::new(ConnectionRegistry::default());
        let credentials = HostCredentials::new(config.hosts.credential_secret.clone());
        let provider = match options.cloud_provider {
            Some(provider) => provider,
            None => crate::cloud::provider(&config.cloud, public_endpoint.clone(), credentials.clone())
                .context("setting up the cloud provider")?,
        };
        let replica_id = uuid::Uuid::new_v4().to_string();
        let cluster = if config.redis.url.is_empty() {
            None
        } else {
            let options = crate::cluster::ClusterOptions {
                url: config.redis.url.clone(),
                namespace: config.redis.namespace.clone(),
                replica_id: replica_id.clone(),
                ownership_ttl: Duration::from_millis(config.hosts.reconnect_grace_ms.max(1_000)),
            };
            Some(crate::cluster::RedisCluster::new(options, registry.clone(), EVENT_BUFFER)?)
        };
        let (router, events): (DynRouter, DynEventBus) = match &cluster {
            Some(cluster) => (Arc::new(cluster.clone()), Arc::new(cluster.clone())),
            None => (Arc::new(LocalRouter::new(registry.clone())), Arc::new(LocalEventBus::new(EVENT_BUFFER))),
        };
        let router: DynRouter = Arc::new(crate::fleet::router::TimedRouter::new(router, metrics.clone()));
        let scaling = ScalerHandle::default();
        let flag: Arc<dyn crate::maintenance::MaintenanceFlag> = if config.redis.url.is_empty() {
            Arc::new(crate::maintenance::LocalFlag::default())
        } else {
            Arc::new(crate::maintenance::RedisFlag::new(config.redis.url.expose(), &config.redis.namespace)?)
        };
        let maintenance = crate::maintenance::Maintenance::new(flag);
        // Start in the state the other replicas are in (a replica that starts
        // during a deploy must not take allocations).
        maintenance.refresh().await;
        let bookkeeping = crate::bookkeeping::Bookkeeper::start(
            store.clone(),
            Duration::from_millis(config.allocation.bookkeeping_linger_ms),
        );
        let session_ends = crate::session_ends::SessionEnds::start(
            store.clone(),
            config.allocation.group_disconnect_reports,
            config.allocation.disconnect_writers,
        );
        let session_claims = crate::session_claims::SessionClaims::start(
            store.clone(),
            config.allocation.group_claims,
            config.allocation.claim_writers,
            config.allocation.max_sessions_per_user,
            metrics.clone(),
        );
        let core: SharedCore = Arc::new(Core {
            metrics,
            router,
            events,
            cluster,
            registry,
            config: Arc::new(config),
            public_endpoint,
            bookkeeping,
            session_ends,
            session_claims,
            unrecorded: Default::default(),
            store: store.clone(),
            scaling: scaling.clone(),
            replica_id,
            maintenance,
        });
        let scaler = core.config.scaling.enabled.then(|| {
            let options = ScalerOptions {
                config: core.config.scaling.clone(),
                cluster: core.config.cloud.cluster.clone(),
                holder: core.replica_id.clone(),
            };
            FleetScaler::new(core.clone(), provider, options, scaling.clone())
        });
        let regions = RegionCache::new(store.clone(), REGION_CACHE_TTL);
        let pending = PendingSessions::default();
        if let Some(cluster) = &core.cluster {
            cluster.serve_session_keys(pending.clone());
        }
        let allocator = Allocator::new(
            core.clone(),
            regions.clone(),
            pending.clone(),
            Arc::new(ScalingPlanner::new(store, scaling.clone())),
        )?;
        let sessions = Sessions::new(core.clone(), pending.clone());
        let fleet = Fleet::new(core.clone(), credentials, regions.clone(), CancellationToken::new());

        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        health_reporter.set_serving::<AllocationServiceServer<AllocationApi>>().await;
        health_reporter.set_serving::<HostServiceServer<HostApi>>().await;
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(switchboard_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        // grpcurl's packaged release only speaks v1alpha.
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(switchboard_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;

        let mut builder = Routes::builder();
        builder
            .add_service(AllocationServiceServer::new(AllocationApi {
                allocator: allocator.clone(),
                sessions: sessions.clone(),
            }))
            .add_service(HostServiceServer::new(HostApi { fleet }))
            .add_service(SessionEventsServiceServer::new(SessionEventsApi { sessions }))
            .add_service(AdminServiceServer::new(AdminApi { admin: Admin::new(core.clone(), regions) }))
            .add_service(AccountServiceServer::new(AccountApi {
                accounts: Accounts::new(core.clone(), access.clone(), subscriptions),
            }))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha);
        let routes = builder.routes();

        Ok(Application {
            listener,
            local_addr,
            core,
            routes,
            verifier,
            access,
            webhook,
            allocator,
            pending,
            jwks: Arc::new(jwks),
            scaler,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// `http://ip:port` of this server.
    pub fn endpoint(&self) -> String {
        self.core.public_endpoint.clone()
    }

    pub fn core(&self) -> SharedCore {
        self.core.clone()
    }

    /// Serves until `shutdown` is cancelled, then stops taking work, tells
    /// hosts to reconnect elsewhere, and gives in-flight calls
    /// `shutdown_grace_ms` to finish.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Application {
            listener,
            local_addr,
            core,
            routes,
            verifier,
            access,
            webhook,
            allocator,
            pending,
            jwks,
            scaler,
        } = self;
        let background = CancellationToken::new();
        let interval = Duration::from_millis(core.config.hosts.maintenance_interval_ms);
        tokio::spawn(Dispatcher::new(allocator, core.events.clone(), interval).run(background.clone()));
        tokio::spawn(Sweeper::new(core.clone(), pending).run(background.clone()));
        tokio::spawn(crate::fleet::heartbeats::run_heartbeat_writer(core.clone(), background.clone()));
        tokio::spawn(crate::fleet::pool::run_refill_sweep(core.clone(), background.clone()));
        tokio::spawn(verifier.run_refresher(background.clone()));
        tokio::spawn(core.maintenance.clone().run_watcher(background.clone()));
        let cluster_task = core.cluster.clone().map(|cluster| tokio::spawn(cluster.run(background.clone())));
        let scaler_task = scaler.map(|scaler| tokio::spawn(scaler.run(background.clone())));

        // gRPC-web translation for the gRPC routes only: tonic-web refuses any
        // other HTTP/1.1 request, and browsers reach the plain pages over HTTP/1.1.
        let http = routes
            .into_axum_router()
            .layer(tonic_web::GrpcWebLayer::new())
            .route("/fleet", crate::fleet_page::page())
            .route("/fleet/api/hosts", crate::fleet_page::hosts_api(core.clone()))
            .route("/metrics", crate::metrics::endpoint(core.metrics.clone()))
            .route("/healthz", axum::routing::get(|| async { "ok" }))
            .route("/stripe/webhook", axum::routing::post(crate::billing::webhook::handle).with_state(webhook))
            .route(
                "/.well-known/jwks.json",
                axum::routing::get(move || {
                    let jwks = jwks.clone();
                    async move { axum::Json((*jwks).clone()) }
                }),
            );
        let cors = tower_http::cors::CorsLayer::new()
            .allow_origin(tower_http::cors::Any)
            // Named, not `*`: browsers never let a wildcard cover Authorization.
            .allow_headers(tower_http::cors::AllowHeaders::mirror_request())
            .allow_methods([http::Method::POST, http::Method::GET, http::Method::OPTIONS])
            .expose_headers([
                http::HeaderName::from_static("grpc-status"),
                http::HeaderName::from_static("grpc-message"),
                http::HeaderName::from_static(crate::error::REASON_METADATA_KEY),
            ]);
        let server = tonic::transport::Server::builder()
            .accept_http1(true)
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(5)))
            .tcp_nodelay(true)
            .layer(
                tower_http::trace::TraceLayer::new_for_grpc()
                    .make_span_with(RpcSpan)
                    .on_failure(tower_http::trace::DefaultOnFailure::new().level(tracing::Level::DEBUG)),
            )
            .layer(cors)
            .layer(AuthLayer::new(access))
            .add_routes(Routes::from(http));

        tracing::info!(address = %local_addr, store = core.store.backend(), "switchboard listening");
        let stopping = shutdown.clone();
        let registry = core.registry.clone();
        let drain_started = CancellationToken::new();
        let drain_flag = drain_started.clone();
        // tonic ignores `tcp_nodelay` for incoming streams it is handed, so each
        // accepted socket gets it here; without it small replies wait ~40 ms (Nagle).
        let incoming = TcpListenerStream::new(listener).map(|accepted| {
            accepted.inspect(|stream| {
                if let Err(error) = stream.set_nodelay(true) {
                    tracing::debug!(%error, "could not set TCP_NODELAY");
                }
            })
        });
        let serve = server.serve_with_incoming_shutdown(incoming, async move {
            stopping.cancelled().await;
            tracing::info!("shutting down: hosts are told to reconnect elsewhere");
            registry.stop_all(StopReason::ShuttingDown);
            drain_flag.cancel();
        });
        let grace = Duration::from_millis(core.config.shutdown_grace_ms);
        tokio::pin!(serve);
        let result = tokio::select! {
            result = &mut serve => result.map_err(anyhow::Error::from),
            _ = async { drain_started.cancelled().await; tokio::time::sleep(grace).await } => {
                tracing::warn!(grace_ms = grace.as_millis() as u64, "in-flight calls did not finish in time; exiting");
                Ok(())
            }
        };
        background.cancel();
        if let Some(task) = scaler_task {
            // Leases are given up so that another replica scales at once.
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
        if let Some(task) = cluster_task {
            // Ownership is released so that commands for our hosts fail at once.
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
        result
    }
}

/// The billing provider and status cache the configuration names.
fn billing_from_config(config: &Config) -> anyhow::Result<Subscriptions> {
    let billing = &config.billing;
    let timeout = Duration::from_millis(billing.request_timeout_ms);
    let provider: Arc<dyn BillingProvider> = match billing.provider.as_str() {
        "dev" => Arc::new(DevBilling),
        "stripe" => Arc::new(StripeBilling::new(
            &billing.stripe_secret_key,
            &billing.stripe_api_base,
            &billing.price_id,
            billing.trial_days,
            timeout,
        )?),
        other => anyhow::bail!("billing.provider must be \"stripe\" or \"dev\", not {other:?}"),
    };
    let cache: Arc<dyn StatusCache> = if config.redis.url.is_empty() {
        Arc::new(InProcessCache::default())
    } else {
        Arc::new(RedisCache::new(config.redis.url.expose(), billing.max_staleness_secs)?)
    };
    Ok(Subscriptions::new(
        provider,
        cache,
        Duration::from_secs(billing.status_ttl_secs),
        Duration::from_secs(billing.max_staleness_secs),
        timeout,
    ))
}
