//! Where an Allocate's time goes, by phase, and how long hosts take to
//! answer commands, served at `/metrics` in the Prometheus text format (admin
//! token, like the fleet page's API).
//!
//! A client sees one latency; these histograms split it on the server: the
//! access policy (token, registration, subscription), the checks before the
//! claim, the claim (queued for the writer, then written), and the host's
//! confirmation of the assignment. What the client sees beyond the handler
//! and the policy is transport: HTTP/2, protobuf, the runtime's queues.
//!
//! Recording is a few relaxed atomic adds (no lock, no allocation), cheap
//! enough for every call; buckets are fixed and finest around the latency
//! targets (2 ms and 10 ms), so a scraper can diff two readings and
//! interpolate percentiles of the window between them.

use switchboard_proto::v1::command;

use std::{
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// Bucket upper bounds in microseconds (the last bucket, `+Inf`, is implied):
/// from 5 µs (the policy and the checks take a few) to 30 s.
const BOUNDS_US: [u64; 41] = [
    5, 10, 25, 50, 100, 150, 200, 300, 400, 500, 600, 800, 1_000, 1_250, 1_500, 2_000, 2_500, 3_000, 4_000, 5_000,
    6_000, 7_000, 8_000, 9_000, 10_000, 12_000, 15_000, 20_000, 25_000, 30_000, 40_000, 50_000, 75_000, 100_000,
    250_000, 500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000, 30_000_000,
];

/// A latency histogram with fixed buckets.
pub struct LatencyHistogram {
    /// Observations per bucket (not cumulative); the last is `+Inf`.
    buckets: [AtomicU64; BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram { buckets: std::array::from_fn(|_| AtomicU64::new(0)), sum_us: AtomicU64::new(0) }
    }
}

impl LatencyHistogram {
    pub fn record(&self, elapsed: Duration) {
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let bucket = BOUNDS_US.partition_point(|bound| *bound < us);
        if let Some(count) = self.buckets.get(bucket) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Records the time since `started`.
    pub fn record_since(&self, started: Instant) {
        self.record(started.elapsed());
    }

    #[cfg(test)]
    fn count(&self) -> u64 {
        self.buckets.iter().map(|count| count.load(Ordering::Relaxed)).sum()
    }

    /// Appends the Prometheus histogram lines (`_bucket`, `_sum`, `_count`)
    /// of this histogram under `name` with the label `labels`
    /// (`key="value"`).
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0_u64;
        for (bound, count) in BOUNDS_US.iter().zip(&self.buckets) {
            cumulative += count.load(Ordering::Relaxed);
            let seconds = *bound as f64 / 1e6;
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{seconds}\"}} {cumulative}");
        }
        if let Some(last) = self.buckets.last() {
            cumulative += last.load(Ordering::Relaxed);
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
    }
}

/// Allocate's phases, in the order a call passes them.
#[derive(Default)]
pub struct AllocatePhases {
    /// The access policy: the token checked, the user registered (once), the
    /// subscription looked up (cached).
    pub auth: LatencyHistogram,
    /// The handler up to the claim: maintenance, the request's checks, the
    /// regions.
    pub checks: LatencyHistogram,
    /// The claim as its caller waits for it: queued for a writer, then
    /// written (in a group or alone).
    pub claim: LatencyHistogram,
    /// A claim the group gave back (its user's row held elsewhere, its user
    /// twice in the batch, a failed batch), written alone: that store call.
    pub claim_alone: LatencyHistogram,
    /// The assignment: Assign sent to the host and its confirmation back.
    pub assign: LatencyHistogram,
    /// The whole handler, policy excluded (a call that found no warm box
    /// included).
    pub handler: LatencyHistogram,
}

/// The claim writer's side of Allocate's group commit.
#[derive(Default)]
pub struct ClaimWrites {
    /// One store call per batch (one statement and commit on PostgreSQL).
    pub batch: LatencyHistogram,
    /// Batches written (a lone claim counts as a batch of one).
    pub batches: AtomicU64,
    /// Claims in those batches.
    pub claims: AtomicU64,
}

impl ClaimWrites {
    /// Runs one store write of `claims` claims and records it.
    pub async fn record_batch<T>(&self, claims: usize, write: impl std::future::Future<Output = T>) -> T {
        let started = Instant::now();
        let output = write.await;
        self.batch.record_since(started);
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.claims.fetch_add(claims as u64, Ordering::Relaxed);
        output
    }
}

/// Commands this process sent to hosts (wherever their streams live), from
/// the send to the host's result or the failure, by kind.
#[derive(Default)]
pub struct HostCommands {
    spawn: CommandKindStats,
    assign: CommandKindStats,
    teardown: CommandKindStats,
    drain: CommandKindStats,
}

#[derive(Default)]
struct CommandKindStats {
    latency: LatencyHistogram,
    /// Not answered, refused, timed out, or not sent (host not connected).
    failed: AtomicU64,
}

/// A command's kind without its contents (which move on to the host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandKind {
    Spawn,
    Assign,
    Teardown,
    Drain,
}

impl From<&command::Kind> for CommandKind {
    fn from(kind: &command::Kind) -> Self {
        match kind {
            command::Kind::Spawn(_) => CommandKind::Spawn,
            command::Kind::Assign(_) => CommandKind::Assign,
            command::Kind::Teardown(_) => CommandKind::Teardown,
            command::Kind::Drain(_) => CommandKind::Drain,
        }
    }
}

