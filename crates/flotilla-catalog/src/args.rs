//! Command-line/environment form of [`Limits`], shared by every service that validates jobs.

use crate::workspace::GitAllowList;
use crate::{ImageAllowList, Limits, parse_memory, rules};

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
    /// Hosts (names or addresses) `workspace.git` URLs may name, comma-separated, and
    /// `file:///dir` entries for repositories on the nodes' hosts. Empty: no git workspaces.
    #[arg(long, env = "FLOTILLA_GIT_ALLOWED_HOSTS", default_value = "")]
    pub git_allowed_hosts: String,
    /// Images a job (or its profile) may name in `image`, as comma-separated globs where `*`
    /// also matches `/`: `flotilla-worker:*,ghcr.io/acme/*`. Empty: jobs run in the nodes'
    /// worker image only.
    #[arg(long, env = "FLOTILLA_ALLOWED_IMAGES", default_value = "")]
    pub allowed_images: String,
}

impl LimitsArgs {
    pub fn into_limits(self) -> Result<Limits, String> {
        let default_memory_bytes = parse_memory(&self.default_job_memory)
            .map_err(|e| format!("invalid default job memory: {e}"))?;
        let max_memory_bytes = parse_memory(&self.max_job_memory)
            .map_err(|e| format!("invalid max job memory: {e}"))?;
        // The same floors a job gets: the node rechecks every job against them.
        let default_nano_cpus = rules::nano_cpus(self.default_job_cpus)
            .map_err(|e| format!("the default job CPUs {e}"))?;
        rules::nano_cpus(self.max_job_cpus).map_err(|e| format!("the max job CPUs {e}"))?;
        rules::check_timeout(i64::try_from(self.default_timeout_secs).unwrap_or(i64::MAX))
            .map_err(|e| format!("the default job timeout {e}"))?;
        if default_memory_bytes < rules::MIN_MEMORY_BYTES {
            return Err("the default job memory must be at least 6m".to_owned());
        }
        if default_memory_bytes > max_memory_bytes || self.default_job_cpus > self.max_job_cpus {
            return Err("default job resources exceed the maximum job resources".to_owned());
        }
        Ok(Limits {
            default_timeout_seconds: self.default_timeout_secs,
            default_memory_bytes,
            default_nano_cpus,
            max_memory_bytes,
            max_cpus: self.max_job_cpus,
            allow_private_webhooks: self.allow_private_webhooks,
            git_allowed: GitAllowList::parse(&self.git_allowed_hosts)?,
            allowed_images: ImageAllowList::parse(&self.allowed_images)?,
        })
    }
}
