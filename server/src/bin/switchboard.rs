//! The `switchboard` binary: `serve` (production) and `dev` (everything on one
//! machine). Thin: parses flags and calls the library.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand};
use switchboard::{
    Application, ApplicationOptions,
    config::{Config, ConfigSources},
    dev::{self, DevOptions},
};

/// mimalloc, not glibc's malloc: allocation and free were a sixth of the
/// server's CPU under load with glibc (BENCHMARKS.md, run W).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "switchboard", version, about = "Control plane for cloud app streaming")]
struct Cli {
    /// Configuration file (TOML). Environment variables SWITCHBOARD__SECTION__KEY override it.
    #[arg(long, global = true, env = "SWITCHBOARD_CONFIG")]
    config: Option<PathBuf>,
    /// Print the effective configuration (secrets redacted) and exit.
    #[arg(long, global = true)]
    dump_config: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane against the configured database.
    Serve,
    /// Run everything locally: SQLite, a dev token issuer and local hosts.
    Dev {
        /// Address to listen on; port 0 picks a free one.
        #[arg(long, default_value = "127.0.0.1:7400")]
        listen: SocketAddr,
        /// Where to write {endpoint, user_token, admin_token} as JSON.
        #[arg(long)]
        credentials_file: Option<PathBuf>,
        /// Local hosts per region the scaler keeps at least.
        #[arg(long, default_value_t = 2)]
        hosts: u32,
        /// Local hosts per region the scaler runs at most.
        #[arg(long, default_value_t = 6)]
        max_hosts: u32,
        /// Mandelboxes per host.
        #[arg(long, default_value_t = 4)]
        capacity: u32,
        /// Idle mandelboxes the scaler keeps ready per region.
        #[arg(long, default_value_t = 4)]
        buffer: u32,
        /// Seconds of excess capacity (and since the last launch) before a host is drained.
        #[arg(long, default_value_t = 20)]
        scale_down_after: u64,
        /// Comma-separated regions.
        #[arg(long, value_delimiter = ',', default_value = "us-east-1,eu-west-1")]
        regions: Vec<String>,
        /// Database URL; a fresh SQLite file in a temporary directory by default.
        #[arg(long)]
        database: Option<String>,
    },
    /// Print the credential a host with this id must present (derived from hosts.credential_secret).
    HostCredential {
        #[arg(long)]
        host_id: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let file_layers = ConfigSources { file: cli.config.clone(), ..Default::default() };
    let mut config: Config = file_layers.load()?;
    switchboard::telemetry::init(&config.log);

    match cli.command {
        Command::Serve => {
            // The database's config table sits between the file and the environment.
            let store =
                switchboard::store::connect_with(config.database.url.expose(), config.database.max_connections).await?;
            let database = store.config_entries().await?;
            config = ConfigSources { database, ..file_layers }.load()?;
            if cli.dump_config {
                print!("{}", config.dump());
                return Ok(());
            }
            let shutdown = switchboard::shutdown::on_signals();
            let app = Application::build_with_store(config, ApplicationOptions::default(), store).await?;
            app.run_until_stopped(shutdown).await
        }
        Command::Dev {
            listen,
            credentials_file,
            hosts,
            max_hosts,
            capacity,
            buffer,
            scale_down_after,
            regions,
            database,
        } => {
            if cli.dump_config {
                print!("{}", config.dump());
                return Ok(());
            }
            let options = DevOptions {
                listen,
                credentials_file,
                hosts_per_region: hosts,
                max_hosts_per_region: max_hosts,
                scale_down_after: std::time::Duration::from_secs(scale_down_after),
                capacity,
                buffer,
                regions,
                database_url: database,
            };
            dev::run(config, options, switchboard::shutdown::on_signals()).await
        }
        Command::HostCredential { host_id } => {
            if config.hosts.credential_secret.is_empty() {
                anyhow::bail!("hosts.credential_secret is not set");
            }
            let credentials =
                switchboard::auth::host_credential::HostCredentials::new(config.hosts.credential_secret.clone());
            println!("{}", credentials.issue(&host_id));
            Ok(())
        }
    }
}
