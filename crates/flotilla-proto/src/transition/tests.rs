//! Every state against every transition, then the details of the ones that carry data.

use chrono::{Duration, TimeZone, Utc};

use super::*;
use crate::JobRequest;

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 12, 3, 12, 0, 0).unwrap()
}

fn pending() -> JobRecord {
    JobRecord::pending(&JobRequest::example("a-1", "shell", "true"))
}

/// `record` claimed by `node` for its next attempt.
fn claimed(record: &JobRecord, node: &str) -> JobRecord {
    claim_by(node, 2).apply(record, now()).expect("claim")
}

fn claim_by(node: &str, delivered: i64) -> Transition {
    Transition::Claim {
        node_id: node.to_owned(),
        ack_subject: Some("$JS.ACK.x".to_owned()),
        delivered,
    }
}

fn finish(node: &str, attempt: u32, status: JobStatus) -> Transition {
    Transition::Finish(Box::new(Finish {
        node_id: node.to_owned(),
        attempt,
        status,
        exit_code: Some(0),
        error: None,
        outcome: "completed".to_owned(),
        result: JobResult::default(),
        usage: None,
        start_ms: Some(1.5),
        max_budget_usd: None,
    }))
}

fn release(node: &str, attempt: u32) -> Transition {
    Transition::Release {
        node_id: node.to_owned(),
        attempt,
        reason: "exited with code 1".to_owned(),
    }
}

/// The states a record can be in, each as the transitions below see it: "ours" is attempt 1
/// on node `n1`, which is what the fenced transitions name.
fn states() -> Vec<(&'static str, JobRecord)> {
    let queued = pending();
    let running = claimed(&queued, "n1");
    let requeued = Transition::Requeue {
        node_id: "n1".to_owned(),
    }
    .apply(&running, now())
    .unwrap();
    let elsewhere = claimed(&requeued, "n2");
    let cancel = |r: &JobRecord| Transition::Cancel.apply(r, now()).unwrap();
    let completed = finish("n1", 1, JobStatus::Completed)
        .apply(&running, now())
        .unwrap();
    let failed = finish("n1", 1, JobStatus::Failed)
        .apply(&running, now())
        .unwrap();
    vec![
        ("pending", queued.clone()),
        ("pending again", requeued),
        ("running here", running.clone()),
        ("running elsewhere", elsewhere),
        ("cancelled queued", cancel(&queued)),
        ("cancelled running", cancel(&running)),
        ("completed", completed),
        ("failed", failed),
    ]
}

