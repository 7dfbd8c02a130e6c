//! Container security, through real jobs in real containers. Each test fails if its property
//! breaks. No test sends a packet beyond this machine's loopback.

use std::time::Duration;

use flotilla_testkit::{Fleet, wait_until};
use serde_json::{Value, json};

use crate::{get_job, shell, submit, wait};

async fn run(fleet: &Fleet, body: Value) -> Value {
    let job_id = submit(fleet, body).await;
    wait(fleet, &job_id).await
}

fn text(job: &Value) -> String {
    format!(
        "{}{}",
        job["result"]["text"].as_str().unwrap_or(""),
        job["result"]["logs_tail"].as_str().unwrap_or("")
    )
}

#[tokio::test]
async fn jobs_run_unprivileged_and_cannot_escalate() {
    let fleet = Fleet::builder().start().await.unwrap();
    let job = run(
        &fleet,
        shell(
            "id -u; grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status; \
             su -c 'id -u' root 2>&1 || echo su-failed",
        ),
    )
    .await;
    let out = text(&job);
    assert!(out.starts_with("65534\n"), "{out}");
    assert!(out.contains("CapEff:\t0000000000000000"), "{out}");
    assert!(out.contains("CapBnd:\t0000000000000000"), "{out}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    assert!(out.contains("su-failed"), "{out}");
    assert!(!out.contains("\n0\n"), "became root: {out}");
}

#[tokio::test]
async fn the_root_filesystem_is_read_only_and_the_workspace_writable() {
    let fleet = Fleet::builder().start().await.unwrap();
    let job = run(
        &fleet,
        shell(
            "touch /etc/x 2>/dev/null && echo etc-writable; touch /usr/x 2>/dev/null && echo usr-writable; \
             touch /bin/x 2>/dev/null && echo bin-writable; echo kept > /workspace/f && cat /workspace/f; \
             echo tmp > /tmp/f && cat /tmp/f; \
             printf '#!/bin/sh\\necho ran\\n' > /workspace/x && chmod +x /workspace/x && /workspace/x; \
             grep -E ' /(workspace|tmp) ' /proc/mounts",
        ),
    )
    .await;
    assert_eq!(job["status"], "completed", "{job}");
    let text = job["result"]["text"].as_str().unwrap();
    // What the agent builds or installs there runs; set-uid bits and devices do not count.
    assert!(text.starts_with("kept\ntmp\nran\n"), "{text}");
    let mounts: Vec<&str> = text.lines().skip(3).collect();
    assert_eq!(mounts.len(), 2, "{text}");
    for mount in mounts {
        let options: Vec<&str> = mount.split(' ').nth(3).unwrap().split(',').collect();
        for wanted in ["rw", "nosuid", "nodev"] {
            assert!(options.contains(&wanted), "{mount}");
        }
        assert!(!options.contains(&"noexec"), "{mount}");
        assert!(options.iter().any(|o| o.starts_with("size=")), "{mount}");
    }
}

#[tokio::test]
async fn jobs_have_no_network_and_cannot_reach_the_host() {
    let fleet = Fleet::builder().start().await.unwrap();
    // A service on the host's loopback; the job tries the same port on its own loopback.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let job = run(
        &fleet,
        shell(&format!(
            "ls /sys/class/net; echo routes $(tail -n +2 /proc/net/route | wc -l); \
             nc -w 2 127.0.0.1 {port} </dev/null && echo reached-host || echo host-unreachable"
        )),
    )
    .await;
    assert_eq!(
        job["result"]["text"], "lo\nroutes 0\nhost-unreachable\n",
        "{job}"
    );
    drop(listener);
}

