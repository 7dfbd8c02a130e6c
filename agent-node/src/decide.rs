//! What becomes of a job once its container is done: a pure decision from how the attempt
//! ended and what the job asked for. `job.rs` carries it out.

use flotilla_proto::{JobRequest, JobResult, JobStatus, Usage};

use crate::{
    job::{Outcome, Stop},
    script,
    workspace::Collected,
};

/// Everything the decision looks at.
pub(crate) struct Ended<'a> {
    pub(crate) outcome: &'a Outcome,
    pub(crate) request: &'a JobRequest,
    pub(crate) attempt: u32,
    /// How often JetStream has delivered the job's message.
    pub(crate) delivered: i64,
    /// The consumer's delivery limit.
    pub(crate) max_deliver: i64,
    /// The tail of the attempt's output (where the job script reports a failed pre-hook).
    pub(crate) tail: &'a str,
    /// The engine's output parsed into a result.
    pub(crate) parsed: Parsed,
}

/// The engine's output as a result, what it reported spending, and whether it reported an
/// error while exiting 0.
pub(crate) struct Parsed {
    pub(crate) result: JobResult,
    pub(crate) usage: Option<Usage>,
    pub(crate) engine_error: bool,
    /// A workspace step the job asked for (its push, say) failed: the job fails with it.
    pub(crate) workspace_error: Option<String>,
}

impl Parsed {
    /// A result with nothing parsed out of it: no usage, no reported error.
    pub(crate) fn plain(result: JobResult) -> Self {
        Self {
            result,
            usage: None,
            engine_error: false,
            workspace_error: None,
        }
    }

    /// Adds what came out of the job's workspace.
    pub(crate) fn add_workspace(&mut self, collected: Collected) {
        let result = &mut self.result;
        result.base_commit = collected.base_commit;
        result.diff_stat = collected.diff_stat;
        result.artifacts = collected.artifacts;
        result.branch = collected.branch;
        result.commit = collected.commit;
        result.pull_request_url = collected.pull_request_url;
        result.workspace_saved = collected.workspace_saved;
        self.workspace_error = collected.error;
    }
}

/// What to do, in order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Decision {
    /// The node is shutting down: give the job back (release) and NAK its message at once.
    HandBack { reason: String },
    /// Another attempt, on any node: say `note` in the log, release with `error`, NAK the
    /// message with a backoff.
    RunAgain { error: String, note: String },
    /// The job is done: record the outcome (the finish transition), end the log stream, ack.
    Record(Box<Record>),
}

/// The outcome to record.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Record {
    pub(crate) end: Final,
    pub(crate) result: JobResult,
    pub(crate) usage: Option<Usage>,
    pub(crate) start_ms: Option<f64>,
}

impl Record {
    /// A job that failed without running to an exit code (the infrastructure gave up) also
    /// goes to the dead-letter stream.
    pub(crate) fn dead_letter(&self) -> bool {
        self.end.exit_code.is_none()
    }
}

/// How the attempt ended, as the record says it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Final {
    pub(crate) status: JobStatus,
    pub(crate) exit_code: Option<i64>,
    pub(crate) error: Option<String>,
    /// How the attempt ended, for the attempts history.
    pub(crate) outcome: String,
}

impl Final {
    fn failed(exit_code: Option<i64>, error: String) -> Self {
        Self {
            status: JobStatus::Failed,
            exit_code,
            error: Some(error.clone()),
            outcome: error,
        }
    }
}

pub(crate) fn decide(ended: Ended<'_>) -> Decision {
    let attempt = ended.attempt;
    let deliveries_left = ended.delivered < ended.max_deliver;
    match ended.outcome {
        Outcome::Exited {
            stop: Some(Stop::Shutdown),
            ..
        } => {
            return Decision::HandBack {
                reason: "node shut down before the job finished".to_owned(),
            };
        }
        Outcome::Infrastructure(error) if deliveries_left => {
            return Decision::RunAgain {
                error: error.clone(),
                note: format!("attempt {attempt} failed: {error}; retrying"),
            };
        }
        _ => {}
    }
    let mut end = final_of(&ended);
    // A CLI that exits 0 but reports an error result (API failure, max turns) failed the job.
    if ended.parsed.engine_error && end.status == JobStatus::Completed {
        let summary: String = ended.parsed.result.text.chars().take(300).collect();
        end = Final::failed(
            end.exit_code,
            format!("the engine reported an error: {summary}"),
        );
    }
    if let Some(error) = &ended.parsed.workspace_error
        && end.status == JobStatus::Completed
    {
        end = Final::failed(end.exit_code, error.clone());
    }
    let retries = ended.request.retries;
    if end.status == JobStatus::Failed
        && retryable(ended.outcome)
        && attempt <= retries
        && deliveries_left
    {
        let error = end.outcome;
        let note =
            format!("attempt {attempt} failed: {error}; retrying ({attempt} of {retries} retries)");
        return Decision::RunAgain { error, note };
    }
    let start_ms = match ended.outcome {
        Outcome::Exited { start_ms, .. } => Some(*start_ms),
        Outcome::Infrastructure(_) | Outcome::Refused(_) => None,
    };
    Decision::Record(Box::new(Record {
        end,
        result: ended.parsed.result,
        usage: ended.parsed.usage,
        start_ms,
    }))
}

