//! The run's report: JSON (everything) and Markdown (the tables of BENCHMARKS.md).

use std::fmt::Write as _;

use serde::Serialize;

use crate::{
    measure::{Machine, Percentiles},
    scenarios::{AllocPoint, DisconnectModel, Failure, Fleet, LimitPoint, Teardown},
    server::Backend,
};

#[derive(Debug, Clone, Serialize)]
pub(crate) struct RunReport {
    pub(crate) started_at: String,
    pub(crate) command: String,
    /// Who sends ReportDisconnect in the allocation loops, and who waits.
    pub(crate) disconnect_model: DisconnectModel,
    /// Allocates per second offered in total (`--rate`); None: closed loop.
    pub(crate) offered_rate: Option<f64>,
    pub(crate) machine: Machine,
    pub(crate) backends: Vec<BackendReport>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct BackendReport {
    pub(crate) backend: Backend,
    pub(crate) pool: Option<String>,
    pub(crate) allocation: Vec<AllocPoint>,
    pub(crate) teardown: Option<Teardown>,
    pub(crate) bare_claim: Vec<LimitPoint>,
    pub(crate) bare_rpc: Vec<LimitPoint>,
    /// The textbook claim (`--minimal-claim`): not the limit, but what one
    /// claim commit costs on this database with the cheapest choice of box.
    pub(crate) minimal_claim: Vec<LimitPoint>,
    /// The allocation cycle's store calls alone (`store_cycle.rs`): not part
    /// of the limit, but what splits the cost ratio into the SQL's part and
    /// the server's.
    pub(crate) store_cycle: Vec<LimitPoint>,
    pub(crate) ratios: Vec<Ratio>,
    pub(crate) fleet: Option<Fleet>,
    pub(crate) failure: Option<Failure>,
    pub(crate) errors: Vec<String>,
}

/// Allocate against the limit at one concurrency.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Ratio {
    pub(crate) clients: usize,
    /// Allocate p50 / (bare claim p50 + bare RPC p50).
    pub(crate) latency_p50: f64,
    /// Limit throughput / Allocate throughput, where the limit is 1 / (1/claims per s + 1/RPCs per s).
    pub(crate) cost_per_allocation: f64,
    /// The cost ratio's first factor, the SQL: bare claims per s / store cycles per s.
    pub(crate) store_cycle_vs_claim: Option<f64>,
    /// Its second factor, the server: 1 / (1/store cycles per s + 1/RPCs per s) / Allocate throughput.
    pub(crate) allocate_vs_store_cycle: Option<f64>,
}

impl BackendReport {
    pub(crate) fn new(backend: Backend) -> Self {
        BackendReport {
            backend,
            pool: None,
            allocation: Vec::new(),
            teardown: None,
            bare_claim: Vec::new(),
            bare_rpc: Vec::new(),
            minimal_claim: Vec::new(),
            store_cycle: Vec::new(),
            ratios: Vec::new(),
            fleet: None,
            failure: None,
            errors: Vec::new(),
        }
    }

    pub(crate) fn compute_ratios(&mut self) {
        self.ratios.clear();
        for point in &self.allocation {
            let claim = self.bare_claim.iter().find(|limit| limit.clients == point.clients);
            let rpc = self.bare_rpc.iter().find(|limit| limit.clients == point.clients);
            let (Some(claim), Some(rpc)) = (claim, rpc) else { continue };
            let floor = claim.latency.p50_ms + rpc.latency.p50_ms;
            let limit_rate = serial_rate(claim.per_s, rpc.per_s);
            let cycle = self.store_cycle.iter().find(|limit| limit.clients == point.clients && limit.per_s > 0.0);
            self.ratios.push(Ratio {
                clients: point.clients,
                latency_p50: if floor > 0.0 { point.allocate.p50_ms / floor } else { 0.0 },
                cost_per_allocation: if point.allocations_per_s > 0.0 {
                    limit_rate / point.allocations_per_s
                } else {
                    0.0
                },
                store_cycle_vs_claim: cycle.map(|cycle| claim.per_s / cycle.per_s),
                allocate_vs_store_cycle: cycle
                    .filter(|_| point.allocations_per_s > 0.0)
                    .map(|cycle| serial_rate(cycle.per_s, rpc.per_s) / point.allocations_per_s),
            });
        }
    }
}

