//! The fleet on a NATS server that demands credentials, and on one that speaks only TLS and
//! verifies client certificates: every service gets its settings through the environment
//! (`FLOTILLA_NATS_*`), jobs run, and a refused service exits with an error that says why,
//! without printing the secret.

use std::{process::Command, time::Duration};

use flotilla_proto::{Encoding, names};
use flotilla_testkit::{
    Fleet, NatsServer, Process, binary, containers_for_job, free_port, repo_root, wait_until,
};
use serde_json::{Value, json};

use crate::{get_job, shell, submit, wait};

const PASSWORD: &str = "e2e-nats-password-7f3a";
const TOKEN: &str = "e2e-nats-token-91c2";

/// Starts the llm-gateway by hand on the fleet's NATS, with `auth` as its NATS settings, and
/// waits until it answers `/health`: only once it has connected and found the topology.
async fn assert_llm_gateway_connects_with(fleet: &Fleet, auth: &[(String, String)]) -> Process {
    let port = free_port();
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut command = Command::new(binary("llm-gateway").unwrap());
    command
        .env("FLOTILLA_NATS_URL", fleet.nats.url())
        .envs(auth.iter().cloned())
        .env("FLOTILLA_LLM_GATEWAY_LISTEN", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "info");
    let gateway = Process::spawn_command("llm-gateway", command, log.path()).unwrap();
    let url = format!("http://127.0.0.1:{port}/health");
    wait_until(
        Duration::from_secs(20),
        "the llm-gateway to answer",
        || async {
            let response = fleet.http.get(&url).send().await.ok()?;
            response.status().is_success().then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", gateway.log()));
    gateway
}

/// The same, with the settings the fleet gives every service.
async fn assert_llm_gateway_connects(fleet: &Fleet) {
    assert_llm_gateway_connects_with(fleet, &fleet.nats.service_env()).await;
}

#[tokio::test]
async fn the_fleet_runs_jobs_on_a_nats_server_that_requires_a_password() {
    let fleet = Fleet::builder()
        .nats(NatsServer::builder().user_password("flotilla", PASSWORD))
        .start()
        .await
        .unwrap();
    // The server refuses anonymous clients: the services got in with the credentials.
    let anonymous = async_nats::ConnectOptions::new()
        .connect(fleet.nats.url())
        .await;
    assert!(
        matches!(&anonymous, Err(e) if e.kind() == async_nats::ConnectErrorKind::AuthorizationViolation),
        "{:?}",
        anonymous.err()
    );

    let job_id = submit(&fleet, shell("echo authenticated")).await;
    let job = wait(&fleet, &job_id).await;
    assert_eq!(job["status"], "completed", "{job}\n{}", fleet.logs());
    assert_eq!(job["result"]["text"], "authenticated\n");
    assert_llm_gateway_connects(&fleet).await;
    assert!(
        !fleet.logs().contains(PASSWORD),
        "the password reached a log"
    );
}

#[tokio::test]
async fn the_fleet_runs_jobs_on_a_tls_only_nats_server_that_verifies_clients() {
    let fleet = Fleet::builder()
        .nats(NatsServer::builder().token(TOKEN).verify_clients())
        .start()
        .await
        .unwrap();
    // With the CA and the token but no client certificate, a client is turned away: the
    // services presented theirs (FLOTILLA_NATS_TLS_CERT, FLOTILLA_NATS_TLS_KEY).
    let ca = fleet.nats.tls_files().unwrap().ca.clone();
    let without_certificate = async_nats::ConnectOptions::with_token(TOKEN.to_owned())
        .add_root_certificates(ca)
        .require_tls(true)
        .connect(fleet.nats.url())
        .await;
    assert!(without_certificate.is_err());

    let job_id = submit(&fleet, shell("echo over tls")).await;
    let job = wait(&fleet, &job_id).await;
    assert_eq!(job["status"], "completed", "{job}\n{}", fleet.logs());
    assert_eq!(job["result"]["text"], "over tls\n");
    assert_llm_gateway_connects(&fleet).await;
    assert!(!fleet.logs().contains(TOKEN), "the token reached a log");
}

/// Each service with a wrong password: it must exit (not retry forever), with status 1 and an
/// error naming the user and the variables to check, and never print the password.
#[tokio::test]
async fn every_service_refused_by_nats_exits_with_a_clear_error() {
    let nats = NatsServer::builder()
        .user_password("flotilla", PASSWORD)
        .start()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let wrong = "wrong-password-d41d8c";
    let root = repo_root();
    let mut services = Vec::new();
    for name in ["api-gateway", "dispatcher", "agent-node", "llm-gateway"] {
        let mut command = Command::new(binary(name).unwrap());
        command
            .env("FLOTILLA_NATS_URL", nats.url())
            .env("FLOTILLA_NATS_USER", "flotilla")
            .env("FLOTILLA_NATS_PASSWORD", wrong)
            .env("FLOTILLA_ENGINES_DIR", root.join("engines"))
            .env("FLOTILLA_PROFILES_DIR", root.join("profiles"))
            // Port 0: the services bind before they connect, and nothing here connects to
            // them; a port picked ahead could be taken by a test running beside this one.
            .env("FLOTILLA_LISTEN", "127.0.0.1:0")
            .env("FLOTILLA_DISPATCHER_LISTEN", "127.0.0.1:0")
            .env("FLOTILLA_LLM_GATEWAY_LISTEN", "127.0.0.1:0")
            .env("FLOTILLA_STATE_DIR", dir.path().join("state"))
            .env("FLOTILLA_NODE_ID", format!("nats-auth-{}", free_port()))
            .env("FLOTILLA_CLUSTER", format!("nats-auth-{}", free_port()))
            .env("FLOTILLA_POOL_SIZE", "0")
            .env("RUST_LOG", "info");
        let log = dir.path().join(format!("{name}.log"));
        services.push(Process::spawn_command(name, command, &log).unwrap());
    }
    // Settings that cannot work are refused before any connection: exit 64 (EX_USAGE).
    let mut command = Command::new(binary("api-gateway").unwrap());
    command
        .env("FLOTILLA_NATS_URL", nats.url())
        .env("FLOTILLA_NATS_USER", "flotilla")
        .env("FLOTILLA_LISTEN", "127.0.0.1:0");
    let mut no_password =
        Process::spawn_command("api-gateway", command, &dir.path().join("no-password.log"))
            .unwrap();

    wait_until(
        Duration::from_secs(30),
        "every refused service to exit",
        || {
            let exited = services
                .iter_mut()
                .chain(std::iter::once(&mut no_password))
                .all(|service| service.try_exit_code().is_some());
            async move { exited.then_some(()) }
        },
    )
    .await
    .unwrap_or_else(|e| {
        let logs: Vec<String> = services.iter().map(Process::log).collect();
        panic!("{e}\n{}", logs.join("\n"))
    });

    for service in &mut services {
        let log = service.log();
        assert_eq!(
            service.try_exit_code(),
            Some(Some(1)),
            "{}: {log}",
            service.name()
        );
        assert!(log.contains("ERROR"), "{}: {log}", service.name());
        assert!(
            log.contains("refused user \"flotilla\" (FLOTILLA_NATS_USER)"),
            "{}: {log}",
            service.name()
        );
        assert!(
            log.contains("authorization violation"),
            "{}: {log}",
            service.name()
        );
        assert!(
            !log.contains(wrong),
            "{} printed the password: {log}",
            service.name()
        );
    }
    let log = no_password.log();
    assert_eq!(no_password.try_exit_code(), Some(Some(64)), "{log}");
    assert!(log.contains("FLOTILLA_NATS_PASSWORD_FILE"), "{log}");
}

/// The per-service users of `nats.conf`'s commented example, uncommented as they stand.
fn per_service_users() -> String {
    let conf = std::fs::read_to_string(repo_root().join("nats.conf")).unwrap();
    let start = conf
        .find("# BEGIN per-service users\n")
        .expect("nats.conf has the per-service users block");
    let end = conf.find("# END per-service users").unwrap();
    conf[start..end]
        .lines()
        .skip(1)
        .map(|line| {
            line.strip_prefix("# ")
                .unwrap_or(line.trim_start_matches('#'))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

const SERVICES: [(&str, &str); 5] = [
    ("api-gateway", "FLOTILLA_API_GATEWAY_NATS_PASSWORD"),
    ("dispatcher", "FLOTILLA_DISPATCHER_NATS_PASSWORD"),
    ("agent-node", "FLOTILLA_AGENT_NODE_NATS_PASSWORD"),
    ("llm-gateway", "FLOTILLA_LLM_GATEWAY_NATS_PASSWORD"),
    ("submitter", "FLOTILLA_SUBMITTER_NATS_PASSWORD"),
];

fn password_of(user: &str) -> String {
    format!("{user}-e2e-password")
}

/// The example in `nats.conf` works as documented: each service with its own user runs,
/// cancels and admits direct submissions without a single permission violation, and the
/// `submitter` user can submit and read records but not queue a job past validation.
#[tokio::test]
async fn the_fleet_runs_with_the_per_service_users_of_nats_conf() {
    let mut nats = NatsServer::builder().config(&per_service_users());
    for (user, variable) in SERVICES {
        nats = nats.server_env(variable, &password_of(user));
    }
    let fleet = Fleet::builder()
        .nats(nats)
        .gateway_env("FLOTILLA_NATS_USER", "api-gateway")
        .gateway_env("FLOTILLA_NATS_PASSWORD", &password_of("api-gateway"))
        .dispatcher_env("FLOTILLA_NATS_USER", "dispatcher")
        .dispatcher_env("FLOTILLA_NATS_PASSWORD", &password_of("dispatcher"))
        .node_env("FLOTILLA_NATS_USER", "agent-node")
        .node_env("FLOTILLA_NATS_PASSWORD", &password_of("agent-node"))
        .start()
        .await
        .unwrap();

    // A submitter listening for everyone's replies, as the shared `_INBOX.` prefix allowed.
    let spy = InboxSpy::connect(&fleet).await;

    // Over HTTP: queued by the gateway, run by the node (logs, acks, its buckets).
    let job_id = submit(&fleet, shell("echo per-service users")).await;
    let job = wait(&fleet, &job_id).await;
    assert_eq!(job["status"], "completed", "{job}\n{}", fleet.logs());
    assert_eq!(job["result"]["text"], "per-service users\n");
    spy.assert_refused_and_heard_nothing().await;

    // Cancelled by the gateway, stopped by the node that hears it.
    let job_id = submit(&fleet, shell("echo started; sleep 60")).await;
    wait_until(Duration::from_secs(20), "the job to run", || async {
        (get_job(&fleet, &job_id).await.1["status"] == "running").then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));
    let response = fleet
        .request(reqwest::Method::DELETE, &format!("/jobs/{job_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    wait_until(
        Duration::from_secs(20),
        "the cancelled job's container to be removed",
        || async { containers_for_job(&job_id).ok().filter(|c| c.is_empty()) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));

    // Straight to NATS as `submitter`: admitted by the dispatcher, record read back from KV.
    let client = async_nats::ConnectOptions::with_user_and_password(
        "submitter".to_owned(),
        password_of("submitter"),
    )
    .custom_inbox_prefix(names::inbox_prefix("submitter"))
    .connect(fleet.nats.url())
    .await
    .unwrap();
    let js = async_nats::jetstream::new(client.clone());
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(names::HEADER_CONTENT_TYPE, names::CONTENT_TYPE_JSON);
    let body = json!({
        "job_id": "per-service-direct-1",
        "agent_id": "direct",
        "engine": "shell",
        "prompt": "echo direct",
    });
    js.publish_with_headers(names::SUBJECT_SUBMIT, headers, body.to_string().into())
        .await
        .unwrap()
        .await
        .expect("the submission stored by JetStream");
    let jobs = js.get_key_value(names::BUCKET_JOBS).await.unwrap();
    wait_until(
        Duration::from_secs(30),
        "the direct job's record to say completed",
        || async {
            let entry = jobs
                .get(names::job_key("per-service-direct-1"))
                .await
                .ok()??;
            let record: Value = flotilla_proto::decode(&entry, Encoding::MessagePack)
                .ok()
                .or_else(|| serde_json::from_slice(&entry).ok())?;
            (record["status"] == "completed").then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", fleet.logs()));

    // The submitter cannot skip validation by queueing a job itself.
    let short = async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(1))
        .build(client);
    let shell_queue = names::run_subject(flotilla_proto::Priority::Normal, "shell");
    let bypass = match short.publish(shell_queue, "{}".into()).await {
        Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    assert!(bypass.is_err(), "the submitter queued a job directly");

    // The llm-gateway connects as its own user.
    let auth = [
        ("FLOTILLA_NATS_USER".to_owned(), "llm-gateway".to_owned()),
        (
            "FLOTILLA_NATS_PASSWORD".to_owned(),
            password_of("llm-gateway"),
        ),
    ];
    let gateway = assert_llm_gateway_connects_with(&fleet, &auth).await;

    // No service may destroy what the fleet runs on: here the node user tries to delete the
    // run queue and its consumer, and to purge the job records.
    let node = async_nats::ConnectOptions::with_user_and_password(
        "agent-node".to_owned(),
        password_of("agent-node"),
    )
    .custom_inbox_prefix(names::inbox_prefix("agent-node"))
    .connect(fleet.nats.url())
    .await
    .unwrap();
    let node_js = async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(node);
    assert!(node_js.delete_stream(names::STREAM_JOBS).await.is_err());
    let jobs_stream = node_js.get_stream(names::STREAM_JOBS).await;
    assert!(jobs_stream.is_ok(), "the run queue is gone");
    assert!(
        jobs_stream
            .unwrap()
            .delete_consumer(&names::run_consumer(
                flotilla_proto::Priority::Normal,
                "shell"
            ))
            .await
            .is_err()
    );
    let records = node_js
        .get_stream(format!("KV_{}", names::BUCKET_JOBS))
        .await
        .unwrap();
    assert!(
        records.purge().await.is_err(),
        "the node purged every job record"
    );

    // Not one violation but the submitter's and those refused attempts.
    let server_log = fleet.nats.log();
    let violations: Vec<&str> = server_log
        .lines()
        .filter(|line| line.contains("Violation"))
        .collect();
    let expected = |line: &&str| {
        (line.contains("submitter")
            && (line.contains(names::SUBJECT_RUN) || line.contains("_INBOX")))
            || (line.contains("agent-node")
                && ["STREAM.DELETE", "CONSUMER.DELETE", "STREAM.PURGE"]
                    .iter()
                    .any(|api| line.contains(api)))
    };
    assert!(violations.iter().all(expected), "{violations:#?}");
    assert!(
        !violations.is_empty(),
        "the bypass was not refused for permissions"
    );
    let logs = format!("{}{}", fleet.logs(), gateway.log());
    assert!(
        !logs.to_lowercase().contains("permissions violation"),
        "{logs}"
    );
}

/// A `submitter` client on the default inbox prefix that tries to read every service's replies.
struct InboxSpy {
    errors: tokio::sync::mpsc::UnboundedReceiver<String>,
    subscriptions: Vec<async_nats::Subscriber>,
    _client: async_nats::Client,
}

impl InboxSpy {
    /// The prefixes a reply may travel under: the default one, and each service's own.
    const PREFIXES: [&'static str; 4] = [
        "_INBOX.>",
        "_INBOX_api-gateway.>",
        "_INBOX_agent-node.>",
        "_INBOX_dispatcher.>",
    ];

    async fn connect(fleet: &Fleet) -> Self {
        let (tx, errors) = tokio::sync::mpsc::unbounded_channel();
        let client = async_nats::ConnectOptions::with_user_and_password(
            "submitter".to_owned(),
            password_of("submitter"),
        )
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    let _ = tx.send(e.to_string());
                }
            }
        })
        .connect(fleet.nats.url())
        .await
        .unwrap();
        let mut subscriptions = Vec::new();
        for subject in Self::PREFIXES {
            subscriptions.push(client.subscribe(subject).await.unwrap());
        }
        client.flush().await.unwrap();
        Self {
            errors,
            subscriptions,
            _client: client,
        }
    }

    /// Every subscription was refused for permissions, and none received a message.
    async fn assert_refused_and_heard_nothing(mut self) {
        let mut refused = Vec::new();
        while refused.len() < Self::PREFIXES.len() {
            let error = tokio::time::timeout(Duration::from_secs(10), self.errors.recv())
                .await
                .expect("a permission error for each subscription")
                .unwrap();
            refused.push(error.to_lowercase());
        }
        for subject in Self::PREFIXES {
            assert!(
                refused
                    .iter()
                    .any(|e| e.contains("permissions violation")
                        && e.contains(&subject.to_lowercase())),
                "{subject} not refused: {refused:#?}"
            );
        }
        for subscription in &mut self.subscriptions {
            let heard = futures::FutureExt::now_or_never(futures::StreamExt::next(subscription));
            assert!(
                !matches!(heard, Some(Some(_))),
                "the spy received a reply: {heard:?}"
            );
        }
    }
}