#[tokio::test]
async fn another_job_s_container_cannot_be_reached() {
    let fleet = Fleet::builder().slots(2).start().await.unwrap();
    let server = submit(
        &fleet,
        shell("echo listening; nc -l -p 7777 -w 20 && echo got-connection"),
    )
    .await;
    wait_until(
        Duration::from_secs(20),
        "the listening job to run",
        || async {
            let (_, job) = get_job(&fleet, &server).await;
            (job["status"] == "running").then_some(())
        },
    )
    .await
    .unwrap();
    let client = run(
        &fleet,
        shell("echo hi | nc -w 2 127.0.0.1 7777 && echo connected || echo refused"),
    )
    .await;
    assert_eq!(client["result"]["text"], "refused\n", "{client}");
    let response = fleet
        .request(reqwest::Method::DELETE, &format!("/jobs/{server}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let server = wait(&fleet, &server).await;
    assert!(!text(&server).contains("got-connection"), "{server}");
    fleet.assert_no_containers_left().await.unwrap();
}

#[tokio::test]
async fn a_fork_bomb_is_contained_and_the_node_carries_on() {
    let fleet = Fleet::builder().start().await.unwrap();
    // Only shell builtins after the bomb: once the pids limit is hit, nothing can fork.
    let mut bomb = shell(
        "(i=0; while [ $i -lt 1000 ]; do sleep 30 </dev/null >/dev/null 2>&1 & i=$((i+1)); done) 2>/workspace/err; \
         while read -r line; do last=\"$line\"; done < /workspace/err; echo \"$last\"; echo done",
    );
    bomb["timeout_seconds"] = json!(15);
    let job = run(&fleet, bomb).await;
    let out = text(&job);
    assert!(
        out.contains("can't fork") || out.contains("Resource temporarily unavailable"),
        "{job}"
    );
    // The node is fine: the next job runs normally.
    let next = run(&fleet, shell("echo still-here")).await;
    assert_eq!(next["status"], "completed");
    assert_eq!(next["result"]["text"], "still-here\n");
    fleet.assert_no_containers_left().await.unwrap();
}

#[tokio::test]
async fn a_memory_hog_is_oom_killed_and_reported() {
    let fleet = Fleet::builder().start().await.unwrap();
    let mut hog = shell("exec dd if=/dev/zero of=/dev/null bs=256M count=1");
    hog["resources"] = json!({ "memory": "32m" });
    let job = run(&fleet, hog).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["exit_code"], 137);
    let error = job["error"].as_str().unwrap();
    assert!(
        error.starts_with("out of memory: killed at its 32 MiB limit"),
        "{error}"
    );
    fleet.assert_no_containers_left().await.unwrap();
}

#[tokio::test]
async fn no_secret_of_the_node_reaches_the_container() {
    let fleet = Fleet::builder()
        .env("FLOTILLA_TEST_CANARY", "canary-3f9a1c")
        .api_key("canary-api-key-77e2b1")
        .start()
        .await
        .unwrap();
    let job = run(
        &fleet,
        shell("env; cat /proc/1/environ | tr '\\0' '\\n'; grep -rl canary- /workspace /tmp /etc 2>/dev/null; echo end"),
    )
    .await;
    let out = text(&job);
    assert!(out.ends_with("end\n"), "{out}");
    assert!(
        !out.contains("canary-"),
        "a node secret leaked into the container: {out}"
    );
    // The job's own coordinates are given on purpose; nothing else of the node's.
    let leaked: Vec<&str> = out
        .lines()
        .filter(|line| line.contains("FLOTILLA_"))
        .filter(|line| {
            !line.starts_with("FLOTILLA_JOB_ID=") && !line.starts_with("FLOTILLA_ATTEMPT=")
        })
        .collect();
    assert!(
        leaked.is_empty(),
        "node configuration leaked into the container: {leaked:?}\n{out}"
    );
    assert!(out.contains("FLOTILLA_ATTEMPT=1\n"), "{out}");
}

#[tokio::test]
async fn a_job_printing_100_mb_completes_with_bounded_node_memory() {
    let fleet = Fleet::builder()
        .env("FLOTILLA_MAX_LOG_MB", "8")
        .start()
        .await
        .unwrap();
    let mut body = shell("head -c 100000000 /dev/zero | tr '\\0' x; echo; echo done");
    body["timeout_seconds"] = json!(300);
    let job = run(&fleet, body).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["result"]["truncated"], true);
    assert!(job["result"]["text"].as_str().unwrap().len() <= 1024 * 1024);
    assert!(
        job["result"]["logs_tail"]
            .as_str()
            .unwrap()
            .ends_with("\ndone\n")
    );
    let rss = node_rss_kib(fleet.nodes[0].pid());
    println!("node RSS after a 100 MB job: {} MiB", rss / 1024);
    assert!(rss < 200 * 1024, "node memory grew to {rss} KiB");
}

