//! The agent against a scripted in-test control plane: handshake, heartbeats,
//! commands, reconnects, fault injection, shutdown and kill.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use hostagent_client::{
    AgentHandle, AgentOptions, AssignSpec, Assignment, Backoff, ExitNotice, HostAgent, LocalRuntime, MandelboxRuntime,
    RuntimeError, SpawnSpec,
};
use switchboard_proto::v1::host_service_server::{HostService, HostServiceServer};
use switchboard_proto::v1::session_events_service_server::{SessionEventsService, SessionEventsServiceServer};
use switchboard_proto::v1::{
    AssignMandelbox, Command, CommandResult, ControlMessage, Heartbeat, Hello, HostMessage, Port,
    ReportDisconnectRequest, ReportDisconnectResponse, RunningMandelbox, SpawnMandelbox, TeardownMandelbox, Welcome,
    command, control_message, host_message,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status, Streaming};

const STEP: Duration = Duration::from_secs(5);
const HEARTBEAT_MS: u32 = 50;

type Outbound = mpsc::UnboundedSender<Result<ControlMessage, Status>>;

/// One agent stream as the test control plane sees it.
struct Conn {
    inbound: Streaming<HostMessage>,
    outbound: Outbound,
}

/// Hands every incoming stream to the test, and records disconnect reports.
struct ControlPlane {
    conns: mpsc::UnboundedSender<Conn>,
    reports: mpsc::UnboundedSender<ReportDisconnectRequest>,
}

#[tonic::async_trait]
impl HostService for ControlPlane {
    type ConnectStream = UnboundedReceiverStream<Result<ControlMessage, Status>>;

    async fn connect(&self, request: Request<Streaming<HostMessage>>) -> Result<Response<Self::ConnectStream>, Status> {
        let (outbound, rx) = mpsc::unbounded_channel();
        let _ = self.conns.send(Conn { inbound: request.into_inner(), outbound });
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }
}

#[tonic::async_trait]
impl SessionEventsService for ControlPlane {
    async fn report_disconnect(
        &self,
        request: Request<ReportDisconnectRequest>,
    ) -> Result<Response<ReportDisconnectResponse>, Status> {
        let _ = self.reports.send(request.into_inner());
        Ok(Response::new(ReportDisconnectResponse { session_id: "s-1".to_owned() }))
    }
}

struct Server {
    url: String,
    conns: mpsc::UnboundedReceiver<Conn>,
    reports: mpsc::UnboundedReceiver<ReportDisconnectRequest>,
}

impl Server {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (conns_tx, conns) = mpsc::unbounded_channel();
        let (reports_tx, reports) = mpsc::unbounded_channel();
        let plane = Arc::new(ControlPlane { conns: conns_tx, reports: reports_tx });
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(HostServiceServer::from_arc(Arc::clone(&plane)))
                .add_service(SessionEventsServiceServer::from_arc(plane))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        Self { url, conns, reports }
    }

    fn options(&self) -> AgentOptions {
        let mut options = AgentOptions::new(&self.url, "host-1", "us-east-1", "cred-1");
        options.address = "10.0.0.7".to_owned();
        options.capacity = 3;
        options.image = "img-42".to_owned();
        options
    }

    async fn next_conn(&mut self) -> Conn {
        tokio::time::timeout(STEP, self.conns.recv()).await.expect("no connection in time").unwrap()
    }

    /// Accepts the next stream, checks its Hello and welcomes it.
    async fn accept(&mut self, generation: u64) -> (Conn, Hello) {
        let mut conn = self.next_conn().await;
        let hello = conn.hello().await;
        conn.welcome(generation, &self.url);
        (conn, hello)
    }
}

impl Conn {
    /// The next message; panics if the stream ends or nothing comes in time.
    async fn next(&mut self) -> host_message::Body {
        let message = tokio::time::timeout(STEP, self.inbound.message())
            .await
            .expect("no message in time")
            .expect("stream failed")
            .expect("stream ended");
        message.body.expect("message without body")
    }

    /// The next message that is not a heartbeat.
    async fn next_non_heartbeat(&mut self) -> host_message::Body {
        loop {
            match self.next().await {
                host_message::Body::Heartbeat(_) => continue,
                other => return other,
            }
        }
    }

    async fn heartbeat(&mut self) -> Heartbeat {
        match self.next().await {
            host_message::Body::Heartbeat(h) => h,
            other => panic!("expected a heartbeat, got {other:?}"),
        }
    }

