//! Schedules: checking a `POST /schedules` body (its job template with [`validate`], exactly as
//! `POST /jobs`), and when each run falls due.
//!
//! Due times are whole seconds, since a run's job id holds the due time in unix seconds.

use chrono::{DateTime, Duration, SubsecRound, Utc};
use chrono_tz::Tz;
use croner::{
    Cron,
    parser::{CronParser, Seconds, Year},
};
use flotilla_proto::{
    JobRequest, Schedule, ScheduleRequest, SubmitRequest, ids,
    schedule::{self as proto, MAX_SCHEDULE_ID_LEN, METADATA_SCHEDULE_ID},
};

use crate::{Catalog, Limits, Origin, ValidationError, validate};

/// The longest interval: a year. Longer ones are better written as cron patterns.
pub const MAX_INTERVAL_SECONDS: i64 = 366 * 24 * 3600;
const MAX_NAME_CHARS: usize = 256;

/// When a schedule's runs fall due.
#[derive(Debug, Clone)]
pub enum Timing {
    Cron { cron: Box<Cron>, tz: Tz },
    Interval(Duration),
}

/// Parses a cron pattern: 5 fields, or 6 with seconds first; no year field.
pub fn parse_cron(pattern: &str) -> Result<Cron, String> {
    let parser = CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        .build();
    let fields = pattern.split_whitespace().count();
    // croner also takes `@daily` and friends; they have one field and are fine.
    let nickname = fields == 1 && pattern.trim_start().starts_with('@');
    if !nickname && !(5..=6).contains(&fields) {
        return Err(format!(
            "has {fields} fields; expected 5 (minute hour day-of-month month day-of-week) or 6 (seconds first)"
        ));
    }
    parser.parse(pattern).map_err(|e| e.to_string())
}

pub fn parse_timezone(name: &str) -> Result<Tz, String> {
    name.parse::<Tz>()
        .map_err(|_| format!("{name:?} is not an IANA time zone name"))
}

impl Timing {
    /// The timing of a stored schedule (checked when it was created).
    pub fn of(schedule: &Schedule) -> Result<Self, String> {
        match (&schedule.cron, schedule.interval_seconds) {
            (Some(pattern), _) => Ok(Self::Cron {
                cron: Box::new(parse_cron(pattern)?),
                tz: parse_timezone(&schedule.timezone)?,
            }),
            (None, Some(seconds)) if seconds >= 1 => Ok(Self::Interval(Duration::seconds(
                i64::try_from(seconds).map_err(|e| e.to_string())?,
            ))),
            _ => Err("neither a cron pattern nor an interval".to_owned()),
        }
    }

    /// The first run of a schedule created (or re-enabled) at `now`: the next cron match
    /// strictly after `now`, or one interval from `now`.
    pub fn first(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let now = now.trunc_subsecs(0);
        match self {
            Self::Cron { cron, tz } => cron
                .find_next_occurrence(&now.with_timezone(tz), false)
                .ok()
                .map(|next| next.with_timezone(&Utc).trunc_subsecs(0)),
            Self::Interval(interval) => Some(now + *interval),
        }
    }

    /// The run after the one due at `due`, handled at `now`: the first slot strictly after
    /// `now`. Slots missed meanwhile (no leader for a while) are skipped, so an outage costs at
    /// most one catch-up run (the one due at `due`). Intervals keep their phase.
    pub fn after(&self, due: DateTime<Utc>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Self::Cron { .. } => self.first(now.max(due)),
            Self::Interval(interval) => {
                let step = interval.num_seconds().max(1);
                let behind = (now - due).num_seconds().max(0);
                Some(due + Duration::seconds(step * (behind / step + 1)))
            }
        }
    }
}

/// The next due time once a run (due at `due`) has been handled at `now`, given `runs` runs
/// so far: `None` once `max_runs` is reached.
pub fn next_run(
    schedule: &Schedule,
    timing: &Timing,
    due: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    if schedule.finished() || !schedule.enabled {
        return None;
    }
    timing.after(due, now)
}

/// The submission of the run due at `due`: the template with its deterministic job id and
/// `metadata.schedule_id`.
pub fn submission(schedule: &Schedule, due: DateTime<Utc>) -> SubmitRequest {
    let mut job = schedule.job.clone();
    job.job_id = Some(proto::scheduled_job_id(&schedule.schedule_id, due));
    job.metadata.get_or_insert_with(Default::default).insert(
        METADATA_SCHEDULE_ID.to_owned(),
        schedule.schedule_id.clone(),
    );
    job
}

