//! A real EC2 emulator for the cloud tests: `moto_server` (PyPI `moto[server]`).
//!
//! [`moto()`] starts one server per test binary and hands each test a guard
//! that serialises the tests using it and resets the emulator's state first.
//! The server runs under a small shell wrapper that kills it when this process's
//! end of its stdin closes, so it never outlives the test binary (statics are
//! never dropped); [`MotoServer`]'s Drop kills it too.

use std::{
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::Duration,
};

use anyhow::{Context as _, bail};
use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};
use switchboard::{
    cloud::{CloudConfig, ProviderKind},
    config::Secret,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::{Mutex, MutexGuard},
};

/// Dummy credentials: moto accepts any, but requests must be SigV4-signed.
pub const MOTO_ACCESS_KEY: &str = "AKIDSWITCHBOARDTEST";
pub const MOTO_SECRET_KEY: &str = "switchboard-test-secret-key";

pub struct MotoServer {
    child: Child,
    pub port: u16,
    pub endpoint: String,
}

impl MotoServer {
    /// Starts `moto_server` on a free port and waits until it answers. Fails
    /// (never skips) when moto_server is not installed.
    pub async fn start() -> anyhow::Result<MotoServer> {
        let port = crate::cluster::free_port()?;
        // `read` returns when the test process exits (its end of the pipe closes): then moto goes too.
        let script = "command -v moto_server >/dev/null 2>&1 || exit 127\n\
                      moto_server -H 127.0.0.1 -p \"$0\" >/dev/null 2>&1 &\n\
                      pid=$!\n\
                      trap 'kill $pid 2>/dev/null; exit 0' TERM INT\n\
                      read -r _ || true\n\
                      kill $pid 2>/dev/null\n";
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg(port.to_string())
            // Unknown or unoffered instance types are refused, as EC2 does: that is how
            // the fallback to the next type is exercised against the emulator.
            .env("MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION", "true")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting sh for moto_server")?;
        let mut server = MotoServer { child, port, endpoint: format!("http://127.0.0.1:{port}") };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = server.child.try_wait()? {
                if status.code() == Some(127) {
                    bail!("moto_server is not installed: run `pip install 'moto[server]'` (scripts/test.sh does this)");
                }
                bail!("moto_server exited at start-up: {status}");
            }
            if server.request("GET", "/moto-api/").await.is_ok() {
                return Ok(server);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("moto_server did not answer on port {port} within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A bare HTTP/1.1 request; returns the status code.
    async fn request(&self, method: &str, path: &str) -> anyhow::Result<u16> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).await?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        );
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response)).await??;
        let head = String::from_utf8_lossy(&response);
        let status = head.split_whitespace().nth(1).context("no status line")?;
        Ok(status.parse()?)
    }

    /// Clears every instance in every region (`POST /moto-api/reset`).
    pub async fn reset(&self) -> anyhow::Result<()> {
        let status = self.request("POST", "/moto-api/reset").await?;
        if status != 200 {
            bail!("moto reset answered {status}");
        }
        Ok(())
    }

    /// A `[cloud]` section that points the EC2 provider at this emulator.
    pub fn cloud_config(&self, cluster: &str) -> CloudConfig {
        let mut config = CloudConfig { provider: ProviderKind::Ec2, cluster: cluster.to_owned(), ..Default::default() };
        config.ec2.endpoint_url = self.endpoint.clone();
        config.ec2.access_key_id = Secret::new(MOTO_ACCESS_KEY);
        config.ec2.secret_access_key = Secret::new(MOTO_SECRET_KEY);
        config.ec2.max_attempts = 3;
        config.ec2.initial_backoff_ms = 10;
        config.ec2.max_backoff_ms = 100;
        config
    }

    /// A plain SDK client on the emulator, for what the tests do "outside Switchboard".
    pub fn client(&self, region: &str) -> aws_sdk_ec2::Client {
        let config = aws_sdk_ec2::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(region.to_owned()))
            .credentials_provider(Credentials::new(MOTO_ACCESS_KEY, MOTO_SECRET_KEY, None, None, "test"))
            .endpoint_url(self.endpoint.clone())
            .build();
        aws_sdk_ec2::Client::from_conf(config)
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        // Closing stdin makes the wrapper kill moto_server and exit.
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// Exclusive use of this binary's moto server, reset.
pub struct MotoGuard {
    _guard: MutexGuard<'static, ()>,
    pub server: &'static MotoServer,
}

impl std::ops::Deref for MotoGuard {
    type Target = MotoServer;

    fn deref(&self) -> &MotoServer {
        self.server
    }
}

static SERVER: tokio::sync::OnceCell<MotoServer> = tokio::sync::OnceCell::const_new();
static EXCLUSIVE: OnceLock<Mutex<()>> = OnceLock::new();

/// This binary's moto server (started on first use), reset and held exclusively until the guard drops.
pub async fn moto() -> anyhow::Result<MotoGuard> {
    let guard = EXCLUSIVE.get_or_init(|| Mutex::new(())).lock().await;
    let server = SERVER.get_or_try_init(MotoServer::start).await?;
    server.reset().await?;
    Ok(MotoGuard { _guard: guard, server })
}
