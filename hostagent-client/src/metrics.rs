//! Host load for heartbeats, read from `/proc` where it exists (zero elsewhere).

use std::fs;

/// A snapshot of the host's load.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct HostLoad {
    /// One-minute load average per CPU, clamped to 0..1.
    pub(crate) cpu_load: f64,
    pub(crate) memory_used_bytes: u64,
}

pub(crate) fn host_load() -> HostLoad {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    HostLoad {
        cpu_load: fs::read_to_string("/proc/loadavg").ok().and_then(|s| cpu_load(&s, cpus)).unwrap_or(0.0),
        memory_used_bytes: fs::read_to_string("/proc/meminfo").ok().and_then(|s| memory_used_bytes(&s)).unwrap_or(0),
    }
}

fn cpu_load(loadavg: &str, cpus: usize) -> Option<f64> {
    let one_minute: f64 = loadavg.split_whitespace().next()?.parse().ok()?;
    let per_cpu = one_minute / cpus.max(1) as f64;
    per_cpu.is_finite().then(|| per_cpu.clamp(0.0, 1.0))
}

/// `MemTotal - MemAvailable`, in bytes.
fn memory_used_bytes(meminfo: &str) -> Option<u64> {
    let field = |name: &str| -> Option<u64> {
        let line = meminfo.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        kib.checked_mul(1024)
    };
    Some(field("MemTotal:")?.saturating_sub(field("MemAvailable:")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_loadavg_per_cpu() {
        assert_eq!(cpu_load("1.00 0.50 0.25 1/100 42\n", 4), Some(0.25));
        assert_eq!(cpu_load("9.00 0.50 0.25 1/100 42\n", 2), Some(1.0));
        assert_eq!(cpu_load("garbage", 2), None);
    }

    #[test]
    fn parses_meminfo() {
        let meminfo = "MemTotal:       1000 kB\nMemFree:         100 kB\nMemAvailable:    600 kB\n";
        assert_eq!(memory_used_bytes(meminfo), Some(400 * 1024));
        assert_eq!(memory_used_bytes("MemTotal: 5 kB\n"), None);
    }
}
