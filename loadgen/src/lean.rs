//! A lean host: the host protocol by hand over its own HTTP/2 connection, with
//! no runtime behind it. It says Hello, heartbeats, and acknowledges every
//! command at once. Thousands of them fit in one process; the fleet-size
//! scenario runs them in `loadgen hosts` children, several processes of at
//! most a few thousand connections each.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use switchboard::{auth::host_credential::HostCredentials, config::Secret};
use switchboard_proto::v1::{
    CommandResult, Heartbeat, Hello, HostMessage, Port, command, control_message, host_message,
    host_service_client::HostServiceClient,
};
use tokio::{io::AsyncBufReadExt as _, sync::mpsc, task::JoinHandle};
use tokio_stream::wrappers::ReceiverStream;

/// Counters shared by the hosts of one process.
#[derive(Default)]
pub(crate) struct HostCounters {
    pub(crate) commands: AtomicU64,
    pub(crate) drain_acks: AtomicU64,
    pub(crate) heartbeats: AtomicU64,
    pub(crate) ended: AtomicU64,
}

pub(crate) struct LeanHost {
    pub(crate) silent: Arc<AtomicBool>,
    pub(crate) last_heartbeat: Arc<Mutex<Instant>>,
    task: JoinHandle<()>,
}

impl LeanHost {
    /// The stream and connection drop at once (the host died).
    pub(crate) fn kill(&self) {
        self.task.abort();
    }
}

impl Drop for LeanHost {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone)]
pub(crate) struct LeanOptions {
    pub(crate) endpoint: String,
    pub(crate) host_id: String,
    pub(crate) region: String,
    pub(crate) credential: String,
    pub(crate) capacity: u32,
    pub(crate) heartbeat: Duration,
    /// Delay of the first heartbeat, so that a fleet's heartbeats spread over the interval.
    pub(crate) phase: Duration,
}

/// Connects (own TCP connection), sends Hello and waits for Welcome.
pub(crate) async fn connect(options: LeanOptions, counters: Arc<HostCounters>) -> anyhow::Result<LeanHost> {
    let channel = tonic::transport::Endpoint::from_shared(options.endpoint.clone())?
        .connect_timeout(Duration::from_secs(30))
        .connect()
        .await
        .context("connecting")?;
    let (outbound, receiver) = mpsc::channel::<HostMessage>(8);
    let hello = Hello {
        host_id: options.host_id.clone(),
        region: options.region.clone(),
        image: "dev".into(),
        agent_version: "loadgen".into(),
        capacity: options.capacity,
        address: "127.0.0.1".into(),
        mandelboxes: Vec::new(),
        credential: options.credential.clone(),
    };
    outbound.send(HostMessage { body: Some(host_message::Body::Hello(hello)) }).await?;
    let mut client = HostServiceClient::new(channel.clone());
    let mut inbound = client.connect(ReceiverStream::new(receiver)).await?.into_inner();
    let welcome = tokio::time::timeout(Duration::from_secs(60), inbound.message())
        .await
        .context("no Welcome within 60 s")??
        .context("stream ended before Welcome")?;
    if !matches!(welcome.body, Some(control_message::Body::Welcome(_))) {
        anyhow::bail!("first message was not a Welcome");
    }
    let silent = Arc::new(AtomicBool::new(false));
    let last_heartbeat = Arc::new(Mutex::new(Instant::now()));
    let (task_silent, task_last) = (silent.clone(), last_heartbeat.clone());
    let task = tokio::spawn(async move {
        let _channel = channel;
        let mut ticker = tokio::time::interval_at(
            tokio::time::Instant::now() + options.phase,
            options.heartbeat.max(Duration::from_millis(10)),
        );
        let mut sequence = 0_u64;
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    if task_silent.load(Ordering::Relaxed) {
                        continue;
                    }
                    sequence += 1;
                    let heartbeat = Heartbeat { running_mandelboxes: 0, cpu_load: 0.0, memory_used_bytes: 0, sequence };
                    if let Ok(mut last) = task_last.lock() {
                        *last = Instant::now();
                    }
                    if outbound.send(HostMessage { body: Some(host_message::Body::Heartbeat(heartbeat)) }).await.is_err() {
                        break;
                    }
                    counters.heartbeats.fetch_add(1, Ordering::Relaxed);
                }
                message = inbound.message() => {
                    let Ok(Some(message)) = message else { break };
                    let Some(control_message::Body::Command(command)) = message.body else { continue };
                    counters.commands.fetch_add(1, Ordering::Relaxed);
                    let ports = match &command.kind {
                        Some(command::Kind::Spawn(_)) | Some(command::Kind::Assign(_)) => {
                            vec![Port { name: "tcp_32262".into(), port: 32262, protocol: "tcp".into() }]
                        }
                        _ => Vec::new(),
                    };
                    let is_drain = matches!(command.kind, Some(command::Kind::Drain(_)));
                    let result = CommandResult {
                        command_id: command.command_id,
                        ok: true,
                        error: String::new(),
                        ports,
                        session_key: "00112233445566778899aabbccddeeff".into(),
                        // A lean host spawns nothing: a teardown's replacement
                        // is left to the control plane's own spawn.
                        replacement: None,
                    };
                    if outbound.send(HostMessage { body: Some(host_message::Body::Result(result)) }).await.is_err() {
                        break;
                    }
                    if is_drain {
                        counters.drain_acks.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        counters.ended.fetch_add(1, Ordering::Relaxed);
    });
    Ok(LeanHost { silent, last_heartbeat, task })
}

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct HostsArgs {
    #[arg(long)]
    pub(crate) endpoint: String,
    #[arg(long, env = "LOADGEN_HOST_SECRET")]
    pub(crate) secret: String,
    /// Host ids are PREFIX0 … PREFIX{count-1}.
    #[arg(long)]
    pub(crate) prefix: String,
    #[arg(long)]
    pub(crate) count: usize,
    #[arg(long, default_value_t = 5_000)]
    pub(crate) heartbeat_ms: u64,
    /// Slots each host offers (0: none; a spawn is answered at once).
    #[arg(long, default_value_t = 0)]
    pub(crate) capacity: u32,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 32)]
    pub(crate) concurrency: usize,
}

