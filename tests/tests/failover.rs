//! Failover with real processes: two `switchboard serve` replicas on one
//! PostgreSQL and one Redis, hosts behind a TCP balancer (the Service / NLB).
//! A replica SIGKILLed under a steady stream of allocations and disconnects:
//! its hosts reconnect to the other within seconds, every session that was
//! RUNNING still is, every allocation either succeeded or got a clear error,
//! no box is assigned twice, no host is declared dead. SIGTERM: the replica
//! exits within its drain deadline and its hosts move at once.
#![allow(clippy::unwrap_used)]

use std::{collections::HashSet, net::SocketAddr, sync::Arc, time::Duration};

use hostagent_client::{AgentHandle, AgentOptions, HostAgent, LocalRuntime};
use switchboard::{
    auth::{dev_issuer::DevIssuer, host_credential::HostCredentials},
    config::Secret,
    error::reason_of,
    model::{HostState, Region, SessionState},
};
use switchboard_proto::v1::{AllocateRequest, EndSessionRequest, allocation_service_client::AllocationServiceClient};
use switchboard_tests::{
    app::{Bearer, eventually},
    cluster::{ServerProcess, TcpBalancer, free_port},
    db::{self, Backend, TestDatabase},
    jwks::JwksServer,
};
use tonic::{Code, service::interceptor::InterceptedService, transport::Channel};

const AUDIENCE: &str = "https://api.switchboard.test";
const SECRET: &str = "failover-host-secret";
const HOSTS: usize = 4;
const CAPACITY: u32 = 4;

type Client = AllocationServiceClient<InterceptedService<Channel, Bearer>>;

struct Cluster {
    db: TestDatabase,
    replicas: Vec<ServerProcess>,
    balancer: TcpBalancer,
    issuer: DevIssuer,
    _tenant: JwksServer,
    agents: Vec<AgentHandle>,
}

async fn cluster() -> Cluster {
    switchboard_tests::init_test_log();
    let db = db::fresh(Backend::Postgres).await.unwrap();
    let store = db::open_store(&db).await.unwrap();
    store.put_region(&Region { name: "us-east-1".into(), enabled: true, ..Default::default() }).await.unwrap();
    let placeholder = DevIssuer::generate("x", AUDIENCE).unwrap();
    let tenant = JwksServer::start(serde_json::to_value(placeholder.jwks()).unwrap()).await.unwrap();
    let issuer = DevIssuer::generate(&tenant.issuer(), AUDIENCE).unwrap();
    tenant.set_jwks(serde_json::to_value(issuer.jwks()).unwrap());

    let addrs: Vec<SocketAddr> = (0..2).map(|_| SocketAddr::from(([127, 0, 0, 1], free_port().unwrap()))).collect();
    let balancer = TcpBalancer::start(addrs.clone()).await.unwrap();
    let namespace = format!("switchboard-test-{}", uuid::Uuid::new_v4().simple());
    let env: Vec<(String, String)> = [
        ("SWITCHBOARD__DATABASE__URL", db.url().to_owned()),
        ("SWITCHBOARD__HOSTS__CREDENTIAL_SECRET", SECRET.into()),
        // Three missed heartbeats (3 s) is far from what a busy CI machine can stall.
        ("SWITCHBOARD__HOSTS__HEARTBEAT_INTERVAL_MS", "1000".into()),
        ("SWITCHBOARD__HOSTS__RECONNECT_GRACE_MS", "10000".into()),
        ("SWITCHBOARD__HOSTS__COMMAND_TIMEOUT_MS", "3000".into()),
        ("SWITCHBOARD__ALLOCATION__ASSIGN_TIMEOUT_MS", "2000".into()),
        ("SWITCHBOARD__REDIS__URL", "redis://127.0.0.1:6379".into()),
        ("SWITCHBOARD__REDIS__NAMESPACE", namespace),
        ("SWITCHBOARD__AUTH__ISSUER", tenant.issuer()),
        ("SWITCHBOARD__AUTH__AUDIENCE", AUDIENCE.into()),
        ("SWITCHBOARD__AUTH__JWKS_URL", tenant.jwks_url()),
        ("SWITCHBOARD__BILLING__PROVIDER", "dev".into()),
        ("SWITCHBOARD__PUBLIC_ENDPOINT", balancer.endpoint.clone()),
        ("SWITCHBOARD__SHUTDOWN_GRACE_MS", "3000".into()),
        ("SWITCHBOARD__LOG__FILTER", "warn".into()),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_owned(), value))
    .collect();
    let mut replicas = Vec::new();
    for addr in &addrs {
        replicas.push(ServerProcess::start(*addr, &env).await.unwrap());
    }
    let credentials = HostCredentials::new(Secret::new(SECRET));
    let mut agents = Vec::new();
    for index in 0..HOSTS {
        let host_id = format!("host-{index}");
        let mut options =
            AgentOptions::new(balancer.endpoint.clone(), host_id.clone(), "us-east-1", credentials.issue(&host_id));
        options.capacity = CAPACITY;
        options.backoff.initial = Duration::from_millis(50);
        options.backoff.max = Duration::from_millis(500);
        agents.push(HostAgent::new(options, Arc::new(LocalRuntime::new())).spawn());
    }
    for agent in &agents {
        agent.wait_connected(1, Duration::from_secs(15)).await.unwrap();
    }
    let cluster = Cluster { db, replicas, balancer, issuer, _tenant: tenant, agents };
    cluster.wait_warm(HOSTS * CAPACITY as usize).await;
    cluster
}

