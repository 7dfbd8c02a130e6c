//! Schedules: the leader creates each schedule's jobs as they fall due. Every replica follows
//! the schedule bucket (so a new leader knows the due times at once); only the leader fires.
//!
//! A run is submitted like a direct NATS submission: validated with the same validator, then
//! recorded and queued by [`Intake::queue`]. Its job id is fixed by the slot
//! (`sched-<id>-<unix seconds of the due time>`), so a leader change or a retry between
//! queueing the job and recording the run on the schedule cannot run a slot twice: the job
//! record's create fails and the run queue drops the repeated message id.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, Utc};
use flotilla_catalog::schedule::{self, Timing};
use flotilla_nats::{ScheduleEvent, StoreError, SubmitError};
use flotilla_proto::Schedule;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::intake::Intake;

/// How often the leader looks for due schedules: the precision of a run's start.
const CHECK: Duration = Duration::from_millis(250);

pub(crate) struct Scheduler {
    intake: Arc<Intake>,
    /// Fences each run: a replica that lost the lead fires nothing.
    lease: Arc<flotilla_nats::Lease>,
    /// Enabled schedules with their next due time, from the bucket watch.
    due: Mutex<HashMap<String, DateTime<Utc>>>,
}

/// What a due run came to.
enum Run {
    Created(String),
    /// The template no longer validates (a deleted profile, say): no job, the reason kept.
    Refused(String),
    /// `skip_if_running`, and the previous run's job has not finished.
    Skipped,
}

impl Scheduler {
    pub(crate) fn new(intake: Arc<Intake>, lease: Arc<flotilla_nats::Lease>) -> Arc<Self> {
        Arc::new(Self {
            intake,
            lease,
            due: Mutex::new(HashMap::new()),
        })
    }

    fn track(&self, event: ScheduleEvent) {
        let mut due = self.due.lock().expect("due schedules");
        match event {
            ScheduleEvent::Put(current) => {
                let s = current.schedule;
                match s.next_run_at.filter(|_| s.enabled) {
                    Some(at) => due.insert(s.schedule_id, at),
                    None => due.remove(&s.schedule_id),
                };
            }
            ScheduleEvent::Removed(id) => {
                due.remove(&id);
            }
        }
    }

    pub(crate) async fn run(self: Arc<Self>, stop: CancellationToken) {
        let leading = self.lease.watch();
        let follower = self.clone();
        let follow_stop = stop.clone();
        tokio::spawn(async move {
            let store = follower.intake.topology.schedules.clone();
            store
                .follow(follow_stop, |event| follower.track(event))
                .await;
        });
        let mut ticker = tokio::time::interval(CHECK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticker.tick() => {}
            }
            if !*leading.borrow() {
                continue;
            }
            let now = Utc::now();
            let mut due: Vec<(DateTime<Utc>, String)> = self
                .due
                .lock()
                .expect("due schedules")
                .iter()
                .filter(|(_, at)| **at <= now)
                .map(|(id, at)| (*at, id.clone()))
                .collect();
            due.sort();
            // One at a time, oldest first: a slow NATS slows the schedules down, it never
            // makes two runs of one schedule race.
            for (_, schedule_id) in due {
                if stop.is_cancelled() || !self.lease.confirm().await {
                    break;
                }
                let span = tracing::info_span!(
                    "schedule",
                    schedule_id = %schedule_id,
                    job_id = tracing::field::Empty
                );
                if let Err(e) = self.fire(&schedule_id).instrument(span).await {
                    // NATS trouble: the slot is still due, so the next tick tries it again.
                    tracing::warn!(schedule_id, error = %e, "cannot run due schedule, will retry");
                }
            }
        }
    }

    /// Runs `schedule_id` if it is due, then records the run on it.
    async fn fire(&self, schedule_id: &str) -> Result<(), StoreError> {
        let store = &self.intake.topology.schedules;
        let Some(current) = store.get(schedule_id).await? else {
            // Deleted, and the watch has not said so yet: no need to look again.
            self.due.lock().expect("due schedules").remove(schedule_id);
            return Ok(());
        };
        let now = Utc::now();
        let Some(due) = current
            .schedule
            .next_run_at
            .filter(|_| current.schedule.enabled)
        else {
            self.due.lock().expect("due schedules").remove(schedule_id);
            return Ok(());
        };
        if due > now {
            return Ok(());
        }
        let run = match Timing::of(&current.schedule) {
            Ok(_) => match self.unfinished_run(&current.schedule).await? {
                Some(job_id) => {
                    tracing::info!(%job_id, "previous run unfinished: this one is skipped");
                    Run::Skipped
                }
                None => self.submit(&current.schedule, due, now).await?,
            },
            // Checked at creation, so only a damaged record gets here; `record` stops it.
            Err(e) => Run::Refused(format!("the schedule's timing is invalid: {e}")),
        };
        let (mut schedule, mut revision) = (current.schedule, current.revision);
        let mut advance = true;
        loop {
            record(&mut schedule, &run, due, now, advance);
            match store.update(&schedule, revision).await {
                Ok(_) => return Ok(()),
                // Changed meanwhile (disabled, say): count a created job on the new version,
                // and move it on only if this slot is still the one due.
                Err(StoreError::Conflict(_)) => match store.get(schedule_id).await? {
                    Some(fresh) => {
                        advance = fresh.schedule.next_run_at == Some(due);
                        if !advance && !matches!(run, Run::Created(_)) {
                            return Ok(());
                        }
                        (schedule, revision) = (fresh.schedule, fresh.revision);
                    }
                    None => return Ok(()),
                },
                Err(e) => return Err(e),
            }
        }
    }

    /// The previous run's job, if the schedule skips runs while it is unfinished and it is.
    async fn unfinished_run(&self, schedule: &Schedule) -> Result<Option<String>, StoreError> {
        let Some(job_id) = schedule
            .last_job_id
            .as_ref()
            .filter(|_| schedule.skip_if_running)
        else {
            return Ok(None);
        };
        let record = self.intake.topology.jobs.get(job_id).await?;
        Ok(record
            .filter(|current| !current.record.status.is_terminal())
            .map(|_| job_id.clone()))
    }

    /// Validates and queues the run due at `due`.
    async fn submit(
        &self,
        schedule: &Schedule,
        due: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Run, StoreError> {
        let catalog = self.intake.catalog.current();
        let request =
            match schedule::validate_run(&catalog, &self.intake.limits, schedule, due, now).await {
                Ok(request) => request,
                Err(e) => {
                    let reason = format!("{}: {}", e.field.as_deref().unwrap_or("job"), e.message);
                    tracing::warn!(reason, "scheduled job refused; skipping this run");
                    return Ok(Run::Refused(reason));
                }
            };
        let span = tracing::Span::current();
        span.record("job_id", request.job_id.as_str());
        let trace = flotilla_telemetry::propagation::nats_headers(&span);
        // `Taken`: an earlier leader created this slot's job and stopped before recording it.
        flotilla_nats::submit(&self.intake.topology, &request, trace)
            .await
            .map_err(|e| match e {
                SubmitError::Store(e) => e,
                SubmitError::Queue(e) => StoreError::nats(e),
            })?;
        tracing::info!(job_id = %request.job_id, %due, "scheduled job queued");
        Ok(Run::Created(request.job_id))
    }
}

