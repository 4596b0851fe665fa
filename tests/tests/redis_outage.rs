//! Redis stopped and restarted under two replicas (a private redis-server, so
//! that other tests keep theirs): nothing crashes, what needs Redis fails with
//! a clear reason, allocations on a replica's own hosts go on, and everything
//! recovers by itself when Redis is back.
#![allow(clippy::unwrap_used)]

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use switchboard::{config::Secret, fleet::RouteError};
use switchboard_proto::v1::{DrainHost, SetMaintenanceRequest, command};
use switchboard_tests::{
    Backend, TestApp, TestOptions,
    app::{chrome_in_us_east, eventually, reason},
    cluster::free_port,
};
use tonic::Code;

struct PrivateRedis {
    child: Child,
    port: u16,
}

impl PrivateRedis {
    async fn start(port: u16) -> PrivateRedis {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test.sh installs it)");
        let redis = PrivateRedis { child, port };
        eventually(Duration::from_secs(10), async || Ok(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()))
            .await
            .unwrap();
        redis
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_survive_a_redis_outage_and_recover() {
    let port = free_port().unwrap();
    let mut redis = PrivateRedis::start(port).await;
    let url = format!("redis://127.0.0.1:{}", redis.port);
    let namespace = format!("switchboard-test-{}", uuid::Uuid::new_v4().simple());
    let configure = |url: String, namespace: String| {
        move |config: &mut switchboard::config::Config| {
            config.redis.url = Secret::new(url);
            config.redis.namespace = namespace;
        }
    };
    let a = TestApp::spawn_with(Backend::Postgres, TestOptions::default(), configure(url.clone(), namespace.clone()))
        .await
        .unwrap();
    let b = a.spawn_replica(configure(url.clone(), namespace.clone())).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let drain = || command::Kind::Drain(DrainHost { reason: "outage test".into() });
    let admin_token = a.admin_token();

    // Up: B reaches A's host through Redis.
    b.user_client("before").allocate(chrome_in_us_east()).await.unwrap();

    redis.stop();
    // Down: A's own host still takes sessions; routing from B fails clearly
    // and fast; setting maintenance fails with REDIS_UNAVAILABLE.
    a.user_client("during-a").allocate(chrome_in_us_east()).await.unwrap();
    let started = std::time::Instant::now();
    let routed = b.core.router.send("host-1", drain(), Duration::from_secs(10)).await;
    assert!(matches!(routed, Err(RouteError::Unavailable(_))), "{routed:?}");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    let refused = b.user_client("during-b").allocate(chrome_in_us_east()).await.unwrap_err();
    assert!(
        matches!(refused.code(), Code::Unavailable | Code::ResourceExhausted | Code::DeadlineExceeded),
        "{refused:?}"
    );
    assert!(switchboard::error::reason_of(&refused).is_some(), "a stable reason: {refused:?}");
    let maintenance = a
        .admin_client(Some(&admin_token))
        .set_maintenance(SetMaintenanceRequest { enabled: true, reason: "deploy".into(), retry_after_secs: 30 })
        .await
        .unwrap_err();
    assert_eq!((maintenance.code(), reason(&maintenance)), (Code::Unavailable, "REDIS_UNAVAILABLE"));

    // Back (same port, empty: ownership is re-published by the refreshers).
    let _redis = PrivateRedis::start(port).await;
    eventually(Duration::from_secs(15), async || {
        Ok(b.core.router.send("host-1", drain(), Duration::from_secs(2)).await.is_ok())
    })
    .await
    .unwrap();
    a.admin_client(Some(&admin_token))
        .set_maintenance(SetMaintenanceRequest { enabled: false, ..Default::default() })
        .await
        .unwrap();
}