/// What `retries` may run again: the job itself failed, nobody stopped it and it did not run
/// out of memory (the same limit would kill it again).
fn retryable(outcome: &Outcome) -> bool {
    matches!(
        outcome,
        Outcome::Exited {
            stop: None,
            oom_killed: false,
            ..
        }
    )
}

fn final_of(ended: &Ended<'_>) -> Final {
    match ended.outcome {
        // Not retried: the same message breaks the same bound on every node.
        Outcome::Refused(error) => Final::failed(None, error.clone()),
        Outcome::Infrastructure(error) => Final {
            error: Some(format!(
                "{error} (gave up after {} attempts)",
                ended.attempt
            )),
            status: JobStatus::Failed,
            exit_code: None,
            outcome: error.clone(),
        },
        Outcome::Exited {
            exit_code,
            stop: None,
            oom_killed: true,
            ..
        } => Final::failed(
            Some(*exit_code),
            format!(
                "out of memory: killed at its {} MiB limit (exit code {exit_code})",
                ended.request.resources.memory_bytes >> 20
            ),
        ),
        Outcome::Exited {
            exit_code: script::PRE_HOOK_FAILED,
            stop: None,
            ..
        } if ended.tail.contains(script::PRE_HOOK_MARKER) => {
            let line = ended
                .tail
                .lines()
                .rev()
                .find(|l| l.contains(script::PRE_HOOK_MARKER))
                .unwrap_or_default();
            let error = line.trim_start_matches("flotilla: ").to_owned();
            Final::failed(Some(script::PRE_HOOK_FAILED), error)
        }
        Outcome::Exited {
            exit_code, stop, ..
        } => final_state(*exit_code, *stop, ended.request.timeout_seconds),
    }
}

