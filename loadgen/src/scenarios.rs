//! The scenarios: warm allocation, teardown, the limit (bare claim, bare RPC),
//! fleet size and failure detection.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use futures::StreamExt as _;
use hostagent_client::{AgentHandle, AgentOptions, HostAgent};
use serde::Serialize;
use sqlx::Row as _;
use switchboard::{auth::host_credential::HostCredentials, config::Secret};
use switchboard_proto::v1::{
    AllocateRequest, DrainHostRequest, EndSessionRequest, HostState, ListHostsRequest, ListMandelboxesRequest,
    MandelboxState, ReportDisconnectRequest, admin_service_client::AdminServiceClient,
    allocation_service_client::AllocationServiceClient, session_events_service_client::SessionEventsServiceClient,
};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    process::Command,
};
use tonic::{Request, Status, metadata::MetadataValue, transport::Channel};

use crate::{
    lean::{self, HostCounters, HostsReport, LeanOptions},
    measure::{CpuSample, CpuShares, Percentiles, Progress, rss_kib},
    runtime::{EventKind, InstantRuntime, Observatory},
    server::{Backend, REGION, ServerInfo},
    server_phases::{self, ServerPhases},
};

pub(crate) async fn channel(endpoint: &str) -> anyhow::Result<Channel> {
    Ok(tonic::transport::Endpoint::from_shared(endpoint.to_owned())?.connect().await?)
}

/// Adds `authorization: Bearer …` to every call.
#[derive(Clone)]
pub(crate) struct Bearer(MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request.metadata_mut().insert("authorization", self.0.clone());
        Ok(request)
    }
}

fn bearer(token: &str) -> anyhow::Result<Bearer> {
    Ok(Bearer(format!("Bearer {token}").parse()?))
}

fn allocate_request() -> AllocateRequest {
    AllocateRequest {
        regions: vec![REGION.into()],
        app: "chrome".into(),
        client_version: "1.0.0".into(),
        client_data_json: r#"{"timezone":"UTC"}"#.into(),
        config_encryption_token: "loadgen-config-token".into(),
    }
}

fn reason(status: &Status) -> String {
    switchboard::error::reason_of(status).map(str::to_owned).unwrap_or_else(|| format!("{:?}", status.code()))
}

// ----- hosts with real agents ----------------------------------------------

/// Real `HostAgent`s over real gRPC streams, each with an [`InstantRuntime`].
pub(crate) async fn start_agents(
    info: &ServerInfo,
    secret: &str,
    hosts: usize,
    capacity: u32,
    observatory: &Observatory,
) -> anyhow::Result<Vec<AgentHandle>> {
    let credentials = HostCredentials::new(Secret::new(secret.to_owned()));
    let mut handles = Vec::new();
    for index in 0..hosts {
        let host_id = format!("agent-{index}");
        let mut options =
            AgentOptions::new(info.endpoint.clone(), host_id.clone(), REGION, credentials.issue(&host_id));
        options.capacity = capacity;
        let runtime = InstantRuntime::new(&host_id, observatory.clone());
        handles.push(HostAgent::new(options, Arc::new(runtime)).spawn());
    }
    for handle in &handles {
        handle.wait_connected(1, Duration::from_secs(30)).await?;
    }
    Ok(handles)
}

/// Refreshes the planner's statistics of the server's database. The tables
/// of a fresh benchmark database start empty and grow by a row or two per
/// allocation; a long-running database has statistics (autovacuum analyzes
/// it), so each measured point starts from analyzed tables, as in production.
pub(crate) async fn analyze(backend: Backend, url: &str) -> anyhow::Result<()> {
    use sqlx::Connection as _;
    match backend {
        Backend::Postgres => {
            let mut conn = sqlx::PgConnection::connect(url).await?;
            sqlx::query("ANALYZE").execute(&mut conn).await?;
            conn.close().await?;
        }
        Backend::Sqlite => {
            let mut conn = sqlx::SqliteConnection::connect(url).await?;
            sqlx::query("ANALYZE").execute(&mut conn).await?;
            conn.close().await?;
        }
    }
    Ok(())
}

/// Waits until `count` boxes are WAITING (warm).
/// Writes `rows` finished boxes (DEAD, spread over the hosts) and their ENDED
/// sessions, as the history a running system accumulates. Without it the
/// first points run on a table of warm boxes only, whose statistics say every
/// box is WAITING, so PostgreSQL scans the whole table for a claim while each
/// cycle adds a box to it: an artefact of a fresh database, not the steady state.
pub(crate) async fn seed_history(backend: Backend, url: &str, rows: usize) -> anyhow::Result<()> {
    use sqlx::Connection as _;
    const USER: &str = "loadgen-history";
    let rows = i64::try_from(rows)?;
    match backend {
        Backend::Postgres => {
            let mut conn = sqlx::PgConnection::connect(url).await?;
            sqlx::query("INSERT INTO users (id, created_at) VALUES ($1, now()) ON CONFLICT (id) DO NOTHING")
                .bind(USER)
                .execute(&mut conn)
                .await?;
            sqlx::query(
                "WITH fleet AS (SELECT array_agg(id ORDER BY id) AS ids FROM hosts), \
                 boxes AS ( \
                     INSERT INTO mandelboxes (id, host_id, region, app, state, token_hash, ports, created_at, updated_at) \
                     SELECT gen_random_uuid(), fleet.ids[1 + g % cardinality(fleet.ids)], $2, 'chrome', 'DEAD', \
                            'history', '[]', now() - interval '1 day', now() - interval '1 day' \
                     FROM generate_series(1, $1) AS g, fleet RETURNING id, host_id, region, created_at) \
                 INSERT INTO sessions (id, user_id, state, app, client_version, requested_regions, region, \
                     mandelbox_id, host_id, end_reason, created_at, updated_at, ended_at) \
                 SELECT gen_random_uuid(), $3, 'ENDED', 'chrome', '3.0.0', jsonb_build_array(region), region, \
                     id, host_id, 'CLIENT_DISCONNECTED', created_at, created_at, created_at FROM boxes",
            )
            .bind(rows)
            .bind(REGION)
            .bind(USER)
            .execute(&mut conn)
            .await?;
            conn.close().await?;
        }
        Backend::Sqlite => {
            let mut conn = sqlx::SqliteConnection::connect(url).await?;
            let mut tx = conn.begin().await?;
            let day_ago = (chrono::Utc::now() - chrono::Duration::days(1)).timestamp_micros();
            sqlx::query("INSERT INTO users (id, created_at) VALUES (?1, ?2) ON CONFLICT (id) DO NOTHING")
                .bind(USER)
                .bind(day_ago)
                .execute(&mut *tx)
                .await?;
            // Ids in the store's text form (hyphenated UUIDs).
            sqlx::query(
                "INSERT INTO mandelboxes (id, host_id, region, app, state, token_hash, ports, created_at, updated_at) \
                 WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < ?1), \
                 ids AS (SELECT n, lower(hex(randomblob(16))) AS h FROM g), \
                 fleet AS (SELECT id, row_number() OVER (ORDER BY id) - 1 AS i, count(*) OVER () AS c FROM hosts) \
                 SELECT substr(h, 1, 8) || '-' || substr(h, 9, 4) || '-4' || substr(h, 14, 3) || '-8' || \
                        substr(h, 18, 3) || '-' || substr(h, 21, 12), \
                        fleet.id, ?2, 'chrome', 'DEAD', 'history', '[]', ?3, ?3 \
                 FROM ids JOIN fleet ON fleet.i = ids.n % fleet.c",
            )
            .bind(rows)
            .bind(REGION)
            .bind(day_ago)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO sessions (id, user_id, state, app, client_version, requested_regions, region, \
                     mandelbox_id, host_id, end_reason, created_at, updated_at, ended_at) \
                 SELECT substr(h, 1, 8) || '-' || substr(h, 9, 4) || '-4' || substr(h, 14, 3) || '-8' || \
                        substr(h, 18, 3) || '-' || substr(h, 21, 12), \
                        ?1, 'ENDED', 'chrome', '3.0.0', json_array(region), region, id, host_id, \
                        'CLIENT_DISCONNECTED', created_at, created_at, created_at \
                 FROM (SELECT lower(hex(randomblob(16))) AS h, * FROM mandelboxes WHERE token_hash = 'history')",
            )
            .bind(USER)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            conn.close().await?;
        }
    }
    Ok(())
}

