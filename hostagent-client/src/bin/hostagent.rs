//! `hostagent`: keeps this host's stream to the Switchboard control plane open
//! and runs its mandelboxes.

use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use hostagent_client::{AgentOptions, HostAgent, LocalRuntime, MandelboxRuntime};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RuntimeKind {
    /// Mandelboxes are tasks in this process with a TCP listener each (dev and tests).
    Local,
}

/// Switchboard host agent.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Control plane URL, e.g. http://127.0.0.1:50051.
    #[arg(long, env = "HOSTAGENT_ENDPOINT")]
    endpoint: String,
    /// This host's id (default: a fresh uuid).
    #[arg(long, env = "HOSTAGENT_HOST_ID")]
    host_id: Option<String>,
    #[arg(long, env = "HOSTAGENT_REGION")]
    region: String,
    /// Image / AMI version this host runs.
    #[arg(long, env = "HOSTAGENT_IMAGE", default_value = "dev")]
    image: String,
    /// How many mandelboxes this host can run at once.
    #[arg(long, env = "HOSTAGENT_CAPACITY", default_value_t = 4)]
    capacity: u32,
    /// Address clients use to reach this host's mandelboxes.
    #[arg(long, env = "HOSTAGENT_ADDRESS", default_value = "127.0.0.1")]
    address: String,
    /// Host credential bound to the host id.
    #[arg(long, env = "HOSTAGENT_CREDENTIAL", hide_env_values = true)]
    credential: String,
    #[arg(long, value_enum, env = "HOSTAGENT_RUNTIME", default_value = "local")]
    runtime: RuntimeKind,
    /// Local runtime: a box exits by itself this many seconds after its client left.
    #[arg(long, env = "HOSTAGENT_EXIT_AFTER_DISCONNECT_SECS")]
    exit_after_disconnect_secs: Option<u64>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .init();
    let args = Args::parse();

    let host_id = args.host_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let mut options = AgentOptions::new(args.endpoint, host_id, args.region, args.credential);
    options.image = args.image;
    options.capacity = args.capacity;
    options.address = args.address;

    let runtime: Arc<dyn MandelboxRuntime> = match args.runtime {
        RuntimeKind::Local => Arc::new(match args.exit_after_disconnect_secs {
            Some(secs) => LocalRuntime::with_exit_after_disconnect(Duration::from_secs(secs)),
            None => LocalRuntime::new(),
        }),
    };

    let shutdown = CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone()));
    let result = HostAgent::new(options, runtime).run(shutdown).await;
    if let Err(e) = &result {
        error!(error = %e, "host agent failed");
    }
    result
}

/// First SIGTERM / ctrl-c: graceful shutdown. Second: exit at once.
async fn watch_signals(shutdown: CancellationToken) {
    let mut signals = match Signals::new() {
        Ok(signals) => signals,
        Err(e) => {
            warn!(error = %e, "cannot listen for signals");
            return;
        }
    };
    let first = signals.next().await;
    info!(signal = first, "shutting down gracefully (signal again to exit at once)");
    shutdown.cancel();
    let second = signals.next().await;
    warn!(signal = second, "second signal, exiting now");
    std::process::exit(130);
}

struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        Ok(Self {
            #[cfg(unix)]
            term: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?,
        })
    }

    async fn next(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => "sigterm",
                _ = tokio::signal::ctrl_c() => "sigint",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "sigint"
        }
    }
}
