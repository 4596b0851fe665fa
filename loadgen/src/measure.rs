//! Latency summaries, /proc readings and the progress line.

use std::{
    io::Write as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Serialize;

/// Percentiles of a set of durations, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Percentiles {
    pub(crate) count: usize,
    pub(crate) mean_ms: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p90_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) max_ms: f64,
}

impl Percentiles {
    pub(crate) fn of(samples: &mut [Duration]) -> Percentiles {
        if samples.is_empty() {
            return Percentiles::default();
        }
        samples.sort_unstable();
        let at = |q: f64| {
            let index = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
            ms(samples[index])
        };
        let total: Duration = samples.iter().sum();
        Percentiles {
            count: samples.len(),
            mean_ms: ms(total) / samples.len() as f64,
            p50_ms: at(0.50),
            p90_ms: at(0.90),
            p99_ms: at(0.99),
            max_ms: at(1.0),
        }
    }
}

pub(crate) fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// VmRSS of a process, in KiB.
pub(crate) fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// User + system CPU time a process has used so far.
pub(crate) fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 here.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on Linux.
    Some(Duration::from_millis(ticks * 10))
}

/// CPU time used so far by each party to an allocation run on this machine:
/// the server process, the database's processes (PostgreSQL's postmaster and
/// backends, found by name; with SQLite, which runs inside the server, only
/// what an idle local PostgreSQL did meanwhile),
/// loadgen itself (its clients and simulated hosts), and the machine as a
/// whole (busy time of every CPU, from /proc/stat).
/// A reading that failed is None, so that a window with one failed end shows
/// no CPU for that party rather than all it used since it started.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuSample {
    server: Option<Duration>,
    database: Duration,
    loadgen: Option<Duration>,
    machine_busy: Option<Duration>,
}

/// A window's CPU in cores (1.0 = one core busy for the whole window).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct CpuShares {
    pub(crate) server_cores: f64,
    pub(crate) database_cores: f64,
    pub(crate) loadgen_cores: f64,
    pub(crate) machine_busy_cores: f64,
}

impl CpuSample {
    pub(crate) fn take(server_pid: u32) -> CpuSample {
        CpuSample {
            server: cpu_time(server_pid),
            database: processes_named("postgres").iter().filter_map(|pid| cpu_time(*pid)).sum(),
            loadgen: cpu_time(std::process::id()),
            machine_busy: machine_busy(),
        }
    }

    /// The cores each party used from `self` to `later` over `seconds`.
    pub(crate) fn shares_until(&self, later: &CpuSample, seconds: f64) -> CpuShares {
        let cores = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
            (Some(a), Some(b)) if seconds > 0.0 => b.saturating_sub(a).as_secs_f64() / seconds,
            _ => 0.0,
        };
        CpuShares {
            server_cores: cores(self.server, later.server),
            database_cores: cores(Some(self.database), Some(later.database)),
            loadgen_cores: cores(self.loadgen, later.loadgen),
            machine_busy_cores: cores(self.machine_busy, later.machine_busy),
        }
    }
}

impl CpuShares {
    /// The time-weighted mean of windows of `seconds` each.
    pub(crate) fn weighted(windows: &[(CpuShares, f64)]) -> CpuShares {
        let total: f64 = windows.iter().map(|(_, seconds)| seconds).sum();
        if total <= 0.0 {
            return CpuShares::default();
        }
        let mean =
            |part: fn(&CpuShares) -> f64| windows.iter().map(|(shares, s)| part(shares) * s).sum::<f64>() / total;
        CpuShares {
            server_cores: mean(|c| c.server_cores),
            database_cores: mean(|c| c.database_cores),
            loadgen_cores: mean(|c| c.loadgen_cores),
            machine_busy_cores: mean(|c| c.machine_busy_cores),
        }
    }
}

/// Pids of the processes whose command name is `name`.
fn processes_named(name: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim_end() == name))
        .collect()
}

/// Busy time of all CPUs together (everything but idle and iowait).
fn machine_busy() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<u64> =
        stat.lines().next()?.split_whitespace().skip(1).map(str::parse).collect::<Result<_, _>>().ok()?;
    let all: u64 = ticks.iter().sum();
    let idle = ticks.get(3)? + ticks.get(4)?;
    // USER_HZ is 100 on Linux.
    Some(Duration::from_millis(all.saturating_sub(idle) * 10))
}

