//! Schedules: a job template run on a cron pattern or at a fixed interval by the dispatcher
//! leader. Stored in KV under [`crate::names::schedule_key`]; every change is a compare-and-set.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::SubmitRequest;

/// Schedule ids follow the safe-id rule with this maximum, so that a firing's job id
/// (`sched-<id>-<unix seconds>`) stays within [`crate::ids::MAX_JOB_ID_LEN`].
pub const MAX_SCHEDULE_ID_LEN: usize = 64;

/// Prefix of the job ids a schedule creates; see [`scheduled_job_id`].
pub const SCHEDULED_JOB_PREFIX: &str = "sched";

/// The metadata key every scheduled job carries, holding its schedule's id.
pub const METADATA_SCHEDULE_ID: &str = "schedule_id";

/// A new id: `sched-<32 hex>` (UUIDv7, so ids sort by creation time).
pub fn new_schedule_id() -> String {
    format!("{SCHEDULED_JOB_PREFIX}-{}", uuid::Uuid::now_v7().simple())
}

/// The job id of the firing due at `due`: one id per slot, so that two leaders (or a retry)
/// firing the same slot create one job.
pub fn scheduled_job_id(schedule_id: &str, due: DateTime<Utc>) -> String {
    format!("{SCHEDULED_JOB_PREFIX}-{schedule_id}-{}", due.timestamp())
}

/// The body of `POST /schedules`. Unknown fields are refused.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(
    feature = "openapi",
    derive(utoipa::ToSchema),
    schema(
        description = "The body of `POST /schedules`. Give exactly one of `cron` and \
        `interval_seconds` (null counts as absent). Unknown fields are refused (422). \
        `cron` and `timezone` must parse, and `job` must pass every rule of `POST /jobs`, \
        those that depend on the live configuration included.",
        examples(json!({"name": "nightly", "interval_seconds": 86400,
            "job": {"agent_id": "me", "engine": "shell", "prompt": "echo hello"}}))
    )
)]
#[serde(deny_unknown_fields)]
pub struct ScheduleRequest {
    /// `^[A-Za-z0-9_-]{1,64}$`; assigned by the server (`sched-<32 hex>`) when absent.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(pattern = "^[A-Za-z0-9_-]{1,64}$"))]
    pub schedule_id: Option<String>,
    /// A label for people, at most 256 characters.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(max_length = 256))]
    pub name: Option<String>,
    /// A cron pattern: 5 fields (minute hour day-of-month month day-of-week), or 6 with
    /// seconds first, or a nickname such as `@daily`. Day-of-month and day-of-week match when
    /// either does (POSIX). It must parse and match some future time.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(example = "0 9 * * 1-5"))]
    pub cron: Option<String>,
    /// Run every this many seconds (1 to 31,622,400, a leap year), the first run one interval
    /// after creation.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 31_622_400))]
    pub interval_seconds: Option<i64>,
    /// An IANA time zone name for `cron` (`Europe/Paris`); `UTC` when absent. Checked with an
    /// interval too.
    #[serde(default)]
    pub timezone: Option<String>,
    /// Stop after this many runs (at least 1); no limit when absent.
    #[serde(default)]
    #[cfg_attr(
        feature = "openapi",
        schema(minimum = 1, maximum = 9_223_372_036_854_775_807_i64)
    )]
    pub max_runs: Option<i64>,
    /// `true` when absent.
    #[serde(default)]
    pub enabled: Option<bool>,
    /// Skip a run that falls due while the previous run's job has not finished (it is counted
    /// in `skipped`), rather than start another beside it. `false` when absent.
    #[serde(default)]
    pub skip_if_running: Option<bool>,
    /// The job to run: the body of `POST /jobs`, validated the same way now. Each run also
    /// gets `metadata.schedule_id`.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = SubmitRequest, required))]
    pub job: Option<SubmitRequest>,
}

/// A schedule as stored and as `GET /schedules/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(
    feature = "openapi",
    derive(utoipa::ToSchema),
    schema(description = "A schedule: the body of `GET /schedules/{schedule_id}`.")
)]
pub struct Schedule {
    pub schedule_id: String,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub name: Option<String>,
    /// Set when `interval_seconds` is not.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub cron: Option<String>,
    /// Set when `cron` is not.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub interval_seconds: Option<u64>,
    /// The IANA time zone `cron` is read in.
    pub timezone: String,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub max_runs: Option<u64>,
    pub enabled: bool,
    /// Runs falling due while the last one is unfinished are skipped.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub skip_if_running: bool,
    /// Runs skipped because the previous one was still unfinished.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub skipped: u64,
    /// The job template (no `job_id`).
    pub job: SubmitRequest,
    /// Jobs created so far.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub runs: u64,
    /// When the last job was created.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub last_run_at: Option<DateTime<Utc>>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub last_job_id: Option<String>,
    /// Why the last due run created no job (its template no longer validates); cleared by the
    /// next run that does.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub last_error: Option<String>,
    /// When the next run is due; null once `max_runs` is reached or while disabled.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required))]
    pub next_run_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Schedule {
    /// Whether `max_runs` has been reached.
    pub fn finished(&self) -> bool {
        self.max_runs.is_some_and(|max| self.runs >= max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids;

    #[test]
    fn ids_fit_the_job_id_rules() {
        let id = new_schedule_id();
        assert!(ids::is_safe_id(&id, MAX_SCHEDULE_ID_LEN), "{id}");
        let longest = "x".repeat(MAX_SCHEDULE_ID_LEN);
        let due = DateTime::from_timestamp(4_102_444_800, 0).unwrap();
        let job_id = scheduled_job_id(&longest, due);
        assert!(ids::is_valid_job_id(&job_id), "{job_id}");
        assert_eq!(scheduled_job_id("s1", due), "sched-s1-4102444800");
    }
}