/// The record's view of a process that exited with `exit_code`, stopped by `stop` if anyone
/// stopped it.
pub(crate) fn final_state(exit_code: i64, stop: Option<Stop>, timeout_seconds: u64) -> Final {
    let (status, error) = match stop {
        Some(Stop::Timeout) => (
            JobStatus::Failed,
            Some(format!("timed out after {timeout_seconds}s")),
        ),
        Some(Stop::Cancelled) => (JobStatus::Cancelled, Some("cancelled".to_owned())),
        Some(Stop::Shutdown) => (JobStatus::Failed, Some("node shut down".to_owned())),
        Some(Stop::Budget) => (JobStatus::Failed, Some("budget exceeded".to_owned())),
        None if exit_code == 0 => (JobStatus::Completed, None),
        None => (
            JobStatus::Failed,
            Some(format!("exited with code {exit_code}")),
        ),
    };
    let outcome = error.clone().unwrap_or_else(|| "completed".to_owned());
    Final {
        status,
        exit_code: Some(exit_code),
        error,
        outcome,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exited(exit_code: i64, stop: Option<Stop>, oom_killed: bool) -> Outcome {
        Outcome::Exited {
            exit_code,
            stop,
            start_ms: 2.0,
            oom_killed,
        }
    }

    fn parsed(text: &str, engine_error: bool) -> Parsed {
        Parsed {
            result: JobResult {
                text: text.to_owned(),
                ..JobResult::default()
            },
            usage: None,
            engine_error,
            workspace_error: None,
        }
    }

    /// The decision for `outcome` on attempt `attempt` of a job with `retries`, its message
    /// delivered `delivered` times of at most 5.
    fn decision(outcome: Outcome, retries: u32, attempt: u32, delivered: i64) -> Decision {
        decide_with(
            outcome,
            retries,
            attempt,
            delivered,
            "",
            parsed("out", false),
        )
    }

    fn decide_with(
        outcome: Outcome,
        retries: u32,
        attempt: u32,
        delivered: i64,
        tail: &str,
        parsed: Parsed,
    ) -> Decision {
        let request = JobRequest {
            retries,
            timeout_seconds: 5,
            ..JobRequest::example("a-1", "shell", "true")
        };
        decide(Ended {
            outcome: &outcome,
            request: &request,
            attempt,
            delivered,
            max_deliver: 5,
            tail,
            parsed,
        })
    }

    fn recorded(decision: Decision) -> Record {
        match decision {
            Decision::Record(record) => *record,
            other => panic!("expected a record, got {other:?}"),
        }
    }

    #[test]
    fn outcome_mapping() {
        assert_eq!(final_state(0, None, 5).status, JobStatus::Completed);
        let failed = final_state(3, None, 5);
        assert_eq!(failed.status, JobStatus::Failed);
        assert_eq!(failed.error.as_deref(), Some("exited with code 3"));
        let timeout = final_state(143, Some(Stop::Timeout), 5);
        assert_eq!(timeout.error.as_deref(), Some("timed out after 5s"));
        assert_eq!(
            final_state(137, Some(Stop::Cancelled), 5).status,
            JobStatus::Cancelled
        );
    }

    #[test]
    fn a_clean_exit_is_recorded_with_its_result() {
        let record = recorded(decision(exited(0, None, false), 0, 1, 1));
        assert_eq!(record.end.status, JobStatus::Completed);
        assert_eq!(record.result.text, "out");
        assert_eq!(record.start_ms, Some(2.0));
        assert!(!record.dead_letter());
    }

    #[test]
    fn shutdown_hands_the_job_back() {
        let decision = decision(exited(143, Some(Stop::Shutdown), false), 0, 1, 1);
        assert!(
            matches!(decision, Decision::HandBack { .. }),
            "{decision:?}"
        );
    }

    #[test]
    fn infrastructure_failures_run_again_until_the_deliveries_run_out() {
        let again = decision(Outcome::Infrastructure("docker broke".into()), 0, 2, 2);
        assert_eq!(
            again,
            Decision::RunAgain {
                error: "docker broke".into(),
                note: "attempt 2 failed: docker broke; retrying".into()
            }
        );
        let given_up = recorded(decision(
            Outcome::Infrastructure("docker broke".into()),
            0,
            5,
            5,
        ));
        assert_eq!(
            given_up.end.error.as_deref(),
            Some("docker broke (gave up after 5 attempts)")
        );
        assert_eq!(given_up.start_ms, None);
        assert!(given_up.dead_letter());
    }

    #[test]
    fn retries_cover_engine_failures_only() {
        let again = decision(exited(1, None, false), 2, 1, 1);
        assert_eq!(
            again,
            Decision::RunAgain {
                error: "exited with code 1".into(),
                note: "attempt 1 failed: exited with code 1; retrying (1 of 2 retries)".into()
            }
        );
        // The last allowed attempt failed: recorded.
        let last = recorded(decision(exited(1, None, false), 2, 3, 3));
        assert_eq!(last.end.status, JobStatus::Failed);
        // Timeouts, cancels and OOM kills are not retried.
        for outcome in [
            exited(143, Some(Stop::Timeout), false),
            exited(137, Some(Stop::Cancelled), false),
            exited(137, None, true),
        ] {
            assert!(matches!(decision(outcome, 5, 1, 1), Decision::Record(_)));
        }
    }

    #[test]
    fn oom_and_pre_hook_failures_say_what_happened() {
        let oom = recorded(decision(exited(137, None, true), 0, 1, 1));
        assert_eq!(
            oom.end.error.as_deref(),
            Some("out of memory: killed at its 1024 MiB limit (exit code 137)")
        );
        let tail = format!("boot\n{} with exit code 7\n", script::PRE_HOOK_MARKER);
        let hook = recorded(decide_with(
            exited(script::PRE_HOOK_FAILED, None, false),
            0,
            1,
            1,
            &tail,
            parsed("", false),
        ));
        assert_eq!(
            hook.end.error.as_deref(),
            Some("pre-hook failed with exit code 7")
        );
    }

    #[test]
    fn a_job_refused_by_the_recheck_fails_at_once() {
        // Retries and deliveries left: a message that breaks a bound breaks it every time.
        let refused = Outcome::Refused("timeout_seconds must be between 1 and 86400".into());
        let record = recorded(decision(refused, 5, 1, 1));
        assert_eq!(record.end.status, JobStatus::Failed);
        assert_eq!(
            record.end.error.as_deref(),
            Some("timeout_seconds must be between 1 and 86400")
        );
        assert_eq!(record.end.exit_code, None);
        assert_eq!(record.start_ms, None);
        assert!(record.dead_letter());
    }

    #[test]
    fn an_engine_that_reports_an_error_fails_the_job() {
        let record = recorded(decide_with(
            exited(0, None, false),
            0,
            1,
            1,
            "",
            parsed("API error: overloaded", true),
        ));
        assert_eq!(record.end.status, JobStatus::Failed);
        assert_eq!(
            record.end.error.as_deref(),
            Some("the engine reported an error: API error: overloaded")
        );
    }
}