    async fn hello(&mut self) -> Hello {
        match self.next().await {
            host_message::Body::Hello(h) => h,
            other => panic!("first message must be Hello, got {other:?}"),
        }
    }

    async fn result(&mut self) -> CommandResult {
        match self.next_non_heartbeat().await {
            host_message::Body::Result(r) => r,
            other => panic!("expected a command result, got {other:?}"),
        }
    }

    fn welcome(&self, generation: u64, url: &str) {
        self.send(control_message::Body::Welcome(Welcome {
            heartbeat_interval_ms: HEARTBEAT_MS,
            generation,
            session_events_endpoint: url.to_owned(),
        }));
    }

    fn send(&self, body: control_message::Body) {
        self.outbound.send(Ok(ControlMessage { body: Some(body) })).unwrap();
    }

    fn command(&self, id: &str, kind: Option<command::Kind>) {
        self.send(control_message::Body::Command(Command {
            command_id: id.to_owned(),
            kind,
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
        }));
    }

    fn spawn(&self, id: &str, mandelbox_id: &str) {
        self.command(
            id,
            Some(command::Kind::Spawn(SpawnMandelbox {
                mandelbox_id: mandelbox_id.to_owned(),
                app: "chrome".to_owned(),
                disconnect_token: format!("dt-{mandelbox_id}"),
            })),
        );
    }

    fn assign(&self, id: &str, mandelbox_id: &str, session_id: &str) {
        self.command(
            id,
            Some(command::Kind::Assign(AssignMandelbox {
                mandelbox_id: mandelbox_id.to_owned(),
                session_id: session_id.to_owned(),
                user_id: "user-1".to_owned(),
                client_data_json: "{}".to_owned(),
                config_encryption_token: "cet-secret".to_owned(),
            })),
        );
    }

    /// Reads until the stream ends; returns what came before the end.
    async fn drain_to_end(&mut self) -> Vec<host_message::Body> {
        let mut seen = Vec::new();
        loop {
            match tokio::time::timeout(STEP, self.inbound.message()).await.expect("stream did not end in time") {
                Ok(Some(m)) => seen.extend(m.body),
                Ok(None) | Err(_) => return seen,
            }
        }
    }

    /// Whether anything arrives within `wait`.
    async fn quiet_for(&mut self, wait: Duration) -> bool {
        tokio::time::timeout(wait, self.inbound.message()).await.is_err()
    }
}

fn start(options: AgentOptions, runtime: Arc<dyn MandelboxRuntime>) -> AgentHandle {
    HostAgent::new(options, runtime).spawn()
}

/// Graceful shutdown as the control plane sees it: a Goodbye, then it closes
/// the stream, and the agent finishes.
async fn shut_down(agent: &AgentHandle, mut conn: Conn) {
    let stopping = tokio::spawn({
        let agent = agent.clone();
        async move { agent.shutdown().await }
    });
    match conn.next_non_heartbeat().await {
        host_message::Body::Goodbye(g) => assert_eq!(g.reason, "shutdown"),
        other => panic!("expected Goodbye, got {other:?}"),
    }
    drop(conn);
    tokio::time::timeout(STEP, stopping).await.unwrap().unwrap();
    assert!(agent.is_finished());
}

fn main_port(ports: &[Port]) -> u16 {
    assert_eq!(ports.len(), 1, "{ports:?}");
    assert_eq!(ports[0].name, "tcp_32262");
    assert_eq!(ports[0].protocol, "tcp");
    u16::try_from(ports[0].port).unwrap()
}

