//! The contract of the two ways replicas talk: the in-process router and
//! event bus (the embedded default) and the Redis ones (several replicas),
//! written once and run against both. "Two replicas" are two handles: for the
//! in-process bus the same one twice, for Redis two clusters in one namespace,
//! the host's connection registered on the first, commands sent from the second.
#![allow(clippy::unwrap_used)]

use std::{sync::Arc, time::Duration};

use switchboard::{
    cluster::{ClusterOptions, RedisCluster},
    events::{Event, EventBus, LocalEventBus},
    fleet::{CommandRouter, ConnectionRegistry, LocalRouter, RouteError, registry::HostConnection},
};
use switchboard_proto::v1::{CommandResult, ControlMessage, DrainHost, Port, command, control_message};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// What the fake host does with the commands it gets.
#[derive(Clone, Copy)]
enum Host {
    Acks,
    Refuses,
    NeverAnswers,
    /// Drops the command (its connection ends) without answering.
    Dies,
}

struct Pair {
    /// Where the host's stream lives.
    owner: Arc<ConnectionRegistry>,
    /// The router of the replica that sends.
    router: Arc<dyn CommandRouter>,
    events: (Arc<dyn EventBus>, Arc<dyn EventBus>),
    _stop: Option<tokio_util::sync::DropGuard>,
}

fn local() -> Pair {
    let registry = Arc::new(ConnectionRegistry::default());
    let bus: Arc<dyn EventBus> = Arc::new(LocalEventBus::new(64));
    Pair {
        owner: registry.clone(),
        router: Arc::new(LocalRouter::new(registry)),
        events: (bus.clone(), bus),
        _stop: None,
    }
}

async fn redis() -> Pair {
    let namespace = format!("switchboard-test-{}", uuid::Uuid::new_v4().simple());
    let stop = CancellationToken::new();
    let cluster = |replica: &str, registry: Arc<ConnectionRegistry>| {
        let options = ClusterOptions {
            url: switchboard::config::Secret::new("redis://127.0.0.1:6379"),
            namespace: namespace.clone(),
            replica_id: replica.into(),
            ownership_ttl: Duration::from_secs(10),
        };
        RedisCluster::new(options, registry, 64).unwrap()
    };
    let owner = Arc::new(ConnectionRegistry::default());
    let first = cluster("replica-a", owner.clone());
    let second = cluster("replica-b", Arc::new(ConnectionRegistry::default()));
    tokio::spawn(first.clone().run(stop.clone()));
    tokio::spawn(second.clone().run(stop.clone()));
    // Both links subscribed, the first one's ownership refreshed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    Pair {
        owner,
        router: Arc::new(second.clone()),
        events: (Arc::new(first), Arc::new(second)),
        _stop: Some(stop.drop_guard()),
    }
}

/// Registers a fake connection for `host_id` that behaves as `host` does:
/// it reads the commands queued on the host's stream and answers them as the
/// connection's task would hand the host's results over.
fn connect(registry: &ConnectionRegistry, host_id: &str, host: Host) {
    let (stream, mut inbox) = mpsc::channel(8);
    let connection = HostConnection::new(1, "us-east-1".into(), stream.downgrade(), CancellationToken::new());
    registry.register(host_id, connection.clone());
    tokio::spawn(async move {
        // The task's own sender: the stream stays open while it runs.
        let _stream = stream;
        let mut kept = Vec::new();
        while let Some(outbound) = inbox.recv().await {
            let Ok(ControlMessage { body: Some(control_message::Body::Command(command)) }) = *outbound else {
                continue;
            };
            let command_id = command.command_id;
            let Some(reply) = connection.answered(&command_id) else { continue };
            match host {
                Host::Acks => {
                    let ports = vec![Port { name: "tcp_32262".into(), port: 40001, protocol: "tcp".into() }];
                    let _ = reply.send(CommandResult {
                        command_id,
                        ok: true,
                        ports,
                        session_key: "key".into(),
                        ..Default::default()
                    });
                }
                Host::Refuses => {
                    let _ =
                        reply.send(CommandResult { command_id, ok: false, error: "no".into(), ..Default::default() });
                }
                // Unanswered: the waiter stays until its deadline.
                Host::NeverAnswers => kept.push(reply),
                // The connection ends: every waiter hears the host is gone.
                Host::Dies => connection.close_commands(),
            }
        }
    });
}