pub(crate) async fn wait_warm(admin: &mut Admin, count: usize, timeout: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        let warm = admin
            .list_hosts(ListHostsRequest { region: String::new() })
            .await?
            .into_inner()
            .hosts
            .iter()
            .map(|host| host.warm_mandelboxes as usize)
            .sum::<usize>();
        if warm >= count {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            // Where the others are, for whoever reads the report.
            let boxes = admin.list_mandelboxes(ListMandelboxesRequest::default()).await?.into_inner().mandelboxes;
            let mut elsewhere: BTreeMap<String, usize> = BTreeMap::new();
            for mandelbox in boxes.iter().filter(|b| b.state != MandelboxState::Waiting as i32) {
                let state = MandelboxState::try_from(mandelbox.state).map_or("unknown", |state| state.as_str_name());
                let holder = if mandelbox.session_id.is_empty() { "no session" } else { "with a session" };
                *elsewhere.entry(format!("{state} {holder}")).or_default() += 1;
            }
            anyhow::bail!("only {warm} of {count} boxes warm after {timeout:?}; the others: {elsewhere:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) type Admin = AdminServiceClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

pub(crate) fn admin_client(channel: Channel, info: &ServerInfo) -> anyhow::Result<Admin> {
    Ok(AdminServiceClient::with_interceptor(channel, bearer(&info.admin_token)?))
}

// ----- 1. warm allocation ---------------------------------------------------

#[derive(Debug, Clone, Serialize)]
pub(crate) struct AllocPoint {
    pub(crate) clients: usize,
    pub(crate) seconds: f64,
    pub(crate) allocations: usize,
    pub(crate) allocations_per_s: f64,
    pub(crate) allocate: Percentiles,
    pub(crate) report_disconnect: Percentiles,
    pub(crate) errors: BTreeMap<String, u64>,
    /// CPU used during the window, in cores (1.0 = one core busy), by the
    /// server, the database, loadgen and the machine as a whole.
    pub(crate) cpu: CpuShares,
    /// The server's phase histograms over the window (None if it could not
    /// be read).
    pub(crate) server_phases: Option<ServerPhases>,
    /// The latencies behind `allocate` and `report_disconnect`, kept so that
    /// the rounds of an interleaved point can be merged.
    #[serde(skip)]
    samples: (Vec<Duration>, Vec<Duration>),
    /// The histograms behind `server_phases`, kept for the same reason.
    #[serde(skip)]
    phase_counts: Option<server_phases::Reading>,
}

impl AllocPoint {
    /// One point from the rounds of an interleaved measurement.
    pub(crate) fn merge(rounds: Vec<AllocPoint>) -> Option<AllocPoint> {
        let clients = rounds.first()?.clients;
        let seconds: f64 = rounds.iter().map(|round| round.seconds).sum();
        let cpu = CpuShares::weighted(&rounds.iter().map(|round| (round.cpu, round.seconds)).collect::<Vec<_>>());
        let (mut allocate, mut disconnect) = (Vec::new(), Vec::new());
        let mut errors: BTreeMap<String, u64> = BTreeMap::new();
        // Only if every round has them: a partial sum would pass for the whole.
        let mut phase_counts = Some(server_phases::Reading::default());
        for round in rounds {
            match (&mut phase_counts, &round.phase_counts) {
                (Some(sum), Some(counts)) => sum.add(counts),
                _ => phase_counts = None,
            }
            allocate.extend(round.samples.0);
            disconnect.extend(round.samples.1);
            for (key, value) in round.errors {
                *errors.entry(key).or_default() += value;
            }
        }
        Some(AllocPoint::of(clients, seconds, (allocate, disconnect), errors, cpu, phase_counts))
    }

    /// The point of `samples` (Allocate's latencies, ReportDisconnect's) over `seconds`.
    fn of(
        clients: usize,
        seconds: f64,
        (mut allocate, mut disconnect): (Vec<Duration>, Vec<Duration>),
        errors: BTreeMap<String, u64>,
        cpu: CpuShares,
        phase_counts: Option<server_phases::Reading>,
    ) -> AllocPoint {
        AllocPoint {
            clients,
            seconds,
            allocations: allocate.len(),
            allocations_per_s: allocate.len() as f64 / seconds,
            allocate: Percentiles::of(&mut allocate),
            report_disconnect: Percentiles::of(&mut disconnect),
            errors,
            cpu,
            server_phases: phase_counts.as_ref().map(server_phases::Reading::figures),
            samples: (allocate, disconnect),
            phase_counts,
        }
    }
}

/// Who sends a session's ReportDisconnect in the allocation loops, and
/// whether the next Allocate waits for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum DisconnectModel {
    /// As in the product (PRODUCT.md: the protocol server inside the
    /// mandelbox reports), on a connection of its own: the box reports as soon
    /// as Allocate has answered and the client allocates again meanwhile. A
    /// client allocates as `users` users in turn and has at most `in_flight`
    /// reports in flight (the oldest is awaited before another is sent), so
    /// its Allocates need not wait for the reports: in the product no client
    /// waits for another session's end. With `users` above `in_flight` a user
    /// allocates again only once its previous session's end is written, as a
    /// person does; with them equal (runs Q–Z: 2 and 2) a user's next
    /// Allocate raced the end of its session from two turns before, whose
    /// commit held the user's row, and about 1% of claims (run AA) waited
    /// for that commit and were written alone, at ~70 Allocates a second per
    /// user. `users = in_flight = 1` is runs N–Q's loop, where each Allocate
    /// after the first waited for the previous report.
    FromTheBox { users: usize, in_flight: usize },
    /// The client sends its box's report itself and waits for it before its
    /// next Allocate (runs A–M): two durable round trips in sequence per loop.
    ClientWaits,
}

impl DisconnectModel {
    /// The users each client allocates as, in turn.
    pub(crate) fn users_per_client(self) -> usize {
        match self {
            DisconnectModel::FromTheBox { users, .. } => users.max(1),
            DisconnectModel::ClientWaits => 1,
        }
    }

    /// The reports a client may have in flight before it awaits the oldest.
    pub(crate) fn reports_in_flight(self) -> usize {
        match self {
            DisconnectModel::FromTheBox { in_flight, .. } => in_flight.max(1),
            DisconnectModel::ClientWaits => 1,
        }
    }
}

/// One ReportDisconnect's outcome: its latency, or the reason it failed.
type ReportOutcome = Result<Duration, String>;

/// N clients, each: Allocate, then its box's ReportDisconnect with the box's
/// token (as the protocol server would), which returns the box; until the
/// window ends. `model` says who waits for the report.
pub(crate) async fn warm_allocation(
    info: &ServerInfo,
    observatory: &Observatory,
    clients: usize,
    (warmup, window): (Duration, Duration),
    model: DisconnectModel,
    rate: Option<f64>,
    progress: &Progress,
) -> anyhow::Result<AllocPoint> {
    progress.phase(format!("allocate x{clients}"));
    // Paced: each client starts its calls on a schedule of its own (the
    // clients' schedules staggered over one interval), and a call's latency
    // counts from its scheduled start, so a late call carries its wait (no
    // coordinated omission).
    let interval = rate.filter(|rate| *rate > 0.0).map(|rate| Duration::from_secs_f64(clients as f64 / rate));
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + window;
    let mut tasks = Vec::new();
    let users = model.users_per_client();
    let reports_in_flight = model.reports_in_flight();
    for index in 0..clients {
        let tokens =
            info.user_tokens.get(index * users..(index + 1) * users).context("more clients than user tokens")?.to_vec();
        let client_channel = channel(&info.endpoint).await?;
        // The box's own connection when it reports (the client's otherwise).
        let box_channel = match model {
            DisconnectModel::FromTheBox { .. } => channel(&info.endpoint).await?,
            DisconnectModel::ClientWaits => client_channel.clone(),
        };
        let observatory = observatory.clone();
        let progress = progress.clone();
        tasks.push(tokio::spawn(async move {
            // One client, its users in turn: one connection, a token each.
            let mut as_users = tokens
                .iter()
                .map(|token| Ok(AllocationServiceClient::with_interceptor(client_channel.clone(), bearer(token)?)))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let events = SessionEventsServiceClient::new(box_channel);
            let mut allocate = Vec::new();
            let mut disconnect = Vec::new();
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            // The boxes' reports still in flight (FromTheBox), oldest first,
            // and whether their Allocate was in the window.
            let mut in_flight: VecDeque<(tokio::task::JoinHandle<ReportOutcome>, bool)> = VecDeque::new();
            let mut turn = 0_usize;
            let mut scheduled = interval.map(|interval| start + interval.mul_f64(index as f64 / clients as f64));
            while Instant::now() < end {
                let allocation = &mut as_users[turn % users];
                turn += 1;
                let started = match (interval, scheduled.as_mut()) {
                    (Some(interval), Some(next)) => {
                        let at = *next;
                        // A call scheduled after the window is not made (it
                        // would be counted in a window it is not part of).
                        if at >= end {
                            break;
                        }
                        *next += interval;
                        tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
                        at
                    }
                    _ => Instant::now(),
                };
                let result = allocation.allocate(allocate_request()).await;
                let took = started.elapsed();
                let counted = started >= measure_from;
                let response = match result {
                    Ok(response) => response.into_inner(),
                    Err(status) => {
                        progress.error();
                        if counted {
                            *errors.entry(reason(&status)).or_default() += 1;
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        continue;
                    }
                };
                if response.mandelbox_id.is_empty() {
                    // No warm box (PENDING): give the session up, or it would
                    // take the next box that warms and hold it for good.
                    progress.error();
                    if counted {
                        *errors.entry("PENDING".into()).or_default() += 1;
                    }
                    let request = EndSessionRequest { session_id: response.session_id };
                    if let Err(status) = allocation.end_session(request).await {
                        *errors.entry(format!("end pending {}", reason(&status))).or_default() += 1;
                    }
                    continue;
                }
                if counted {
                    allocate.push(took);
                }
                progress.add(1);
                let Some(token) = observatory.token_of(&response.mandelbox_id) else {
                    *errors.entry("NO_DISCONNECT_TOKEN".into()).or_default() += 1;
                    continue;
                };
                let request = ReportDisconnectRequest { mandelbox_id: response.mandelbox_id, token };
                let report = report_disconnect(events.clone(), request);
                match model {
                    DisconnectModel::ClientWaits => record(report.await, counted, &mut disconnect, &mut errors),
                    DisconnectModel::FromTheBox { .. } => {
                        if in_flight.len() >= reports_in_flight
                            && let Some((oldest, was_counted)) = in_flight.pop_front()
                        {
                            let outcome = oldest.await.unwrap_or_else(|error| Err(error.to_string()));
                            record(outcome, was_counted, &mut disconnect, &mut errors);
                        }
                        in_flight.push_back((tokio::spawn(report), counted));
                    }
                }
            }
            for (last, was_counted) in in_flight {
                let outcome = last.await.unwrap_or_else(|error| Err(error.to_string()));
                record(outcome, was_counted, &mut disconnect, &mut errors);
            }
            anyhow::Ok((allocate, disconnect, errors))
        }));
    }
    tokio::time::sleep_until(tokio::time::Instant::from_std(measure_from)).await;
    let cpu_at_start = CpuSample::take(info.pid);
    let phases_at_start = server_phases::read(&info.endpoint, &info.admin_token).await;
    let mut allocate = Vec::new();
    let mut disconnect = Vec::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut cpu_at_end = None;
    let mut phases_at_end = None;
    for task in tasks {
        let (a, d, e) = task.await??;
        // The first client to finish ends the window (they all stop at `end`).
        if cpu_at_end.is_none() {
            cpu_at_end = Some(CpuSample::take(info.pid));
            phases_at_end = server_phases::read(&info.endpoint, &info.admin_token).await;
        }
        allocate.extend(a);
        disconnect.extend(d);
        for (key, value) in e {
            *errors.entry(key).or_default() += value;
        }
    }
    let seconds = window.as_secs_f64();
    let cpu = cpu_at_end.map(|at_end| cpu_at_start.shares_until(&at_end, seconds)).unwrap_or_default();
    let phase_counts = match (phases_at_start, phases_at_end) {
        (Some(start), Some(end)) => Some(start.until(&end)),
        _ => None,
    };
    progress.finish_line();
    Ok(AllocPoint::of(clients, seconds, (allocate, disconnect), errors, cpu, phase_counts))
}

/// Files one report's outcome: its latency if its Allocate was in the window.
fn record(outcome: ReportOutcome, counted: bool, latencies: &mut Vec<Duration>, errors: &mut BTreeMap<String, u64>) {
    match outcome {
        Ok(took) if counted => latencies.push(took),
        Ok(_) => {}
        Err(reason) => *errors.entry(format!("disconnect {reason}")).or_default() += 1,
    }
}

/// Sends one ReportDisconnect and times it.
async fn report_disconnect(
    mut events: SessionEventsServiceClient<Channel>,
    request: ReportDisconnectRequest,
) -> ReportOutcome {
    let started = Instant::now();
    match events.report_disconnect(request).await {
        Ok(_) => Ok(started.elapsed()),
        Err(status) => Err(reason(&status)),
    }
}

// ----- 2. teardown ------------------------------------------------------------

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Teardown {
    pub(crate) iterations: usize,
    pub(crate) failures: usize,
    /// ReportDisconnect RPC, as the protocol server sees it.
    pub(crate) report_disconnect_rpc: Percentiles,
    /// ReportDisconnect sent → the host's runtime is told to tear the box down.
    pub(crate) teardown_at_host: Percentiles,
    /// ReportDisconnect sent → the host is told to spawn the replacement.
    pub(crate) replacement_spawn_at_host: Percentiles,
    /// ReportDisconnect sent → the replacement is WAITING in the store (polled every 1 ms via the admin API).
    pub(crate) replacement_warm: Percentiles,
    /// One poll: the admin ListMandelboxes round trip (the resolution of the figure above).
    pub(crate) poll_rpc: Percentiles,
}

/// One session at a time (an otherwise idle server): allocate, report the
/// disconnect, and time what follows.
pub(crate) async fn teardown(
    info: &ServerInfo,
    observatory: &Observatory,
    iterations: usize,
    progress: &Progress,
) -> anyhow::Result<Teardown> {
    progress.phase("teardown");
    let channel = channel(&info.endpoint).await?;
    let token = info.user_tokens.first().context("no user token")?;
    let mut allocation = AllocationServiceClient::with_interceptor(channel.clone(), bearer(token)?);
    let mut events = SessionEventsServiceClient::new(channel.clone());
    let mut admin = admin_client(channel, info)?;
    let (mut rpc, mut at_host, mut spawn, mut warm) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut polls = Vec::new();
    let mut failures = 0;
    for _ in 0..iterations {
        let outcome: anyhow::Result<()> = async {
            let response = allocation.allocate(allocate_request()).await?.into_inner();
            let token = observatory.token_of(&response.mandelbox_id).context("no disconnect token")?;
            let mut receiver = observatory.subscribe();
            let sent = Instant::now();
            let request = ReportDisconnectRequest { mandelbox_id: response.mandelbox_id.clone(), token };
            events.report_disconnect(request).await?;
            rpc.push(sent.elapsed());
            let deadline = Duration::from_secs(10);
            let mut host = None;
            let replacement = tokio::time::timeout(deadline, async {
                loop {
                    let event = receiver.recv().await?;
                    match (event.kind, &host) {
                        (EventKind::Teardown, None) if event.mandelbox_id == response.mandelbox_id => {
                            at_host.push(event.at.duration_since(sent));
                            host = Some(event.host_id);
                        }
                        (EventKind::Spawn, Some(host)) if *host == event.host_id => {
                            spawn.push(event.at.duration_since(sent));
                            return anyhow::Ok((event.host_id, event.mandelbox_id));
                        }
                        _ => {}
                    }
                }
            })
            .await
            .context("no teardown/replacement within 10 s")??;
            let (host_id, mandelbox_id) = replacement;
            let filter =
                ListMandelboxesRequest { host_id, state: MandelboxState::Waiting as i32, include_finished: false };
            loop {
                let poll_started = Instant::now();
                let boxes = admin.list_mandelboxes(filter.clone()).await?.into_inner().mandelboxes;
                polls.push(poll_started.elapsed());
                if boxes.iter().any(|mandelbox| mandelbox.mandelbox_id == mandelbox_id) {
                    warm.push(sent.elapsed());
                    break;
                }
                if sent.elapsed() > deadline {
                    anyhow::bail!("replacement not warm within 10 s");
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Ok(())
        }
        .await;
        match outcome {
            Ok(()) => progress.add(1),
            Err(_) => {
                failures += 1;
                progress.error();
            }
        }
    }
    progress.finish_line();
    Ok(Teardown {
        iterations,
        failures,
        report_disconnect_rpc: Percentiles::of(&mut rpc),
        teardown_at_host: Percentiles::of(&mut at_host),
        replacement_spawn_at_host: Percentiles::of(&mut spawn),
        replacement_warm: Percentiles::of(&mut warm),
        poll_rpc: Percentiles::of(&mut polls),
    })
}

// ----- the limit ----------------------------------------------------------------

#[derive(Debug, Clone, Serialize)]
pub(crate) struct LimitPoint {
    pub(crate) clients: usize,
    pub(crate) operations: usize,
    pub(crate) per_s: f64,
    pub(crate) latency: Percentiles,
    pub(crate) errors: u64,
    /// The measured window and its latencies, kept so that the rounds of an
    /// interleaved point can be merged.
    #[serde(skip)]
    window: Duration,
    #[serde(skip)]
    samples: Vec<Duration>,
}

impl LimitPoint {
    /// One point from the rounds of an interleaved measurement.
    pub(crate) fn merge(rounds: Vec<LimitPoint>) -> Option<LimitPoint> {
        let clients = rounds.first()?.clients;
        let window: Duration = rounds.iter().map(|round| round.window).sum();
        let errors = rounds.iter().map(|round| round.errors).sum();
        let samples: Vec<Duration> = rounds.into_iter().flat_map(|round| round.samples).collect();
        Some(LimitPoint::of(clients, window, samples, errors))
    }

    /// The point of `samples` (one latency per operation) over `window`.
    fn of(clients: usize, window: Duration, mut samples: Vec<Duration>, errors: u64) -> LimitPoint {
        LimitPoint {
            clients,
            operations: samples.len(),
            per_s: samples.len() as f64 / window.as_secs_f64(),
            latency: Percentiles::of(&mut samples),
            errors,
            window,
            samples,
        }
    }
}

/// The PostgreSQL store's own claim statement (the same string the store runs).
const PG_CLAIM: &str = switchboard::store::POSTGRES_CLAIM_SQL;
const PG_RELEASE: &str = "UPDATE mandelboxes SET state = 'WAITING', session_id = NULL WHERE id = $1";

/// The SQLite store's own claim statement (the same string the store runs).
const SQLITE_CLAIM: &str = switchboard::store::SQLITE_CLAIM_SQL;
const SQLITE_RELEASE: &str = "UPDATE mandelboxes SET state = 'WAITING', session_id = NULL WHERE id = ?1";

/// The textbook claim the issue quotes for scale (`UPDATE … WHERE id =
/// (SELECT … FOR UPDATE SKIP LOCKED)`): any WAITING box of the app and region,
/// no host ranking. Not the limit (the store's claim is): it shows what a
/// claim of one commit costs on this machine's database with the cheapest
/// possible choice of box, which is what bounds allocations per second
/// whatever the choice.
const PG_MINIMAL_CLAIM: &str = "UPDATE mandelboxes SET state = 'RUNNING', session_id = $3, updated_at = $4 \
     WHERE id = (SELECT id FROM mandelboxes WHERE state = 'WAITING' AND region = $1 AND app = $2 \
                 LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING id";
/// SQLite's form of the textbook claim (one writer, so nothing to skip).
const SQLITE_MINIMAL_CLAIM: &str = "UPDATE mandelboxes SET state = 'RUNNING', session_id = ?3, updated_at = ?4 \
     WHERE id = (SELECT id FROM mandelboxes WHERE state = 'WAITING' AND region = ?1 AND app = ?2 LIMIT 1) \
     RETURNING id";

/// Which claim statement a bare claim transaction runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClaimSql {
    /// The store's own claim: the limit.
    Store,
    /// The textbook claim (`PG_MINIMAL_CLAIM`): a reference, not the limit.
    Minimal,
}

enum ClaimPool {
    Postgres(sqlx::PgPool),
    /// One writer connection, as the SQLite store has.
    Sqlite(sqlx::SqlitePool),
}

impl ClaimPool {
    async fn open(backend: Backend, url: &str, clients: usize) -> anyhow::Result<ClaimPool> {
        Ok(match backend {
            Backend::Postgres => ClaimPool::Postgres(
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(u32::try_from(clients).unwrap_or(16).max(1))
                    .connect(url)
                    .await?,
            ),
            Backend::Sqlite => {
                use std::str::FromStr as _;
                let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)?
                    .busy_timeout(Duration::from_secs(5))
                    .foreign_keys(true)
                    .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                    .synchronous(sqlx::sqlite::SqliteSynchronous::Normal);
                ClaimPool::Sqlite(
                    sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect_with(options).await?,
                )
            }
        })
    }

    /// One transaction: claim a WAITING box with `sql`, put it back (so the
    /// pool never runs dry), commit. Ok(false) when no box matched.
    async fn claim_once(&self, sql: ClaimSql) -> anyhow::Result<bool> {
        let regions = vec![REGION.to_owned()];
        let session = uuid::Uuid::new_v4();
        let at = chrono::Utc::now();
        match self {
            ClaimPool::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                let claim = match sql {
                    ClaimSql::Store => sqlx::query(PG_CLAIM)
                        .bind(&regions)
                        .bind("chrome")
                        .bind(Vec::<String>::new())
                        .bind(session)
                        .bind(at),
                    ClaimSql::Minimal => {
                        sqlx::query(PG_MINIMAL_CLAIM).bind(REGION).bind("chrome").bind(session).bind(at)
                    }
                };
                let row = claim.fetch_optional(&mut *tx).await?;
                let Some(row) = row else { return Ok(false) };
                let id: uuid::Uuid = row.try_get("id")?;
                sqlx::query(PG_RELEASE).bind(id).execute(&mut *tx).await?;
                tx.commit().await?;
                Ok(true)
            }
            ClaimPool::Sqlite(pool) => {
                let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
                let claim = match sql {
                    ClaimSql::Store => sqlx::query(SQLITE_CLAIM)
                        .bind(serde_json::to_string(&regions)?)
                        .bind("chrome")
                        .bind("[]")
                        .bind(session.to_string())
                        .bind(at.timestamp_micros()),
                    ClaimSql::Minimal => sqlx::query(SQLITE_MINIMAL_CLAIM)
                        .bind(REGION)
                        .bind("chrome")
                        .bind(session.to_string())
                        .bind(at.timestamp_micros()),
                };
                let row = claim.fetch_optional(&mut *tx).await?;
                let Some(row) = row else { return Ok(false) };
                let id: String = row.try_get("id")?;
                sqlx::query(SQLITE_RELEASE).bind(id).execute(&mut *tx).await?;
                tx.commit().await?;
                Ok(true)
            }
        }
    }
}

/// The bare claim transaction (`sql`) on the server's own database, no gRPC.
pub(crate) async fn bare_claim(
    backend: Backend,
    url: &str,
    sql: ClaimSql,
    clients: usize,
    window: Duration,
    progress: &Progress,
) -> anyhow::Result<LimitPoint> {
    let name = match sql {
        ClaimSql::Store => "bare claim",
        ClaimSql::Minimal => "minimal claim",
    };
    progress.phase(format!("{name} x{clients}"));
    let pool = Arc::new(ClaimPool::open(backend, url, clients).await?);
    let end = Instant::now() + window;
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let pool = pool.clone();
        let progress = progress.clone();
        tasks.push(tokio::spawn(async move {
            let (mut samples, mut errors) = (Vec::new(), 0_u64);
            while Instant::now() < end {
                let started = Instant::now();
                match pool.claim_once(sql).await {
                    Ok(true) => {
                        samples.push(started.elapsed());
                        progress.add(1);
                    }
                    _ => {
                        errors += 1;
                        progress.error();
                    }
                }
            }
            (samples, errors)
        }));
    }
    let point = collect_limit(tasks, clients, window).await?;
    match Arc::try_unwrap(pool) {
        Ok(ClaimPool::Postgres(pool)) => pool.close().await,
        Ok(ClaimPool::Sqlite(pool)) => pool.close().await,
        Err(_) => {}
    }
    progress.finish_line();
    Ok(point)
}

/// The bare tonic unary round trip: the same Allocate messages to a trivial
/// service in the server's process, no database, no authentication.
pub(crate) async fn bare_rpc(
    info: &ServerInfo,
    clients: usize,
    window: Duration,
    progress: &Progress,
) -> anyhow::Result<LimitPoint> {
    progress.phase(format!("bare rpc x{clients}"));
    let end = Instant::now() + window;
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let mut client = AllocationServiceClient::new(channel(&info.echo_endpoint).await?);
        let progress = progress.clone();
        tasks.push(tokio::spawn(async move {
            let (mut samples, mut errors) = (Vec::new(), 0_u64);
            while Instant::now() < end {
                let started = Instant::now();
                match client.allocate(allocate_request()).await {
                    Ok(_) => {
                        samples.push(started.elapsed());
                        progress.add(1);
                    }
                    Err(_) => {
                        errors += 1;
                        progress.error();
                    }
                }
            }
            (samples, errors)
        }));
    }
    let point = collect_limit(tasks, clients, window).await?;
    progress.finish_line();
    Ok(point)
}