async fn port_closes(port: u16) -> bool {
    let closed = async {
        while TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(STEP, closed).await.is_ok()
}

fn running(id: &str, session: &str) -> RunningMandelbox {
    RunningMandelbox { mandelbox_id: id.to_owned(), assigned: !session.is_empty(), session_id: session.to_owned() }
}

#[tokio::test]
async fn hello_welcome_heartbeats_commands_and_goodbye() {
    let mut server = Server::start().await;
    let agent = start(server.options(), Arc::new(LocalRuntime::new()));

    let mut conn = server.next_conn().await;
    let hello = conn.hello().await;
    assert_eq!(
        hello,
        Hello {
            host_id: "host-1".to_owned(),
            region: "us-east-1".to_owned(),
            image: "img-42".to_owned(),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            capacity: 3,
            address: "10.0.0.7".to_owned(),
            mandelboxes: vec![],
            credential: "cred-1".to_owned(),
        }
    );
    assert!(!agent.status().borrow().connected, "not connected before Welcome");

    let welcomed = Instant::now();
    conn.welcome(7, &server.url);
    let status = agent.wait_connected(1, STEP).await.unwrap();
    assert_eq!((status.connected, status.generation, status.connections, status.draining), (true, 7, 1, false));

    // Heartbeats at the interval, numbered from 1.
    let mut beats = Vec::new();
    for _ in 0..3 {
        let h = conn.heartbeat().await;
        beats.push((h.sequence, h.running_mandelboxes, welcomed.elapsed()));
    }
    assert_eq!(beats.iter().map(|b| (b.0, b.1)).collect::<Vec<_>>(), vec![(1, 0), (2, 0), (3, 0)]);
    for (i, (_, _, at)) in beats.iter().enumerate() {
        let due = Duration::from_millis(u64::from(HEARTBEAT_MS) * (i as u64 + 1));
        assert!(*at >= due, "heartbeat {i} at {at:?}, due {due:?}");
    }
    assert!(beats[2].2 < Duration::from_secs(2), "heartbeats too slow: {beats:?}");

    // Spawn: ok with a port that accepts connections.
    conn.spawn("c-1", "mb-1");
    let result = conn.result().await;
    assert_eq!((result.command_id.as_str(), result.ok, result.error.as_str()), ("c-1", true, ""));
    let port = main_port(&result.ports);
    assert!(TcpStream::connect(("127.0.0.1", port)).await.is_ok());
    assert_eq!(conn.heartbeat().await.running_mandelboxes, 1);

    // Assign: same ports and a 32-hex session key.
    conn.assign("c-2", "mb-1", "s-1");
    let result = conn.result().await;
    assert_eq!((result.command_id.as_str(), result.ok), ("c-2", true));
    assert_eq!(main_port(&result.ports), port);
    assert_eq!(result.session_key.len(), 32);
    assert!(result.session_key.chars().all(|c| c.is_ascii_hexdigit()));

    // Malformed commands get ok=false, and the stream lives on.
    conn.command("c-3", None);
    let result = conn.result().await;
    assert_eq!((result.command_id.as_str(), result.ok), ("c-3", false));
    assert!(!result.error.is_empty());
    conn.assign("c-4", "no-such-box", "s-2");
    let result = conn.result().await;
    assert_eq!((result.command_id.as_str(), result.ok), ("c-4", false));
    assert_eq!(result.error, "mandelbox no-such-box not found");

    // Drain is remembered.
    conn.command(
        "c-5",
        Some(command::Kind::Drain(switchboard_proto::v1::DrainHost { reason: "maintenance".to_owned() })),
    );
    let result = conn.result().await;
    assert_eq!((result.command_id.as_str(), result.ok), ("c-5", true));
    assert!(agent.status().borrow().draining);

    // Teardown twice: both ok.
    for id in ["c-6", "c-7"] {
        conn.command(
            id,
            Some(command::Kind::Teardown(TeardownMandelbox {
                mandelbox_id: "mb-1".to_owned(),
                reason: "test".to_owned(),
                replacement: None,
            })),
        );
        let result = conn.result().await;
        assert_eq!((result.command_id.as_str(), result.ok), (id, true), "{}", result.error);
    }
    assert!(port_closes(port).await);

    // Graceful shutdown: Goodbye, then the stream ends.
    conn.spawn("c-8", "mb-2");
    let port = main_port(&conn.result().await.ports);
    shut_down(&agent, conn).await;
    assert!(port_closes(port).await, "shutdown tears every box down");
    assert!(!agent.status().borrow().connected);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), server.conns.recv()).await.map_or(true, |c| c.is_none()),
        "no reconnect after shutdown"
    );
}

