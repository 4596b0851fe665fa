//! `loadgen`: drives a Switchboard control plane with simulated desktop
//! clients and hosts, measures it against the limit of the machine, and writes
//! a JSON and a Markdown report. See BENCHMARKS.md.
//!
//! ```text
//! loadgen run   [options]   the full scenarios (release build)
//! loadgen smoke [--out DIR] every scenario for a few seconds at small sizes
//! loadgen serve …           (internal) the control plane in a child process
//! loadgen hosts …           (internal) a process of lean simulated hosts
//! ```

/// mimalloc, not glibc's malloc: allocation and free were a sixth of the
/// server's CPU under load with glibc (BENCHMARKS.md, run W).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod lean;
mod measure;
mod report;
mod runtime;
mod scenarios;
mod server;
mod server_phases;
mod store_cycle;

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

use crate::{
    measure::{Machine, Progress},
    report::{BackendReport, RunReport},
    scenarios::{ClaimSql, FleetSettings},
    server::{Backend, ServerProcess, TempDb},
};

#[derive(Parser)]
#[command(name = "loadgen", about = "Load generator and benchmarks for Switchboard")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs the scenarios.
    Run(Box<RunArgs>),
    /// Every scenario for a few seconds at small sizes; prints the figures, asserts nothing.
    Smoke {
        #[arg(long, default_value = "target/loadgen/smoke")]
        out: PathBuf,
        #[arg(long, env = "SWITCHBOARD_TEST_POSTGRES_URL", default_value = DEFAULT_POSTGRES)]
        postgres_url: String,
    },
    /// (internal) The control plane under test, in this process, until stdin closes.
    Serve(server::ServeArgs),
    /// (internal) Lean simulated hosts, until stdin closes.
    Hosts(lean::HostsArgs),
}

const DEFAULT_POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/postgres";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Alloc,
    Teardown,
    Limit,
    Fleet,
    Failure,
}