fn drain() -> command::Kind {
    command::Kind::Drain(DrainHost { reason: "contract".into() })
}

/// Lets the owner publish who holds its new connections (the Redis refresher
/// runs every second; the in-process registry needs nothing).
async fn settle(pair: &Pair) {
    if pair._stop.is_some() {
        tokio::time::sleep(Duration::from_millis(1_200)).await;
    }
}

async fn acks_come_back_with_their_content(pair: Pair) {
    connect(&pair.owner, "host-ack", Host::Acks);
    settle(&pair).await;
    let result = pair.router.send("host-ack", drain(), Duration::from_secs(5)).await.unwrap();
    assert!(result.ok);
    assert_eq!(result.session_key, "key");
    assert_eq!(result.ports.len(), 1);
    assert_eq!(result.ports[0].port, 40001);
}

async fn refusals_timeouts_and_gone_hosts_are_told_apart(pair: Pair) {
    connect(&pair.owner, "host-no", Host::Refuses);
    connect(&pair.owner, "host-silent", Host::NeverAnswers);
    connect(&pair.owner, "host-dies", Host::Dies);
    settle(&pair).await;
    assert_eq!(
        pair.router.send("host-no", drain(), Duration::from_secs(5)).await,
        Err(RouteError::Refused("no".into()))
    );
    let started = std::time::Instant::now();
    let silent = pair.router.send("host-silent", drain(), Duration::from_millis(400)).await;
    assert_eq!(silent, Err(RouteError::Timeout(Duration::from_millis(400))));
    assert!(started.elapsed() < Duration::from_millis(1_500), "the deadline holds: {:?}", started.elapsed());
    assert_eq!(pair.router.send("host-dies", drain(), Duration::from_secs(5)).await, Err(RouteError::Gone));
}

async fn unknown_hosts_fail_fast(pair: Pair) {
    let started = std::time::Instant::now();
    assert_eq!(pair.router.send("nobody", drain(), Duration::from_secs(10)).await, Err(RouteError::NotConnected));
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
}

async fn events_reach_every_replica_in_order(pair: Pair) {
    let (first, second) = &pair.events;
    let mut on_first = first.subscribe();
    let mut on_second = second.subscribe();
    let events: Vec<Event> = (0..20).map(|n| Event::MandelboxWarm { region: format!("region-{n}") }).collect();
    for event in &events {
        first.publish(event.clone());
    }
    for receiver in [&mut on_first, &mut on_second] {
        let mut seen = Vec::new();
        while seen.len() < events.len() {
            let event = tokio::time::timeout(Duration::from_secs(5), receiver.recv()).await.unwrap().unwrap();
            seen.push(event);
        }
        assert_eq!(seen, events);
    }
    // Published from the other side too, and nothing twice.
    second.publish(Event::MandelboxWarm { region: "back".into() });
    for receiver in [&mut on_first, &mut on_second] {
        let event = tokio::time::timeout(Duration::from_secs(5), receiver.recv()).await.unwrap().unwrap();
        assert_eq!(event, Event::MandelboxWarm { region: "back".into() });
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(on_first.try_recv().is_err() && on_second.try_recv().is_err(), "no duplicates");
}

macro_rules! bus_contract {
    ($($test:ident),+ $(,)?) => {
        mod in_process {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::local()).await
                }
            )+
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::redis().await).await
                }
            )+
        }
    };
}

bus_contract!(
    acks_come_back_with_their_content,
    refusals_timeouts_and_gone_hosts_are_told_apart,
    unknown_hosts_fail_fast,
    events_reach_every_replica_in_order,
);
