//! The deployment as it ships: `scripts/build-service-images` builds the service images,
//! docker-compose brings up `deploy/compose/control-plane.yml` (three nats-servers, two
//! api-gateways, two dispatchers, every stream with three replicas) and
//! `deploy/compose/docker-host.yml` (an agent-node and the llm-gateway on the host's Docker
//! engine) under a project name of this test's own, and one shell job runs end to end through
//! the HTTP API. Everything is torn down again (`docker-compose down -v`, the node's job
//! containers, its job network and firewall chain), whether the test passed or not.
//!
//! The images are built from the binaries the suite already uses (`target/<profile>`,
//! `scripts/test` builds them): the script and the images are the shipped ones, but a release
//! build of the workspace on CI's two cores would take minutes beside the running suite. They
//! are tagged `e2e`, never `latest` or the version.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use flotilla_proto::names;
use flotilla_testkit::{free_port, repo_root, wait_until};
use serde_json::{Value, json};

const API_KEY: &str = "e2e-compose-api-key-0123456789";
const TAG: &str = "e2e";

/// Both compose projects of one test, torn down on drop.
struct Deployment {
    root: PathBuf,
    /// `<base>-cp` and `<base>-host`: the two files are two projects, as on two machines.
    base: String,
    env: Vec<(String, String)>,
    node_id: String,
    job_network: String,
    api: Vec<String>,
    nats_http: Vec<String>,
}