/// Records the run due at `due`, handled at `now`, and (with `advance`) moves the schedule to
/// its next slot.
fn record(
    schedule: &mut Schedule,
    run: &Run,
    due: DateTime<Utc>,
    now: DateTime<Utc>,
    advance: bool,
) {
    let timing = Timing::of(schedule).ok();
    match run {
        Run::Created(job_id) => {
            schedule.runs += 1;
            schedule.last_run_at = Some(now);
            schedule.last_job_id = Some(job_id.clone());
            schedule.last_error = None;
        }
        Run::Refused(reason) => schedule.last_error = Some(reason.clone()),
        Run::Skipped => schedule.skipped += 1,
    }
    if advance {
        schedule.next_run_at =
            timing.and_then(|timing| schedule::next_run(schedule, &timing, due, now));
    } else if schedule.finished() {
        schedule.next_run_at = None;
    }
    schedule.updated_at = now;
}

#[cfg(test)]
mod tests {
    use flotilla_proto::SubmitRequest;

    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn every_second(max_runs: Option<u64>) -> Schedule {
        let now = at("2026-01-01T00:00:00Z");
        Schedule {
            schedule_id: "s".to_owned(),
            name: None,
            cron: None,
            interval_seconds: Some(1),
            timezone: "UTC".to_owned(),
            max_runs,
            enabled: true,
            skip_if_running: false,
            skipped: 0,
            job: SubmitRequest::default(),
            runs: 0,
            last_run_at: None,
            last_job_id: None,
            last_error: None,
            next_run_at: Some(at("2026-01-01T00:00:01Z")),
            created_at: now,
            updated_at: now,
        }
    }

    #[test]
    fn a_run_is_counted_and_the_last_one_ends_the_schedule() {
        let mut s = every_second(Some(2));
        let due = at("2026-01-01T00:00:01Z");
        record(&mut s, &Run::Created("j1".to_owned()), due, due, true);
        assert_eq!(
            (s.runs, s.next_run_at),
            (1, Some(at("2026-01-01T00:00:02Z")))
        );
        let due = at("2026-01-01T00:00:02Z");
        record(&mut s, &Run::Created("j2".to_owned()), due, due, true);
        assert_eq!((s.runs, s.next_run_at), (2, None));
        assert_eq!(s.last_job_id.as_deref(), Some("j2"));
    }

    #[test]
    fn a_skipped_run_is_counted_and_the_schedule_moves_on() {
        let mut s = every_second(Some(2));
        s.last_job_id = Some("j1".to_owned());
        let due = at("2026-01-01T00:00:01Z");
        record(&mut s, &Run::Skipped, due, due, true);
        assert_eq!((s.runs, s.skipped), (0, 1));
        assert_eq!(
            s.last_job_id.as_deref(),
            Some("j1"),
            "still the unfinished one"
        );
        assert_eq!(s.next_run_at, Some(at("2026-01-01T00:00:02Z")));
    }

    #[test]
    fn a_refused_run_is_skipped_not_retried() {
        let mut s = every_second(None);
        let due = at("2026-01-01T00:00:01Z");
        // Handled late (no leader for a minute): no spinning through the missed slots.
        let now = at("2026-01-01T00:01:00.500Z");
        record(
            &mut s,
            &Run::Refused("job.profile: unknown".to_owned()),
            due,
            now,
            true,
        );
        assert_eq!(s.runs, 0);
        assert_eq!(s.last_error.as_deref(), Some("job.profile: unknown"));
        assert_eq!(s.next_run_at, Some(at("2026-01-01T00:01:01Z")));
    }
}
