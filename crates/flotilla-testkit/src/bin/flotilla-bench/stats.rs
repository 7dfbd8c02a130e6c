//! Medians, percentiles, the report line, and process CPU time.

use std::time::Duration;

pub fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

pub fn median(samples: &[f64]) -> f64 {
    percentile(samples, 0.5)
}

pub fn percentile(samples: &[f64], q: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let index = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[index]
}

/// The raw Docker medians the Flotilla figures are set against.
#[derive(Clone, Copy)]
pub struct Baseline {
    pub exec_ms: f64,
    pub run_ms: f64,
}

/// One figure's line: median and p99, and its ratio to the raw `docker exec` and container run
/// medians when `base` is given.
pub fn report(label: &str, samples: &[f64], base: Option<Baseline>) {
    let (p50, p99) = (median(samples), percentile(samples, 0.99));
    let ratios = base
        .map(|b| {
            format!(
                "  ({:.2}× exec median, p99 {:.2}×; {:.2}× run)",
                p50 / b.exec_ms,
                p99 / b.exec_ms,
                p50 / b.run_ms
            )
        })
        .unwrap_or_default();
    println!("{label:<58} median {p50:8.2} ms   p99 {p99:8.2} ms{ratios}");
}

/// CPU time (user + system) a process has used so far, from `/proc/<pid>/stat`.
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow::anyhow!("unexpected /proc/{pid}/stat"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY-free: the clock tick is 100 Hz on every Linux this runs on (USER_HZ).
    Ok(Duration::from_millis(ticks * 10))
}
