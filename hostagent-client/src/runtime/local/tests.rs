use std::collections::VecDeque;

use switchboard_proto::v1::session_events_service_server::{SessionEventsService, SessionEventsServiceServer};
use switchboard_proto::v1::{ReportDisconnectRequest, ReportDisconnectResponse};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

use super::*;

const STEP: Duration = Duration::from_secs(5);

fn spawn_spec(id: &str, endpoint: &str) -> SpawnSpec {
    SpawnSpec {
        mandelbox_id: id.to_owned(),
        app: "chrome".to_owned(),
        disconnect_token: format!("token-{id}"),
        session_events_endpoint: endpoint.to_owned(),
    }
}

fn assign_spec(id: &str, session: &str) -> AssignSpec {
    AssignSpec {
        mandelbox_id: id.to_owned(),
        session_id: session.to_owned(),
        user_id: "user-1".to_owned(),
        client_data_json: "{}".to_owned(),
        config_encryption_token: "cet".to_owned(),
    }
}

fn main_port(ports: &[Port]) -> u16 {
    assert_eq!(ports.len(), 1, "{ports:?}");
    assert_eq!(ports[0].name, "tcp_32262");
    assert_eq!(ports[0].protocol, "tcp");
    u16::try_from(ports[0].port).unwrap()
}

async fn connects(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).await.is_ok()
}

/// A SessionEventsService that answers from a script (then OK) and records calls.
struct FakeEvents {
    script: std::sync::Mutex<VecDeque<Status>>,
    calls: mpsc::UnboundedSender<ReportDisconnectRequest>,
}

#[tonic::async_trait]
impl SessionEventsService for FakeEvents {
    async fn report_disconnect(
        &self,
        request: Request<ReportDisconnectRequest>,
    ) -> Result<Response<ReportDisconnectResponse>, Status> {
        let request = request.into_inner();
        let _ = self.calls.send(request);
        match self.script.lock().unwrap().pop_front() {
            Some(status) => Err(status),
            None => Ok(Response::new(ReportDisconnectResponse { session_id: "s-1".to_owned() })),
        }
    }
}

async fn events_server(script: Vec<Status>) -> (String, mpsc::UnboundedReceiver<ReportDisconnectRequest>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (calls, calls_rx) = mpsc::unbounded_channel();
    let svc = FakeEvents { script: std::sync::Mutex::new(script.into()), calls };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(SessionEventsServiceServer::new(svc))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (format!("http://{addr}"), calls_rx)
}

/// Connects as the client of an assigned box, checks the echo, and leaves.
async fn visit(port: u16) {
    let mut client = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    client.write_all(b"ping").await.unwrap();
    let mut echoed = [0u8; 4];
    tokio::time::timeout(STEP, client.read_exact(&mut echoed)).await.unwrap().unwrap();
    assert_eq!(&echoed, b"ping");
    drop(client);
}

#[tokio::test]
async fn spawn_binds_a_port_you_can_connect_to() {
    let rt = LocalRuntime::new();
    let ports = rt.spawn(spawn_spec("mb-1", "")).await.unwrap();
    let port = main_port(&ports);
    assert_ne!(port, 0);
    assert!(connects(port).await);
    // Spawning the same id again is idempotent.
    assert_eq!(rt.spawn(spawn_spec("mb-1", "")).await.unwrap(), ports);
    assert_eq!(rt.running().len(), 1);
    let empty = rt.spawn(spawn_spec("", "")).await;
    assert!(matches!(empty, Err(RuntimeError::Invalid(_))), "{empty:?}");
}

#[tokio::test]
async fn assign_returns_a_32_hex_key_once_per_session() {
    let rt = LocalRuntime::new();
    let ports = rt.spawn(spawn_spec("mb-1", "")).await.unwrap();
    let a = rt.assign(assign_spec("mb-1", "s-1")).await.unwrap();
    assert_eq!(a.ports, ports);
    assert_eq!(a.session_key.len(), 32);
    assert!(a.session_key.chars().all(|c| c.is_ascii_hexdigit()));
    // The same session again gets the same assignment; another session is refused.
    let again = rt.assign(assign_spec("mb-1", "s-1")).await.unwrap();
    assert_eq!(again, a);
    let other = rt.assign(assign_spec("mb-1", "s-2")).await;
    assert!(matches!(other, Err(RuntimeError::AlreadyAssigned { .. })), "{other:?}");
    let missing = rt.assign(assign_spec("nope", "s-1")).await;
    assert!(matches!(missing, Err(RuntimeError::NotFound(_))), "{missing:?}");
    // Another box gets another key.
    rt.spawn(spawn_spec("mb-2", "")).await.unwrap();
    let b = rt.assign(assign_spec("mb-2", "s-2")).await.unwrap();
    assert_ne!(a.session_key, b.session_key);
}

#[tokio::test]
async fn teardown_closes_the_port_and_is_idempotent() {
    let rt = LocalRuntime::new();
    let port = main_port(&rt.spawn(spawn_spec("mb-1", "")).await.unwrap());
    assert!(connects(port).await);
    rt.teardown("mb-1").await.unwrap();
    assert!(!connects(port).await, "port {port} still open after teardown");
    rt.teardown("mb-1").await.unwrap();
    rt.teardown("never-existed").await.unwrap();
    assert!(rt.running().is_empty());
}

