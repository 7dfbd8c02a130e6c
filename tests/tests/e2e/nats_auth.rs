//! The fleet on a NATS server that demands credentials, and on one that speaks only TLS and
//! verifies client certificates: every service gets its settings through the environment
//! (`FLOTILLA_NATS_*`), jobs run, and a refused service exits with an error that says why,
//! without printing the secret.

use std::{process::Command, time::Duration};

use flotilla_testkit::{Fleet, NatsServer, Process, binary, free_port, repo_root, wait_until};

use crate::{shell, submit, wait};

const PASSWORD: &str = "e2e-nats-password-7f3a";
const TOKEN: &str = "e2e-nats-token-91c2";

/// The llm-gateway, started by hand on the fleet's NATS: it answers `/health` only once it
/// has connected and found the topology.
async fn assert_llm_gateway_connects(fleet: &Fleet) {
    let port = free_port();
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut command = Command::new(binary("llm-gateway").unwrap());
    command
        .env("FLOTILLA_NATS_URL", fleet.nats.url())
        .envs(fleet.nats.service_env())
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
            .env("FLOTILLA_LISTEN", format!("127.0.0.1:{}", free_port()))
            .env(
                "FLOTILLA_DISPATCHER_LISTEN",
                format!("127.0.0.1:{}", free_port()),
            )
            .env(
                "FLOTILLA_LLM_GATEWAY_LISTEN",
                format!("127.0.0.1:{}", free_port()),
            )
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
        .env("FLOTILLA_LISTEN", format!("127.0.0.1:{}", free_port()));
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