#[tokio::test]
async fn reconnects_and_resumes_with_running_boxes() {
    let mut server = Server::start().await;
    let mut options = server.options();
    options.backoff = Backoff { initial: Duration::from_millis(20), max: Duration::from_millis(200), multiplier: 2.0 };
    let agent = start(options, Arc::new(LocalRuntime::new()));

    let (conn, hello) = server.accept(1).await;
    assert!(hello.mandelboxes.is_empty());
    agent.wait_connected(1, STEP).await.unwrap();
    let mut conn = conn;
    conn.spawn("c-1", "mb-1");
    let port = main_port(&conn.result().await.ports);
    conn.assign("c-2", "mb-1", "s-1");
    assert!(conn.result().await.ok);
    conn.spawn("c-3", "mb-2");
    assert!(conn.result().await.ok);

    // The control plane drops the stream: the agent comes back and reports its boxes.
    drop(conn);
    let (mut conn, hello) = server.accept(2).await;
    assert_eq!(hello.host_id, "host-1");
    assert_eq!(hello.credential, "cred-1");
    assert_eq!(hello.mandelboxes, vec![running("mb-1", "s-1"), running("mb-2", "")]);
    let status = agent.wait_connected(2, STEP).await.unwrap();
    assert_eq!((status.generation, status.connections), (2, 2));
    assert!(status.last_error.is_some());
    assert!(TcpStream::connect(("127.0.0.1", port)).await.is_ok(), "boxes keep running");
    conn.heartbeat().await;

    // The agent drops the stream itself (fault injection): no Goodbye, then a new Hello.
    agent.drop_connection();
    let before_end = conn.drain_to_end().await;
    assert!(!before_end.iter().any(|m| matches!(m, host_message::Body::Goodbye(_))), "{before_end:?}");
    let (_conn, hello) = server.accept(3).await;
    assert_eq!(hello.mandelboxes, vec![running("mb-1", "s-1"), running("mb-2", "")]);
    let status = agent.wait_connected(3, STEP).await.unwrap();
    assert_eq!((status.generation, status.connections), (3, 3));

    agent.kill();
}

#[tokio::test]
async fn paused_heartbeats_keep_the_stream_but_go_silent() {
    let mut server = Server::start().await;
    let agent = start(server.options(), Arc::new(LocalRuntime::new()));
    let (mut conn, _) = server.accept(1).await;
    let last = conn.heartbeat().await.sequence;
    assert_eq!(last, 1);

    agent.pause_heartbeats(true);
    // A heartbeat may already be on its way; after that, silence.
    let mut in_flight = 0;
    while !conn.quiet_for(Duration::from_millis(u64::from(HEARTBEAT_MS) * 2)).await {
        in_flight += 1;
        assert!(in_flight <= 1, "heartbeats keep coming while paused");
    }
    assert!(conn.quiet_for(Duration::from_millis(300)).await, "heartbeats while paused");
    assert!(agent.status().borrow().connected);

    // Commands are still served while silent.
    conn.spawn("c-1", "mb-1");
    assert!(conn.result().await.ok);

    agent.pause_heartbeats(false);
    let resumed = conn.heartbeat().await;
    assert!(resumed.sequence >= 2, "{resumed:?}");
    assert_eq!(resumed.running_mandelboxes, 1);
    let next = conn.heartbeat().await;
    assert_eq!(next.sequence, resumed.sequence + 1);
    shut_down(&agent, conn).await;
}

#[tokio::test]
async fn kill_sends_no_goodbye_and_stops_every_box() {
    let mut server = Server::start().await;
    let agent = start(server.options(), Arc::new(LocalRuntime::new()));
    let (mut conn, _) = server.accept(1).await;
    agent.wait_connected(1, STEP).await.unwrap();
    conn.spawn("c-1", "mb-1");
    let port = main_port(&conn.result().await.ports);

    agent.kill();
    let before_end = conn.drain_to_end().await;
    assert!(
        !before_end.iter().any(|m| matches!(m, host_message::Body::Goodbye(_))),
        "kill must not say goodbye: {before_end:?}"
    );
    assert!(port_closes(port).await, "killed boxes close their listeners");
    assert!(!agent.status().borrow().connected);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), server.conns.recv()).await.is_err(),
        "a killed agent does not reconnect"
    );
    // Shutdown after kill returns at once.
    tokio::time::timeout(STEP, agent.shutdown()).await.unwrap();
}

#[tokio::test]
async fn rejections_wait_the_max_backoff_other_failures_do_not() {
    let mut server = Server::start().await;
    let mut options = server.options();
    options.backoff = Backoff { initial: Duration::from_millis(10), max: Duration::from_millis(600), multiplier: 2.0 };
    let agent = start(options, Arc::new(LocalRuntime::new()));

    let mut conn = server.next_conn().await;
    conn.hello().await;
    conn.outbound.send(Err(Status::unauthenticated("BAD_HOST_CREDENTIAL: wrong credential"))).unwrap();
    let rejected = Instant::now();
    let mut conn = server.next_conn().await;
    let waited = rejected.elapsed();
    assert!(waited >= Duration::from_millis(600), "retried after {waited:?}");
    let status = agent.status().borrow().clone();
    assert_eq!((status.connected, status.connections), (false, 0));
    let error = status.last_error.unwrap();
    assert!(error.contains("UNAUTHENTICATED: BAD_HOST_CREDENTIAL"), "{error}");

    // A stream that just ends before Welcome is not a rejection: back soon.
    conn.hello().await;
    drop(conn);
    let ended = Instant::now();
    let (conn, _) = server.accept(1).await;
    let waited = ended.elapsed();
    assert!(waited < Duration::from_millis(500), "retried after {waited:?}");
    agent.wait_connected(1, STEP).await.unwrap();
    shut_down(&agent, conn).await;
}