fn transitions() -> Vec<(&'static str, Transition)> {
    vec![
        ("claim (first delivery)", claim_by("n3", 1)),
        ("claim (redelivery)", claim_by("n3", 2)),
        ("finish", finish("n1", 1, JobStatus::Completed)),
        ("release", release("n1", 1)),
        (
            "requeue",
            Transition::Requeue {
                node_id: "n1".to_owned(),
            },
        ),
        ("cancel", Transition::Cancel),
        (
            "time out",
            Transition::TimeOut {
                queued_limit_secs: 60,
            },
        ),
        ("dead-letter", Transition::DeadLetter { deliveries: 5 }),
        (
            "wait",
            Transition::Wait {
                reason: Some("no live node".to_owned()),
            },
        ),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Want {
    To(JobStatus),
    Unchanged,
    Ended,
    Duplicate,
    Fenced,
    NotApplicable,
}

use JobStatus::{Cancelled as C, Completed as D, Failed as F, Pending as P, Running as R};
use Want::{Duplicate as Dup, Ended as End, Fenced as Fen, NotApplicable as NA, To, Unchanged};

/// Rows: `states()`; columns: `transitions()`.
const TABLE: [[Want; 9]; 8] = [
    //  claim1    claim2    finish    release       requeue  cancel  timeout  dead-letter  wait
    [To(R), To(R), Fen, Fen, NA, To(C), To(F), To(F), To(P)], // pending
    [Dup, To(R), Fen, Fen, NA, To(C), To(F), To(F), To(P)],   // pending again
    [Dup, To(R), To(D), To(P), To(P), To(C), NA, To(F), NA],  // running here
    [Dup, To(R), Fen, Fen, NA, To(C), NA, To(F), NA],         // running elsewhere
    [End, End, Fen, Fen, NA, End, NA, End, NA],               // cancelled queued
    [End, End, To(C), Unchanged, NA, End, NA, End, NA],       // cancelled running
    [End, End, Fen, Fen, NA, End, NA, End, NA],               // completed
    [End, End, Fen, Fen, NA, End, NA, End, NA],               // failed
];

fn outcome(before: &JobRecord, result: Result<JobRecord, Refusal>) -> Want {
    match result {
        Ok(after) if after == *before => Want::Unchanged,
        Ok(after) => Want::To(after.status),
        Err(Refusal::Ended(_)) => Want::Ended,
        Err(Refusal::Duplicate { .. }) => Want::Duplicate,
        Err(Refusal::Fenced { .. }) => Want::Fenced,
        Err(Refusal::NotApplicable { .. }) => Want::NotApplicable,
    }
}

#[test]
fn every_state_against_every_transition() {
    let states = states();
    let transitions = transitions();
    assert_eq!(states.len(), TABLE.len());
    let mut wrong = Vec::new();
    for ((state, record), row) in states.iter().zip(TABLE) {
        for ((name, transition), want) in transitions.iter().zip(row) {
            let got = outcome(record, transition.apply(record, now()));
            if got != want {
                wrong.push(format!("{name} on {state}: got {got:?}, want {want:?}"));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn only_a_claim_raises_the_attempt_and_only_by_one() {
    for (state, record) in states() {
        for (name, transition) in transitions() {
            let Ok(after) = transition.apply(&record, now()) else {
                continue;
            };
            let raised = after.attempt - record.attempt;
            let want = u32::from(matches!(transition, Transition::Claim { .. }));
            assert_eq!(raised, want, "{name} on {state}");
            assert!(
                after.attempts.len() as u32 == after.attempt,
                "{name} on {state}"
            );
        }
    }
}

#[test]
fn a_claim_opens_an_attempt_and_closes_a_vanished_one() {
    let first = claimed(&pending(), "n1");
    assert_eq!(first.node_id.as_deref(), Some("n1"));
    assert_eq!(first.started_at, Some(now()));
    assert_eq!(first.ack_subject.as_deref(), Some("$JS.ACK.x"));
    let second = claimed(&first, "n2");
    assert_eq!(second.attempt, 2);
    assert_eq!(second.attempts[0].outcome.as_deref(), Some("lease expired"));
    assert_eq!(second.attempts[1].node_id, "n2");
    assert!(second.attempts[1].finished_at.is_none());
}

#[test]
fn finish_records_the_outcome_and_keeps_a_cancel() {
    let running = claimed(&pending(), "n1");
    let done = finish("n1", 1, JobStatus::Completed)
        .apply(&running, now())
        .unwrap();
    assert_eq!(done.finished_at, Some(now()));
    assert_eq!(done.ack_subject, None);
    assert_eq!(done.attempts[0].outcome.as_deref(), Some("completed"));
    assert_eq!(done.attempts[0].start_ms, Some(1.5));
    assert!(done.result.is_some());

    let cancelled = Transition::Cancel.apply(&running, now()).unwrap();
    let later = now() + Duration::seconds(5);
    let kept = finish("n1", 1, JobStatus::Completed)
        .apply(&cancelled, later)
        .unwrap();
    assert_eq!(kept.status, JobStatus::Cancelled);
    assert_eq!(kept.error.as_deref(), Some("cancelled by request"));
    assert_eq!(kept.finished_at, Some(now()), "the cancel's time stays");
    assert!(kept.result.is_some(), "the output produced so far is kept");
}

#[test]
fn metered_usage_wins_and_a_spent_budget_fails_the_job() {
    let mut running = claimed(&pending(), "n1");
    running.usage = Some(Usage {
        cost_usd: 0.5,
        metered: true,
        budget_exceeded: true,
        ..Usage::default()
    });
    let Transition::Finish(mut data) = finish("n1", 1, JobStatus::Completed) else {
        unreachable!()
    };
    data.usage = Some(Usage {
        cost_usd: 9.0,
        ..Usage::default()
    });
    data.max_budget_usd = Some(0.25);
    let after = Transition::Finish(data).apply(&running, now()).unwrap();
    assert_eq!(after.usage.as_ref().map(|u| u.cost_usd), Some(0.5));
    assert_eq!(after.status, JobStatus::Failed);
    assert_eq!(
        after.error.as_deref(),
        Some("budget exceeded: spent $0.5000 of its $0.25 max_budget_usd")
    );
}

#[test]
fn a_pending_job_says_what_it_waits_for_until_it_is_claimed() {
    let waiting = Transition::Wait {
        reason: Some("no live node offers gpu=a100".to_owned()),
    }
    .apply(&pending(), now())
    .unwrap();
    assert_eq!(
        waiting.waiting_for.as_deref(),
        Some("no live node offers gpu=a100")
    );
    assert_eq!(claimed(&waiting, "n1").waiting_for, None);
    let cleared = Transition::Wait { reason: None }
        .apply(&waiting, now())
        .unwrap();
    assert_eq!(cleared.waiting_for, None);
}

#[test]
fn release_and_requeue_say_why() {
    let running = claimed(&pending(), "n1");
    let released = release("n1", 1).apply(&running, now()).unwrap();
    assert_eq!(
        released.error.as_deref(),
        Some("attempt 1 failed: exited with code 1; retrying")
    );
    assert_eq!(released.node_id, None);
    assert_eq!(
        released.attempts[0].outcome.as_deref(),
        Some("exited with code 1")
    );
    let requeued = Transition::Requeue {
        node_id: "n1".to_owned(),
    }
    .apply(&running, now())
    .unwrap();
    assert_eq!(
        requeued.error.as_deref(),
        Some("node n1 lost during attempt 1; requeued")
    );
    assert_eq!(requeued.attempts[0].outcome.as_deref(), Some("node lost"));
}

#[test]
fn time_out_and_dead_letter_say_why() {
    let timed_out = Transition::TimeOut {
        queued_limit_secs: 60,
    }
    .apply(&pending(), now())
    .unwrap();
    assert_eq!(
        timed_out.error.as_deref(),
        Some("queued for more than 60s without starting")
    );
    let released = release("n1", 1)
        .apply(&claimed(&pending(), "n1"), now())
        .unwrap();
    let dead = Transition::DeadLetter { deliveries: 5 }
        .apply(&released, now())
        .unwrap();
    assert_eq!(
        dead.error.as_deref(),
        Some(
            "gave up after 5 deliveries; last error: attempt 1 failed: exited with code 1; retrying"
        )
    );
    assert_eq!(dead.finished_at, Some(now()));
}

/// A node whose claim committed but whose answer was lost tries the same claim again: it
/// holds already (same node, same delivery's ack subject), and nothing changes. Another
/// delivery's claim, or another node's, is still a new attempt or a duplicate.
#[test]
fn a_claim_retried_after_its_answer_was_lost_holds() {
    let first = claim_by("n1", 1).apply(&pending(), now()).unwrap();
    let again = claim_by("n1", 1).apply(&first, now()).unwrap();
    assert_eq!(again, first);
    let other_delivery = Transition::Claim {
        node_id: "n1".to_owned(),
        ack_subject: Some("$JS.ACK.y".to_owned()),
        delivered: 1,
    };
    assert!(other_delivery.apply(&first, now()).is_err());
    assert_eq!(claim_by("n2", 2).apply(&first, now()).unwrap().attempt, 2);
}