impl Cluster {
    async fn client(&self, replica: usize, user: &str) -> Client {
        let token = self.issuer.issue(user, None, &[], Duration::from_secs(600)).unwrap();
        let channel = tonic::transport::Endpoint::from_shared(self.replicas[replica].endpoint.clone())
            .unwrap()
            .connect_timeout(Duration::from_secs(1))
            .connect_lazy();
        AllocationServiceClient::with_interceptor(channel, Bearer::new(Some(&token)))
    }

    async fn count(&self, sql: &str) -> i64 {
        self.db.query_i64(sql).await.unwrap()
    }

    async fn wait_warm(&self, boxes: usize) {
        eventually(Duration::from_secs(20), async || {
            Ok(self.count("SELECT count(*) FROM mandelboxes WHERE state = 'WAITING'").await >= boxes as i64)
        })
        .await
        .unwrap();
    }

    /// Hosts per replica, as the replicas' streams hold them (the generation
    /// grows at every reconnect).
    async fn generations(&self) -> Vec<i64> {
        let mut out = Vec::new();
        for index in 0..HOSTS {
            out.push(self.count(&format!("SELECT generation FROM hosts WHERE id = 'host-{index}'")).await);
        }
        out
    }
}

fn request() -> AllocateRequest {
    AllocateRequest {
        regions: vec!["us-east-1".into()],
        app: "chrome".into(),
        client_version: "1.0.0".into(),
        ..Default::default()
    }
}