pub(crate) async fn collect_limit(
    tasks: Vec<tokio::task::JoinHandle<(Vec<Duration>, u64)>>,
    clients: usize,
    window: Duration,
) -> anyhow::Result<LimitPoint> {
    let (mut samples, mut errors) = (Vec::new(), 0);
    for task in tasks {
        let (s, e) = task.await?;
        samples.extend(s);
        errors += e;
    }
    Ok(LimitPoint::of(clients, window, samples, errors))
}

// ----- 3. fleet size -----------------------------------------------------------------

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Fleet {
    pub(crate) requested_hosts: usize,
    pub(crate) processes: usize,
    pub(crate) connected: usize,
    pub(crate) failed: usize,
    pub(crate) first_error: Option<String>,
    pub(crate) connect_all_s: f64,
    /// Slots per host, and the time to fill them all after the last host
    /// connected (0 and 0 for lean hosts).
    pub(crate) capacity: u32,
    pub(crate) fill_all_s: f64,
    pub(crate) heartbeat_interval_ms: u64,
    pub(crate) server_rss_before_kib: u64,
    pub(crate) server_rss_after_kib: u64,
    pub(crate) server_kib_per_host: f64,
    pub(crate) cpu_window_s: f64,
    /// Server CPU while the fleet only heartbeats, in cores.
    pub(crate) heartbeat_server_cpu_cores: f64,
    /// PostgreSQL's processes meanwhile (the heartbeat batches and the
    /// maintenance pass at this fleet's size), in cores; with SQLite, which
    /// runs inside the server, what an idle local PostgreSQL did.
    pub(crate) heartbeat_database_cpu_cores: f64,
    pub(crate) heartbeats_per_s: f64,
    pub(crate) host_processes_rss_kib: u64,
    /// One DrainHost per host through the admin API (each waits for the host's ack).
    pub(crate) pushed: usize,
    pub(crate) push_all_s: f64,
    pub(crate) push_rpc_errors: usize,
    pub(crate) drain_acks: u64,
    /// Allocates, one at a time, while no host of the fleet has room (the
    /// fleet's hosts have no slots): each looks for a warm box, for room to
    /// spawn on demand, and for a box coming, then answers NO_CAPACITY (any
    /// other answer fails the run).
    pub(crate) full_fleet_allocate: Percentiles,
}

