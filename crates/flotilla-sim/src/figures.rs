//! Process figures from /proc: CPU time over a window, resident memory; and percentiles.

use std::time::Instant;

/// CPU time used by some processes since it was made.
pub struct CpuClock {
    pids: Vec<u32>,
    start: Instant,
    ticks: u64,
}

impl CpuClock {
    pub fn of(pids: &[u32]) -> Self {
        Self {
            pids: pids.to_vec(),
            start: Instant::now(),
            ticks: pids.iter().map(|p| cpu_ticks(*p)).sum(),
        }
    }

    pub fn elapsed(&self) -> std::time::Duration {
        self.start.elapsed()
    }

    /// Cores used on average since then (1.0 = one core busy all the time).
    pub fn cores_used(&self) -> f64 {
        let now: u64 = self.pids.iter().map(|p| cpu_ticks(*p)).sum();
        let seconds = (now.saturating_sub(self.ticks)) as f64 / CLOCK_TICKS;
        seconds / self.start.elapsed().as_secs_f64()
    }
}

/// Linux's USER_HZ, the unit of /proc/<pid>/stat times.
const CLOCK_TICKS: f64 = 100.0;

/// User plus system time of `pid`, in clock ticks; 0 if it cannot be read.
fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the command name (which may hold spaces), from the third on.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    field(11) + field(12)
}

/// Resident memory of `pid`, in MiB; 0 if it cannot be read.
pub fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

/// The `p`th percentile of `values` (nearest rank); 0 when there are none.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 50.0), 50.0);
        assert_eq!(percentile(&values, 99.0), 99.0);
        assert_eq!(percentile(&[], 99.0), 0.0);
    }

    #[test]
    fn this_process_has_memory_and_cpu_figures() {
        assert!(rss_mib(std::process::id()) > 0.0);
        let clock = CpuClock::of(&[std::process::id()]);
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        assert!(x > 0);
        assert!(clock.cores_used() >= 0.0);
    }
}