#[derive(Debug, Clone, clap::Args)]
struct RunArgs {
    #[arg(long, value_delimiter = ',', default_value = "postgres,sqlite")]
    backends: Vec<Backend>,
    #[arg(long, value_delimiter = ',', default_value = "alloc,teardown,limit,fleet,failure")]
    scenarios: Vec<Scenario>,
    /// Concurrent clients of each warm-allocation point (and of the limit).
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    clients: Vec<usize>,
    #[arg(long, default_value_t = 2.0)]
    warmup_s: f64,
    /// Measured window of each allocation and limit point.
    #[arg(long, default_value_t = 10.0)]
    window_s: f64,
    /// With both `alloc` and `limit`: measure each point's Allocate, bare
    /// claim and bare RPC in this many rounds of `window_s / rounds` each,
    /// taken in turn, so that the ratio's two sides see the same minutes of a
    /// machine whose speed drifts (the store cycle still runs last).
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Hosts (real HostAgents, instant runtime) for allocation and teardown.
    #[arg(long, default_value_t = 32)]
    hosts: usize,
    /// Boxes per host. 32 × 12 leaves room for 64 clients that each hold up
    /// to `reports_in_flight` + 1 boxes and the boxes being recycled (with 8,
    /// the pool ran dry now and then at 64 clients and 2 users each).
    #[arg(long, default_value_t = 12)]
    capacity: u32,
    #[arg(long, default_value_t = 200)]
    teardown_iterations: usize,
    /// Finished boxes (DEAD) and sessions (ENDED) written to the database
    /// before the allocation points, as a system that has been running holds
    /// (nothing is deleted). 0: start from an empty history.
    #[arg(long, default_value_t = 20_000)]
    history: usize,
    #[arg(long, default_value_t = 15_000)]
    fleet_hosts: usize,
    /// Hosts per `loadgen hosts` process (each host is one connection, one file).
    #[arg(long, default_value_t = 5_000)]
    fleet_per_process: usize,
    #[arg(long, default_value_t = 5_000)]
    fleet_heartbeat_ms: u64,
    #[arg(long, default_value_t = 15.0)]
    fleet_cpu_window_s: f64,
    /// Slots of each fleet host (0: lean hosts without boxes). With slots the
    /// server fills them (each host answers its spawns at once) before the
    /// heartbeat window, which then holds the housekeeping of a fleet with
    /// boxes; the no-room Allocates are skipped.
    #[arg(long, default_value_t = 0)]
    fleet_capacity: u32,
    #[arg(long, default_value_t = 64)]
    push_concurrency: usize,
    /// DrainHost is sent to this many of the fleet's hosts (0: all). Each DrainHost lists every host
    /// (see BENCHMARKS.md), so all 15,000 take long.
    #[arg(long, default_value_t = 1_000)]
    push_limit: usize,
    /// Allocates timed one by one while the fleet has no room (its hosts have no slots).
    #[arg(long, default_value_t = 200)]
    full_fleet_allocates: usize,
    #[arg(long, default_value_t = 5)]
    failure_hosts: usize,
    #[arg(long, default_value_t = 1_000)]
    failure_heartbeat_ms: u64,
    /// Write each ReportDisconnect's session end alone, in the server and in
    /// the store cycle (`allocation.group_disconnect_reports = false`): the
    /// "before" of the group commit, for same-day comparisons.
    #[arg(long)]
    separate_disconnects: bool,
    /// How many group commits of ReportDisconnects the server and the store
    /// cycle write at once (`allocation.disconnect_writers`).
    #[arg(long, default_value_t = switchboard::config::AllocationConfig::default().disconnect_writers)]
    disconnect_writers: usize,
    /// Write each Allocate's claim alone, in the server and in the store
    /// cycle (`allocation.group_claims = false`): the "before" of its group
    /// commit, for same-day comparisons with one binary.
    #[arg(long)]
    separate_claims: bool,
    /// How many group commits of claims the server and the store cycle
    /// write at once (`allocation.claim_writers`).
    #[arg(long, default_value_t = switchboard::config::AllocationConfig::default().claim_writers)]
    claim_writers: usize,
    /// How long the server and the store cycle wait to batch spawn and
    /// teardown confirmations (`allocation.bookkeeping_linger_ms`).
    #[arg(long, default_value_t = switchboard::config::AllocationConfig::default().bookkeeping_linger_ms)]
    bookkeeping_linger_ms: u64,
    /// With `limit`: also time the textbook claim (any WAITING box, no host
    /// ranking) beside the bare claim, in the same rounds. Not part of the
    /// ratio: it shows what one claim commit costs on this database whatever
    /// the choice of box, which bounds allocations per second.
    #[arg(long)]
    minimal_claim: bool,
    /// The server's PostgreSQL pool (`database.max_connections`), also the
    /// store cycle's.
    #[arg(long, default_value_t = switchboard::config::DatabaseConfig::default().max_connections)]
    max_connections: u32,
    /// The server's maintenance pass (`hosts.maintenance_interval_ms`): the
    /// sweeper, and the refresh of the host ranks that claims walk.
    #[arg(long, default_value_t = switchboard::config::HostsConfig::default().maintenance_interval_ms)]
    maintenance_interval_ms: u64,
    /// The allocation loops' client sends its box's ReportDisconnect itself
    /// and waits for it before allocating again (runs A–M), instead of the box
    /// reporting on its own connection as in the product.
    #[arg(long)]
    client_waits_for_disconnect: bool,
    /// Users each allocation loop's client allocates as, in turn. Above
    /// `reports_in_flight`, a user allocates again only once its previous
    /// session's end is written (runs Q–Z used 2 and 2: a user's Allocate
    /// raced its own last session's end).
    #[arg(long, default_value_t = 8)]
    users_per_client: usize,
    /// Reports of a client's boxes in flight before it awaits the oldest. A
    /// client holds up to one box more than this (and the boxes being
    /// recycled): keep the clients' boxes within hosts × capacity, or the
    /// pool runs dry. 1 (with one user): each Allocate after the first waits
    /// for the previous report (runs N–Q).
    #[arg(long, default_value_t = 2)]
    reports_in_flight: usize,
    /// Allocates per second offered in total, spread evenly over the
    /// clients (each on its own schedule; a call's latency counts from its
    /// scheduled start). Unset: every client calls again as soon as it has
    /// its answer (closed loop, the machine saturated).
    #[arg(long)]
    rate: Option<f64>,
    #[arg(long, env = "SWITCHBOARD_TEST_POSTGRES_URL", default_value = DEFAULT_POSTGRES)]
    postgres_url: String,
    #[arg(long, default_value = "target/loadgen")]
    out: PathBuf,
}

