//! Chaos: real processes, a real nats-server and real Docker, with nodes killed, frozen and
//! drained and NATS restarted under load. Every test checks: no job lost (all terminal and
//! completed), none completed twice, no orphan containers.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use flotilla_testkit::{Fleet, wait_until};
use reqwest::Method;
use serde_json::{Value, json};

use crate::{reliability::running_on, submit};

fn job(script: &str) -> Value {
    json!({ "agent_id": "chaos", "engine": "shell", "prompt": script })
}

/// Polls every job until all are terminal (tolerating a gateway that is briefly unavailable),
/// then checks each completed exactly once with the expected output.
async fn assert_all_completed_once(
    fleet: &Fleet,
    jobs: &[(String, String)],
    timeout: Duration,
) -> Vec<Value> {
    let mut records = Vec::with_capacity(jobs.len());
    for (job_id, expected) in jobs {
        let record = wait_until(timeout, &format!("job {job_id} to end"), || async {
            let response = fleet
                .request(Method::GET, &format!("/jobs/{job_id}"))
                .send()
                .await
                .ok()?;
            let record: Value = response.json().await.ok()?;
            matches!(
                record["status"].as_str(),
                Some("completed" | "failed" | "cancelled")
            )
            .then_some(record)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
        assert_eq!(record["status"], "completed", "lost or failed: {record}");
        assert_eq!(&record["result"]["text"], expected.as_str(), "{record}");
        let completions = record["attempts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["outcome"] == "completed")
            .count();
        assert_eq!(completions, 1, "completed {completions} times: {record}");
        records.push(record);
    }
    records
}

#[tokio::test]
async fn sigkill_a_node_while_it_runs_jobs() {
    let mut fleet = Fleet::builder().nodes(3).slots(2).start().await.unwrap();
    let mut jobs = Vec::new();
    for i in 0..12 {
        let id = submit(&fleet, job(&format!("sleep 2; echo job {i}"))).await;
        jobs.push((id, format!("job {i}\n")));
    }
    let victim = running_on(&fleet, &jobs[0].0).await;
    fleet.nodes[victim].signal("KILL");

    let records = assert_all_completed_once(&fleet, &jobs, Duration::from_secs(90)).await;
    let lost = records
        .iter()
        .filter(|r| r["attempts"][0]["outcome"] == "node lost")
        .count();
    assert!(
        lost >= 1,
        "the killed node's jobs should show a lost attempt"
    );
    assert!(
        records
            .iter()
            .all(|r| r["node_id"] != fleet.node_ids[victim].as_str())
    );

    fleet.restart_node(victim).unwrap();
    fleet.assert_no_containers_left().await.unwrap();
}

#[tokio::test]
async fn restart_nats_while_jobs_run() {
    let mut fleet = Fleet::builder().nodes(3).slots(2).start().await.unwrap();
    let mut jobs = Vec::new();
    for i in 0..12 {
        let id = submit(
            &fleet,
            job(&format!(
                "for s in 1 2 3 4; do sleep 0.5; done; echo job {i}"
            )),
        )
        .await;
        jobs.push((id, format!("job {i}\n")));
    }
    running_on(&fleet, &jobs[0].0).await;
    fleet.nats.restart().await.unwrap();

    assert_all_completed_once(&fleet, &jobs, Duration::from_secs(120)).await;
    fleet.assert_no_containers_left().await.unwrap();
}

#[tokio::test]
async fn a_frozen_node_loses_its_lease_and_its_late_result_is_rejected() {
    let fleet = Fleet::builder().nodes(2).start().await.unwrap();
    let job_id = submit(&fleet, job("echo begin; sleep 3; echo end")).await;
    let frozen = running_on(&fleet, &job_id).await;
    fleet.nodes[frozen].signal("STOP");

    let moved = wait_until(
        Duration::from_secs(10),
        "the lease to move to the other node",
        || async {
            let record: Value = fleet
                .request(Method::GET, &format!("/jobs/{job_id}"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (record["attempt"] == 2 && record["status"] == "running").then_some(record)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
    assert_ne!(moved["node_id"], fleet.node_ids[frozen].as_str());
    fleet.nodes[frozen].signal("CONT");

    let records = assert_all_completed_once(
        &fleet,
        &[(job_id.clone(), "begin\nend\n".to_owned())],
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(records[0]["attempts"][0]["outcome"], "node lost");
    assert_eq!(records[0]["attempt"], 2);
    // The healed node finished its copy too, and was refused.
    wait_until(
        Duration::from_secs(20),
        "the healed node to report its rejected result",
        || async {
            fleet.nodes[frozen]
                .log()
                .contains("late result rejected")
                .then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
    let (_, record) = crate::get_job(&fleet, &job_id).await;
    assert_eq!(
        record["attempt"], 2,
        "the late result must not overwrite the new attempt"
    );
    fleet.assert_no_containers_left().await.unwrap();
}

#[tokio::test]
async fn sigterm_drains_a_node_under_load() {
    let mut fleet = Fleet::builder().nodes(2).slots(2).start().await.unwrap();
    let mut jobs = Vec::new();
    for i in 0..8 {
        let id = submit(&fleet, job(&format!("sleep 1.5; echo job {i}"))).await;
        jobs.push((id, format!("job {i}\n")));
    }
    let draining = running_on(&fleet, &jobs[0].0).await;
    fleet.nodes[draining].signal("TERM");
    let exit = wait_until(Duration::from_secs(30), "the drained node to exit", || {
        let code = fleet.nodes[draining].try_exit_code();
        async move { code }
    })
    .await
    .unwrap();
    assert_eq!(exit, Some(0), "drain must exit 0\n{}", fleet.logs());
    // A stopped node leaves nothing behind, warm pool included.
    let left = flotilla_testkit::containers_with_label(
        flotilla_proto::names::LABEL_NODE,
        &fleet.node_ids[draining],
    )
    .unwrap();
    assert!(
        left.is_empty(),
        "containers left by the drained node: {left:?}"
    );

    let records = assert_all_completed_once(&fleet, &jobs, Duration::from_secs(60)).await;
    // What the node was running when told to stop, it finished itself: nothing was re-run.
    let drained = records
        .iter()
        .filter(|r| r["node_id"] == fleet.node_ids[draining].as_str())
        .count();
    assert!(
        drained >= 1,
        "the draining node's running jobs should finish there"
    );
    assert!(
        records.iter().all(|r| r["attempt"] == 1),
        "a drained job ran twice"
    );
    fleet.assert_no_containers_left().await.unwrap();
}

#[tokio::test]
async fn a_drain_longer_than_the_grace_period_hands_jobs_back() {
    let mut fleet = Fleet::builder()
        .nodes(2)
        .slots(1)
        .drain_grace_secs(1)
        .start()
        .await
        .unwrap();
    let job_id = submit(&fleet, job("sleep 4; echo survived")).await;
    let draining = running_on(&fleet, &job_id).await;
    fleet.nodes[draining].signal("TERM");
    let exit = wait_until(Duration::from_secs(30), "the drained node to exit", || {
        let code = fleet.nodes[draining].try_exit_code();
        async move { code }
    })
    .await
    .unwrap();
    assert_eq!(exit, Some(0));
    let records = assert_all_completed_once(
        &fleet,
        &[(job_id, "survived\n".to_owned())],
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(
        records[0]["attempts"][0]["outcome"],
        "node shut down before the job finished"
    );
    assert_eq!(records[0]["attempt"], 2);
    fleet.assert_no_containers_left().await.unwrap();
}

#[tokio::test]
async fn five_hundred_jobs_as_fast_as_possible() {
    let fleet = Fleet::builder().nodes(3).slots(4).start().await.unwrap();
    let started = Instant::now();
    let submitters: Vec<_> = (0..10)
        .map(|worker| {
            let http = fleet.http.clone();
            let api = fleet.api.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in (worker..500).step_by(10) {
                    let response = http
                        .post(format!("{api}/jobs"))
                        .json(&job(&format!("echo job {i}")))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status(), 202);
                    let body: Value = response.json().await.unwrap();
                    ids.push((
                        body["job_id"].as_str().unwrap().to_owned(),
                        format!("job {i}\n"),
                    ));
                }
                ids
            })
        })
        .collect();
    let mut jobs = Vec::new();
    for submitter in submitters {
        jobs.extend(submitter.await.unwrap());
    }
    let submitted = started.elapsed();
    let records = assert_all_completed_once(&fleet, &jobs, Duration::from_secs(400)).await;
    let elapsed = started.elapsed();
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for record in &records {
        *per_node
            .entry(record["node_id"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    println!(
        "500 jobs: submitted in {submitted:?}, all completed in {elapsed:?} ({:.1} jobs/s); per node {per_node:?}",
        500.0 / elapsed.as_secs_f64()
    );
    assert_eq!(
        per_node.len(),
        3,
        "every node should take work: {per_node:?}"
    );
    fleet.assert_no_containers_left().await.unwrap();
}