/// Validates the run due at `due` exactly as a direct submission would be. Errors name the
/// template's field (`job.<field>`).
pub async fn validate_run(
    catalog: &Catalog,
    limits: &Limits,
    schedule: &Schedule,
    due: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<JobRequest, ValidationError> {
    validate(
        catalog,
        limits,
        submission(schedule, due),
        Origin::Schedule,
        now,
    )
    .await
    .map_err(|mut e| {
        e.field = Some(match e.field.take() {
            Some(field) => format!("job.{field}"),
            None => "job".to_owned(),
        });
        e
    })
}

/// Turns a `POST /schedules` body into a new schedule, or the first broken rule. The job
/// template is validated now, as the first run will be, so a template that cannot run is
/// refused here rather than failing at every run.
pub async fn validate_schedule(
    catalog: &Catalog,
    limits: &Limits,
    request: ScheduleRequest,
    now: DateTime<Utc>,
) -> Result<Schedule, ValidationError> {
    let ScheduleRequest {
        schedule_id,
        name,
        cron,
        interval_seconds,
        timezone,
        max_runs,
        enabled,
        skip_if_running,
        job,
    } = request;
    let schedule_id = match schedule_id {
        Some(id) if ids::is_safe_id(&id, MAX_SCHEDULE_ID_LEN) => id,
        Some(_) => {
            return Err(ValidationError::invalid(
                "schedule_id",
                format!("must match ^[A-Za-z0-9_-]{{1,{MAX_SCHEDULE_ID_LEN}}}$"),
            ));
        }
        None => proto::new_schedule_id(),
    };
    if let Some(name) = &name
        && name.chars().count() > MAX_NAME_CHARS
    {
        return Err(ValidationError::invalid(
            "name",
            format!("is longer than {MAX_NAME_CHARS} characters"),
        ));
    }
    let timezone = timezone.unwrap_or_else(|| "UTC".to_owned());
    let tz = parse_timezone(&timezone).map_err(|e| ValidationError::invalid("timezone", e))?;
    let interval_seconds = match (&cron, interval_seconds) {
        (Some(_), Some(_)) => {
            return Err(ValidationError::invalid(
                "cron",
                "and interval_seconds are exclusive: give exactly one",
            ));
        }
        (None, None) => {
            return Err(ValidationError::missing(
                "cron",
                "give exactly one of cron and interval_seconds".to_owned(),
            ));
        }
        (None, Some(seconds)) if !(1..=MAX_INTERVAL_SECONDS).contains(&seconds) => {
            return Err(ValidationError::invalid(
                "interval_seconds",
                format!("must be between 1 and {MAX_INTERVAL_SECONDS}, got {seconds}"),
            ));
        }
        (None, Some(seconds)) => u64::try_from(seconds).ok(),
        (Some(_), None) => None,
    };
    if let Some(pattern) = &cron {
        let parsed = parse_cron(pattern)
            .map_err(|e| ValidationError::invalid("cron", format!("is not valid: {e}")))?;
        if parsed
            .find_next_occurrence(&now.with_timezone(&tz), false)
            .is_err()
        {
            return Err(ValidationError::invalid("cron", "never matches"));
        }
    }
    let max_runs = match max_runs {
        Some(max) if max < 1 => {
            return Err(ValidationError::invalid(
                "max_runs",
                format!("must be at least 1, got {max}"),
            ));
        }
        max => max.and_then(|max| u64::try_from(max).ok()),
    };
    let Some(job) = job else {
        return Err(ValidationError::missing(
            "job",
            "job is required: the body of POST /jobs to run".to_owned(),
        ));
    };
    if job.job_id.is_some() {
        return Err(ValidationError::invalid(
            "job.job_id",
            "is assigned to each run (sched-<schedule_id>-<unix seconds>)",
        ));
    }
    let enabled = enabled.unwrap_or(true);
    let mut schedule = Schedule {
        schedule_id,
        name,
        cron,
        interval_seconds,
        timezone: tz.name().to_owned(),
        max_runs,
        enabled,
        skip_if_running: skip_if_running.unwrap_or(false),
        skipped: 0,
        job,
        runs: 0,
        last_run_at: None,
        last_job_id: None,
        last_error: None,
        next_run_at: None,
        created_at: now,
        updated_at: now,
    };
    let timing = Timing::of(&schedule).map_err(|e| ValidationError::invalid("cron", e))?;
    let first = timing.first(now);
    validate_run(catalog, limits, &schedule, first.unwrap_or(now), now).await?;
    schedule.next_run_at = if enabled { first } else { None };
    Ok(schedule)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn cron(pattern: &str, tz: &str) -> Timing {
        Timing::Cron {
            cron: Box::new(parse_cron(pattern).unwrap()),
            tz: parse_timezone(tz).unwrap(),
        }
    }

    #[test]
    fn cron_runs_at_local_time_across_a_dst_change() {
        // 09:00 in New York: 14:00 UTC in winter (EST), 13:00 UTC once DST starts (10 March 2024).
        let timing = cron("0 9 * * *", "America/New_York");
        let first = timing.first(at("2024-03-09T12:00:00Z")).unwrap();
        assert_eq!(first, at("2024-03-09T14:00:00Z"));
        let second = timing.after(first, at("2024-03-09T14:00:00.400Z")).unwrap();
        assert_eq!(second, at("2024-03-10T13:00:00Z"));
    }

    #[test]
    fn cron_accepts_five_or_six_fields_only() {
        assert!(parse_cron("*/5 * * * *").is_ok());
        assert!(parse_cron("30 */5 * * * *").is_ok());
        assert!(parse_cron("@daily").is_ok());
        assert!(parse_cron("* * * *").is_err());
        assert!(parse_cron("0 0 0 * * * 2030").is_err());
        assert!(parse_cron("61 * * * *").is_err());
        assert!(parse_cron("not a cron").is_err());
        assert!(parse_timezone("Europe/Paris").is_ok());
        assert!(parse_timezone("Mars/Olympus").is_err());
    }

    #[test]
    fn intervals_start_one_interval_out_in_whole_seconds() {
        let timing = Timing::Interval(Duration::seconds(60));
        assert_eq!(
            timing.first(at("2026-01-01T00:00:00.750Z")),
            Some(at("2026-01-01T00:01:00Z"))
        );
        // On time: the next slot follows.
        let due = at("2026-01-01T00:01:00Z");
        assert_eq!(
            timing.after(due, at("2026-01-01T00:01:00.200Z")),
            Some(at("2026-01-01T00:02:00Z"))
        );
    }

    #[test]
    fn missed_slots_cost_one_catch_up_run_then_resume_from_now() {
        // Due at 00:01, handled at 00:10:30 (no leader meanwhile): one run for 00:01, then the
        // next slot after now, in phase.
        let interval = Timing::Interval(Duration::seconds(60));
        let due = at("2026-01-01T00:01:00Z");
        assert_eq!(
            interval.after(due, at("2026-01-01T00:10:30Z")),
            Some(at("2026-01-01T00:11:00Z"))
        );
        let hourly = cron("0 * * * *", "UTC");
        assert_eq!(
            hourly.after(at("2026-01-01T01:00:00Z"), at("2026-01-01T05:20:00Z")),
            Some(at("2026-01-01T06:00:00Z"))
        );
    }

    #[tokio::test]
    async fn max_runs_ends_the_schedule() {
        let catalog = Catalog::default();
        let request = ScheduleRequest {
            interval_seconds: Some(1),
            max_runs: Some(2),
            job: Some(SubmitRequest {
                agent_id: Some("a".to_owned()),
                engine: Some("shell".to_owned()),
                prompt: Some("true".to_owned()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let now = at("2026-01-01T00:00:00Z");
        let result = validate_schedule(&catalog, &Limits::default(), request, now).await;
        // The empty catalogue has no `default` profile: the template is refused, naming it.
        let error = result.unwrap_err();
        assert_eq!(error.field.as_deref(), Some("job.profile"));

        let timing = Timing::Interval(Duration::seconds(1));
        let mut schedule = Schedule {
            schedule_id: "s".to_owned(),
            name: None,
            cron: None,
            interval_seconds: Some(1),
            timezone: "UTC".to_owned(),
            max_runs: Some(2),
            enabled: true,
            skip_if_running: false,
            skipped: 0,
            job: SubmitRequest::default(),
            runs: 1,
            last_run_at: None,
            last_job_id: None,
            last_error: None,
            next_run_at: Some(now),
            created_at: now,
            updated_at: now,
        };
        let due = at("2026-01-01T00:00:01Z");
        assert_eq!(
            next_run(&schedule, &timing, due, due),
            Some(at("2026-01-01T00:00:02Z"))
        );
        schedule.runs = 2;
        assert_eq!(next_run(&schedule, &timing, due, due), None);
        let job = submission(&schedule, due);
        assert_eq!(job.job_id.as_deref(), Some("sched-s-1767225601"));
        assert_eq!(job.metadata.unwrap()["schedule_id"], "s");
    }
}