impl RunArgs {
    fn server_settings(&self) -> server::ServerSettings {
        server::ServerSettings {
            separate_disconnects: self.separate_disconnects,
            writers: self.disconnect_writers,
            separate_claims: self.separate_claims,
            claim_writers: self.claim_writers,
            bookkeeping_linger_ms: self.bookkeeping_linger_ms,
            max_connections: self.max_connections,
            maintenance_interval_ms: self.maintenance_interval_ms,
        }
    }

    fn disconnect_model(&self) -> scenarios::DisconnectModel {
        if self.client_waits_for_disconnect {
            scenarios::DisconnectModel::ClientWaits
        } else {
            scenarios::DisconnectModel::FromTheBox {
                users: self.users_per_client.max(1),
                in_flight: self.reports_in_flight.max(1),
            }
        }
    }

    fn smoke(out: PathBuf, postgres_url: String) -> RunArgs {
        RunArgs {
            backends: vec![Backend::Postgres, Backend::Sqlite],
            scenarios: vec![Scenario::Alloc, Scenario::Teardown, Scenario::Limit, Scenario::Fleet, Scenario::Failure],
            clients: vec![4],
            warmup_s: 0.3,
            window_s: 1.5,
            rounds: 1,
            hosts: 4,
            capacity: 6,
            teardown_iterations: 10,
            history: 1_000,
            fleet_hosts: 100,
            fleet_per_process: 100,
            fleet_heartbeat_ms: 500,
            fleet_cpu_window_s: 1.0,
            fleet_capacity: 0,
            push_concurrency: 16,
            push_limit: 0,
            full_fleet_allocates: 20,
            failure_hosts: 2,
            failure_heartbeat_ms: 200,
            minimal_claim: true,
            separate_disconnects: false,
            disconnect_writers: switchboard::config::AllocationConfig::default().disconnect_writers,
            separate_claims: false,
            claim_writers: switchboard::config::AllocationConfig::default().claim_writers,
            bookkeeping_linger_ms: switchboard::config::AllocationConfig::default().bookkeeping_linger_ms,
            max_connections: switchboard::config::DatabaseConfig::default().max_connections,
            maintenance_interval_ms: switchboard::config::HostsConfig::default().maintenance_interval_ms,
            client_waits_for_disconnect: false,
            users_per_client: 8,
            reports_in_flight: 2,
            rate: None,
            postgres_url,
            out,
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        match cli.command {
            Cmd::Run(args) => run(*args, command_line()).await,
            Cmd::Smoke { out, postgres_url } => run(RunArgs::smoke(out, postgres_url), command_line()).await,
            Cmd::Serve(args) => server::serve(args).await,
            Cmd::Hosts(args) => lean::run_hosts(args).await,
        }
    })
}

fn command_line() -> String {
    let mut args: Vec<String> = std::env::args().collect();
    if let Some(first) = args.first_mut() {
        *first = "loadgen".into();
    }
    args.join(" ")
}

async fn run(args: RunArgs, command: String) -> anyhow::Result<()> {
    let machine = Machine::detect();
    if machine.profile == "debug" {
        eprintln!(
            "loadgen: a debug build; figures of a debug build are not comparable (cargo build --release -p loadgen)"
        );
    }
    let mut report = RunReport {
        started_at: chrono::Utc::now().format("%Y-%m-%d %H:%M:%S UTC").to_string(),
        command,
        disconnect_model: args.disconnect_model(),
        offered_rate: args.rate,
        machine,
        backends: Vec::new(),
    };
    let progress = Progress::start();
    for backend in args.backends.clone() {
        let mut backend_report = BackendReport::new(backend);
        if let Err(error) = run_backend(&args, backend, &mut backend_report, &progress).await {
            progress.finish_line();
            eprintln!("loadgen: {backend}: {error:#}");
            backend_report.errors.push(format!("{error:#}"));
        }
        backend_report.compute_ratios();
        report.backends.push(backend_report);
        write_reports(&args.out, &report)?;
    }
    let markdown = report::markdown(&report);
    println!("{markdown}");
    eprintln!("loadgen: reports in {}", args.out.display());
    Ok(())
}