/// What a `loadgen hosts` child prints: one line once all hosts tried to
/// connect, then one per "report" line it reads on stdin.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct HostsReport {
    pub(crate) connected: usize,
    pub(crate) failed: usize,
    pub(crate) connect_ms: f64,
    pub(crate) first_error: Option<String>,
    pub(crate) commands: u64,
    pub(crate) drain_acks: u64,
    pub(crate) heartbeats: u64,
    pub(crate) ended: u64,
    pub(crate) rss_kib: u64,
}

/// `loadgen hosts`: runs `count` lean hosts until stdin closes.
pub(crate) async fn run_hosts(args: HostsArgs) -> anyhow::Result<()> {
    let credentials = HostCredentials::new(Secret::new(args.secret.clone()));
    let counters = Arc::new(HostCounters::default());
    let started = Instant::now();
    let heartbeat = Duration::from_millis(args.heartbeat_ms);
    let results: Vec<anyhow::Result<LeanHost>> = futures::stream::iter(0..args.count)
        .map(|index| {
            let host_id = format!("{}{index}", args.prefix);
            let options = LeanOptions {
                endpoint: args.endpoint.clone(),
                credential: credentials.issue(&host_id),
                host_id,
                region: crate::server::REGION.into(),
                capacity: args.capacity,
                heartbeat,
                phase: heartbeat.mul_f64((index % 997) as f64 / 997.0),
            };
            let counters = counters.clone();
            async move {
                let mut last = None;
                for _ in 0..3 {
                    match connect(options.clone(), counters.clone()).await {
                        Ok(host) => return Ok(host),
                        Err(error) => last = Some(error),
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(last.unwrap_or_else(|| anyhow::anyhow!("not connected")))
            }
        })
        .buffer_unordered(args.concurrency.max(1))
        .collect()
        .await;
    let connect_ms = crate::measure::ms(started.elapsed());
    let mut hosts = Vec::new();
    let mut report = HostsReport { connect_ms, ..HostsReport::default() };
    for result in results {
        match result {
            Ok(host) => hosts.push(host),
            Err(error) => {
                report.failed += 1;
                report.first_error.get_or_insert_with(|| format!("{error:#}"));
            }
        }
    }
    report.connected = hosts.len();
    let fill = |report: &mut HostsReport| {
        report.commands = counters.commands.load(Ordering::Relaxed);
        report.drain_acks = counters.drain_acks.load(Ordering::Relaxed);
        report.heartbeats = counters.heartbeats.load(Ordering::Relaxed);
        report.ended = counters.ended.load(Ordering::Relaxed);
        report.rss_kib = crate::measure::rss_kib(std::process::id()).unwrap_or(0);
    };
    fill(&mut report);
    println!("{}", serde_json::to_string(&report)?);
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.trim() == "report" {
            fill(&mut report);
            println!("{}", serde_json::to_string(&report)?);
        }
    }
    drop(hosts);
    Ok(())
}