fn node_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test]
async fn orphan_containers_are_reaped_periodically() {
    let fleet = Fleet::builder()
        .env("FLOTILLA_REAP_SECS", "1")
        .start()
        .await
        .unwrap();
    let create = |node: &str| {
        let output = std::process::Command::new("docker")
            .args(["create", "--label", "flotilla.managed=true", "--label"])
            .arg(format!("flotilla.node={node}"))
            .arg("--label")
            .arg(format!("flotilla.cluster={}", fleet.cluster))
            .args(["flotilla-worker:latest", "true"])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    };
    // One left by this node (no job, not in its pool), one by a node that no longer exists.
    let own = create(&fleet.node_ids[0]);
    let gone_node = format!("{}-gone", fleet.node_ids[0]);
    let foreign = create(&gone_node);
    wait_until(
        Duration::from_secs(20),
        "both orphans to be removed",
        || async {
            let exists = |id: &str| {
                std::process::Command::new("docker")
                    .args(["inspect", id])
                    .output()
                    .map(|o| o.status.success())
                    .unwrap_or(true)
            };
            (!exists(&own) && !exists(&foreign)).then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
}

/// `docker inspect -f <format> <id>`, or `None` if the container is gone.
fn try_inspect(id: &str, format: &str) -> Option<String> {
    let output = std::process::Command::new("docker")
        .args(["inspect", "-f", format, id])
        .output()
        .unwrap();
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// `docker inspect -f <format> <id>`.
fn inspect(id: &str, format: &str) -> String {
    let output = std::process::Command::new("docker")
        .args(["inspect", "-f", format, id])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

#[tokio::test]
async fn docker_keeps_no_log_of_job_output_and_open_files_are_limited() {
    let fleet = Fleet::builder().start().await.unwrap();
    let job_id = submit(
        &fleet,
        shell("ulimit -n; ulimit -Hn; echo started; sleep 30"),
    )
    .await;
    let container = wait_until(
        Duration::from_secs(20),
        "the job's container to run",
        || async {
            let (_, job) = get_job(&fleet, &job_id).await;
            let ids = flotilla_testkit::containers_for_job(&job_id).ok()?;
            (job["status"] == "running").then(|| ids.first().cloned())?
        },
    )
    .await
    .unwrap();
    // The node keeps the output (capped); Docker keeps none, so nothing grows on the host's disk.
    let log = "{{.HostConfig.LogConfig.Type}} {{json .HostConfig.LogConfig.Config}}";
    assert_eq!(inspect(&container, log), "none {}");
    // The warm containers waiting for the next jobs are made the same way.
    let warm: Vec<String> = fleet
        .containers()
        .unwrap()
        .into_iter()
        .filter(|id| !container.starts_with(id.as_str()))
        .collect();
    assert!(!warm.is_empty(), "no warm container to look at");
    // A warm container may be recycled between the listing and the look; those that are
    // still there are checked, and at least one must be.
    let mut looked = 0;
    for id in &warm {
        if let Some(config) = try_inspect(id, log) {
            assert_eq!(config, "none {}", "warm container {id}");
            looked += 1;
        }
    }
    assert!(
        looked > 0,
        "every warm container went away before it was looked at"
    );
    let ulimits = "{{range .HostConfig.Ulimits}}{{.Name}}={{.Soft}}:{{.Hard}}{{end}}";
    assert_eq!(inspect(&container, ulimits), "nofile=1024:4096");
    let response = fleet
        .request(reqwest::Method::DELETE, &format!("/jobs/{job_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(wait(&fleet, &job_id).await["status"], "cancelled");
    // The limits the job saw, in its output, which the node streamed all the same.
    let js = crate::js_context(&fleet).await;
    let chunks = crate::LogReader::open(&js, &job_id).await.until_end().await;
    assert_eq!(crate::stdout_of(&chunks), "1024\n4096\nstarted\n");
    fleet.assert_no_containers_left().await.unwrap();
}

/// Records a job and queues its message as validation would, but with whatever `request`
/// says: what anyone allowed to publish on the run subject can do.
async fn queue_unvalidated(fleet: &Fleet, request: Value) {
    use flotilla_proto::{JobClass, JobRecord, JobRequest, names};
    let request: JobRequest = serde_json::from_value(request).unwrap();
    // A valid job of the same class first: it opens the class's queues, which nodes follow.
    let opener = submit(fleet, shell("true")).await;
    assert_eq!(wait(fleet, &opener).await["status"], "completed");
    let js = crate::js_context(fleet).await;
    let jobs = js.get_key_value(names::BUCKET_JOBS).await.unwrap();
    let record = flotilla_proto::encode(&JobRecord::pending(&request)).unwrap();
    jobs.create(names::job_key(&request.job_id), record)
        .await
        .unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(names::HEADER_JOB_ID, request.job_id.as_str());
    let message = async_nats::jetstream::message::PublishMessage::build()
        .payload(flotilla_proto::encode(&request).unwrap())
        .headers(headers)
        .message_id(names::run_msg_id(&request.job_id));
    let subject = names::run_subject(request.priority, &JobClass::of(&request).id());
    js.send_publish(subject, message)
        .await
        .unwrap()
        .await
        .unwrap();
}

#[tokio::test]
async fn a_queued_job_that_breaks_a_bound_is_failed_by_the_node_without_running() {
    let fleet = Fleet::builder().start().await.unwrap();
    let job_id = "e2e-unbounded-1";
    // A timeout near u64::MAX (it overflowed the node's arithmetic) and NanoCpus 0 (Docker's
    // "no limit"): validation refuses both, a publisher on the run subject need not ask.
    queue_unvalidated(
        &fleet,
        json!({
            "job_id": job_id, "agent_id": "e2e", "engine": "shell", "profile": "default",
            "prompt": "echo ran", "timeout_seconds": u64::MAX,
            "resources": {"memory_bytes": 1u64 << 30, "nano_cpus": 0},
            "created_at": chrono::Utc::now(),
        }),
    )
    .await;
    let job = wait(&fleet, job_id).await;
    assert_eq!(job["status"], "failed", "{job:#}");
    let error = job["error"].as_str().unwrap();
    assert!(error.contains("refused the job"), "{error}");
    assert!(
        error.contains("timeout_seconds must be between 1 and 86400, got 18446744073709551615"),
        "{error}"
    );
    assert_eq!(job["exit_code"], Value::Null, "{job:#}");
    assert!(!text(&job).contains("ran"), "{job:#}");
    // Not retried: one attempt, and its message is dead-lettered.
    assert_eq!(job["attempt"], 1, "{job:#}");
    assert!(
        flotilla_testkit::containers_for_job(job_id)
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn output_that_flips_between_streams_is_capped_by_chunk_count() {
    let fleet = Fleet::builder()
        .node_env("FLOTILLA_MAX_LOG_CHUNKS", "50")
        .start()
        .await
        .unwrap();
    // A switch between stdout and stderr starts a new chunk: far more than 50, a few bytes each.
    // The pause keeps the writes apart: without it the pipes can hold all of it, and Docker
    // reads each stream in a few large frames when the machine is busy.
    let job_id = submit(
        &fleet,
        shell("i=0; while [ $i -lt 200 ]; do echo out; echo err >&2; usleep 5000; i=$((i+1)); done; echo last"),
    )
    .await;
    let job = wait(&fleet, &job_id).await;
    assert_eq!(job["status"], "completed", "{job:#}");
    let js = crate::js_context(&fleet).await;
    let chunks = crate::LogReader::open(&js, &job_id).await.until_end().await;
    let output = chunks
        .iter()
        .filter(|c| c.stream != flotilla_proto::LogStream::System)
        .count();
    println!("{output} output chunks kept of {} in all", chunks.len());
    assert!(output <= 50, "{output} output chunks kept");
    let notices: Vec<String> = chunks
        .iter()
        .filter(|c| c.stream == flotilla_proto::LogStream::System)
        .map(|c| String::from_utf8_lossy(&c.data).into_owned())
        .collect();
    assert!(
        notices
            .iter()
            .any(|n| n == "output truncated: more than 50 chunks; the rest is not kept"),
        "{notices:?}"
    );
    // The result (standard output; stderr may arrive after it) still has the end of it.
    let stdout = job["result"]["text"].as_str().unwrap_or_default();
    assert!(stdout.ends_with("last\n"), "{job:#}");
}