fn write_reports(out: &std::path::Path, report: &RunReport) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(out.join("report.json"), serde_json::to_string_pretty(report)?)?;
    std::fs::write(out.join("report.md"), report::markdown(report))?;
    Ok(())
}

async fn run_backend(
    args: &RunArgs,
    backend: Backend,
    report: &mut BackendReport,
    progress: &Progress,
) -> anyhow::Result<()> {
    let secret = format!("loadgen-{}", uuid::Uuid::new_v4().simple());
    let wants = |scenario| args.scenarios.contains(&scenario);
    let max_clients = args.clients.iter().copied().max().unwrap_or(1).max(1);

    if wants(Scenario::Alloc) || wants(Scenario::Teardown) || wants(Scenario::Limit) {
        let db = TempDb::create(backend, &args.postgres_url).await?;
        let outcome = allocation_scenarios(args, backend, &db, &secret, max_clients, report, progress).await;
        db.drop_now().await;
        outcome?;
    }
    if wants(Scenario::Fleet) {
        let db = TempDb::create(backend, &args.postgres_url).await?;
        let outcome = async {
            let server =
                ServerProcess::start(db.url(), &secret, args.fleet_heartbeat_ms, 1, args.server_settings()).await?;
            let settings = FleetSettings {
                hosts: args.fleet_hosts,
                per_process: args.fleet_per_process,
                heartbeat_ms: args.fleet_heartbeat_ms,
                cpu_window: Duration::from_secs_f64(args.fleet_cpu_window_s),
                capacity: args.fleet_capacity,
                push_concurrency: args.push_concurrency,
                push_limit: args.push_limit,
                full_fleet_allocates: args.full_fleet_allocates,
            };
            let fleet = scenarios::fleet(&server.info, &secret, &settings, progress).await;
            server.stop().await;
            report.fleet = Some(fleet?);
            anyhow::Ok(())
        }
        .await;
        db.drop_now().await;
        outcome?;
    }
    if wants(Scenario::Failure) {
        let db = TempDb::create(backend, &args.postgres_url).await?;
        let outcome = async {
            let server =
                ServerProcess::start(db.url(), &secret, args.failure_heartbeat_ms, 1, args.server_settings()).await?;
            let failure = scenarios::failure_detection(
                &server.info,
                &secret,
                args.failure_hosts,
                args.failure_heartbeat_ms,
                progress,
            )
            .await;
            server.stop().await;
            report.failure = Some(failure?);
            anyhow::Ok(())
        }
        .await;
        db.drop_now().await;
        outcome?;
    }
    Ok(())
}