impl HostCommands {
    pub fn record(&self, kind: CommandKind, elapsed: Duration, ok: bool) {
        let stats = match kind {
            CommandKind::Spawn => &self.spawn,
            CommandKind::Assign => &self.assign,
            CommandKind::Teardown => &self.teardown,
            CommandKind::Drain => &self.drain,
        };
        stats.latency.record(elapsed);
        if !ok {
            stats.failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn by_kind(&self) -> [(&'static str, &CommandKindStats); 4] {
        [("spawn", &self.spawn), ("assign", &self.assign), ("teardown", &self.teardown), ("drain", &self.drain)]
    }
}

/// The process's latency metrics (one per process, shared by `Arc`).
#[derive(Default)]
pub struct Metrics {
    pub allocate: AllocatePhases,
    pub claim_writes: ClaimWrites,
    pub host_commands: HostCommands,
}

impl Metrics {
    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let name = "switchboard_allocate_phase_seconds";
        let _ = writeln!(out, "# HELP {name} Time an Allocate spends in each phase on the server.");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let phases = &self.allocate;
        for (phase, histogram) in [
            ("auth", &phases.auth),
            ("checks", &phases.checks),
            ("claim", &phases.claim),
            ("claim_alone", &phases.claim_alone),
            ("assign", &phases.assign),
            ("handler", &phases.handler),
        ] {
            histogram.render(&mut out, name, &format!("phase=\"{phase}\""));
        }
        let name = "switchboard_claim_batch_seconds";
        let _ = writeln!(out, "# HELP {name} One store write of a batch of Allocate claims.");
        let _ = writeln!(out, "# TYPE {name} histogram");
        self.claim_writes.batch.render(&mut out, name, "writer=\"claims\"");
        for (name, help, value) in [
            ("switchboard_claim_batches_total", "Batches of Allocate claims written.", &self.claim_writes.batches),
            ("switchboard_claims_batched_total", "Allocate claims in those batches.", &self.claim_writes.claims),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
        }
        let name = "switchboard_host_command_seconds";
        let _ = writeln!(out, "# HELP {name} A command to a host, from the send to its result or failure.");
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (kind, stats) in self.host_commands.by_kind() {
            stats.latency.render(&mut out, name, &format!("kind=\"{kind}\""));
        }
        let name = "switchboard_host_command_failures_total";
        let _ = writeln!(out, "# HELP {name} Commands to hosts not answered, refused, timed out or not sent.");
        let _ = writeln!(out, "# TYPE {name} counter");
        for (kind, stats) in self.host_commands.by_kind() {
            let _ = writeln!(out, "{name}{{kind=\"{kind}\"}} {}", stats.failed.load(Ordering::Relaxed));
        }
        out
    }
}

/// `GET /metrics`: the text exposition (the policy layer asks for an admin token).
pub fn endpoint(metrics: Arc<Metrics>) -> axum::routing::MethodRouter {
    axum::routing::get(move || {
        let metrics = metrics.clone();
        async move { ([(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], metrics.render()) }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines().find(|line| line.starts_with(prefix))
    }

    #[test]
    fn observations_land_in_cumulative_buckets_with_sum_and_count() {
        let metrics = Metrics::default();
        metrics.allocate.claim.record(Duration::from_micros(40));
        metrics.allocate.claim.record(Duration::from_micros(1_000));
        metrics.allocate.claim.record(Duration::from_micros(1_001));
        metrics.allocate.claim.record(Duration::from_secs(60));
        let text = metrics.render();
        let bucket = |le: &str| {
            line(&text, &format!("switchboard_allocate_phase_seconds_bucket{{phase=\"claim\",le=\"{le}\"}}"))
        };
        assert_eq!(
            bucket("0.00005"),
            Some("switchboard_allocate_phase_seconds_bucket{phase=\"claim\",le=\"0.00005\"} 1")
        );
        // 40 µs is above the 25 µs bound.
        assert!(bucket("0.000025").is_some_and(|line| line.ends_with(" 0")), "{text}");
        // 1,000 µs is in the 1 ms bucket (upper bounds are inclusive); 1,001 µs is not.
        assert!(bucket("0.001").is_some_and(|line| line.ends_with(" 2")), "{text}");
        assert!(bucket("0.00125").is_some_and(|line| line.ends_with(" 3")), "{text}");
        assert!(bucket("30").is_some_and(|line| line.ends_with(" 3")), "{text}");
        assert!(bucket("+Inf").is_some_and(|line| line.ends_with(" 4")), "{text}");
        assert_eq!(
            line(&text, "switchboard_allocate_phase_seconds_count{phase=\"claim\"}"),
            Some("switchboard_allocate_phase_seconds_count{phase=\"claim\"} 4")
        );
        assert_eq!(
            line(&text, "switchboard_allocate_phase_seconds_sum{phase=\"claim\"}"),
            Some("switchboard_allocate_phase_seconds_sum{phase=\"claim\"} 60.002041")
        );
        assert_eq!(metrics.allocate.claim.count(), 4);
        assert!(
            line(&text, "switchboard_allocate_phase_seconds_count{phase=\"assign\"}")
                .is_some_and(|l| l.ends_with(" 0"))
        );
    }

    #[test]
    fn bounds_rise() {
        assert!(BOUNDS_US.windows(2).all(|pair| pair[0] < pair[1]));
    }
}