impl Deployment {
    fn new() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let tag = format!("{:x}{:x}", std::process::id(), nanos & 0xffff);
        let base = format!("flotilla-e2e-{tag}");
        let node_id = format!("test-compose-{tag}");
        let job_network = format!("flotilla-e2e-jobs-{tag}");
        let ports: Vec<u16> = (0..13).map(|_| free_port()).collect();
        let nats: Vec<String> = ports[0..3]
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect();
        let mut env: Vec<(String, String)> = vec![
            ("FLOTILLA_VERSION".into(), TAG.into()),
            ("FLOTILLA_API_KEY".into(), API_KEY.into()),
            ("FLOTILLA_BIND_ADDR".into(), "127.0.0.1".into()),
            // Its own cluster label: the node's reaper must never touch other tests' containers.
            ("FLOTILLA_CLUSTER".into(), format!("test-{tag}")),
            ("FLOTILLA_NODE_ID".into(), node_id.clone()),
            ("FLOTILLA_NATS_URL".into(), nats.join(",")),
            ("FLOTILLA_JOB_NETWORK".into(), job_network.clone()),
            ("FLOTILLA_POOL_SIZE".into(), "1".into()),
            ("FLOTILLA_DRAIN_GRACE_SECS".into(), "5".into()),
        ];
        let names = [
            "FLOTILLA_NATS_PORT_1",
            "FLOTILLA_NATS_PORT_2",
            "FLOTILLA_NATS_PORT_3",
            "FLOTILLA_NATS_HTTP_PORT_1",
            "FLOTILLA_NATS_HTTP_PORT_2",
            "FLOTILLA_NATS_HTTP_PORT_3",
            "FLOTILLA_API_PORT_1",
            "FLOTILLA_API_PORT_2",
            "FLOTILLA_DISPATCHER_PORT_1",
            "FLOTILLA_DISPATCHER_PORT_2",
            "FLOTILLA_LLM_GATEWAY_PORT",
            "FLOTILLA_LLM_METRICS_PORT",
            "FLOTILLA_NODE_METRICS_PORT",
        ];
        for (name, port) in names.iter().zip(&ports) {
            env.push(((*name).to_owned(), port.to_string()));
        }
        Self {
            root: repo_root(),
            base,
            env,
            node_id,
            job_network,
            api: ports[6..8]
                .iter()
                .map(|p| format!("http://127.0.0.1:{p}"))
                .collect(),
            nats_http: ports[3..6]
                .iter()
                .map(|p| format!("http://127.0.0.1:{p}"))
                .collect(),
        }
    }

    fn env(&self, name: &str) -> &str {
        &self.env.iter().find(|(n, _)| n == name).unwrap().1
    }

    /// `docker-compose -p <project> -f deploy/compose/<file> <args>`.
    fn compose(&self, file: &str, args: &[&str]) -> Output {
        let project = self.project(file);
        let mut command = Command::new("docker-compose");
        command
            .current_dir(&self.root)
            .args(["--no-ansi", "-p", &project, "-f"])
            .arg(self.root.join("deploy/compose").join(file))
            .args(args)
            .envs(self.env.iter().map(|(n, v)| (n.as_str(), v.as_str())));
        // Provider keys of the machine's own must not reach the gateway under test.
        command.env_remove("FLOTILLA_LLM_ENV_FILE");
        command.output().unwrap_or_else(|e| {
            panic!(
                "cannot run docker-compose ({e}): install it (Debian: apt-get install docker-compose)"
            )
        })
    }

    fn project(&self, file: &str) -> String {
        let suffix = if file.starts_with("control") {
            "cp"
        } else {
            "host"
        };
        format!("{}-{suffix}", self.base)
    }

    fn up(&self, file: &str) {
        let output = self.compose(file, &["up", "-d"]);
        assert!(
            output.status.success(),
            "docker-compose up {file} failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Every service's output, for failure messages.
    fn logs(&self) -> String {
        let mut all = String::new();
        for file in ["control-plane.yml", "docker-host.yml"] {
            let output = self.compose(file, &["logs", "--no-color", "--tail", "60"]);
            all.push_str(&String::from_utf8_lossy(&output.stdout));
            all.push_str(&String::from_utf8_lossy(&output.stderr));
        }
        all
    }

    fn client(&self) -> reqwest::Client {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {API_KEY}").parse().unwrap(),
        );
        reqwest::Client::builder()
            .default_headers(headers)
            .timeout(Duration::from_secs(90))
            .build()
            .unwrap()
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        // The node first, so that it drains and removes its warm containers itself.
        for (file, timeout) in [("docker-host.yml", "20"), ("control-plane.yml", "2")] {
            let output = self.compose(file, &["down", "-v", "--remove-orphans", "-t", timeout]);
            if !output.status.success() {
                eprintln!(
                    "docker-compose down {file}: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
        }
        // Whatever the node left (killed mid-job, say): its job containers, then its network.
        let left = Command::new("docker")
            .args(["ps", "-aq", "--filter"])
            .arg(format!("label={}={}", names::LABEL_NODE, self.node_id))
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let ids: Vec<&str> = left.split_whitespace().collect();
        if !ids.is_empty() {
            let _ = Command::new("docker")
                .arg("rm")
                .arg("-f")
                .args(&ids)
                .output();
        }
        remove_job_network(&self.job_network);
    }
}

/// Removes the job network the node created, and the firewall chain that fenced it.
fn remove_job_network(network: &str) {
    let Ok(output) = Command::new("docker")
        .args(["network", "inspect", "-f", "{{.Id}}", network])
        .output()
    else {
        return;
    };
    let id = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let _ = Command::new("docker")
        .args(["network", "rm", network])
        .output();
    if id.len() < 12 {
        return;
    }
    let chain = names::job_network_chain(&id);
    let bridge = format!("br-{}", &id[..12]);
    for binary in ["iptables", "ip6tables"] {
        for args in [
            vec!["-D", "INPUT", "-i", &bridge, "-j", &chain],
            vec!["-F", &chain],
            vec!["-X", &chain],
        ] {
            let _ = Command::new(binary).arg("-w").args(&args).output();
        }
    }
}

/// Builds the images with the project's script from the binaries next to this test.
fn build_images(root: &Path) {
    let bin_dir = flotilla_testkit::binary("agent-node")
        .unwrap_or_else(|e| panic!("{e}"))
        .parent()
        .unwrap()
        .to_path_buf();
    let profile = if bin_dir.ends_with("release") {
        "release"
    } else {
        "debug"
    };
    let started = Instant::now();
    let output = Command::new(root.join("scripts/build-service-images"))
        .arg("--no-build")
        .env("FLOTILLA_PROFILE", profile)
        .env("FLOTILLA_BIN_DIR", &bin_dir)
        .env("FLOTILLA_IMAGE_TAGS", TAG)
        .output()
        .expect("cannot run scripts/build-service-images");
    assert!(
        output.status.success(),
        "scripts/build-service-images failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    println!(
        "service images ({profile} binaries) built in {:.1?}:\n{}",
        started.elapsed(),
        String::from_utf8_lossy(&output.stdout)
    );
}

#[tokio::test]
async fn the_compose_deployment_runs_a_job_end_to_end() {
    let version = Command::new("docker-compose").arg("version").output();
    assert!(
        version.as_ref().is_ok_and(|o| o.status.success()),
        "docker-compose is missing: install it (Debian: apt-get install docker-compose; \
         the compose files use format 3.8, docker-compose 1.27 or later)"
    );
    let root = repo_root();
    build_images(&root);
    let deployment = Deployment::new();
    let started = Instant::now();
    deployment.up("control-plane.yml");
    deployment.up("docker-host.yml");
    let http = deployment.client();

    // Healthy: each nats-server says so, and both gateways see JetStream and the node.
    for url in &deployment.nats_http {
        wait_until(Duration::from_secs(60), "nats-server /healthz", || async {
            let response = http.get(format!("{url}/healthz")).send().await.ok()?;
            response.status().is_success().then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}: {url}\n{}", deployment.logs()));
    }
    for api in &deployment.api {
        wait_until(
            Duration::from_secs(90),
            "a gateway with one live node",
            || async {
                let response = http.get(format!("{api}/health")).send().await.ok()?;
                let health: Value = response.json().await.ok()?;
                (health["status"] == "ok" && health["checks"]["nodes"] == "1 live").then_some(())
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}: {api}\n{}", deployment.logs()));
    }
    println!("compose deployment healthy in {:.1?}", started.elapsed());

    // Three replicas of the run queue, one on each server.
    let jsz: Value = http
        .get(format!(
            "{}/jsz?streams=true&config=true",
            deployment.nats_http[0]
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let streams = jsz["account_details"][0]["stream_detail"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let jobs = streams
        .iter()
        .find(|s| s["name"] == names::STREAM_JOBS)
        .unwrap_or_else(|| panic!("no {} stream in /jsz: {jsz}", names::STREAM_JOBS));
    assert_eq!(jobs["config"]["num_replicas"], 3, "{jobs}");

    // One shell job: submitted on one gateway, followed on the other.
    let submitted = Instant::now();
    let response = http
        .post(format!("{}/jobs", deployment.api[0]))
        .json(&json!({
            "agent_id": "e2e-compose",
            "engine": "shell",
            "prompt": "echo hello from compose; echo on $(id -u)",
        }))
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    assert_eq!(status, 202, "{body}\n{}", deployment.logs());
    let job_id = body["job_id"].as_str().unwrap().to_owned();
    let job: Value = http
        .get(format!(
            "{}/jobs/{job_id}/wait?timeout=60",
            deployment.api[1]
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    println!(
        "compose job finished {:.1?} after its submission",
        submitted.elapsed()
    );
    assert_eq!(job["status"], "completed", "{job}\n{}", deployment.logs());
    assert_eq!(job["exit_code"], 0, "{job}");
    assert_eq!(job["node_id"], deployment.node_id.as_str(), "{job}");
    assert_eq!(
        job["result"]["text"], "hello from compose\non 65534\n",
        "{job}"
    );

    // The node fenced its job network: a container on it reaches the llm-gateway at the
    // bridge address, and the same listener at another of the host's addresses not at all.
    let address = |network: &str| {
        docker(&[
            "network",
            "inspect",
            "-f",
            "{{(index .IPAM.Config 0).Gateway}}",
            network,
        ])
    };
    // The control plane's network: the host is on it too (its gateway address), and the
    // llm-gateway listens on every host address, so only the fence keeps jobs from it there.
    let control_network = format!("{}_default", deployment.project("control-plane.yml"));
    let (gateway, elsewhere) = (address(&deployment.job_network), address(&control_network));
    let port = deployment.env("FLOTILLA_LLM_GATEWAY_PORT");
    // busybox nc (the test worker image's busybox wget segfaults here), with stdin held open
    // until the answer is in: nc gives up on the connection when its input ends.
    let get = "(printf 'GET /health HTTP/1.0\\r\\n\\r\\n'; sleep 2)";
    let probe = format!(
        "{get} | nc -w 5 {gateway} {port}; echo; \
         if {get} | nc -w 3 {elsewhere} {port} | grep -q 200; then echo NOT FENCED; \
         else echo fenced; fi"
    );
    let seen = docker(&[
        "run",
        "--rm",
        "--network",
        &deployment.job_network,
        "--label",
        &format!("{}={}", names::LABEL_NODE, deployment.node_id),
        "flotilla-worker:latest",
        "sh",
        "-c",
        &probe,
    ]);
    assert!(
        seen.contains("\"providers\""),
        "a job container did not reach the llm-gateway at {gateway}:{port}: {seen}\n{}",
        deployment.logs()
    );
    assert!(
        seen.ends_with("fenced") && !seen.contains("NOT FENCED"),
        "a job container reached the host at {elsewhere}:{port}: {seen}"
    );
    println!(
        "compose test: {:.1?} from `up` to the checks' end",
        started.elapsed()
    );
}

fn docker(args: &[&str]) -> String {
    let output = Command::new("docker").args(args).output().unwrap();
    assert!(
        output.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}