async fn allocation_scenarios(
    args: &RunArgs,
    backend: Backend,
    db: &TempDb,
    secret: &str,
    max_clients: usize,
    report: &mut BackendReport,
    progress: &Progress,
) -> anyhow::Result<()> {
    let wants = |scenario| args.scenarios.contains(&scenario);
    let users = max_clients * args.disconnect_model().users_per_client();
    let server = ServerProcess::start(db.url(), secret, 5_000, users, args.server_settings()).await?;
    let observatory = runtime::Observatory::new();
    let outcome = async {
        let agents = scenarios::start_agents(&server.info, secret, args.hosts, args.capacity, &observatory).await?;
        let boxes = args.hosts * args.capacity as usize;
        report.pool = Some(format!(
            "{} hosts (real HostAgents, instant runtime) × capacity {} = {boxes} warm boxes; server in a child process.",
            args.hosts, args.capacity
        ));
        let mut admin = scenarios::admin_client(scenarios::channel(&server.info.endpoint).await?, &server.info)?;
        let warm_timeout = Duration::from_secs(60);
        scenarios::wait_warm(&mut admin, boxes, warm_timeout).await?;
        if args.history > 0 {
            scenarios::seed_history(backend, db.url(), args.history).await?;
            report.pool = report.pool.take().map(|pool| {
                format!("{pool} History before the first point: {} DEAD boxes, each with its ENDED session.", args.history)
            });
        }
        let window = Duration::from_secs_f64(args.window_s);
        let warmup = Duration::from_secs_f64(args.warmup_s);
        // Rounds of Allocate, bare claim and bare RPC in turn: the bare claim
        // puts every box back, so the server's pool is as it was.
        let interleaved = args.rounds > 1 && wants(Scenario::Alloc) && wants(Scenario::Limit);
        if wants(Scenario::Alloc) {
            let rounds = if interleaved { args.rounds } else { 1 };
            let round_window = window / rounds as u32;
            for &clients in &args.clients {
                let (mut allocation, mut claim, mut minimal, mut rpc) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
                for _ in 0..rounds {
                    scenarios::wait_warm(&mut admin, boxes, warm_timeout).await?;
                    scenarios::analyze(backend, db.url()).await?;
                    allocation.push(
                        scenarios::warm_allocation(
                            &server.info,
                            &observatory,
                            clients,
                            (warmup, round_window),
                            args.disconnect_model(),
                            args.rate,
                            progress,
                        )
                        .await?,
                    );
                    if interleaved {
                        scenarios::wait_warm(&mut admin, boxes, warm_timeout).await?;
                        claim.push(
                            scenarios::bare_claim(backend, db.url(), ClaimSql::Store, clients, round_window, progress)
                                .await?,
                        );
                        rpc.push(scenarios::bare_rpc(&server.info, clients, round_window, progress).await?);
                        if args.minimal_claim {
                            scenarios::wait_warm(&mut admin, boxes, warm_timeout).await?;
                            minimal.push(
                                scenarios::bare_claim(backend, db.url(), ClaimSql::Minimal, clients, round_window, progress)
                                    .await?,
                            );
                        }
                    }
                }
                report.allocation.extend(scenarios::AllocPoint::merge(allocation));
                report.bare_claim.extend(scenarios::LimitPoint::merge(claim));
                report.bare_rpc.extend(scenarios::LimitPoint::merge(rpc));
                report.minimal_claim.extend(scenarios::LimitPoint::merge(minimal));
            }
        }
        if wants(Scenario::Teardown) {
            scenarios::wait_warm(&mut admin, boxes, warm_timeout).await?;
            report.teardown =
                Some(scenarios::teardown(&server.info, &observatory, args.teardown_iterations, progress).await?);
        }
        if wants(Scenario::Limit) {
            // The store cycle reads the warm boxes' tokens once, so every box
            // must be warm first: a replacement still spawning after the
            // allocation points would be claimed later without its token.
            scenarios::wait_warm(&mut admin, boxes, warm_timeout).await?;
            let cycle = store_cycle::StoreCycle::prepare(backend, db.url(), args.server_settings()).await?;
            for &clients in &args.clients {
                scenarios::wait_warm(&mut admin, boxes, warm_timeout).await?;
                scenarios::analyze(backend, db.url()).await?;
                if !interleaved {
                    report.bare_claim.push(
                        scenarios::bare_claim(backend, db.url(), ClaimSql::Store, clients, window, progress).await?,
                    );
                    report.bare_rpc.push(scenarios::bare_rpc(&server.info, clients, window, progress).await?);
                    if args.minimal_claim {
                        scenarios::wait_warm(&mut admin, boxes, warm_timeout).await?;
                        report.minimal_claim.push(
                            scenarios::bare_claim(backend, db.url(), ClaimSql::Minimal, clients, window, progress)
                                .await?,
                        );
                    }
                }
                report.store_cycle.push(cycle.run(clients, (warmup, window), args.disconnect_model(), progress).await?);
            }
        }
        for agent in &agents {
            agent.kill();
        }
        anyhow::Ok(())
    }
    .await;
    server.stop().await;
    outcome
}