#[tokio::test]
async fn a_box_that_exits_by_itself_is_reported() {
    let mut server = Server::start().await;
    let runtime = LocalRuntime::with_exit_after_disconnect(Duration::from_millis(50));
    let agent = start(server.options(), Arc::new(runtime));
    let (mut conn, _) = server.accept(1).await;
    conn.spawn("c-1", "mb-1");
    let port = main_port(&conn.result().await.ports);
    conn.assign("c-2", "mb-1", "s-1");
    assert!(conn.result().await.ok);

    // A client comes, is echoed, and leaves.
    let mut client = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    client.write_all(b"hello box").await.unwrap();
    let mut echoed = [0u8; 9];
    client.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"hello box");
    drop(client);

    let report = tokio::time::timeout(STEP, server.reports.recv()).await.unwrap().unwrap();
    assert_eq!((report.mandelbox_id.as_str(), report.token.as_str()), ("mb-1", "dt-mb-1"));
    match conn.next_non_heartbeat().await {
        host_message::Body::Exited(e) => {
            assert_eq!((e.mandelbox_id.as_str(), e.reason.as_str()), ("mb-1", "client disconnected"));
        }
        other => panic!("expected MandelboxExited, got {other:?}"),
    }
    assert!(port_closes(port).await);
    assert_eq!(conn.heartbeat().await.running_mandelboxes, 0);
    shut_down(&agent, conn).await;
}

/// LocalRuntime, but spawning `slow` takes a while.
struct SlowSpawn {
    inner: LocalRuntime,
    slow: &'static str,
    delay: Duration,
}

#[async_trait]
impl MandelboxRuntime for SlowSpawn {
    async fn spawn(&self, spec: SpawnSpec) -> Result<Vec<Port>, RuntimeError> {
        if spec.mandelbox_id == self.slow {
            tokio::time::sleep(self.delay).await;
        }
        self.inner.spawn(spec).await
    }
    async fn assign(&self, spec: AssignSpec) -> Result<Assignment, RuntimeError> {
        self.inner.assign(spec).await
    }
    async fn teardown(&self, mandelbox_id: &str) -> Result<(), RuntimeError> {
        self.inner.teardown(mandelbox_id).await
    }
    fn running(&self) -> Vec<RunningMandelbox> {
        self.inner.running()
    }
    fn exits(&self) -> broadcast::Receiver<ExitNotice> {
        self.inner.exits()
    }
    async fn teardown_all(&self) {
        self.inner.teardown_all().await;
    }
}

#[tokio::test]
async fn a_slow_spawn_delays_neither_heartbeats_nor_other_commands() {
    let mut server = Server::start().await;
    let runtime = SlowSpawn { inner: LocalRuntime::new(), slow: "mb-slow", delay: Duration::from_millis(600) };
    let agent = start(server.options(), Arc::new(runtime));
    let (mut conn, _) = server.accept(1).await;
    let sent = Instant::now();
    conn.spawn("c-slow", "mb-slow");
    conn.spawn("c-fast", "mb-fast");

    let mut heartbeats = 0;
    let mut results = Vec::new();
    while results.len() < 2 {
        match conn.next().await {
            host_message::Body::Heartbeat(_) => heartbeats += 1,
            host_message::Body::Result(r) => {
                assert!(r.ok, "{}", r.error);
                results.push((r.command_id, sent.elapsed()));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(results[0].0, "c-fast");
    assert!(results[0].1 < Duration::from_millis(400), "{results:?}");
    assert_eq!(results[1].0, "c-slow");
    assert!(results[1].1 >= Duration::from_millis(600));
    assert!(heartbeats >= 5, "only {heartbeats} heartbeats during a 600 ms spawn");
    shut_down(&agent, conn).await;
}
