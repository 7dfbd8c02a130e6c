//! Schedules: the dispatcher leader creates a schedule's jobs as they fall due, through the
//! normal submission path; the gateway validates schedules (their job template as `POST /jobs`
//! would) and stores them.

use std::time::Duration;

use flotilla_testkit::{Fleet, wait_until};
use reqwest::Method;
use serde_json::{Value, json};

use crate::{openapi::assert_fits, shell};

const KEY: &str = "a-long-enough-schedule-key";

async fn spec(fleet: &Fleet) -> Value {
    fleet
        .request(Method::GET, "/openapi.json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn call(fleet: &Fleet, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut request = fleet.request(method, path);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn create(fleet: &Fleet, body: Value) -> Value {
    let (status, schedule) = call(fleet, Method::POST, "/schedules", Some(body.clone())).await;
    assert_eq!(status, 201, "{body} -> {schedule}\n{}", fleet.logs());
    schedule
}

async fn schedule_of(fleet: &Fleet, id: &str) -> (u16, Value) {
    call(fleet, Method::GET, &format!("/schedules/{id}"), None).await
}

/// The jobs a schedule created, as `GET /jobs?metadata.schedule_id=<id>` lists them.
async fn runs_of(fleet: &Fleet, id: &str) -> Vec<Value> {
    let (status, list) = call(
        fleet,
        Method::GET,
        &format!("/jobs?metadata.schedule_id={id}&limit=200"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{list}");
    list["jobs"].as_array().unwrap().clone()
}

/// Waits until schedule `id` has run `runs` times and stopped.
async fn until_finished(fleet: &Fleet, id: &str, runs: u64) -> Value {
    wait_until(
        Duration::from_secs(30),
        "the schedule's last run",
        || async {
            let (_, schedule) = schedule_of(fleet, id).await;
            (schedule["runs"] == runs && schedule["next_run_at"].is_null()).then_some(schedule)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()))
}

#[tokio::test]
async fn an_interval_schedule_runs_max_runs_jobs_then_stops() {
    let fleet = Fleet::builder().start().await.unwrap();
    let spec = spec(&fleet).await;
    let created = create(
        &fleet,
        json!({"name": "ticker", "interval_seconds": 1, "max_runs": 2, "job": shell("echo tick")}),
    )
    .await;
    assert_fits(&spec, "post", "/schedules", 201, &created);
    let id = created["schedule_id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("sched-"), "{created}");
    assert_eq!(created["runs"], 0);
    assert_eq!(created["timezone"], "UTC");
    assert_eq!(created["enabled"], true);
    assert!(created["next_run_at"].is_string(), "{created}");

    let finished = until_finished(&fleet, &id, 2).await;
    assert_fits(&spec, "get", "/schedules/{schedule_id}", 200, &finished);
    assert!(finished["last_error"].is_null(), "{finished}");

    // Exactly two jobs, both completed, each carrying the schedule's id.
    let jobs = wait_until(Duration::from_secs(30), "both runs completed", || async {
        let jobs = runs_of(&fleet, &id).await;
        jobs.iter()
            .all(|job| job["status"] == "completed")
            .then_some(jobs)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
    assert_eq!(jobs.len(), 2, "{jobs:#?}");
    for job in &jobs {
        let job_id = job["job_id"].as_str().unwrap();
        assert!(job_id.starts_with(&format!("sched-{id}-")), "{job_id}");
        assert_eq!(job["metadata"]["schedule_id"], id.as_str());
        assert_eq!(job["result"]["text"], "tick\n");
    }
    assert!(
        jobs.iter()
            .any(|job| job["job_id"] == finished["last_job_id"]),
        "{finished}"
    );

    let (status, list) = call(&fleet, Method::GET, "/schedules", None).await;
    assert_eq!(status, 200);
    assert_fits(&spec, "get", "/schedules", 200, &list);
    assert_eq!(list["schedules"].as_array().unwrap().len(), 1);
    assert_eq!(list["schedules"][0]["schedule_id"], id.as_str());
}

#[tokio::test]
async fn deleting_or_disabling_a_schedule_stops_its_runs() {
    let fleet = Fleet::builder().start().await.unwrap();
    let spec = spec(&fleet).await;

    // Disable and re-enable: no run is due while disabled; enabling plans one afresh.
    let hourly = create(
        &fleet,
        json!({"schedule_id": "hourly", "cron": "0 * * * *", "timezone": "Europe/Paris", "job": shell("true")}),
    )
    .await;
    assert!(hourly["next_run_at"].is_string(), "{hourly}");
    let (status, disabled) = call(
        &fleet,
        Method::PATCH,
        "/schedules/hourly",
        Some(json!({"enabled": false})),
    )
    .await;
    assert_eq!(status, 200, "{disabled}");
    assert_fits(&spec, "patch", "/schedules/{schedule_id}", 200, &disabled);
    assert_eq!(disabled["enabled"], false);
    assert!(disabled["next_run_at"].is_null(), "{disabled}");
    let (_, enabled) = call(
        &fleet,
        Method::PATCH,
        "/schedules/hourly",
        Some(json!({"enabled": true})),
    )
    .await;
    assert_eq!(enabled["enabled"], true);
    assert!(enabled["next_run_at"].is_string(), "{enabled}");

    // Delete a running schedule right after its first run.
    let every = create(
        &fleet,
        json!({"schedule_id": "every-second", "interval_seconds": 1, "job": shell("echo run")}),
    )
    .await;
    assert_eq!(every["schedule_id"], "every-second");
    wait_until(Duration::from_secs(30), "the first run", || async {
        let (_, schedule) = schedule_of(&fleet, "every-second").await;
        (schedule["runs"].as_u64() >= Some(1)).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
    let (status, deleted) = call(&fleet, Method::DELETE, "/schedules/every-second", None).await;
    assert_eq!(status, 200, "{deleted}");
    assert_fits(&spec, "delete", "/schedules/{schedule_id}", 200, &deleted);
    let deleted_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert_eq!(schedule_of(&fleet, "every-second").await.0, 404);
    let (status, _) = call(&fleet, Method::DELETE, "/schedules/every-second", None).await;
    assert_eq!(status, 404);

    // A later condition: another schedule's two runs, due seconds after the deletion, have
    // been made by the same leader. By then a run of the deleted schedule would exist too.
    let witness = create(
        &fleet,
        json!({"schedule_id": "witness", "interval_seconds": 1, "max_runs": 2, "job": shell("true")}),
    )
    .await;
    assert_eq!(witness["runs"], 0);
    until_finished(&fleet, "witness", 2).await;

    // No run of the deleted schedule is due after its deletion (one being made at that very
    // moment is due before it); the runs it made complete normally.
    let jobs = wait_until(
        Duration::from_secs(30),
        "the deleted schedule's runs",
        || async {
            let jobs = runs_of(&fleet, "every-second").await;
            jobs.iter()
                .all(|job| job["status"] == "completed")
                .then_some(jobs)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
    assert!(!jobs.is_empty());
    for job in &jobs {
        let job_id = job["job_id"].as_str().unwrap();
        let due: u64 = job_id.rsplit('-').next().unwrap().parse().unwrap();
        assert!(
            due <= deleted_at,
            "{job_id} is due after the deletion ({deleted_at})"
        );
    }
    assert_eq!(schedule_of(&fleet, "hourly").await.1["runs"], 0);
}

#[tokio::test]
async fn schedules_are_validated_like_jobs_and_need_the_api_key() {
    let fleet = Fleet::builder()
        .nodes(0)
        .api_key(KEY)
        .start()
        .await
        .unwrap();
    let spec = spec(&fleet).await;

    let anonymous = reqwest::Client::new();
    for (method, path) in [
        (Method::GET, "/schedules"),
        (Method::POST, "/schedules"),
        (Method::GET, "/schedules/x"),
        (Method::PATCH, "/schedules/x"),
        (Method::DELETE, "/schedules/x"),
    ] {
        let response = anonymous
            .request(method.clone(), format!("{}{path}", fleet.api))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "{method} {path}");
    }

    let job = shell("true");
    for (body, code, field) in [
        (
            json!({"cron": "61 * * * *", "job": job}),
            "invalid_field",
            "cron",
        ),
        (
            json!({"cron": "* * * *", "job": job}),
            "invalid_field",
            "cron",
        ),
        (
            json!({"cron": "0 9 * * *", "timezone": "Mars/Olympus", "job": job}),
            "invalid_field",
            "timezone",
        ),
        (
            json!({"cron": "0 9 * * *", "interval_seconds": 60, "job": job}),
            "invalid_field",
            "cron",
        ),
        (json!({"job": job}), "missing_field", "cron"),
        (
            json!({"interval_seconds": 0, "job": job}),
            "invalid_field",
            "interval_seconds",
        ),
        (
            json!({"interval_seconds": 60, "max_runs": 0, "job": job}),
            "invalid_field",
            "max_runs",
        ),
        (json!({"interval_seconds": 60}), "missing_field", "job"),
        (
            json!({"interval_seconds": 60, "schedule_id": "a.b", "job": job}),
            "invalid_field",
            "schedule_id",
        ),
        (
            json!({"interval_seconds": 60, "job": {"agent_id": "e2e", "engine": "nope", "prompt": "x"}}),
            "unknown_engine",
            "job.engine",
        ),
        (
            json!({"interval_seconds": 60, "job": {"agent_id": "e2e", "engine": "shell", "prompt": "x", "profile": "gone"}}),
            "unknown_profile",
            "job.profile",
        ),
        (
            json!({"interval_seconds": 60, "job": {"engine": "shell", "prompt": "x"}}),
            "missing_field",
            "job.agent_id",
        ),
        (
            json!({"interval_seconds": 60, "job": {"agent_id": "e2e", "engine": "shell", "prompt": "x", "timeout_seconds": 0}}),
            "invalid_field",
            "job.timeout_seconds",
        ),
        (
            json!({"interval_seconds": 60, "job": {"job_id": "mine", "agent_id": "e2e", "engine": "shell", "prompt": "x"}}),
            "invalid_field",
            "job.job_id",
        ),
    ] {
        let (status, error) = call(&fleet, Method::POST, "/schedules", Some(body.clone())).await;
        assert_eq!(status, 422, "{body} -> {error}");
        assert_fits(&spec, "post", "/schedules", 422, &error);
        assert_eq!(error["error"]["code"], code, "{body} -> {error}");
        assert_eq!(error["error"]["field"], field, "{body} -> {error}");
    }
    let (status, list) = call(&fleet, Method::GET, "/schedules", None).await;
    assert_eq!(status, 200);
    assert_eq!(list["schedules"], json!([]), "nothing refused is kept");

    // Six-field cron (seconds first) is accepted; a taken id is a conflict.
    let body = json!({"schedule_id": "s6", "cron": "30 0 9 * * 1-5", "job": job});
    create(&fleet, body.clone()).await;
    let (status, error) = call(&fleet, Method::POST, "/schedules", Some(body)).await;
    assert_eq!(status, 409, "{error}");
    assert_fits(&spec, "post", "/schedules", 409, &error);
    assert_eq!(error["error"]["code"], "conflict");
    let (status, error) = schedule_of(&fleet, "no-such-schedule").await;
    assert_eq!(status, 404);
    assert_fits(&spec, "get", "/schedules/{schedule_id}", 404, &error);
}

const DOOMED: &str = r#"
[agent]
description = "Shell, deleted while a schedule uses it (test)"
engine = "shell"
"#;

#[tokio::test]
async fn a_run_whose_template_no_longer_validates_is_recorded_and_skipped() {
    let fleet = Fleet::builder()
        .nodes(0)
        .profile("doomed", DOOMED)
        .start()
        .await
        .unwrap();
    let created = create(
        &fleet,
        json!({"schedule_id": "orphan", "interval_seconds": 1,
            "job": {"agent_id": "e2e", "profile": "doomed", "prompt": "true"}}),
    )
    .await;
    assert_eq!(created["job"]["profile"], "doomed");
    let (status, deleted) = call(&fleet, Method::DELETE, "/configs/profile/doomed", None).await;
    assert_eq!(status, 200, "{deleted}");

    // Each due run is refused and skipped: the reason is kept, no job is made, and the
    // schedule moves on one slot at a time instead of spinning.
    let refused = wait_until(Duration::from_secs(30), "a refused run", || async {
        let (_, schedule) = schedule_of(&fleet, "orphan").await;
        schedule["last_error"].is_string().then_some(schedule)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
    let error = refused["last_error"].as_str().unwrap();
    assert!(error.starts_with("job.profile: "), "{refused}");
    assert_eq!(refused["runs"], 0);
    assert!(refused["last_job_id"].is_null());
    let first_next = refused["next_run_at"].as_str().unwrap().to_owned();
    let later = wait_until(Duration::from_secs(30), "the next refused run", || async {
        let (_, schedule) = schedule_of(&fleet, "orphan").await;
        (schedule["next_run_at"].as_str() != Some(first_next.as_str())).then_some(schedule)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
    assert_eq!(later["runs"], 0);
    assert!(later["last_error"].is_string());
    assert!(runs_of(&fleet, "orphan").await.is_empty());
}

#[tokio::test]
async fn skip_if_running_never_starts_a_run_beside_an_unfinished_one() {
    let fleet = Fleet::builder().start().await.unwrap();
    // Due every second, each run lasting longer than that.
    let created = create(
        &fleet,
        json!({"interval_seconds": 1, "max_runs": 2, "skip_if_running": true,
               "job": shell("sleep 2.5; echo done")}),
    )
    .await;
    assert_eq!(created["skip_if_running"], true);
    let id = created["schedule_id"].as_str().unwrap().to_owned();
    let finished = until_finished(&fleet, &id, 2).await;
    assert!(
        finished["skipped"].as_u64().unwrap() >= 1,
        "slots fell due while the first run slept: {finished}"
    );
    let jobs = wait_until(Duration::from_secs(30), "both runs completed", || async {
        let jobs = runs_of(&fleet, &id).await;
        (jobs.len() == 2 && jobs.iter().all(|job| job["status"] == "completed")).then_some(jobs)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
    // Newest first: the second run started only after the first had finished.
    let time = |job: &Value, field: &str| {
        chrono::DateTime::parse_from_rfc3339(job[field].as_str().unwrap()).unwrap()
    };
    assert!(
        time(&jobs[0], "created_at") >= time(&jobs[1], "finished_at"),
        "{jobs:#?}"
    );
}