/// A refusal a client can act on: a gRPC code with our stable reason, or,
/// for a call to the replica that was killed, the transport's own failure
/// (the connection went away mid-call: nobody was left to give a reason).
fn is_clear(status: &tonic::Status, to_killed_replica: bool) -> bool {
    reason_of(status).is_some()
        || (to_killed_replica
            && matches!(status.code(), Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_killed_under_load_loses_no_session() {
    let cluster = Arc::new(tokio::sync::Mutex::new(cluster().await));
    // Sessions running before the kill, spread over both replicas' hosts.
    let mut running = Vec::new();
    {
        let cluster = cluster.lock().await;
        for n in 0..6 {
            let session =
                cluster.client(n % 2, &format!("early-{n}")).await.allocate(request()).await.unwrap().into_inner();
            running.push(session.session_id);
        }
    }

    // Steady load: allocations and disconnects on both replicas (B only once A is dead).
    let load = {
        let cluster = cluster.clone();
        tokio::spawn(async move {
            let mut outcomes: Vec<(bool, Result<String, tonic::Status>)> = Vec::new();
            let mut ended = HashSet::new();
            for n in 0..60 {
                let user = format!("load-{}", n % 8);
                let (mut client, to_killed) = {
                    let cluster = cluster.lock().await;
                    // Both replicas while both live, then the survivor.
                    let both = cluster.replicas.len() == 2;
                    let replica = if both { n % 2 } else { 0 };
                    (cluster.client(replica, &user).await, both && replica == 0)
                };
                let result = client.allocate(request()).await.map(|r| r.into_inner().session_id);
                // Most leave at once (a steady stream of disconnects); every
                // tenth stays, so that sessions are running across the kill.
                if let Ok(session_id) = &result
                    && n % 10 != 0
                    && client.end_session(EndSessionRequest { session_id: session_id.clone() }).await.is_ok()
                {
                    ended.insert(session_id.clone());
                }
                outcomes.push((to_killed, result));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (outcomes, ended)
        })
    };

    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = cluster.lock().await.generations().await;
    {
        // SIGKILL the first replica; the balancer keeps sending to both (it skips the dead one).
        let mut cluster = cluster.lock().await;
        let mut dead = cluster.replicas.remove(0);
        dead.kill();
        drop(dead);
    }
    let killed_at = std::time::Instant::now();
    // Every host is connected again, hosts that were on the dead replica with a new generation.
    let cluster_ref = cluster.clone();
    eventually(Duration::from_secs(15), async || {
        let cluster = cluster_ref.lock().await;
        let active = cluster.count("SELECT count(*) FROM hosts WHERE state = 'ACTIVE'").await;
        let moved = cluster.generations().await.iter().zip(&before).filter(|(now, then)| now > then).count();
        Ok(active == HOSTS as i64 && moved > 0)
    })
    .await
    .unwrap();
    println!("hosts of the killed replica reconnected within {:?}", killed_at.elapsed());

    let (outcomes, ended) = load.await.unwrap();
    let cluster = cluster.lock().await;
    // Every session that was running still is.
    let store = db::open_store(&cluster.db).await.unwrap();
    for session_id in &running {
        let session = store.get_session(uuid::Uuid::parse_str(session_id).unwrap()).await.unwrap().unwrap();
        assert_eq!(session.state, SessionState::Running, "{session_id}: {session:?}");
    }
    // Every allocation succeeded or got a clear error; most succeeded.
    let unclear: Vec<&tonic::Status> = outcomes
        .iter()
        .filter_map(|(to_killed, o)| o.as_ref().err().filter(|status| !is_clear(status, *to_killed)))
        .collect();
    assert!(unclear.is_empty(), "unclear errors: {unclear:?}");
    let failed: Vec<&tonic::Status> = outcomes.iter().filter_map(|(_, o)| o.as_ref().err()).collect();
    let succeeded = outcomes.len() - failed.len();
    let first_failures: Vec<_> = failed.iter().take(3).map(|s| (s.code(), s.message().to_owned())).collect();
    assert!(
        succeeded >= outcomes.len() / 2,
        "{succeeded} of {} succeeded; first failures {first_failures:?}",
        outcomes.len()
    );
    println!(
        "{succeeded} of {} allocations succeeded across the kill; first failures {first_failures:?}",
        outcomes.len()
    );
    for session_id in outcomes.iter().filter_map(|(_, o)| o.as_ref().ok()).filter(|id| !ended.contains(*id)) {
        let session = store.get_session(uuid::Uuid::parse_str(session_id).unwrap()).await.unwrap().unwrap();
        assert!(matches!(session.state, SessionState::Running | SessionState::Ended), "{session:?}");
    }
    // No box is assigned twice; no host was declared dead.
    assert_eq!(
        cluster
            .count(
                "SELECT count(*) FROM (SELECT mandelbox_id FROM sessions WHERE state IN ('ASSIGNING', 'RUNNING') \
                 GROUP BY mandelbox_id HAVING count(*) > 1) AS doubles"
            )
            .await,
        0
    );
    assert_eq!(
        cluster
            .count(
                "SELECT count(*) FROM mandelboxes m WHERE m.state = 'RUNNING' AND NOT EXISTS \
                 (SELECT 1 FROM sessions s WHERE s.mandelbox_id = m.id AND s.state = 'RUNNING')"
            )
            .await,
        0,
        "every running box carries its running session"
    );
    for host in store.list_hosts(None).await.unwrap() {
        assert_eq!(host.host.state, HostState::Active, "{:?}", host.host);
    }
    drop(cluster.agents.clone());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_within_its_deadline_and_hosts_move_at_once() {
    let mut cluster = cluster().await;
    let session = cluster.client(1, "stays").await.allocate(request()).await.unwrap().into_inner();
    let before = cluster.generations().await;
    // The balancer stops sending new connections to the first replica (the
    // endpoint is removed, as Kubernetes does before SIGTERM), then it is told to stop.
    let survivor = cluster.replicas[1].addr;
    cluster.balancer.set_backends(vec![survivor]);
    let took = cluster.replicas[0].terminate(Duration::from_secs(10)).unwrap();
    println!("SIGTERM to exit: {took:?}");
    assert!(took < Duration::from_secs(5), "exited within shutdown_grace_ms (3 s) plus slack: {took:?}");
    let moved_at = std::time::Instant::now();
    eventually(Duration::from_secs(10), async || {
        let active = cluster.count("SELECT count(*) FROM hosts WHERE state = 'ACTIVE'").await;
        let moved = cluster.generations().await.iter().zip(&before).filter(|(now, then)| now > then).count();
        Ok(active == HOSTS as i64 && moved > 0)
    })
    .await
    .unwrap();
    println!("hosts moved within {:?} of the exit", moved_at.elapsed());
    let store = db::open_store(&cluster.db).await.unwrap();
    let stored = store.get_session(uuid::Uuid::parse_str(&session.session_id).unwrap()).await.unwrap().unwrap();
    assert_eq!(stored.state, SessionState::Running);
    // The survivor serves on.
    cluster.client(1, "after").await.allocate(request()).await.unwrap();
}
