//! Micro-benchmarks of the hot paths: choosing a box (the claim through the
//! store: SQLite always, PostgreSQL when reachable) and encoding/decoding host
//! commands with prost.
//!
//! `cargo bench -p loadgen --bench hot_paths`; PostgreSQL from
//! `SWITCHBOARD_TEST_POSTGRES_URL` (default postgres://postgres@127.0.0.1:5432/postgres).

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use prost::Message as _;
use sqlx::Connection as _;
use switchboard::{
    model::{EndReason, HostHello, MandelboxState, PortSpec, Region},
    store::{ClaimOutcome, DynStore, NewMandelbox, NewSession},
};
use switchboard_proto::v1::{
    AssignMandelbox, Command, ControlMessage, Heartbeat, HostMessage, command, control_message, host_message,
};
use uuid::Uuid;

const REGION: &str = "us-east-1";
const HOSTS: usize = 8;
const WARM_PER_HOST: usize = 4;

/// A store with HOSTS active hosts, each with WARM_PER_HOST warm boxes.
async fn seeded(url: &str) -> DynStore {
    let store = switchboard::store::connect(url).await.unwrap();
    store.put_region(&Region { name: REGION.into(), enabled: true, ..Default::default() }).await.unwrap();
    for host in 0..HOSTS {
        let hello = HostHello {
            host_id: format!("bench-{host}"),
            region: REGION.into(),
            image: "dev".into(),
            agent_version: "bench".into(),
            address: "127.0.0.1".into(),
            capacity: 1000,
        };
        store.host_connected(&hello).await.unwrap();
        for _ in 0..WARM_PER_HOST {
            warm_box(&store, &hello.host_id).await;
        }
    }
    store
}

async fn warm_box(store: &DynStore, host_id: &str) {
    let new = NewMandelbox { id: Uuid::new_v4(), app: "chrome".into(), token_hash: "00".repeat(32), session_id: None };
    store.reserve_mandelbox(host_id, &new).await.unwrap();
    let ports = [PortSpec { name: "tcp_32262".into(), port: 32262, protocol: "tcp".into() }];
    store.mandelbox_spawned(new.id, &ports).await.unwrap();
}

/// Times `create_session_and_claim` only; between claims (untimed) the
/// session ends, its box dies and a fresh warm box takes its place, so every
/// claim sees the same pool.
async fn claim_cycles(store: &DynStore, iterations: u64) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iterations {
        let new = NewSession {
            id: Uuid::new_v4(),
            user_id: "bench-user".into(),
            app: "chrome".into(),
            client_version: "1.0.0".into(),
            regions: vec![REGION.into()],
        };
        let started = Instant::now();
        let outcome = store.create_session_and_claim(&new, 3).await.unwrap();
        total += started.elapsed();
        let ClaimOutcome::Claimed(claim) = outcome else { panic!("the pool ran dry") };
        store.end_session(new.id, EndReason::ClientDisconnected).await.unwrap();
        store
            .mandelbox_finished(claim.mandelbox.id, MandelboxState::Dead, EndReason::ClientDisconnected)
            .await
            .unwrap();
        warm_box(store, &claim.mandelbox.host_id).await;
    }
    total
}

fn claim(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let mut group = c.benchmark_group("choose_a_box");
    group.sample_size(30).measurement_time(Duration::from_secs(5));

    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("bench.db").display());
    let store = runtime.block_on(seeded(&url));
    group.bench_function("sqlite/create_session_and_claim", |b| {
        b.iter_custom(|iterations| runtime.block_on(claim_cycles(&store, iterations)))
    });
    drop(store);

    let admin_url = std::env::var("SWITCHBOARD_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let name = format!("sb_bench_{}", Uuid::new_v4().simple());
    let created = runtime.block_on(async {
        let mut admin = sqlx::PgConnection::connect(&admin_url).await.ok()?;
        sqlx::query(&format!("CREATE DATABASE \"{name}\"")).execute(&mut admin).await.ok()?;
        Some(())
    });
    if created.is_some() {
        let base = admin_url.split('?').next().unwrap_or(&admin_url);
        let cut = base.rfind('/').filter(|index| *index > "postgres://".len()).unwrap_or(base.len());
        let url = format!("{}/{name}", &base[..cut]);
        let store = runtime.block_on(seeded(&url));
        group.bench_function("postgres/create_session_and_claim", |b| {
            b.iter_custom(|iterations| runtime.block_on(claim_cycles(&store, iterations)))
        });
        drop(store);
        runtime.block_on(async {
            if let Ok(mut admin) = sqlx::PgConnection::connect(&admin_url).await {
                let _ =
                    sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).execute(&mut admin).await;
            }
        });
    } else {
        eprintln!("PostgreSQL not reachable at {admin_url}: postgres/create_session_and_claim skipped");
    }
    group.finish();
}

fn assign_command() -> ControlMessage {
    ControlMessage {
        body: Some(control_message::Body::Command(Command {
            command_id: Uuid::new_v4().to_string(),
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            kind: Some(command::Kind::Assign(AssignMandelbox {
                mandelbox_id: Uuid::new_v4().to_string(),
                session_id: Uuid::new_v4().to_string(),
                user_id: "auth0|0123456789abcdef".into(),
                client_data_json: r#"{"timezone":"Europe/Berlin","locale":"de-DE","dark_mode":true}"#.into(),
                config_encryption_token: "c2VjcmV0LWNvbmZpZy1lbmNyeXB0aW9uLXRva2Vu".into(),
            })),
        })),
    }
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("host_commands");
    let command = assign_command();
    let encoded = command.encode_to_vec();
    group.bench_function("encode_assign", |b| b.iter(|| black_box(&command).encode_to_vec()));
    group
        .bench_function("decode_assign", |b| b.iter(|| ControlMessage::decode(black_box(encoded.as_slice())).unwrap()));
    let heartbeat = HostMessage {
        body: Some(host_message::Body::Heartbeat(Heartbeat {
            running_mandelboxes: 3,
            cpu_load: 0.25,
            memory_used_bytes: 1 << 30,
            sequence: 12_345,
        })),
    };
    let encoded_heartbeat = heartbeat.encode_to_vec();
    group.bench_function("encode_heartbeat", |b| b.iter(|| black_box(&heartbeat).encode_to_vec()));
    group.bench_function("decode_heartbeat", |b| {
        b.iter(|| HostMessage::decode(black_box(encoded_heartbeat.as_slice())).unwrap())
    });
    group.finish();
}

criterion_group!(benches, claim, codec);
criterion_main!(benches);