pub(crate) struct FleetSettings {
    pub(crate) hosts: usize,
    pub(crate) per_process: usize,
    pub(crate) heartbeat_ms: u64,
    pub(crate) cpu_window: Duration,
    /// Slots per host (0: lean hosts without boxes; see `fleet_capacity`).
    pub(crate) capacity: u32,
    pub(crate) push_concurrency: usize,
    /// DrainHost goes to this many hosts (0: all).
    pub(crate) push_limit: usize,
    /// Allocates timed while the connected fleet has no room.
    pub(crate) full_fleet_allocates: usize,
}

struct HostsChild {
    child: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    stdin: Option<tokio::process::ChildStdin>,
}

impl HostsChild {
    async fn report(&mut self) -> anyhow::Result<HostsReport> {
        if let Some(stdin) = &mut self.stdin {
            stdin.write_all(b"report\n").await?;
            stdin.flush().await?;
        }
        self.read().await
    }

    async fn read(&mut self) -> anyhow::Result<HostsReport> {
        let line = tokio::time::timeout(Duration::from_secs(600), self.lines.next_line())
            .await
            .context("`loadgen hosts` did not answer")??
            .context("`loadgen hosts` exited")?;
        Ok(serde_json::from_str(&line)?)
    }
}

pub(crate) async fn fleet(
    info: &ServerInfo,
    secret: &str,
    settings: &FleetSettings,
    progress: &Progress,
) -> anyhow::Result<Fleet> {
    progress.phase(format!("fleet: connecting {} hosts", settings.hosts));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let server_rss_before_kib = rss_kib(info.pid).unwrap_or(0);
    let exe = std::env::current_exe()?;
    let per_process = settings.per_process.max(1);
    let processes = settings.hosts.div_ceil(per_process);
    let started = Instant::now();
    let mut children = Vec::new();
    let mut remaining = settings.hosts;
    for index in 0..processes {
        let count = remaining.min(per_process);
        remaining -= count;
        let mut child = Command::new(&exe)
            .args(["hosts", "--endpoint", &info.endpoint, "--prefix", &format!("fleet{index}-")])
            .args(["--count", &count.to_string(), "--heartbeat-ms", &settings.heartbeat_ms.to_string()])
            .args(["--capacity", &settings.capacity.to_string()])
            .env("LOADGEN_HOST_SECRET", secret)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().context("no stdout")?;
        let stdin = child.stdin.take();
        children.push((count, HostsChild { child, lines: BufReader::new(stdout).lines(), stdin }));
    }
    let (mut connected, mut failed, mut first_error, mut ids) = (0, 0, None, Vec::new());
    for (index, (count, child)) in children.iter_mut().enumerate() {
        let report = child.read().await?;
        connected += report.connected;
        failed += report.failed;
        progress.add(report.connected as u64);
        if first_error.is_none() {
            first_error = report.first_error.clone();
        }
        ids.extend((0..*count).map(|host| format!("fleet{index}-{host}")));
    }
    let connect_all_s = started.elapsed().as_secs_f64();
    progress.finish_line();

    let filling = Instant::now();
    if settings.capacity > 0 {
        fill_fleet(&mut children, connected.saturating_mul(settings.capacity as usize), progress).await?;
    }
    let fill_all_s = filling.elapsed().as_secs_f64();
    progress.phase("fleet: heartbeating");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let server_rss_after_kib = rss_kib(info.pid).unwrap_or(0);
    let beats_before: u64 = report_all(&mut children).await?.iter().map(|r| r.heartbeats).sum();
    let cpu_before = CpuSample::take(info.pid);
    let window_started = Instant::now();
    tokio::time::sleep(settings.cpu_window).await;
    let cpu_after = CpuSample::take(info.pid);
    let cpu_window_s = window_started.elapsed().as_secs_f64();
    let cpu = cpu_before.shares_until(&cpu_after, cpu_window_s);
    let reports = report_all(&mut children).await?;
    let beats_after: u64 = reports.iter().map(|r| r.heartbeats).sum();
    let host_processes_rss_kib = reports.iter().map(|r| r.rss_kib).sum();
    progress.finish_line();

    // A fleet with slots has warm boxes: an Allocate would take one.
    let no_room_allocates = if settings.capacity > 0 { 0 } else { settings.full_fleet_allocates };
    let full_fleet_allocate = allocate_with_no_room(info, no_room_allocates, progress).await?;

    progress.phase("fleet: DrainHost to every host");
    let admin = admin_client(channel(&info.endpoint).await?, info)?;
    if settings.push_limit > 0 {
        ids.truncate(settings.push_limit);
    }
    let pushed = ids.len();
    let push_started = Instant::now();
    let results: Vec<bool> = futures::stream::iter(ids)
        .map(|host_id| {
            let mut admin = admin.clone();
            let progress = progress.clone();
            async move {
                let ok = admin.drain_host(DrainHostRequest { host_id }).await.is_ok();
                progress.add(1);
                ok
            }
        })
        .buffer_unordered(settings.push_concurrency.max(1))
        .collect()
        .await;
    let push_all_s = push_started.elapsed().as_secs_f64();
    let push_rpc_errors = results.iter().filter(|ok| !**ok).count();
    let drain_acks = report_all(&mut children).await?.iter().map(|r| r.drain_acks).sum();
    progress.finish_line();

    for (_, mut child) in children {
        drop(child.stdin.take());
        if tokio::time::timeout(Duration::from_secs(20), child.child.wait()).await.is_err() {
            let _ = child.child.kill().await;
        }
    }
    let per_host = if connected > 0 {
        server_rss_after_kib.saturating_sub(server_rss_before_kib) as f64 / connected as f64
    } else {
        0.0
    };
    Ok(Fleet {
        requested_hosts: settings.hosts,
        processes,
        connected,
        failed,
        first_error,
        connect_all_s,
        capacity: settings.capacity,
        fill_all_s,
        heartbeat_interval_ms: settings.heartbeat_ms,
        server_rss_before_kib,
        server_rss_after_kib,
        server_kib_per_host: per_host,
        cpu_window_s,
        heartbeat_server_cpu_cores: cpu.server_cores,
        heartbeat_database_cpu_cores: cpu.database_cores,
        heartbeats_per_s: beats_after.saturating_sub(beats_before) as f64 / cpu_window_s,
        host_processes_rss_kib,
        pushed,
        push_all_s,
        push_rpc_errors,
        drain_acks,
        full_fleet_allocate,
    })
}