/// The rate of two steps done one after the other: 1 / (1/a + 1/b).
fn serial_rate(a_per_s: f64, b_per_s: f64) -> f64 {
    if a_per_s > 0.0 && b_per_s > 0.0 { 1.0 / (1.0 / a_per_s + 1.0 / b_per_s) } else { 0.0 }
}

fn p(percentiles: &Percentiles) -> String {
    format!(
        "{:.2} / {:.2} / {:.2} / {:.2}",
        percentiles.p50_ms, percentiles.p90_ms, percentiles.p99_ms, percentiles.max_ms
    )
}

pub(crate) fn markdown(report: &RunReport) -> String {
    let mut out = String::new();
    let m = &report.machine;
    let _ = writeln!(out, "# loadgen run {}\n", report.started_at);
    let _ = writeln!(out, "`{}`\n", report.command);
    let _ = writeln!(
        out,
        "Machine: {} × {}, {:.1} GiB, Linux {}; loadgen built `{}`.\n",
        m.cpus, m.cpu_model, m.memory_gib, m.kernel, m.profile
    );
    for backend in &report.backends {
        let _ = writeln!(out, "## {}\n", backend.backend);
        if let Some(pool) = &backend.pool {
            let _ = writeln!(out, "{pool}\n");
        }
        if !backend.allocation.is_empty() {
            let returned = match report.disconnect_model {
                DisconnectModel::FromTheBox { users, in_flight } => format!(
                    "the box's ReportDisconnect returns the box while the client allocates again, as {users} \
                     user(s) in turn with up to {in_flight} report(s) in flight"
                ),
                DisconnectModel::ClientWaits => {
                    "then ReportDisconnect returns the box, the client waiting for it".into()
                }
            };
            let paced = report.offered_rate.map_or_else(String::new, |rate| {
                format!("; paced at {rate:.0} Allocates/s offered in total, latency from each call's scheduled start")
            });
            let _ = writeln!(out, "### Warm allocation (Allocate; {returned}{paced})\n");
            let _ = writeln!(
                out,
                "| clients | allocations/s | Allocate p50 / p90 / p99 / max (ms) | ReportDisconnect p50 / p90 / p99 / max (ms) | CPU, cores: server / database / loadgen / machine | CPU per allocation, ms: server / database / loadgen | errors |"
            );
            let _ = writeln!(out, "|---:|---:|---|---|---|---|---|");
            for point in &backend.allocation {
                let _ = writeln!(
                    out,
                    "| {} | {:.0} | {} | {} | {:.2} / {:.2} / {:.2} / {:.2} | {:.3} / {:.3} / {:.3} | {} |",
                    point.clients,
                    point.allocations_per_s,
                    p(&point.allocate),
                    p(&point.report_disconnect),
                    point.cpu.server_cores,
                    point.cpu.database_cores,
                    point.cpu.loadgen_cores,
                    point.cpu.machine_busy_cores,
                    per_allocation_ms(point.cpu.server_cores, point.allocations_per_s),
                    per_allocation_ms(point.cpu.database_cores, point.allocations_per_s),
                    per_allocation_ms(point.cpu.loadgen_cores, point.allocations_per_s),
                    if point.errors.is_empty() { "none".into() } else { format!("{:?}", point.errors) }
                );
            }
            let _ = writeln!(out);
        }
        let phased: Vec<_> = backend
            .allocation
            .iter()
            .filter_map(|point| Some((point.clients, point.server_phases.as_ref()?)))
            .collect();
        if !phased.is_empty() {
            let _ = writeln!(
                out,
                "### Where Allocate's time goes on the server (its `/metrics` histograms over the window)\n\n\
                 Each cell: p50 / p99 / the slowest's bucket bound (mean), ms, percentiles interpolated \
                 inside the histogram's buckets. `claim` is \
                 the caller's wait (queued, then written); `claim batch` one store write of a batch; \
                 `handler` the whole handler after the policy (`auth`). The client's latency less \
                 `auth` and `handler` is transport and scheduling.\n"
            );
            let names: Vec<&str> = phased
                .first()
                .map(|(_, phases)| phases.phases.iter().map(|phase| phase.phase.as_str()).collect())
                .unwrap_or_default();
            let _ = writeln!(out, "| clients | {} | claims per batch |", names.join(" | "));
            let _ = writeln!(out, "|---:|{}---:|", "---|".repeat(names.len()));
            for (clients, phases) in phased {
                let cells: Vec<String> = names
                    .iter()
                    .map(|name| {
                        phases.phases.iter().find(|phase| phase.phase == *name && phase.count > 0).map_or_else(
                            || "none".to_owned(),
                            |phase| {
                                format!(
                                    "{:.2} / {:.2} / ≤{} ({:.2})",
                                    phase.p50_ms, phase.p99_ms, phase.max_bound_ms, phase.mean_ms
                                )
                            },
                        )
                    })
                    .collect();
                let _ = writeln!(out, "| {clients} | {} | {:.1} |", cells.join(" | "), phases.claims_per_batch);
            }
            let _ = writeln!(out);
        }
        if !backend.bare_claim.is_empty() || !backend.bare_rpc.is_empty() {
            let _ = writeln!(out, "### The limit (same machine, same run)\n");
            let _ = writeln!(out, "| what | clients | per s | p50 / p90 / p99 / max (ms) | errors |");
            let _ = writeln!(out, "|---|---:|---:|---|---:|");
            for (name, points) in [
                ("bare claim transaction", &backend.bare_claim),
                ("bare tonic unary", &backend.bare_rpc),
                ("(not the limit) the cycle's store calls, no gRPC", &backend.store_cycle),
                ("(not the limit) minimal claim: any WAITING box, no ranking", &backend.minimal_claim),
            ] {
                for point in points {
                    let _ = writeln!(
                        out,
                        "| {name} | {} | {:.0} | {} | {} |",
                        point.clients,
                        point.per_s,
                        p(&point.latency),
                        point.errors
                    );
                }
            }
            let _ = writeln!(out);
        }
        if !backend.ratios.is_empty() {
            let _ = writeln!(out, "### Allocate as a ratio to the limit (claim + RPC)\n");
            let _ = writeln!(
                out,
                "| clients | p50 latency ratio | cost per allocation ratio | of which: cycle's SQL ÷ bare claim | of which: Allocate ÷ (cycle's SQL + RPC) |"
            );
            let _ = writeln!(out, "|---:|---:|---:|---:|---:|");
            let factor = |value: Option<f64>| value.map_or_else(|| "-".to_owned(), |value| format!("{value:.2}×"));
            for ratio in &backend.ratios {
                let _ = writeln!(
                    out,
                    "| {} | {:.2}× | {:.2}× | {} | {} |",
                    ratio.clients,
                    ratio.latency_p50,
                    ratio.cost_per_allocation,
                    factor(ratio.store_cycle_vs_claim),
                    factor(ratio.allocate_vs_store_cycle)
                );
            }
            let _ = writeln!(out);
        }
        if let Some(t) = &backend.teardown {
            let _ = writeln!(out, "### Teardown ({} sessions one at a time, {} failed)\n", t.iterations, t.failures);
            let _ = writeln!(out, "| from ReportDisconnect sent to | p50 / p90 / p99 / max (ms) |");
            let _ = writeln!(out, "|---|---|");
            let _ = writeln!(out, "| its reply (RPC) | {} |", p(&t.report_disconnect_rpc));
            let _ = writeln!(out, "| teardown command at the host | {} |", p(&t.teardown_at_host));
            let _ = writeln!(out, "| replacement spawn command at the host | {} |", p(&t.replacement_spawn_at_host));
            let _ = writeln!(out, "| replacement WAITING in the store | {} |", p(&t.replacement_warm));
            let _ = writeln!(out, "| (one poll: admin ListMandelboxes round trip) | {} |", p(&t.poll_rpc));
            let _ = writeln!(out);
        }
        if let Some(f) = &backend.fleet {
            let _ = writeln!(out, "### Fleet size\n");
            let _ = writeln!(out, "| figure | value |");
            let _ = writeln!(out, "|---|---|");
            let _ = writeln!(
                out,
                "| hosts connected (own HTTP/2 connection each) | {} of {} in {} processes ({} failed) |",
                f.connected, f.requested_hosts, f.processes, f.failed
            );
            if let Some(error) = &f.first_error {
                let _ = writeln!(out, "| first connect error | {error} |");
            }
            let _ = writeln!(out, "| time to connect all | {:.1} s |", f.connect_all_s);
            if f.capacity > 0 {
                let _ = writeln!(
                    out,
                    "| slots filled with warm boxes, {} per host (each spawn answered at once) | {}, the last {:.1} s after the last host connected |",
                    f.capacity,
                    f.connected.saturating_mul(f.capacity as usize),
                    f.fill_all_s
                );
            }
            let _ = writeln!(
                out,
                "| server RSS before → after | {:.1} MiB → {:.1} MiB |",
                f.server_rss_before_kib as f64 / 1024.0,
                f.server_rss_after_kib as f64 / 1024.0
            );
            let _ = writeln!(out, "| server resident memory per host | {:.1} KiB |", f.server_kib_per_host);
            let _ = writeln!(
                out,
                "| heartbeats ({} ms interval) | {:.0}/s; server CPU {:.3} cores over {:.0} s |",
                f.heartbeat_interval_ms, f.heartbeats_per_s, f.heartbeat_server_cpu_cores, f.cpu_window_s
            );
            let _ = writeln!(
                out,
                "| PostgreSQL's processes meanwhile (heartbeat batches, maintenance pass) | {:.3} cores |",
                f.heartbeat_database_cpu_cores
            );
            let _ = writeln!(
                out,
                "| DrainHost to {} hosts, all acked | {:.2} s ({} RPC errors, {} acks seen by the hosts) |",
                f.pushed, f.push_all_s, f.push_rpc_errors, f.drain_acks
            );
            if f.full_fleet_allocate.count > 0 {
                let _ = writeln!(
                    out,
                    "| Allocate with no room anywhere, one at a time: p50 / p90 / p99 / max | {} ms ({} calls, each NO_CAPACITY) |",
                    p(&f.full_fleet_allocate),
                    f.full_fleet_allocate.count
                );
            }
            let _ = writeln!(
                out,
                "| load generator's host processes RSS | {:.1} MiB |",
                f.host_processes_rss_kib as f64 / 1024.0
            );
            let _ = writeln!(out);
        }
        if let Some(f) = &backend.failure {
            let _ = writeln!(
                out,
                "### Failure detection (heartbeat {} ms, {} missed, {} hosts each, {} timeouts)\n",
                f.heartbeat_interval_ms, f.missed_heartbeats, f.hosts, f.timeouts
            );
            let _ = writeln!(out, "| from → to | p50 / p90 / p99 / max (ms) |");
            let _ = writeln!(out, "|---|---|");
            let _ = writeln!(out, "| connection killed → DISCONNECTED | {} |", p(&f.dropped_stream));
            let _ = writeln!(out, "| last heartbeat → UNHEALTHY | {} |", p(&f.silent_since_last_heartbeat));
            let _ = writeln!(out, "| heartbeats stop → UNHEALTHY | {} |", p(&f.silent_since_silence));
            let _ = writeln!(out);
        }
        for error in &backend.errors {
            let _ = writeln!(out, "- error: {error}");
        }
    }
    out
}

/// Milliseconds of CPU per allocation from cores used at a rate.
fn per_allocation_ms(cores: f64, allocations_per_s: f64) -> f64 {
    if allocations_per_s > 0.0 { cores * 1000.0 / allocations_per_s } else { 0.0 }
}