/// What the machine is.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Machine {
    pub(crate) cpu_model: String,
    pub(crate) cpus: usize,
    pub(crate) memory_gib: f64,
    pub(crate) kernel: String,
    pub(crate) profile: &'static str,
}

impl Machine {
    pub(crate) fn detect() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|line| line.starts_with("model name"))
            .and_then(|line| line.split(':').nth(1))
            .map(|model| model.trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_kib: f64 = meminfo
            .lines()
            .find(|line| line.starts_with("MemTotal:"))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|value| value.parse().ok())
            .unwrap_or(0.0);
        Machine {
            cpu_model,
            cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            memory_gib: memory_kib / 1024.0 / 1024.0,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned(),
            profile: if cfg!(debug_assertions) { "debug" } else { "release" },
        }
    }
}

/// A single updating line on stderr: the phase, a counter and its rate.
#[derive(Clone)]
pub(crate) struct Progress {
    inner: Arc<ProgressInner>,
}

struct ProgressInner {
    phase: Mutex<(String, Instant)>,
    done: AtomicU64,
    errors: AtomicU64,
}

impl Progress {
    pub(crate) fn start() -> Progress {
        let progress = Progress {
            inner: Arc::new(ProgressInner {
                phase: Mutex::new((String::new(), Instant::now())),
                done: AtomicU64::new(0),
                errors: AtomicU64::new(0),
            }),
        };
        let ticker = progress.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(Duration::from_millis(250));
            loop {
                interval.tick().await;
                if Arc::strong_count(&ticker.inner) <= 1 {
                    break;
                }
                ticker.draw();
            }
        });
        progress
    }

    pub(crate) fn phase(&self, name: impl Into<String>) {
        if let Ok(mut phase) = self.inner.phase.lock() {
            *phase = (name.into(), Instant::now());
        }
        self.inner.done.store(0, Ordering::Relaxed);
        self.inner.errors.store(0, Ordering::Relaxed);
        self.draw();
    }

    pub(crate) fn add(&self, n: u64) {
        self.inner.done.fetch_add(n, Ordering::Relaxed);
    }

    /// The phase's count of done items, when it is read rather than counted.
    pub(crate) fn set(&self, n: u64) {
        self.inner.done.store(n, Ordering::Relaxed);
    }

    pub(crate) fn error(&self) {
        self.inner.errors.fetch_add(1, Ordering::Relaxed);
    }

    fn draw(&self) {
        let Ok(phase) = self.inner.phase.lock() else {
            return;
        };
        let elapsed = phase.1.elapsed().as_secs_f64();
        let done = self.inner.done.load(Ordering::Relaxed);
        let errors = self.inner.errors.load(Ordering::Relaxed);
        let rate = if elapsed > 0.0 { done as f64 / elapsed } else { 0.0 };
        let mut stderr = std::io::stderr().lock();
        let _ = write!(stderr, "\r\x1b[2K[{}] {elapsed:6.1}s  done {done}  ({rate:.0}/s)  errors {errors}", phase.0);
        let _ = stderr.flush();
    }

    /// Ends the line (the next output starts on a fresh one).
    pub(crate) fn finish_line(&self) {
        self.draw();
        eprintln!();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(server: Option<u64>, database: u64) -> CpuSample {
        CpuSample {
            server: server.map(Duration::from_millis),
            database: Duration::from_millis(database),
            loadgen: Some(Duration::from_millis(100)),
            machine_busy: None,
        }
    }

    #[test]
    fn shares_are_the_cores_used_over_the_window() {
        let shares = sample(Some(1_000), 500).shares_until(&sample(Some(3_000), 1_500), 2.0);
        assert_eq!((shares.server_cores, shares.database_cores, shares.loadgen_cores), (1.0, 0.5, 0.0));
    }

    #[test]
    fn a_failed_reading_shows_no_cpu_rather_than_a_lifetime() {
        let shares = sample(None, 0).shares_until(&sample(Some(60_000), 0), 2.0);
        assert_eq!((shares.server_cores, shares.machine_busy_cores), (0.0, 0.0));
        assert_eq!(sample(Some(0), 0).shares_until(&sample(Some(60_000), 0), 0.0).server_cores, 0.0);
    }
}
