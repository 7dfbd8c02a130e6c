//! Command-line/environment form of [`Limits`], shared by every service that validates jobs.

use crate::{Limits, parse_memory};

#[derive(Debug, Clone, clap::Args)]
pub struct LimitsArgs {
    /// Job timeout when neither the request nor the profile sets one.
    #[arg(long, env = "FLOTILLA_DEFAULT_TIMEOUT_SECS", default_value_t = 3600)]
    pub default_timeout_secs: u64,
    /// Container memory when neither the request nor the profile sets it, e.g. 2g.
    #[arg(long, env = "FLOTILLA_DEFAULT_JOB_MEMORY", default_value = "2g")]
    pub default_job_memory: String,
    /// Container CPUs when neither the request nor the profile sets them.
    #[arg(long, env = "FLOTILLA_DEFAULT_JOB_CPUS", default_value_t = 1.0)]
    pub default_job_cpus: f64,
    /// Upper bound a job may ask for with `resources.memory`, e.g. 8g.
    #[arg(long, env = "FLOTILLA_MAX_JOB_MEMORY", default_value = "8g")]
    pub max_job_memory: String,
    /// Upper bound a job may ask for with `resources.cpus`.
    #[arg(long, env = "FLOTILLA_MAX_JOB_CPUS", default_value_t = 4.0)]
    pub max_job_cpus: f64,
    /// Accept webhook URLs on private addresses (local testing only).
    #[arg(long, env = "FLOTILLA_ALLOW_PRIVATE_WEBHOOKS")]
    pub allow_private_webhooks: bool,
}

impl LimitsArgs {
    pub fn into_limits(self) -> Result<Limits, String> {
        let default_memory_bytes = parse_memory(&self.default_job_memory)
            .map_err(|e| format!("invalid default job memory: {e}"))?;
        let max_memory_bytes = parse_memory(&self.max_job_memory)
            .map_err(|e| format!("invalid max job memory: {e}"))?;
        let cpus_ok = |cpus: f64| cpus.is_finite() && cpus > 0.0;
        if !cpus_ok(self.default_job_cpus) || !cpus_ok(self.max_job_cpus) {
            return Err("job CPU settings must be positive numbers".to_owned());
        }
        if default_memory_bytes > max_memory_bytes || self.default_job_cpus > self.max_job_cpus {
            return Err("default job resources exceed the maximum job resources".to_owned());
        }
        Ok(Limits {
            default_timeout_seconds: self.default_timeout_secs,
            default_memory_bytes,
            default_nano_cpus: (self.default_job_cpus * 1e9) as i64,
            max_memory_bytes,
            max_cpus: self.max_job_cpus,
            allow_private_webhooks: self.allow_private_webhooks,
        })
    }
}
