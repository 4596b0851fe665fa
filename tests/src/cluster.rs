//! Several control-plane processes for failover tests: `switchboard serve`
//! children sharing one PostgreSQL database and one Redis, and a TCP balancer
//! in front of them standing in for the Kubernetes Service / NLB (hosts
//! connect to it, and it sends each new connection to a replica that accepts).

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail};
use tokio::net::{TcpListener, TcpStream};

/// The `switchboard` binary CI builds (`SWITCHBOARD_BIN` to choose another).
pub fn switchboard_bin() -> anyhow::Result<PathBuf> {
    let path = match std::env::var_os("SWITCHBOARD_BIN") {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/debug/switchboard")),
    };
    if !path.exists() {
        bail!("{} not found: build it with `cargo build -p switchboard-server --bin switchboard`", path.display());
    }
    Ok(path)
}

/// A free port on loopback, bound and released, for a process started later.
///
/// It is taken from below the kernel's ephemeral range: a port from that
/// range (what binding port 0 gives) can be handed, between its release and
/// its use, to any socket bound to port 0 or connecting out meanwhile (another
/// test's mandelbox listener, say), which then receives this test's traffic.
pub fn free_port() -> anyhow::Result<u16> {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    const LOWEST: u32 = 10_000;
    let span = ephemeral_low.saturating_sub(LOWEST).max(1);
    // A random start per call, so concurrent test processes rarely probe the same ports.
    let start = uuid::Uuid::new_v4().as_u128() as u32;
    for attempt in 0..200 {
        let offset = start.wrapping_add(attempt);
        let port = u16::try_from(LOWEST + offset % span)?;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no free port below {ephemeral_low}")
}

/// One `switchboard serve` child process.
pub struct ServerProcess {
    child: Child,
    pub addr: SocketAddr,
    pub endpoint: String,
}

impl ServerProcess {
    /// Starts `switchboard serve` on `addr` with `env` (SWITCHBOARD__* settings)
    /// and waits until it answers `/healthz`.
    pub async fn start(addr: SocketAddr, env: &[(String, String)]) -> anyhow::Result<ServerProcess> {
        let mut command = Command::new(switchboard_bin()?);
        command.arg("serve").env_remove("SWITCHBOARD_CONFIG").env("SWITCHBOARD__LISTEN", addr.to_string());
        for (key, value) in env {
            command.env(key, value);
        }
        let logs = if std::env::var_os("TEST_LOG").is_some() { Stdio::inherit() } else { Stdio::null() };
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logs)
            .spawn()
            .context("starting switchboard serve")?;
        let mut process = ServerProcess { child, addr, endpoint: format!("http://{addr}") };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = process.child.try_wait()? {
                bail!("switchboard serve exited at start-up: {status} (TEST_LOG=1 shows its logs)");
            }
            if healthy(addr).await {
                return Ok(process);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("switchboard serve on {addr} did not answer within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: the process dies on the spot, nothing is cleaned up.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits up to `deadline` for the process to exit; returns how long it took.
    pub fn terminate(&mut self, deadline: Duration) -> anyhow::Result<Duration> {
        let started = std::time::Instant::now();
        let status = Command::new("kill").arg("-TERM").arg(self.pid().to_string()).status()?;
        if !status.success() {
            bail!("kill -TERM {} failed", self.pid());
        }
        while started.elapsed() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("switchboard serve did not exit within {deadline:?} of SIGTERM")
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn healthy(addr: SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(Ok(mut stream)) = tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)).await else {
        return false;
    };
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut response = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut response)).await;
    read.is_ok() && String::from_utf8_lossy(&response).starts_with("HTTP/1.1 200")
}

/// Round-robin TCP balancer: each new connection goes to the next backend
/// that accepts it; a dead backend is skipped. Connections already open end
/// when their backend does, as behind a real load balancer.
pub struct TcpBalancer {
    pub addr: SocketAddr,
    pub endpoint: String,
    backends: Arc<Mutex<Vec<SocketAddr>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpBalancer {
    pub async fn start(backends: Vec<SocketAddr>) -> anyhow::Result<TcpBalancer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let backends = Arc::new(Mutex::new(backends));
        let next = Arc::new(AtomicUsize::new(0));
        let shared = backends.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let backends = shared.lock().map(|b| b.clone()).unwrap_or_default();
                let start = next.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let _ = client.set_nodelay(true);
                    for offset in 0..backends.len() {
                        let backend = backends[(start + offset) % backends.len()];
                        let connect =
                            tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(backend)).await;
                        if let Ok(Ok(mut server)) = connect {
                            let _ = server.set_nodelay(true);
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                            return;
                        }
                    }
                });
            }
        });
        Ok(TcpBalancer { addr, endpoint: format!("http://{addr}"), backends, task })
    }

    /// Replaces the backends new connections go to.
    pub fn set_backends(&self, backends: Vec<SocketAddr>) {
        if let Ok(mut current) = self.backends.lock() {
            *current = backends;
        }
    }
}

impl Drop for TcpBalancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