#[tokio::test]
async fn running_lists_boxes_with_assigned_flags() {
    let rt = LocalRuntime::new();
    rt.spawn(spawn_spec("mb-b", "")).await.unwrap();
    rt.spawn(spawn_spec("mb-a", "")).await.unwrap();
    rt.assign(assign_spec("mb-b", "s-9")).await.unwrap();
    assert_eq!(
        rt.running(),
        vec![
            RunningMandelbox { mandelbox_id: "mb-a".to_owned(), assigned: false, session_id: String::new() },
            RunningMandelbox { mandelbox_id: "mb-b".to_owned(), assigned: true, session_id: "s-9".to_owned() },
        ]
    );
}

#[tokio::test]
async fn client_leaving_is_reported_and_the_box_exits_later() {
    let (endpoint, mut calls) = events_server(vec![]).await;
    let rt = LocalRuntime::with_exit_after_disconnect(Duration::from_millis(100));
    let mut exits = rt.exits();
    let port = main_port(&rt.spawn(spawn_spec("mb-1", &endpoint)).await.unwrap());
    rt.assign(assign_spec("mb-1", "s-1")).await.unwrap();
    let left = Instant::now();
    visit(port).await;

    let call = tokio::time::timeout(STEP, calls.recv()).await.unwrap().unwrap();
    assert_eq!(call.mandelbox_id, "mb-1");
    assert_eq!(call.token, "token-mb-1");

    let exit = tokio::time::timeout(STEP, exits.recv()).await.unwrap().unwrap();
    assert!(left.elapsed() >= Duration::from_millis(100));
    assert_eq!(exit, ExitNotice { mandelbox_id: "mb-1".to_owned(), reason: "client disconnected".to_owned() });
    assert!(rt.running().is_empty());
    assert!(!connects(port).await);
    assert!(calls.try_recv().is_err(), "reported once");
}

#[tokio::test]
async fn without_exit_delay_the_box_waits_for_teardown() {
    let (endpoint, mut calls) = events_server(vec![]).await;
    let rt = LocalRuntime::new();
    let mut exits = rt.exits();
    let port = main_port(&rt.spawn(spawn_spec("mb-1", &endpoint)).await.unwrap());
    rt.assign(assign_spec("mb-1", "s-1")).await.unwrap();
    visit(port).await;
    tokio::time::timeout(STEP, calls.recv()).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(exits.try_recv().is_err());
    assert_eq!(rt.running().len(), 1);
    rt.teardown("mb-1").await.unwrap();
    assert!(exits.try_recv().is_err(), "teardown is not a self-exit");
}

#[tokio::test]
async fn unavailable_reports_are_retried_and_refusals_are_not() {
    let (endpoint, mut calls) =
        events_server(vec![Status::unavailable("STORAGE_UNAVAILABLE"), Status::unavailable("STORAGE_UNAVAILABLE")])
            .await;
    let rt = LocalRuntime::new();
    let port = main_port(&rt.spawn(spawn_spec("mb-1", &endpoint)).await.unwrap());
    rt.assign(assign_spec("mb-1", "s-1")).await.unwrap();
    visit(port).await;
    for _ in 0..3 {
        tokio::time::timeout(STEP, calls.recv()).await.unwrap().unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(calls.try_recv().is_err(), "no call after the successful one");

    let (endpoint, mut calls) = events_server(vec![Status::permission_denied("BAD_MANDELBOX_TOKEN")]).await;
    let port = main_port(&rt.spawn(spawn_spec("mb-2", &endpoint)).await.unwrap());
    rt.assign(assign_spec("mb-2", "s-2")).await.unwrap();
    visit(port).await;
    tokio::time::timeout(STEP, calls.recv()).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(calls.try_recv().is_err(), "PERMISSION_DENIED is final");
}

#[tokio::test]
async fn kill_all_closes_every_port_and_client() {
    let rt = LocalRuntime::with_exit_after_disconnect(Duration::from_millis(10));
    let mut exits = rt.exits();
    let p1 = main_port(&rt.spawn(spawn_spec("mb-1", "")).await.unwrap());
    let p2 = main_port(&rt.spawn(spawn_spec("mb-2", "")).await.unwrap());
    rt.assign(assign_spec("mb-1", "s-1")).await.unwrap();
    let mut client = TcpStream::connect(("127.0.0.1", p1)).await.unwrap();
    client.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    client.read_exact(&mut one).await.unwrap();

    rt.kill_all();
    assert!(rt.running().is_empty());
    // The client sees its connection end, and the ports close.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(STEP, client.read_to_end(&mut rest)).await.unwrap();
    assert!(read.is_err() || rest.is_empty());
    let closed = async {
        while connects(p1).await || connects(p2).await {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(STEP, closed).await.unwrap();
    assert!(exits.try_recv().is_err(), "a killed box sends no exit notice");
}

#[tokio::test]
async fn teardown_all_stops_everything() {
    let rt = LocalRuntime::new();
    let p1 = main_port(&rt.spawn(spawn_spec("mb-1", "")).await.unwrap());
    let p2 = main_port(&rt.spawn(spawn_spec("mb-2", "")).await.unwrap());
    rt.teardown_all().await;
    assert!(rt.running().is_empty());
    assert!(!connects(p1).await && !connects(p2).await);
}