/// `count` Allocates one after another while every connected host is
/// without room: the path of an Allocate in a dry spell on a full fleet,
/// whose cost must not grow with the fleet. Returns their latencies; an
/// answer other than NO_CAPACITY is an error.
async fn allocate_with_no_room(info: &ServerInfo, count: usize, progress: &Progress) -> anyhow::Result<Percentiles> {
    progress.phase(format!("fleet: {count} Allocates with no room anywhere"));
    let token = info.user_tokens.first().context("no user token")?;
    let mut allocation = AllocationServiceClient::with_interceptor(channel(&info.endpoint).await?, bearer(token)?);
    let mut latencies = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        let outcome = allocation.allocate(allocate_request()).await;
        latencies.push(started.elapsed());
        match outcome {
            Err(status) if reason(&status) == "NO_CAPACITY" => {}
            Err(status) => anyhow::bail!("Allocate with no room answered {}: {}", reason(&status), status.message()),
            Ok(response) => {
                anyhow::bail!("Allocate with no room was answered with session {}", response.into_inner().session_id)
            }
        }
        progress.add(1);
    }
    progress.finish_line();
    Ok(Percentiles::of(&mut latencies))
}

/// Waits until the fleet's hosts have received `spawns` commands (a lean host
/// answers each at once; the server writes the boxes WAITING in its next
/// bookkeeping batch, well inside the pause before the heartbeat window),
/// for at most 10 minutes.
async fn fill_fleet(children: &mut [(usize, HostsChild)], spawns: usize, progress: &Progress) -> anyhow::Result<()> {
    progress.phase(format!("fleet: filling {spawns} slots"));
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let answered: u64 = report_all(children).await?.iter().map(|r| r.commands).sum();
        progress.set(answered);
        if answered >= spawns as u64 {
            break;
        }
        if Instant::now() >= deadline {
            anyhow::bail!("the fleet's slots were not filled within 10 minutes ({answered} of {spawns} spawns)");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    progress.finish_line();
    Ok(())
}

async fn report_all(children: &mut [(usize, HostsChild)]) -> anyhow::Result<Vec<HostsReport>> {
    let mut reports = Vec::new();
    for (_, child) in children.iter_mut() {
        reports.push(child.report().await?);
    }
    Ok(reports)
}

// ----- 4. failure detection ---------------------------------------------------------

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Failure {
    pub(crate) heartbeat_interval_ms: u64,
    pub(crate) missed_heartbeats: u32,
    pub(crate) hosts: usize,
    /// Connection killed → host DISCONNECTED (admin ListHosts polled every 2 ms).
    pub(crate) dropped_stream: Percentiles,
    /// Host's last heartbeat → host UNHEALTHY.
    pub(crate) silent_since_last_heartbeat: Percentiles,
    /// Host stops heartbeating → host UNHEALTHY.
    pub(crate) silent_since_silence: Percentiles,
    pub(crate) timeouts: usize,
}

pub(crate) async fn failure_detection(
    info: &ServerInfo,
    secret: &str,
    hosts: usize,
    heartbeat_ms: u64,
    progress: &Progress,
) -> anyhow::Result<Failure> {
    progress.phase("failure detection");
    let credentials = HostCredentials::new(Secret::new(secret.to_owned()));
    let counters = Arc::new(HostCounters::default());
    let heartbeat = Duration::from_millis(heartbeat_ms);
    let connect = |id: String| {
        let options = LeanOptions {
            endpoint: info.endpoint.clone(),
            credential: credentials.issue(&id),
            host_id: id,
            region: REGION.into(),
            capacity: 0,
            heartbeat,
            phase: Duration::ZERO,
        };
        lean::connect(options, counters.clone())
    };
    let mut admin = admin_client(channel(&info.endpoint).await?, info)?;
    let mut timeouts = 0;
    let limit = heartbeat * 10 + Duration::from_secs(5);

    let mut dropped = Vec::new();
    for index in 0..hosts {
        let id = format!("drop-{index}");
        let host = connect(id.clone()).await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let killed = Instant::now();
        host.kill();
        let states = wait_states(&mut admin, &[id], HostState::Disconnected, Duration::from_millis(2), limit).await?;
        match states.values().next() {
            Some(at) => dropped.push(at.duration_since(killed)),
            None => timeouts += 1,
        }
        progress.add(1);
    }

    let mut silent_hosts = Vec::new();
    for index in 0..hosts {
        let id = format!("silent-{index}");
        silent_hosts.push((id.clone(), connect(id).await?));
    }
    tokio::time::sleep(heartbeat + Duration::from_millis(100)).await;
    let silenced = Instant::now();
    let mut last_beats = HashMap::new();
    for (id, host) in &silent_hosts {
        host.silent.store(true, std::sync::atomic::Ordering::Relaxed);
        let last = host.last_heartbeat.lock().map(|last| *last).unwrap_or(silenced);
        last_beats.insert(id.clone(), last);
    }
    let ids: Vec<String> = silent_hosts.iter().map(|(id, _)| id.clone()).collect();
    let states = wait_states(&mut admin, &ids, HostState::Unhealthy, Duration::from_millis(5), limit).await?;
    let (mut since_beat, mut since_silence) = (Vec::new(), Vec::new());
    for id in &ids {
        match (states.get(id), last_beats.get(id)) {
            (Some(at), Some(last)) => {
                since_beat.push(at.duration_since(*last));
                since_silence.push(at.duration_since(silenced));
            }
            _ => timeouts += 1,
        }
        progress.add(1);
    }
    drop(silent_hosts);
    progress.finish_line();
    Ok(Failure {
        heartbeat_interval_ms: heartbeat_ms,
        missed_heartbeats: 3,
        hosts,
        dropped_stream: Percentiles::of(&mut dropped),
        silent_since_last_heartbeat: Percentiles::of(&mut since_beat),
        silent_since_silence: Percentiles::of(&mut since_silence),
        timeouts,
    })
}

/// Polls ListHosts until each host is in `state`; returns when each got there.
async fn wait_states(
    admin: &mut Admin,
    ids: &[String],
    state: HostState,
    every: Duration,
    limit: Duration,
) -> anyhow::Result<HashMap<String, Instant>> {
    let started = Instant::now();
    let mut seen = HashMap::new();
    while seen.len() < ids.len() && started.elapsed() < limit {
        let hosts = admin.list_hosts(ListHostsRequest { region: String::new() }).await?.into_inner().hosts;
        let now = Instant::now();
        for host in hosts {
            if ids.contains(&host.host_id) && host.state == state as i32 {
                seen.entry(host.host_id).or_insert(now);
            }
        }
        tokio::time::sleep(every).await;
    }
    Ok(seen)
}
